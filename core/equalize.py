"""fp32 rewrites before rounding: BatchNorm folding and cross-layer equalization (DFQ, Nagel et al. 2019).

Both keep the timm architecture, so a packed file still rebuilds the model: a folded
BatchNorm stays in place as the identity plus its shift (weight 1, mean 0, variance
``1 - eps``, which ``rsqrt(var + eps)`` turns into exactly 1). Which layer feeds which
comes from a torch.fx trace; a model that does not trace is left as it is.
"""

from __future__ import annotations

import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import fx, nn

from bitsweep.synthetic import is_batchnorm

# A ReLU6 channel counts as never clipping when its pre-activation mean + this many stds stays below 6:
# real activations are heavy-tailed (on EfficientNet-Lite0 photos even 8 stds changed 3 % of decisions).
_SIGMAS = 16.0
_PASSES = 4  # equalization sweeps over all pairs (per-tensor scales): DFQ's iteration converges in a few
_SCALE_LIMIT = 1e3


def _trace(model: nn.Module) -> fx.Graph | None:
    """The model's dataflow with timm's composite layers (BatchNormAct2d, Conv2dSame...) as leaves."""
    leaves = tuple(get_notrace_modules())

    class Tracer(fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=tuple(get_notrace_functions()))

        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    try:
        return Tracer().trace(model)
    except Exception:  # dynamic control flow: no rewrite is safe without the graph
        return None


def _module(model: nn.Module, node) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return model.get_submodule(node.target)
    return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fold every BatchNorm2d that alone reads a Conv2d's output into that conv's weight, in place.

    The norm keeps its place (and its activation, for timm's BatchNormAct2d) as ``x + shift``.
    Returns norm name -> per-channel upper bound of its output (mean + 16 std), which
    equalization needs to keep ReLU6 exact.
    """
    graph = _trace(model)
    bounds = {}
    if graph is None:
        return bounds
    for node in graph.nodes:
        norm, conv = _module(model, node), _module(model, node.args[0] if node.args else None)
        if not (is_batchnorm(norm) and norm.affine and isinstance(conv, nn.Conv2d) and len(node.args[0].users) == 1):
            continue  # a non-affine norm has no bias to hold the shift
        std = torch.sqrt(norm.running_var + norm.eps)
        gamma, beta = norm.weight.clone(), norm.bias.clone()
        factor = gamma / std
        bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
        shift = (bias - norm.running_mean) * factor + beta
        conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
        if conv.bias is not None:
            conv.bias.zero_()
        norm.weight.fill_(1.0)
        norm.bias.copy_(shift)
        norm.running_mean.zero_()
        norm.running_var.copy_(_unit_variance(norm.eps, norm.running_var))
        bounds[node.target] = beta + _SIGMAS * gamma.abs()
    return bounds


def _unit_variance(eps: float, like: torch.Tensor) -> torch.Tensor:
    """A variance v with ``rsqrt(v + eps) == 1`` exactly in the norm's dtype."""
    one = torch.ones((), dtype=like.dtype)
    v = one - eps
    while v + eps != one:
        v = torch.nextafter(v, one if v + eps < one else -one)
    return v.expand_as(like)


def _positive_homogeneous(act: nn.Module) -> str | None:
    """'linear' or 'relu' for activations that commute with positive scaling, 'relu6' for ReLU6."""
    if isinstance(act, (nn.Identity, nn.Dropout)):
        return "linear"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.ReLU6):
        return "relu6"
    return None


