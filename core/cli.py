"""The ``bitsweep`` command. Errors are one line on stderr and exit status 2."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from bitsweep.errors import BitsweepError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="How few bits can a vision model take? Data-free quantization sweeps over timm models.")
# Wide enough for tables when output goes to a file or CI log, not a terminal.
console = Console(width=None if sys.stdout.isatty() else 160)


def _print_version(value: bool):
    if value:
        from bitsweep import __version__

        console.print(f"bitsweep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


@app.command()
def plugins():
    """List every scheme, model source, dataset and compressor, and which plugin provides it."""
    from bitsweep.registry import HOOKS, get_registry

    registry = get_registry()
    table = Table("kind", "name", "plugin", "distribution", "version", "description")
    for kind in HOOKS:
        for entry in registry.entries(kind).values():
            table.add_row(kind, entry.name, entry.provider.plugin, entry.provider.distribution,
                          entry.provider.version, getattr(entry.obj, "description", ""))
    console.print(table)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A sweep's run directory, e.g. runs/fashion-mnist.")):
    """Regenerate a finished run's report (tables, figures, report.md/.html) from its stored results."""
    from bitsweep.report import write_report

    written = write_report(run_dir)
    console.print(f"{len(written['figures'])} figures; report: {written['markdown']} and {written['html']}")


@app.command()
def run(
    config: Path = typer.Option(Path("flows.yaml"), "--config", "-c", help="The sweeps to run."),
    sweep: str | None = typer.Option(None, "--sweep", help="Run only this sweep of the file."),
    max_workers: int | None = typer.Option(None, "--max-workers", help="Cells at once (default: cores / threads)."),
    runner: str | None = typer.Option(None, "--runner", help="thread or dask (default: flows.yaml's runner, "
                                                             "else thread)."),
    address: str | None = typer.Option(None, "--address", help="A Dask scheduler, e.g. tcp://10.0.0.5:8786 "
                                                               "(dask without it: a local cluster)."),
):
    """Run the sweeps of flows.yaml as a Prefect flow; finished cells are kept and skipped on a rerun."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bitsweep.config import load_config
    from bitsweep.flows import prefect_environment
    from bitsweep.synthetic import watching

    sweeps = load_config(config).sweep(sweep)  # fail on a bad file, model name or dataset before Prefect starts
    prefect_environment()
    from bitsweep.flows.sweep import run_sweeps

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, console=console, transient=False)
    totals = {}  # sweep -> its cell count, known once it starts
    bars = {}  # "cells", and "synthetic" while a synthetic set is being made

    def advance(row, total):
        if "cells" not in bars:  # the first row: the checks passed and cells are running
            bar.start()
            bars["cells"] = bar.add_task("cells", total=None)
        totals[row["sweep"]] = total
        bar.update(bars["cells"], total=sum(totals.values()), advance=1,
                   description=f"{row['model']} {row['scheme']} {row['bits']}b")

    def synthesizing(done, total):
        if done == 1:  # a new set: a bar of its own, left behind when it is made
            bar.start()
            bars["synthetic"] = bar.add_task("synthetic data (optimisation steps)", total=total)
        bar.update(bars["synthetic"], completed=done)

    try:
        with watching(synthesizing):
            run_sweeps(config, sweep, runner, address, max_workers, on_row=advance)
    finally:
        bar.stop()
        if totals:
            for s in sweeps:
                _print_results(s)


def _prefect_command() -> str:
    """``prefect`` as the user can type it: bare when it is this environment's, else its full path."""
    import shutil

    own = Path(sys.executable).parent / "prefect"
    return "prefect" if shutil.which("prefect") == str(own) else str(own)


@app.command()
def deploy(
    config: Path = typer.Option(Path("flows.yaml"), "--config", "-c", help="The file whose deployments to register."),
    pool: str = typer.Option("bitsweep", "--pool", help="The work pool (created as a local process pool if missing)."),
):
    """Register flows.yaml's deployments (cron schedules) with the Prefect server at PREFECT_API_URL."""
    from bitsweep.config import load_config
    from bitsweep.flows import prefect_environment

    load_config(config)  # a bad file or cron fails here, before Prefect starts
    prefect_environment()
    from bitsweep.flows.deploy import deploy as register

    names = register(config, pool)
    for name in names:
        console.print(f"deployed {name} to work pool {pool!r}")
    console.print(f"start a worker (it runs them, in this folder): {_prefect_command()} worker start --pool {pool}")
    console.print(f"run one now: {_prefect_command()} deployment run '{names[0]}'")


