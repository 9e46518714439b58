"""Automatic partial precision: spend a size budget (e.g. 4 bits per weight on average) where it matters.

Each layer is measured data-free by its output SQNR: the signal-to-noise ratio of its output when
only its weight is quantized, on the inputs every data-free step reads (``bitsweep.calibration``: synthesised
to match the model's BatchNorm statistics, or a user's calibration images). The allocator
then picks the widths that minimise the summed relative output noise within the budget
(a knapsack, solved exactly). The result is an ordinary ``Policy(bits={...})`` for ``quantize_model``
and sweeps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from bitsweep.calibration import calibration_inputs, inputs_key
from bitsweep.errors import BitsweepError
from bitsweep.evaluate import run_with_hooks
from bitsweep.policy import Policy, quantizable_layers
from bitsweep.schemes import MAX_BITS, MIN_BITS, QuantSpec, check_bits, quantize_tensor
from bitsweep.synthetic import PerModelCache

_TABLES = PerModelCache()  # output SQNR tables on the default inputs


@dataclass
class Allocation:
    """The widths chosen per layer, the measurements behind them, and the average reached."""

    bits: dict[str, int]
    sqnr: dict[str, dict[int, float]]  # layer -> width -> output SQNR in dB
    average_bits: float
    budget: float

    def policy(self) -> Policy:
        """A policy that quantizes exactly these layers at exactly these widths."""
        return Policy(name=f"auto-{self.budget:g}b", include=tuple(self.bits), bits=dict(self.bits))


@torch.no_grad()
def output_sqnr(model: nn.Module, scheme: str, widths, granularity: str = "channel",
                group_size: int | None = None, names=None, inputs: torch.Tensor | None = None,
                ) -> dict[str, dict[int, float]]:
    """Layer -> width -> SQNR (dB) of the layer's output with only its weight quantized.

    ``inputs`` defaults to those recipes read (``calibration_inputs``); each layer sees its fp32 input
    from one pass of the fp32 model.
    """
    for width in widths:
        QuantSpec(scheme, width, granularity, group_size)
    names = frozenset(names) if names is not None else frozenset(n for n, _ in quantizable_layers(model))
    if inputs is None:  # the default inputs depend only on the weights and inputs_key: so does the table
        key = (scheme, tuple(widths), granularity, group_size, names, inputs_key())
        table = _TABLES.get(model, key, lambda: _measure(model, scheme, widths, granularity, group_size, names,
                                                         calibration_inputs(model)))
        return {name: dict(row) for name, row in table.items()}
    return _measure(model, scheme, widths, granularity, group_size, names, inputs)


def sensitivity(*args, **kwargs) -> dict[str, dict[int, float]]:
    """Deprecated name of ``output_sqnr`` ("sensitivity" in a sweep is the accuracy lost by one layer)."""
    warnings.warn("bitsweep.allocate.sensitivity is deprecated; use output_sqnr", DeprecationWarning, stacklevel=2)
    return output_sqnr(*args, **kwargs)


def _measure(model, scheme, widths, granularity, group_size, names, inputs) -> dict[str, dict[int, float]]:
    result, busy = {}, set()

    def measure(name, layer, args, output):
        if name in busy:  # the quantized weight's own call of the layer
            return
        busy.add(name)
        signal = output.double().square().sum().item()
        result[name] = {}
        for width in widths:
            weight = quantize_tensor(layer.weight, scheme, width, granularity, group_size).dequantize()
            params = {"weight": weight}
            noisy = torch.func.functional_call(layer, params, args)
            noise = (noisy - output).double().square().sum().item()
            result[name][width] = 10 * math.log10(max(signal, 1e-300) / max(noise, 1e-300))
        busy.discard(name)

    run_with_hooks(model, inputs, names, measure)
    return result


def allocate_bits(sqnr: dict[str, dict[int, float]], sizes: dict[str, int], budget: float,
                  max_units: int = 1 << 20) -> dict[str, int]:
    """Widths per layer with ``sum(size * bits) <= budget * sum(size)`` that minimise the summed relative
    output noise ``sum 10^(-SQNR/10)``.

    A multiple-choice knapsack solved by dynamic programming over the budget in units of the
    greatest common divisor of all layer costs (exact), or, past ``max_units`` units, of
    ``budget / max_units`` with costs rounded *up* (never over budget, optimal up to that
    rounding). Greedy widening is not enough: a layer may gain nothing from 3 bits and a lot from 6.
    """
    if not sqnr:
        return {}
    names = list(sqnr)
    total = sum(sizes[name] for name in names)
    narrowest = sum(sizes[name] * min(sqnr[name]) for name in names)
    if narrowest > budget * total * (1 + 1e-12):
        raise BitsweepError(f"a budget of {budget:g} bits per weight is below the narrowest width offered "
                            f"({min(min(t) for t in sqnr.values())}); raise the budget or offer narrower widths")
    cap = math.floor(budget * total + 1e-9)
    unit = math.gcd(*(sizes[name] * width for name in names for width in sqnr[name]))
    if cap // unit > max_units:
        unit = cap / max_units
    resolution = int(cap // unit)
    best = torch.zeros(resolution + 1, dtype=torch.float64)  # least noise within c units, layers so far
    choices = []
    for name in names:
        new = torch.full_like(best, math.inf)
        pick = torch.zeros(resolution + 1, dtype=torch.int64)
        for width, db in sorted(sqnr[name].items()):
            cost = math.ceil(sizes[name] * width / unit - 1e-9)
            if cost > resolution:
                continue
            candidate = torch.full_like(best, math.inf)
            candidate[cost:] = best[: resolution + 1 - cost] + 10 ** (-db / 10)
            better = candidate < new
            new = torch.where(better, candidate, new)
            pick = torch.where(better, torch.full_like(pick, width), pick)
        choices.append(pick)
        best = new
    if not math.isfinite(best[-1]):  # rounding costs up left no room: the narrowest widths still fit exactly
        return {name: min(sqnr[name]) for name in names}
    chosen, c = {}, resolution
    for name, pick in zip(reversed(names), reversed(choices)):
        width = int(pick[c])
        chosen[name] = width
        c -= math.ceil(sizes[name] * width / unit - 1e-9)
    return {name: chosen[name] for name in names}


def allocate(model: nn.Module, scheme: str, budget: float = 4.0, widths=(2, 3, 4, 5, 6, 8),
             granularity: str = "channel", group_size: int | None = None, policy=None) -> Allocation:
    """A per-layer width plan for ``model`` averaging at most ``budget`` bits per quantized weight.

    ``policy`` (as for ``quantize_model``) says which layers are quantized at all; the others
    stay fp32 and do not count towards the budget.
    """
    widths = tuple(sorted(set(widths)))
    if not widths:
        raise BitsweepError(f"no widths to choose from; give some from {MIN_BITS} to {MAX_BITS}")
    for width in widths:
        check_bits(width)
    layers = quantizable_layers(model)
    plan = Policy.parse(policy).plan([name for name, _ in layers], widths[0])
    sizes = {name: layer.weight.numel() for name, layer in layers if name in plan}
    table = output_sqnr(model, scheme, widths, granularity, group_size, names=sizes)
    missing = sorted(set(sizes) - set(table))
    if missing:
        raise BitsweepError(f"layers {', '.join(missing)} did not run on the calibration inputs; "
                            "keep them out with a policy exclude")
    bits = allocate_bits(table, sizes, budget)
    average = sum(sizes[n] * b for n, b in bits.items()) / max(sum(sizes.values()), 1)
    ordered = {name: bits[name] for name, _ in layers if name in bits}
    return Allocation(bits=ordered, sqnr=table, average_bits=average, budget=budget)
