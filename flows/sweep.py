"""The sweep as a Prefect flow, shaped like the pipeline:

    load model ─► fp32 baseline ─► profile fp32 ─► cluster classes ─► compile kernels
      ─► for each cell: quantize+pack ─► evaluate ∥ compress ∥ profile ─► row
      ─► results ─► report

Tasks pass paths and small records; the work is plain functions in ``bitsweep.sweep``.
Finished models and cells are found on disk and never submitted again.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from pathlib import Path

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from bitsweep import sweep as steps
from bitsweep.budget import MemoryBudget, cell_bytes
from bitsweep.config import Sweep, load_config
from bitsweep.errors import BitsweepError
from bitsweep.files import run_lock
from bitsweep.flows import runners
from bitsweep.report import data_uri, to_markdown, write_report

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
def profile_model(sweep: Sweep, record: steps.ModelRecord) -> dict:
    return steps.profile_model(sweep, record)


@_task
def cluster_classes(sweep: Sweep, record: steps.ModelRecord) -> dict:
    return steps.cluster_model(sweep, record)


@_task
def layer_sensitivity(sweep: Sweep, record: steps.ModelRecord) -> dict:
    return steps.layer_sensitivity(sweep, record)


@_task
def profile(sweep: Sweep, record: steps.ModelRecord, cell: steps.Cell, packed: str) -> dict:
    return _timed(steps.profile_cell, sweep, record, cell, packed)


@_task
def report(run_dir: Path) -> dict:
    return write_report(run_dir)


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


def _run_cells(sweep: Sweep, records: list[steps.ModelRecord], progress: Callable[[dict], None],
               budget: MemoryBudget) -> list[dict]:
    """Quantize and pack each missing cell once, then evaluate it on each kernel path while its
    packed file is compressed. A packed file's steps start only when their memory fits the budget."""
    torch.set_num_threads(sweep.evaluation.threads)
    rows, running, parts, cells_by_pack = [], {}, {}, {}  # parts: cell key -> finished steps' results
    waiting, holding = [], {}  # packings not yet started; pack key -> [bytes held, steps unfinished]

    def start_waiting():
        while waiting and budget.admit(cell_bytes(waiting[0][0].params)):
            record, packing = waiting.pop(0)
            holding[steps.cell_key(record, packing)] = [cell_bytes(record.params), 1]
            running[_named(quantize, packing).submit(sweep, record, packing)] = ("quantize", record, packing)

    def finished_step(record, cell):  # after the steps it leads to are counted
        held = holding[steps.cell_key(record, cell.packing)]
        held[1] -= 1
        if not held[1]:
            budget.release(held[0])
            start_waiting()
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
                waiting.append((record, packing))
            cells_by_pack[pack_key].append(cell)
    start_waiting()

    def fail(record, cells, stage, exc):
        for cell in cells:
            parts[steps.cell_key(record, cell)] = None
            row = steps.failed_row(sweep, cell, f"{stage}: {type(exc).__name__}: {exc}")
            get_run_logger().error(f"{cell.label}: {row['error']}")
            rows.append(row)
            progress(row)

    finished, watched = queue.SimpleQueue(), set()
    while running:
        for future in running.keys() - watched:  # one callback each: as_completed(running) adds one per call,
            watched.add(future)                   # and on Dask each is a round trip: quadratic in the cells
            future.add_done_callback(finished.put)
        future = finished.get()
        stage, record, cell = running.pop(future)
        cells = cells_by_pack[steps.cell_key(record, cell)] if stage in ("quantize", "compress", "profile") else [cell]
        cells = [c for c in cells if parts.get(steps.cell_key(record, c), {}) is not None]  # a sibling step failed
        try:
            result = future.result()
        except Exception as exc:
            fail(record, cells, stage, exc)
            finished_step(record, cell)
            continue
        if stage == "quantize":
            holding[steps.cell_key(record, cell)][1] += len(cells) + 2  # evaluates, compress, profile
            for each in cells:
                parts[steps.cell_key(record, each)] = {"quantize": dict(result)}
                running[_named(evaluate, each).submit(sweep, record, each, result["packed"])] = ("evaluate", record, each)
            running[_named(compress, cell).submit(sweep, cell, result["packed"])] = ("compress", record, cell)
            running[_named(profile, cell).submit(sweep, record, cell, result["packed"])] = ("profile", record, cell)
            finished_step(record, cell)
            continue
        finished_step(record, cell)
        for each in cells:
            done = parts[steps.cell_key(record, each)]
            done[stage] = dict(result)
            if len(done) == 4:  # quantize, evaluate, compress, profile
                seconds = sum(part.pop("step_seconds") for part in done.values())
                row = steps.finish_cell(sweep, record, each, done, seconds)
                rows.append(row)
                progress(row)
    return rows


