"""Hostile input, fuzzed: flows.yaml and packed files end in a model / a config or in one BitsweepError,
never another exception, a hang (hypothesis deadlines) or a big allocation (an address-space cap)."""

import json
import os
import resource
import struct
from datetime import timedelta

import pytest
import timm
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import bitsweep
from bitsweep import BitsweepError, load_packed, save_packed
from bitsweep.config import Config, load_config, parse_config

HEADROOM = 1 << 30  # bytes of address space a fuzzed load may add: far more than the file needs, far less than a bomb
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=20), derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _vm_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


@pytest.fixture
def memory_cap():
    """Cap this process's address space at what it uses now plus HEADROOM while the test runs:
    an allocation beyond that fails at once instead of succeeding lazily."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + HEADROOM, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def one_clear_error(exc: BitsweepError):
    message = str(exc)
    assert message and "\n" not in message and "allocate" not in message.lower(), message


# --- flows.yaml -------------------------------------------------------------------------------------------

KEYS = ["sweeps", "deployments", "runner", "name", "models", "dataset", "schemes", "bits", "granularity",
        "group_size", "policies", "compressors", "kernels", "evaluation", "output", "source", "epochs",
        "keep_first", "include", "batch_size", "cron", "sweep", "kind", "checkpoint"]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.sampled_from(["pow2", "symmetric", "full", "synthetic", "resnet18", "group",
                                                    "channel", "int8", "gzip", "2001-02-30", "*"]))
structures = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5),
                          max_leaves=30)
VALID = {"sweeps": [{"name": "s", "models": ["resnet18", {"source": "trained", "name": "resnet10t"}],
                     "dataset": {"name": "synthetic"}, "schemes": ["pow2"], "bits": [8, 4],
                     "policies": ["full", {"keep_first": 1}]}]}


def mutated(data, path, value):
    """``data`` with the entry at ``path`` (indices into nested dicts/lists, taken modulo) set to ``value``."""
    if not path or not isinstance(data, dict | list) or not data:
        return value
    copy = dict(data) if isinstance(data, dict) else list(data)
    key = list(copy)[path[0] % len(copy)] if isinstance(copy, dict) else path[0] % len(copy)
    copy[key] = mutated(copy[key], path[1:], value)
    return copy


def parses_or_one_error(call):
    try:
        assert isinstance(call(), Config)
    except BitsweepError as exc:
        one_clear_error(exc)


@FUZZ
@given(structures)
def test_random_structures(data):
    parses_or_one_error(lambda: parse_config(data))


@FUZZ
@given(st.lists(st.integers(0, 10), max_size=5), structures)
def test_edits_of_a_valid_config(path, value):
    parses_or_one_error(lambda: parse_config(mutated(VALID, path, value)))


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1"))
       | structures.map(lambda s: yaml.safe_dump(s)))
def test_random_yaml_files(tmp_path, text):
    path = tmp_path / "flows.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    parses_or_one_error(lambda: load_config(path))


@pytest.mark.parametrize("text", [
    "a: 2001-02-30",                      # a date that does not exist: yaml raises ValueError
    "[" * 5000 + "]" * 5000,              # nesting deeper than Python's recursion limit
    "a: &a [1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b, *b]",
    "!!python/object/apply:os.system ['touch /tmp/bitsweep-pwned']",
])
def test_hostile_yaml_files(tmp_path, text):
    path = tmp_path / "flows.yaml"
    path.write_text(text)
    with pytest.raises(BitsweepError, match=f"^{path}: ") as info:
        load_config(path)
    one_clear_error(info.value)


def test_unreadable_config_files(tmp_path):
    (tmp_path / "bytes.yaml").write_bytes(b"sweeps: \xff\xfe\x00")
    with pytest.raises(BitsweepError, match="bytes.yaml: not valid YAML .*UnicodeDecodeError"):
        load_config(tmp_path / "bytes.yaml")
    with pytest.raises(BitsweepError, match="cannot read .*Is a directory"):
        load_config(tmp_path)


# --- packed files -----------------------------------------------------------------------------------------

class Packed:
    """A real packed file, its bytes, and where its tensor data starts (a short repr for hypothesis' reports)."""

    def __init__(self, path):
        self.path, self.raw = path, path.read_bytes()
        self.start = 8 + struct.unpack("<Q", self.raw[:8])[0]

    def __repr__(self):
        return f"Packed({self.path.name}, {len(self.raw)} bytes)"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """timm's test_efficientnet, 4-bit, packed. Loads run the kernels' PyTorch path: the reader is under test
    here, and building the kernels (minutes, once) must not count against a deadline."""
    from bitsweep.kernels import extension

    saved = os.environ.get("BITSWEEP_KERNELS")
    os.environ["BITSWEEP_KERNELS"] = "python"
    extension.cache_clear()
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=4).eval()
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    save_packed(bitsweep.quantize_model(model, "symmetric", 4), path, "test_efficientnet", {"num_classes": 4})
    yield Packed(path)
    if saved is None:
        del os.environ["BITSWEEP_KERNELS"]
    else:
        os.environ["BITSWEEP_KERNELS"] = saved
    extension.cache_clear()


