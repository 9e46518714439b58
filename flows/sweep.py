"""The sweep as a Prefect flow, shaped like the pipeline:

    load model ─► fp32 baseline ─► profile fp32 ─► cluster classes ─► calibration data ─► compile kernels
      ─► for each packed file, in parallel: quantize+pack ─► compress ─► profile ─► evaluate each kernel ─► rows
      ─► results ─► report

Tasks pass paths and small records; the work is plain functions in ``bitsweep.sweep`` (the steps),
``bitsweep.analyses``, ``bitsweep.cells`` and ``bitsweep.results``.
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

from bitsweep import analyses
from bitsweep import sweep as steps
from bitsweep.budget import MemoryBudget, cell_bytes
from bitsweep.cells import Cell, ModelRecord, cached_row, cell_key, expand_models, find_record, plan_cells
from bitsweep.config import Sweep, load_config
from bitsweep.errors import BitsweepError, first_line
from bitsweep.files import run_lock
from bitsweep.flows import runners
from bitsweep.loaded import check_sweeps
from bitsweep.report import data_uri, to_markdown, write_report
from bitsweep.results import COLUMNS, failed_model_row, failed_row, write_results

# Called with each finished row (cached or new) while run_sweeps runs the flow.
_on_row: Callable[[dict, int], None] | None = None

_task = task(cache_policy=NO_CACHE, persist_result=False)


def _timed(function, *args) -> dict:
    start = time.perf_counter()
    result = function(*args)
    return result | {"step_seconds": time.perf_counter() - start}


@_task
def load_model(sweep: Sweep, spec) -> ModelRecord:
    return steps.prepare_model(sweep, spec)


def _failed(sweep: Sweep, cells: list[Cell], stage: str, exc: Exception) -> list[dict]:
    """The rows of ``cells`` failed at ``stage``, each error logged on the run."""
    rows = [failed_row(sweep, cell, f"{stage}: {type(exc).__name__}: {exc}") for cell in cells]
    for row, cell in zip(rows, cells):
        get_run_logger().error(f"{cell.label}: {row['error']}")
    return rows


@_task
def quantize(sweep: Sweep, record: ModelRecord, packing: Cell, cells: list[Cell]) -> list[dict]:
    """Quantize and pack one file, then run the steps that read it — compress, profile, and evaluate for each
    of its cells — as task runs of their own inside this one: one submission per packed file, however many
    steps (on Dask each submission costs a round trip and a worker-side Prefect client)."""
    shared = {"quantize": _timed(steps.quantize_cell, sweep, record, packing)}  # a failure fails this task
    path = shared["quantize"]["packed"]
    stage = "compress"
    try:
        shared["compress"] = _named(compress, packing)(sweep, packing, path)
        stage = "profile"
        shared["profile"] = _named(profile, packing)(sweep, record, packing, path)
    except Exception as exc:
        return _failed(sweep, cells, stage, exc)
    rows = []
    for cell in cells:
        try:
            evaluated = _named(evaluate, cell)(sweep, record, cell, path)
        except Exception as exc:
            rows += _failed(sweep, [cell], "evaluate", exc)
            continue
        parts = {step: dict(part) for step, part in shared.items()} | {"evaluate": evaluated}
        seconds = sum(part.pop("step_seconds") for part in parts.values())
        rows.append(steps.finish_cell(sweep, record, cell, parts, seconds))
    return rows


@_task
def profile_model(sweep: Sweep, record: ModelRecord) -> dict:
    return steps.profile_model(sweep, record)


@_task
def calibration_data(sweep: Sweep, record: ModelRecord) -> dict:
    return _timed(steps.calibration_data, sweep, record)


@_task
def cluster_classes(sweep: Sweep, record: ModelRecord) -> dict:
    return analyses.cluster_model(sweep, record)


@_task
def layer_sensitivity(sweep: Sweep, record: ModelRecord) -> dict:
    return analyses.layer_sensitivity(sweep, record)


@_task
def profile(sweep: Sweep, record: ModelRecord, cell: Cell, packed: str) -> dict:
    return _timed(steps.profile_cell, sweep, record, cell, packed)


@_task
def report(run_dir: Path) -> dict:
    return write_report(run_dir)


@_task
def compile_kernels() -> dict:
    return _timed(steps.compile_kernels)


@_task
def evaluate(sweep: Sweep, record: ModelRecord, cell: Cell, packed: str) -> dict:
    return _timed(steps.evaluate_cell, sweep, record, cell, packed)


@_task
def compress(sweep: Sweep, cell: Cell, packed: str) -> dict:
    return _timed(steps.compress_sizes, sweep, packed)


def _named(step, cell: Cell):
    return step.with_options(task_run_name=f"{step.name.replace('_', ' ')} {cell.label}")


def _load_models(sweep: Sweep) -> list[ModelRecord | dict]:
    """Each model once, one after another: loading may train, and training uses every core. A model that
    cannot be loaded or run on the sweep's data (one of a glob's many) is a failed row; the others go on."""
    torch.set_num_threads(os.cpu_count() or 1)
    loaded = []
    for spec in expand_models(sweep):
        try:
            loaded.append(find_record(sweep, spec)
                          or load_model.with_options(task_run_name=f"load {spec.id}")(sweep, spec))
        except Exception as exc:
            loaded.append(failed_model_row(sweep, spec, f"load: {type(exc).__name__}: {first_line(exc)}"))
            get_run_logger().error(f"{spec.id}: {loaded[-1]['error']}")
    return loaded


def _run_cells(sweep: Sweep, records: list[ModelRecord], progress: Callable[[dict], None],
               budget: MemoryBudget) -> list[dict]:
    """Each missing packed file's task, started when its memory fits the budget; rows as they finish."""
    torch.set_num_threads(sweep.evaluation.threads)
    rows, waiting, groups = [], [], {}  # waiting: (record, packing, its cells) not yet started
    for record in records:
        for cell in plan_cells(sweep, record.model):
            if cached := cached_row(sweep, record, cell):
                rows.append(cached)
                progress(cached)
            elif (key := cell_key(record, cell.packing)) in groups:
                groups[key].append(cell)
            else:
                groups[key] = [cell]
                waiting.append((record, cell.packing, groups[key]))

    running, finished = {}, queue.SimpleQueue()

    def start_waiting():
        while waiting and budget.admit(cell_bytes(waiting[0][0].params)):
            record, packing, cells = waiting.pop(0)
            future = _named(quantize, packing).submit(sweep, record, packing, cells)
            running[future] = (record, packing, cells)
            future.add_done_callback(finished.put)

    start_waiting()
    while running:
        future = finished.get()
        record, packing, cells = running.pop(future)
        budget.release(cell_bytes(record.params))
        try:
            new = future.result()
        except Exception as exc:  # quantize failed, or its worker was lost with it
            new = _failed(sweep, cells, "quantize", exc)
        for row in new:
            rows.append(row)
            progress(row)
        start_waiting()
    return rows


