"""Learned rounding (AdaRound, Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization") driven by synthetic inputs instead of data.

Rounding to the nearest level minimises each weight's own error; what matters is the layer's output,
where the errors of a row add up. AdaRound learns, for every weight, whether to take the level just
below it or the one just above, so that the layer's output stays close to fp32's: a continuous variable
``V`` per weight interpolates between the two levels through a rectified sigmoid ``h(V)``, trained with
Adam on the output error plus a regulariser that drives ``h`` to 0 or 1 (its exponent annealed from
20 to 2 so that the choice hardens gradually). The grid does not move — scales and zero points are those
plain rounding or a clipping search chose — so the codes stay the scheme's own and packed files and
kernels are unchanged.

A layer's errors also meet those of the layers after it in its residual block (a bottleneck's 1 x 1
expansion, depthwise conv and projection). BRECQ (Li et al. 2021, "Pushing the Limit of Post-Training
Quantization by Block Reconstruction") learns the roundings of a block's layers together, on the
block's output: the unit of ``reconstruction_units``. Units are done in model order, each one's input
taken from the model whose earlier units are already quantized and its target from the fp32 model, so
each unit also makes up for the errors upstream (AdaRound's and BRECQ's "quantized input" setting). The
inputs are ``calibration.calibration_inputs``: synthesised to match the model's BatchNorm statistics, or
a user's calibration images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import torch
from torch import nn

from bitsweep.evaluate import run_with_hooks
from bitsweep.schemes import QuantizedTensor, as_column, grouped_rows, ungrouped

ITERATIONS = 500  # Adam steps per layer
BATCH = 8  # inputs per step (all of them when there are fewer)
SAMPLES = 2  # input vectors a layer needs per weight of a row to learn: fewer, and it would fit the synthetic inputs
POSITIONS = 4096  # output positions a step needs at most: layers on large feature maps take fewer inputs per step
LR = 1e-2  # the paper's 1e-3 is for 10,000 steps: over a few hundred, V barely leaves its start
REGULARIZATION = 0.01  # lambda, the paper's
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed linearly from the first to the second
WARMUP = 0.2  # fraction of the steps before the regulariser is switched on
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h reaches 0 and 1 at finite V

log = logging.getLogger(__name__)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``: the fraction of the way from the lower level to
    the upper one; stretched past [0, 1] so that the choice can become exact, with gradient left inside."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


@dataclasses.dataclass
class Neighbours:
    """The two levels of a quantized weight tensor's grid around each weight, in the weight's shape. Where a
    weight has no level on one side (clipped beyond the range, or a scheme whose levels do not grow with the
    code) both are its nearest level, and its code does not move."""

    low_codes: torch.Tensor
    high_codes: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    fraction: torch.Tensor  # where the weight lies between the two, 0 at the lower one

    def choose(self, up: torch.Tensor) -> torch.Tensor:
        return torch.where(up, self.high_codes, self.low_codes)


def neighbours(w: torch.Tensor, start: QuantizedTensor) -> Neighbours:
    """The levels of ``start``'s grid just below and just above each weight of ``w``: its nearest level (from
    ``start``, rounded to nearest) and the code one step towards ``w``, decoded by the scheme itself. On a
    uniform grid these are ``floor`` and ``ceil`` of ``w / s``; on pow2's they are the two nearest powers."""
    codec, bits = start.codec, start.bits
    rows, pad = grouped_rows(w.detach().to(torch.float32), start.granularity, start.group_size)
    nearest, _ = grouped_rows(start.codes.to(torch.int32), start.granularity, start.group_size)
    scale, zero = as_column(start.scale), as_column(start.zero_point)

    def level(codes):
        return codec.decode(codes.clone(), scale, zero, bits)  # a copy: decode may work in place

    at = level(nearest)
    up = at <= rows
    other = torch.where(up, nearest + 1, nearest - 1).clamp_(start.qmin, start.qmax)
    low_codes, high_codes = torch.where(up, nearest, other), torch.where(up, other, nearest)
    low, high = level(low_codes), level(high_codes)
    between = (low <= rows) & (rows <= high) & (low < high)
    low_codes, high_codes = torch.where(between, low_codes, nearest), torch.where(between, high_codes, nearest)
    low, high = torch.where(between, low, at), torch.where(between, high, at)
    fraction = torch.where(between, (rows - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny), 0)
    return Neighbours(*(ungrouped(t, w.shape, pad) for t in (low_codes, high_codes, low, high, fraction)))


