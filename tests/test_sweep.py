"""The sweep end to end through the real Prefect flow, on a tiny synthetic sweep."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml
from conftest import cli, make_distribution, stable, write_config

from bitsweep import sweep as steps
from bitsweep.cells import Cell, plan_cells
from bitsweep.loaded import check_sweeps
from bitsweep.config import load_config


def prefect_artifacts(flow_run_id):
    """One flow run's artifacts by key, read back from the Prefect server's API (other tests' runs share the keys)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in found}


@pytest.fixture
def counted_steps(monkeypatch):
    """Count calls of each step function (the flow calls them through the module)."""
    calls = {"prepare_model": 0, "quantize_cell": 0, "evaluate_cell": 0, "compress_sizes": 0, "profile_cell": 0}
    for name in calls:
        original = getattr(steps, name)

        def counting(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(steps, name, counting)
    return calls


@pytest.mark.slow
def test_flow_rows_then_rerun_executes_no_step(tmp_path, monkeypatch, prefect_harness, counted_steps):
    from bitsweep.flows.sweep import sweep_flow

    monkeypatch.setenv("BITSWEEP_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path)
    state = sweep_flow(config_path=str(config), return_state=True)
    rows = state.result()
    assert counted_steps == {"prepare_model": 1, "quantize_cell": 8, "evaluate_cell": 8, "compress_sizes": 9,
                             "profile_cell": 8}
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows)
    cells = {(r["scheme"], r["bits"], r["policy"]) for r in rows if r["scheme"] != "fp32"}
    assert cells == {(s, b, p) for s in ("asymmetric", "pow2") for b in (8, 4) for p in ("full", "keep_first=1")}
    base = next(r for r in rows if r["scheme"] == "fp32")
    for row in rows:
        assert row["bytes_zstd"] > 0 and row["bytes_gzip"] > 0 and 0 <= row["agreement"] <= 100
        if row["scheme"] != "fp32":
            assert row["bytes_stored"] < base["bytes_stored"] / 2, "codes are packed, not one float per weight"
            assert row["kernel"] == "weight-only" and row["compiled"] is True
            assert row["drop_top1"] == pytest.approx(base["top1"] - row["top1"])
            assert row["delta_size_pct"] == pytest.approx(100 * (1 - row["bytes_stored"] / base["bytes_stored"]))
            assert row["quantized_layers"] == (18 if row["policy"] == "full" else 17)  # test_efficientnet has 18
    for row in (r for r in rows if r["bits"] == 4):
        eight = next(r for r in rows if r["bits"] == 8 and (r["scheme"], r["policy"]) == (row["scheme"], row["policy"]))
        assert row["bytes_stored"] < eight["bytes_stored"] - row["params"] * 3 / 8, "4 bits fewer per weight"
    eight = [r for r in rows if r["bits"] == 8 and r["scheme"] == "asymmetric"]
    assert all(r["agreement"] >= 95 for r in eight)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stable(written) == stable(rows)
    assert (tmp_path / "run" / "results.csv").read_text().splitlines()[0].startswith("sweep,model,scheme,bits")

    artifacts = prefect_artifacts(state.state_details.flow_run_id)
    assert len(json.loads(artifacts["tiny-results"].data)) == 9
    report = artifacts["tiny-report"].data
    assert "| test_efficientnet |" in report and report.count("](data:image/png;base64,") == 6
    assert artifacts["tiny-progress"].data == 100.0

    for name in counted_steps:
        counted_steps[name] = 0
    again = sweep_flow(config_path=str(config))
    assert counted_steps == {"prepare_model": 0, "quantize_cell": 0, "evaluate_cell": 0, "compress_sizes": 0,
                             "profile_cell": 0}
    assert stable(again) == stable(rows)


FAILING_PLUGIN = '''
import bitsweep
from bitsweep.plugins.schemes import Symmetric

class BrokenAtThreeBits(Symmetric):
    name = "broken3"
    def encode(self, rows, scale, zero_point, bits):
        if bits == 3:
            raise RuntimeError("this scheme cannot do 3 bits")
        return super().encode(rows, scale, zero_point, bits)

@bitsweep.hookimpl
def register_schemes():
    return [BrokenAtThreeBits()]
'''


@pytest.mark.slow
def test_failed_cell_is_recorded_others_finish_and_exit_is_nonzero(tmp_path):
    (tmp_path / "site").mkdir()
    make_distribution(tmp_path / "site", "bitsweep-broken3", "broken3", FAILING_PLUGIN, version="1.0")
    config = write_config(tmp_path, schemes=("broken3",), bits=(8, 3))
    command, env = cli(tmp_path, "run", "--config", str(config))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "2 of 5 rows failed" in result.stderr and "cannot do 3 bits" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    failed = [r for r in rows if r["status"] == "failed"]
    assert {(r["bits"], r["policy"]) for r in failed} == {(3, "full"), (3, "keep_first=1")}
    assert all(r["error"] == "quantize: BitsweepError: scheme 'broken3' of plugin 'broken3' (distribution "
               "bitsweep-broken3 1.0) failed: RuntimeError: this scheme cannot do 3 bits" for r in failed)
    assert sum(r["status"] == "ok" for r in rows) == 3


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_rows(tmp_path):
    (tmp_path / "site").mkdir()
    bits = (8, 6, 5, 4, 3)
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    for folder in (reference_dir, resumed_dir):
        folder.mkdir()
        write_config(folder, schemes=("asymmetric", "symmetric"), bits=bits)
    command, env = cli(tmp_path, "run", "--config", str(resumed_dir / "flows.yaml"), "--max-workers", "1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    cells = resumed_dir / "run" / "cells"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and len(list(cells.glob("*/row.json"))) < 3:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = {p.parent.name for p in cells.glob("*/row.json")}
    assert 3 <= len(done_before) < 20, "killed mid-way"
    mtimes = {p: p.stat().st_mtime_ns for p in cells.glob("*/row.json")}

    subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()), "finished cells were not redone"
    command, env = cli(tmp_path, "run", "--config", str(reference_dir / "flows.yaml"))
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
    resumed = json.loads((resumed_dir / "run" / "results.json").read_text())
    reference = json.loads((reference_dir / "run" / "results.json").read_text())
    assert len(resumed) == 21 and stable(resumed) == stable(reference)
    assert not list(resumed_dir.rglob("*.tmp")) or all(p.stat().st_size >= 0 for p in resumed_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_kernel_paths_share_one_packed_file(tmp_path, monkeypatch, prefect_harness, counted_steps):
    from bitsweep.flows.sweep import sweep_flow

    monkeypatch.setenv("BITSWEEP_CACHE", str(tmp_path / "cache"))
    config = yaml.safe_load(write_config(tmp_path, schemes=("symmetric",), bits=(8,)).read_text())
    config["sweeps"][0] |= {"kernels": ["weight-only", "int8"], "policies": ["full"]}
    (tmp_path / "flows.yaml").write_text(yaml.safe_dump(config))
    rows = sweep_flow(config_path=str(tmp_path / "flows.yaml"))
    assert counted_steps == {"prepare_model": 1, "quantize_cell": 1, "evaluate_cell": 2, "compress_sizes": 2,
                             "profile_cell": 1}
    weight_only, int8 = (next(r for r in rows if r.get("kernel") == k) for k in ("weight-only", "int8"))
    assert weight_only["bytes_stored"] == int8["bytes_stored"] and weight_only["key"] != int8["key"]
    assert weight_only["agreement"] >= 95 and int8["agreement"] >= 80 and int8["latency_b1_ms"] > 0
    assert int8["compile_seconds"] > 0 and weight_only["compile_seconds"] is None
    assert len(list((tmp_path / "run" / "packed").glob("*/model.safetensors"))) == 1


@pytest.mark.slow
def test_a_missing_dataset_fails_the_flow_before_any_cell(tmp_path, prefect_harness, counted_steps):
    """A deployment's run starts in the flow, not in `bitsweep run`: it too fails in one line, writing nothing."""
    from bitsweep import BitsweepError
    from bitsweep.flows.sweep import sweep_flow

    config = yaml.safe_load(write_config(tmp_path).read_text())
    config["sweeps"][0]["dataset"] = {"name": "imagefolder", "path": str(tmp_path / "nope")}
    (tmp_path / "flows.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(BitsweepError, match="path .*nope is not a directory"):
        sweep_flow(config_path=str(tmp_path / "flows.yaml"))
    assert not any(counted_steps.values()) and not (tmp_path / "run").exists()
    # On an existing Dask cluster the data is where its workers are: this machine's files are not checked.
    check_sweeps(load_config(tmp_path / "flows.yaml").sweeps, data_here=False)


def test_plan_covers_the_grid(tmp_path):
    sweep = load_config(write_config(tmp_path, bits=(8, 6, 4))).sweeps[0]
    cells = plan_cells(sweep, "m")
    assert len(cells) == 2 * 3 * 2 and len({c.label for c in cells}) == 12
    assert Cell(model="resnet18", scheme="pow2", bits=4, granularity="channel", group_size=None,
                      policy=sweep.policies[0]).label == "resnet18 pow2 4b"


@pytest.mark.slow
def test_recipes_are_an_axis_with_their_own_packed_files(tmp_path, monkeypatch, prefect_harness):
    from bitsweep.flows.sweep import sweep_flow

    monkeypatch.setenv("BITSWEEP_CACHE", str(tmp_path / "cache"))
    config = yaml.safe_load(write_config(tmp_path, schemes=("symmetric",), bits=(4,)).read_text())
    config["sweeps"][0] |= {"recipes": ["none", "mse"], "policies": ["full"]}
    (tmp_path / "flows.yaml").write_text(yaml.safe_dump(config))
    rows = sweep_flow(config_path=str(tmp_path / "flows.yaml"))
    naive, clipped = (next(r for r in rows if r.get("recipe") == name) for name in ("none", "mse"))
    assert naive["key"] != clipped["key"] and len(list((tmp_path / "run" / "packed").glob("*/model.safetensors"))) == 2
    assert clipped["sqnr_db"] >= naive["sqnr_db"] - 1e-9, "MSE clipping never adds weight error"
    assert clipped["bytes_stored"] == naive["bytes_stored"], "same widths, same packed size"
    profile = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert {r["recipe"] for r in profile} == {"", "none", "mse"}


@pytest.mark.slow
def test_a_glob_runs_each_match_and_a_model_that_cannot_run_is_one_failed_row(tmp_path, monkeypatch, prefect_harness):
    """test_vit3 wants 160x160 images and the data is 16x16: its row says so; test_vit4 (named by the glob and
    again by name: it runs once) is swept; the flow then fails in one line, after writing every row."""
    from bitsweep import BitsweepError
    from bitsweep.flows.sweep import sweep_flow

    monkeypatch.setenv("BITSWEEP_CACHE", str(tmp_path / "cache"))
    config = yaml.safe_load(write_config(tmp_path, schemes=("asymmetric",), bits=(8,)).read_text())
    config["sweeps"][0] |= {"models": ["test_vit[34]", "test_vit4"], "policies": ["full"], "compressors": ["gzip"],
                            "dataset": {"name": "synthetic", "n": 64, "num_classes": 4, "size": 16, "channels": 3}}
    (tmp_path / "flows.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(BitsweepError, match=r"^1 of 3 rows failed \(first: test_vit3 fp32 32b fp32: load: "
                                            r"AssertionError: Input height \(16\) doesn't match model \(160\)\.\)"):
        sweep_flow(config_path=str(tmp_path / "flows.yaml"))
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["model"], r["scheme"], r["status"]) for r in rows] == [
        ("test_vit3", "fp32", "failed"), ("test_vit4", "fp32", "ok"), ("test_vit4", "asymmetric", "ok")]
    assert rows[2]["agreement"] >= 90 and (tmp_path / "run" / "report" / "report.html").exists()


def test_a_glob_that_matches_nothing_or_too_much_is_refused_in_one_line(tmp_path):
    from bitsweep import BitsweepError

    for glob, problem in (("resnet_nope*", "matches no timm model; fix the pattern"),
                          ("*", r"matches \d+ timm models, more than the 100 one entry may stand for; narrow it")):
        config = yaml.safe_load(write_config(tmp_path).read_text())
        config["sweeps"][0]["models"] = [glob]
        (tmp_path / "flows.yaml").write_text(yaml.safe_dump(config))
        with pytest.raises(BitsweepError, match=rf"^model glob '{re.escape(glob)}' {problem}") as refused:
            check_sweeps(load_config(tmp_path / "flows.yaml").sweeps)
        assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_the_synthetic_set_is_made_once_before_the_cells(tmp_path, monkeypatch, prefect_harness):
    """A sweep with a data-free recipe makes its synthetic set in a task of its own, with the sweep's settings,
    and every cell reads it from there: one set on disk, synthesised once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from safetensors.torch import load_file

    from bitsweep import synthetic
    from bitsweep.flows.sweep import sweep_flow

    monkeypatch.setenv("BITSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "_INPUTS", synthetic.PerModelCache())
    made = []
    original = synthetic.synthesize
    monkeypatch.setattr(synthetic, "synthesize", lambda *args: made.append(args[2:]) or original(*args))
    config = write_config(tmp_path, schemes=("asymmetric",), bits=(4,))
    data = yaml.safe_load(config.read_text())
    data["sweeps"][0] |= {"recipes": ["none", "bias"], "policies": ["full"], "synthetic": {"images": 5, "steps": 3}}
    config.write_text(yaml.safe_dump(data))
    state = sweep_flow(config_path=str(config), return_state=True)
    rows = state.result()
    assert [r["recipe"] for r in rows] == ["", "none", "bias"] and all(r["status"] == "ok" for r in rows)
    assert made == [(5, 3)]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
    assert [run.name for run in runs if run.name.startswith("synthesize")] == ["synthesize data test_efficientnet"]
    (path,) = (tmp_path / "cache" / "synthetic").glob("*.safetensors")
    assert load_file(path)["inputs"].shape[0] == 5
