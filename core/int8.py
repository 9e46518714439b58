"""The int8-compute path: run a fake-quantized model on PyTorch's int8 CPU kernels.

Weight-only packing cannot speed up convolutions (they are compute-bound); integer
arithmetic can. ``to_int8`` hands the n-bit codes to fbgemm (PyTorch's ``x86``
quantized engine) as int8 weights with per-channel scales, so every weight the
codes describe is kept exactly. Two routes:

* **static** (CNNs): an FX graph with BatchNorm folded into the per-channel weight
  scale, conv+ReLU fused, and activations quantized to uint8 with ranges observed
  on calibration batches, or data-free on inputs synthesised to match the
  model's BatchNorm running statistics (ZeroQ-style: no real image is used).
* **dynamic** (models without BatchNorm whose weights sit mostly in Linear
  layers, e.g. ViTs): ``quantized.dynamic.Linear``; activation ranges are taken
  per call, so no calibration is needed and ``calibration`` is ignored.

This machine's CPU (Zen 3) has AVX2 but no VNNI, so ``x86`` dispatches to fbgemm, which
accepts per-channel weight zero points; the ``onednn`` engine measured slower. Here an
int8 GEMM peaks at only ~1.9x fp32 (80 vs 41 GMAC/s at 1024^3), which bounds the gain
on compute-bound layers; the rest comes from folding BatchNorm and fusing activations.
Activations get 7 bits (fbgemm's int16 pair sums) unless every consuming layer's codes
are within ±64, which holds for the narrow widths this project sweeps.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import warnings

import torch
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
from torch import fx, nn

from bitsweep.errors import BitsweepError
from bitsweep.quantize import QUANTIZABLE, quantizable_layers
from bitsweep.schemes import AffineScheme, QuantizedTensor
from bitsweep.synthetic import default_input_size, synthesize

ENGINE = "x86"
_QUANTIZED = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear, nnqd.Linear)
_DROPPABLE = (nn.Identity, nn.Dropout)
_FULL_RANGE_WEIGHT = 64  # the largest |int8 weight| fbgemm takes with 8-bit activations (see _widen_activations)


def int8_weight(qt: QuantizedTensor) -> torch.Tensor | None:
    """``qt`` as a per-channel qint8 tensor whose ``dequantize()`` equals ``qt.dequantize()``
    bit for bit, or ``None`` when no such tensor exists (group scales, wide pow2, unknown schemes)."""
    if qt.granularity == "group" or qt.codes.dim() == 0 or qt.codes.numel() == 0:
        return None
    channels = qt.codes.shape[0]
    codes = qt.codes.to(torch.int32).reshape(channels, -1)
    scale = qt.scale.to(torch.float32).reshape(-1).expand(channels)
    zero = qt.zero_point.to(torch.int32).reshape(-1).expand(channels)
    if isinstance(qt.codec, AffineScheme):  # w = (c - z) * s: shift codes and zero point alike
        centred = codes - zero[:, None]
        if centred.min() >= -128 and centred.max() <= 127:
            q, zero = centred, torch.zeros_like(zero)  # symmetric int8: no zero-point work in the kernel
        elif qt.qmax - qt.qmin <= 255:
            shift = qt.qmin + 128
            q, zero = codes - shift, zero - shift
        else:
            return None
    elif qt.scheme == "pow2" and qt.qmax <= 7:  # sign(c) * s * 2^(|c|-L) == sign(c) * 2^(|c|-1) * (s * 2^(1-L))
        magnitude = codes.abs()
        q = torch.where(magnitude > 0, codes.sign() << (magnitude - 1).clamp_min(0), 0)
        scale = torch.ldexp(scale, torch.tensor(1 - qt.qmax))
    else:
        return None
    if q.min() < -128 or q.max() > 127 or zero.min() < -128 or zero.max() > 127:
        return None
    packed = _per_channel(q.reshape(qt.codes.shape), scale, zero)
    exact = packed.dequantize().view(torch.int32)
    return packed if torch.equal(exact, qt.dequantize().to(torch.float32).view(torch.int32)) else None


@contextlib.contextmanager
def _quiet():
    """Silence torch's notice that quantized tensors are deprecated: they are what fbgemm takes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        yield