def learn_rounding(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   starts: dict[str, QuantizedTensor], *, iterations: int = ITERATIONS, batch: int = BATCH,
                   lr: float = LR, regularization: float = REGULARIZATION, seed: int = 0) -> dict[str, QuantizedTensor]:
    """``starts``' codes for the weights of ``module``'s named submodules (``""``: ``module`` itself, a layer),
    each moved to whichever of its two neighbouring levels makes ``module``'s outputs on ``inputs`` closest to
    ``targets``: one layer (AdaRound) or, learned together, the layers of a block (BRECQ). The module runs its
    own forward (so timm's padding variants, activations and residual adds count) with everything else as it
    is. Each step takes ``batch`` inputs, or as many as hold ``POSITIONS`` output positions when that is fewer
    (at least one). A layer whose rows hold more weights than the inputs hold output positions per ``SAMPLES``
    (a classifier on a few synthetic images) keeps its ``starts`` codes: their rounding is under-determined and
    would be fitted to those inputs; in a block, the other layers learn theirs. Seeded: the same arguments give
    the same codes."""
    layers = {name: module.get_submodule(name) for name in starts}
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        channel = targets.dim() - 1 if isinstance(module, nn.Linear) else 1
    else:  # a block: a conv net's feature maps, else tokens
        channel = 1 if targets.dim() == 4 else targets.dim() - 1
    positions = targets[0].numel() // max(targets.shape[channel], 1)
    learnable = [name for name, layer in layers.items()
                 if layer.weight.numel() and len(inputs) * positions >= SAMPLES * layer.weight[0].numel()]
    if not learnable or iterations < 1:
        return dict(starts)
    grids = {name: neighbours(layers[name].weight.detach(), starts[name]) for name in learnable}
    gaps = {name: (grid.high - grid.low).to(layers[name].weight.dtype) for name, grid in grids.items()}
    vs = {}
    for name, grid in grids.items():
        p = ((grid.fraction - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)  # h(V) starts at the fraction
        vs[name] = torch.log(p / (1 - p)).requires_grad_(True)
    batch = max(1, min(batch, len(inputs), POSITIONS // positions))
    warm = int(WARMUP * iterations)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(list(vs.values()), lr=lr)
    start_time = time.perf_counter()
    with torch.enable_grad():  # quantize_layers rounds under no_grad
        for step in range(iterations):
            index = torch.randperm(len(inputs), generator=generator)[:batch]
            hs = {name: rectified_sigmoid(v) for name, v in vs.items()}
            weights = {_parameter(name): grids[name].low + hs[name] * gaps[name] for name in hs}
            out = torch.func.functional_call(module, weights, (inputs[index],))
            loss = (out - targets[index]).square().sum(channel).mean()
            if step >= warm:
                beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (step - warm) / max(iterations - warm, 1))
                loss = loss + regularization * sum((1 - (2 * h - 1).abs().pow(beta)).sum() for h in hs.values())
            grads = torch.autograd.grad(loss, list(vs.values()))  # no other tensor's gradient
            for v, grad in zip(vs.values(), grads):
                v.grad = grad
            optimizer.step()
    log.debug("learned rounding of %d layers: %d steps in %.2f s", len(vs), iterations,
              time.perf_counter() - start_time)
    with torch.no_grad():
        return starts | {name: dataclasses.replace(starts[name], codes=grids[name].choose(rectified_sigmoid(v) >= 0.5)
                                                   .to(starts[name].codes.dtype)) for name, v in vs.items()}


def _parameter(name: str) -> str:
    """The weight's key for ``functional_call`` on the module holding the named submodule."""
    return f"{name}.weight" if name else "weight"


class _Seen(Exception):
    """Stops a pass once the module of interest has run: the layers after it are not needed."""


def unit_input_output(model: nn.Module, inputs: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The named module's input and output on its first call in an eval pass of ``model``, which stops there
    (``None`` if the pass never calls it, or calls it with more than one input: a block whose forward needs
    more than the tensor it transforms is not reconstructed)."""
    seen = []

    def keep(_, module, args, output):
        seen.append((args[0].detach().clone(), output.detach().clone()) if len(args) == 1 and
                    isinstance(output, torch.Tensor) else None)
        raise _Seen

    with torch.no_grad(), contextlib.suppress(_Seen):
        run_with_hooks(model, inputs, {name}, keep)
    return seen[0] if seen else None


def reconstruction_units(model: nn.Module, names) -> dict[str, list[str]]:
    """The named layers grouped into the units block reconstruction learns together, in model order: each
    block -- a module listed in an ``nn.Sequential`` or ``nn.ModuleList`` that is not itself one, as timm
    lists residual blocks (``blocks.1.0``, ``layer2.1``, ``stages.0.blocks.2``) -- with the named layers
    inside it; a layer in no block (a stem, a head) is a unit alone. Unit name -> layer names."""
    containers = (nn.Sequential, nn.ModuleList)
    modules = dict(model.named_modules())  # "" is the model: the parent of a name without a dot
    blocks = [name for name, module in modules.items() if name and not isinstance(module, containers)
              and isinstance(modules[name.rpartition(".")[0]], containers)]
    units: dict[str, list[str]] = {}
    for name in names:
        block = next((b for b in blocks if name == b or name.startswith(b + ".")), name)
        units.setdefault(block, []).append(name)
    return units


def adaround(reference: nn.Module, quantized: nn.Module, unit: str, inputs: torch.Tensor,
             starts: dict[str, QuantizedTensor], **options) -> dict[str, QuantizedTensor]:
    """``starts``' codes for the layers of ``unit`` (a layer, or a block and the named layers in it) learned
    so that, fed what ``quantized`` (its earlier units already quantized) gives it, the unit reproduces what
    ``reference``'s fp32 unit outputs in ``reference``. ``options`` are ``learn_rounding``'s."""
    fp32 = unit_input_output(reference, inputs, unit)
    fed = unit_input_output(quantized, inputs, unit)
    if fp32 is None or fed is None:  # a unit the forward pass never reaches keeps its nearest levels
        return dict(starts)
    inside = {name[len(unit) + 1:] if name != unit else "": start for name, start in starts.items()}
    learned = learn_rounding(quantized.get_submodule(unit), fed[0], fp32[1], inside, **options)
    return {f"{unit}.{name}" if name else unit: qt for name, qt in learned.items()}
