"""The int8-compute path: our codes in the converted graph, compiled outputs equal to it, close to fake-quant."""

import subprocess
import sys

import pytest
import timm
import torch
from conftest import relative_error
from torch import nn

import bitsweep
from bitsweep.errors import BitsweepError
from bitsweep.int8 import (Int8Weight, convert_int8, int8_weight, int8_weights, to_int8, unrounded_activations,
                           weight_limit)

EXACT = [(scheme, bits, granularity)
         for scheme, widths in (("asymmetric", range(2, 9)), ("symmetric", range(2, 9)), ("pow2", range(2, 5)))
         for bits in widths for granularity in ("channel", "tensor")]


def bits_of(t):
    return t.to(torch.float32).view(torch.int32)


def column(t, dims):
    return t.reshape(-1, *[1] * (dims - 1))


def weight(shape, seed=0):
    """Channels of very different spread and offset, as real layers have."""
    g = torch.Generator().manual_seed(seed)
    spread = column(torch.logspace(-3, 1, shape[0]), len(shape))
    return torch.randn(shape, generator=g) * spread + 0.3 * spread


def input_ranges(graph):
    """Layer -> the largest uint8 value its input activations are quantized to (the dequantize op feeding it)."""
    ranges = {}
    for node in graph.graph.nodes:
        if node.op == "call_function" and ("conv" in str(node.target) or "linear" in str(node.target)):
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and "dequantize_per_tensor" in str(source.target):
                ranges[list(node.meta["nn_module_stack"].values())[-1][0]] = source.args[4]
    return ranges


