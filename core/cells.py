"""The sweep's grid: its cells, the records its models leave, and the keys and folders that make a
rerun resume.

A finished cell's row lives at ``cells/<key>/row.json``, where the key hashes the model's weights,
the data, the cell and the bitsweep version: a rerun finds it and does nothing, and an interrupted
sweep redoes only the cells without a row. Cells that differ only in their kernel path share one
packed file (``packed/<key>/``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from bitsweep import __version__
from bitsweep.config import Calibration, Sweep, Synthetic
from bitsweep.models import ModelSpec
from bitsweep.policy import Policy
from bitsweep.registry import get_registry


FP32_LOGITS = "fp32_logits.safetensors"  # in a model's folder: fp32 logits (and labels) on the evaluation data


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def variant_words(granularity: str | None, group_size: int | None, policy: str | None, recipe: str | None,
                  kernel: str | None) -> list[str]:
    """What sets a cell apart beyond its model, scheme and width, as words for labels: each setting that
    is not the default (per-channel, all layers, plain rounding, the weight-only path)."""
    words = []
    if granularity not in (None, "", "channel"):
        words.append(granularity + (str(group_size) if group_size else ""))
    defaults = ((policy, ("full",)), (recipe, ("none",)), (kernel, ("weight-only", "fp32")))  # fp32: baseline rows
    return words + [value for value, default in defaults if value not in (None, "", *default)]


class Cell(BaseModel):
    """One point of the grid for one model."""

    model_config = ConfigDict(frozen=True)

    model: str
    scheme: str
    bits: int
    granularity: str
    group_size: int | None
    policy: Policy
    recipe: str = "none"
    kernel: str = "weight-only"
    # The images the cell's data-free steps read, set where it has any: synthesised, or real ones.
    synthetic: Synthetic | None = None
    calibration: Calibration | None = None

    @property
    def uses_data(self) -> bool:
        """Whether the cell reads calibration inputs: a recipe, ``allocate``, or the int8 path's activation ranges."""
        return self.recipe != "none" or self.policy.allocate or self.kernel == "int8"

    @property
    def data(self) -> str:
        """What its data-free steps read, for tables: "" (none), "synthetic" or "DATASET SPLIT N" (real images)."""
        if self.calibration is not None:
            return self.calibration.label
        if self.synthetic is None:
            return ""
        settings = "" if self.synthetic == Synthetic() else f" {self.synthetic.images or 'auto'}x{self.synthetic.steps}"
        return f"synthetic{settings}"

    @property
    def packing(self) -> Cell:
        """The cell that makes this one's packed file: the same with the default kernel path."""
        packing = self.model_copy(update={"kernel": "weight-only"})
        return packing if packing.uses_data else packing.model_copy(update={"synthetic": None, "calibration": None})

    @property
    def label(self) -> str:
        variant = variant_words(self.granularity, self.group_size, self.policy.label, self.recipe, self.kernel)
        return " ".join([f"{self.model} {self.scheme} {self.bits}b", *variant])


class ModelRecord(BaseModel):
    """What the load step left behind for one model; cells read everything else from ``dir``."""

    model: str
    dir: Path
    arch: str
    arch_kwargs: dict
    input_size: tuple[int, ...]  # of the evaluation images: what every input made or drawn for it must have
    weights_hash: str
    data_hash: str
    params: int
    baseline: dict


def expand_models(sweep: Sweep) -> list[ModelSpec]:
    """The sweep's concrete models in order; one that two entries (overlapping globs) stand for runs once."""
    registry = get_registry()
    found = {}
    for spec in sweep.models:
        for concrete in registry.get("model source", spec.source).expand(spec):
            found.setdefault(json.dumps(concrete.model_dump(), sort_keys=True, default=str), concrete)
    return list(found.values())


def plan_cells(sweep: Sweep, model: str) -> list[Cell]:
    cells = [Cell(model=model, scheme=scheme, bits=bits, granularity=granularity,
                  group_size=sweep.group_size if granularity == "group" else None, policy=policy, recipe=recipe,
                  kernel=kernel)
             for scheme in sweep.schemes for bits in sweep.bits for granularity in sweep.granularity
             for policy in sweep.policies for recipe in sweep.recipes for kernel in sweep.kernels]
    data = {"calibration": sweep.calibration} if sweep.calibration else {"synthetic": sweep.synthetic}
    return [cell.model_copy(update=data) if cell.uses_data else cell for cell in cells]


def model_dir(sweep: Sweep, spec: ModelSpec) -> Path:
    key = _digest(spec.model_dump(), sweep.dataset.model_dump(), __version__)[:10]
    return sweep.run_dir / "models" / f"{spec.id}-{key}"


def find_record(sweep: Sweep, spec: ModelSpec) -> ModelRecord | None:
    """The model's record when an earlier run prepared it, else None."""
    path = model_dir(sweep, spec) / "record.json"
    return ModelRecord.model_validate_json(path.read_text()) if path.exists() else None


def cell_key(record: ModelRecord, cell: Cell) -> str:
    fields = cell.model_dump(mode="json", exclude={key for key in ("synthetic", "calibration")
                                                   if getattr(cell, key) is None})
    return _digest(record.weights_hash, record.data_hash, fields, __version__)


def cell_dir(sweep: Sweep, record: ModelRecord, cell: Cell) -> Path:
    return sweep.run_dir / "cells" / f"{cell.label.replace(' ', '_')}-{cell_key(record, cell)[:10]}"


def cached_row(sweep: Sweep, record: ModelRecord, cell: Cell) -> dict | None:
    path = cell_dir(sweep, record, cell) / "row.json"
    return json.loads(path.read_text()) if path.exists() else None


def pack_dir(sweep: Sweep, record: ModelRecord, cell: Cell) -> Path:
    packing = cell.packing
    return sweep.run_dir / "packed" / f"{packing.label.replace(' ', '_')}-{cell_key(record, packing)[:10]}"
