"""The sweep as plain functions: plan the cells, prepare each model once, run a cell, keep results.

Every step writes files and returns small records, so an orchestrator (the Prefect
flow in ``bitsweep.flows``) can run them anywhere and pass only paths around.
A finished cell's row lives at ``cells/<key>/row.json``, where the key hashes the
model's weights, the data, the cell and the bitsweep version: a rerun finds it and
does nothing, and an interrupted sweep redoes only the cells without a row. Cells that
differ only in their kernel path share one packed file (``packed/<key>/``).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import time
from pathlib import Path

import timm
import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from bitsweep.compress import compress_file
from bitsweep.config import Sweep
from bitsweep.datasets import content_hash
from bitsweep.evaluate import accuracy, fidelity, latency_batch1, predict
from bitsweep.files import atomic_path
from bitsweep.int8 import TRACING
from bitsweep.models import LoadContext, ModelSpec, weights_hash
from bitsweep.pack import code_entropy_bytes, load_packed, save_packed
from bitsweep.quantize import Policy, quantize_model
from bitsweep.registry import get_registry

CALIBRATION_IMAGES = 16

COLUMNS = [
    "sweep", "model", "scheme", "bits", "granularity", "group_size", "policy", "kernel", "compiled", "status", "error",
    "top1", "top5", "agreement", "kl", "drop_top1", "delta_acc_pct", "latency_b1_ms", "latency_batch_ms",
    "params", "quantized_layers", "bytes_stored", "entropy_bytes", "bytes_gzip", "bytes_7z", "bytes_zstd",
    "delta_size_pct", "seconds", "key",
]


def _version() -> str:
    from bitsweep import __version__

    return __version__


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where trained models are kept across runs: $BITSWEEP_CACHE or the user cache folder."""
    import platformdirs

    return Path(os.environ.get("BITSWEEP_CACHE") or platformdirs.user_cache_dir("bitsweep"))


class Cell(BaseModel):
    """One point of the grid for one model."""

    model_config = ConfigDict(frozen=True)

    model: str
    scheme: str
    bits: int
    granularity: str
    group_size: int | None
    policy: Policy
    kernel: str = "weight-only"

    @property
    def packing(self) -> Cell:
        """The cell that makes this one's packed file: the same with the default kernel path."""
        return self.model_copy(update={"kernel": "weight-only"})

    @property
    def label(self) -> str:
        extra = "" if self.granularity == "channel" else f" {self.granularity}"
        extra += f"{self.group_size}" if self.group_size else ""
        extra += "" if self.policy.label == "full" else f" {self.policy.label}"
        extra += "" if self.kernel == "weight-only" else f" {self.kernel}"
        return f"{self.model} {self.scheme} {self.bits}b{extra}"


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
    registry = get_registry()
    return [concrete for spec in sweep.models for concrete in registry.get("model source", spec.source).expand(spec)]


def plan_cells(sweep: Sweep, model: str) -> list[Cell]:
    return [Cell(model=model, scheme=scheme, bits=bits, granularity=granularity,
                 group_size=sweep.group_size if granularity == "group" else None, policy=policy, kernel=kernel)
            for scheme in sweep.schemes for bits in sweep.bits
            for granularity in sweep.granularity for policy in sweep.policies for kernel in sweep.kernels]


@functools.lru_cache(maxsize=8)
def _eval_data(dataset: str, options_json: str, data_config_json: str):
    data_config = json.loads(data_config_json)
    return get_registry().get("dataset", dataset).load("test", json.loads(options_json), data_config)


def eval_data(sweep: Sweep, module: torch.nn.Module):
    """The sweep's test split, transformed for this model (loaded once per process)."""
    config = timm.data.resolve_data_config({}, model=module)
    return _eval_data(sweep.dataset.name, json.dumps(sweep.dataset.options, sort_keys=True),
                      json.dumps(config, sort_keys=True, default=list))


@functools.lru_cache(maxsize=4)
def _fp32_module(record_dir: Path, arch: str, arch_kwargs_json: str) -> torch.nn.Module:
    model = timm.create_model(arch, pretrained=False, **json.loads(arch_kwargs_json))
    model.load_state_dict(load_file(record_dir / "fp32.safetensors"), strict=True)
    return model.eval()


