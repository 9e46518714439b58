"""The profile step: how a scheme reshapes each layer's weight distribution (the paper's analysis).

Range, quartiles, whiskers and outliers, kurtosis, "local sparsity" (weights that became exactly
zero), the number of distinct levels used and the signal-to-quantization-noise ratio, per layer and
for the whole model. The quartiles and whiskers are enough to redraw the paper's box plots later
without touching a model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

STATS = ["numel", "min", "max", "mean", "std", "q1", "median", "q3", "iqr", "whislo", "whishi",
         "outlier_fraction", "kurtosis", "zero_fraction", "levels", "sqnr_db"]
WHOLE_MODEL = "(model)"  # the layer name of the row that pools every Conv/Linear weight


def weight_stats(values: torch.Tensor, reference: torch.Tensor | None = None,
                 codes: torch.Tensor | None = None, count_levels: bool = True) -> dict:
    """Distribution statistics of one weight tensor.

    ``reference`` (the fp32 weights) gives the SQNR in dB; ``codes`` (the integer codes) count
    the levels used, else distinct values are counted (skipped with ``count_levels=False``).
    Quartiles interpolate linearly (numpy's default); whiskers end at the last weights within
    1.5 IQR of the box (never inside it), as matplotlib draws them; kurtosis is the excess
    (Fisher) kurtosis of the population, as ``scipy.stats.kurtosis``.
    """
    x = values.detach().reshape(-1).double().numpy()
    q1, median, q3 = np.quantile(x, [0.25, 0.5, 0.75])
    iqr = q3 - q1
    low, high = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    inside = x[(x >= low) & (x <= high)]
    mean = x.mean()
    centred = x - mean
    m2 = np.mean(centred**2)
    kurtosis = float(np.mean(centred**4) / m2**2 - 3) if m2 > 0 else None
    counted = codes if codes is not None else values
    stats = {"numel": x.size, "min": float(x.min()), "max": float(x.max()), "mean": float(mean),
             "std": float(math.sqrt(m2)), "q1": float(q1), "median": float(median), "q3": float(q3),
             "iqr": float(iqr), "whislo": float(min(inside.min(), q1)), "whishi": float(max(inside.max(), q3)),
             "outlier_fraction": float(1 - inside.size / x.size), "kurtosis": kurtosis,
             "zero_fraction": float(np.mean(x == 0)), "levels": int(torch.unique(counted).numel()) if count_levels else None,
             "sqnr_db": None}
    if reference is not None:
        stats["sqnr_db"] = sqnr_db(reference, values)
    return stats


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float | None:
    """10·log10(signal power / noise power); None when the two are equal (no noise)."""
    signal = reference.detach().double()
    noise = (signal - approximation.detach().double()).pow(2).sum().item()
    return 10 * math.log10(signal.pow(2).sum().item() / noise) if noise > 0 else None


def profile_layers(fp32: dict[str, torch.Tensor],
                   quantized: dict[str, tuple[torch.Tensor, torch.Tensor, int]]) -> list[dict]:
    """One row per Conv/Linear layer and one pooled row (``WHOLE_MODEL``) for the model.

    ``fp32`` maps layer names to their fp32 weights (in module order); ``quantized`` maps the
    quantized layers to ``(dequantized weights, codes, bits)``. Layers a policy kept in fp32 keep
    their values, so the pooled row describes the weights the model really runs with; its
    ``levels`` is left empty (per-channel scales make pooled distinct values meaningless).
    """
    rows, pooled = [], []
    for name, weight in fp32.items():
        if name in quantized:
            values, codes, bits = quantized[name]
            rows.append({"layer": name, "layer_bits": bits} | weight_stats(values, weight, codes))
        else:
            values = weight
            rows.append({"layer": name, "layer_bits": 32} | weight_stats(weight))
        pooled.append(values.reshape(-1))
    reference = torch.cat([w.reshape(-1) for w in fp32.values()])
    whole = weight_stats(torch.cat(pooled), reference if quantized else None, count_levels=False)
    rows.append({"layer": WHOLE_MODEL, "layer_bits": None} | whole)
    return rows