def run_sweep(sweep: Sweep, budget: MemoryBudget | None = None) -> list[dict]:
    """One sweep inside the flow: models, cells, results files and Prefect artifacts."""
    loaded = _load_models(sweep)
    records = [item for item in loaded if isinstance(item, ModelRecord)]
    for record in records:
        profile_model.with_options(task_run_name=f"profile {record.model} fp32")(sweep, record)
        cluster_classes.with_options(task_run_name=f"cluster classes {record.model}")(sweep, record)
        if any(cell.uses_data for cell in plan_cells(sweep, record.model)):
            step = "calibration images" if sweep.calibration else "synthesize data"
            calibration_data.with_options(task_run_name=f"{step} {record.model}")(sweep, record)
    sensitivities = [layer_sensitivity.with_options(task_run_name=f"layer sensitivity {record.model}")
                     .submit(sweep, record) for record in records if sweep.sensitivity.images]
    compile_kernels.with_options(task_run_name="compile kernels")()
    total = len(records) * len(plan_cells(sweep, ""))
    progress_id = create_progress_artifact(0.0, key=f"{sweep.name}-progress", description=f"cells of {sweep.name}")
    finished = []

    def progress(row):
        finished.append(row)
        update_progress_artifact(progress_id, 100 * len(finished) / total)
        if _on_row:
            _on_row(row, total)

    cells = _run_cells(sweep, records, progress, budget or MemoryBudget())
    for future in sensitivities:  # optional: a failure is logged, the sweep's results are still written
        try:
            future.result()
        except Exception as exc:
            get_run_logger().error(f"layer sensitivity failed: {type(exc).__name__}: {exc}")
    plan = {(c.scheme, c.bits, c.granularity, c.policy.label, c.recipe, c.kernel): i
            for i, c in enumerate(plan_cells(sweep, ""))}
    rows = []
    for record in loaded:  # table order: each model's fp32 row (or failed row), then its cells in plan order
        if not isinstance(record, ModelRecord):
            rows.append(record)
            continue
        mine = [r for r in cells if r["model"] == record.model]
        order = lambda r: plan[r["scheme"], r["bits"], r["granularity"], r["policy"], r["recipe"], r["kernel"]]  # noqa: E731
        rows += [record.baseline, *sorted(mine, key=order)]
    rows = write_results(sweep, records, rows)
    create_table_artifact([{k: r.get(k) for k in COLUMNS} for r in rows], key=f"{sweep.name}-results",
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
    check_sweeps(sweeps, data_here=not chosen.address)  # a deployment's run fails here, not in every cell
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


def run_sweeps(config_path, sweep_name: str | None = None, runner: str | None = None, address: str | None = None,
               max_workers: int | None = None, on_row: Callable[[dict, int], None] | None = None) -> list[dict]:
    """The flow as a program runs it: what would fail every cell (runner options, the scheduler, models,
    data) fails first, then the flow runs, calling ``on_row(row, cells in its sweep)`` after each row."""
    global _on_row
    config = load_config(config_path)
    chosen = runners.settings(config.runner, runner, address, max_workers)
    check_sweeps(config.sweep(sweep_name), data_here=not chosen.address)
    if chosen.address:
        runners.check_scheduler(chosen.address)
    _on_row = on_row
    try:
        return sweep_flow(config_path=str(config_path), sweep_name=sweep_name, runner=runner, address=address,
                          max_workers=max_workers)
    finally:
        _on_row = None
