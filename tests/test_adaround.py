"""AdaRound: each weight only moves between the two levels of the base grid around it, the layers' outputs get
closer to fp32's than with the base rounding, the result is reproducible and it packs."""

import copy

import pytest
import timm
import torch
from conftest import SCHEMES, randomize_norms
from torch import nn

import bitsweep
from bitsweep import adaround, synthetic
from bitsweep.adaround import learn_rounding, reconstruction_units
from bitsweep.quantize import Policy, quantizable_layers
from bitsweep.schemes import QuantSpec, as_column, grouped_rows, ungrouped

FEW = {"iterations": 150}  # enough steps for a tiny model to gain, in about a second per recipe


def _conv_bn_net(seed=6):
    """conv -> grouped conv -> timm's Conv2dSame (stride 2) -> depthwise -> Linear, each conv followed by BN."""
    from timm.layers import Conv2dSame

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          Conv2dSame(16, 32, 3, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    model.pretrained_cfg = {"input_size": (3, 16, 16)}
    return randomize_norms(model, seed)


def _recipe(name, **options):
    """The registered recipe ``name`` with AdaRound's keyword options changed (fewer steps in tests)."""
    recipe = copy.copy(bitsweep.recipes()[name])
    recipe.learned_rounding = options
    return recipe


def test_the_recipes_are_registered_with_learned_rounding():
    recipes = bitsweep.recipes()
    for name in ("adaround", "adaround-bias", "mse-adaround-bias"):
        assert recipes[name].learned_rounding == {} and recipes[name].description
    assert all(recipes[name].fold for name in ("adaround", "adaround-bias", "mse-adaround-bias"))
    assert recipes["mse-adaround-bias"].clip_p == 2.0 and recipes["adaround-bias"].bias_correction == "layer"
    with pytest.raises(bitsweep.BitsweepError, match="use one of them"):
        bitsweep.recipes.Pipeline("both", "gptq and adaround", error_feedback=True, learned_rounding=True)


def _layers():
    from timm.layers import Conv2dSame

    return [(nn.Conv2d(8, 16, 3, padding=1), (6, 8, 7, 7)),
            (nn.Conv2d(16, 16, 3, groups=16, bias=False), (6, 16, 7, 7)),
            (Conv2dSame(8, 12, 3, stride=2), (6, 8, 12, 12)), (nn.Linear(24, 10), (12, 5, 24))]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity,group_size", [("channel", None), ("group", 16), ("tensor", None)])
@pytest.mark.parametrize("index", range(4), ids=["conv", "depthwise", "conv2dsame", "linear"])
def test_codes_only_choose_between_the_two_levels_around_each_weight(scheme, granularity, group_size, index):
    torch.manual_seed(index)
    layer, shape = _layers()[index]
    start = bitsweep.quantize_tensor(layer.weight, scheme, 3, granularity, group_size)
    x = torch.randn(shape)
    with torch.no_grad():
        target = layer(x)
    (qt,) = learn_rounding(layer, x + 0.3 * torch.randn(shape), target, {"": start}, iterations=40).values()
    assert torch.equal(qt.scale, start.scale) and torch.equal(qt.zero_point, start.zero_point)
    assert qt.codes.dtype == start.codes.dtype and qt.codes.min() >= qt.qmin and qt.codes.max() <= qt.qmax
    assert not torch.equal(qt.codes, start.codes)  # the inputs differ from the targets': something to make up for
    w = layer.weight.detach()
    rows, pad = grouped_rows(w, granularity, group_size)
    scale, zero = as_column(start.scale), as_column(start.zero_point)
    if scheme == "pow2":  # the nearest level in value below w and above it, from every level of the row
        codes = torch.arange(qt.qmin, qt.qmax + 1, dtype=torch.int32)
        levels = start.codec.decode(codes.expand(len(rows), -1).clone(), scale, zero, 3)
        below = torch.where(levels[:, None, :] <= rows[:, :, None], levels[:, None, :], -torch.inf).amax(-1)
        above = torch.where(levels[:, None, :] >= rows[:, :, None], levels[:, None, :], torch.inf).amin(-1)
        got, _ = grouped_rows(qt.dequantize(), granularity, group_size)
        assert ((got == below) | (got == above)).all()
    else:  # floor or ceil of w / s on the grid, clamped to the codes
        floor = (torch.floor(rows / scale) + zero).clamp(qt.qmin, qt.qmax)
        ceil = (torch.ceil(rows / scale) + zero).clamp(qt.qmin, qt.qmax)
        floor, ceil = (ungrouped(t, w.shape, pad) for t in (floor, ceil))
        assert ((qt.codes == floor) | (qt.codes == ceil)).all()


def test_a_layer_with_fewer_inputs_than_weights_in_a_row_keeps_its_nearest_levels():
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 4), torch.randn(8, 64)
    start = bitsweep.quantize_tensor(layer.weight, "asymmetric", 3)
    with torch.no_grad():
        target = layer(x + torch.randn(8, 64))
    assert learn_rounding(layer, x, target, {"": start}, iterations=40)[""] is start


