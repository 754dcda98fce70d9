"""Time of kernel choice by evidence and model averaging for a long series.

``gpgrad.auto.estimate`` on ``n`` noisy samples of ``sin(9t) + t`` (f, f' and
f'' at every sample), after a warm-up call that pays for imports. Prints CPU
time (``resource.getrusage``, less sensitive to other jobs on a shared
machine) and wall time (``time.perf_counter``).

Usage::

    python benchmarks/auto_speed.py [--n 1000] [--plug-in]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model  # noqa: E402

from gpgrad import kernels  # noqa: E402
from gpgrad.auto import estimate  # noqa: E402


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument(
        "--plug-in",
        action="store_true",
        help="also time the members at their fitted hyperparameters alone "
        "(marginalize=False), right after the default",
    )
    a = p.parse_args(argv)
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs")
    warnings.simplefilter("ignore")
    t = np.linspace(0, 1, a.n)
    y = np.sin(9 * t) + t + 0.02 * np.random.default_rng(0).normal(size=a.n)
    estimate(t[:50], y[:50], candidates={"RBF": kernels.RBF()})  # warm-up
    out = []
    for marginalize in (True, False) if a.plug_in else (True,):
        c0, w0 = _cpu(), time.perf_counter()
        est = estimate(t, y, marginalize=marginalize)
        cpu, wall = _cpu() - c0, time.perf_counter() - w0
        what = "" if marginalize else " (marginalize=False)"
        print(f"n={a.n}{what}: {cpu:.1f} s CPU, {wall:.1f} s wall")
        print(est.model.summary())
        out.append((cpu, wall))
    return out[0]


if __name__ == "__main__":
    main()
