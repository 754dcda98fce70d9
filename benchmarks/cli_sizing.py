"""Check the memory estimate of ``gpgrad estimate`` against measured peaks.

For each solver and size, a fresh process fits a 1-D Matérn-5/2 series with one
start and two L-BFGS-B iterations and reports the growth of its peak resident
memory (``VmHWM``) over the resident memory it had after the imports and a
warm-up fit: the figure the command compares with the available memory. The
estimate (:func:`gpgrad.cli.estimate_cost`) should be at or above it.

    python benchmarks/cli_sizing.py [--sizes 500 1000 2000] [--methods cholesky]

Writes ``benchmarks/results/cli_sizing.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import machine_info, machine_line  # noqa: E402

WORKER = r"""
import json, sys, time, warnings
import numpy as np
import gpgrad

def rss(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
method, n = sys.argv[1], int(sys.argv[2])
warnings.simplefilter("ignore")
rng = np.random.default_rng(0)
def data(m):
    X = np.sort(rng.uniform(0, 10, m))[:, None]
    return X, np.sin(X[:, 0]) + 0.1 * rng.normal(size=m)
gpgrad.fit(gpgrad.GP(gpgrad.kernels.Matern52()), *data(20), restarts=1, maxiter=2)
X, y = data(n)
base = rss("VmRSS:")
count = [0]
t0 = time.perf_counter()
gpgrad.fit(gpgrad.GP(gpgrad.kernels.Matern52(), method=method), X, y, restarts=1,
           maxiter=2, progress=lambda s, e, l: count.__setitem__(0, e))
wall = time.perf_counter() - t0
print(json.dumps({"growth": rss("VmHWM:") - base, "evaluations": count[0],
                  "seconds_per_evaluation": wall / max(1, count[0])}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    p.add_argument("--methods", nargs="+", default=["cholesky"])
    p.add_argument("--out", default=None, help="JSON file (default: results/)")
    a = p.parse_args()
    from gpgrad.cli import _BASE_MEMORY, estimate_cost

    info = machine_info()
    print(machine_line(info))
    root = Path(__file__).resolve().parent.parent
    rows = []
    print(f"{'method':10} {'rows':>6} {'measured MiB':>13} {'estimate MiB':>13} "
          f"{'s/eval':>8}")  # fmt: skip
    for method in a.methods:
        for n in a.sizes:
            t0 = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-c", WORKER, method, str(n)],
                capture_output=True, text=True, cwd=root, timeout=1800,
            )  # fmt: skip
            if r.returncode != 0:
                print(f"{method:10} {n:>6} failed: {r.stderr.strip()[-200:]}")
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            est = estimate_cost(method, n, 1).memory
            rows.append(
                dict(m, method=method, rows=n, estimate=est, base=_BASE_MEMORY,
                     wall_process_s=time.perf_counter() - t0)
            )  # fmt: skip
            print(
                f"{method:10} {n:>6} {m['growth'] / 2**20:>13.0f} "
                f"{est / 2**20:>13.0f} {m['seconds_per_evaluation']:>8.2f}"
            )
    out = Path(a.out) if a.out else root / "benchmarks/results/cli_sizing.json"
    out.write_text(json.dumps({"machine": info, "runs": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
