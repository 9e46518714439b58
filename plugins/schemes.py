"""The paper's three data-free schemes: asymmetric, symmetric and power-of-two."""

import torch

import bitsweep
from bitsweep.schemes import AffineScheme, Scheme


def max_abs_scale(rows, top_code):
    """Scale mapping each row's max-abs onto ``top_code`` (1 for an all-zero row), zero point 0."""
    scale = rows.abs().amax(dim=1) / float(top_code)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.zeros_like(scale, dtype=torch.int32)


class Asymmetric(AffineScheme):
    """Affine min/max: codes 0..2^b-1; the range always contains 0 so zero is exact."""

    name = "asymmetric"
    description = "affine min/max, unsigned codes 0..2^b-1 with a zero point"

    def code_range(self, bits):
        return 0, 2**bits - 1

    def fit(self, rows, bits):
        qmin, qmax = self.code_range(bits)
        lo, hi = rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / float(qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
        return scale, zero_point


class Symmetric(AffineScheme):
    """Signed max-abs with a narrow range -(2^(b-1)-1)..2^(b-1)-1, so +max and -max are both exact."""

    name = "symmetric"
    description = "signed max-abs, codes -(2^(b-1)-1)..2^(b-1)-1, zero point 0"

    def code_range(self, bits):
        top = 2 ** (bits - 1) - 1
        return -top, top

    def fit(self, rows, bits):
        return max_abs_scale(rows, self.code_range(bits)[1])


class PowerOfTwo(Scheme):
    """Logarithmic: code c is 0, or sign(c) * scale * 2^(|c| - L) with L = 2^(b-1) - 1.

    The scale is the row's max-abs, so the top level is exact. Each weight goes
    to the *nearest* level in value (not in log space); ties go to the larger
    magnitude. Magnitudes below float32's normal range (2^-126 of the scale)
    become zero. Both directions work on the float32 bit pattern, so rounding
    is exact and costs a few integer operations per weight.
    """

    name = "pow2"
    description = "power-of-two levels ±scale·2^k plus zero; sign + exponent codes"

    def code_range(self, bits):
        top = 2 ** (bits - 1) - 1
        return -top, top

    def fit(self, rows, bits):
        return max_abs_scale(rows, 1)

    def encode(self, rows, scale, zero_point, bits):
        levels = self.code_range(bits)[1]
        pattern = torch.mul(rows, torch.reciprocal(scale)).view(torch.int32)
        sign = pattern >> 31  # -1 for negative weights, 0 otherwise
        pattern &= 0x7FFFFFFF  # |w| / scale; its exponent field is floor(log2) + 127
        field = pattern >> 23
        # Adding half a mantissa carries into the exponent exactly when the mantissa is >= 1.5,
        # i.e. at the midpoint 0.75 * 2^(e+1) between 2^e and 2^(e+1).
        index = pattern.add_(1 << 22).bitwise_right_shift_(23).add_(levels - 127).clamp_(0, levels)
        # Between 0 and the smallest level 2^(1-L) the midpoint is 2^-L: from there on, code 1.
        at_least_one = field.sub_(max(127 - levels, 1) - 1).clamp_(0, 1)
        index = torch.max(index, at_least_one)
        return index.bitwise_xor_(sign).sub_(sign)  # two's complement negation where sign is -1

    def decode(self, codes, scale, zero_point, bits):
        levels = self.code_range(bits)[1]
        codes = codes.to(torch.int32)
        index = codes.abs()
        # 2^(index - L) as a float32 bit pattern, zero where the code is zero, sign bit from the code.
        pattern = index.add(127 - levels).bitwise_left_shift_(23).mul_(index.clamp(0, 1))
        pattern |= codes.bitwise_and(-0x80000000)
        return pattern.view(torch.float32).mul_(scale)


@bitsweep.hookimpl
def register_schemes():
    return [Asymmetric(), Symmetric(), PowerOfTwo()]