@pytest.fixture(scope="module")
def small():
    """conv-BN-ReLU6, depthwise-BN-ReLU6 with a dead channel (gamma ~ 0), pointwise-BN-ReLU, Linear; trained-looking
    BatchNorms with negative gammas. Pre-activations span about +-40 before ReLU6, as in EfficientNet-Lite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 16, 3, groups=16),
                          nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4], model[7]):
            bn.weight.copy_(torch.randn(bn.num_features) * 3)
            bn.bias.normal_(0, 0.5)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2)
        model[4].weight[3], model[4].bias[3] = 1e-12, 1.0
    return model


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(2)]


@pytest.mark.parametrize("scheme,bits,granularity", EXACT)
@pytest.mark.parametrize("shape", [(24, 8, 3, 3), (24, 1, 3, 3), (24, 40)])
def test_int8_weight_dequantizes_bit_for_bit(scheme, bits, granularity, shape):
    qt = bitsweep.quantize_tensor(weight(shape), scheme, bits, granularity)
    packed = int8_weight(qt)
    assert packed is not None and packed.codes.dtype == torch.int8 and packed.codes.shape == shape
    assert torch.equal(bits_of(packed.dequantize()), bits_of(qt.dequantize()))


@pytest.mark.parametrize("scheme,bits,granularity,group_size",
                         [("asymmetric", 4, "group", 8), ("pow2", 5, "channel", None), ("pow2", 8, "channel", None)])
def test_int8_weight_refuses_what_int8_cannot_hold(scheme, bits, granularity, group_size):
    assert int8_weight(bitsweep.quantize_tensor(weight((24, 40)), scheme, bits, granularity, group_size)) is None


@pytest.mark.parametrize("scheme,bits,granularity", EXACT)
def test_converted_graph_computes_with_our_codes(small, batches, scheme, bits, granularity):
    """Every layer's int8 constants are our codes (negated where the folded BatchNorm's factor is negative)
    with scale s * |factor|, whenever an exact form with zero point 0 exists; otherwise the layer is flagged
    inexact. Either way no product pair can saturate oneDNN's int16 sums on a CPU without VNNI:
    2 * (largest activation) * |code| <= 32767 (8-bit activations with codes within +-64, or 7-bit ones)."""
    fake = bitsweep.quantize_model(small, scheme, bits, granularity)
    graph = convert_int8(fake, fake.quantized_layers, batches)
    held = int8_weights(graph)
    assert set(held) == set(fake.quantized_layers) == set(graph.int8_exact) and graph.fp32_layers == ()
    assert set(graph.bn_folds) == {"0", "3", "6"}
    norm = small[1]
    assert torch.equal(graph.bn_folds["0"], norm.weight * torch.rsqrt(norm.running_var + norm.eps))
    ranges = input_ranges(graph)
    kernel_zero_points = [getattr(graph, node.args[2].target) for node in graph.graph.nodes
                          if "dequantize_per_channel" in str(node.target)]
    assert len(kernel_zero_points) == 4 and not any(zero.any() for zero in kernel_zero_points)  # oneDNN's form
    for name, qt in fake.quantized_layers.items():
        ours, weights = int8_weight(qt), held[name]
        assert weights.codes.dtype == torch.int8, name
        widest = int(weights.codes.abs().max())
        assert weight_limit() == 127 or 2 * ranges[name] * widest <= 32767, (name, ranges[name], widest)
        # 7-bit activations only where the codes need them, and never with VNNI
        assert ranges[name] == 255 or (weight_limit() < 127 and widest > 64), name
        factor = graph.bn_folds.get(name, torch.ones(qt.codes.shape[0]))
        sign = column(factor.sign().int(), qt.codes.dim())
        # exact wherever our codes have an int8 form: 8-bit affine codes with their zero point added apart
        assert graph.int8_exact[name] == (ours is not None), name
        if ours is not None:
            centred = weights.codes.int() - column(weights.zero_point.int(), qt.codes.dim())
            assert torch.equal(centred, (ours.codes.int() - column(ours.zero_point.int(), qt.codes.dim())) * sign)
            assert torch.equal(weights.scale, (ours.scale * factor).abs()), name
            if name not in graph.bn_folds:
                assert torch.equal(bits_of(weights.dequantize()), bits_of(qt.dequantize())), name
    with torch.no_grad():  # activations unrounded, the graph computes the fake-quant model to float rounding
        assert relative_error(unrounded_activations(graph)(batches[0]), fake(batches[0])) < 1e-5
    with torch.no_grad():  # the graph run as is: int8 weights and activations simulated in float. Four uint8
        # activations each round to 1/255 of their range, which is wide against these logits' spread: ~2 %
        assert relative_error(graph(batches[0]), fake(batches[0])) < 0.05


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("limit", [64, 127])  # without VNNI (int16 pair sums) and with it, whatever this CPU has
def test_8_bit_codes_stay_exact_on_every_cpu(small, batches, scheme, limit, monkeypatch):
    """8-bit codes reach +-127 (symmetric) or -128..127 (affine, less their zero point): exact on int8 kernels
    with VNNI (int32 sums) and, without it, behind 7-bit activations, where no product pair can saturate
    int16; the graph then agrees with fake-quant as closely as at narrower widths."""
    monkeypatch.setattr(bitsweep.int8, "weight_limit", lambda: limit)
    fake = bitsweep.quantize_model(small, scheme, 8)
    graph = convert_int8(fake, fake.quantized_layers, batches)
    assert all(graph.int8_exact.values())
    ranges, held = input_ranges(graph), int8_weights(graph)
    assert set(ranges.values()) == ({255} if limit == 127 else {127})
    assert limit == 127 or all(2 * ranges[name] * int(held[name].codes.abs().max()) <= 32767 for name in held)
    with torch.no_grad():
        assert relative_error(unrounded_activations(graph)(batches[0]), fake(batches[0])) < 1e-5
        assert relative_error(graph(batches[0]), fake(batches[0])) < 0.05


class Windows(nn.Module):
    """Every window the zero point's term must sum over: stride and padding, groups of several channels,
    a depthwise multiplier, dilation (no pooling form) and Linear layers on tokens."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU6(),
                                   nn.Conv2d(8, 16, (5, 3), padding=(2, 1), groups=8), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.ReLU())
        self.tokens = nn.Linear(16, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.tokens(self.convs(x).flatten(2).transpose(1, 2))).mean(1)  # [N, L, 16] tokens


def test_8_bit_affine_zero_points_sum_every_window(batches):
    """8-bit affine codes run as int8 codes whose zero point oneDNN cannot take: the graph adds it apart, and
    with activations unrounded computes the fake-quant model to float rounding, whatever the window."""
    torch.manual_seed(0)
    model = Windows().eval()
    with torch.no_grad():
        model.convs[3].weight.copy_(torch.randn(8) * 3)  # negative factors: codes negated or complemented
    fake = bitsweep.quantize_model(model, "asymmetric", 8)
    graph = convert_int8(fake, fake.quantized_layers, batches)
    assert all(graph.int8_exact.values()) and set(graph.weight_zero_points) == set(fake.quantized_layers)
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(unrounded_activations(graph)(x), fake(x)) < 1e-5
        assert relative_error(graph(x), fake(x)) < 0.05


