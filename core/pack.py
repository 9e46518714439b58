"""The pack step: a quantized model as one safetensors file of bit-packed codes, scales and the
remaining tensors, with a JSON header that says how to rebuild and decode it.

A file is read from its bytes alone (plus timm): every size in the header is checked against
what the file holds before anything is allocated, and every tensor against its sha256, so a
damaged or foreign file costs one ``BitsweepError``, never a crash or a huge allocation.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from bitsweep import __version__
from bitsweep.errors import BitsweepError, first_line
from bitsweep.files import atomic_path
from bitsweep.registry import get_registry
from bitsweep.schemes import QuantizedTensor, QuantSpec, check_bits, code_dtype, scale_shape

FORMAT = "bitsweep-packed/1"
# create_model arguments that fetch or read weights: a file names an architecture, never a download.
_NOT_ARCH = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
_SUFFIXES = (".weight.packed", ".weight.scale", ".weight.zero_point")


def _group(bits: int) -> tuple[int, int]:
    """Values and bytes in the shortest run of values that ends on a byte boundary."""
    values = 8 // math.gcd(bits, 8)
    return values, values * bits // 8


def _word_dtype(bits: int) -> torch.dtype:
    # A run is at most 56 bits (7-bit codes); int32 is faster when the run fits in it.
    return torch.int32 if _group(bits)[0] * bits <= 24 else torch.int64


def _runs(flat: torch.Tensor, width: int) -> torch.Tensor:
    """``flat`` zero-padded to whole runs of ``width`` entries, one run per row."""
    padded = torch.zeros(-(-flat.numel() // width) * width, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    return padded.view(-1, width)


def _join(columns: torch.Tensor, shift: int, dtype: torch.dtype) -> torch.Tensor:
    """Each row's entries side by side in one integer, entry i at bit ``i * shift``."""
    word = torch.zeros(columns.shape[0], dtype=dtype)
    for i in range(columns.shape[1]):
        word |= columns[:, i].to(dtype) << (i * shift)
    return word


