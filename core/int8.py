"""The int8-compute path: run a fake-quantized model on oneDNN's int8 CPU kernels, through torchao's pt2e.

Weight-only packing cannot speed up convolutions (they are compute-bound); integer arithmetic
can. ``to_int8`` exports the model (``torch.export``), lets torchao's ``X86InductorQuantizer``
place the quantize/dequantize pairs (BatchNorm folded into the conv, conv + activation fused,
activations uint8 per tensor with ranges observed on calibration batches, or data-free on inputs
synthesised to match the model's BatchNorm statistics), converts, puts bitsweep's own codes in
place of the observer's int8 weights, and compiles with inductor, which packs the frozen weights
for oneDNN. ViTs take the same static path: the quantizer's dynamic config (per-call activation
ranges, as ``quantize_dynamic`` had) ran slower than static on ViT-tiny, slower even than fp32 (README).

torchao's patterns get some graphs wrong (a BatchNorm folded into a conv whose output others read too,
modules called twice, string padding); bitsweep rewrites those before quantizing, and then checks what
is left: the converted graph with its activations unrounded must compute the fake-quant model
(``FOLLOW_RTOL``), or the model is refused in one line rather than measured wrong.

oneDNN takes symmetric per-channel int8 weights (zero point 0). 8-bit affine codes ``c`` (0..255) have no
such form, so their kernel multiplies ``c - 128`` and the graph adds the rest, ``(128 - z) * s`` times the
sum of the inputs each output reads (``_add_zero_point_terms``). Without VNNI oneDNN's AVX2 kernels add
uint8 x int8 products pairwise in int16, which saturates unless ``2 * a * |w|`` fits: activations
get 8 bits (a <= 255) where a layer's codes are within +-64 (see ``weight_limit``), and 7 bits
(a <= 127) in front of layers with wider codes (8-bit, some 7-bit asymmetric), which then stay exact.
With VNNI every layer keeps 8-bit activations.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import operator
import threading
import time
import warnings
from typing import NamedTuple

import torch
from torch import nn

from bitsweep.errors import BitsweepError, first_line
from bitsweep.evaluate import relative_error
from bitsweep.kernels import cpu_flags
from bitsweep.policy import QUANTIZABLE, quantizable_layers
from bitsweep.schemes import AffineScheme, QuantizedTensor
from bitsweep.synthetic import input_size as model_input_size, synthesize
from bitsweep.tracing import TRACING

_WEIGHT_OPS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default")
_NORM_OPS = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")
_PADDED_CONV_OPS = ("aten.conv1d.padding", "aten.conv2d.padding", "aten.conv3d.padding")
_FIX = "use the weight-only path instead"
# How far the int8 graph with its activations unrounded may be from the fake-quant model (relative L2):
# the two differ only by float32 rounding (a folded BatchNorm, another summation order), which deep
# sensitive networks amplify to ~1e-5; a wrong weight, fold or graph is off by 1e-2 and more.
FOLLOW_RTOL = 1e-3


class Int8Weight(NamedTuple):
    """Per-channel int8 codes with float32 scales and int32 zero points: ``(codes - zero) * scale``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        column = (-1,) + (1,) * (self.codes.dim() - 1)
        return (self.codes.to(torch.float32) - self.zero_point.reshape(column)) * self.scale.reshape(column)


def int8_weight(qt: QuantizedTensor) -> Int8Weight | None:
    """``qt`` as per-channel int8 codes whose dequantization equals ``qt.dequantize()`` bit for bit,
    or ``None`` when none exists (group scales, wide pow2, unknown schemes, 8-bit affine codes whose
    zero point is outside them)."""
    if qt.granularity == "group" or qt.codes.dim() == 0 or qt.codes.numel() == 0:
        return None
    channels = qt.codes.shape[0]
    codes = qt.codes.to(torch.int32).reshape(channels, -1)
    scale = qt.scale.to(torch.float32).reshape(-1).expand(channels)
    zero = qt.zero_point.to(torch.int32).reshape(-1).expand(channels)
    if isinstance(qt.codec, AffineScheme):  # w = (c - z) * s: shift codes and zero point alike
        centred = codes - zero[:, None]
        if centred.min() >= -128 and centred.max() <= 127:
            q, zero = centred, torch.zeros_like(zero)  # symmetric int8: what oneDNN takes
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
    weight = Int8Weight(q.reshape(qt.codes.shape).to(torch.int8), scale.contiguous(), zero.contiguous())
    exact = torch.equal(weight.dequantize().view(torch.int32), qt.dequantize().to(torch.float32).view(torch.int32))
    return weight if exact else None


