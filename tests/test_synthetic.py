"""Synthetic data: images that match a model's BatchNorm statistics, made once per model and settings and
kept in the cache folder, where any process finds them."""

import copy

import pytest
import torch

import bitsweep
from bitsweep import synthetic
from bitsweep.cells import plan_cells
from bitsweep.config import Calibration, Synthetic, parse_config
from bitsweep.errors import BitsweepError
from bitsweep.synthetic import SyntheticSettings, synthesize, synthetic_inputs
from conftest import conv_bn_net


def batchnorm_mismatch(model, x):
    """Sum over the BatchNorms of the squared gap between the batch's and the running mean and spread."""
    gaps = []

    def measure(norm, args):
        h = args[0]
        gaps.append((h.mean((0, 2, 3)) - norm.running_mean).square().mean()
                    + (h.var((0, 2, 3), unbiased=False).sqrt() - norm.running_var.sqrt()).square().mean())

    hooks = [m.register_forward_pre_hook(measure) for m in synthetic.batchnorms(model)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return sum(gaps).item()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "_INPUTS", synthetic.PerModelCache())  # nothing from other tests in memory
    return tmp_path / "synthetic"


def forget_memory(monkeypatch):
    """What a fresh process sees: only the disk."""
    monkeypatch.setattr(synthetic, "_INPUTS", synthetic.PerModelCache())


def test_synthesized_images_match_the_batchnorm_statistics():
    model = conv_bn_net()
    made = synthesize(model, (3, 32, 32), images=16, steps=60)
    noise = torch.randn(made.shape, generator=torch.Generator().manual_seed(0))
    assert made.shape == (16, 3, 32, 32)
    assert batchnorm_mismatch(model, made) < 0.1 * batchnorm_mismatch(model, noise)


def test_synthesis_is_seeded():
    model = conv_bn_net()
    assert torch.equal(synthesize(model, (3, 32, 32), 8, 10), synthesize(copy.deepcopy(model), (3, 32, 32), 8, 10))


def test_a_set_is_the_same_whatever_thread_count_the_caller_runs_with():
    """On more threads a conv splits its sums differently: this model's set, made at the caller's thread count,
    differs in the last bits between 1 and 2 threads. Made on ``THREADS`` threads, it is byte-identical, and the
    caller's count is left as it was."""
    import timm
    from conftest import randomize_norms

    model = randomize_norms(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10), seed=0).eval()
    before = torch.get_num_threads()
    made = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            made.append(synthesize(model, (3, 64, 64), 4, 10))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*made)


def test_a_set_is_made_once_and_found_on_disk(cache, monkeypatch):
    model = conv_bn_net()
    settings = SyntheticSettings(images=6, steps=8)
    made = synthetic_inputs(model, settings)
    assert made.shape[0] == 6 and len(list(cache.glob("*.safetensors"))) == 1
    forget_memory(monkeypatch)
    monkeypatch.setattr(synthetic, "synthesize", lambda *a, **k: pytest.fail("made again instead of read"))
    assert torch.equal(synthetic_inputs(copy.deepcopy(model), settings), made)


def test_progress_follows_every_step_of_every_batch(monkeypatch):
    monkeypatch.setattr(synthetic, "BATCH_PIXELS", 2 * 32 * 32)  # 2 images of 32 x 32 per batch: 3 batches for 5
    seen = []
    with synthetic.watching(lambda done, total: seen.append((done, total))):
        made = synthesize(conv_bn_net(), (3, 32, 32), images=5, steps=4)
    synthesize(conv_bn_net(), (3, 32, 32), images=1, steps=2)  # no longer watched
    assert made.shape[0] == 5 and seen == [(done, 12) for done in range(1, 13)]


def test_settings_and_weights_decide_the_set(cache):
    model = conv_bn_net()
    first = synthetic_inputs(model, SyntheticSettings(images=4, steps=4))
    assert synthetic_inputs(model, SyntheticSettings(images=5, steps=4)).shape[0] == 5
    assert not torch.equal(synthetic_inputs(model, SyntheticSettings(images=4, steps=6)), first)
    assert not torch.equal(synthetic_inputs(conv_bn_net(seed=1), SyntheticSettings(images=4, steps=4)), first)
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_a_damaged_set_is_made_again(cache, monkeypatch):
    model = conv_bn_net()
    settings = SyntheticSettings(images=4, steps=4)
    made = synthetic_inputs(model, settings)
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    forget_memory(monkeypatch)
    assert torch.equal(synthetic_inputs(model, settings), made)
    assert torch.equal(synthetic.load_file(path)["inputs"], made)


def test_quantize_model_takes_the_settings(cache):
    model = conv_bn_net()
    bitsweep.quantize_model(model, "asymmetric", 4, recipe="bias", synthetic={"images": 3, "steps": 2})
    (path,) = cache.glob("*.safetensors")
    assert synthetic.load_file(path)["inputs"].shape[0] == 3


@pytest.mark.parametrize("settings, message", [
    ({"images": 0}, "synthetic images must be a positive whole number, not 0"),
    ({"steps": -1}, "synthetic steps must be a whole number >= 0, not -1"),
    ({"imgs": 8}, "synthetic settings take images and steps, not imgs"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(BitsweepError, match=message) as refused:
        bitsweep.quantize_model(conv_bn_net(), "asymmetric", 4, recipe="bias", synthetic=settings)
    assert "\n" not in str(refused.value)


def sweep_with(**changes):
    config = {"sweeps": [{"name": "s", "models": ["resnet18"], "dataset": {"name": "synthetic"},
                          "schemes": ["pow2"], "bits": [4], "recipes": ["none", "bias"], **changes}]}
    return parse_config(config).sweeps[0]


@pytest.mark.parametrize("changes, field, value", [
    ({}, "synthetic", Synthetic()),
    ({"synthetic": {"images": 32, "steps": 100}}, "synthetic", Synthetic(images=32, steps=100)),
    ({"calibration": {"dataset": "synthetic", "images": 16}}, "calibration",
     Calibration(dataset={"name": "synthetic"}, images=16)),
])
def test_cells_name_the_data_they_read_only_when_they_read_some(changes, field, value):
    cells = plan_cells(sweep_with(kernels=["weight-only", "int8"], **changes), "m")
    reads = [cell.recipe != "none" or cell.kernel == "int8" for cell in cells]
    assert reads == [False, True, True, True] and [cell.uses_data for cell in cells] == reads
    assert [getattr(cell, field) for cell in cells] == [value if r else None for r in reads]
    assert all(getattr(cell, other) is None for cell in cells for other in {"synthetic", "calibration"} - {field})
    plain, plain_int8 = (cell for cell in cells if cell.recipe == "none")
    assert plain_int8.packing == plain  # one packed file for both kernel paths of plain rounding
