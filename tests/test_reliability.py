"""Faults and hostile input, end to end through `bitsweep run`: SIGKILL at every step then resume,
read-only and full disks, two sweeps on one folder, a malicious checkpoint, broken plugins.

Faults come from a real plugin (``fragile``, installed as a distribution on PYTHONPATH) that kills its
own process, raises or waits at one step, chosen by $FRAGILE; core has no test-only code path.
"""

import contextlib
import json
import os
import pickletools
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BROKEN, Payload, cli, make_distribution, stable, write_config

from bitsweep import BitsweepError
from bitsweep.files import LOCK_NAME, run_lock

FRAGILE = '''
"""Faults on demand: $FRAGILE is "<action>:<where>"; $FRAGILE_LOG records each kill before it happens."""
import fnmatch, os, signal, sys, time
from pathlib import Path

import bitsweep
from bitsweep.plugins.compressors import Gzip
from bitsweep.plugins.schemes import Symmetric

ACTION, _, WHERE = os.environ.get("FRAGILE", "").partition(":")


def note(event):
    with open(os.environ["FRAGILE_LOG"], "a") as log:
        log.write(event + "\\n")


def die(point, half_written=None):
    """SIGKILL this process, leaving ``half_written`` (a file being written) cut in half."""
    if half_written:
        os.truncate(half_written, os.path.getsize(half_written) // 2)
    note(point)
    os.kill(os.getpid(), signal.SIGKILL)


def called_from(function):
    frame = sys._getframe()
    while frame and frame.f_code.co_name != function:
        frame = frame.f_back
    return frame is not None


class Fragile(Symmetric):
    name = "fragile"

    def encode(self, rows, scale, zero_point, bits):
        if str(bits) == WHERE and ACTION == "quantize":
            die("quantize")
        if str(bits) == WHERE and ACTION == "raise":
            raise RuntimeError(f"fragile cannot do {bits} bits")
        if ACTION == "wait" and not Path(WHERE).exists():
            note(f"waiting {os.getpid()}")
            while not Path(WHERE).exists():
                time.sleep(0.05)
        return super().encode(rows, scale, zero_point, bits)

    def decode(self, codes, scale, zero_point, bits):
        if ACTION == "evaluate" and str(bits) == WHERE and called_from("evaluate_cell"):
            die("evaluate")
        return super().decode(codes, scale, zero_point, bits)


class FragileGzip(Gzip):
    name, suffix = "fragile-gzip", ".f.gz"

    def compress(self, src, dst):
        super().compress(src, dst)
        if ACTION == "compress" and fnmatch.fnmatch(str(src), WHERE):
            die("compress", half_written=dst)
        if ACTION == "compress-raise" and fnmatch.fnmatch(str(src), WHERE):
            raise OSError("fragile-gzip lost its dictionary")


if ACTION == "replace":  # die while a file whose path matches WHERE is written, before it replaces the old one
    _replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(str(dst), WHERE):
            die(Path(dst).name, half_written=src)
        return _replace(src, dst, *args, **kwargs)

    os.replace = replace


@bitsweep.hookimpl
def register_schemes():
    return [Fragile()]


@bitsweep.hookimpl
def register_compressors():
    return [FragileGzip()]
'''

SCHEMES, BITS = ("asymmetric", "fragile"), (8, 6, 4, 3)


@pytest.fixture(scope="module")
def site(tmp_path_factory, prefect_harness):
    """A tmp folder whose ``site`` goes on PYTHONPATH, with the fragile distribution (bitsweep-fragile 0.3) and
    two broken ones (fails at import, fails in register_schemes); runs share the test Prefect server."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("reliability")
    (root / "site").mkdir()
    make_distribution(root / "site", "bitsweep-fragile", "fragile", FRAGILE)
    for module in ("fails_import", "fails_hook"):
        make_distribution(root / "site", f"bitsweep-{module.replace('_', '-')}", module, BROKEN[module])
    (root / "api").write_text(PREFECT_API_URL.value())
    return root


def sweep_config(folder, output=None, bits=BITS, schemes=SCHEMES):
    """The tests' sweep: a tiny trained model, every cell with the fragile scheme or compressor in it."""
    path = write_config(folder, schemes=schemes, bits=bits, name="faults")  # its own artifact keys on the server
    config = yaml.safe_load(path.read_text())
    config["sweeps"][0] |= {"policies": ["full"], "compressors": ["gzip", "fragile-gzip"],
                            "output": str(output or folder / "run")}
    path.write_text(yaml.safe_dump(config))
    return path