def fp32_module(record: ModelRecord) -> torch.nn.Module:
    """The model's fp32 weights, loaded once per process and shared read-only by its cells."""
    return _fp32_module(record.dir, record.arch, json.dumps(record.arch_kwargs, sort_keys=True))


def _write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))


def _measure(sweep: Sweep, module: torch.nn.Module, data, reference: torch.Tensor | None):
    """Metrics of one model on the sweep's data, and its logits."""
    logits, batch_ms = predict(module, data.images, sweep.evaluation.batch_size)
    row = {"latency_batch_ms": batch_ms, "latency_b1_ms": latency_batch1(module, data.images,
                                                                         sweep.evaluation.latency_repeats)}
    row |= accuracy(logits, data.labels)
    row |= fidelity(logits, logits if reference is None else reference)
    return row, logits


def _model_dir(sweep: Sweep, spec: ModelSpec) -> Path:
    key = _digest(spec.model_dump(), sweep.dataset.model_dump(), _version())[:10]
    return sweep.run_dir / "models" / f"{spec.id}-{key}"


def find_record(sweep: Sweep, spec: ModelSpec) -> ModelRecord | None:
    """The model's record when an earlier run prepared it, else None."""
    path = _model_dir(sweep, spec) / "record.json"
    return ModelRecord.model_validate_json(path.read_text()) if path.exists() else None


def prepare_model(sweep: Sweep, spec: ModelSpec) -> ModelRecord:
    """The load step and the fp32 baseline, once per model: weights, logits and a baseline row on disk."""
    model_dir = _model_dir(sweep, spec)
    record_path = model_dir / "record.json"
    started = time.perf_counter()
    registry = get_registry()
    dataset = registry.get("dataset", sweep.dataset.name)
    context = LoadContext(dataset=dataset, dataset_options=sweep.dataset.options, cache_dir=cache_dir())
    loaded = registry.get("model source", spec.source).load(spec, context)
    module = loaded.module.eval()
    weights = model_dir / "fp32.safetensors"
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp)
    data = eval_data(sweep, module)
    row, logits = _measure(sweep, module, data, None)
    with atomic_path(model_dir / "fp32_logits.safetensors") as tmp:
        save_file({"logits": logits.contiguous()}, tmp)
    params = sum(p.numel() for p in module.parameters())
    fp32_bytes = weights.stat().st_size
    row |= {"sweep": sweep.name, "model": spec.id, "scheme": "fp32", "bits": 32, "granularity": "", "policy": "",
            "kernel": "fp32",
            "status": "ok", "params": params, "quantized_layers": 0, "bytes_stored": fp32_bytes,
            "drop_top1": 0.0 if "top1" in row else None, "delta_acc_pct": 0.0, "delta_size_pct": 0.0}
    row |= compress_sizes(sweep, weights)
    row["seconds"] = time.perf_counter() - started
    record = ModelRecord(model=spec.id, dir=model_dir, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs,
                         weights_hash=weights_hash(module), data_hash=content_hash(data), params=params,
                         baseline=row)
    _write_json(record_path, record.model_dump(mode="json"))  # last: its presence means the model is ready
    return record


def cell_key(record: ModelRecord, cell: Cell) -> str:
    return _digest(record.weights_hash, record.data_hash, cell.model_dump(mode="json"), _version())


def cell_dir(sweep: Sweep, record: ModelRecord, cell: Cell) -> Path:
    return sweep.run_dir / "cells" / f"{cell.label.replace(' ', '_')}-{cell_key(record, cell)[:10]}"


def cached_row(sweep: Sweep, record: ModelRecord, cell: Cell) -> dict | None:
    path = cell_dir(sweep, record, cell) / "row.json"
    return json.loads(path.read_text()) if path.exists() else None


def pack_dir(sweep: Sweep, record: ModelRecord, cell: Cell) -> Path:
    packing = cell.packing
    return sweep.run_dir / "packed" / f"{packing.label.replace(' ', '_')}-{cell_key(record, packing)[:10]}"


