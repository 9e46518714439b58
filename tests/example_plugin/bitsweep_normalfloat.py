"""NormalFloat: 2^b levels at quantiles of a standard normal, scaled to each row's max-abs.

Weights are roughly normal, so levels spaced like a normal distribution waste
fewer codes on the tails than uniform levels. Zero is always a level.
"""

from statistics import NormalDist

import torch

import bitsweep


def normal_levels(bits: int) -> torch.Tensor:
    """2^b sorted levels in [-1, 1]: 2^(b-1) negative, zero, 2^(b-1)-1 positive (as NF4)."""
    quantile = NormalDist().inv_cdf
    negatives, positives = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    offset = 0.9677  # NF4's choice: keeps the extreme quantiles finite
    neg = [quantile(offset - (offset - 0.5) * i / negatives) for i in range(negatives)]
    pos = [quantile(offset - (offset - 0.5) * i / positives) for i in range(positives)]
    top = quantile(offset)
    levels = sorted([-v / top for v in neg] + [0.0] + [v / top for v in pos])
    return torch.tensor(levels, dtype=torch.float32)


class NormalFloat(bitsweep.Scheme):
    name = "normalfloat"
    description = "levels at normal quantiles, scaled by max-abs (NF4 generalised to 2..8 bits)"

    def code_range(self, bits):
        return 0, 2**bits - 1

    def fit(self, rows, bits):
        scale = rows.abs().amax(dim=1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def encode(self, rows, scale, zero_point, bits):
        levels = normal_levels(bits)
        midpoints = (levels[1:] + levels[:-1]) / 2
        return torch.bucketize(rows / scale, midpoints)  # index of the nearest level

    def decode(self, codes, scale, zero_point, bits):
        return normal_levels(bits)[codes.long()] * scale


@bitsweep.hookimpl
def register_schemes():
    return [NormalFloat()]
