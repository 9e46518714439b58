"""Quantization schemes: the contract a scheme implements, and ``quantize_tensor``.

A scheme only sees a 2-D float32 tensor of *rows*; each row shares one scale and
zero point. Granularity decides what a row is: the whole tensor (``tensor``),
one output channel (``channel``), or ``group_size`` consecutive weights of one
output channel (``group``). So a scheme is written once and works at every
granularity.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from bitsweep.errors import BitsweepError
from bitsweep.registry import get_registry

GRANULARITIES = ("tensor", "channel", "group")
MIN_BITS, MAX_BITS = 2, 8
# The smallest normal float32: scales never go below it, so 1/scale stays finite.
SMALLEST_SCALE = torch.finfo(torch.float32).tiny


class Scheme(ABC):
    """How one named scheme turns rows of weights into integer codes and back.

    ``scale`` and ``zero_point`` reach ``encode``/``decode`` as float32 columns
    (shape ``[rows, 1]``) so they broadcast over each row.
    """

    name: str = ""
    description: str = ""

    @abstractmethod
    def code_range(self, bits: int) -> tuple[int, int]:
        """The smallest and largest integer code used at this width."""

    @abstractmethod
    def fit(self, rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(scale float32, zero_point int32)`` for a ``[rows, n]`` float32 tensor."""

    @abstractmethod
    def encode(self, rows, scale, zero_point, bits: int) -> torch.Tensor:
        """Integer-valued codes (any dtype) in ``code_range(bits)``, one per weight."""

    @abstractmethod
    def decode(self, codes, scale, zero_point, bits: int) -> torch.Tensor:
        """float32 weights back from the integer codes ``encode`` produced."""


class AffineScheme(Scheme):
    """Uniform levels ``(code - zero_point) * scale``, rounded and clamped exactly
    as ``torch.fake_quantize_per_channel_affine`` does, so results match it bit for bit."""

    def encode(self, rows, scale, zero_point, bits):
        qmin, qmax = self.code_range(bits)
        codes = torch.mul(rows, torch.reciprocal(scale))
        codes.round_().add_(zero_point).clamp_(qmin, qmax)
        return codes

    def decode(self, codes, scale, zero_point, bits):
        return codes.to(torch.float32).sub_(zero_point).mul_(scale)


def check_bits(bits) -> int:
    """``bits`` when it is a width bitsweep packs (a whole number from MIN_BITS to MAX_BITS), else one line."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise BitsweepError(f"bits must be a whole number from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise BitsweepError(f"bits={bits} is outside {MIN_BITS}..{MAX_BITS}; pick a width from {MIN_BITS} to {MAX_BITS}")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to: scheme name, width and granularity (validated on creation)."""

    scheme: str
    bits: int
    granularity: str = "channel"
    group_size: int | None = None

    def __post_init__(self):
        check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise BitsweepError(
                f"unknown granularity {self.granularity!r}; use one of: {', '.join(GRANULARITIES)}"
            )
        if self.granularity == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise BitsweepError(
                    f"granularity 'group' needs a positive whole group_size, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise BitsweepError(
                f"group_size={self.group_size} only applies to granularity 'group', not {self.granularity!r}"
            )


