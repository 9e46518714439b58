"""The int8-compute path: exact weights on int8 kernels, outputs close to fake-quant, data-free ranges."""

import pytest
import timm
import torch
from torch import nn

import bitsweep
from bitsweep.errors import BitsweepError
from bitsweep.int8 import int8_weight, to_int8

EXACT = [(scheme, bits, granularity)
         for scheme, widths in (("asymmetric", range(2, 9)), ("symmetric", range(2, 9)), ("pow2", range(2, 5)))
         for bits in widths for granularity in ("channel", "tensor")]


def bits_of(t):
    return t.to(torch.float32).view(torch.int32)


def weight(shape, seed=0):
    """Channels of very different spread and offset, as real layers have."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-3, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    return torch.randn(shape, generator=g) * spread + 0.3 * spread


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=[16, 32, 64, 128],
                              stem_width=16, pretrained=False).eval()
    with torch.no_grad():  # trained-looking BatchNorms, some with negative gamma (timm zero-inits some)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.copy_(torch.randn(bn.num_features))
            bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2)
    return model


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 1, 28, 28, generator=g) for _ in range(2)]


def centred(weight):
    return weight.int_repr().int() - weight.q_per_channel_zero_points().int().reshape(-1, *[1] * (weight.dim() - 1))


def relative_error(reference, output):
    return ((reference - output).norm() / reference.norm()).item()


@pytest.mark.parametrize("scheme,bits,granularity", EXACT)
@pytest.mark.parametrize("shape", [(24, 8, 3, 3), (24, 1, 3, 3), (24, 40)])
def test_int8_weight_dequantizes_bit_for_bit(scheme, bits, granularity, shape):
    qt = bitsweep.quantize_tensor(weight(shape), scheme, bits, granularity)
    packed = int8_weight(qt)
    assert packed is not None and packed.dtype == torch.qint8
    assert torch.equal(bits_of(packed.dequantize()), bits_of(qt.dequantize()))


@pytest.mark.parametrize("scheme,bits,granularity,group_size",
                         [("asymmetric", 4, "group", 8), ("pow2", 5, "channel", None), ("pow2", 8, "channel", None)])
def test_int8_weight_refuses_what_int8_cannot_hold(scheme, bits, granularity, group_size):
    assert int8_weight(bitsweep.quantize_tensor(weight((24, 40)), scheme, bits, granularity, group_size)) is None


@pytest.mark.parametrize("scheme,bits", [("asymmetric", 8), ("symmetric", 3), ("pow2", 4)])
def test_static_module_runs_the_exact_codes(tiny, batches, scheme, bits):
    fake = bitsweep.quantize_model(tiny, scheme, bits)
    int8 = to_int8(fake, fake.quantized_layers, batches)
    assert int8.int8_exact == {name: True for name in fake.quantized_layers}
    modules = dict(int8.named_modules())
    for name, qt in fake.quantized_layers.items():
        expected, held = int8_weight(qt), modules[name].weight()
        factor = int8.bn_folds.get(name)
        if factor is None:  # no BatchNorm folded in: the very weights of the fake-quant model
            assert torch.equal(bits_of(held.dequantize()), bits_of(qt.dequantize())), name
            continue
        # BatchNorm folded into the scale; a negative factor negates the codes (fbgemm needs scales > 0)
        sign = factor.sign().reshape(-1, *[1] * (qt.codes.dim() - 1)).int()
        assert torch.equal(centred(held), sign * centred(expected)), name
        assert torch.equal(held.q_per_channel_scales(), (expected.q_per_channel_scales().float() * factor).abs().double())
    assert (int8.bn_folds["layer1.0.conv1"] < 0).any() and not int8.dead_channels
    bn = tiny.layer1[0].bn1
    assert torch.equal(int8.bn_folds["layer1.0.conv1"], bn.weight * torch.rsqrt(bn.running_var + bn.eps))
    assert "fc" in fake.quantized_layers and "fc" not in int8.bn_folds
    with torch.no_grad():
        assert relative_error(fake(batches[0]), int8(batches[0])) < 0.1


def test_dynamic_module_holds_the_fake_quant_weights():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10,
                            pretrained=False).eval()
    fake = bitsweep.quantize_model(vit, "asymmetric", 8)
    int8 = to_int8(fake, fake.quantized_layers)
    modules = dict(int8.named_modules())
    linear = [name for name in fake.quantized_layers if isinstance(modules[name], torch.ao.nn.quantized.dynamic.Linear)]
    assert len(linear) == 2 * 4 + 1 and int8.fp32_layers == ("patch_embed.proj",)
    for name in linear:
        assert torch.equal(bits_of(modules[name].weight().dequantize()), bits_of(fake.quantized_layers[name].dequantize()))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(fake(x), int8(x)) < 0.05


def test_data_free_ranges_need_no_data_and_are_seeded(tiny, batches, monkeypatch):
    fake = bitsweep.quantize_model(tiny, "symmetric", 6)
    monkeypatch.setattr(torch.utils.data, "DataLoader", None)  # any attempt to load data would fail
    first = to_int8(fake, fake.quantized_layers, input_size=(1, 28, 28))
    second = to_int8(fake, fake.quantized_layers, input_size=(1, 28, 28))
    with torch.no_grad():
        reference, output = fake(batches[0]), first(batches[0])
        assert torch.equal(output, second(batches[0]))
    assert relative_error(reference, output) < 0.3  # coarse: this random model's logits span few output steps


def test_lossy_layers_are_flagged_and_kept_layers_stay_fp32(tiny, batches):
    fake = bitsweep.quantize_model(tiny, "pow2", 5, policy={"keep_first": 1})
    int8 = to_int8(fake, fake.quantized_layers, batches)
    first = next(name for name, m in tiny.named_modules() if isinstance(m, nn.Conv2d))
    assert first not in fake.quantized_layers and int8.fp32_layers == (first,)
    kept = dict(int8.named_modules())[first]
    assert not isinstance(kept, torch.ao.nn.quantized.Conv2d) and any(type(m) is nn.Conv2d for m in kept.modules())
    assert int8.int8_exact == {name: False for name in fake.quantized_layers}
    grouped = bitsweep.quantize_model(tiny, "asymmetric", 4, "group", group_size=16)
    assert not any(to_int8(grouped, grouped.quantized_layers, batches).int8_exact.values())
    with torch.no_grad():
        assert relative_error(fake(batches[0]), int8(batches[0])) < 0.2


class Branchy(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_model_names_the_module_and_the_fix():
    fake = bitsweep.quantize_model(Branchy().eval(), "symmetric", 4)
    with pytest.raises(BitsweepError, match="cannot trace module 'gate'.*weight-only path"):
        to_int8(fake, fake.quantized_layers, [torch.randn(2, 1, 8, 8)])


def test_relu6_range_and_dead_channels():
    """Pre-activations spanning ±40 before ReLU6 (as in EfficientNet-Lite) keep 6/255 steps; a channel
    whose BatchNorm gamma is ~0 cannot hold its bias in fbgemm's int32 and is zeroed, and reported."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 16, 3, groups=16),
                          nn.BatchNorm2d(16), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[1].weight.fill_(20.0)
        model[4].weight[3], model[4].bias[3] = 1e-12, 1.0
    fake = bitsweep.quantize_model(model, "symmetric", 4)
    x = torch.randn(8, 3, 12, 12)
    int8 = to_int8(fake, fake.quantized_layers, [x])
    assert int8.dead_channels == {"3": 1} and int8.int8_exact == {"0": True, "3": False, "8": True}
    with torch.no_grad():
        assert relative_error(fake(x), int8(x)) < 0.03


def test_tracing_lock_keeps_other_threads_out_and_lets_its_owner_back_in():
    import threading

    from bitsweep.int8 import SharedLock

    lock, entered = SharedLock(), threading.Event()

    def reader():
        with lock.shared():
            entered.set()

    with lock.exclusive():
        with lock.exclusive(), lock.shared():  # the owner re-enters: no deadlock
            pass
        thread = threading.Thread(target=reader)
        thread.start()
        assert not entered.wait(0.3), "a shared holder got in during exclusive()"
    assert entered.wait(5)
    thread.join()
