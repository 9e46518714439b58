"""What every benchmark shares: the machine it ran on, and alternating timing."""

from __future__ import annotations

import statistics
import time

import torch

from bitsweep.kernels import cpu_flags

FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_summary() -> str:
    """The CPU model and its vector features from /proc/cpuinfo, e.g. ``AMD EPYC | avx2 yes, avx512f no, ...``:
    speed figures differ by CPU, so every table starts with it."""
    model, flags = "unknown CPU", cpu_flags()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.partition(":")[2].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    features = ", ".join(f"{name} {'yes' if name in flags else 'no'}" for name in FEATURES)
    return f"{model} | {features} | torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def alternate(calls: dict[str, callable], layers: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each ``calls[key](layer)``, run alternately layer by layer, so that load
    from other processes hits every contender alike. The order rotates from one layer to the next, so each
    contender runs equally often in each place (the call after another layer's differs: caches, clocks)."""
    times = {key: [] for key in calls}
    keys = list(calls)
    with torch.no_grad():
        for fn in calls.values():  # warm-up: builds, first-touch page faults, thread pools
            for layer in range(layers):
                fn(layer)
        for repeat in range(repeats):
            for layer in range(layers):
                turn = (repeat * layers + layer) % len(keys)
                for key in keys[turn:] + keys[:turn]:
                    start = time.perf_counter()
                    calls[key](layer)
                    times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}
