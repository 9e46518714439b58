"""The packed file format: the bit layout against a big-integer reference, round trips, exact sizes,
and one clear error for every kind of damaged or foreign file."""

import json
import math
import struct

import pytest
import timm
import torch
from conftest import BITS, SCHEMES
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bitsweep
from bitsweep import BitsweepError, PackedTensor, load_packed, save_packed
from bitsweep.pack import FORMAT, code_entropy_bytes, pack_bits, unpack_bits


def reference_pack(values, bits):
    """The layout by definition: value i at bits [i*bits, (i+1)*bits) of one little-endian integer."""
    stream = sum(v << (i * bits) for i, v in enumerate(values))
    return list(stream.to_bytes(math.ceil(bits * len(values) / 8), "little"))


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_pack_then_unpack_is_identity_with_the_exact_layout(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=70))
    v = torch.tensor(values, dtype=torch.uint8)
    packed = pack_bits(v, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.tolist() == reference_pack(values, bits)
    assert torch.equal(unpack_bits(packed, bits, len(values)), v)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 10_007])
def test_pack_size_is_exact_for_any_shape(bits, count):
    v = torch.randint(0, 2**bits, (count, 1, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(count))
    packed = pack_bits(v, bits)
    assert packed.numel() == math.ceil(bits * count / 8)
    assert torch.equal(unpack_bits(packed, bits, count), v.flatten())


def test_bit_layout_by_hand():
    # 3-bit 1,2,3,4,5 = stream bits 100 010 110 001 101 (LSB first) -> 0b11010001, 0b01011000
    assert pack_bits(torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8), 3).tolist() == [209, 88]
    assert pack_bits(torch.tensor([1, 2, 3, 0, 2], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b10]
    assert pack_bits(torch.tensor([31, 1], dtype=torch.uint8), 5).tolist() == [0b00111111, 0]


def test_pack_refuses_values_wider_than_bits_and_unpack_a_wrong_length():
    with pytest.raises(BitsweepError, match="does not fit in 3 bits"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(BitsweepError, match="need 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 32)])
@pytest.mark.parametrize("bits", BITS)
def test_packed_tensor_round_trip_is_bit_identical(scheme, granularity, group_size, bits):
    w = torch.randn(12, 5, 3, 3, generator=torch.Generator().manual_seed(bits))  # 45 weights a channel: 32 ∤ 45
    qt = bitsweep.quantize_tensor(w, scheme, bits, granularity, group_size)
    pt = PackedTensor.from_quantized(qt)
    assert pt.data.numel() == math.ceil(bits * w.numel() / 8)
    assert pt.nbytes == pt.data.numel() + 8 * qt.scale.numel()
    assert torch.equal(pt.codes(), qt.codes.to(torch.int32))
    back = pt.to_quantized()
    assert back.codes.dtype == qt.codes.dtype and torch.equal(back.codes, qt.codes)
    assert torch.equal(pt.dequantize(), qt.dequantize())


def test_packed_tensor_keeps_dtype_and_entropy_matches_unpacked():
    qt = bitsweep.quantize_tensor(torch.randn(8, 40).half(), "asymmetric", 5, "group", 16)
    pt = PackedTensor.from_quantized(qt)
    assert pt.dequantize().dtype == torch.float16 and torch.equal(pt.dequantize(), qt.dequantize())
    holder = torch.nn.Module()
    holder.quantized_layers = {"a": qt}
    entropy = code_entropy_bytes(holder)
    holder.quantized_layers = {"a": pt}
    assert code_entropy_bytes(holder) == entropy > 0


def test_unknown_scheme_names_it_and_the_fix():
    pt = PackedTensor.from_quantized(bitsweep.quantize_tensor(torch.randn(4, 4), "symmetric", 4))
    pt.scheme = "ternary-plus"
    with pytest.raises(BitsweepError, match="'ternary-plus'.*install the plugin that provides it"):
        pt.to_quantized()


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    return bitsweep.quantize_model(timm.create_model("resnet18", pretrained=False), "symmetric", 4).eval()


@pytest.fixture(scope="module")
def packed_file(quantized, tmp_path_factory):
    return save_packed(quantized, tmp_path_factory.mktemp("packed") / "resnet18.safetensors")


def test_file_size_is_tensors_plus_header(quantized, packed_file):
    raw = packed_file.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    with safe_open(packed_file, "pt") as handle:
        data = sum(math.prod(handle.get_slice(k).get_shape()) * {"U8": 1, "I32": 4, "F32": 4, "I64": 8}[
            handle.get_slice(k).get_dtype()] for k in handle.keys())
    assert len(raw) == 8 + header_len + data

    layers = quantized.quantized_layers
    expected = sum(math.ceil(qt.bits * qt.codes.numel() / 8) + 8 * qt.scale.numel() for qt in layers.values())
    expected += sum(t.numel() * t.element_size() for k, t in quantized.state_dict().items()
                    if k.removesuffix(".weight") not in layers)
    assert abs(len(raw) - expected) / expected < 0.01


def test_equal_models_give_byte_identical_files(quantized, packed_file, tmp_path):
    assert save_packed(quantized, tmp_path / "again.safetensors").read_bytes() == packed_file.read_bytes()


def test_load_gives_the_same_codes_and_outputs(quantized, packed_file, tmp_path):
    from bitsweep.compile import compile_packed

    loaded = load_packed(packed_file)
    assert list(loaded.quantized_layers) == list(quantized.quantized_layers)
    for name, qt in quantized.quantized_layers.items():
        assert torch.equal(loaded.quantized_layers[name].codes(), qt.codes.to(torch.int32))
    compiled = compile_packed(quantized)
    compiled_path = save_packed(compiled, tmp_path / "compiled.safetensors")
    assert compiled_path.read_bytes() == packed_file.read_bytes()  # packed modules save as their codes
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = loaded(x)
        assert torch.equal(out, compiled(x))
        assert torch.equal(out, load_packed(save_packed(loaded, tmp_path / "again.safetensors"))(x))
        torch.testing.assert_close(out, quantized(x))  # packed kernels round differently from fake quantization


def test_save_needs_an_architecture_that_rebuilds_the_model(quantized, tmp_path):
    with pytest.raises(BitsweepError, match="resnet34.*pass arch= / arch_kwargs="):
        save_packed(quantized, tmp_path / "m.safetensors", arch="resnet34")
    with pytest.raises(BitsweepError, match="pass arch="):
        save_packed(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def rewrite(src, dst, edit):
    """A copy of a packed file with its JSON header changed by ``edit`` (tensors and checksums kept)."""
    with safe_open(src, "pt") as handle:
        header = json.loads(handle.metadata()["bitsweep"])
    edit(header)
    save_file(load_file(src), dst, metadata={"bitsweep": json.dumps(header, sort_keys=True)})
    return dst


def set_layer(field, value, layer="layer1.0.conv1"):
    return lambda h: h["layers"][layer].update({field: value})


@pytest.mark.parametrize("edit,message", [
    (lambda h: h.update(format="bitsweep-packed/2"),
     f"written by format 'bitsweep-packed/2', this bitsweep reads {FORMAT}; upgrade bitsweep"),
    (lambda h: h["arch_kwargs"].update(num_classes=10), "architecture mismatch: layer 'fc'"),
    (lambda h: h["arch_kwargs"].update(num_classes=10**11), "architecture mismatch: layer 'fc'"),
    (lambda h: h.update(arch="resnet34"), "architecture mismatch: .*resnet34"),
    (lambda h: h.update(arch="no_such_net"), "architecture mismatch: timm cannot build 'no_such_net'"),
    (lambda h: h["arch_kwargs"].update(pretrained=True), "may not set 'pretrained'"),
    (set_layer("module", "Linear"), "'layer1.0.conv1' is a Linear in the file but a Conv2d"),
    (set_layer("shape", [10**12, 64, 3, 3]), "'layer1.0.conv1.weight.packed' is U8 .*needs U8"),
    (set_layer("shape", [64, -1, 3, 3]), "bad header field 'layers.layer1.0.conv1.shape.1'"),
    (set_layer("bits", 9), "bits=9 is outside 2..8"),
    (set_layer("bits", 3), "codes -7..7 are not scheme 'symmetric''s range at 3 bits \\(-3..3\\)"),
    (set_layer("qmin", -8), "codes -8..7 are not scheme 'symmetric'"),
    (set_layer("scheme", "ternary-plus"), "'ternary-plus'.*install the plugin that provides it"),
    (set_layer("granularity", "group"), "granularity 'group' needs a positive whole group_size"),
    (set_layer("dtype", "int8"), "dtype 'int8' is not a torch floating-point type"),
    (lambda h: h["sha256"].pop("fc.bias"), "tensor 'fc.bias' is in the file or its checksums, not both"),
])
def test_bad_header_gives_one_clear_error(packed_file, tmp_path, edit, message):
    path = rewrite(packed_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(BitsweepError, match=message) as info:
        load_packed(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def flipped(src, dst, offset, mask=0x01):
    raw = bytearray(src.read_bytes())
    raw[offset] ^= mask
    dst.write_bytes(raw)
    return dst


def test_flipped_tensor_byte_fails_its_checksum(packed_file, tmp_path):
    key = "layer2.0.conv2.weight.packed"
    (header_len,) = struct.unpack("<Q", packed_file.read_bytes()[:8])
    with open(packed_file, "rb") as f:
        start, _ = json.loads(f.read(8 + header_len)[8:])[key]["data_offsets"]
    path = flipped(packed_file, tmp_path / "bad.safetensors", 8 + header_len + start + 100)
    with pytest.raises(BitsweepError, match=f"tensor '{key}' fails its sha256 check"):
        load_packed(path)


@pytest.mark.parametrize("target,message", [
    (b'{', "not a readable safetensors file"),  # the safetensors header itself
    (b'\\"arch\\":', "the bitsweep header is not a JSON object"),  # ':' -> ';' inside the bitsweep JSON
    (b'layer1.0.conv1\\":{\\"bits\\":4', "codes -7..7 are not scheme 'symmetric''s range at 5 bits"),  # 4 -> 5
])
def test_flipped_header_byte_gives_one_clear_error(packed_file, tmp_path, target, message):
    """The last byte of ``target`` (bytes as they stand in the file) is flipped."""
    offset = packed_file.read_bytes().index(target) + len(target) - 1
    with pytest.raises(BitsweepError, match=message):
        load_packed(flipped(packed_file, tmp_path / "bad.safetensors", offset))


@pytest.mark.parametrize("keep", [0, 5, 8, 200, 0.5, -1])
def test_truncated_file_gives_one_clear_error(packed_file, tmp_path, keep):
    raw = packed_file.read_bytes()
    cut = int(len(raw) * keep) if isinstance(keep, float) else keep % len(raw)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[:cut])
    with pytest.raises(BitsweepError, match="not a readable safetensors file.*damaged"):
        load_packed(path)


def test_missing_file_and_foreign_safetensors(tmp_path):
    with pytest.raises(BitsweepError, match="no such file"):
        load_packed(tmp_path / "nope.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(BitsweepError, match="no bitsweep header"):
        load_packed(tmp_path / "plain.safetensors")