@dataclass
class QuantizedTensor:
    """Integer codes plus the scales that give them meaning; ``dequantize()`` returns the weights."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    bits: int
    scheme: str
    granularity: str
    group_size: int | None
    dtype: torch.dtype
    codec: Scheme = field(repr=False)

    def dequantize(self) -> torch.Tensor:
        """float weights with the original shape and dtype."""
        rows, pad = grouped_rows(self.codes, self.granularity, self.group_size)
        values = self.codec.decode(rows, as_column(self.scale), as_column(self.zero_point), self.bits)
        return ungrouped(values, self.codes.shape, pad).to(self.dtype)


def scales_by_row(t: torch.Tensor, granularity: str, rows: int) -> torch.Tensor:
    """Scales or zero points of a ``[rows, ...]`` weight as float32 ``[rows, groups]`` (one group per row for
    per-tensor and per-channel)."""
    t = t.to(torch.float32)
    return t.reshape(1, 1).expand(rows, 1) if granularity == "tensor" else t.reshape(rows, -1)


def as_column(t: torch.Tensor) -> torch.Tensor:
    """Scales or zero points as a float32 ``[rows, 1]`` column, one per row of ``grouped_rows``."""
    return t.reshape(-1, 1).to(torch.float32)


def grouped_rows(w: torch.Tensor, granularity: str, group_size: int | None) -> tuple[torch.Tensor, int]:
    """View ``w`` as ``[rows, n]`` for its granularity; returns the rows and the padding added."""
    if granularity == "tensor":
        return w.reshape(1, -1), 0
    channels = w.shape[0] if w.dim() else 1
    per_channel = w.reshape(channels, w.numel() // channels if channels else 0)
    if granularity == "channel":
        return per_channel, 0
    n = per_channel.shape[1]
    pad = -n % group_size
    if pad and n:
        # Repeat each channel's last weight: it changes neither min, max nor max-abs of the last group.
        per_channel = torch.cat([per_channel, per_channel[:, -1:].expand(channels, pad)], dim=1)
    return per_channel.reshape(-1, group_size), pad


def ungrouped(rows: torch.Tensor, shape: torch.Size, pad: int) -> torch.Tensor:
    """``grouped_rows`` undone: the padding dropped, the original shape back."""
    if pad:
        channels = shape[0] if len(shape) else 1
        rows = rows.reshape(channels, -1)[:, : rows.numel() // channels - pad]
    return rows.reshape(shape)


def scale_shape(w: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    """The shape of ``w``'s scales (and zero points) under ``spec``'s granularity."""
    if spec.granularity == "tensor":
        return (1,)
    channels = w.shape[0] if w.dim() else 1
    if spec.granularity == "channel":
        return (channels,)
    per_channel = w.numel() // channels if channels else 0
    return (channels, math.ceil(per_channel / spec.group_size))


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest integer dtype that holds codes ``qmin..qmax``."""
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    raise BitsweepError(f"code range {qmin}..{qmax} does not fit in 32 bits")


def quantize_tensor(w: torch.Tensor, scheme: str, bits: int, granularity: str = "channel",
                    group_size: int | None = None) -> QuantizedTensor:
    """Quantize ``w`` with a registered scheme; see ``QuantizedTensor`` for what comes back."""
    spec = QuantSpec(scheme, bits, granularity, group_size)
    codec = get_registry().get("scheme", scheme)
    qmin, qmax = codec.code_range(bits)
    if qmax - qmin > 2**bits - 1:
        raise BitsweepError(f"scheme {scheme!r} uses codes {qmin}..{qmax}, more than {bits} bits can hold")
    if w.is_floating_point() is False:
        raise BitsweepError(f"quantize_tensor needs a floating-point tensor, got {w.dtype}")
    w32 = w.detach().to(torch.float32)
    bad = 0 if math.isfinite(w32.sum()) else int((~torch.isfinite(w32)).sum())  # a sum is the cheap check
    if bad:
        raise BitsweepError(f"weights contain {bad} NaN/Inf value(s); repair them, or keep this layer "
                            "out of quantization with a policy exclude")

    scales_shape = scale_shape(w32, spec)
    codes_dtype = code_dtype(qmin, qmax)
    if w32.numel() == 0:
        scale = torch.ones(scales_shape, dtype=torch.float32)
        zero_point = torch.zeros(scales_shape, dtype=torch.int32)
        codes = torch.empty(w32.shape, dtype=codes_dtype)
    else:
        rows, pad = grouped_rows(w32, granularity, group_size)
        scale, zero_point = codec.fit(rows, bits)
        scale = scale.to(torch.float32).clamp_min(SMALLEST_SCALE)
        zero_point = zero_point.to(torch.int32)
        coded = codec.encode(rows, as_column(scale), as_column(zero_point), bits)
        codes = ungrouped(coded, w32.shape, pad).to(codes_dtype)
        scale, zero_point = scale.reshape(scales_shape), zero_point.reshape(scales_shape)
    return QuantizedTensor(codes=codes, scale=scale, zero_point=zero_point, qmin=qmin, qmax=qmax,
                           bits=bits, scheme=scheme, granularity=granularity, group_size=group_size,
                           dtype=w.dtype, codec=codec)
