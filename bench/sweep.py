"""The default sweep of flows.yaml, measured: orchestration overhead, loads per model, peak memory.

Targets: overhead (wall time minus time inside the step functions, the latter divided by
the number of workers, so any idle worker counts as overhead) <= 10 % of the run; each
model loaded and its fp32 baseline evaluated exactly once; peak RSS <= 3 GB.
Runs in a fresh run directory (the trained-model cache is reused). Exits non-zero on a miss.
Usage: python bench/sweep.py [--config flows.yaml]
"""

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

from bitsweep.flows import prefect_environment

prefect_environment()  # the CLI's offline-safe settings, before Prefect is imported

import yaml  # noqa: E402

from bitsweep import analyses  # noqa: E402
from bitsweep import sweep as steps  # noqa: E402
from bitsweep.flows.sweep import sweep_flow  # noqa: E402
from bitsweep.registry import get_registry  # noqa: E402
from checks import report  # noqa: E402

MODULES = {"prepare_model": steps, "profile_model": steps, "cluster_model": analyses, "layer_sensitivity": analyses,
           "quantize_cell": steps, "evaluate_cell": steps, "compress_sizes": steps, "profile_cell": steps}
STEPS = tuple(MODULES)


def instrument():
    """Time every step function and count model loads (the flow calls them through their modules)."""
    lock, seconds, calls = threading.Lock(), dict.fromkeys(STEPS, 0.0), dict.fromkeys(STEPS + ("source.load",), 0)

    def wrap(owner, name, key):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with lock:
                    calls[key] += 1
                    if key in seconds:
                        seconds[key] += time.perf_counter() - start

        setattr(owner, name, timed)

    for name, module in MODULES.items():
        wrap(module, name, name)
    for entry in get_registry().entries("model source").values():
        wrap(entry.obj, "load", "source.load")
    return seconds, calls


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="flows.yaml")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    workdir = Path(tempfile.mkdtemp(prefix="bitsweep-bench-"))
    for sweep in config["sweeps"]:
        sweep["output"] = str(workdir / sweep["name"])
    bench_config = workdir / "flows.yaml"
    bench_config.write_text(yaml.safe_dump(config))
    models = sum(len(s["models"]) for s in config["sweeps"])

    workers = os.cpu_count() or 1
    seconds, calls = instrument()
    start = time.perf_counter()
    rows = sweep_flow(config_path=str(bench_config), runner="thread", max_workers=workers)
    wall = time.perf_counter() - start
    inside = sum(seconds.values())
    overhead = wall - inside / workers
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    checks = [
        ("orchestration overhead % of wall", 100 * overhead / wall, "<= 10", 100 * overhead / wall <= 10),
        ("model loads", calls["source.load"], f"== {models}", calls["source.load"] == models),
        ("fp32 baselines", calls["prepare_model"], f"== {models}", calls["prepare_model"] == models),
        ("peak RSS GB", peak_gb, "<= 3", peak_gb <= 3),
    ]
    print(f"default sweep: {len(rows)} rows in {wall:.1f} s wall on {workers} workers; "
          f"{inside:.1f} s inside step functions ({', '.join(f'{k} {v:.1f}' for k, v in seconds.items())})")
    return report(checks)


if __name__ == "__main__":
    sys.exit(main())
