"""quantize_model on real timm architectures, and the partial-precision policy."""

import pytest
import timm
import torch

import bitsweep
from bitsweep import BitsweepError, Policy
from bitsweep.quantize import quantizable_layers

MODELS = {  # name -> input size
    "resnet18": 64,
    "mobilenetv3_large_100": 64,
    "vit_tiny_patch16_224": 224,
    "tf_efficientnet_lite0": 64,
}


@pytest.fixture(scope="module", params=list(MODELS))
def timm_model(request):
    torch.manual_seed(0)
    return request.param, timm.create_model(request.param, pretrained=False).eval()


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "pow2"])
def test_every_layer_outside_the_policy_is_quantized(timm_model, scheme):
    name, model = timm_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = Policy(keep_first=1, keep_last=1)
    qm = bitsweep.quantize_model(model, scheme, 4, "channel", policy)

    layers = quantizable_layers(model)
    names = [n for n, _ in layers]
    assert len(layers) > 10
    assert list(qm.quantized_layers) == names[1:-1]
    for (layer_name, original), (_, copy) in zip(layers, quantizable_layers(qm), strict=True):
        if layer_name in qm.quantized_layers:
            qt = qm.quantized_layers[layer_name]
            assert torch.equal(copy.weight, qt.dequantize())
            assert not torch.equal(copy.weight, original.weight)
            assert qt.codes.shape == original.weight.shape and qt.bits == 4
        else:
            assert torch.equal(copy.weight, original.weight)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model modified"
    x = torch.randn(2, 3, MODELS[name], MODELS[name])
    with torch.no_grad():
        assert qm(x).shape == model(x).shape == (2, 1000)


def test_policy_globs_and_bit_overrides():
    model = timm.create_model("resnet18").eval()
    policy = Policy(include=["layer*"], exclude=["*.downsample.*"], bits={"layer4.*": 8, "layer1.*": 3})
    qm = bitsweep.quantize_model(model, "symmetric", 5, policy=policy)
    widths = {name: qt.bits for name, qt in qm.quantized_layers.items()}
    assert "conv1" not in widths and "fc" not in widths
    assert not any("downsample" in n for n in widths)
    assert widths["layer1.0.conv1"] == 3 and widths["layer2.0.conv1"] == 5 and widths["layer4.1.conv2"] == 8
    assert len(widths) == 16


def test_policy_parsing_and_labels():
    assert Policy.parse(None) == Policy.parse("full") == Policy(name="full")
    assert Policy.parse({"keep_first": 1}).label == "keep_first=1"
    assert Policy.parse({"name": "backbone", "exclude": ["head*"]}).label == "backbone"
    with pytest.raises(BitsweepError, match="policy 'half'"):
        Policy.parse("half")
    with pytest.raises(ValueError, match="outside 2..8"):
        Policy(bits={"fc": 12})
    with pytest.raises(ValueError):
        Policy(keep_first=-1)


def test_non_finite_weight_error_names_the_layer():
    model = timm.create_model("resnet18").eval()
    with torch.no_grad():
        model.layer2[0].conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(BitsweepError, match=r"layer 'layer2\.0\.conv2': weights contain 1 NaN/Inf"):
        bitsweep.quantize_model(model, "asymmetric", 4)


def test_bad_arguments_fail_before_any_work():
    model = timm.create_model("resnet18").eval()
    with pytest.raises(BitsweepError, match="unknown scheme 'int4'"):
        bitsweep.quantize_model(model, "int4", 4)
    with pytest.raises(BitsweepError, match="bits=1 is outside 2..8"):
        bitsweep.quantize_model(model, "pow2", 1)