def run_sweep(sweep: Sweep, budget: MemoryBudget | None = None) -> list[dict]:
    """One sweep inside the flow: models, cells, results files and Prefect artifacts."""
    records = _load_models(sweep)
    for record in records:
        profile_model.with_options(task_run_name=f"profile {record.model} fp32")(sweep, record)
        cluster_classes.with_options(task_run_name=f"cluster classes {record.model}")(sweep, record)
    sensitivities = [layer_sensitivity.with_options(task_run_name=f"layer sensitivity {record.model}")
                     .submit(sweep, record) for record in records if sweep.sensitivity.images]
    compile_kernels.with_options(task_run_name="compile kernels")()
    total = len(records) * len(steps.plan_cells(sweep, ""))
    progress_id = create_progress_artifact(0.0, key=f"{sweep.name}-progress", description=f"cells of {sweep.name}")
    finished = []

    def progress(row):
        finished.append(row)
        update_progress_artifact(progress_id, 100 * len(finished) / total)
        if on_row:
            on_row(row, total)

    cells = _run_cells(sweep, records, progress, budget or MemoryBudget())
    for future in sensitivities:  # optional: a failure is logged, the sweep's results are still written
        try:
            future.result()
        except Exception as exc:
            get_run_logger().error(f"layer sensitivity failed: {type(exc).__name__}: {exc}")
    plan = {(c.scheme, c.bits, c.granularity, c.policy.label, c.recipe, c.kernel): i
            for i, c in enumerate(steps.plan_cells(sweep, ""))}
    rows = []
    for record in records:  # table order: each model's fp32 row, then its cells in plan order
        mine = [r for r in cells if r["model"] == record.model]
        order = lambda r: plan[r["scheme"], r["bits"], r["granularity"], r["policy"], r["recipe"], r["kernel"]]  # noqa: E731
        rows += [record.baseline, *sorted(mine, key=order)]
    rows = steps.write_results(sweep, records, rows)
    create_table_artifact([{k: r.get(k) for k in steps.COLUMNS} for r in rows], key=f"{sweep.name}-results",
                          description=f"results of sweep {sweep.name}")
    written = report.with_options(task_run_name=f"report {sweep.name}")(sweep.run_dir)
    create_markdown_artifact(to_markdown(written["blocks"], data_uri), key=f"{sweep.name}-report",
                             description=f"report of sweep {sweep.name}: {written['html']}")
    return rows


@flow(name="bitsweep", log_prints=True)
def sweep_flow(config_path: str = "flows.yaml", sweep_name: str | None = None, runner: str | None = None,
               address: str | None = None, max_workers: int | None = None) -> list[dict]:
    """Run the sweeps of a flows.yaml (or one of them); fails when any cell failed, after all finished.
    ``runner``, ``address`` and ``max_workers`` override the file's ``runner:`` setting."""
    config = load_config(config_path)
    sweeps = config.sweep(sweep_name)
    chosen = runners.settings(config.runner, runner, address, max_workers)
    budget = MemoryBudget(chosen.memory_gb and int(chosen.memory_gb * 1e9))
    rows = []
    with runners.running_on(runners.task_runner(chosen, max(s.evaluation.threads for s in sweeps))):
        for sweep in sweeps:
            with run_lock(sweep.run_dir):  # a second sweep on this folder refuses at once
                rows += run_sweep(sweep, budget)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        first = failed[0]
        raise BitsweepError(f"{len(failed)} of {len(rows)} rows failed (first: {first['model']} {first['scheme']} "
                            f"{first['bits']}b {first.get('kernel', '')}: {first['error']}); the others are kept")
    return rows