def _per_channel(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    with _quiet():
        return torch._make_per_channel_quantized_tensor(q.to(torch.int8), scale.double(), zero.long(), 0)


def _rescaled(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The same int8 codes with each channel's scale multiplied by a folded BatchNorm factor.

    fbgemm needs positive scales, so a negative factor negates the channel's codes instead:
    ``q -> -q`` when that fits in int8, else ``(q, z) -> (~q, ~z)`` (as ``~q - ~z == z - q``).
    """
    q, zero = weight.int_repr().to(torch.int32), weight.q_per_channel_zero_points().to(torch.int32)
    scale = weight.q_per_channel_scales().to(torch.float32) * factor
    rows = q.reshape(q.shape[0], -1)
    negate = (scale < 0) & (zero == 0) & (rows.min(dim=1).values > -128)
    invert = (scale < 0) & ~negate
    column = (-1,) + (1,) * (q.dim() - 1)
    q = torch.where(negate.reshape(column), -q, torch.where(invert.reshape(column), ~q, q))
    return _per_channel(q, scale.abs(), torch.where(invert, ~zero, zero))


def _fit_bias(weight: torch.Tensor, bias: torch.Tensor | None, input_scale: float) -> tuple[torch.Tensor, int]:
    """fbgemm adds the bias as int32 in units of ``input_scale * weight_scale``; a channel whose scale is
    too small for that (a dead channel, BatchNorm gamma ~ 0) gets zero codes and a scale its bias fits
    under. Its weights then contribute < 2^-14 of its bias. Returns the weight and the channels changed."""
    if bias is None:
        return weight, 0
    scale = weight.q_per_channel_scales().to(torch.float32)
    floor = (bias.abs() / (input_scale * 2.0**30)).clamp_min(torch.finfo(torch.float32).tiny)
    dead = scale < floor
    if not dead.any():
        return weight, 0
    column = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.where(dead.reshape(column), 0, weight.int_repr().to(torch.int32))
    zero = torch.where(dead, 0, weight.q_per_channel_zero_points())
    return _per_channel(q, torch.where(dead, floor, scale), zero), int(dead.sum())


class SharedLock:
    """Many holders of ``shared()`` at once, or one of ``exclusive()``.

    FX tracing patches ``nn.Module.__call__`` for the whole process while it runs, so a
    model built or run in another thread would be traced into the graph (or fail).
    ``to_int8`` holds ``TRACING.exclusive()``; threads that build or run models while it
    may run (the sweep's steps) hold ``TRACING.shared()``. A waiting ``exclusive()`` goes
    first, and the thread holding it may take either again.
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._shared = 0
        self._owner: int | None = None  # the thread holding exclusive()
        self._depth = 0
        self._queued = 0  # threads waiting for exclusive()

    @contextlib.contextmanager
    def shared(self):
        if self._owner == threading.get_ident():
            yield
            return
        with self._condition:
            self._condition.wait_for(lambda: self._owner is None and not self._queued)
            self._shared += 1
        try:
            yield
        finally:
            with self._condition:
                self._shared -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        me = threading.get_ident()
        with self._condition:
            if self._owner != me:
                self._queued += 1
                self._condition.wait_for(lambda: self._owner is None and not self._shared)
                self._queued -= 1
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._condition:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._condition.notify_all()


TRACING = SharedLock()


def to_int8(model: nn.Module, layers: dict[str, QuantizedTensor],
            calibration: list[torch.Tensor] | None = None, *,
            input_size: tuple[int, ...] | None = None) -> nn.Module:
    """An int8-kernel version of the fake-quantized ``model`` (left untouched).

    ``calibration`` batches set the activation ranges; without them ranges come
    from synthetic inputs of ``input_size`` (C, H, W; default: the first
    calibration batch, else the timm config with the stem's channel count).
    The result carries ``int8_exact`` (quantized layer -> its codes are on int8
    kernels unchanged; False means requantized per channel to int8, lossy) and
    ``fp32_layers`` (Conv/Linear layers still computed in float, e.g. the ones a
    policy kept out of quantization). ``dead_channels`` counts, per layer, channels
    whose codes had to be zeroed (see ``_fit_bias``). ``bn_folds`` maps each layer whose
    BatchNorm was folded to the factor ``gamma / sqrt(var + eps)``: its int8 codes
    are unchanged and its scale is ``s * factor``; the other exact layers'
    dequantized weights equal ``qt.dequantize()`` bit for bit.
    """
    torch.backends.quantized.engine = ENGINE
    source = copy.deepcopy(model).eval()
    for parameter in source.parameters():
        parameter.requires_grad_(False)
    _plain_linears(source)
    if input_size is None:
        input_size = tuple(calibration[0].shape[1:]) if calibration else default_input_size(source)
    with _quiet(), TRACING.exclusive():
        if _is_linear_model(source, layers):
            converted, folds, input_scales = _dynamic(source, layers), {}, {}
        else:
            converted, folds, input_scales = _static(source, layers, calibration, input_size)
        converted.int8_exact, converted.dead_channels = _install_weights(converted, layers, folds, input_scales)
        converted.bn_folds = folds
    modules = dict(converted.named_modules())
    converted.fp32_layers = tuple(name for name, _ in quantizable_layers(model)
                                  if not isinstance(modules.get(name), _QUANTIZED))
    return converted


def _plain_linears(model: nn.Module) -> None:
    """Swap subclasses of nn.Linear (timm's calls F.linear itself) for nn.Linear: PyTorch's
    quantization matches exact module types and would leave them in float."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and type(child) is not nn.Linear:
                plain = nn.Linear(child.in_features, child.out_features, child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)


def _is_linear_model(model: nn.Module, layers: dict[str, QuantizedTensor]) -> bool:
    """No BatchNorm and most quantized weights in Linear layers: the transformer shape, where
    dynamic int8 Linear is both faster (no requantize between ops) and needs no calibration."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    modules = dict(model.named_modules())
    linear = sum(qt.codes.numel() for name, qt in layers.items() if isinstance(modules.get(name), nn.Linear))
    return linear * 2 > sum(qt.codes.numel() for qt in layers.values())


def _dynamic(model: nn.Module, layers: dict[str, QuantizedTensor]) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name in layers}
    return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8)


def _install_weights(model: nn.Module, layers: dict[str, QuantizedTensor], folds: dict[str, torch.Tensor],
                     input_scales: dict[str, float]) -> tuple[dict[str, bool], dict[str, int]]:
    """Replace the observer-derived int8 weights by the exact codes wherever they exist.
    Returns layer -> exact, and layer -> channels zeroed by ``_fit_bias``."""
    exact, dead = {}, {}
    modules = dict(model.named_modules())
    for name, qt in layers.items():
        module = modules.get(name)
        if not isinstance(module, _QUANTIZED):
            continue  # left in float (reported in fp32_layers)
        weight = int8_weight(qt)
        exact[name] = weight is not None
        if weight is None:
            continue
        if name in folds:
            weight = _rescaled(weight, folds[name])
        if name in input_scales:
            weight, dead[name] = _fit_bias(weight, module.bias(), input_scales[name])
            exact[name] = not dead[name]
        module.set_weight_bias(weight, module.bias())
    return exact, {name: count for name, count in dead.items() if count}


# ---------------------------------------------------------------- static (FX graph mode)

def _static(model: nn.Module, layers: dict[str, QuantizedTensor], calibration: list[torch.Tensor] | None,
            input_size: tuple[int, ...]) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, float]]:
    """The converted graph, its BatchNorm folds and each int8 module's input scale."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    example = torch.zeros((1, *input_size))
    batches = calibration if calibration else [synthesize(model, input_size)]
    graph = _trace(model, example)
    folds = _fold_batchnorm(graph)
    mapping = get_default_qconfig_mapping(ENGINE)
    for name, module in graph.named_modules():
        if isinstance(module, QUANTIZABLE) and name not in layers:
            mapping.set_module_name(name, None)  # not quantized by bitsweep: stays fp32
    try:
        prepared = prepare_fx(graph, mapping, (example,))
        _widen_activations(prepared, {name for name, qt in layers.items() if _small_codes(qt)})
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
        _clip_before_relu6(prepared)
        converted = convert_fx(prepared)
        input_scales = {}
        hooks = [m.register_forward_pre_hook(lambda m, args, n=n: input_scales.__setitem__(n, args[0].q_scale()))
                 for n, m in converted.named_modules() if isinstance(m, _QUANTIZED)]
        with torch.no_grad():
            converted(example)
        for hook in hooks:
            hook.remove()
    except Exception as exc:  # FX reports untraceable code with many exception types
        raise BitsweepError(f"the int8-compute path cannot convert this model ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}); use the weight-only path instead") from exc
    return converted, folds, input_scales


def _small_codes(qt: QuantizedTensor) -> bool:
    weight = int8_weight(qt)
    return (weight is not None and int(weight.int_repr().abs().max()) <= _FULL_RANGE_WEIGHT
            and not weight.q_per_channel_zero_points().any())  # so _rescaled only negates: |q| stays


def _widen_activations(prepared: fx.GraphModule, small: set[str]) -> None:
    """Give 8 bits instead of 7 to activations consumed only by layers whose int8 codes are within ±64.

    fbgemm's AVX2 kernels add uint8 x int8 products pairwise in int16, so x86's qconfig keeps
    activations to 0..127 (``reduce_range``); with |w| <= 64, 2 * 255 * 64 still fits (checked on
    this machine: 65 saturates). Codes of <= 7-bit symmetric, <= 6-bit asymmetric and 4-bit pow2 qualify.
    """
    from torch.ao.quantization.observer import HistogramObserver

    consumers = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and isinstance(prepared.get_submodule(node.target), HistogramObserver):
            consumers.setdefault(node.target, []).extend(node.users)
    for target, users in consumers.items():
        observer = prepared.get_submodule(target)
        if users and observer.reduce_range and all(u.op == "call_module" and u.target in small for u in users):
            setattr(prepared, target, HistogramObserver(dtype=observer.dtype, qscheme=observer.qscheme))


def _clip_before_relu6(prepared: fx.GraphModule) -> None:
    """Quantize what only feeds a ReLU6 over [0, 6]: the quantizer's clamp then *is* the ReLU6, and
    the steps are set by 6 instead of the pre-activation range (~40 in EfficientNet-Lite: 7x coarser).
    FX fuses conv+ReLU this way but not conv+ReLU6."""
    from torch.ao.quantization.observer import MinMaxObserver, ObserverBase

    def is_relu6(node):
        return ((node.op == "call_module" and isinstance(prepared.get_submodule(node.target), nn.ReLU6))
                or (node.op == "call_function" and node.target is torch.nn.functional.relu6))

    for node in prepared.graph.nodes:
        if node.op != "call_module" or not node.users or not all(is_relu6(user) for user in node.users):
            continue
        observer = prepared.get_submodule(node.target)
        if not isinstance(observer, ObserverBase) or not hasattr(observer, "min_val"):
            continue
        clipped = MinMaxObserver(dtype=observer.dtype, qscheme=observer.qscheme, reduce_range=observer.reduce_range,
                                 quant_min=observer.quant_min, quant_max=observer.quant_max)
        clipped(torch.stack([observer.min_val.clamp(0, 6), observer.max_val.clamp(0, 6)]))
        setattr(prepared, node.target, clipped)


def _trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """An FX graph of ``model`` with timm's composite layers rewritten into ones FX quantization fuses."""
    from timm.layers import BatchNormAct2d, Conv2dSame
    from timm.layers._fx import get_notrace_functions, get_notrace_modules

    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, args[0].shape[-2:]))
             for m in model.modules() if isinstance(m, Conv2dSame)]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, BatchNormAct2d):
                setattr(parent, child_name, _split_norm_act(child))

    leaves = tuple(get_notrace_modules())

    class Tracer(fx.Tracer):
        """timm's own leaf modules and wrapped functions; remembers which module it is inside."""

        def __init__(self):
            super().__init__(autowrap_functions=tuple(get_notrace_functions()))
            self.inside = []

        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

        def call_module(self, m, forward, args, kwargs):
            self.inside.append(self.path_of_module(m))
            result = super().call_module(m, forward, args, kwargs)
            self.inside.pop()
            return result

    tracer = Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = f"module {tracer.inside[-1]!r}" if tracer.inside and tracer.inside[-1] else type(model).__name__
        raise BitsweepError(f"the int8-compute path cannot trace {where} with torch.fx "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                            "use the weight-only path instead") from exc
    gm = fx.GraphModule(model, graph)
    for node in list(gm.graph.nodes):
        if _is_spatial_mean(node):  # squeeze-excite's pooling: the quantized mean kernel is ~10x slower
            with gm.graph.inserting_before(node):
                pooled = gm.graph.call_function(torch.nn.functional.adaptive_avg_pool2d, (node.args[0], 1))
            node.replace_all_uses_with(pooled)
            gm.graph.erase_node(node)
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, _DROPPABLE):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif isinstance(module, Conv2dSame):
            _unsame(gm, node, module, sizes[module])
        elif isinstance(module, leaves):
            raise BitsweepError(f"module {node.target!r} ({type(module).__name__}) cannot be traced for the "
                                "int8-compute path; use the weight-only path instead")
    gm.graph.lint()
    gm.recompile()
    return gm