def _held_out(model, monkeypatch):
    """Synthetic inputs the recipes never saw: the images after the first 16 of a larger synthesised set."""
    monkeypatch.setattr(synthetic, "MOST", 64)
    held_out = synthetic.synthesize(copy.deepcopy(model), synthetic.input_size(model))[16:]
    monkeypatch.setattr(synthetic, "MOST", 16)
    return held_out


def _output_mse(model, quantized, x):
    with torch.no_grad():
        return (quantized(x) - model(x)).square().mean().item()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_learned_rounding_brings_the_output_closer_to_fp32_than_its_base(scheme, monkeypatch):
    """The step on top of ``bias`` (plain grid, bias correction) at 3 bits. This random net's output error is
    mostly the mean shift bias correction removes, so the step is judged after it; the registered recipes also fold
    BatchNorm first, which shows on Lite0 rather than here."""
    model = _conv_bn_net()
    held_out = _held_out(model, monkeypatch)
    learned = bitsweep.recipes.Pipeline("learned", "bias with learned rounding", learned_rounding=FEW,
                                        bias_correction="layer")
    quantized = learned.quantize(model, QuantSpec(scheme, 3), Policy.parse(None))
    base = bitsweep.quantize_model(model, scheme, 3, recipe="bias")
    assert _output_mse(model, quantized, held_out) < 0.85 * _output_mse(model, base, held_out)


def test_two_runs_give_the_same_codes():
    model = _conv_bn_net()
    spec, policy = QuantSpec("asymmetric", 3), Policy.parse(None)
    first = _recipe("adaround-bias", iterations=30).quantize(model, spec, policy)
    second = _recipe("adaround-bias", iterations=30).quantize(model, spec, policy)
    assert list(first.quantized_layers) == [name for name, _ in quantizable_layers(model)]
    for name, qt in first.quantized_layers.items():
        assert torch.equal(qt.codes, second.quantized_layers[name].codes)
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))


@pytest.mark.parametrize("granularity,group_size", [("channel", None), ("group", 32)])
def test_the_recipe_packs_and_runs_from_the_packed_file(granularity, group_size, tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("resnet18", pretrained=False, num_classes=10), seed=0)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    policy = Policy.parse({"keep_first": 1})
    quantized = _recipe("mse-adaround-bias", iterations=5).quantize(
        model, QuantSpec("asymmetric", 4, granularity, group_size), policy)
    assert list(quantized.quantized_layers) == [name for name, _ in quantizable_layers(model)][1:]
    path = bitsweep.save_packed(quantized, tmp_path / "m.safetensors", arch="resnet18", arch_kwargs={"num_classes": 10})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bitsweep.load_packed(path)(x), quantized(x), rtol=1e-4, atol=1e-4)
    for name, qt in quantized.quantized_layers.items():
        assert torch.equal(quantized.get_submodule(name).weight, qt.dequantize())