@functools.cache
def weight_limit() -> int:
    """The largest |int8 weight| oneDNN multiplies exactly with 8-bit activations on this CPU: 127 with
    VNNI (int32 accumulation), else 64 (u8 x s8 pairs summed in int16: 2 * 255 * 64 fits, 65 may not)."""
    return 127 if cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"} else 64


_FREEZING_LOCK = threading.Lock()
_freezing_users = 0
_freezing_saved = False


@contextlib.contextmanager
def _freezing():
    """Inductor's ``freezing`` on while any int8 module runs: dynamo reads it (a global, not a
    ``torch.compile`` option) whenever it compiles for a new input shape; frozen weights are what lets
    inductor prepack them for oneDNN. Counted, so concurrent calls do not switch it off under each other."""
    global _freezing_users, _freezing_saved
    import torch._inductor.config as inductor

    with _FREEZING_LOCK:
        if not _freezing_users:
            _freezing_saved, inductor.freezing = inductor.freezing, True
        _freezing_users += 1
    try:
        yield
    finally:
        with _FREEZING_LOCK:
            _freezing_users -= 1
            if not _freezing_users:
                inductor.freezing = _freezing_saved


class Int8Module(nn.Module):
    """The converted pt2e graph (``graph``: int8 weight constants, float math) run compiled by inductor.

    Inference only: weights are frozen into the compiled code, and every call runs in inference mode
    (dynamo guards on it: a call under plain ``no_grad`` would compile again). Inductor compiles on the
    first call at each new input shape: ``to_int8`` compiles batch 1 (``compile_seconds``); other
    batch sizes compile when first seen (after 8 shapes dynamo runs the graph uncompiled: correct, slow).
    Compiling traces with torch.fx like export does, so a program running models in other threads makes
    that first call under ``TRACING.exclusive()``.
    """

    def __init__(self, graph: torch.fx.GraphModule):
        super().__init__()
        self.graph = graph
        # Static shapes: with a symbolic batch size, inductor's layout of a quantized conv's output can
        # disagree with what oneDNN returns (a stride assertion at run time, seen at batch 256).
        compiled = torch.compile(graph, dynamic=False)
        object.__setattr__(self, "_compiled", compiled)  # not a submodule: graph's state once
        self.compile_seconds = 0.0

    def train(self, mode: bool = True) -> Int8Module:
        """Only the flag: an exported graph refuses ``train()``/``eval()``, and this one only infers."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            with torch.inference_mode(), _freezing():
                return self._compiled(x)
        except Exception as exc:
            if type(exc).__name__ not in ("InductorError", "BackendCompilerFailed", "InvalidCxxCompiler"):
                raise
            cause = exc
            while getattr(cause, "inner_exception", None) is not None:  # dynamo's wrappers of the real error
                cause = cause.inner_exception
            no_compiler = type(cause).__name__ in ("InvalidCxxCompiler", "CppCompileError")
            fix = "install a C++ compiler (apt-get install g++) or " if no_compiler else ""
            raise BitsweepError(f"inductor cannot compile the int8 model ({type(cause).__name__}: "
                                f"{first_line(cause)[:300]}); {fix}{_FIX}") from exc


def _pt2e():
    # torchao registers an Enum with torch's pytree the way torch 2.14 deprecates: a warning log line in
    # every program's output that no user can act on
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as exc:
        raise BitsweepError(f"the int8-compute path needs torchao ({exc}); pip install torchao==0.18.0, "
                            f"or {_FIX}") from None
    finally:
        pytree_log.setLevel(level)
    return prepare_pt2e, convert_pt2e, x86


def to_int8(model: nn.Module, layers: dict[str, QuantizedTensor],
            calibration: list[torch.Tensor] | None = None, *,
            input_size: tuple[int, ...] | None = None) -> Int8Module:
    """``convert_int8``'s graph compiled by inductor for batch 1, with the same record attributes plus
    ``compile_seconds``."""
    if input_size is None:
        input_size = tuple(calibration[0].shape[1:]) if calibration else model_input_size(model)
    graph = convert_int8(model, layers, calibration, input_size=input_size)
    result = Int8Module(graph)
    result.int8_exact, result.bn_folds, result.fp32_layers = graph.int8_exact, graph.bn_folds, graph.fp32_layers
    with TRACING.exclusive(), warnings.catch_warnings():  # compiling traces too (AOTAutograd uses torch.fx)
        warnings.simplefilter("ignore")  # inductor's notices, one per quantized layer
        start = time.perf_counter()
        result(torch.zeros((1, *input_size)))
        result.compile_seconds = time.perf_counter() - start
    return result


def convert_int8(model: nn.Module, layers: dict[str, QuantizedTensor],
                 calibration: list[torch.Tensor] | None = None, *,
                 input_size: tuple[int, ...] | None = None) -> torch.fx.GraphModule:
    """The fake-quantized ``model`` (left untouched) as a converted pt2e graph holding our int8 codes.

    Run as is, the graph computes the int8 model in float (dequantize, then float conv): the reference
    of what the int8 kernels compute, and what inductor compiles. ``calibration`` batches set the
    activation ranges; without them ranges come from synthetic inputs of ``input_size`` (C, H, W;
    default: the first calibration batch, else the model's own: see ``bitsweep.synthetic.input_size``).
    The graph carries ``int8_exact`` (quantized layer -> its codes are on int8 kernels unchanged; False
    means requantized per channel, lossy), ``fp32_layers`` (Conv/Linear layers computed in float: those
    not in ``layers``, weight-standardised ones, and any the quantizer has no pattern for) and
    ``bn_folds`` (layer -> the folded BatchNorm's factor ``gamma / sqrt(var + eps)``: its int8 codes are
    ours, negated where the factor is negative, with scale ``|s * factor|``).
    """
    prepare_pt2e, convert_pt2e, x86 = _pt2e()
    source = copy.deepcopy(model).eval()
    for parameter in source.parameters():
        parameter.requires_grad_(False)
    if input_size is None:
        input_size = tuple(calibration[0].shape[1:]) if calibration else model_input_size(source)
    example = torch.zeros((2, *input_size))  # batch 2: export keeps the batch size dynamic (1 is specialised)
    keep = {name for name, _ in quantizable_layers(source) if name not in layers}
    with TRACING.exclusive(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's and torchao's notices, one per op or layer
        graph = _export(source, example)
        _plain_sources(graph, source)
        _plain_ops(graph)
        keep |= _computed_weights(graph)
        _norms_read_shared_convs_apart(graph)
        folds = _batchnorm_factors(graph, layers)
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        _keep_in_float(quantizer, keep, x86)
        try:  # torchao reports graphs its patterns cannot take with several exception types
            prepared = prepare_pt2e(graph, quantizer)
            limits = _narrow_activations(prepared, _wide_layers(layers, weight_limit()))
            batches = calibration or [synthesize(source, input_size)]
            with torch.no_grad():
                for batch in batches:
                    prepared(batch)
            converted = convert_pt2e(prepared)
        except (ValueError, AssertionError, RuntimeError, TypeError, KeyError) as exc:
            raise BitsweepError(f"torchao's int8 quantizer cannot take {type(model).__name__} "
                                f"({type(exc).__name__}: {' '.join(first_line(exc).split())[:200] or 'no message'}); "
                                f"{_FIX}") from None
        converted.int8_exact = _install_weights(converted, layers, folds, limits)
        _add_zero_point_terms(converted)
        exact_weights = {name: _folded(layers[name], folds.get(name)) for name, exact in converted.int8_exact.items()
                         if not exact}  # the requantized layers' weights as the fake-quant model has them
        first = torch.cat(batches[:8])[:8]  # the first 8 images, however the batches split them
        _check_follows(unrounded_activations(converted, exact_weights), source, first, type(model).__name__)
    converted.bn_folds = {name: factor for name, factor in folds.items() if name in converted.int8_exact}
    converted.fp32_layers = tuple(name for name, _ in quantizable_layers(model) if name not in converted.int8_exact)
    return converted


def _export(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``model`` exported with a dynamic batch size; a failure names the innermost module it happened in."""
    inside, hooks = [], []

    def leave(module, args, output):
        inside.pop()

    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(lambda m, args, n=name: inside.append(n)))
        hooks.append(module.register_forward_hook(leave))
    try:
        batch = torch.export.Dim.AUTO
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    except Exception as exc:  # export reports untraceable code with many exception types
        where = f"module {inside[-1]!r}" if inside and inside[-1] else type(model).__name__
        raise BitsweepError(f"the int8-compute path cannot export {where} with torch.export "
                            f"({type(exc).__name__}: {' '.join(first_line(exc).split())[:200]}); {_FIX}") from None
    finally:
        for hook in hooks:
            hook.remove()