def test_lossy_layers_are_flagged(small, batches):
    for config in (("pow2", 5, "channel", None), ("asymmetric", 4, "group", 8)):
        fake = bitsweep.quantize_model(small, *config[:3], group_size=config[3])
        graph = convert_int8(fake, fake.quantized_layers, batches)
        assert graph.int8_exact == {name: False for name in fake.quantized_layers}
        with torch.no_grad():
            assert relative_error(graph(batches[0]), fake(batches[0])) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("scheme,bits", [("symmetric", 4), ("asymmetric", 8)])  # 8: zero points added apart
def test_compiled_module_equals_its_graph_and_keeps_layers_in_float(small, batches, scheme, bits):
    """The oneDNN kernels compute what the graph simulates: int16 saturation (no VNNI) or halved weights
    would spoil every sample by several percent. Most samples agree to float rounding; a requantization
    that falls on the other side of a rounding boundary (the int8 average pool rounds its own way) moves
    one pooled value by one step, about 1 % of these small logits, so a sample or two may differ that much."""
    fake = bitsweep.quantize_model(small, scheme, bits, policy={"keep_first": 1})
    int8 = to_int8(fake, fake.quantized_layers, batches)
    assert int8.fp32_layers == ("0",) and "0" not in int8_weights(int8.graph) and "0" not in int8.int8_exact
    assert all(int8.int8_exact.values()) and int8.compile_seconds > 0
    x = batches[1]
    with torch.no_grad():
        output, simulated, reference = int8(x), int8.graph(x), fake(x)
    per_sample = (output - simulated).norm(dim=1) / simulated.norm(dim=1)
    assert (per_sample < 1e-5).sum() >= 6 and per_sample.max() < 0.03
    assert relative_error(output, reference) < 0.05
    assert (output.argmax(1) == reference.argmax(1)).float().mean() >= 7 / 8
    assert torch.equal(int8(x[:1]), output[:1])  # batch 1 (the graph to_int8 compiled) agrees with batch 8