def _pairs(model: nn.Module, graph: fx.Graph, bounds: dict) -> list[tuple[str, str | None, str, str]]:
    """(conv1, folded norm or None, conv2, activation) for every conv1 -> [folded norm] -> [ReLU/ReLU6]
    -> conv2 chain where each output on the way has one reader and conv2 reads all of conv1's channels."""
    pairs = []
    for node in graph.nodes:
        second = _module(model, node)
        if not isinstance(second, nn.Conv2d) or not node.args:
            continue
        chain, cur = [], node.args[0]  # modules between the two convs, last first
        while (m := _module(model, cur)) is not None and not isinstance(m, nn.Conv2d) and len(cur.users) == 1:
            chain.append((cur.target, m))
            cur = cur.args[0]
        first = _module(model, cur)
        if not isinstance(first, nn.Conv2d) or len(cur.users) != 1:
            continue
        kinds, norm = [], None  # activation kinds in forward order, with "norm" where the norm sits
        for name, m in reversed(chain):
            if is_batchnorm(m):
                norm = name if norm is None and name in bounds else "?"
                kinds += ["norm", _positive_homogeneous(getattr(m, "act", nn.Identity()))]
            else:
                kinds.append(_positive_homogeneous(m))
        nonlinear = [k for k in kinds if k not in ("linear", "norm")]
        if norm == "?" or None in kinds or len(nonlinear) > 1:
            continue
        act = nonlinear[0] if nonlinear else "linear"
        after_norm = [k for k in kinds[kinds.index("norm") + 1:] if k != "linear"][:1] if norm else []
        if act == "relu6" and after_norm != ["relu6"]:
            continue  # ReLU6 is exact only where the norm's statistics show it never clips
        depthwise = second.groups == second.in_channels == second.out_channels and second.groups > 1
        if first.groups != 1 and first.groups != first.out_channels:
            continue
        if (second.groups != 1 and not depthwise) or second.in_channels != first.out_channels:
            continue
        pairs.append((cur.target, norm, node.target, act))
    return pairs


def _input_ranges(conv: nn.Conv2d) -> torch.Tensor:
    """Max |weight| per input channel (per row for a depthwise conv, whose rows are its inputs)."""
    w = conv.weight.detach().abs()
    if conv.groups > 1:
        return w.flatten(1).amax(dim=1)
    return w.transpose(0, 1).flatten(1).amax(dim=1)


@torch.no_grad()
def equalize(model: nn.Module, granularity: str, bounds: dict[str, torch.Tensor], names: set[str]) -> int:
    """Cross-layer equalization on a BatchNorm-folded model, in place; returns the number of pairs found.

    Channel i of conv1 is divided by s_i and input channel i of conv2 multiplied by it, which
    leaves the function unchanged through ReLU (and ReLU6 where its statistics show it never
    clips). Per-tensor scales get DFQ's ``s = sqrt(r1 / r2)``, balancing both layers' ranges;
    per-channel and group scales are blind to conv1's row scaling, so ``s`` equalizes conv2's
    input-channel ranges alone. Only pairs whose conv2 is in ``names`` (quantized) are touched.
    """
    graph = _trace(model)
    if graph is None:
        return 0
    pairs = [p for p in _pairs(model, graph, bounds) if p[2] in names]
    bounds = {key: value.clone() for key, value in bounds.items()}
    per_tensor = granularity == "tensor"
    for _ in range(_PASSES if per_tensor else 1):
        for first_name, norm_name, second_name, act in pairs:
            first, second = model.get_submodule(first_name), model.get_submodule(second_name)
            depthwise = second.groups > 1
            if depthwise and not per_tensor:
                continue  # a depthwise conv's rows are its input channels: per-row scales undo any s
            r1 = first.weight.abs().flatten(1).amax(dim=1)
            r2 = _input_ranges(second)
            live = (r1 > 0) & (r2 > 0)
            if not live.any():
                continue
            if per_tensor:
                s = torch.sqrt(r1 / r2)
            else:
                s = torch.exp(torch.log(r2[live]).mean()) / r2
            s = torch.where(live, s, torch.ones_like(s)).clamp(1 / _SCALE_LIMIT, _SCALE_LIMIT)
            if act == "relu6":
                hi = bounds[norm_name]
                s = torch.where(hi <= 6, torch.maximum(s, hi / 6), torch.ones_like(s))
                s = torch.where(s > 0, s, torch.ones_like(s))
            _rescale(model, first, norm_name, second, s)
            if norm_name is not None:
                bounds[norm_name] /= s
    return len(pairs)


def _rescale(model, first: nn.Conv2d, norm_name: str | None, second: nn.Conv2d, s: torch.Tensor) -> None:
    first.weight.div_(s.reshape(-1, 1, 1, 1))
    if first.bias is not None:
        first.bias.div_(s)
    if norm_name is not None:
        model.get_submodule(norm_name).bias.div_(s)
    if second.groups > 1:
        second.weight.mul_(s.reshape(-1, 1, 1, 1))
    else:
        second.weight.mul_(s.reshape(1, -1, 1, 1))