@app.command()
def server(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback: this machine only)."),
    port: int = typer.Option(4200, "--port", help="Port of the UI and API."),
):
    """Start a local Prefect server with telemetry off: the UI, and the API deployments and workers use."""
    import os

    from bitsweep.flows import prefect_environment

    prefect_environment()
    url = f"http://{host}:{port}"
    console.print(f"Prefect UI: {url}\nin other shells: export PREFECT_API_URL={url}/api")
    sys.stdout.flush()
    os.environ["PREFECT_UI_API_URL"] = f"{url}/api"
    os.execv(sys.executable, [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)])


def _print_results(sweep) -> None:
    import json

    path = sweep.run_dir / "results.json"
    if not path.exists():
        return
    rows = json.loads(path.read_text())
    table = Table("model", "scheme", "bits", "policy", "recipe", "kernel", "top-1", "agree", "KL", "ms b1", "MB", "7z MB",
                  "ΔSize %", "status", title=f"sweep {sweep.name}")
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        table.add_row(r["model"], r["scheme"], str(r["bits"]), r.get("policy") or "", r.get("recipe") or "",
                      r.get("kernel") or "",
                      fmt(r.get("top1"), ".2f"), fmt(r.get("agreement"), ".1f"), fmt(r.get("kl"), ".4f"),
                      fmt(r.get("latency_b1_ms"), ".2f"),
                      fmt(r.get("bytes_stored") and r["bytes_stored"] / 1e6, ".2f"),
                      fmt(r.get("bytes_7z") and r["bytes_7z"] / 1e6, ".2f"), fmt(r.get("delta_size_pct"), ".1f"),
                      r["status"] if r["status"] == "ok" else f"failed: {r.get('error', '')[:60]}")
    console.print(table)
    console.print(f"results: {sweep.run_dir / 'results.csv'}")


@app.command()
def quantize(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet18."),
    scheme: str = typer.Option("symmetric", "--scheme", "-s"),
    bits: int = typer.Option(4, "--bits", "-b"),
    granularity: str = typer.Option("channel", "--granularity", "-g"),
    group_size: int | None = typer.Option(None, "--group-size"),
    keep_first: int = typer.Option(0, "--keep-first", help="Leave the first N Conv/Linear layers in fp32."),
    keep_last: int = typer.Option(0, "--keep-last", help="Leave the last N Conv/Linear layers in fp32."),
    pretrained: bool = typer.Option(False, help="Load timm's pretrained weights (needs them in the HF cache)."),
):
    """Quantize one timm model and print each layer's width and signal-to-quantization-noise ratio."""
    from bitsweep.models import ModelSpec
    from bitsweep.profile import sqnr_db
    from bitsweep.quantize import Policy, quantizable_layers, quantize_model
    from bitsweep.registry import get_registry
    from bitsweep.schemes import QuantSpec

    QuantSpec(scheme, bits, granularity, group_size)  # bad arguments fail before a model is built
    get_registry().get("scheme", scheme)
    fp32 = get_registry().get("model source", "timm").load(ModelSpec(name=model, pretrained=pretrained), None).module
    policy = Policy(keep_first=keep_first, keep_last=keep_last)
    quantized = quantize_model(fp32, scheme, bits, granularity, policy, group_size=group_size)
    table = Table("layer", "shape", "bits", "SQNR dB")
    for name, layer in quantizable_layers(fp32):
        qt = quantized.quantized_layers.get(name)
        if qt is None:
            table.add_row(name, str(tuple(layer.weight.shape)), "fp32", "")
            continue
        sqnr = sqnr_db(layer.weight, qt.dequantize())
        table.add_row(name, str(tuple(layer.weight.shape)), str(qt.bits), "inf" if sqnr is None else f"{sqnr:.1f}")
    console.print(table)
    console.print(f"{len(quantized.quantized_layers)} of {len(quantizable_layers(fp32))} Conv/Linear layers "
                  f"quantized with {scheme} {bits}-bit per {granularity}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"bitsweep: warning: {message}", file=file or sys.stderr)


def main():
    warnings.showwarning = _one_line_warning
    try:
        app()
    except BitsweepError as exc:
        print(f"bitsweep: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bitsweep: interrupted; finished cells are kept and a rerun resumes from them", file=sys.stderr)
        sys.exit(130)
