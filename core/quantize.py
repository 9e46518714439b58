"""The quantize step: fake-quantize every Conv/Linear weight of a model under a precision policy."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bitsweep.allocate import allocate
from bitsweep.calibration import calibrating
from bitsweep.errors import BitsweepError
from bitsweep.policy import QUANTIZABLE, Policy, quantizable_layers
from bitsweep.registry import get_registry
from bitsweep.schemes import QuantizedTensor, QuantSpec, quantize_tensor
from bitsweep.synthetic import SyntheticSettings, using

__all__ = ["QUANTIZABLE", "Policy", "quantizable_layers", "quantize_layers", "quantize_model"]

def quantize_model(model: nn.Module, scheme: str, bits: int, granularity: str = "channel",
                   policy: Policy | str | dict | None = None, group_size: int | None = None,
                   recipe: str | None = None, synthetic: SyntheticSettings | dict | None = None,
                   calibration: torch.Tensor | None = None) -> nn.Module:
    """A fake-quantized copy of ``model``; the input is left untouched.

    The copy's ``quantized_layers`` maps each quantized layer's name to its
    ``QuantizedTensor`` (codes and scales), which the pack step stores.
    ``recipe`` names a registered recipe (``bitsweep.recipes()``); ``None`` rounds each weight
    to its nearest level. A policy with ``allocate`` is resolved here into the widths
    ``bitsweep.allocate`` picks for an average of ``bits``. ``synthetic`` (``SyntheticSettings`` or a
    dict of its fields) says how many synthetic images the recipe and ``allocate`` use, optimised how long;
    ``calibration`` (the model's preprocessed inputs, [N, C, H, W]) gives them real images instead.
    """
    spec = QuantSpec(scheme, bits, granularity, group_size)  # fail on bad arguments before copying anything
    policy = Policy.parse(policy)
    if synthetic is not None and calibration is not None:
        raise BitsweepError("quantize_model takes synthetic settings or calibration images, not both: "
                            "with calibration images nothing is synthesised")
    with using(SyntheticSettings.parse(synthetic)), calibrating(calibration):
        if policy.allocate:
            chosen = allocate(model, scheme, bits, granularity=granularity, group_size=group_size,
                              policy=policy.model_copy(update={"allocate": False}))
            policy = chosen.policy()
        if recipe is not None:
            with get_registry().blame("recipe", recipe):  # a plugin's bug becomes one error naming it
                return get_registry().get("recipe", recipe).quantize(model, spec, policy)
        return quantize_layers(copy.deepcopy(model), spec, policy)


def quantize_layers(model: nn.Module, spec: QuantSpec, policy: Policy, rounding=quantize_tensor) -> nn.Module:
    """Fake-quantize ``model`` in place with ``rounding`` (``quantize_tensor``'s signature); returns it
    with ``quantized_layers`` set. Recipes call this with their own rounding rule."""
    layers = quantizable_layers(model)
    plan = policy.plan([name for name, _ in layers], spec.bits)
    records: dict[str, QuantizedTensor] = {}
    with torch.no_grad():
        for name, layer in layers:
            if name not in plan:
                continue
            try:
                qt = rounding(layer.weight, spec.scheme, plan[name], spec.granularity, spec.group_size)
            except BitsweepError as exc:
                raise BitsweepError(f"layer {name!r}: {exc}") from None
            layer.weight.copy_(qt.dequantize())
            records[name] = qt
    model.quantized_layers = records
    return model
