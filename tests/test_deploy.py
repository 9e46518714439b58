"""Scheduled sweeps with the real pieces: a Prefect server, `bitsweep deploy`, `prefect deployment run`
and a process worker; everything is checked through the server's REST API."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import DEPLOYED_CRON, write_config

from bitsweep.cells import plan_cells
from bitsweep.config import load_config
from bitsweep.results import COLUMNS

pytestmark = pytest.mark.slow  # a Prefect server, workers and `bitsweep deploy` subprocesses


def test_deployed_sweep_runs_on_a_worker_and_its_artifacts_reach_the_server(deployed_run, prefect_server):
    assert "worker start --pool bitsweep" in deployed_run.deployed.stdout
    deployment = prefect_server.get("/deployments/name/bitsweep/tiny-nightly")
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [DEPLOYED_CRON]
    assert deployment["work_pool_name"] == "bitsweep" and deployment["parameters"]["sweep_name"] == "tiny"
    assert prefect_server.get("/work_pools/bitsweep")["type"] == "process"

    flow_run = prefect_server.get(f"/flow_runs/{deployed_run.flow_run_id}")
    assert flow_run["deployment_id"] == deployment["id"]
    assert flow_run["state"]["type"] == "COMPLETED", deployed_run.worker.stdout[-3000:]

    artifacts = {a["key"]: a for a in prefect_server.post(
        "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [deployed_run.flow_run_id]}}})}
    written = json.loads((deployed_run.folder / "run" / "results.json").read_text())
    assert len(written) == 9  # the fp32 row and 2 schemes x 2 widths x 2 policies
    assert artifacts["tiny-results"]["type"] == "table"
    assert json.loads(artifacts["tiny-results"]["data"]) == [{k: r.get(k) for k in COLUMNS} for r in written]
    assert artifacts["tiny-progress"]["type"] == "progress" and artifacts["tiny-progress"]["data"] == 100

    task_runs = prefect_server.post("/task_runs/filter",
                                    {"flow_runs": {"id": {"any_": [deployed_run.flow_run_id]}}, "limit": 200})
    sweep = load_config(deployed_run.folder / "flows.yaml").sweeps[0]
    expected = {f"evaluate {cell.label}" for cell in plan_cells(sweep, "test_efficientnet")}
    evaluated = {t["name"]: t["state"]["type"] for t in task_runs if t["name"].startswith("evaluate ")}
    assert evaluated == dict.fromkeys(expected, "COMPLETED")


def test_invalid_cron_fails_at_deploy_in_one_line(prefect_server, tmp_path, run_cli):
    config = yaml.safe_load(write_config(tmp_path).read_text())
    config["deployments"] = [{"name": "bad-cron", "sweep": "tiny", "cron": "0 25 * * *"}]
    (tmp_path / "flows.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("deploy", "--config", str(tmp_path / "flows.yaml"), env=prefect_server.env)
    assert result.returncode == 2
    assert result.stderr.startswith("bitsweep: error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "deployments[0].cron: '0 25 * * *' is not a cron schedule" in result.stderr
    names = [d["name"] for d in prefect_server.post("/deployments/filter", {})]
    assert "bad-cron" not in names


def test_worker_stops_promptly_on_ctrl_c(prefect_server, tmp_path):
    pool = "ctrl-c-test"
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        # As from a terminal: a background job (CI's shell, nohup) may have SIGINT ignored, which children inherit.
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                                   "process"], env=prefect_server.env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        online = []
        while not online and time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()
            time.sleep(0.5)
            try:
                online = [w for w in prefect_server.post(f"/work_pools/{pool}/workers/filter", {})
                          if w["status"] == "ONLINE"]
            except Exception:  # the pool appears once the worker has created it
                online = []
        assert online, log.read_text()
        os.killpg(worker.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
        start = time.monotonic()
        worker.wait(timeout=60)
        assert time.monotonic() - start <= 10, f"worker took {time.monotonic() - start:.1f} s to stop"
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
