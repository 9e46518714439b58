"""Profile statistics against numpy, scipy and matplotlib's own box-plot statistics."""

import math

import numpy as np
import pytest
import scipy.stats
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib import cbook

import bitsweep
from bitsweep.pack import read_packed, save_packed
from bitsweep.profile import WHOLE_MODEL, profile_layers, sqnr_db, weight_stats
from bitsweep.quantize import quantizable_layers


def check_against_references(w: torch.Tensor, stats: dict):
    x = w.double().numpy().ravel()
    box = cbook.boxplot_stats(x, whis=1.5)[0]
    assert stats["numel"] == x.size
    assert stats["min"] == x.min() and stats["max"] == x.max()
    assert stats["mean"] == pytest.approx(np.mean(x), rel=1e-12, abs=1e-15)
    assert stats["std"] == pytest.approx(np.std(x), rel=1e-9, abs=1e-15)
    assert [stats["q1"], stats["median"], stats["q3"]] == pytest.approx(np.percentile(x, [25, 50, 75]), rel=1e-12)
    assert stats["q1"] == pytest.approx(box["q1"]) and stats["q3"] == pytest.approx(box["q3"])
    assert stats["iqr"] == pytest.approx(scipy.stats.iqr(x), rel=1e-12, abs=1e-15)
    assert stats["whislo"] == box["whislo"] and stats["whishi"] == box["whishi"]
    assert stats["outlier_fraction"] == pytest.approx(len(box["fliers"]) / x.size)
    if np.var(x) > 0:
        assert stats["kurtosis"] == pytest.approx(scipy.stats.kurtosis(x, fisher=True, bias=True), rel=1e-9, abs=1e-12)
    assert stats["zero_fraction"] == np.count_nonzero(x == 0) / x.size
    assert stats["levels"] == len(np.unique(x))


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (1000,), (7, 5)])
def test_fp32_statistics_match_numpy_scipy_and_matplotlib(shape):
    w = torch.distributions.StudentT(3.0).sample(shape).float()  # heavy tails: outliers and kurtosis
    check_against_references(w, weight_stats(w))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=300))
def test_statistics_match_references_on_any_values(values):
    w = torch.tensor(values, dtype=torch.float32)
    check_against_references(w, weight_stats(w))


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
def test_quantized_statistics_count_codes_zeros_and_noise(scheme):
    w = torch.randn(32, 64) * torch.linspace(0.01, 1, 32)[:, None]
    qt = bitsweep.quantize_tensor(w, scheme, 3, "channel")
    q = qt.dequantize()
    stats = weight_stats(q, w, qt.codes)
    assert stats["levels"] == len(np.unique(qt.codes.numpy())) <= 2**3
    assert stats["zero_fraction"] == (q == 0).double().mean().item() > 0
    noise = ((w.double() - q.double()) ** 2).sum()
    assert stats["sqnr_db"] == pytest.approx(10 * math.log10((w.double() ** 2).sum() / noise))
    assert sqnr_db(w, w) is None


def test_model_profile_reads_the_packed_file_like_the_quantized_model(tmp_path):
    model = timm.create_model("resnet10t", num_classes=10, channels=(8, 16, 16, 16), stem_width=8).eval()
    quantized = bitsweep.quantize_model(model, "symmetric", 4, policy={"keep_first": 1})
    path = save_packed(quantized, tmp_path / "m.safetensors", "resnet10t",
                       {"num_classes": 10, "channels": [8, 16, 16, 16], "stem_width": 8})
    fp32 = {name: layer.weight.detach() for name, layer in quantizable_layers(model)}
    in_memory = profile_layers(fp32, {n: (qt.dequantize(), qt.codes, qt.bits)
                                      for n, qt in quantized.quantized_layers.items()})
    layers, _, _ = read_packed(path)
    from_file = profile_layers(fp32, {n: (p.dequantize(), p.codes(), p.bits) for n, p in layers.items()})
    assert from_file == in_memory
    by_layer = {row["layer"]: row for row in from_file}
    first = next(iter(fp32))
    assert by_layer[first]["layer_bits"] == 32 and by_layer[first]["sqnr_db"] is None  # kept in fp32
    assert all(row["layer_bits"] == 4 for name, row in by_layer.items() if name not in (first, WHOLE_MODEL))
    pooled = torch.cat([quantized.get_submodule(n).weight.detach().reshape(-1) for n in fp32])
    whole = by_layer[WHOLE_MODEL]
    assert whole["numel"] == pooled.numel() and whole["levels"] is None
    assert whole["sqnr_db"] == pytest.approx(sqnr_db(torch.cat([w.reshape(-1) for w in fp32.values()]), pooled))
    assert whole["zero_fraction"] == (pooled == 0).double().mean().item()
