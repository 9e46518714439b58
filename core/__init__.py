"""bitsweep: how few bits can a vision model take?

Public API (stable names)::

    bitsweep.schemes()                         # name -> Scheme
    bitsweep.quantize_tensor(w, scheme, bits, granularity="channel", group_size=None)
    bitsweep.quantize_model(model, scheme, bits, granularity="channel", policy=None)
    bitsweep.hookimpl / bitsweep.hookspec      # for plugins
"""

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
from bitsweep.quantize import Policy, quantize_model  # noqa: E402
from bitsweep.registry import get_registry  # noqa: E402
from bitsweep.schemes import AffineScheme, QuantizedTensor, QuantSpec, Scheme, quantize_tensor  # noqa: E402


def schemes() -> dict[str, Scheme]:
    """Every registered quantization scheme, by name."""
    return {name: entry.obj for name, entry in get_registry().entries("scheme").items()}


def compressors() -> dict[str, Compressor]:
    """Every registered compressor, by name."""
    return {name: entry.obj for name, entry in get_registry().entries("compressor").items()}


__all__ = [
    "AffineScheme", "BitsweepError", "Compressor", "Policy", "QuantSpec", "QuantizedTensor", "Scheme",
    "__version__", "compress_file", "compressors", "hookimpl", "hookspec", "quantize_model",
    "quantize_tensor", "schemes",
]
