"""`bitsweep report` on a finished run: target ≤ 60 s (median of 3, a fresh process each, as a user runs it).

Usage: python bench/report.py [RUN_DIR ...]   (default: every run under runs/ with a results.json)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = 60.0
REPEATS = 3


def main(argv: list[str]) -> int:
    runs = [Path(a) for a in argv] or sorted(p.parent for p in Path("runs").glob("*/results.json"))
    if not runs:
        print("bench/report.py: no finished run found; run `make sweep` first or pass a run directory")
        return 2
    missed = False
    print(f"{'run':<28} {'rows':>5} {'figures':>8} {'median s':>9} {'target s':>9}")
    for run in runs:
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "bitsweep", "report", str(run)],
                                    capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            if result.returncode:
                print(result.stderr.strip())
                return 1
        figures = len(list((run / "report").glob("*.png")))
        rows = (run / "results.csv").read_text().count("\n") - 1
        median = statistics.median(times)
        missed |= median > TARGET_SECONDS
        print(f"{str(run):<28} {rows:>5} {figures:>8} {median:>9.1f} {TARGET_SECONDS:>9.0f}"
              f"{'  MISSED' if median > TARGET_SECONDS else ''}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