def loads_or_one_error(path):
    """The file's model, or None after one clear BitsweepError."""
    try:
        return load_packed(path)
    except BitsweepError as exc:
        one_clear_error(exc)
        return None


@FUZZ
@given(st.data())
def test_truncated_files_are_refused(packed, tmp_path, memory_cap, data):
    raw = packed.raw
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    assert loads_or_one_error(cut) is None


@FUZZ
@given(st.data())
def test_every_data_byte_flip_fails_its_checksum(packed, tmp_path, memory_cap, data):
    raw, start = packed.raw, packed.start
    offset, mask = data.draw(st.integers(start, len(raw) - 1)), data.draw(st.integers(1, 255))
    damaged = bytearray(raw)
    damaged[offset] ^= mask
    (tmp_path / "flip.safetensors").write_bytes(damaged)
    with pytest.raises(BitsweepError, match="fails its sha256 check"):
        load_packed(tmp_path / "flip.safetensors")


@FUZZ
@given(st.data())
def test_header_byte_flips(packed, tmp_path, memory_cap, data):
    raw, start = packed.raw, packed.start
    offset, mask = data.draw(st.integers(0, start - 1)), data.draw(st.integers(1, 255))
    damaged = bytearray(raw)
    damaged[offset] ^= mask
    (tmp_path / "flip.safetensors").write_bytes(damaged)
    loads_or_one_error(tmp_path / "flip.safetensors")


def with_header(raw, start, edit):
    """``raw`` with its safetensors JSON header changed by ``edit`` (tensor data kept)."""
    header = json.loads(raw[8:start])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[start:]


huge = st.lists(st.integers(0, 2**62) | st.sampled_from([2**31, 2**32 + 1, 10**12]), min_size=1, max_size=5)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.text(max_size=8) | huge,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)


@FUZZ
@given(st.data())
def test_bitsweep_header_edits(packed, tmp_path, memory_cap, data):
    """Any field of the bitsweep header (layer shapes, bits, arch, checksums...) set to a random or huge value."""
    raw, start = packed.raw, packed.start
    header = json.loads(raw[8:start])
    meta = json.loads(header["__metadata__"]["bitsweep"])
    layer = data.draw(st.sampled_from(sorted(meta["layers"])))
    field = data.draw(st.sampled_from(["shape", "bits", "qmin", "qmax", "scheme", "granularity", "group_size",
                                       "dtype", "module", None]))
    value = data.draw(huge if field == "shape" and data.draw(st.booleans()) else json_values)
    if field is None:
        top = data.draw(st.sampled_from(["format", "bitsweep", "arch", "arch_kwargs", "layers", "sha256"]))
        meta[top] = value
    else:
        meta["layers"][layer][field] = value
    edited = with_header(raw, start, lambda h: h["__metadata__"].update(bitsweep=json.dumps(meta)))
    (tmp_path / "edit.safetensors").write_bytes(edited)
    loads_or_one_error(tmp_path / "edit.safetensors")


@FUZZ
@given(st.data())
def test_safetensors_header_edits(packed, tmp_path, memory_cap, data):
    """A tensor's shape, dtype or offsets in the safetensors header itself set to random or huge values."""
    raw, start = packed.raw, packed.start
    with safe_open(packed.path, "pt") as handle:
        key = data.draw(st.sampled_from(sorted(handle.keys())))
    field = data.draw(st.sampled_from(["shape", "dtype", "data_offsets"]))
    value = data.draw(huge | st.sampled_from(["U8", "F64", "I64", "BOOL", "F8_E4M3", "?"]) | json_values)
    edited = with_header(raw, start, lambda h: h[key].update({field: value}))
    (tmp_path / "edit.safetensors").write_bytes(edited)
    loads_or_one_error(tmp_path / "edit.safetensors")