def _is_spatial_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3), keepdim=True)`` on a 4-D tensor, as timm's squeeze-excite writes it."""
    if node.op != "call_method" or node.target != "mean" or len(node.args) != 2:
        return False
    dims = node.args[1]
    return node.kwargs.get("keepdim") is True and isinstance(dims, (tuple, list)) and tuple(dims) in ((2, 3), (-2, -1))


def _split_norm_act(layer: nn.Module) -> nn.Module:
    """timm's BatchNormAct2d as BatchNorm2d then its activation, so conv+bn(+relu) can fuse."""
    norm = nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
    norm.load_state_dict(layer.state_dict(), strict=False)
    norm.eval()
    return nn.Sequential(norm, layer.act) if not isinstance(layer.act, nn.Identity) else norm


def _unsame(gm: fx.GraphModule, node: fx.Node, conv: nn.Conv2d, size: torch.Size) -> None:
    """TF 'same' padding for the traced input size: a plain Conv2d, after a ZeroPad2d if uneven."""
    pads = []
    for extent, k, s, d in zip(size, conv.kernel_size, conv.stride, conv.dilation):
        pads.append(max((math.ceil(extent / s) - 1) * s + (k - 1) * d + 1 - extent, 0))
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                      conv.groups, conv.bias is not None, conv.padding_mode)
    plain.load_state_dict(conv.state_dict())
    (pad_h, pad_w) = pads
    if pad_h % 2 == 0 and pad_w % 2 == 0:
        plain.padding = (pad_h // 2, pad_w // 2)
    else:
        pad_name = node.target + "_pad"
        gm.add_submodule(pad_name, nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)))
        with gm.graph.inserting_before(node):
            padded = gm.graph.call_module(pad_name, (node.args[0],))
        node.args = (padded, *node.args[1:])
    gm.add_submodule(node.target, plain)


def _fold_batchnorm(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Fold each BatchNorm that alone consumes a Conv into that Conv; returns conv -> per-channel factor.

    FX would fold too, but changing the float weight would lose track of the codes; the
    factor goes into the int8 scale instead, where a fused kernel applies it anyway.
    """
    folds = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and type(gm.get_submodule(source.target)) is nn.Conv2d):
            continue
        norm, conv = gm.get_submodule(node.target), gm.get_submodule(source.target)
        if not norm.track_running_stats or norm.running_var is None:
            continue
        factor = torch.rsqrt(norm.running_var + norm.eps)
        if norm.affine:
            factor = factor * norm.weight
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        shift = (bias - norm.running_mean) * factor + (norm.bias if norm.affine else 0)
        with torch.no_grad():
            conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(shift, requires_grad=False)
        folds[source.target] = factor.detach().clone()
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return folds
