"""The compile step: a quantized model becomes a module that runs from its packed n-bit codes.

Two kernel paths:

- ``weight-only`` keeps every quantized weight packed in memory. Linear layers multiply
  straight from the codes (``bitsweep.kernels``); convolutions decode their weight for the
  call and run PyTorch's convolution. Activations stay float32, so outputs equal the
  fake-quantized model's to float32 rounding.
- ``int8`` expands the codes once to int8 weights with per-channel scales and runs oneDNN's
  int8 kernels with int8 activations, through torchao's pt2e and inductor (``bitsweep.int8``):
  faster convolutions, at the cost of activation rounding and a compilation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.int8 import to_int8
from bitsweep.kernels import KernelWeight
from bitsweep.pack import PackedTensor, pack_bits, packed_model
from bitsweep.registry import get_registry
from bitsweep.schemes import scales_by_row

KERNEL_PATHS = ("weight-only", "int8")


def kernel_weight(packed: PackedTensor) -> KernelWeight:
    """The packed weight as ``[out_channels, rest]`` rows with the table, scales and zero points the kernels read.

    The scheme's levels come from its own ``decode`` at scale 1; the result is checked once,
    bit for bit, against the scheme's ``dequantize`` so a scheme the kernels cannot express is
    refused here rather than computed wrongly.
    """
    codec = get_registry().get("scheme", packed.scheme)
    n = packed.shape[0]
    k = math.prod(packed.shape[1:])
    codes = torch.arange(packed.qmin, packed.qmin + 2**packed.bits).reshape(1, -1)
    one, zero = torch.ones(1, 1), torch.zeros(1, 1)
    try:  # every pattern of the width: the built-in tables then take the kernels' fast paths
        lut = codec.decode(codes, one, zero, packed.bits)
    except Exception:  # a scheme that cannot decode the patterns it never stores
        lut = codec.decode(codes.clamp(max=packed.qmax), one, zero, packed.bits)
    lut = lut.reshape(-1).to(torch.float32)
    group = packed.group_size if packed.granularity == "group" else k
    scale = scales_by_row(packed.scale, packed.granularity, n)
    zero = scales_by_row(packed.zero_point, packed.granularity, n)
    weight = KernelWeight.build(packed.data, n, k, packed.bits, lut, scale.contiguous(), zero.contiguous(), group)
    if not torch.equal(weight.decode(), packed.dequantize().to(torch.float32).reshape(n, k)):
        raise BitsweepError(f"scheme {packed.scheme!r} does not decode as scale * (level - zero_point), which the "
                            "packed kernels need; ask its author to decode that way, or run quantize_model's "
                            "fake-quantized model")
    return weight


class _PackedLayer(nn.Module):
    """A layer whose weight lives only in the kernels' layout: the codes are not held twice."""

    def __init__(self, packed: PackedTensor):
        super().__init__()
        self.kernel = kernel_weight(packed)
        self.meta = dataclasses.replace(packed, data=torch.empty(0, dtype=torch.uint8))

    @property
    def packed(self) -> PackedTensor:
        """The weight as the packed file stores it, codes rebuilt from the kernels' layout."""
        return dataclasses.replace(self.meta, data=pack_bits(self.kernel.stored_codes(), self.meta.bits))

    @property
    def weight(self) -> torch.Tensor:
        """The float weight, decoded anew on each read: for models whose own forward reads a layer's
        ``.weight`` (its device or dtype, or its values); the codes stay the only copy held."""
        return self.kernel.decode().reshape(self.meta.shape)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.meta.shape)}, scheme={self.meta.scheme}, bits={self.meta.bits}"