def _split(word: torch.Tensor, pieces: int, shift: int) -> torch.Tensor:
    """The inverse of ``_join``: ``pieces`` uint8 entries of ``shift`` bits from each integer."""
    out = torch.empty(word.shape[0], pieces, dtype=torch.uint8)
    for i in range(pieces):
        out[:, i] = (word >> (i * shift)) & ((1 << shift) - 1)
    return out


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values below ``2**bits`` (any shape, row-major) -> exactly ``ceil(bits*numel/8)`` bytes.

    Value i occupies bits ``[i*bits, (i+1)*bits)`` of one little-endian stream whose bit j is
    bit ``j % 8`` of byte ``j // 8``: the layout the C++ kernels read.
    """
    check_bits(bits)
    if values.dtype != torch.uint8:
        raise BitsweepError(f"pack_bits needs uint8 values, got {values.dtype}")
    flat = values.detach().reshape(-1).cpu()
    count = flat.numel()
    if count and int(flat.max()) >> bits:
        raise BitsweepError(f"value {int(flat.max())} does not fit in {bits} bits")
    if bits == 8:
        return flat.clone()
    per_run, run_bytes = _group(bits)
    word = _join(_runs(flat, per_run), bits, _word_dtype(bits))
    return _split(word, run_bytes, 8).view(-1)[: -(-bits * count // 8)].clone()


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` values ``pack_bits`` stored in ``data``, as uint8 1-D."""
    check_bits(bits)
    need = -(-bits * count // 8)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != need:
        raise BitsweepError(f"{count} values of {bits} bits need {need} bytes of uint8, "
                            f"got {data.numel()} of {data.dtype}")
    if bits == 8:
        return data.clone()
    per_run, run_bytes = _group(bits)
    word = _join(_runs(data, run_bytes), 8, _word_dtype(bits))
    return _split(word, per_run, bits).view(-1)[:count]


@dataclass
class PackedTensor:
    """One quantized weight as it lives in a packed file and in memory: n-bit codes + scales.

    ``data`` holds ``code - qmin`` for each weight, packed by ``pack_bits``.
    """

    data: torch.Tensor
    shape: tuple[int, ...]
    bits: int
    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    scheme: str
    granularity: str
    group_size: int | None
    dtype: torch.dtype

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor) -> PackedTensor:
        stored = (qt.codes.to(torch.int32) - qt.qmin).to(torch.uint8)
        return cls(data=pack_bits(stored, qt.bits), shape=tuple(qt.codes.shape), bits=qt.bits,
                   scale=qt.scale.to(torch.float32).contiguous(), zero_point=qt.zero_point.to(torch.int32).contiguous(),
                   qmin=qt.qmin, qmax=qt.qmax, scheme=qt.scheme, granularity=qt.granularity,
                   group_size=qt.group_size, dtype=qt.dtype)

    def codes(self) -> torch.Tensor:
        """The integer codes (int32) with the weight's shape."""
        stored = unpack_bits(self.data, self.bits, math.prod(self.shape))
        return (stored.to(torch.int32) + self.qmin).reshape(self.shape)

    def to_quantized(self) -> QuantizedTensor:
        entries = get_registry().entries("scheme")
        if self.scheme not in entries:
            raise BitsweepError(f"scheme {self.scheme!r} is not registered; install the plugin that provides it "
                                f"(available: {', '.join(sorted(entries)) or 'none'})")
        return QuantizedTensor(codes=self.codes().to(code_dtype(self.qmin, self.qmax)), scale=self.scale,
                               zero_point=self.zero_point, qmin=self.qmin, qmax=self.qmax, bits=self.bits,
                               scheme=self.scheme, granularity=self.granularity, group_size=self.group_size,
                               dtype=self.dtype, codec=entries[self.scheme].obj)

    def dequantize(self) -> torch.Tensor:
        """The float weights, bit for bit those of the ``QuantizedTensor`` it was packed from."""
        return self.to_quantized().dequantize()

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero_point))


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    scheme: str
    bits: int
    granularity: str
    group_size: int | None
    qmin: int
    qmax: int
    shape: tuple[Annotated[int, Field(ge=0)], ...]
    dtype: str
    module: str


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: str
    bitsweep: str
    arch: str
    arch_kwargs: dict[str, Any]
    layers: dict[str, _Layer]
    sha256: dict[str, Annotated[str, Field(pattern="^[0-9a-f]{64}$")]]


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _match_arch(arch: str, arch_kwargs: dict, layer_shapes: dict[str, tuple],
                tensor_shapes: dict[str, tuple]) -> tuple[dict[str, str], str | None]:
    """Build ``arch`` on the meta device (no memory) and compare it with a file's tensors.

    Returns each layer's module type, and the first difference (None when they match).
    """
    if not isinstance(arch, str) or not isinstance(arch_kwargs, dict):
        return {}, f"arch {arch!r} / arch_kwargs {arch_kwargs!r} are not a name and a mapping"
    if bad := [k for k in _NOT_ARCH if k in arch_kwargs]:
        return {}, f"arch_kwargs may not set {bad[0]!r} (it loads weights, not an architecture)"
    import timm  # here, not at the top: `import bitsweep` stays quick
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **arch_kwargs)
    except Exception as exc:  # unknown name, bad keyword, a model's own check: timm raises all kinds
        return {}, f"timm cannot build {arch!r} with {arch_kwargs}: {type(exc).__name__}: {first_line(exc)}"
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    types = {}
    for name, shape in layer_shapes.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            return {}, f"{arch} has no layer {name!r}"
        types[name] = type(layer).__name__
        found = expected.pop(f"{name}.weight", None)
        if found != tuple(shape):
            return {}, f"layer {name!r} has a weight of shape {tuple(shape)}, but {found} in timm's {arch}"
    for key in [*expected, *(k for k in tensor_shapes if k not in expected)]:
        if key not in tensor_shapes:
            return {}, f"tensor {key!r} of timm's {arch} is missing"
        if key not in expected:
            return {}, f"tensor {key!r} is not in timm's {arch}"
        if expected[key] != tuple(tensor_shapes[key]):
            return {}, f"tensor {key!r} is {tuple(tensor_shapes[key])} but {expected[key]} in {arch}"
    return types, None


