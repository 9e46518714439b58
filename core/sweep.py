"""The sweep's steps as plain functions: load a model once, then per cell quantize and pack, profile,
evaluate on a kernel path, compress, and keep the row.

Every step writes files and returns small records, so an orchestrator (the Prefect flow in
``bitsweep.flows``) can run them anywhere and pass only paths around; ``cells`` holds the grid and
the keys that make a rerun resume, ``results`` the tables, ``analyses`` the per-model analyses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitsweep.cells import FP32_LOGITS, Cell, ModelRecord, cell_dir, cell_key, model_dir, pack_dir
from bitsweep.compile import load_packed
from bitsweep.compress import compress_file
from bitsweep.config import Sweep
from bitsweep.datasets import content_hash
from bitsweep.evaluate import accuracy, fidelity, latency_batch1, predict
from bitsweep.files import atomic_path, cache_dir, write_json
from bitsweep.kernels import extension
from bitsweep.loaded import calibration_images, eval_data, fp32_logits, fp32_module
from bitsweep.models import LoadContext, ModelSpec, weights_hash
from bitsweep.pack import code_entropy_bytes, read_packed, save_packed
from bitsweep.profile import profile_layers
from bitsweep.policy import quantizable_layers
from bitsweep.quantize import quantize_model
from bitsweep.registry import get_registry
from bitsweep.results import identity
from bitsweep.synthetic import synthetic_inputs
from bitsweep.tracing import TRACING, uses_models


def _measure(sweep: Sweep, module: torch.nn.Module, data, reference: torch.Tensor | None):
    """Metrics of one model on the sweep's data, and its logits."""
    logits, batch_ms = predict(module, data.images, sweep.evaluation.batch_size)
    row = {"latency_batch_ms": batch_ms, "latency_b1_ms": latency_batch1(module, data.images,
                                                                         sweep.evaluation.latency_repeats)}
    row |= accuracy(logits, data.labels)
    row |= fidelity(logits, logits if reference is None else reference)
    return row, logits