class PackedLayers(Mapping):
    """Layer name -> ``PackedTensor`` of a compiled model, rebuilt from its packed layers on access."""

    def __init__(self, model: nn.Module, names: list[str]):
        self._model, self._names = model, list(names)

    def __getitem__(self, name: str) -> PackedTensor:
        if name not in self._names:
            raise KeyError(name)
        return self._model.get_submodule(name).packed

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class PackedLinear(_PackedLayer):
    """``nn.Linear`` whose weight stays n-bit: ``y = x @ W.T + b`` straight from the codes."""

    def __init__(self, packed: PackedTensor, bias: torch.Tensor | None):
        super().__init__(packed)
        self.in_features, self.out_features = self.kernel.k, self.kernel.n
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel.linear(x.reshape(-1, self.in_features).to(torch.float32))
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class PackedConv(_PackedLayer):
    """A convolution whose weight stays n-bit in memory and is decoded for each call.

    A plain ``nn.Conv1d/2d/3d`` with zero padding calls the functional convolution with the
    decoded weight; any other convolution (timm's padding variants, weight standardisation)
    runs its own forward on a private copy holding the decoded weight. Only the bias stays a
    parameter.
    """

    def __init__(self, packed: PackedTensor, conv: nn.Module):
        super().__init__(packed)
        conv = copy.copy(conv)
        conv._parameters = {k: v for k, v in conv._parameters.items() if k != "weight"}
        self.bias = conv.bias  # before conv: registering it checks that no attribute of that name exists
        object.__setattr__(self, "conv", conv)  # not a submodule: the state dict keeps the layer's own keys
        plain = type(conv) in _FUNCTIONAL and conv.padding_mode == "zeros"
        self.functional = _FUNCTIONAL[type(conv)] if plain else None

    def __getattr__(self, name: str):
        """The convolution's own attributes (``kernel_size``, ``stride``, ``in_channels``...), for models
        whose forward reads them (timm's DaViT reads ``kernel_size``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            conv = self.__dict__.get("conv")
            if conv is None:
                raise
            return getattr(conv, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.functional is not None:
            conv = self.conv
            return self.functional(x, weight, self.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        conv = copy.copy(self.conv)  # a private view per call, so concurrent calls do not share the weight slot
        conv.weight = weight
        return conv(x)


_FUNCTIONAL = {nn.Conv1d: torch.nn.functional.conv1d, nn.Conv2d: torch.nn.functional.conv2d,
               nn.Conv3d: torch.nn.functional.conv3d}


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def compile_layers(model: nn.Module, layers: dict[str, PackedTensor], kernel: str = "weight-only",
                   calibration: list[torch.Tensor] | None = None) -> nn.Module:
    """Replace each named Linear/Conv layer of ``model`` (in place) by one running from its packed codes.

    ``calibration`` (int8 path only): input batches that set the activation ranges; without
    them the ranges are found data-free.
    """
    if kernel not in KERNEL_PATHS:
        raise BitsweepError(f"unknown kernel path {kernel!r}; use one of: {', '.join(KERNEL_PATHS)}")
    if kernel == "int8":
        with torch.no_grad():
            for name, packed in layers.items():
                model.get_submodule(name).weight.copy_(packed.dequantize())
        result = to_int8(model.eval(), {name: packed.to_quantized() for name, packed in layers.items()}, calibration)
    else:
        for name, packed in layers.items():
            layer = model.get_submodule(name)
            if isinstance(layer, nn.Linear):
                _swap(model, name, PackedLinear(packed, layer.bias))
            elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                _swap(model, name, PackedConv(packed, layer))
            else:
                raise BitsweepError(f"layer {name!r} is a {type(layer).__name__}; packed kernels run Linear and Conv layers")
        result = model
        layers = PackedLayers(model, list(layers))
    result.quantized_layers = layers
    return result.eval()


def compile_packed(quantized: nn.Module, kernel: str = "weight-only",
                   calibration: list[torch.Tensor] | None = None, *, path: str | None = None) -> nn.Module:
    """A runnable copy of ``quantize_model``'s output on the kernel path ``kernel`` (``weight-only`` or ``int8``),
    the same word ``load_packed`` and flows.yaml's ``kernels:`` use. ``path=`` is its old, deprecated name."""
    if path is not None:
        warnings.warn("compile_packed(path=...) is deprecated: the kernel path is now kernel=...",
                      DeprecationWarning, stacklevel=2)
        kernel = path
    records = getattr(quantized, "quantized_layers", None)
    if records is None:
        raise BitsweepError("compile_packed needs a model from bitsweep.quantize_model (it has no quantized_layers)")
    model = copy.deepcopy(quantized)
    layers = {name: t if isinstance(t, PackedTensor) else PackedTensor.from_quantized(t) for name, t in records.items()}
    return compile_layers(model, layers, kernel, calibration)


def load_packed(path, kernel: str = "weight-only", calibration: list[torch.Tensor] | None = None) -> nn.Module:
    """The model a packed file holds: timm's architecture with packed modules for the quantized layers.

    ``kernel`` and ``calibration`` (input batches, int8 path only) go to ``compile_layers``.
    """
    model, layers = packed_model(path)
    return compile_layers(model, layers, kernel, calibration)
