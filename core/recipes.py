"""Recipes: data-free ways to quantize a model better than rounding each weight to its nearest level.

A recipe gets the fp32 model and what to quantize it to and returns what ``quantize_model``
returns: a fake-quantized copy whose ``quantized_layers`` hold the scheme's own codes and
scales, so the packed file and the kernels work unchanged. Recipes only ever move the scales
(clipping), the fp32 weights before rounding (folding, equalization), which of the scheme's levels
a weight rounds to (GPTQ, AdaRound) or the unquantized tensors after it (bias correction, channel
tuning); no recipe needs a real image. The inputs they measure on are ``calibration_inputs``:
synthesised to match the model's BatchNorm statistics, or a user's calibration images when given.

``Pipeline`` assembles the built-in recipes from the steps here and in ``bitsweep.equalize``.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod

import torch
from torch import nn

from bitsweep.adaround import adaround, reconstruction_units
from bitsweep.calibration import calibration_inputs, synthesised
from bitsweep.equalize import equalize, fold_batchnorm
from bitsweep.errors import BitsweepError
from bitsweep.evaluate import run_with_hooks
from bitsweep.gptq import error_feedback, input_moments
from bitsweep.policy import Policy, quantizable_layers
from bitsweep.quantize import quantize_layers
from bitsweep.schemes import (SMALLEST_SCALE, QuantizedTensor, QuantSpec, as_column, grouped_rows, quantize_tensor,
                              ungrouped)
from bitsweep.synthetic import batchnorms, is_natural
from bitsweep.tune import tune_channels

# Clipping search: shrink factors of each row's range tried first, then a finer step around each row's best.
_COARSE = torch.linspace(1.0, 0.24, 20).tolist()
_FINE = (-0.03, -0.02, -0.01, 0.01, 0.02, 0.03)


class Recipe(ABC):
    """How one named recipe quantizes a whole model, registered through ``register_recipes``."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def quantize(self, model: nn.Module, spec: QuantSpec, policy: Policy) -> nn.Module:
        """A quantized copy of ``model`` (left untouched) with ``quantized_layers``, as ``quantize_model`` returns."""


def clip_search(w: torch.Tensor, scheme: str, bits: int, granularity: str = "channel",
                group_size: int | None = None, p: float = 2.0) -> QuantizedTensor:
    """``quantize_tensor`` with each row's range shrunk to the factor that minimises the row's
    Lp rounding error (p=2: MSE), found by search through the scheme's own ``fit``/``encode``/``decode``.

    A shrunk range is ``fit`` on the row times the factor, so any scheme whose fit follows
    the row's extent (all three built-ins, and range-based plugins) gets clipped scales;
    the factor 1 is always tried, so no row ends up worse than with plain rounding.
    """
    naive = quantize_tensor(w, scheme, bits, granularity, group_size)  # validates, and is the factor-1 candidate
    if w.numel() == 0:
        return naive
    codec = naive.codec
    rows, pad = grouped_rows(w.detach().to(torch.float32), granularity, group_size)

    def error(scale, zero):
        decoded = codec.decode(codec.encode(rows, scale, zero, bits), scale, zero, bits)
        return decoded.sub_(rows).abs_().pow_(p).sum(dim=1)

    def candidate(factor):  # factor: a number or a [rows, 1] column
        scale, zero = codec.fit(rows * factor, bits)
        return as_column(scale).clamp_min(SMALLEST_SCALE), as_column(zero)

    best_scale, best_zero = as_column(naive.scale), as_column(naive.zero_point)
    best_error = error(best_scale, best_zero)
    best_factor = torch.ones_like(best_error)

    def consider(factor, factors):
        nonlocal best_scale, best_zero, best_error, best_factor
        scale, zero = candidate(factor)
        err = error(scale, zero)
        better = err < best_error
        best_error = torch.where(better, err, best_error)
        best_factor = torch.where(better, factors, best_factor)
        best_scale = torch.where(better[:, None], scale, best_scale)
        best_zero = torch.where(better[:, None], zero, best_zero)

    for factor in _COARSE[1:]:
        consider(factor, torch.full_like(best_factor, factor))
    centre = best_factor.clone()
    for step in _FINE:
        factors = (centre + step).clamp(0.05, 1.0)
        consider(factors[:, None], factors)
    codes = ungrouped(codec.encode(rows, best_scale, best_zero, bits), w.shape, pad).to(naive.codes.dtype)
    shape = naive.scale.shape
    return dataclasses.replace(naive, codes=codes, scale=best_scale.reshape(shape),
                               zero_point=best_zero.reshape(shape).to(torch.int32))


