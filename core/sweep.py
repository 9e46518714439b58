"""The sweep as plain functions: plan the cells, prepare each model once, run a cell, keep results.

Every step writes files and returns small records, so an orchestrator (the Prefect
flow in ``bitsweep.flows``) can run them anywhere and pass only paths around.
A finished cell's row lives at ``cells/<key>/row.json``, where the key hashes the
model's weights, the data, the cell and the bitsweep version: a rerun finds it and
does nothing, and an interrupted sweep redoes only the cells without a row. Cells that
differ only in their kernel path share one packed file (``packed/<key>/``).
"""

from __future__ import annotations

import copy
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

from bitsweep.cluster import (
    cluster_classes,
    confusion_distances,
    confusion_matrix,
    superclass_scores,
    weight_distances,
)
from bitsweep.compress import compress_file
from bitsweep.config import Sweep
from bitsweep.datasets import content_hash
from bitsweep.errors import BitsweepError
from bitsweep.evaluate import accuracy, fidelity, latency_batch1, predict
from bitsweep.files import atomic_path
from bitsweep.int8 import TRACING
from bitsweep.models import LoadContext, ModelSpec, weights_hash
from bitsweep.pack import code_entropy_bytes, load_packed, read_packed, save_packed
from bitsweep.profile import STATS, profile_layers
from bitsweep.quantize import Policy, quantizable_layers, quantize_model
from bitsweep.registry import get_registry
from bitsweep.schemes import quantize_tensor

CALIBRATION_IMAGES = 16