def _plain_sources(graph: torch.fx.GraphModule, model: nn.Module) -> None:
    """Record ops traced inside subclasses of Conv/Linear (timm's ``Conv2dSame``, ``Linear``) as from the
    base class: the quantizer finds its patterns by exact module type and would leave them in float. And
    record each module call apart, as ``name@call`` from its second call on (a block's one ``self.relu``
    after each conv; CoaT's convs shared by blocks), under the module's own name (``named_modules``, not
    the path it was called through): the quantizer takes all ops of one module as one pattern, and
    refuses the graph when that pattern has several outputs."""
    names = {id(module): name for name, module in model.named_modules()}
    paths = dict(model.named_modules(remove_duplicate=False))
    calls = {}
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if not stack:
            continue
        key, (path, kind) = list(stack.items())[-1]
        module = paths.get(path)
        base = next((b for b in QUANTIZABLE if isinstance(module, b)), None)
        if base is not None and type(module) is not base:
            kind = f"{base.__module__}.{base.__qualname__}"
        name = names.get(id(module), path)
        seen = calls.setdefault(name, [])
        if key not in seen:
            seen.append(key)
        stack[key] = (f"{name}@{seen.index(key)}" if seen.index(key) else name, kind)


def _plain_ops(graph: torch.fx.GraphModule) -> None:
    """Rewrite two ops the quantizer's patterns mistake: a convolution with string padding (``"same"``,
    ``"valid"``: ``aten.conv2d.padding``, which it refuses as not a conv2d) as one with numbers, behind an
    explicit pad where "same" is uneven; and an addition of the number 0 (fastvit's ``identity_out = 0``),
    which a conv + add pattern takes for a residual and asserts is a tensor, as nothing."""
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        if str(node.target) in _PADDED_CONV_OPS:
            x, weight, *given = node.args
            kernel = weight.meta["val"].shape[2:]
            ones = [1] * len(kernel)
            bias, stride, padding, dilation, groups = (*given, *(None, ones, "valid", ones, 1)[len(given):])
            total = [d * (k - 1) if padding == "same" else 0 for d, k in zip(dilation, kernel)]
            with graph.graph.inserting_before(node):
                if any(t % 2 for t in total):  # F.pad's order: last dimension first, left then right
                    pads = [p for t in reversed(total) for p in (t // 2, t - t // 2)]
                    x = graph.graph.call_function(torch.ops.aten.constant_pad_nd.default, (x, pads, 0.0))
                    x.meta = {k: v for k, v in node.meta.items() if k != "val"}
                    total = [0] * len(kernel)
                conv = getattr(torch.ops.aten, str(node.target).split(".")[1]).default
                plain = graph.graph.call_function(conv, (x, weight, bias, stride, [t // 2 for t in total],
                                                         dilation, groups))
            plain.meta = dict(node.meta)
            node.replace_all_uses_with(plain)
            graph.graph.erase_node(node)
        elif node.target is torch.ops.aten.add.Tensor and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            tensor = next((a for a, b in (node.args, node.args[::-1]) if isinstance(a, torch.fx.Node)
                           and isinstance(b, (int, float)) and b == 0), None)
            if tensor is not None and "val" in tensor.meta and tensor.meta["val"].dtype.is_floating_point:
                node.replace_all_uses_with(tensor)
                graph.graph.erase_node(node)
    graph.recompile()


def _norms_read_shared_convs_apart(graph: torch.fx.GraphModule) -> None:
    """Stop pt2e folding a BatchNorm into a conv whose output has other readers too: torchao's fold
    (``_fuse_conv_bn_``) does not check, and hands those readers the normalised output (CoAtNet's
    stem feeds a block's pre-norm and its shortcut). A norm reading a folded norm's output counts,
    since that output becomes the conv's (RepGhost's ``fusion_bn``). Such a norm reads a copy of the
    output instead, and stays a BatchNorm of its own; ``_batchnorm_factors`` then sees no fold either."""
    for node in list(graph.graph.nodes):
        source = _normalised(node)
        if source is not None and str(source.target) in _WEIGHT_OPS[:3] + _NORM_OPS and len(source.users) > 1:
            with graph.graph.inserting_after(source):
                copied = graph.graph.call_function(torch.ops.aten.clone.default, (source,))
            if "val" in source.meta:  # not the module stack: the copy is no part of the conv's pattern
                copied.meta["val"] = source.meta["val"]
            node.replace_input_with(source, copied)
    graph.recompile()


def _normalised(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node a BatchNorm node reads (what pt2e would fold it into when that is a conv); None for other nodes."""
    source = node.args[0] if node.op == "call_function" and str(node.target) in _NORM_OPS else None
    return source if isinstance(source, torch.fx.Node) else None


def _layer(node: torch.fx.Node) -> str | None:
    """The module a graph node was traced in (its qualified name, without ``_plain_sources``'s call)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0].partition("@")[0] if stack else None


def _batchnorm_factors(graph: torch.fx.GraphModule, layers: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Conv layer -> ``gamma / sqrt(var + eps)`` of the BatchNorm pt2e will fold into it (every BatchNorm
    applied straight to a conv's output), read from the graph's own arguments as pt2e reads them."""
    def constant(arg):
        return None if arg is None else operator.attrgetter(arg.target)(graph)

    folds = {}
    for node in graph.graph.nodes:
        source = _normalised(node)
        if source is None or str(source.target) not in _WEIGHT_OPS[:3]:
            continue
        if _layer(source) in layers:  # args: input, weight, bias, mean, var, [training,] momentum, eps
            gamma, var = constant(node.args[1]), constant(node.args[4])
            eps = node.args[7] if "legit" not in str(node.target) else node.args[6]
            factor = torch.rsqrt(var + eps)
            folds[_layer(source)] = factor if gamma is None else factor * gamma
    return folds


def _computed_weights(graph: torch.fx.GraphModule) -> set[str]:
    """Conv/Linear layers whose weight the forward computes from the parameter (timm's weight-standardised
    ``StdConv2d`` in NFNets and ResNetV2 stems): pt2e quantizes the computed weight, which no codes of ours
    describe, so these stay in float."""
    return {_layer(node) for node in graph.graph.nodes if node.op == "call_function"
            and str(node.target) in _WEIGHT_OPS and len(node.args) > 1 and node.args[1].op != "get_attr"}


def _keep_in_float(quantizer, keep: set[str], x86) -> None:
    """Leave the Conv/Linear layers in ``keep`` unquantized. ``set_module_name_qconfig(name, None)``
    does not: a conv + ReLU pattern spans two modules, fails the name filter, and the global config
    takes it; marking the layer's own node as annotated makes every pattern containing it skip."""
    annotate = quantizer.annotate

    def keeping(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for node in model.graph.nodes:
            if node.op == "call_function" and str(node.target) in _WEIGHT_OPS and _layer(node) in keep:
                x86._annotate_nodes_not_quantize(node)
        return annotate(model)

    quantizer.annotate = keeping


def _wide_layers(layers: dict[str, QuantizedTensor], limit: int) -> set[str]:
    """Layers whose int8 weights need more than +-``limit``: exact codes beyond it, or, where ``limit``
    is below 127, 8-bit weights that are requantized anyway (an affine zero point oneDNN cannot take),
    where +-127 keeps 8 bits. With VNNI (``limit`` 127) no layer is: activations keep 8 bits."""
    wide = set()
    for name, qt in layers.items():
        weight = int8_weight(qt)
        if weight is None or weight.zero_point.any():
            if qt.bits >= 8 and limit < 127:
                wide.add(name)
        elif int(weight.codes.abs().max()) > limit:
            wide.add(name)
    return wide


def _narrow_activations(prepared: torch.fx.GraphModule, wide: set[str]) -> dict[str, int]:
    """Give 7-bit activation ranges (0..127) to the inputs of ``wide`` layers, so that their int8 codes
    up to +-127 multiply without saturating on CPUs without VNNI. Returns layer -> weight limit (127)
    for each wide layer whose input observer was narrowed; the others keep ``weight_limit()``."""
    limits = {}
    for node in prepared.graph.nodes:
        observer = prepared.get_submodule(node.target) if node.op == "call_module" else None
        if getattr(observer, "qscheme", None) != torch.per_tensor_affine or observer.quant_min != 0:
            continue  # not an activation observer (weights are per channel, signed)
        readers = {_layer(user) for user in node.users
                   if user.op == "call_function" and str(user.target) in _WEIGHT_OPS and user.args[0] is node}
        if not readers & wide:
            continue
        setattr(prepared, node.target, type(observer)(dtype=observer.dtype, qscheme=observer.qscheme,
                                                       quant_min=0, quant_max=127))
        limits.update({name: 127 for name in readers & wide})
    return limits


def _weight_nodes(graph: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """Layer -> the ``dequantize_per_channel`` nodes of its int8 weight in a converted graph (one per call)."""
    found = {}
    for node in graph.graph.nodes:
        if node.op == "call_function" and str(node.target) in _WEIGHT_OPS and len(node.args) > 1:
            weight = node.args[1]
            if isinstance(weight, torch.fx.Node) and "dequantize_per_channel" in str(weight.target):
                found.setdefault(_layer(node), []).append(weight)
    return found


def int8_weights(graph: torch.fx.GraphModule) -> dict[str, Int8Weight]:
    """Layer -> the int8 weight a converted graph (``Int8Module.graph``) computes with: its kernel's
    constants, with the zero point ``_add_zero_point_terms`` applies (0 for most layers)."""
    zero_points = getattr(graph, "weight_zero_points", {})
    found = {}
    for name, nodes in _weight_nodes(graph).items():
        codes, scale, zero = (getattr(graph, arg.target) for arg in nodes[0].args[:3])
        found[name] = Int8Weight(codes, scale, zero_points.get(name, zero))
    return found


def _install_weights(graph: torch.fx.GraphModule, layers: dict[str, QuantizedTensor],
                     folds: dict[str, torch.Tensor], limits: dict[str, int]) -> dict[str, bool]:
    """Replace the observers' int8 weights by our codes (and BatchNorm factor) where they fit oneDNN
    (``_fits`` the layer's limit: ``limits``, else ``weight_limit()``), else by our dequantized weights
    requantized per channel to that limit. oneDNN takes zero point 0: a layer whose codes need one (8-bit
    affine codes) runs its codes alone, and ``_add_zero_point_terms`` adds the zero point's share. Sets
    ``graph.weight_zero_points`` (layer -> those zero points) and returns layer -> exact."""
    exact, zero_points = {}, {}
    for name, nodes in _weight_nodes(graph).items():
        qt, limit = layers[name], limits.get(name, weight_limit())
        column = (-1,) + (1,) * (qt.codes.dim() - 1)
        weight = int8_weight(qt)
        if weight is not None:
            weight = _signed(weight, folds.get(name, torch.ones(qt.codes.shape[0])))
        folded = _folded(qt, folds.get(name))
        for node in nodes:
            observed = Int8Weight(*(getattr(graph, arg.target) for arg in node.args[:3]))
            step = observed.scale.reshape(column)
            if not ((folded - observed.dequantize()).abs() <= step * 0.51 + folded.abs() * 1e-5).all():
                raise BitsweepError(f"layer {name!r}: pt2e's folded weight is not the fake-quant weight times its "
                                    f"BatchNorm factor (an unexpected fold); {_FIX}")
        exact[name] = weight is not None and _fits(weight.codes, limit)
        if not exact[name]:  # lossy: the fake-quant weight (BatchNorm folded) rounded to the widest fitting codes
            scale = folded.reshape(folded.shape[0], -1).abs().amax(1).div(limit).clamp_min(torch.finfo().tiny)
            codes = (folded / scale.reshape(column)).round().clamp(-limit, limit)
            weight = Int8Weight(codes, scale, torch.zeros_like(scale, dtype=torch.int32))
        elif weight.zero_point.any():
            zero_points[name] = weight.zero_point
        for node in nodes:
            for arg, value in zip(node.args[:3], (weight.codes.to(torch.int8), weight.scale.to(torch.float32),
                                                  torch.zeros_like(weight.zero_point, dtype=torch.int64))):
                setattr(graph, arg.target, value.contiguous())
    graph.weight_zero_points = zero_points
    return exact


def _signed(weight: Int8Weight, factor: torch.Tensor) -> Int8Weight:
    """``weight`` times a folded BatchNorm's per-channel ``factor``, as int8 codes with scale ``|s * factor|``:
    where the factor is negative, codes and zero point negated, or where a code is -128 (whose negation
    int8 lacks) complemented (``~c = -1 - c``, so ``~c - ~z = -(c - z)``)."""
    codes, zero = weight.codes.to(torch.int32), weight.zero_point.to(torch.int32)
    column = (-1,) + (1,) * (codes.dim() - 1)
    negative = factor < 0
    complement = negative & (codes.reshape(len(codes), -1).amin(1) == -128)
    negate = negative & ~complement

    def signed(value, shape):
        return torch.where(negate.reshape(shape), -value, torch.where(complement.reshape(shape), ~value, value))
    return Int8Weight(signed(codes, column), (weight.scale * factor).abs(), signed(zero, (-1,)))


def _fits(codes: torch.Tensor, limit: int) -> bool:
    """Whether int8 ``codes`` multiply exactly on oneDNN behind the activations that go with ``limit``:
    within +-``limit``, and -128 as well where it is 127 (VNNI's int32 sums, or 7-bit activations:
    2 * 127 * 128 fits int16)."""
    return int(codes.min()) >= (-128 if limit >= 127 else -limit) and int(codes.max()) <= limit


def _add_zero_point_terms(graph: torch.fx.GraphModule) -> None:
    """After each call of a layer in ``graph.weight_zero_points``, whose kernel multiplied the codes ``c``
    alone, add the zero point's share of ``(c - z) * s``: ``-z * s`` per output channel times the sum of
    the inputs that output reads, a channel sum per group then a window sum (``_window_sum``)."""
    aten = torch.ops.aten
    for node in list(graph.graph.nodes):
        name = _layer(node) if node.op == "call_function" and str(node.target) in _WEIGHT_OPS else None
        if name not in graph.weight_zero_points or "dequantize_per_channel" not in str(node.args[1].target):
            continue
        codes, scale = (getattr(graph, arg.target) for arg in node.args[1].args[:2])
        shift = -graph.weight_zero_points[name].to(torch.float32) * scale
        x, call = node.args[0], graph.graph.call_function
        with graph.graph.inserting_before(node.next):  # in order, after the layer's call
            if str(node.target) == "aten.linear.default":
                term = call(aten.mul.Tensor, (call(aten.sum.dim_IntList, (x, [-1], True)), _constant(graph, shift)))
            else:  # args: input, weight, bias, stride, padding, dilation, groups
                groups = node.args[6] if len(node.args) > 6 else 1
                if groups == 1:  # channels summed: [N, 1, ...]
                    x = call(aten.sum.dim_IntList, (x, [1], True))
                elif codes.shape[1] > 1:  # channels summed within each group: [N, groups, ...]
                    x = call(aten.sum.dim_IntList, (call(aten.unflatten.int, (x, 1, [groups, -1])), [2]))
                total, factor = _window_sum(graph, node, x, codes.shape[2:], groups)
                spatial = (1,) * (codes.dim() - 2)
                if groups in (1, codes.shape[0]):  # one sum for every output, or one per output (depthwise)
                    term = call(aten.mul.Tensor, (total, _constant(graph, (shift * factor).reshape(1, -1, *spatial))))
                else:  # [1, groups, outputs per group, 1...]
                    per_group = (shift * factor).reshape(1, groups, -1, *spatial)
                    spread = call(aten.mul.Tensor, (call(aten.unsqueeze.default, (total, 2)), _constant(graph, per_group)))
                    term = call(aten.flatten.using_ints, (spread, 1, 2))
            added = call(aten.add.Tensor, (node, term))
        node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
    graph.recompile()


def _window_sum(graph: torch.fx.GraphModule, conv: torch.fx.Node, x: torch.fx.Node, kernel: torch.Size,
                groups: int) -> tuple[torch.fx.Node, float]:
    """The sums of ``x`` (one channel per group) over each window ``conv`` reads, as a node and a factor
    to multiply it by: an average pool (which inductor fuses with the input's dequantization) times the
    window's size, or, where a pool cannot express the conv's windows (dilation, padding beyond half the
    kernel), a float conv with a ones kernel."""
    ones = [1] * len(kernel)
    stride, padding, dilation = (*conv.args[3:6], *(ones, [0] * len(kernel), ones)[len(conv.args[3:6]):])
    if list(kernel) == ones and list(stride) == ones:
        return x, 1.0
    if list(dilation) == ones and all(2 * p <= k for p, k in zip(padding, kernel)) and len(kernel) in (1, 2, 3):
        pool = getattr(torch.ops.aten, f"avg_pool{len(kernel)}d").default
        for axis in range(len(kernel)):  # one axis at a time: k + k reads per output rather than k * k
            if kernel[axis] > 1 or stride[axis] > 1:
                size, step, pad = ([value[axis] if a == axis else d for a, d in enumerate(default)]
                                   for value, default in ((kernel, ones), (stride, ones), (padding, [0] * len(kernel))))
                x = graph.graph.call_function(pool, (x, size, step, pad, False, True))
        return x, float(math.prod(kernel))
    weight = _constant(graph, torch.ones(groups, 1, *kernel))
    return graph.graph.call_function(conv.target, (x, weight, None, stride, padding, dilation, groups)), 1.0


def _constant(graph: torch.fx.GraphModule, value: torch.Tensor) -> torch.fx.Node:
    """A ``get_attr`` node of a new buffer holding ``value``, inserted where the graph inserts now."""
    target = f"zero_point_term_{len(list(graph.buffers()))}"
    graph.register_buffer(target, value.contiguous())
    return graph.graph.get_attr(target)


def unrounded_activations(graph: torch.fx.GraphModule,
                          weights: dict[str, torch.Tensor] | None = None) -> torch.fx.GraphModule:
    """A copy of a converted graph whose activations skip their quantize/dequantize pairs, and whose layers
    named in ``weights`` compute with those float weights instead of their int8 ones: with the fake-quant
    weights of the layers requantized (lossy), the int8 model then must compute the fake-quant model."""
    plain = copy.deepcopy(graph)
    for node in list(plain.graph.nodes):
        if node.op == "call_function" and "quantize_per_tensor" in str(node.target) \
                and "dequantize" not in str(node.target):
            for user in list(node.users):
                if "dequantize_per_tensor" in str(user.target):
                    user.replace_all_uses_with(node.args[0])
    for layer, nodes in _weight_nodes(plain).items():
        if layer in (weights or {}):
            target = f"exact_weight_{len(list(plain.buffers()))}"
            plain.register_buffer(target, weights[layer])
            for node in nodes:
                with plain.graph.inserting_before(node):
                    node.replace_all_uses_with(plain.graph.get_attr(target))
    plain.graph.eliminate_dead_code()
    plain.recompile()
    return plain


def _folded(qt: QuantizedTensor, factor: torch.Tensor | None) -> torch.Tensor:
    """The fake-quant weight with its BatchNorm factor folded in, as pt2e folds it."""
    weight = qt.dequantize().to(torch.float32)
    return weight if factor is None else weight * factor.reshape((-1,) + (1,) * (weight.dim() - 1))


def _check_follows(plain: torch.fx.GraphModule, model: nn.Module, batch: torch.Tensor, name: str) -> None:
    """Refuse a graph that, activation rounding and requantized weights aside (``plain``: see
    ``unrounded_activations``), does not compute ``model``: what a quantizer pattern got wrong (a fold
    into a conv whose output others read too, say) must not become a row."""
    with torch.no_grad():
        error = relative_error(plain(batch), model(batch))
    if not error <= FOLLOW_RTOL:
        raise BitsweepError(f"the int8 graph of {name} does not compute the fake-quant model even with exact "
                            f"activations (relative error {error:.1e} > {FOLLOW_RTOL:g}): a torchao pattern "
                            f"this model trips; {_FIX}")