def start(site, config, fault=""):
    """`bitsweep run` in a fresh interpreter and its own session, with the fragile plugin installed; kernels
    on their Python path (building them is not under test here)."""
    command, env = cli(site, "run", "--config", str(config), "--max-workers", "1")
    env |= {"FRAGILE": fault, "FRAGILE_LOG": str(site / "kills.log"), "BITSWEEP_KERNELS": "python",
            "PREFECT_API_URL": (site / "api").read_text()}
    stderr = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                               start_new_session=True)
    process.stderr_file = stderr
    return process


def finish(process, check=False):
    """Wait for a run, then end what it left running (a killed run's Prefect server); its stderr."""
    try:
        process.wait(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.stderr_file.seek(0)
    process.stderr = process.stderr_file.read()
    process.stderr_file.close()
    assert not check or process.returncode == 0, process.stderr
    return process


def bitsweep_run(site, config, fault="", check=False):
    return finish(start(site, config, fault), check)


def snapshot(run_dir):
    """Every finished file under ``run_dir``: path -> (inode, mtime), which a rewrite changes."""
    return {p.relative_to(run_dir): (p.stat().st_ino, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and not p.name.endswith(".tmp") and p.name != LOCK_NAME}


def assert_whole(run_dir, reference):
    """No finished file is partial: each is the reference run's file byte for byte, or (JSON with timings)
    parses and holds the reference's figures."""
    for path in snapshot(run_dir):
        mine, theirs = run_dir / path, reference / path
        if path.name in ("row.json", "results.json", "record.json"):
            data, expected = json.loads(mine.read_text()), json.loads(theirs.read_text())
            if path.name == "row.json":
                assert stable([data]) == stable([expected]), path
        elif path.name == "packed.json":  # holds its own absolute path
            assert {**json.loads(mine.read_text()), "packed": ""} == {**json.loads(theirs.read_text()), "packed": ""}
        elif path.name != "results.csv":
            assert mine.read_bytes() == theirs.read_bytes(), path


def rows_done(run_dir):
    return {p.parent.name for p in run_dir.glob("cells/*/row.json")}


def finished_work(run_dir):
    """Files of finished steps: those of models with a record, packed files with packed.json, cells with a row."""
    markers = {"models": "record.json", "packed": "packed.json", "cells": "row.json"}
    return {path for path in snapshot(run_dir) if len(path.parts) > 2 and path.parts[0] in markers
            and (run_dir / path.parts[0] / path.parts[1] / markers[path.parts[0]]).exists()}


# The kill points, in the order a run reaches them: each run resumes the one before and dies further on.
KILLS = [
    ("model.safetensors", "replace:*fragile_6b*/model.safetensors"),  # quantize + pack: writing a packed file
    ("evaluate", "evaluate:4"),                              # the scheme's decode inside evaluate, fragile 4-bit
    ("compress", "compress:*"),                              # writing an archive
    ("row.json", "replace:*/cells/*/row.json"),              # writing a cell's row
    ("results.json", "replace:*/results.json"),              # writing the results files (.csv done, .json not)
]
RESULTS = {Path("results.csv"), Path("results.json")}


@pytest.mark.slow
def test_killed_at_every_step_resumes_with_only_the_missing_work(site):
    reference = site / "reference"
    reference.mkdir()
    result = bitsweep_run(site, sweep_config(reference), check=True)
    reference_rows = json.loads((reference / "run" / "results.json").read_text())
    assert len(reference_rows) == 9 and all(r["status"] == "ok" for r in reference_rows)
    # Plugins that fail to load or register cost a warning each; the sweep goes on with the others.
    assert "plugin 'fails_import' (distribution bitsweep-fails-import 0.3) failed to load" in result.stderr
    assert "plugin 'fails_hook' (distribution bitsweep-fails-hook 0.3) failed in register_schemes" in result.stderr

    folder = site / "killed"
    folder.mkdir()
    config, run_dir = sweep_config(folder), folder / "run"
    log = site / "kills.log"
    for point, fault in KILLS:
        before = snapshot(run_dir) if run_dir.exists() else {}
        finished = finished_work(run_dir) if run_dir.exists() else set()
        result = bitsweep_run(site, config, fault)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr)
        assert log.read_text().splitlines()[-1] == point
        after = snapshot(run_dir)
        redone = {path for path in finished if after.get(path) != before[path]}
        assert not redone, f"killed at {point}: finished work was redone: {redone}"
        assert_whole(run_dir, reference / "run")
        assert len(list(run_dir.rglob("*.tmp"))) <= 1, "only the write in progress when killed is left over"

    assert rows_done(run_dir) == rows_done(reference / "run")  # the last kill came after every row was written
    before = snapshot(run_dir)
    bitsweep_run(site, config, check=True)
    after = snapshot(run_dir)
    changed = {path for path in after if before.get(path) != after[path]}
    assert RESULTS <= changed and not {p for p in changed if p.parts[0] in ("models", "packed", "cells")}, \
        "a run with every cell done only writes the run's results and report"
    assert not list(run_dir.rglob("*.tmp")), "the killed runs' half-written files are cleaned up"
    resumed = json.loads((run_dir / "results.json").read_text())
    assert stable(resumed) == stable(reference_rows)


def error_line(result):
    """The one error line of a failed run (plugin warnings may come before it)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("bitsweep: error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


@pytest.mark.slow
def test_a_second_sweep_on_the_same_folder_refuses_and_the_first_is_unharmed(site):
    folder = site / "locked"
    folder.mkdir()
    config, run_dir, release = sweep_config(folder, bits=(8,)), folder / "run", site / "release"
    first = start(site, config, f"wait:{release}")  # takes the folder, then waits inside its first fragile cell
    try:
        deadline, log = time.monotonic() + 300, site / "kills.log"
        while not (log.exists() and f"waiting {first.pid}" in log.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first sweep never got to its cells"
            time.sleep(0.2)
        assert (run_dir / LOCK_NAME).read_text().startswith(f"pid {first.pid} ")
        before = snapshot(run_dir)
        second = bitsweep_run(site, config)
        assert snapshot(run_dir) == before, "the refused sweep wrote nothing"
    finally:
        release.touch()
        finish(first)
    assert first.returncode == 0, first.stderr
    assert error_line(second).startswith(
        f"bitsweep: error: {run_dir} is in use by another sweep (pid {first.pid} on {socket.gethostname()} since 20")
    assert error_line(second).endswith("UTC); wait for it to finish, or give this sweep another `output:` folder")
    rows = json.loads((run_dir / "results.json").read_text())
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)


HOLDER = "import sys, time\nfrom bitsweep.files import run_lock\nwith run_lock(sys.argv[1]):\n" \
         "    print('held', flush=True)\n    time.sleep(600)\n"


def test_a_dead_holders_lock_is_taken_over_and_its_leftovers_removed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(BitsweepError, match=rf"^{tmp_path} is in use by another sweep \(pid {holder.pid} on "
                                            rf"{socket.gethostname()} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)"):
        with run_lock(tmp_path):
            pass
    leftover = tmp_path / "cells" / "a" / ".row.json.x1y2.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_text('{"half": ')
    holder.kill()  # SIGKILL: its pid stays in the lock file, the OS releases the lock
    holder.wait()
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {holder.pid} ")
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on {socket.gethostname()} since ")
        assert not leftover.exists() and leftover.parent.is_dir()


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs of our own (needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def contents(run_dir):
    return {path: (run_dir / path).read_bytes() for path in snapshot(run_dir)}


@pytest.mark.slow
def test_read_only_and_full_disks_give_one_clear_error_and_keep_results(site, small_disk):
    folder, run_dir = site / "disk", small_disk / "run"
    folder.mkdir()
    bitsweep_run(site, sweep_config(folder, output=run_dir, bits=(8,)), check=True)
    kept = contents(run_dir)
    bigger = sweep_config(folder, output=run_dir, bits=(8, 4))

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert error_line(bitsweep_run(site, bigger)) == (
        f"bitsweep: error: {run_dir / LOCK_NAME}: cannot write (Read-only file system); make {run_dir} writable or "
        "write elsewhere (for a sweep: `output:` in flows.yaml), then run again: what was written before is kept")
    assert contents(run_dir) == kept

    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    with open(small_disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 4096)
    line = error_line(bitsweep_run(site, bigger))
    assert line.startswith(f"bitsweep: error: {run_dir}/") and (
        ": cannot write (No space left on device); free space on that disk or write elsewhere") in line
    assert contents(run_dir) == kept

    (small_disk / "filler").unlink()
    bitsweep_run(site, bigger, check=True)
    rows = json.loads((run_dir / "results.json").read_text())
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    assert all((run_dir / path).read_bytes() == data for path, data in kept.items()
               if path.parts[0] in ("cells", "packed")), "the first cells were kept, not redone"


@pytest.mark.slow
def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(site, tmp_path):
    mark, evil = tmp_path / "payload-ran", tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": Payload(str(mark))}, evil)  # a real torch.save file
    # The control, read without unpickling: the file's pickle really calls builtins.exec with the payload.
    with zipfile.ZipFile(evil) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    strings = [arg for _, arg, _ in pickletools.genops(pickled) if isinstance(arg, str)]
    assert any(s.split()[-1:] == ["exec"] for s in strings), strings  # GLOBAL '__builtin__ exec' (or 'builtins')
    assert any(str(mark) in s for s in strings) and not mark.exists()
    config = sweep_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["sweeps"][0]["models"] = [{"source": "checkpoint", "name": "test_efficientnet", "checkpoint": str(evil)}]
    config.write_text(yaml.safe_dump(data))
    # A model that cannot be loaded is a failed row (other models of the sweep would go on), named in the one line.
    line = error_line(bitsweep_run(site, config))
    assert line.startswith("bitsweep: error: 1 of 1 rows failed (first: test_efficientnet fp32"), line
    assert "load: BitsweepError: checkpoint" in line and "never unpickles code" in line, line
    assert not mark.exists()


@pytest.mark.slow
def test_asking_for_a_broken_plugins_scheme_stops_before_any_work(site, tmp_path):
    config = sweep_config(tmp_path, schemes=("asymmetric", "fails_hook"))
    line = error_line(bitsweep_run(site, config))
    assert line.startswith(f"bitsweep: error: {config}: sweeps[0].schemes[1]: unknown scheme 'fails_hook'; ")
    assert "; plugin 'fails_hook' (distribution bitsweep-fails-hook 0.3) failed in register_schemes " \
           "(RuntimeError: disk on fire) and may provide it: fix or uninstall it" in line
    assert "; plugin 'fails_import' (distribution bitsweep-fails-import 0.3) failed to load " \
           "(ModuleNotFoundError: No module named 'a_module_that_is_not_installed')" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_plugin_raising_inside_a_cell_fails_that_cell_and_names_it(site, tmp_path):
    result = bitsweep_run(site, sweep_config(tmp_path, bits=(8, 4)), "compress-raise:*_4b-*")
    assert error_line(result).startswith("bitsweep: error: 2 of 5 rows failed")
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    failed = {(r["scheme"], r["bits"]): r["error"] for r in rows if r["status"] != "ok"}
    assert failed == {(scheme, 4): "compress: BitsweepError: compressor 'fragile-gzip' of plugin 'fragile' "
                                   "(distribution bitsweep-fragile 0.3) failed: OSError: fragile-gzip lost its "
                                   "dictionary" for scheme in SCHEMES}
    assert rows_done(tmp_path / "run") == {p.name for p in (tmp_path / "run" / "cells").iterdir()
                                           if "_8b-" in p.name}