COLUMNS = [
    "sweep", "model", "scheme", "bits", "granularity", "group_size", "policy", "recipe", "kernel", "compiled", "status",
    "error",
    "top1", "top5", "agreement", "kl", "drop_top1", "delta_acc_pct", "super_k", "super_top1", "super_agreement",
    "super_top1_natural", "latency_b1_ms", "latency_batch_ms", "compile_seconds", "sqnr_db", "zero_fraction", "params",
    "quantized_layers", "bytes_stored", "entropy_bytes", "bytes_gzip", "bytes_7z", "bytes_zstd",
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
    recipe: str = "none"
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
        extra += "" if self.recipe == "none" else f" {self.recipe}"
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
    return [Cell(model=model, scheme=scheme, bits=bits, granularity=granularity,
                 group_size=sweep.group_size if granularity == "group" else None, policy=policy, recipe=recipe,
                 kernel=kernel)
            for scheme in sweep.schemes for bits in sweep.bits for granularity in sweep.granularity
            for policy in sweep.policies for recipe in sweep.recipes for kernel in sweep.kernels]


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
    _save_logits(model_dir / "fp32_logits.safetensors", logits, data.labels)
    params = sum(p.numel() for p in module.parameters())
    fp32_bytes = weights.stat().st_size
    row |= {"sweep": sweep.name, "model": spec.id, "scheme": "fp32", "bits": 32, "granularity": "", "policy": "",
            "recipe": "", "kernel": "fp32",
            "status": "ok", "params": params, "quantized_layers": 0, "bytes_stored": fp32_bytes,
            "drop_top1": 0.0 if "top1" in row else None, "delta_acc_pct": 0.0, "delta_size_pct": 0.0}
    row |= compress_sizes(sweep, weights)
    row["seconds"] = time.perf_counter() - started
    record = ModelRecord(model=spec.id, dir=model_dir, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs,
                         weights_hash=weights_hash(module), data_hash=content_hash(data), params=params,
                         baseline=row)
    _write_json(record_path, record.model_dump(mode="json"))  # last: its presence means the model is ready
    return record


def _save_logits(path: Path, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Logits (and the labels they are scored against) kept so later steps need no model."""
    tensors = {"logits": logits.contiguous()} | ({} if labels is None else {"labels": labels.contiguous()})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)


def _fp32_weights(record: ModelRecord) -> dict[str, torch.Tensor]:
    """Each Conv/Linear layer's fp32 weight, in module order."""
    with TRACING.shared():
        return {name: layer.weight.detach() for name, layer in quantizable_layers(fp32_module(record))}


def profile_model(sweep: Sweep, record: ModelRecord) -> dict:
    """The profile step for fp32: every Conv/Linear weight distribution, once per model."""
    path = record.dir / "profile.json"
    if not path.exists():
        _write_json(path, profile_layers(_fp32_weights(record), {}))
    return {"profile": str(path)}


def cluster_model(sweep: Sweep, record: ModelRecord) -> dict:
    """The cluster step: class hierarchies from the classifier's weights and from fp32's confusions.

    Redone only when the sweep's clustering settings change; cells need not be rerun, since
    super-class scores are computed from their stored logits when results are written.
    """
    path = record.dir / "clusters.json"
    settings = sweep.clustering.model_dump()
    if path.exists() and json.loads(path.read_text())["settings"] == settings:
        return {"clusters": str(path)}
    saved = load_file(record.dir / "fp32_logits.safetensors")
    logits, labels = saved["logits"], saved.get("labels")
    classes = logits.shape[1]
    k = None if settings["k"] == "auto" else settings["k"]
    views = {}
    with TRACING.shared():
        module = fp32_module(record)
        weight = getattr(module.get_classifier(), "weight", None)
        data = eval_data(sweep, module)
    if weight is not None and weight.shape[0] == classes:
        views["weights"] = cluster_classes(weight_distances(weight.detach().reshape(classes, -1).numpy()), k)
    if labels is not None:
        views["confusion"] = cluster_classes(confusion_distances(confusion_matrix(logits.argmax(1), labels, classes)),
                                             k)
    source = settings["source"]
    if source == "auto":  # confusion on labelled data, else weights, else (no classifier matrix) none
        source = next((view for view in ("confusion", "weights") if view in views), None)
    elif source not in views:
        why = "the dataset has no labels" if source == "confusion" else "the classifier has no weight matrix"
        raise BitsweepError(f"sweep {sweep.name!r}, model {record.model}: cannot cluster classes by {source} "
                            f"({why}); set clustering.source to "
                            f"{'weights' if source == 'confusion' else 'confusion'} in flows.yaml")
    natural = None
    if data.superclasses:
        names = list(data.superclasses)
        group_of = {cls: names.index(group) for group, members in data.superclasses.items() for cls in members}
        natural = {"names": names, "groups": [group_of[cls] for cls in data.class_names]}
    names = data.class_names if len(data.class_names) == classes else [str(i) for i in range(classes)]
    _write_json(path, {"settings": settings, "source": source, "class_names": names, "natural": natural,
                       **views})
    return {"clusters": str(path)}


def layer_sensitivity(sweep: Sweep, record: ModelRecord) -> dict:
    """Top-1 (or agreement with fp32) when only one layer is quantized, for every layer and width.

    Runs on the first ``sensitivity.images`` evaluation images; redone only when the settings change.
    """
    settings = sweep.sensitivity.model_dump() | {"bits": sweep.bits, "granularity": sweep.granularity[0],
                                                 "group_size": sweep.group_size}
    path = record.dir / "sensitivity.json"
    if not settings["images"] or (path.exists() and json.loads(path.read_text())["settings"] == settings):
        return {"sensitivity": str(path) if path.exists() else None}
    with TRACING.shared():
        module = copy.deepcopy(fp32_module(record))
        data = eval_data(sweep, module)
        images = data.images[:settings["images"]]
        saved = load_file(record.dir / "fp32_logits.safetensors")
        reference = saved["logits"][: len(images)]
        labels = None if data.labels is None else data.labels[: len(images)]
        metric = "top1" if labels is not None else "agreement"

        def score(logits):
            return accuracy(logits, labels)["top1"] if labels is not None else fidelity(logits, reference)["agreement"]

        base = score(reference)
        rows = []
        for scheme in sweep.sensitivity.schemes or sweep.schemes[:1]:
            for bits in sweep.bits:
                for name, layer in quantizable_layers(module):
                    original = layer.weight.detach().clone()
                    with torch.no_grad():
                        layer.weight.copy_(quantize_tensor(original, scheme, bits, settings["granularity"],
                                                           settings["group_size"]).dequantize())
                    value = score(predict(module, images, sweep.evaluation.batch_size)[0])
                    with torch.no_grad():
                        layer.weight.copy_(original)
                    rows.append({"layer": name, "scheme": scheme, "bits": bits, metric: value, "drop": base - value})
    _write_json(path, {"settings": settings, "metric": metric, "fp32": base, "rows": rows})
    return {"sensitivity": str(path)}


def add_superclass_scores(records: list[ModelRecord], rows: list[dict]) -> list[dict]:
    """Each row with its model's super-class scores, from its stored logits and the current clusters."""
    per_model = {}  # model -> (clusters, fp32 logits and labels), each read once
    for record in records:
        path = record.dir / "clusters.json"
        clusters = json.loads(path.read_text()) if path.exists() else {"source": None}
        if clusters["source"] is not None:
            per_model[record.model] = (clusters, load_file(record.dir / "fp32_logits.safetensors"), record)
    scored = []
    for row in rows:
        if row["status"] != "ok" or row["model"] not in per_model:
            scored.append(row)
            continue
        clusters, reference, record = per_model[row["model"]]
        logits_path = Path(row["logits"]) if row.get("logits") else record.dir / "fp32_logits.safetensors"
        if not logits_path.exists():
            scored.append(row)
            continue
        logits = load_file(logits_path)["logits"]
        chosen = clusters[clusters["source"]]
        scores = superclass_scores(logits, reference.get("labels"), reference["logits"], chosen["groups"])
        scores["super_k"] = chosen["k"]
        if clusters["natural"] and "labels" in reference:
            natural = superclass_scores(logits, reference["labels"], reference["logits"],
                                        clusters["natural"]["groups"])
            scores["super_top1_natural"] = natural["super_top1"]
        scored.append(row | scores)
    return scored


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
        with get_registry().blame("scheme", cell.scheme):  # a plugin's bug fails the cell, naming the plugin
            quantized = quantize_model(fp32_module(record), cell.scheme, cell.bits, cell.granularity, cell.policy,
                                       group_size=cell.group_size, recipe=None if cell.recipe == "none" else cell.recipe)
        save_packed(quantized, path, record.arch, record.arch_kwargs)
    info = {"packed": str(path), "quantized_layers": len(quantized.quantized_layers),
            "bytes_stored": path.stat().st_size, "entropy_bytes": code_entropy_bytes(quantized)}
    _write_json(folder / "packed.json", info)  # last: its presence means the packed file is complete
    return info


def profile_cell(sweep: Sweep, record: ModelRecord, cell: Cell, packed: str) -> dict:
    """The profile step for a cell: the weight distributions its packed file really holds."""
    path = Path(packed).parent / "profile.json"
    if not path.exists():
        layers, _, _ = read_packed(packed)
        quantized = {name: (layer.dequantize(), layer.codes(), layer.bits) for name, layer in layers.items()}
        _write_json(path, profile_layers(_fp32_weights(record), quantized))
    whole = json.loads(path.read_text())[-1]
    return {"sqnr_db": whole["sqnr_db"], "zero_fraction": whole["zero_fraction"], "profile": str(path)}


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
        compile_seconds = _compile_batches(module, data.images, sweep.evaluation.batch_size) \
            if cell.kernel == "int8" else None
    reference = load_file(record.dir / "fp32_logits.safetensors")["logits"]
    with TRACING.shared():
        row, logits = _measure(sweep, module, data, reference)
    logits_path = cell_dir(sweep, record, cell) / "logits.safetensors"
    _save_logits(logits_path, logits, None)
    return row | {"compiled": extension() is not None if cell.kernel == "weight-only" else None,
                  "compile_seconds": compile_seconds, "logits": str(logits_path)}


def _compile_batches(module: torch.nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """Seconds inductor spent compiling the int8 module: batch 1 in ``to_int8``, then here the batch
    shapes ``predict`` will use, so that no compilation lands in a timed run (or outside the lock)."""
    start = time.perf_counter()
    for size in {min(batch_size, len(images)), len(images) % batch_size} - {0, 1}:
        module(images[:size])
    return module.compile_seconds + time.perf_counter() - start


def compress_sizes(sweep: Sweep, path: Path) -> dict:
    """The compress step: archive ``path`` with each of the sweep's compressors; bytes of each."""
    sizes = {}
    for name in sweep.compressors:
        suffix = get_registry().get("compressor", name).suffix
        archive = Path(f"{path}{suffix}")  # archives are written atomically: one that exists is whole
        if not archive.exists():
            with get_registry().blame("compressor", name):
                compress_file(Path(path), name)
        sizes[f"bytes_{name}"] = archive.stat().st_size
    return sizes


def finish_cell(sweep: Sweep, record: ModelRecord, cell: Cell, parts: dict[str, dict], seconds: float) -> dict:
    """Assemble the cell's row from its steps' records, with deltas against fp32 as in the paper's tables,
    and keep it."""
    base = record.baseline
    row = _identity(sweep, cell) | {"status": "ok", "params": record.params, "key": cell_key(record, cell),
                                    "seconds": seconds}
    for part in parts.values():
        row |= {k: v for k, v in part.items() if k != "packed"}
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
            "recipe": cell.recipe, "kernel": cell.kernel}


def failed_row(sweep: Sweep, cell: Cell, error: str) -> dict:
    return _identity(sweep, cell) | {"status": "failed", "error": error}


def failed_model_row(sweep: Sweep, spec: ModelSpec, error: str) -> dict:
    """The fp32 row of a model that could not be loaded or run: its cells are not planned."""
    return {"sweep": sweep.name, "model": spec.id, "scheme": "fp32", "bits": 32, "granularity": "", "policy": "",
            "recipe": "", "kernel": "fp32", "status": "failed", "error": error}


def _write_table(path: Path, columns: list[str], rows: list[dict]) -> None:
    """``path`` as CSV (floats to 6 significant digits) and beside it the same rows as JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
    _write_json(path.with_suffix(".json"), rows)


IDENTITY = ["sweep", "model", "scheme", "bits", "granularity", "group_size", "policy", "recipe"]
PROFILE_COLUMNS = [*IDENTITY, "layer", "layer_bits", *STATS]


def write_results(sweep: Sweep, records: list[ModelRecord], rows: list[dict]) -> list[dict]:
    """results.csv/.json and profile.csv/.json in the run directory; the rows, with super-class scores."""
    rows = add_superclass_scores(records, rows)
    _write_table(sweep.run_dir / "results.csv", COLUMNS, rows)
    profiles, seen = [], set()
    by_model = {record.model: record for record in records}
    for row in rows:
        path = row.get("profile") or (row["scheme"] == "fp32" and row["model"] in by_model
                                      and by_model[row["model"]].dir / "profile.json")
        if not path or str(path) in seen or not Path(path).exists():
            continue
        seen.add(str(path))
        identity = {k: row.get(k) for k in IDENTITY}
        profiles += [identity | layer for layer in json.loads(Path(path).read_text())]
    _write_table(sweep.run_dir / "profile.csv", PROFILE_COLUMNS, profiles)
    return rows