def test_block_units_are_the_residual_blocks_timm_lists_and_the_layers_outside_them():
    resnet = timm.create_model("resnet18", pretrained=False)
    units = reconstruction_units(resnet, [name for name, _ in quantizable_layers(resnet)])
    assert units["conv1"] == ["conv1"] and units["fc"] == ["fc"]
    assert units["layer1.0"] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert units["layer2.0"] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert list(units) == ["conv1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["fc"]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    units = reconstruction_units(vit, [name for name, _ in quantizable_layers(vit)])
    assert units == {"patch_embed.proj": ["patch_embed.proj"],
                     **{f"blocks.{i}": [f"blocks.{i}.{layer}" for layer in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                              "mlp.fc2")] for i in range(2)},
                     "head": ["head"]}
    # only the named layers count: a block whose layers are all kept in float is no unit
    assert list(reconstruction_units(resnet, ["conv1", "layer1.0.conv2"])) == ["conv1", "layer1.0"]


def test_a_units_input_and_output_are_its_own_and_the_pass_stops_after_it():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    later = []
    model.layer3.register_forward_hook(lambda *args: later.append(True))
    unit_in, unit_out = adaround.unit_input_output(model, x, "layer2.0")
    with torch.no_grad():
        expected_in = model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))
        torch.testing.assert_close(unit_in, expected_in, rtol=0, atol=0)
        torch.testing.assert_close(unit_out, model.layer2[0](expected_in), rtol=0, atol=0)
    assert not later  # nothing after the unit ran
    assert adaround.unit_input_output(model, x, "layer2.9") is None  # a unit the pass never calls


def _block_error(block, quantized_layers, x):
    """Squared error of ``block``'s output on ``x`` with the given layers' weights quantized, against fp32."""
    with torch.no_grad():
        weights = {f"{name}.weight": qt.dequantize() for name, qt in quantized_layers.items()}
        return (torch.func.functional_call(block, weights, (x,)) - block(x)).square().mean().item()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_block_learned_together_keeps_to_its_grid_and_comes_closer_to_fp32(scheme):
    """A timm BasicBlock (two convs, BatchNorm, ReLU and the residual add): every code stays one of the two levels
    around its weight, and on inputs it never saw the block's output is closer to fp32's than plain rounding's."""
    torch.manual_seed(0)
    block = randomize_norms(timm.create_model("resnet18", pretrained=False).layer1[0], seed=1).eval()
    x, held_out = torch.randn(64, 64, 8, 8).relu(), torch.randn(24, 64, 8, 8).relu()
    with torch.no_grad():
        target = block(x)
    starts = {name: bitsweep.quantize_tensor(block.get_submodule(name).weight, scheme, 3)
              for name in ("conv1", "conv2")}
    learned = learn_rounding(block, x, target, starts, iterations=300)
    for name, qt in learned.items():
        start = starts[name]
        assert torch.equal(qt.scale, start.scale) and not torch.equal(qt.codes, start.codes)
        assert ((qt.codes.int() - start.codes.int()).abs() <= 1).all()  # a neighbouring level: the next code
    assert _block_error(block, learned, held_out) < 0.9 * _block_error(block, starts, held_out)


def test_brecq_learns_each_blocks_layers_together_reproducibly_and_runs_from_its_packed_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("resnet18", pretrained=False, num_classes=10), seed=0)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    spec, policy = QuantSpec("symmetric", 4), Policy.parse({"keep_first": 1})
    learned_together = []

    def spy(module, inputs, targets, starts, **options):
        learned_together.append((type(module).__name__, sorted(starts)))
        return learn_rounding(module, inputs, targets, starts, **options)

    monkeypatch.setattr(adaround, "learn_rounding", spy)
    first, second = (_recipe("brecq-bias", iterations=5).quantize(model, spec, policy) for _ in range(2))
    assert learned_together[:3] == [("BasicBlock", ["conv1", "conv2"])] * 2 + [
        ("BasicBlock", ["conv1", "conv2", "downsample.0"])]
    assert learned_together[8] == ("Linear", [""]) and len(learned_together) == 18  # fc alone; twice over
    assert list(first.quantized_layers) == [name for name, _ in quantizable_layers(model)][1:]
    for name, qt in first.quantized_layers.items():
        assert torch.equal(qt.codes, second.quantized_layers[name].codes)
    path = bitsweep.save_packed(first, tmp_path / "m.safetensors", arch="resnet18", arch_kwargs={"num_classes": 10})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bitsweep.load_packed(path)(x), first(x), rtol=1e-4, atol=1e-4)
