"""The sweep as a Prefect flow, shaped like the pipeline:

    load model ─► fp32 baseline ─► compile kernels ─► for each cell: quantize+pack ─► evaluate ∥ compress ─► row ─► results

Tasks pass paths and small records; the work is plain functions in ``bitsweep.sweep``.
Finished models and cells are found on disk and never submitted again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from bitsweep import sweep as steps
from bitsweep.config import Sweep, load_config
from bitsweep.errors import BitsweepError

# Called with each finished row (cached or new); the CLI sets it to drive its progress bar.
on_row: Callable[[dict, int], None] | None = None

_task = task(cache_policy=NO_CACHE, persist_result=False)


def _timed(function, *args) -> dict:
    start = time.perf_counter()
    result = function(*args)
    return result | {"step_seconds": time.perf_counter() - start}


@_task
def load_model(sweep: Sweep, spec) -> steps.ModelRecord:
    return steps.prepare_model(sweep, spec)


@_task
def quantize(sweep: Sweep, record: steps.ModelRecord, cell: steps.Cell) -> dict:
    return _timed(steps.quantize_cell, sweep, record, cell)


@_task
def compile_kernels() -> dict:
    return _timed(steps.compile_kernels)


@_task
def evaluate(sweep: Sweep, record: steps.ModelRecord, cell: steps.Cell, packed: str) -> dict:
    return _timed(steps.evaluate_cell, sweep, record, cell, packed)


@_task
def compress(sweep: Sweep, cell: steps.Cell, packed: str) -> dict:
    return _timed(steps.compress_sizes, sweep, packed)


def _named(step, cell: steps.Cell):
    return step.with_options(task_run_name=f"{step.name.replace('_', ' ')} {cell.label}")


def _load_models(sweep: Sweep) -> list[steps.ModelRecord]:
    """Each model once, one after another: loading may train, and training uses every core."""
    torch.set_num_threads(os.cpu_count() or 1)
    records = []
    for spec in steps.expand_models(sweep):
        record = steps.find_record(sweep, spec)
        records.append(record or load_model.with_options(task_run_name=f"load {spec.id}")(sweep, spec))
    return records


def _run_cells(sweep: Sweep, records: list[steps.ModelRecord], progress: Callable[[dict], None]) -> list[dict]:
    """Quantize and pack each missing cell once, then evaluate it on each kernel path while its
    packed file is compressed."""
    torch.set_num_threads(sweep.evaluation.threads)
    rows, running, parts, cells_by_pack = [], {}, {}, {}  # parts: cell key -> finished steps' results
    for record in records:
        for cell in steps.plan_cells(sweep, record.model):
            cached = steps.cached_row(sweep, record, cell)
            if cached:
                rows.append(cached)
                progress(cached)
                continue
            packing = cell.packing
            pack_key = steps.cell_key(record, packing)
            if pack_key not in cells_by_pack:
                cells_by_pack[pack_key] = []
                running[_named(quantize, packing).submit(sweep, record, packing)] = ("quantize", record, packing)
            cells_by_pack[pack_key].append(cell)

    def fail(record, cells, stage, exc):
        for cell in cells:
            parts[steps.cell_key(record, cell)] = None
            row = steps.failed_row(sweep, cell, f"{stage}: {type(exc).__name__}: {exc}")
            get_run_logger().error(f"{cell.label}: {row['error']}")
            rows.append(row)
            progress(row)

    while running:
        future = next(as_completed(list(running)))
        stage, record, cell = running.pop(future)
        cells = cells_by_pack[steps.cell_key(record, cell)] if stage in ("quantize", "compress") else [cell]
        cells = [c for c in cells if parts.get(steps.cell_key(record, c), {}) is not None]  # a sibling step failed
        try:
            result = future.result()
        except Exception as exc:
            fail(record, cells, stage, exc)
            continue
        if stage == "quantize":
            for each in cells:
                parts[steps.cell_key(record, each)] = {"quantize": dict(result)}
                running[_named(evaluate, each).submit(sweep, record, each, result["packed"])] = ("evaluate", record, each)
            running[_named(compress, cell).submit(sweep, cell, result["packed"])] = ("compress", record, cell)
            continue
        for each in cells:
            done = parts[steps.cell_key(record, each)]
            done[stage] = dict(result)
            if len(done) == 3:
                seconds = sum(part.pop("step_seconds") for part in done.values())
                row = steps.finish_cell(sweep, record, each, done["quantize"], done["evaluate"], done["compress"],
                                        seconds)
                rows.append(row)
                progress(row)
    return rows


def _markdown_summary(sweep: Sweep, rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok" and r["scheme"] != "fp32"]
    failed = [r for r in rows if r["status"] != "ok"]
    lines = [f"# Sweep `{sweep.name}`", "", f"{len(ok)} cells finished, {len(failed)} failed; "
             f"results in `{sweep.run_dir / 'results.csv'}`.", "",
             "| model | fp32 top-1 / agreement | fewest bits within 1 point of fp32 | scheme |", "|---|---|---|---|"]
    for base in (r for r in rows if r["scheme"] == "fp32"):
        metric = "top1" if base.get("top1") is not None else "agreement"
        good = [r for r in ok if r["model"] == base["model"] and r.get(metric) is not None
                and base[metric] - r[metric] <= 1.0]
        best = min(good, key=lambda r: (r["bits"], -r[metric]), default=None)
        lines.append(f"| {base['model']} | {base[metric]:.2f} | {best['bits'] if best else '—'} | "
                     f"{(best['scheme'] + ' ' + best['policy']) if best else '—'} |")
    for row in failed:
        lines.append(f"\n- failed: {row['model']} {row['scheme']} {row['bits']}b {row['policy']}: {row['error']}")
    return "\n".join(lines)


def run_sweep(sweep: Sweep) -> list[dict]:
    """One sweep inside the flow: models, cells, results files and Prefect artifacts."""
    records = _load_models(sweep)
    compile_kernels.with_options(task_run_name="compile kernels")()
    total = len(records) * len(steps.plan_cells(sweep, ""))
    progress_id = create_progress_artifact(0.0, key=f"{sweep.name}-progress", description=f"cells of {sweep.name}")
    finished = []

    def progress(row):
        finished.append(row)
        update_progress_artifact(progress_id, 100 * len(finished) / total)
        if on_row:
            on_row(row, total)

    cells = _run_cells(sweep, records, progress)
    plan = {(c.scheme, c.bits, c.granularity, c.policy.label, c.kernel): i
            for i, c in enumerate(steps.plan_cells(sweep, ""))}
    rows = []
    for record in records:  # table order: each model's fp32 row, then its cells in plan order
        mine = [r for r in cells if r["model"] == record.model]
        rows += [record.baseline, *sorted(mine, key=lambda r: plan[r["scheme"], r["bits"], r["granularity"], r["policy"],
                                                                    r.get("kernel", "weight-only")])]
    steps.write_results(sweep, rows)
    create_table_artifact([{k: r.get(k) for k in steps.COLUMNS} for r in rows], key=f"{sweep.name}-results",
                          description=f"results of sweep {sweep.name}")
    create_markdown_artifact(_markdown_summary(sweep, rows), key=f"{sweep.name}-summary")
    return rows


@flow(name="bitsweep", log_prints=True)
def sweep_flow(config_path: str = "flows.yaml", sweep_name: str | None = None) -> list[dict]:
    """Run the sweeps of a flows.yaml (or one of them); fails when any cell failed, after all finished."""
    rows = []
    for sweep in load_config(config_path).sweep(sweep_name):
        rows += run_sweep(sweep)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        first = failed[0]
        raise BitsweepError(f"{len(failed)} of {len(rows)} rows failed (first: {first['model']} {first['scheme']} "
                            f"{first['bits']}b {first.get('kernel', '')}: {first['error']}); the others are kept")
    return rows