def _save_logits(path: Path, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Logits (and the labels they are scored against) kept so later steps need no model."""
    tensors = {"logits": logits.contiguous()} | ({} if labels is None else {"labels": labels.contiguous()})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)


@uses_models
def prepare_model(sweep: Sweep, spec: ModelSpec) -> ModelRecord:
    """The load step and the fp32 baseline, once per model: weights, logits and a baseline row on disk."""
    folder = model_dir(sweep, spec)
    started = time.perf_counter()
    registry = get_registry()
    dataset = registry.get("dataset", sweep.dataset.name)
    context = LoadContext(dataset=dataset, dataset_options=sweep.dataset.options, cache_dir=cache_dir())
    loaded = registry.get("model source", spec.source).load(spec, context)
    module = loaded.module.eval()
    weights = folder / "fp32.safetensors"
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp)
    data = eval_data(sweep, module)
    row, logits = _measure(sweep, module, data, None)
    _save_logits(folder / FP32_LOGITS, logits, data.labels)
    params = sum(p.numel() for p in module.parameters())
    fp32_bytes = weights.stat().st_size
    row |= {"sweep": sweep.name, "model": spec.id, "scheme": "fp32", "bits": 32, "granularity": "", "policy": "",
            "recipe": "", "kernel": "fp32",
            "status": "ok", "params": params, "quantized_layers": 0, "bytes_stored": fp32_bytes,
            "drop_top1": 0.0 if "top1" in row else None, "delta_acc_pct": 0.0, "delta_size_pct": 0.0}
    row |= compress_sizes(sweep, weights)
    row["seconds"] = time.perf_counter() - started
    record = ModelRecord(model=spec.id, dir=folder, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs,
                         input_size=tuple(data.images.shape[1:]),
                         weights_hash=weights_hash(module), data_hash=content_hash(data), params=params,
                         baseline=row)
    write_json(folder / "record.json", record.model_dump(mode="json"))  # last: its presence means it is ready
    return record


def _fp32_weights(record: ModelRecord) -> dict[str, torch.Tensor]:
    """Each Conv/Linear layer's fp32 weight, in module order."""
    return {name: layer.weight.detach() for name, layer in quantizable_layers(fp32_module(record))}


@uses_models
def profile_model(sweep: Sweep, record: ModelRecord) -> dict:
    """The profile step for fp32: every Conv/Linear weight distribution, once per model."""
    path = record.dir / "profile.json"
    if not path.exists():
        write_json(path, profile_layers(_fp32_weights(record), {}))
    return {"profile": str(path)}


@uses_models
def quantize_cell(sweep: Sweep, record: ModelRecord, cell: Cell) -> dict:
    """The quantize and pack steps: the cell's packed n-bit file, and what it holds (made once)."""
    folder = pack_dir(sweep, record, cell)
    path = folder / "model.safetensors"
    if (folder / "packed.json").exists() and path.exists():
        return json.loads((folder / "packed.json").read_text()) | {"packed": str(path)}
    module = fp32_module(record)
    data = quantize_data(sweep, module) if cell.uses_data else {}
    with get_registry().blame("scheme", cell.scheme):  # a plugin's bug fails the cell, naming the plugin
        quantized = quantize_model(module, cell.scheme, cell.bits, cell.granularity, cell.policy,
                                   group_size=cell.group_size, recipe=None if cell.recipe == "none" else cell.recipe,
                                   **data)
    save_packed(quantized, path, record.arch, record.arch_kwargs)
    info = {"packed": str(path), "quantized_layers": len(quantized.quantized_layers),
            "bytes_stored": path.stat().st_size, "entropy_bytes": code_entropy_bytes(quantized)}
    write_json(folder / "packed.json", info)  # last: its presence means the packed file is complete
    return info


@uses_models
def profile_cell(sweep: Sweep, record: ModelRecord, cell: Cell, packed: str) -> dict:
    """The profile step for a cell: the weight distributions its packed file really holds."""
    path = Path(packed).parent / "profile.json"
    if not path.exists():
        layers, _, _ = read_packed(packed)
        quantized = {name: (layer.dequantize(), layer.codes(), layer.bits) for name, layer in layers.items()}
        write_json(path, profile_layers(_fp32_weights(record), quantized))
    whole = json.loads(path.read_text())[-1]
    return {"sqnr_db": whole["sqnr_db"], "zero_fraction": whole["zero_fraction"], "profile": str(path)}


def quantize_data(sweep: Sweep, module: torch.nn.Module) -> dict:
    """What the model's data-free steps (recipes, ``allocate``, the int8 path's activation ranges) read, as
    ``quantize_model``'s keyword: the sweep's calibration images transformed for it, else its synthetic
    settings (not the set: ``allocate``'s cache is keyed on them) -- never the evaluation images."""
    if sweep.calibration is not None:
        return {"calibration": calibration_images(sweep, module)}
    return {"synthetic": sweep.synthetic.settings()}


def sweep_inputs(sweep: Sweep, record: ModelRecord) -> torch.Tensor:
    """The inputs ``quantize_data`` names, as a tensor."""
    module = fp32_module(record)
    data = quantize_data(sweep, module)
    return data["calibration"] if "calibration" in data else synthetic_inputs(module, data["synthetic"])


@uses_models
def calibration_data(sweep: Sweep, record: ModelRecord) -> dict:
    """The inputs the model's data-free cells will read, synthesised (or found in the cache) or loaded once,
    before the cells run in parallel: on every core, and not once per cell waiting on the first."""
    images = sweep_inputs(sweep, record)
    return {"images": len(images), "shape": list(images.shape[1:]),
            "source": "synthetic" if sweep.calibration is None else sweep.calibration.label}


def compile_kernels() -> dict:
    """The compile step: build (or find in the cache) this machine's packed kernels."""
    return {"compiled": extension() is not None}


def evaluate_cell(sweep: Sweep, record: ModelRecord, cell: Cell, packed: str) -> dict:
    """The evaluate step, on the model rebuilt from its packed file and run on the cell's kernel path."""
    # The int8 path traces the model: it holds the lock exclusively until every batch shape is compiled.
    with TRACING.exclusive() if cell.kernel == "int8" else TRACING.shared():
        data = eval_data(sweep, fp32_module(record))
        calibration = list(sweep_inputs(sweep, record).split(sweep.evaluation.batch_size)) \
            if cell.kernel == "int8" else None  # the activation ranges
        module = load_packed(Path(packed), cell.kernel, calibration=calibration)
        compile_seconds = _compile_batches(module, data.images, sweep.evaluation.batch_size) \
            if cell.kernel == "int8" else None
    with TRACING.shared():
        row, logits = _measure(sweep, module, data, fp32_logits(record)["logits"])
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
    row = identity(sweep, cell) | {"status": "ok", "params": record.params, "key": cell_key(record, cell),
                                   "seconds": seconds}
    for part in parts.values():
        row |= {k: v for k, v in part.items() if k != "packed"}
    if "top1" in row:
        row["drop_top1"] = base["top1"] - row["top1"]
        row["delta_acc_pct"] = 100 * row["drop_top1"] / base["top1"] if base["top1"] else None
    else:
        row["delta_acc_pct"] = 100 - row["agreement"]
    row["delta_size_pct"] = 100 * (1 - row["bytes_stored"] / base["bytes_stored"])
    write_json(cell_dir(sweep, record, cell) / "row.json", row)
    return row
