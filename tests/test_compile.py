"""The compile step: packed modules compute what the fake-quantized model computes."""

import math

import pytest
import timm
import torch
from conftest import SCHEMES, relative_error
from torch import nn

import bitsweep
from bitsweep import kernels
from bitsweep.compile import PackedConv, PackedLinear, compile_packed
from bitsweep.errors import BitsweepError


@pytest.fixture(params=["compiled", "python"])
def kernel_build(request, monkeypatch):
    """Every test here runs on the compiled kernels and on the pure-PyTorch fallback."""
    if request.param == "python":
        monkeypatch.setenv("BITSWEEP_KERNELS", "python")
    kernels.extension.cache_clear()
    if request.param == "compiled":
        assert kernels.extension() is not None, "the C++ kernels did not build on this machine"
    yield request.param
    kernels.extension.cache_clear()


class Layers(nn.Module):
    """A Linear, a dense, a grouped and a depthwise convolution: each kind the kernels run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.fc = nn.Linear(16 * 4 * 4, 40)

    def forward(self, x):
        return self.fc(self.depthwise(self.grouped(self.conv(x))).flatten(1))


class ReadsWeights(nn.Module):
    """Reads its layers' ``.weight`` in forward, as timm's EdgeNeXt reads a conv's device, and uses its values."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.proj(x.to(self.proj.weight.device)).mean((2, 3))
        return self.fc(x) + self.fc.weight.sum(1)


def test_models_that_read_a_layers_weight_still_run(kernel_build):
    torch.manual_seed(0)
    quantized = bitsweep.quantize_model(ReadsWeights().eval(), "asymmetric", 4)
    packed = compile_packed(quantized)
    assert isinstance(packed.proj, PackedConv) and isinstance(packed.fc, PackedLinear)
    assert torch.equal(packed.fc.weight, quantized.fc.weight.detach())
    assert (packed.proj.kernel_size, packed.proj.in_channels) == (quantized.proj.kernel_size, 4)  # DaViT reads these
    with pytest.raises(AttributeError):
        packed.proj.no_such_attribute
    assert "proj.weight" not in packed.state_dict() and not any(p.numel() == 32 for p in packed.parameters())
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        assert relative_error(packed(x), quantized(x)) < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_packed_layers_match_fake_quant_at_every_width(scheme, kernel_build):
    torch.manual_seed(0)
    model = Layers().eval()
    for bits in range(2, 9):
        quantized = bitsweep.quantize_model(model, scheme, bits)
        packed = compile_packed(quantized)
        assert isinstance(packed.fc, PackedLinear) and isinstance(packed.depthwise, PackedConv)
        for batch in (1, 8):
            x = torch.randn(batch, 8, 8, 8)
            fc_in, conv_in = torch.randn(batch, 256), torch.randn(batch, 16, 8, 8)
            with torch.no_grad():
                assert relative_error(packed(x), quantized(x)) < 1e-5, (bits, batch)
                assert relative_error(packed.fc(fc_in), quantized.fc(fc_in)) < 1e-5, (bits, batch)
                for name in ("grouped", "depthwise"):
                    out, ref = getattr(packed, name)(conv_in), getattr(quantized, name)(conv_in)
                    assert relative_error(out, ref) < 1e-5, (name, bits, batch)


def test_group_and_tensor_granularity(kernel_build):
    torch.manual_seed(1)
    layer = nn.Sequential(nn.Linear(100, 24))  # 100 is not a multiple of the group size
    x = torch.randn(3, 100)
    for granularity, group_size in (("tensor", None), ("group", 32), ("group", 20)):
        for scheme in SCHEMES:
            quantized = bitsweep.quantize_model(layer, scheme, 3, granularity, group_size=group_size)
            with torch.no_grad():
                assert relative_error(compile_packed(quantized)(x), quantized(x)) < 1e-5, (granularity, scheme)


def test_third_party_scheme_runs_packed(kernel_build):
    """The example plugin's normal-float levels are a table, not integers: the table path runs them."""
    torch.manual_seed(2)
    layer = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(2, 64)
    for bits in (3, 4, 6):
        quantized = bitsweep.quantize_model(layer, "normalfloat", bits)
        with torch.no_grad():
            assert relative_error(compile_packed(quantized)(x), quantized(x)) < 1e-5


def test_real_models_match_and_keep_weights_packed(kernel_build):
    torch.manual_seed(3)
    for arch in ("resnet18", "vit_tiny_patch16_224"):
        model = timm.create_model(arch, pretrained=False).eval()
        quantized = bitsweep.quantize_model(model, "symmetric", 4)
        packed = compile_packed(quantized)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            assert relative_error(packed(x), quantized(x)) < 1e-4, arch
        state = packed.state_dict()
        assert not any(f"{name}.weight" in state for name in packed.quantized_layers), "no fp32 copy of packed weights"
        codes = sum(layer.kernel.codes.numel() * layer.kernel.codes.element_size()
                    for layer in packed.modules() if isinstance(layer, PackedLinear | PackedConv))
        weights = sum(math.prod(t.shape) for t in packed.quantized_layers.values())
        if kernel_build == "compiled":
            assert codes <= 1.1 * weights * 4 / 8, "resident codes are 4 bits per weight"


def test_save_load_round_trip_is_bitwise(tmp_path, kernel_build):
    torch.manual_seed(4)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    packed = compile_packed(bitsweep.quantize_model(model, "pow2", 5))
    path = bitsweep.save_packed(packed, tmp_path / "m.safetensors", arch="resnet18", arch_kwargs={"num_classes": 10})
    loaded = bitsweep.load_packed(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))


def test_compile_needs_a_quantized_model():
    with pytest.raises(BitsweepError, match="quantize_model"):
        compile_packed(nn.Linear(4, 4))
    quantized = bitsweep.quantize_model(nn.Sequential(nn.Linear(4, 4)), "symmetric", 4)
    with pytest.raises(BitsweepError, match="unknown kernel path"):
        compile_packed(quantized, kernel="gpu")


def test_compile_packed_old_path_keyword_still_works_and_warns():
    quantized = bitsweep.quantize_model(nn.Sequential(nn.Linear(8, 4)), "symmetric", 4)
    with pytest.warns(DeprecationWarning, match="kernel="):
        old = compile_packed(quantized, path="weight-only")
    x = torch.randn(3, 8)
    assert torch.equal(old(x), compile_packed(quantized, kernel="weight-only")(x))
    with pytest.warns(DeprecationWarning), pytest.raises(BitsweepError, match="unknown kernel path"):
        compile_packed(quantized, path="gpu")
