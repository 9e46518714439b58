"""Recipes: each one helps where it must, folding and equalization keep the fp32 function, and the
result still packs into the scheme's own codes."""

import copy

import pytest
import timm
import torch
from conftest import SCHEMES, make_distribution, randomize_norms
from torch import nn

import bitsweep
from bitsweep import BitsweepError
from bitsweep.equalize import equalize, fold_batchnorm
from bitsweep.quantize import quantizable_layers
from bitsweep.recipes import clip_search, correct_bias
from bitsweep import tune
from bitsweep.registry import build_registry


RESNET_KWARGS = {"num_classes": 10, "channels": [16, 32, 64, 128]}  # resnet18's blocks, a quarter of its widths


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, **RESNET_KWARGS)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}  # small synthetic inputs: fast
    return randomize_norms(model)


def test_builtin_recipes_are_registered_through_the_hook():
    recipes = bitsweep.recipes()
    assert {"mse", "bias", "bias-seq", "fold", "cle", "dfq"} <= set(recipes)
    entries = bitsweep.get_registry().entries("recipe")
    assert {e.provider.plugin for e in entries.values()} == {"builtin:recipes"}
    assert all(isinstance(r, bitsweep.Recipe) and r.description for r in recipes.values())


def test_the_listings_and_the_modules_share_their_names():
    """``bitsweep.recipes()`` lists, ``bitsweep.recipes.Pipeline`` is the module's class: one name, both uses."""
    import importlib

    module = importlib.import_module("bitsweep.recipes")
    assert bitsweep.recipes is module and bitsweep.recipes.Pipeline is module.Pipeline
    assert bitsweep.schemes is importlib.import_module("bitsweep.schemes")
    assert set(bitsweep.schemes()) == set(bitsweep.get_registry().entries("scheme"))
    assert set(bitsweep.recipes()) == set(bitsweep.get_registry().entries("recipe"))


def test_an_unknown_recipe_is_one_clear_error(resnet):
    with pytest.raises(BitsweepError, match=r"unknown recipe 'msee'; available: .*mse"):
        bitsweep.quantize_model(resnet, "symmetric", 4, recipe="msee")