def save_packed(module: nn.Module, path, arch: str | None = None, arch_kwargs: dict | None = None) -> Path:
    """Write ``module`` (from ``quantize_model``, or a loaded packed model) as one packed file.

    ``arch``/``arch_kwargs`` say how ``timm.create_model`` rebuilds it; by default timm's own
    record of the architecture, with no arguments.
    """
    path = Path(path)
    layers = {name: t if isinstance(t, PackedTensor) else PackedTensor.from_quantized(t)
              for name, t in getattr(module, "quantized_layers", {}).items()}
    if arch is None:
        arch = (getattr(module, "pretrained_cfg", None) or {}).get("architecture")
        if arch is None:
            raise BitsweepError(f"{path}: the model does not say which timm architecture it is; "
                                "pass arch= (and arch_kwargs= if it was built with any)")
    arch_kwargs = {} if arch_kwargs is None else arch_kwargs
    weights = {f"{name}.weight" for name in layers}
    tensors = {key: t.detach().clone(memory_format=torch.contiguous_format)
               for key, t in module.state_dict().items() if key not in weights}
    types, problem = _match_arch(arch, arch_kwargs, {n: p.shape for n, p in layers.items()},
                                 {k: t.shape for k, t in tensors.items()})
    if problem:
        raise BitsweepError(f"{path}: the model does not match timm's {arch!r}: {problem}; "
                            "pass arch= / arch_kwargs= that rebuild it")
    header_layers = {}
    for name, p in layers.items():
        tensors |= {name + s: t.contiguous() for s, t in zip(_SUFFIXES, (p.data, p.scale, p.zero_point))}
        header_layers[name] = {"scheme": p.scheme, "bits": p.bits, "granularity": p.granularity,
                               "group_size": p.group_size, "qmin": p.qmin, "qmax": p.qmax,
                               "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                               "module": types[name]}
    header = {"format": FORMAT, "bitsweep": __version__, "arch": arch, "arch_kwargs": arch_kwargs,
              "layers": header_layers, "sha256": {key: _sha256(t) for key, t in tensors.items()}}
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise BitsweepError(f"{path}: arch_kwargs must be plain JSON values ({exc})") from None
    # One metadata key: safetensors writes several in hash order, which would make equal models differ by byte.
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"bitsweep": text})
    return path


def packed_model(path) -> tuple[nn.Module, dict[str, PackedTensor]]:
    """The model a packed file holds, checked against timm's architecture: the model with its float
    tensors loaded (the quantized layers' weights are left as built), and the packed layers in module order.
    ``bitsweep.load_packed`` puts packed modules in their place."""
    path = Path(path)
    layers, tensors, header = read_packed(path)
    types, problem = _match_arch(header.arch, header.arch_kwargs, {n: p.shape for n, p in layers.items()},
                                 {k: tuple(t.shape) for k, t in tensors.items()})
    for name, info in header.layers.items():
        if not problem and types[name] != info.module:
            problem = f"layer {name!r} is a {info.module} in the file but a {types[name]} in {header.arch}"
    if problem:
        raise BitsweepError(f"{path}: architecture mismatch: {problem}; the file was written for another "
                            "model or timm version; rebuild it with save_packed")
    import timm  # as in _match_arch

    model = timm.create_model(header.arch, pretrained=False, **header.arch_kwargs)
    model.load_state_dict(tensors, strict=False)  # the quantized weights are missing: packed modules replace them
    return model, {name: layers[name] for name, _ in model.named_modules() if name in layers}  # quantize_model's order


def read_packed(path) -> tuple[dict[str, PackedTensor], dict[str, torch.Tensor], _Header]:
    """A packed file's quantized layers, its other tensors and its header, all checked; no model built."""
    path = Path(path)
    if not path.is_file():
        raise BitsweepError(f"{path}: no such file; check the path, or write it with bitsweep.save_packed")
    tensors, header = _read(path)
    layers = {}
    for name, info in header.layers.items():
        packed, scale, zero_point = (tensors.pop(name + suffix) for suffix in _SUFFIXES)
        layers[name] = PackedTensor(data=packed, shape=info.shape, bits=info.bits, scale=scale, zero_point=zero_point,
                                    qmin=info.qmin, qmax=info.qmax, scheme=info.scheme, granularity=info.granularity,
                                    group_size=info.group_size, dtype=getattr(torch, info.dtype))
    return layers, tensors, header


