"""Schemes against independent references: PyTorch's fake-quantize ops and brute-force nearest levels."""

import math

import pytest
import torch
from conftest import BITS
from hypothesis import given, settings
from hypothesis import strategies as st

import bitsweep
from bitsweep import BitsweepError

AFFINE = ["asymmetric", "symmetric"]


def reference_fake_quant(w, qt):
    if qt.granularity == "tensor":
        return torch.fake_quantize_per_tensor_affine(w, qt.scale, qt.zero_point, qt.qmin, qt.qmax)
    return torch.fake_quantize_per_channel_affine(w, qt.scale, qt.zero_point, 0, qt.qmin, qt.qmax)


def random_conv_weights(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 16, 3, 3, generator=g) * torch.rand(48, 1, 1, 1, generator=g) * 3
    w += (torch.rand(48, 1, 1, 1, generator=g) - 0.3)  # channels offset from zero, as after BN folding
    w[7] = 0.0  # an all-zero channel
    return w


@pytest.mark.parametrize("scheme", AFFINE)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_affine_matches_torch_fake_quantize_bit_for_bit(scheme, bits, granularity, lite0_state_dict):
    tensors = [random_conv_weights(seed) for seed in range(3)]
    tensors += [lite0_state_dict[k] for k in ("_conv_stem.weight", "_blocks.1._depthwise_conv.weight",
                                              "_blocks.5._project_conv.weight", "_fc.weight")]
    for w in tensors:
        qt = bitsweep.quantize_tensor(w, scheme=scheme, bits=bits, granularity=granularity)
        assert torch.equal(qt.dequantize(), reference_fake_quant(w, qt))
        assert qt.codes.shape == w.shape and not qt.codes.is_floating_point()
        assert qt.qmin <= int(qt.codes.min()) and int(qt.codes.max()) <= qt.qmax
        assert qt.qmax - qt.qmin <= 2**bits - 1
        assert (qt.bits, qt.scheme) == (bits, scheme)


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(AFFINE), bits=st.integers(2, 8), granularity=st.sampled_from(["tensor", "channel"]),
    channels=st.integers(1, 6), width=st.integers(1, 40), spread=st.floats(1e-6, 1e4), shift=st.floats(-3, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_affine_property_exact_on_random_tensors(scheme, bits, granularity, channels, width, spread, shift, seed):
    w = torch.randn(channels, width, generator=torch.Generator().manual_seed(seed)) * spread + shift * spread
    qt = bitsweep.quantize_tensor(w, scheme, bits, granularity)
    assert torch.equal(qt.dequantize(), reference_fake_quant(w, qt))


def test_affine_zero_is_exact_and_extremes_are_levels():
    w = torch.tensor([[-1.5, 0.0, 0.3, 2.0]])
    for scheme in AFFINE:
        deq = bitsweep.quantize_tensor(w, scheme, 8, "tensor").dequantize()
        assert deq[0, 1] == 0.0
    sym = bitsweep.quantize_tensor(w, "symmetric", 4, "tensor")
    assert (sym.qmin, sym.qmax) == (-7, 7) and sym.dequantize()[0, 3] == pytest.approx(2.0, rel=1e-6)


def brute_force_pow2(w, scale, bits):
    """Nearest level by exhaustive search in float64; ties to the larger magnitude."""
    top = 2 ** (bits - 1) - 1
    levels = torch.cat([torch.zeros(1, dtype=torch.float64), 2.0 ** torch.arange(1 - top, 1, dtype=torch.float64)])
    magnitude = (w.double().abs() / scale)[..., None]
    distance = (magnitude - levels).abs()
    # argmin returns the first minimum; flip so a tie picks the larger level.
    nearest = levels.numel() - 1 - distance.flip(-1).argmin(-1)
    return levels[nearest] * torch.sign(w.double()) * scale


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_pow2_levels_and_rounding_rule(bits, granularity, lite0_state_dict):
    group_size = 8 if granularity == "group" else None  # divides both tensors' rows: no padding here
    for w in (random_conv_weights(bits), lite0_state_dict["_blocks.3._expand_conv.weight"]):
        qt = bitsweep.quantize_tensor(w, "pow2", bits, granularity, group_size)
        deq = qt.dequantize()
        rows = deq.reshape(-1, group_size) if group_size else deq.reshape(qt.scale.numel(), -1)
        scales = qt.scale.reshape(-1, 1).double()
        ratio = (rows.double() / scales)[rows != 0].abs()
        assert torch.equal(torch.log2(ratio), torch.log2(ratio).round()), "every non-zero level is ±scale·2^k"
        for row in rows:
            assert row.unique().numel() <= 2**bits
        w_rows = w.reshape(rows.shape)
        assert torch.equal(rows.double(), brute_force_pow2(w_rows, scales, bits))
        assert torch.equal(deq[w == 0], torch.zeros_like(deq[w == 0])), "zero is representable"


def test_pow2_ties_go_to_the_larger_magnitude():
    # Levels at 3 bits with scale 1: 0, 1/4, 1/2, 1. Midpoints 1/8, 3/8, 3/4.
    w = torch.tensor([[1.0, 0.75, -0.375, 0.125, 0.12499]])
    assert bitsweep.quantize_tensor(w, "pow2", 3, "tensor").dequantize().tolist() == [[1.0, 1.0, -0.5, 0.25, 0.0]]


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
@pytest.mark.parametrize("group_size", [4, 7, 32])
def test_group_granularity_equals_quantizing_each_group_alone(scheme, group_size):
    w = torch.randn(6, 50)
    qt = bitsweep.quantize_tensor(w, scheme, 4, "group", group_size)
    groups = math.ceil(50 / group_size)
    assert qt.scale.shape == (6, groups) and qt.codes.shape == w.shape
    deq = qt.dequantize()
    for c in range(6):
        for g in range(groups):
            part = w[c : c + 1, g * group_size : (g + 1) * group_size]
            alone = bitsweep.quantize_tensor(part, scheme, 4, "tensor").dequantize()
            assert torch.equal(deq[c : c + 1, g * group_size : (g + 1) * group_size], alone)


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_edge_cases(scheme, granularity):
    group_size = 3 if granularity == "group" else None
    q = lambda w: bitsweep.quantize_tensor(w, scheme, 4, granularity, group_size)  # noqa: E731
    zeros = torch.zeros(4, 5)
    assert torch.equal(q(zeros).dequantize(), zeros)
    constant = torch.full((4, 5), -0.37)
    assert torch.allclose(q(constant).dequantize(), constant, rtol=1e-6)
    empty = q(torch.empty(0, 5))
    assert empty.codes.shape == (0, 5) and empty.dequantize().shape == (0, 5)
    for dtype in (torch.float16, torch.bfloat16):
        w = torch.randn(8, 9).to(dtype)
        qt = q(w)
        assert qt.dequantize().dtype == dtype
        assert torch.equal(qt.dequantize(), q(w.float()).dequantize().to(dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(3, 4)
    w[1, 2] = bad
    with pytest.raises(BitsweepError, match="1 NaN/Inf"):
        bitsweep.quantize_tensor(w, "symmetric", 4)


def test_bad_arguments_name_the_problem():
    w = torch.randn(3, 4)
    with pytest.raises(BitsweepError, match=r"unknown scheme 'nope'; available: asymmetric, .*pow2, symmetric"):
        bitsweep.quantize_tensor(w, "nope", 4)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(BitsweepError, match="bits"):
            bitsweep.quantize_tensor(w, "symmetric", bits)
    with pytest.raises(BitsweepError, match="unknown granularity 'row'; use one of: tensor, channel, group"):
        bitsweep.quantize_tensor(w, "symmetric", 4, "row")
    with pytest.raises(BitsweepError, match="group_size"):
        bitsweep.quantize_tensor(w, "symmetric", 4, "group")
    with pytest.raises(BitsweepError, match="group_size"):
        bitsweep.quantize_tensor(w, "symmetric", 4, "channel", 8)
    with pytest.raises(BitsweepError, match="floating-point"):
        bitsweep.quantize_tensor(torch.ones(3, dtype=torch.int64), "symmetric", 4)


def test_schemes_lists_the_builtins():
    builtins = bitsweep.schemes()
    assert {"asymmetric", "symmetric", "pow2"} <= set(builtins)
    assert all(isinstance(s, bitsweep.Scheme) and s.name == name for name, s in builtins.items())
