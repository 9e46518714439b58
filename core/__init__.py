"""bitsweep: how few bits can a vision model take?

Public API (stable names)::

    bitsweep.schemes()                         # name -> Scheme
    bitsweep.quantize_tensor(w, scheme, bits, granularity="channel", group_size=None)
    bitsweep.quantize_model(model, scheme, bits, granularity="channel", policy=None, recipe=None,
                            calibration=None)      # calibration: real images for the recipe (else synthetic)
    bitsweep.recipes()                         # name -> Recipe (data-free improvements on rounding)
    bitsweep.compile_packed(quantized, kernel="weight-only" | "int8")   # runs from packed codes
    bitsweep.save_packed(module, path) / bitsweep.load_packed(path, kernel="weight-only")
    bitsweep.hookimpl / bitsweep.hookspec      # for plugins
"""

import sys
import types
from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("bitsweep")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

hookimpl = pluggy.HookimplMarker("bitsweep")
hookspec = pluggy.HookspecMarker("bitsweep")

from bitsweep.compress import Compressor, compress_file  # noqa: E402
from bitsweep.errors import BitsweepError  # noqa: E402
from bitsweep.compile import compile_packed, load_packed  # noqa: E402
from bitsweep.pack import PackedTensor, save_packed  # noqa: E402
from bitsweep.quantize import Policy, quantize_model  # noqa: E402
from bitsweep.recipes import Recipe  # noqa: E402
from bitsweep.registry import get_registry  # noqa: E402
from bitsweep.schemes import AffineScheme, QuantizedTensor, QuantSpec, Scheme, quantize_tensor  # noqa: E402


class _ListingModule(types.ModuleType):
    """A module that, called, lists what is registered of its kind: ``bitsweep.schemes()`` is every scheme
    by name (``Scheme``) and ``bitsweep.recipes()`` every recipe (``Recipe``), while ``bitsweep.schemes.X``
    and ``bitsweep.recipes.Pipeline`` still reach the modules' contents (a function of the same name would
    hide them)."""

    def __call__(self) -> dict:
        kind = {"bitsweep.schemes": "scheme", "bitsweep.recipes": "recipe"}[self.__name__]
        return {name: entry.obj for name, entry in get_registry().entries(kind).items()}


sys.modules["bitsweep.schemes"].__class__ = _ListingModule
sys.modules["bitsweep.recipes"].__class__ = _ListingModule
schemes = sys.modules["bitsweep.schemes"]
recipes = sys.modules["bitsweep.recipes"]


def compressors() -> dict[str, Compressor]:
    """Every registered compressor, by name."""
    return {name: entry.obj for name, entry in get_registry().entries("compressor").items()}


__all__ = [
    "AffineScheme", "BitsweepError", "Compressor", "PackedTensor", "Policy", "QuantSpec", "QuantizedTensor",
    "Recipe", "Scheme", "__version__", "compile_packed", "compress_file", "compressors", "hookimpl", "hookspec",
    "load_packed", "quantize_model", "quantize_tensor", "recipes", "save_packed", "schemes",
]
