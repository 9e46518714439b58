"""The compress step: standard archives of a model file, readable by the usual command-line tools."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from bitsweep.files import atomic_path
from bitsweep.registry import get_registry


class Compressor(ABC):
    """Writes one standard compressed file (``.gz``, ``.7z``, ``.zst``...) holding ``src``."""

    name: str = ""
    suffix: str = ""
    description: str = ""

    @abstractmethod
    def compress(self, src: Path, dst: Path) -> None:
        """Write the compressed form of ``src`` to ``dst``."""


def compress_file(src: Path, compressor: str, out_dir: Path | None = None) -> Path:
    """Compress ``src`` with a registered compressor, atomically; returns the archive's path."""
    codec = get_registry().get("compressor", compressor)
    src = Path(src)
    dst = Path(out_dir or src.parent) / (src.name + codec.suffix)
    with atomic_path(dst) as tmp:
        codec.compress(src, tmp)
    return dst
