"""quantize_model speed on resnet50 (25.6 M parameters), 4 bits per channel, one core.

Target: <= 1 s for each built-in scheme (median of repeats). Prints a table and
exits non-zero when a target is missed.
"""

import statistics
import sys
import time

import timm
import torch

import bitsweep

TARGET_SECONDS = 1.0
REPEATS = 7


def main() -> int:
    torch.set_num_threads(1)
    model = timm.create_model("resnet50", pretrained=False).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"quantize_model(resnet50, {params:.1f} M params, bits=4, granularity=channel), 1 thread, "
          f"median of {REPEATS}")
    print(f"{'scheme':<12} {'median s':>9} {'min s':>7} {'target s':>9}  result")
    missed = []
    for scheme in ("asymmetric", "symmetric", "pow2"):
        bitsweep.quantize_model(model, scheme, 4)  # warm-up
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            bitsweep.quantize_model(model, scheme, 4)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        ok = median <= TARGET_SECONDS
        missed += [] if ok else [scheme]
        print(f"{scheme:<12} {median:>9.3f} {min(times):>7.3f} {TARGET_SECONDS:>9.1f}  {'ok' if ok else 'MISSED'}")
    if missed:
        print(f"target missed for: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