def quantize_cell(sweep: Sweep, record: ModelRecord, cell: Cell) -> dict:
    """The quantize and pack steps: the cell's packed n-bit file, and what it holds (made once)."""
    folder = pack_dir(sweep, record, cell)
    path = folder / "model.safetensors"
    if (folder / "packed.json").exists() and path.exists():
        return json.loads((folder / "packed.json").read_text()) | {"packed": str(path)}
    with TRACING.shared():
        quantized = quantize_model(fp32_module(record), cell.scheme, cell.bits, cell.granularity, cell.policy,
                                   group_size=cell.group_size)
        save_packed(quantized, path, record.arch, record.arch_kwargs)
    info = {"packed": str(path), "quantized_layers": len(quantized.quantized_layers),
            "bytes_stored": path.stat().st_size, "entropy_bytes": code_entropy_bytes(quantized)}
    _write_json(folder / "packed.json", info)  # last: its presence means the packed file is complete
    return info


def compile_kernels() -> dict:
    """The compile step: build (or find in the cache) this machine's packed kernels."""
    from bitsweep.kernels import extension

    return {"compiled": extension() is not None}


def evaluate_cell(sweep: Sweep, record: ModelRecord, cell: Cell, packed: str) -> dict:
    """The evaluate step, on the model rebuilt from its packed file and run on the cell's kernel path."""
    from bitsweep.kernels import extension

    # Models are built and run under TRACING.shared(): an int8 conversion in another thread must not
    # trace them; this cell's own conversion (int8) holds the lock exclusively from the start.
    with TRACING.exclusive() if cell.kernel == "int8" else TRACING.shared():
        data = eval_data(sweep, fp32_module(record))
        # The int8 path's activation ranges come from a few of the sweep's own images (labels unused).
        calibration = [data.images[:CALIBRATION_IMAGES]] if cell.kernel == "int8" else None
        module = load_packed(Path(packed), cell.kernel, calibration=calibration)
    reference = load_file(record.dir / "fp32_logits.safetensors")["logits"]
    with TRACING.shared():
        row, _ = _measure(sweep, module, data, reference)
    return row | {"compiled": extension() is not None if cell.kernel == "weight-only" else None}


def compress_sizes(sweep: Sweep, path: Path) -> dict:
    """The compress step: archive ``path`` with each of the sweep's compressors; bytes of each."""
    sizes = {}
    for name in sweep.compressors:
        suffix = get_registry().get("compressor", name).suffix
        archive = Path(f"{path}{suffix}")  # archives are written atomically: one that exists is whole
        sizes[f"bytes_{name}"] = (archive if archive.exists() else compress_file(Path(path), name)).stat().st_size
    return sizes


def finish_cell(sweep: Sweep, record: ModelRecord, cell: Cell, packed: dict, metrics: dict, sizes: dict,
                seconds: float) -> dict:
    """Assemble the cell's row, with deltas against fp32 as in the paper's tables, and keep it."""
    base = record.baseline
    row = _identity(sweep, cell) | {"status": "ok", "params": record.params, "key": cell_key(record, cell),
                                    "seconds": seconds}
    row |= {k: v for k, v in packed.items() if k != "packed"} | metrics | sizes
    if "top1" in row:
        row["drop_top1"] = base["top1"] - row["top1"]
        row["delta_acc_pct"] = 100 * row["drop_top1"] / base["top1"] if base["top1"] else None
    else:
        row["delta_acc_pct"] = 100 - row["agreement"]
    row["delta_size_pct"] = 100 * (1 - row["bytes_stored"] / base["bytes_stored"])
    _write_json(cell_dir(sweep, record, cell) / "row.json", row)
    return row


def _identity(sweep: Sweep, cell: Cell) -> dict:
    return {"sweep": sweep.name, "model": cell.model, "scheme": cell.scheme, "bits": cell.bits,
            "granularity": cell.granularity, "group_size": cell.group_size, "policy": cell.policy.label,
            "kernel": cell.kernel}


def failed_row(sweep: Sweep, cell: Cell, error: str) -> dict:
    return _identity(sweep, cell) | {"status": "failed", "error": error}


def write_results(sweep: Sweep, rows: list[dict]) -> Path:
    """results.csv and results.json in the run directory, each replaced atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(sweep.run_dir / "results.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    _write_json(sweep.run_dir / "results.json", rows)
    return sweep.run_dir / "results.csv"
