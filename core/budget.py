"""A memory budget for cells in flight: a cell holds a few float copies of its model's weights, so
cells of large models must not all start at once, however many workers are free."""

from __future__ import annotations

import psutil

# Peak bytes a running cell adds per fp32 weight byte: the fake-quantized copy, its integer codes and
# the model rebuilt from the packed file. Measured on resnet50: quantize + pack peaks at 2.2x, and
# loading the packed file and a forward pass stay under that; 3 leaves room for activations.
CELL_WEIGHT_COPIES = 3
DEFAULT_SHARE = 0.8  # of the RAM available when the sweep starts


def cell_bytes(params: int) -> int:
    """What one cell of a model with ``params`` float32 parameters may hold at its peak."""
    return CELL_WEIGHT_COPIES * 4 * params


class MemoryBudget:
    """Admits cells while their estimated bytes fit; one cell always runs, however large."""

    def __init__(self, total_bytes: int | None = None):
        self.total = int(total_bytes if total_bytes is not None else DEFAULT_SHARE * psutil.virtual_memory().available)
        self.used = 0

    def admit(self, nbytes: int) -> bool:
        if self.used and self.used + nbytes > self.total:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
