"""Orchestration at scale: a sweep of 210 small cells on threads and on Dask, against a real Prefect server.

Per-cell overhead = (cell phase − time inside the cells' step functions ÷ workers) ÷ cells, where the
cell phase runs from the first quantize task's start to the last cell step's end, as the server
recorded them: scheduling, task-run bookkeeping, serialisation and idle workers all count; the
flow's fixed steps before and after the cells (model load, kernel build, report) and the Dask
cluster's start-up are printed beside it. Targets: ≤ 50 ms per cell on threads, ≤ 200 ms on Dask
(a LocalCluster of 2 worker processes), and every cell's task runs on the server afterwards,
completed (none lost). Exits non-zero on a miss.
Usage: python bench/scale.py [--runner thread|dask|both]
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import torch
import yaml

from bitsweep.cells import plan_cells  # no Prefect in bitsweep's core: its settings are read later
from bitsweep.config import load_config
from checks import report

WORKERS = 2
TARGET_MS = {"thread": 50, "dask": 200}
SWEEP = {
    "models": [{"source": "trained", "name": "test_efficientnet", "epochs": 1, "batch_size": 64}],
    "dataset": {"name": "synthetic", "n": 64, "num_classes": 4, "size": 16},
    "schemes": ["asymmetric", "symmetric", "pow2"], "bits": [2, 3, 4, 5, 6, 7, 8],
    "granularity": ["tensor", "channel"],
    "policies": ["full", {"keep_first": 1}, {"keep_first": 2}, {"keep_last": 1}, {"keep_first": 1, "keep_last": 1}],
    "compressors": ["gzip"], "evaluation": {"batch_size": 64, "latency_repeats": 1},
}


def environment() -> None:
    """A private Prefect home and server port, offline; set in the main process only (Dask's worker
    processes import this file again), before Prefect is imported."""
    global WORKDIR, PORT
    WORKDIR = Path(tempfile.mkdtemp(prefix="bitsweep-scale-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        PORT = sock.getsockname()[1]
    os.environ.update({"PREFECT_HOME": str(WORKDIR / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{PORT}/api",
                       "BITSWEEP_CACHE": str(WORKDIR / "cache")})
    for key, value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                       "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
                       "PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL": "CRITICAL",
                       "PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL": "CRITICAL"}.items():
        os.environ.setdefault(key, value)


def start_server() -> subprocess.Popen:
    log = open(WORKDIR / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "bitsweep", "server", "--port", str(PORT)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{os.environ['PREFECT_API_URL']}/health", timeout=2).json() is True:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"the Prefect server did not start; see {WORKDIR / 'server.log'}")


def server_task_runs(flow_run_id) -> list[dict]:
    runs, offset = [], 0
    while True:
        page = httpx.post(f"{os.environ['PREFECT_API_URL']}/task_runs/filter", timeout=60, json={
            "flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "limit": 200, "offset": offset}).json()
        runs += page
        offset += len(page)
        if len(page) < 200:
            return runs


def run(kind: str) -> tuple[float, int, bool, str]:
    """One fresh run directory: (overhead ms per cell, cells, all task runs on the server, details)."""
    from bitsweep.flows.sweep import sweep_flow

    config = WORKDIR / f"{kind}.yaml"
    config.write_text(yaml.safe_dump({"sweeps": [SWEEP | {"name": kind, "output": str(WORKDIR / kind)}]}))
    start = time.perf_counter()
    state = sweep_flow(config_path=str(config), runner=kind, max_workers=WORKERS, return_state=True)
    wall = time.perf_counter() - start
    cells = [r for r in state.result() if r["scheme"] != "fp32"]
    inside = sum(r["seconds"] for r in cells)

    sweep = load_config(config).sweeps[0]
    labels = {cell.label for cell in plan_cells(sweep, "test_efficientnet")}
    expected = {f"{step} {label}" for label in labels for step in ("quantize", "evaluate", "compress")}
    task_runs = server_task_runs(state.state_details.flow_run_id)
    cell_runs = [t for t in task_runs if t["name"].partition(" ")[2] in labels]
    phase = (max(datetime.fromisoformat(t["end_time"]) for t in cell_runs)
             - min(datetime.fromisoformat(t["start_time"]) for t in cell_runs)).total_seconds()
    overhead_ms = 1000 * (phase - inside / WORKERS) / len(cells)
    completed = {t["name"] for t in task_runs if t["state"]["type"] == "COMPLETED"}
    missing = expected - completed
    not_completed = [t["name"] for t in task_runs if t["state"]["type"] != "COMPLETED"]
    ok = not missing and not not_completed
    details = (f"{kind}: {len(cells)} cells; flow {wall:.1f} s wall, cell phase {phase:.1f} s, {inside:.1f} s "
               f"inside the cells' steps; {len(task_runs)} task runs on the server, {len(missing)} cell steps "
               f"missing, {len(not_completed)} not completed")
    return overhead_ms, len(cells), ok, details


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runner", choices=["thread", "dask", "both"], default="both")
    args = parser.parse_args()
    environment()
    torch.set_num_threads(1)
    kinds = ["thread", "dask"] if args.runner == "both" else [args.runner]
    server = start_server()
    try:
        from bitsweep.flows.sweep import sweep_flow

        warm = WORKDIR / "warm.yaml"  # trains the model into the cache and builds the kernels, untimed
        warm.write_text(yaml.safe_dump({"sweeps": [SWEEP | {"name": "warm", "output": str(WORKDIR / "warm"),
                                                            "schemes": ["symmetric"], "bits": [8],
                                                            "granularity": ["channel"], "policies": ["full"]}]}))
        sweep_flow(config_path=str(warm), runner="thread", max_workers=WORKERS)
        results = [(kind, *run(kind)) for kind in kinds]
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all()  # the runs' last logs reach the server before it stops
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)
    checks = []
    for kind, overhead_ms, cells, ok, details in results:
        print(details)
        checks += [(f"{kind}: cells", cells, ">= 200", cells >= 200),
                   (f"{kind}: overhead ms per cell", overhead_ms, f"<= {TARGET_MS[kind]}",
                    overhead_ms <= TARGET_MS[kind]),
                   (f"{kind}: every task run on the server", float(ok), "== 1", ok)]
    return report(checks, width=38, digits=1)


if __name__ == "__main__":
    sys.exit(main())
