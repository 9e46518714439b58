"""The compile step's kernels: packed n-bit weights multiplied straight from their codes.

``kernels.cpp`` (the bindings), ``kernels_linear.cpp`` and ``kernels_decode.cpp`` (with ``kernels.h``) are
compiled on the user's machine (``-march=native``), in parallel, the first time they are
needed and cached per machine, bitsweep, torch and source version in the user cache. Without
a compiler (or with ``BITSWEEP_KERNELS=python``) the same functions run in plain PyTorch,
giving the same results to float32 rounding; a failed build costs one warning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bitsweep import __version__
from bitsweep.errors import first_line
from bitsweep.files import cache_dir
from bitsweep.pack import unpack_bits

# The bindings first; the kernels in files of their own so that the compiler builds them in parallel.
SOURCES = tuple(Path(__file__).with_name(name) for name in ("kernels.cpp", "kernels_linear.cpp", "kernels_decode.cpp"))
HEADER = Path(__file__).with_name("kernels.h")


# Up to this many rows of x the fused kernel wins; beyond it, slices are decoded for the BLAS
# (bench/kernels.py, batches 8 to 64). The fused kernel makes each level once per four rows of x, decoding
# makes it once, so where a level costs more than converting its code (pow2's bits and gathered tables at
# 6 to 8 bits) decoding wins from fewer rows. Where the BLAS has AVX-512 it multiplies 16 floats per
# instruction: the fused kernel keeps up to fewer rows, and with cheap levels only where its blocks run on
# 512-bit vectors too. By the width of the kernels' vectors: (cheap levels, costly levels).
FUSED_MAX_BATCH = {256: (32, 16), 512: (24, 12)}


class KernelWarning(UserWarning):
    """The compiled kernels are unavailable; bitsweep runs the pure-PyTorch path."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo spells them (empty where it does not exist)."""
    with contextlib.suppress(OSError, StopIteration):
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        return frozenset(line.partition(":")[2].split())
    return frozenset()


def _machine() -> str:
    """What the compiled code depends on: CPU features, platform, torch, bitsweep and the sources."""
    parts = [" ".join(sorted(cpu_flags())), platform.machine(), platform.python_version(), torch.__version__, __version__,
             *(path.read_bytes().hex() for path in (*SOURCES, HEADER))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def kernels_dir() -> Path:
    """Where builds are cached: $BITSWEEP_KERNELS_DIR, else ``kernels/`` in the cache folder (they depend on
    the machine only)."""
    return Path(os.environ.get("BITSWEEP_KERNELS_DIR") or cache_dir() / "kernels")


@functools.cache
def extension():
    """The compiled kernels module, or None when they cannot be built here (one warning says why)."""
    if os.environ.get("BITSWEEP_KERNELS", "").lower() == "python":
        return None
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime": irrelevant on CPU
    from torch.utils import cpp_extension

    with contextlib.suppress(ImportError):  # the ninja wheel's binary, when the venv is not activated
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        key = _machine()
        build = kernels_dir() / key
        build.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(name=f"bitsweep_kernels_{key}", sources=[str(path) for path in SOURCES],
                                  build_directory=str(build), extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # any compiler or loader failure: fall back, never stop the user's work
        first = first_line(exc) or type(exc).__name__
        warnings.warn(f"bitsweep: compiled kernels unavailable ({first}); using the pure-PyTorch path "
                      "(install a C++ compiler, e.g. apt-get install g++, for the fast kernels)",
                      KernelWarning, stacklevel=2)
        return None


@dataclass
class KernelWeight:
    """A packed weight seen as ``[N, K]`` rows, in the form the kernels read.

    ``w[n, k] = scale[n, k // group] * (lut[u] - zero[n, k // group])`` where ``u`` are the
    stored codes; ``codes`` is the kernels' layout when compiled, else the unpacked codes.
    """

    codes: torch.Tensor
    n: int
    k: int
    bits: int
    lut: torch.Tensor
    linear_lut: bool
    scale: torch.Tensor
    zero: torch.Tensor
    group: int
    compiled: bool

    @classmethod
    def build(cls, data: torch.Tensor, n: int, k: int, bits: int, lut: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor, group: int) -> KernelWeight:
        ext = extension()
        linear_lut = bool(torch.equal(lut, torch.arange(2**bits, dtype=torch.float32) + lut[0]))
        if ext is not None:
            codes = ext.prepare(data.contiguous(), n, k, bits)
        else:
            codes = unpack_bits(data, bits, n * k).reshape(n, k)
        return cls(codes, n, k, bits, lut.contiguous(), linear_lut, scale.reshape(n, -1).contiguous(),
                   zero.reshape(n, -1).contiguous(), group, ext is not None)

    def stored_codes(self) -> torch.Tensor:
        """The stored codes ``u`` (uint8, row-major), e.g. to write the packed file again."""
        if not self.compiled:
            return self.codes.reshape(-1)
        ones = torch.ones(self.n, 1)
        identity = torch.arange(2**self.bits, dtype=torch.float32)
        u = extension().decode(self.codes, self.n, self.k, self.bits, identity, ones, torch.zeros(self.n, 1), self.k)
        return u.to(torch.uint8).reshape(-1)

    def decode(self) -> torch.Tensor:
        """float32 ``[N, K]``, bit for bit what the scheme's decode gives."""
        if self.compiled:
            return extension().decode(self.codes, self.n, self.k, self.bits, self.lut, self.scale, self.zero,
                                      self.group)
        levels = self.lut[self.codes.long()]
        scale = self.scale.repeat_interleave(self.group, dim=1)[:, : self.k]
        zero = self.zero.repeat_interleave(self.group, dim=1)[:, : self.k]
        return levels.sub_(zero).mul_(scale)

    @functools.cached_property
    def _fused_limit_key(self) -> tuple[int, bool]:
        """Where in FUSED_MAX_BATCH this weight's limit is: the kernels' vector width, and whether its levels
        are costly or, with AVX-512, its blocks 256-bit. Asked of the extension once, not on every call."""
        ext = extension()
        width = ext.vector_bits()
        costly = not self.linear_lut and self.bits >= 6
        return width, costly or (width == 512 and not ext.wide_blocks(self.lut, self.bits, self.linear_lut))

    def fused_max_batch(self) -> int:
        """The most rows of x the fused kernel takes; more are multiplied by decoding slices for the BLAS."""
        width, slower = self._fused_limit_key
        return FUSED_MAX_BATCH[width][slower]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for float32 ``x [M, K]``."""
        if not self.compiled:
            return F.linear(x, self.decode())
        # The fused kernel sums groups slot by slot (8 weights); other group sizes decode instead.
        if x.shape[0] <= self.fused_max_batch() and (self.group % 8 == 0 or self.group >= self.k):
            return extension().linear(x, self.codes, self.n, self.k, self.bits, self.lut, self.linear_lut,
                                      self.scale, self.zero, self.group)
        return extension().linear_decoded(x, self.codes, self.n, self.k, self.bits, self.lut, self.scale,
                                          self.zero, self.group)