def test_a_third_party_recipe_registers_like_a_builtin(tmp_path, monkeypatch):
    make_distribution(tmp_path, "bitsweep-halfstep", "halfstep", """
        import bitsweep
        from bitsweep.quantize import quantize_layers

        class Halved(bitsweep.Recipe):
            name = "halfstep"
            description = "every scale halved"

            def quantize(self, model, spec, policy):
                import copy, dataclasses
                def rounding(w, scheme, bits, granularity, group_size):
                    qt = bitsweep.quantize_tensor(w, scheme, bits, granularity, group_size)
                    return dataclasses.replace(qt, scale=qt.scale / 2)
                return quantize_layers(copy.deepcopy(model), spec, policy, rounding)

        @bitsweep.hookimpl
        def register_recipes():
            return [Halved()]
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = build_registry()
    entry = registry.entries("recipe")["halfstep"]
    assert entry.provider.distribution == "bitsweep-halfstep"
    model = nn.Sequential(nn.Linear(8, 4))
    from bitsweep.quantize import Policy
    from bitsweep.schemes import QuantSpec

    quantized = entry.obj.quantize(model, QuantSpec("symmetric", 4), Policy.parse(None))
    naive = bitsweep.quantize_tensor(model[0].weight, "symmetric", 4)
    assert torch.equal(quantized.quantized_layers["0"].scale, naive.scale / 2)


def test_no_recipe_is_plain_rounding(resnet):
    a = bitsweep.quantize_model(resnet, "asymmetric", 4)
    b = bitsweep.quantize_model(resnet, "asymmetric", 4, recipe=None)
    for name, qt in a.quantized_layers.items():
        assert torch.equal(qt.codes, b.quantized_layers[name].codes)


def _brute_force_mse(row: torch.Tensor, bits: int) -> float:
    """The best symmetric MSE over 2000 clipping ranges, with PyTorch's own fake-quantize as the rounding."""
    top = 2 ** (bits - 1) - 1
    best = float("inf")
    for factor in torch.linspace(0.05, 1.0, 2000):
        scale = float(row.abs().max() * factor / top)
        q = torch.fake_quantize_per_tensor_affine(row, scale, 0, -top, top)
        best = min(best, (q - row).square().sum().item())
    return best


@pytest.mark.parametrize("bits", [3, 4])
def test_mse_clipping_reaches_the_brute_force_optimum(bits):
    torch.manual_seed(1)
    w = torch.randn(6, 512)
    qt = clip_search(w, "symmetric", bits)
    error = (qt.dequantize() - w).square().sum(dim=1)
    naive = (bitsweep.quantize_tensor(w, "symmetric", bits).dequantize() - w).square().sum(dim=1)
    for i in range(w.shape[0]):
        optimum = _brute_force_mse(w[i], bits)
        assert error[i] <= optimum * 1.01
        assert optimum < naive[i] * 0.8  # clipping a Gaussian row pays at these widths


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity,group_size", [("channel", None), ("group", 32), ("tensor", None)])
def test_mse_clipping_never_loses_and_keeps_the_schemes_codes(scheme, granularity, group_size):
    torch.manual_seed(2)
    w = torch.distributions.Laplace(0.0, 1.0).sample((16, 64, 3, 3))  # heavy tails: clipping must help
    qt = clip_search(w, scheme, 4, granularity, group_size)
    naive = bitsweep.quantize_tensor(w, scheme, 4, granularity, group_size)
    assert qt.codes.dtype == naive.codes.dtype and qt.scale.shape == naive.scale.shape
    assert qt.codes.min() >= qt.qmin and qt.codes.max() <= qt.qmax
    # The codes are the scheme's own: re-encoding the dequantized weights with the clipped scales gives them back.
    codec = bitsweep.schemes()[scheme]
    from bitsweep.schemes import as_column, grouped_rows

    rows, _ = grouped_rows(qt.dequantize(), granularity, group_size)
    again = codec.encode(rows, as_column(qt.scale), as_column(qt.zero_point), 4)
    codes, _ = grouped_rows(qt.codes, granularity, group_size)
    assert torch.equal(again.to(qt.codes.dtype).reshape(-1), codes.reshape(-1))
    rows_w, _ = grouped_rows(w, granularity, group_size)
    err = (grouped_rows(qt.dequantize(), granularity, group_size)[0] - rows_w).square().sum(1)
    err_naive = (grouped_rows(naive.dequantize(), granularity, group_size)[0] - rows_w).square().sum(1)
    assert (err <= err_naive).all()
    # Uniform levels on long rows gain most; short groups less; log levels have little tail to clip.
    must_gain = 1.0 if scheme == "pow2" else 0.97 if granularity == "group" else 0.9
    assert err.sum() < must_gain * err_naive.sum()


def test_folding_keeps_the_function_and_the_architecture(resnet, tmp_path):
    folded = copy.deepcopy(resnet)
    bounds = fold_batchnorm(folded)
    assert len(bounds) == sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), resnet(x), rtol=1e-4, atol=1e-4)
    for m in folded.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(torch.rsqrt(m.running_var + m.eps), torch.ones_like(m.running_var))
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.running_mean.any()
    # The folded model is still timm's resnet18: the packed file rebuilds it and runs the same codes.
    quantized = bitsweep.quantize_model(resnet, "symmetric", 4, recipe="fold")
    path = bitsweep.save_packed(quantized, tmp_path / "fold.safetensors", arch="resnet18",
                                arch_kwargs=RESNET_KWARGS)
    with torch.no_grad():
        torch.testing.assert_close(bitsweep.load_packed(path)(x), quantized(x), rtol=1e-4, atol=1e-4)


