"""The sweep's tables: the columns of a row, failed rows, and results.csv/profile.csv (each with its
JSON twin) in the run directory."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from safetensors.torch import load_file

from bitsweep.cells import FP32_LOGITS, Cell, ModelRecord
from bitsweep.cluster import superclass_scores
from bitsweep.config import Sweep
from bitsweep.files import atomic_path, write_json
from bitsweep.loaded import fp32_logits
from bitsweep.models import ModelSpec
from bitsweep.profile import STATS

COLUMNS = [
    "sweep", "model", "scheme", "bits", "granularity", "group_size", "policy", "recipe", "kernel", "calibration", "compiled",
    "status",
    "error",
    "top1", "top5", "agreement", "kl", "drop_top1", "delta_acc_pct", "super_k", "super_top1", "super_agreement",
    "super_top1_natural", "latency_b1_ms", "latency_batch_ms", "compile_seconds", "sqnr_db", "zero_fraction", "params",
    "quantized_layers", "bytes_stored", "entropy_bytes", "bytes_gzip", "bytes_7z", "bytes_zstd",
    "delta_size_pct", "seconds", "key",
]
IDENTITY = ["sweep", "model", "scheme", "bits", "granularity", "group_size", "policy", "recipe"]
PROFILE_COLUMNS = [*IDENTITY, "layer", "layer_bits", *STATS]


def identity(sweep: Sweep, cell: Cell) -> dict:
    """The columns that say which cell a row is."""
    return {"sweep": sweep.name, "model": cell.model, "scheme": cell.scheme, "bits": cell.bits,
            "granularity": cell.granularity, "group_size": cell.group_size, "policy": cell.policy.label,
            "recipe": cell.recipe, "kernel": cell.kernel, "calibration": cell.data}


def failed_row(sweep: Sweep, cell: Cell, error: str) -> dict:
    return identity(sweep, cell) | {"status": "failed", "error": error}


def failed_model_row(sweep: Sweep, spec: ModelSpec, error: str) -> dict:
    """The fp32 row of a model that could not be loaded or run: its cells are not planned."""
    return {"sweep": sweep.name, "model": spec.id, "scheme": "fp32", "bits": 32, "granularity": "", "policy": "",
            "recipe": "", "kernel": "fp32", "status": "failed", "error": error}


def add_superclass_scores(records: list[ModelRecord], rows: list[dict]) -> list[dict]:
    """Each row with its model's super-class scores, from its stored logits and the current clusters."""
    per_model = {}  # model -> (clusters, fp32 logits and labels), each read once
    for record in records:
        path = record.dir / "clusters.json"
        clusters = json.loads(path.read_text()) if path.exists() else {"source": None}
        if clusters["source"] is not None:
            per_model[record.model] = (clusters, fp32_logits(record), record)
    scored = []
    for row in rows:
        if row["status"] != "ok" or row["model"] not in per_model:
            scored.append(row)
            continue
        clusters, reference, record = per_model[row["model"]]
        logits_path = Path(row["logits"]) if row.get("logits") else record.dir / FP32_LOGITS
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


def _write_table(path: Path, columns: list[str], rows: list[dict]) -> None:
    """``path`` as CSV (floats to 6 significant digits) and beside it the same rows as JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
    write_json(path.with_suffix(".json"), rows)


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
        row_identity = {k: row.get(k) for k in IDENTITY}
        profiles += [row_identity | layer for layer in json.loads(Path(path).read_text())]
    _write_table(sweep.run_dir / "profile.csv", PROFILE_COLUMNS, profiles)
    return rows