def _channel_mean(layer: nn.Module, out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean of ``out`` over everything but the output channel (last dim of a Linear's, dim 1 of a conv's)."""
    dim = out.dim() - 1 if isinstance(layer, nn.Linear) else 1
    return out.transpose(dim, -1).reshape(-1, out.shape[dim]).mean(dim=0), dim


def _layer_delta(layer: nn.Module, x: torch.Tensor, delta_weight: torch.Tensor) -> torch.Tensor:
    """``layer``'s mean output change on ``x`` when its weight moves by ``delta_weight`` (its own forward,
    so timm's padding variants count)."""
    params = {"weight": delta_weight}
    if getattr(layer, "bias", None) is not None:
        params["bias"] = torch.zeros_like(layer.bias)
    return _channel_mean(layer, torch.func.functional_call(layer, params, (x,)))[0]


class _Shifts:
    """Applies a layer's output shift where it can live: the layer's bias, or else the running
    mean of the BatchNorm that reads its output next (``BN(y + d)`` with mean ``m + d`` is ``BN(y)``)."""

    def __init__(self, model: nn.Module):
        self.applied: dict[str, torch.Tensor] = {}
        self._pending: dict = {}
        self._hooks = [m.register_forward_pre_hook(self._before_norm) for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]

    def remove(self, layer: nn.Module, name: str, output: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Take ``shift`` out of ``layer``'s output from now on; returns the output as corrected."""
        self._pending.clear()
        if getattr(layer, "bias", None) is None:
            self._pending.update(name=name, output=output, shift=shift)  # for the norm, if one reads it next
            return output
        layer.bias.sub_(shift)
        self.applied[name] = shift
        _, dim = _channel_mean(layer, output[:1])
        shape = [1] * output.dim()
        shape[dim] = -1
        return output - shift.reshape(shape)

    def _before_norm(self, norm, args):
        if self._pending and args[0] is self._pending["output"]:
            norm.running_mean.add_(self._pending["shift"])
            self.applied[self._pending["name"]] = self._pending["shift"]
            self._pending.clear()

    def close(self):
        for hook in self._hooks:
            hook.remove()


@torch.no_grad()
def correct_bias(reference: nn.Module, quantized: nn.Module, inputs: torch.Tensor,
                 sequential: bool = False) -> dict[str, torch.Tensor]:
    """DFQ's bias correction: remove each quantized layer's expected output shift; returns layer -> shift.

    Expectations are taken over ``inputs`` (the recipes pass ``calibration_inputs``). By
    default each layer's own shift E[(W_q - W) x] with its fp32 input x, as DFQ; ``sequential``
    instead compares each layer's output mean in the (already corrected) quantized model with
    the fp32 model's, which also removes the shift that quantized layers upstream pass on.
    A layer with neither a bias nor a BatchNorm reading its output is left as it is.
    """
    records = quantized.quantized_layers
    modules = dict(quantized.named_modules())
    shifts = _Shifts(quantized)
    try:
        if sequential:
            means = {}
            run_with_hooks(reference, inputs, records,
                            lambda name, layer, args, out: means.__setitem__(name, _channel_mean(layer, out)[0]))
            run_with_hooks(quantized, inputs, records, lambda name, layer, args, out: shifts.remove(
                layer, name, out, _channel_mean(layer, out)[0] - means[name]))
        else:
            deltas, busy = {}, set()

            def measure(name, layer, args, out):
                if name not in busy:  # not the delta's own call of the layer
                    busy.add(name)
                    deltas[name] = _layer_delta(layer, args[0], modules[name].weight - layer.weight)
                    busy.discard(name)

            run_with_hooks(reference, inputs, records, measure)

            def apply(name, layer, args, out):  # a replay on the quantized model, so each shift finds its norm
                shifts.remove(layer, name, out, deltas[name])

            run_with_hooks(quantized, inputs, records, apply)
    finally:
        shifts.close()
    return shifts.applied


class Pipeline(Recipe):
    """A recipe made of optional steps, in this order: fold BatchNorm, equalize, round (plain or with
    an Lp clipping search; then, on that grid, GPTQ with ``error_feedback`` or AdaRound with
    ``learned_rounding``: ``True``, or a dict of ``adaround.learn_rounding``'s keyword options; layer by
    layer, or with ``blocks`` each residual block's layers together, BRECQ), correct
    biases (``bias_correction``: ``"layer"`` or ``"sequential"``), tune the channel parameters (``tune``;
    only for models with BatchNorm: without it the synthetic inputs are noise)."""

    def __init__(self, name: str, description: str, *, fold: bool = False, equalize: bool = False,
                 clip_p: float | None = None, error_feedback: bool = False, learned_rounding: bool | dict = False,
                 blocks: bool = False, bias_correction: str | None = None, tune: bool = False):
        if bias_correction not in (None, "layer", "sequential"):
            raise BitsweepError(f"recipe {name!r}: bias_correction {bias_correction!r} is not understood; "
                                "use None, 'layer' or 'sequential'")
        self.learned_rounding = dict(learned_rounding) if isinstance(learned_rounding, dict) else (
            {} if learned_rounding else None)
        if error_feedback and self.learned_rounding is not None:
            raise BitsweepError(f"recipe {name!r}: error_feedback and learned_rounding each choose the codes "
                                "from the nearest levels; use one of them")
        self.name, self.description = name, description
        self.fold, self.equalize = fold or equalize, equalize
        self.clip_p, self.error_feedback, self.bias_correction = clip_p, error_feedback, bias_correction
        self.tune, self.blocks = tune, blocks

    def rounding(self, w, scheme, bits, granularity, group_size):
        if self.clip_p is None:
            return quantize_tensor(w, scheme, bits, granularity, group_size)
        return clip_search(w, scheme, bits, granularity, group_size, self.clip_p)

    def quantize(self, model, spec, policy):
        work = copy.deepcopy(model).eval()
        if self.fold:
            bounds = fold_batchnorm(work)
            if self.equalize:
                quantized_names = set(policy.plan([name for name, _ in quantizable_layers(work)], spec.bits))
                equalize(work, spec.granularity, bounds, quantized_names)
        needs_fp32 = self.bias_correction or self.tune or self.learned_rounding is not None
        target = copy.deepcopy(work) if needs_fp32 else work  # work stays fp32
        if self.error_feedback:
            rounding = self._with_feedback(model, work, target, spec, policy)
        elif self.learned_rounding is not None:
            rounding = self._learned(model, work, target, spec, policy)
        else:
            rounding = self.rounding
        quantized = quantize_layers(target, spec, policy, rounding)
        if self.bias_correction and quantized.quantized_layers:
            # Those of the input model: folding keeps the function, not the norms' statistics.
            correct_bias(work, quantized, calibration_inputs(model), self.bias_correction == "sequential")
        if self.tune and quantized.quantized_layers and batchnorms(model):  # else no data to tune on
            tune_channels(work, quantized, calibration_inputs(model))
        return quantized

    def _with_feedback(self, model, work, target, spec, policy):
        """This recipe's rounding followed by GPTQ, for ``target``'s layers: their input statistics are
        ``work``'s (fp32, after folding) on ``model``'s calibration inputs (natural images' for a stem that
        would read synthesised photos)."""
        inputs = calibration_inputs(model)
        moments = input_moments(work, inputs, policy.plan([name for name, _ in quantizable_layers(work)], spec.bits),
                                image_prior=synthesised() and is_natural(tuple(inputs.shape[1:])))
        layer_of = {id(layer.weight): name for name, layer in quantizable_layers(target)}
        return lambda w, *args: error_feedback(w, moments[layer_of[id(w)]], self.rounding(w, *args))

    def _learned(self, model, work, target, spec, policy):
        """This recipe's rounding followed by AdaRound, for ``target``'s layers as ``quantize_layers`` reaches
        them in order: each unit's (a layer, or with ``blocks`` a block's layers together) input comes from
        ``target`` with the units before it quantized, its target output from ``work`` (fp32, after folding),
        on ``model``'s calibration inputs. A unit is learned when its first layer is reached."""
        inputs = calibration_inputs(model)
        layer_of = {id(layer.weight): name for name, layer in quantizable_layers(target)}
        plan = policy.plan(list(layer_of.values()), spec.bits)
        units = reconstruction_units(target, plan) if self.blocks else {name: [name] for name in plan}
        unit_of = {name: unit for unit, names in units.items() for name in names}
        learned = {}

        def rounding(w, scheme, bits, granularity, group_size):
            name = layer_of[id(w)]
            if name not in learned:
                unit = unit_of[name]
                starts = {member: self.rounding(target.get_submodule(member).weight, scheme, plan[member],
                                                granularity, group_size) for member in units[unit]}
                learned.update(adaround(work, target, unit, inputs, starts, **self.learned_rounding))
            return learned.pop(name)

        return rounding