def test_folding_keeps_efficientnet_lite0_with_real_weights(lite0_state_dict):
    from bitsweep.plugins.efficientnet_lite import convert_state_dict

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(convert_state_dict(lite0_state_dict, model))
    model.eval()
    folded = copy.deepcopy(model)
    assert len(fold_batchnorm(folded)) == 49
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-3, atol=1e-3)


class _Pair(nn.Module):
    """conv1 -> BN -> ReLU (or ReLU6) -> conv2, the chain equalization rescales."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = act()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


def _badly_scaled_pair(act=nn.ReLU):
    torch.manual_seed(3)
    pair = randomize_norms(_Pair(act), seed=3)
    _rescale_channel(pair, 0, 100.0)
    return pair


def _rescale_channel(pair, channel, factor):
    """Channel ``channel`` of the norm's output ``factor`` times larger, conv2's input as much smaller: same function."""
    with torch.no_grad():
        pair.bn.weight[channel] *= factor
        pair.bn.bias[channel] *= factor
        pair.conv2.weight[:, channel] /= factor


def _output_error(model, granularity, x):
    quantized = bitsweep.quantize_model(model, "symmetric", 4, granularity)
    with torch.no_grad():
        return (quantized(x) - model(x)).square().mean().item()


def test_equalization_balances_a_badly_scaled_relu_pair_per_tensor():
    pair = _badly_scaled_pair()
    _rescale_channel(pair, 1, 50.0)
    folded = copy.deepcopy(pair)
    bounds = fold_batchnorm(folded)
    r1 = folded.conv1.weight.abs().flatten(1).amax(1)
    r2 = folded.conv2.weight.abs().transpose(0, 1).flatten(1).amax(1)
    equalized = copy.deepcopy(folded)
    assert equalize(equalized, "tensor", bounds, {"conv1", "conv2"}) == 1
    # DFQ's fixed point, computed independently: both layers' channel i get range sqrt(r1_i * r2_i).
    expected = torch.sqrt(r1 * r2)
    torch.testing.assert_close(equalized.conv1.weight.abs().flatten(1).amax(1), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(equalized.conv2.weight.abs().transpose(0, 1).flatten(1).amax(1), expected,
                               rtol=1e-5, atol=0)
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(equalized(x), pair(x), rtol=1e-4, atol=1e-4)
    # Per-tensor 4-bit: the imbalance costs the small channels all their levels; equalized, they get them back.
    assert _output_error(equalized, "tensor", x) < _output_error(folded, "tensor", x) / 10


def test_equalization_per_channel_evens_the_consumers_input_ranges():
    pair = _badly_scaled_pair()
    folded = copy.deepcopy(pair)
    bounds = fold_batchnorm(folded)
    equalized = copy.deepcopy(folded)
    equalize(equalized, "channel", bounds, {"conv1", "conv2"})
    r2 = equalized.conv2.weight.abs().transpose(0, 1).flatten(1).amax(1)
    torch.testing.assert_close(r2, torch.full_like(r2, r2[0].item()), rtol=1e-5, atol=0)
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(equalized(x), pair(x), rtol=1e-4, atol=1e-4)
    assert _output_error(equalized, "channel", x) < _output_error(folded, "channel", x) / 10


def test_equalization_leaves_a_clipping_relu6_alone():
    pair = _badly_scaled_pair(nn.ReLU6)
    with torch.no_grad():
        pair.bn.bias.fill_(3.0)  # mean 3, std ~1: ReLU6 clips, so no rescaling may be proven safe
    folded = copy.deepcopy(pair)
    bounds = fold_batchnorm(folded)
    equalized = copy.deepcopy(folded)
    equalize(equalized, "channel", bounds, {"conv1", "conv2"})
    assert torch.equal(equalized.conv2.weight, folded.conv2.weight)


def test_bias_correction_removes_the_expected_output_shift():
    """conv (no bias) -> BN: the shift goes into the norm's running mean; Linear: into its bias."""
    torch.manual_seed(4)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                           nn.Flatten(), nn.LazyLinear(4)), seed=4)
    x = torch.randn(16, 3, 6, 6) + 2.0  # inputs with a large mean: the shift (W_q - W) E[x] is big
    model(x)
    model.eval()
    quantized = bitsweep.quantize_model(model, "symmetric", 3)
    corrected = copy.deepcopy(quantized)
    shifts = correct_bias(model, corrected, x)
    assert set(shifts) == {"0", "4"}
    with torch.no_grad():
        dw = quantized[0].weight - model[0].weight
        expected = nn.functional.conv2d(x, dw).mean(dim=(0, 2, 3))  # independently: the mean output change
        torch.testing.assert_close(corrected[1].running_mean - model[1].running_mean, expected, rtol=1e-4, atol=1e-5)
        # After the correction the conv+BN output is unbiased on these inputs.
        torch.testing.assert_close(corrected[1](corrected[0](x)).mean(dim=(0, 2, 3)),
                                   model[1](model[0](x)).mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)