@pytest.mark.slow
def test_vit_runs_static_int8_linear():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10,
                            pretrained=False).eval()
    fake = bitsweep.quantize_model(vit, "asymmetric", 4)
    int8 = to_int8(fake, fake.quantized_layers)
    held = int8_weights(int8.graph)
    linear = [name for name, m in vit.named_modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 2 * 4 + 1 and set(linear) <= set(held) and all(int8.int8_exact.values())
    for name in linear:
        assert torch.equal(bits_of(held[name].dequantize()), bits_of(fake.quantized_layers[name].dequantize()))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(int8(x), fake(x)) < 0.05


def test_data_free_ranges_need_no_data_and_are_seeded(small, batches, monkeypatch):
    fake = bitsweep.quantize_model(small, "symmetric", 6)
    monkeypatch.setattr(torch.utils.data, "DataLoader", None)  # any attempt to load data would fail
    first = convert_int8(fake, fake.quantized_layers, input_size=(3, 12, 12))
    second = convert_int8(fake, fake.quantized_layers, input_size=(3, 12, 12))
    with torch.no_grad():
        output = first(batches[0])
        assert torch.equal(output, second(batches[0]))
        assert relative_error(output, fake(batches[0])) < 0.1  # ranges from synthetic inputs, not these


class Reused(nn.Module):
    """What torchao's patterns used to refuse: one ReLU called after two convs (timm's ``self.relu``), a conv
    called twice (CoaT's shared position encodings), "same" padding of an even kernel (ConvMixer's is odd)
    and a conv output plus the number 0 before a ReLU (FastViT's ``identity_out = 0``)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 4, padding="same")
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x) + 0)
        return self.head(self.shared(self.shared(x)).mean((2, 3)))


def test_reused_modules_and_odd_ops_convert_with_our_codes(batches):
    fake = bitsweep.quantize_model(Reused().eval(), "symmetric", 4)
    graph = convert_int8(fake, fake.quantized_layers, batches)
    held = int8_weights(graph)
    assert set(held) == set(fake.quantized_layers) and all(graph.int8_exact.values()) and graph.fp32_layers == ()
    for name, qt in fake.quantized_layers.items():
        assert torch.equal(bits_of(held[name].dequantize()), bits_of(qt.dequantize())), name
    shared = bits_of(fake.quantized_layers["shared"].dequantize())
    calls = [node for node in graph.graph.nodes if "dequantize_per_channel" in str(node.target) and torch.equal(
        bits_of(Int8Weight(*(getattr(graph, arg.target) for arg in node.args[:3])).dequantize()), shared)]
    assert len(calls) == 2  # both calls of the shared conv hold our codes
    with torch.no_grad():
        assert relative_error(graph(batches[0]), fake(batches[0])) < 0.05


class SharedOutputs(nn.Module):
    """BatchNorms pt2e must not fold: one reads a conv whose output also takes the shortcut (CoAtNet's stem
    and pre-norm), one reads a folded BatchNorm's output that a conv reads too (RepGhost's ``fusion_bn``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pre_norm = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.primary = nn.Conv2d(8, 8, 1)
        self.norm = nn.BatchNorm2d(8)
        self.cheap = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fusion_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            for norm in (self.pre_norm, self.norm, self.fusion_bn):
                norm.weight.uniform_(0.5, 2.0)
                norm.bias.uniform_(-1.0, 1.0)
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv(torch.relu(self.pre_norm(x)))
        x1 = self.norm(self.primary(x))
        x = self.cheap(x1) + self.fusion_bn(x1)
        return self.head(x.mean((2, 3)))


def test_norms_of_shared_outputs_stay_apart(batches):
    fake = bitsweep.quantize_model(SharedOutputs().eval(), "symmetric", 4)
    graph = convert_int8(fake, fake.quantized_layers, batches)
    with torch.no_grad():
        assert relative_error(unrounded_activations(graph)(batches[0]), fake(batches[0])) < 1e-5
        assert relative_error(graph(batches[0]), fake(batches[0])) < 0.05


def test_a_graph_that_does_not_compute_the_model_is_refused(batches, monkeypatch):
    """torchao's own fold, unchecked (as before ``_norms_read_shared_convs_apart``), hands the shortcut the
    normalised output: ``convert_int8`` notices and refuses in one line rather than return that graph."""
    monkeypatch.setattr("bitsweep.int8._norms_read_shared_convs_apart", lambda graph: None)
    fake = bitsweep.quantize_model(SharedOutputs().eval(), "symmetric", 4)
    with pytest.raises(BitsweepError, match=r"int8 graph of SharedOutputs does not compute the fake-quant model "
                                            r"even with exact activations \(relative error") as refused:
        convert_int8(fake, fake.quantized_layers, batches)
    assert "\n" not in str(refused.value)


class Branchy(nn.Module):
    """Control flow on tensor values: torch.export cannot trace it."""

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
    with pytest.raises(BitsweepError, match=r"cannot export module 'gate'.*weight-only path") as error:
        to_int8(fake, fake.quantized_layers, [torch.randn(2, 1, 8, 8)])
    assert "\n" not in str(error.value)


def test_missing_torchao_is_one_line(small, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantize_pt2e", None)
    fake = bitsweep.quantize_model(small, "symmetric", 4)
    with pytest.raises(BitsweepError, match=r"needs torchao.*pip install torchao.*weight-only path"):
        to_int8(fake, fake.quantized_layers)


def test_converting_prints_nothing_in_a_fresh_process():
    """torchao's import logs a torch deprecation no user can act on (its ``KernelPreference`` Enum): a sweep's
    output must not open with it."""
    code = ("import torch, bitsweep; from bitsweep.int8 import convert_int8; "
            "model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()); "
            "q = bitsweep.quantize_model(model, 'symmetric', 8); "
            "convert_int8(q, q.quantized_layers, input_size=(3, 8, 8))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_inductor_failure_is_one_line(small, batches):
    import torch._inductor.config as inductor

    fake = bitsweep.quantize_model(small, "symmetric", 3)
    # inductor's own patch, not monkeypatch: undoing a monkeypatch deletes the setting from torch's config
    # module, and every later compilation in the process fails on the missing setting.
    with inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}):
        with pytest.raises(BitsweepError, match=r"inductor cannot compile .*g\+\+.*weight-only path") as error:
            to_int8(fake, fake.quantized_layers, batches)
    assert "\n" not in str(error.value)
    assert inductor.force_disable_caches is False and inductor.cpp.cxx != ("/nonexistent/c++",)
