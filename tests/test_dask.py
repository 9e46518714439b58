"""Cells on Dask (prefect-dask): a LocalCluster of 2 worker processes, or an existing scheduler, gives the
very rows threads give; workers load each model once; a dead address fails fast; the memory cap holds."""

import json
import socket
import threading
import time

import pytest
import yaml
from conftest import free_port, write_config

from bitsweep import loaded

pytestmark = pytest.mark.slow  # Dask clusters, Prefect flows, `bitsweep run` subprocesses

TIMING = {"seconds", "latency_b1_ms", "latency_batch_ms"}


def comparable(rows, run_dir):
    """Rows without timings, with paths relative to their run directory."""
    prefix = f"{run_dir}/"
    return [{k: v.removeprefix(prefix) if isinstance(v, str) else v for k, v in r.items() if k not in TIMING}
            for r in rows]


@pytest.fixture(scope="module")
def thread_rows(tmp_path_factory, prefect_harness):
    from bitsweep.flows.sweep import sweep_flow

    folder = tmp_path_factory.mktemp("threads")
    rows = sweep_flow(config_path=str(write_config(folder)), runner="thread", max_workers=2)
    return comparable(rows, folder / "run")


@pytest.fixture(autouse=True)
def shared_cache(monkeypatch, tmp_path_factory):
    """Every run here uses one trained-model cache, so all see the same weights."""
    monkeypatch.setenv("BITSWEEP_CACHE", str(tmp_path_factory.getbasetemp() / "dask-cache"))


def test_local_cluster_gives_the_rows_threads_give(thread_rows, tmp_path, prefect_harness):
    from bitsweep.flows.sweep import sweep_flow

    rows = sweep_flow(config_path=str(write_config(tmp_path)), runner="dask", max_workers=2)
    assert len(rows) == 9 and comparable(rows, tmp_path / "run") == thread_rows


def test_existing_scheduler_gives_the_same_rows_and_loads_each_model_once_per_worker(thread_rows, tmp_path,
                                                                                      prefect_harness):
    from distributed import Client, LocalCluster

    from bitsweep.flows.sweep import sweep_flow

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        rows = sweep_flow(config_path=str(write_config(tmp_path)), address=cluster.scheduler_address)
        loads = client.run(lambda: loaded._fp32_module.cache_info()._asdict())
    assert comparable(rows, tmp_path / "run") == thread_rows
    used = [info for info in loads.values() if info["hits"] + info["misses"]]
    assert used, "no worker ran a cell"
    assert all(info["misses"] == 1 for info in used), loads  # one model, loaded once in each worker
    assert sum(info["hits"] + info["misses"] for info in used) >= 8 * 2  # quantize and evaluate of 8 cells


def test_unreachable_scheduler_fails_within_30_s_in_one_line(tmp_path, run_cli):
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = run_cli("run", "--config", str(write_config(tmp_path)), "--address", address)
    elapsed = time.monotonic() - start
    assert result.returncode == 2 and elapsed <= 30, (elapsed, result.stderr)
    assert result.stderr.startswith(f"bitsweep: error: no Dask scheduler answers at {address}")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_an_address_that_is_not_a_scheduler_fails_in_one_line(tmp_path, run_cli):
    """A web server where the scheduler should be: its reply, read as a Dask frame, has an absurd length."""
    def answer_http(listener):
        while True:
            connection, _ = listener.accept()
            with connection:
                connection.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=answer_http, args=(listener,), daemon=True).start()
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        result = run_cli("run", "--config", str(write_config(tmp_path)), "--address", address)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"bitsweep: error: {address} is not a Dask scheduler (it sent a reply Dask "
                                    f"cannot read"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_memory_budget_lets_one_packed_file_run_at_a_time(tmp_path, prefect_harness):
    """A budget smaller than two cells: each packed file's steps all end before the next quantize starts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from bitsweep.flows.sweep import sweep_flow

    config = yaml.safe_load(write_config(tmp_path, schemes=("symmetric",)).read_text())
    config["runner"] = {"workers": 2, "memory_gb": 1e-6}
    (tmp_path / "flows.yaml").write_text(yaml.safe_dump(config))
    state = sweep_flow(config_path=str(tmp_path / "flows.yaml"), return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    groups = {}  # packed file (the quantize task's cell label) -> [start of quantize, end of its last step]
    for run in task_runs:
        step, _, label = run.name.partition(" ")
        if step in ("quantize", "evaluate", "compress", "profile") and label.startswith("test_efficientnet"):
            span = groups.setdefault(label, [None, run.end_time])
            span[1] = max(span[1], run.end_time)
            if step == "quantize":
                span[0] = run.start_time
    spans = sorted(span for span in groups.values() if span[0])  # the fp32 profile has no quantize
    assert len(spans) == 4
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), [[str(t) for t in s] for s in spans]
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["status"] for r in written] == ["ok"] * 5


def test_runner_mistakes_are_one_line(tmp_path, run_cli):
    from bitsweep.config import parse_config
    from bitsweep.errors import BitsweepError

    config = yaml.safe_load(write_config(tmp_path).read_text())
    for runner, message in [({"kind": "thread", "address": "tcp://10.0.0.5:8786"},
                             "flows.yaml: runner: address is a Dask scheduler's: set kind: dask with it"),
                            ({"kind": "dask", "address": "10.0.0.5:8786"},
                             "flows.yaml: runner.address: '10.0.0.5:8786' is not a Dask scheduler address"),
                            ({"kind": "ray"}, "flows.yaml: runner.kind: Input should be 'thread' or 'dask'")]:
        with pytest.raises(BitsweepError) as error:
            parse_config(config | {"runner": runner})
        assert str(error.value).startswith(message), str(error.value)
    result = run_cli("run", "--config", str(tmp_path / "flows.yaml"), "--runner", "gpu")
    assert result.returncode == 2 and result.stderr == "bitsweep: error: --runner: Input should be 'thread' or 'dask'\n"