def test_sequential_bias_correction_matches_every_layers_output_mean():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(64, 16) + 1.0
    corrected = bitsweep.quantize_model(model, "symmetric", 3)
    correct_bias(model, corrected, x, sequential=True)
    with torch.no_grad():
        torch.testing.assert_close(corrected(x).mean(0), model(x).mean(0), rtol=1e-4, atol=1e-4)
        naive = bitsweep.quantize_model(model, "symmetric", 3)(x).mean(0)
        assert not torch.allclose(naive, model(x).mean(0), atol=1e-3)


@pytest.mark.parametrize("recipe", ["mse", "bias", "bias-seq", "cle", "dfq", "gptq", "gptq-bias", "gptq-bias-tune"])
def test_every_recipe_packs_and_runs_from_the_packed_file(resnet, recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "STEPS", 3)  # what the tuned parameters are is tested above; here that they pack
    quantized = bitsweep.quantize_model(resnet, "asymmetric", 4, policy={"keep_first": 1}, recipe=recipe)
    layers = [name for name, _ in quantizable_layers(resnet)]
    assert list(quantized.quantized_layers) == layers[1:]
    path = bitsweep.save_packed(quantized, tmp_path / "m.safetensors", arch="resnet18",
                                arch_kwargs=RESNET_KWARGS)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bitsweep.load_packed(path)(x), quantized(x), rtol=1e-4, atol=1e-4)
    for name, qt in quantized.quantized_layers.items():
        assert torch.equal(quantized.get_submodule(name).weight, qt.dequantize())


def _small_cnn(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return randomize_norms(model, seed=seed)


def _kl(reference, quantized, x):
    with torch.no_grad():
        return nn.functional.kl_div(quantized(x).log_softmax(-1), reference(x).log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()


def test_channel_tuning_brings_the_outputs_back_and_moves_only_channel_parameters():
    model = _small_cnn(6)
    train, held_out = torch.randn(64, 3, 8, 8), torch.randn(64, 3, 8, 8)
    quantized = bitsweep.quantize_model(model, "symmetric", 3)
    tuned = copy.deepcopy(quantized)
    tune.tune_channels(model, tuned, train)
    assert _kl(model, tuned, held_out) < 0.5 * _kl(model, quantized, held_out)  # inputs it never saw
    before, after = dict(quantized.named_parameters()), dict(tuned.named_parameters())
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == {"1.weight", "1.bias", "4.weight", "4.bias", "8.bias"}
    for name, qt in tuned.quantized_layers.items():  # the codes and their scales are the scheme's, untouched
        assert torch.equal(tuned.get_submodule(name).weight, qt.dequantize())
    again = copy.deepcopy(quantized)
    tune.tune_channels(model, again, train)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), tuned.parameters()))  # seeded


def test_tuning_recipes_leave_models_without_batchnorm_as_their_base_recipe():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    tuned = bitsweep.quantize_model(model, "pow2", 5, recipe="bias-tune")
    base = bitsweep.quantize_model(model, "pow2", 5, recipe="bias")
    assert all(torch.equal(p, q) for p, q in zip(tuned.parameters(), base.parameters()))