def _read(path: Path) -> tuple[dict[str, torch.Tensor], _Header]:
    """Every tensor of a packed file by key, and its header: sizes, then checksums, checked."""
    damaged = "the file is damaged or not a bitsweep packed file; write it again with bitsweep.save_packed"
    try:
        with safe_open(path, "pt") as handle:
            text = (handle.metadata() or {}).get("bitsweep")
            if text is None:
                raise BitsweepError(f"{path}: no bitsweep header; {damaged}")
            try:
                found = json.loads(text).get("format")
            except (ValueError, AttributeError, RecursionError):
                raise BitsweepError(f"{path}: the bitsweep header is not a JSON object; {damaged}") from None
            if found != FORMAT:
                raise BitsweepError(f"{path}: written by format {found!r}, this bitsweep reads {FORMAT}; "
                                    "upgrade bitsweep, or rewrite the file with this version's save_packed")
            try:
                header = _Header.model_validate_json(text)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error["loc"])
                raise BitsweepError(f"{path}: bad header field {where!r}: {error['msg']}; {damaged}") from None
            if set(handle.keys()) != header.sha256.keys():
                key = sorted(set(handle.keys()) ^ header.sha256.keys())[0]
                raise BitsweepError(f"{path}: tensor {key!r} is in the file or its checksums, not both; {damaged}")
            for name, info in header.layers.items():
                problem = _layer_problem(handle, name, info)
                if problem:
                    raise BitsweepError(f"{path}: layer {name!r}: {problem}")
            tensors = {}
            for key, digest in header.sha256.items():
                tensors[key] = handle.get_tensor(key)
                if _sha256(tensors[key]) != digest:
                    raise BitsweepError(f"{path}: tensor {key!r} fails its sha256 check; {damaged}")
    except (SafetensorError, ValueError, TypeError) as exc:  # also a dtype torch cannot hold
        raise BitsweepError(f"{path}: not a readable safetensors file ({first_line(exc)}); {damaged}") from None
    except OSError as exc:
        raise BitsweepError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return tensors, header


def _layer_problem(handle, name: str, info: _Layer) -> str | None:
    """What is wrong with one quantized layer's header entry or tensors, before reading any data."""
    fix = "write the file again with bitsweep.save_packed"
    try:
        spec = QuantSpec(info.scheme, info.bits, info.granularity, info.group_size)
    except BitsweepError as exc:
        return f"{exc}; {fix}"
    dtype = getattr(torch, info.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return f"dtype {info.dtype!r} is not a torch floating-point type; {fix}"
    entries = get_registry().entries("scheme")
    if info.scheme not in entries:
        return f"scheme {info.scheme!r} is not registered; install the plugin that provides it"
    code_range = tuple(entries[info.scheme].obj.code_range(info.bits))
    if (info.qmin, info.qmax) != code_range or info.qmax - info.qmin >= 2**info.bits:
        return (f"codes {info.qmin}..{info.qmax} are not scheme {info.scheme!r}'s range at {info.bits} bits "
                f"({code_range[0]}..{code_range[1]}); {fix}")
    # The packed tensor's real length bounds the shape: nothing larger than the file is ever described.
    problem = _tensor_problem(handle, name + _SUFFIXES[0], "U8", (-(-info.bits * math.prod(info.shape) // 8),))
    if problem:
        return f"{problem}; {fix}"
    try:
        scales_shape = scale_shape(torch.empty(info.shape, device="meta"), spec)
    except (RuntimeError, TypeError, ValueError):  # dimensions whose strides overflow int64
        return f"shape {info.shape} is not a valid tensor shape; {fix}"
    for suffix, dtype_name in zip(_SUFFIXES[1:], ("F32", "I32")):
        problem = _tensor_problem(handle, name + suffix, dtype_name, scales_shape)
        if problem:
            return f"{problem}; {fix}"
    return None


def _tensor_problem(handle, key: str, dtype_name: str, shape: tuple[int, ...]) -> str | None:
    if key not in handle.keys():
        return f"tensor {key!r} is missing"
    tensor = handle.get_slice(key)
    actual = (tensor.get_dtype(), tuple(tensor.get_shape()))
    if actual != (dtype_name, tuple(shape)):
        return f"tensor {key!r} is {actual[0]} {actual[1]}, the header needs {dtype_name} {tuple(shape)}"
    return None


def code_entropy_bytes(quantized: nn.Module) -> float:
    """Order-0 entropy of each layer's codes, summed, in bytes: the floor for any code compressor."""
    return math.fsum(map(_entropy_bits, quantized.quantized_layers.values())) / 8  # fsum: any layer order


def _entropy_bits(t: QuantizedTensor | PackedTensor) -> float:
    stored = (unpack_bits(t.data, t.bits, math.prod(t.shape)) if isinstance(t, PackedTensor)
              else t.codes.to(torch.int32).flatten() - t.qmin)
    counts = torch.bincount(stored.to(torch.int64)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum()) * stored.numel()
