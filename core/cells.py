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
from bitsweep.config import Sweep, Synthetic
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
    synthetic: Synthetic | None = None  # set where the cell uses synthetic data and the sweep's are not the default

    @property
    def uses_synthetic(self) -> bool:
        """Whether quantizing this cell runs a data-free step (a recipe, or ``allocate``)."""
        return self.recipe != "none" or self.policy.allocate

    @property
    def packing(self) -> Cell:
        """The cell that makes this one's packed file: the same with the default kernel path."""
        return self.model_copy(update={"kernel": "weight-only"})

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


def check_sweeps(sweeps: list[Sweep], data_here: bool = True) -> None:
    """Fail in one line on what would fail every cell -- a model name or glob that matches nothing, a
    dataset's missing files or misspelt options -- before anything runs or is written. With
    ``data_here`` False (cells run on an existing Dask cluster, whose workers hold the data and this
    machine may not) datasets are left to the cells."""
    registry = get_registry()
    for sweep in sweeps:
        expand_models(sweep)
        if not data_here:
            continue
        with registry.blame("dataset", sweep.dataset.name):
            registry.get("dataset", sweep.dataset.name).check(sweep.dataset.options)


def plan_cells(sweep: Sweep, model: str) -> list[Cell]:
    cells = [Cell(model=model, scheme=scheme, bits=bits, granularity=granularity,
                  group_size=sweep.group_size if granularity == "group" else None, policy=policy, recipe=recipe,
                  kernel=kernel)
             for scheme in sweep.schemes for bits in sweep.bits for granularity in sweep.granularity
             for policy in sweep.policies for recipe in sweep.recipes for kernel in sweep.kernels]
    if sweep.synthetic == Synthetic():  # the default: cells keep the keys they had before the setting existed
        return cells
    return [cell.model_copy(update={"synthetic": sweep.synthetic}) if cell.uses_synthetic else cell for cell in cells]


def model_dir(sweep: Sweep, spec: ModelSpec) -> Path:
    key = _digest(spec.model_dump(), sweep.dataset.model_dump(), __version__)[:10]
    return sweep.run_dir / "models" / f"{spec.id}-{key}"


def find_record(sweep: Sweep, spec: ModelSpec) -> ModelRecord | None:
    """The model's record when an earlier run prepared it, else None."""
    path = model_dir(sweep, spec) / "record.json"
    return ModelRecord.model_validate_json(path.read_text()) if path.exists() else None


def cell_key(record: ModelRecord, cell: Cell) -> str:
    fields = cell.model_dump(mode="json", exclude={"synthetic"} if cell.synthetic is None else set())
    return _digest(record.weights_hash, record.data_hash, fields, __version__)


def cell_dir(sweep: Sweep, record: ModelRecord, cell: Cell) -> Path:
    return sweep.run_dir / "cells" / f"{cell.label.replace(' ', '_')}-{cell_key(record, cell)[:10]}"


def cached_row(sweep: Sweep, record: ModelRecord, cell: Cell) -> dict | None:
    path = cell_dir(sweep, record, cell) / "row.json"
    return json.loads(path.read_text()) if path.exists() else None


def pack_dir(sweep: Sweep, record: ModelRecord, cell: Cell) -> Path:
    packing = cell.packing
    return sweep.run_dir / "packed" / f"{packing.label.replace(' ', '_')}-{cell_key(record, packing)[:10]}"
