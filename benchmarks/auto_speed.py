"""Time of kernel choice by evidence and model averaging for a long series.

``gpgrad.auto.estimate`` on ``n`` noisy samples of ``sin(9t) + t`` (f, f' and
f'' at every sample), after a warm-up call that pays for imports. Prints CPU
time (``resource.getrusage``, less sensitive to other jobs on a shared
machine) and wall time (``time.perf_counter``).

Usage::

    python benchmarks/auto_speed.py [--n 1000] [--plug-in] [--family statespace]
        [--single] [--peers]
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

import gpgrad  # noqa: E402
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
    p.add_argument(
        "--family",
        choices=("default", "statespace"),
        default="default",
        help="fit_auto's family (statespace: linear time, what `gpgrad "
        "estimate --kernel auto` runs above 5,000 rows)",
    )
    p.add_argument(
        "--single",
        action="store_true",
        help="also fit Matérn 5/2 alone (method='auto': the state-space solver "
        "from 1,000 rows), the command's fallback before the state-space family",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="also run the GCV smoothing spline and PyNumDiff's no-truth Kalman "
        "smoother of benchmarks/accuracy.py",
    )
    a = p.parse_args(argv)
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs")
    warnings.simplefilter("ignore")
    t = np.linspace(0, 1, a.n)
    y = np.sin(9 * t) + t + 0.02 * np.random.default_rng(0).normal(size=a.n)
    true = 9 * np.cos(9 * t) + 1

    def report(what, m, s, cpu, wall):
        err = m - true
        rmse = np.sqrt(np.mean(err**2))
        line = f"n={a.n}{what}: {cpu:.1f} s CPU, {wall:.1f} s wall"
        line += f", f' RMSE {rmse:.4g}"
        if s is not None:
            line += f", 95 % coverage {np.mean(np.abs(err) <= 1.96 * s):.3f}"
        print(line)

    estimate(t[:50], y[:50], candidates={"RBF": kernels.RBF()})  # warm-up
    out = []
    for marginalize in (True, False) if a.plug_in else (True,):
        c0, w0 = _cpu(), time.perf_counter()
        est = estimate(t, y, marginalize=marginalize, family=a.family)
        cpu, wall = _cpu() - c0, time.perf_counter() - w0
        what = "" if marginalize else " (marginalize=False)"
        if a.family != "default":
            what += f" (family={a.family})"
        report(what, est.df_mean, est.df_std, cpu, wall)
        print(est.model.summary())
        out.append((cpu, wall))
    if a.single:
        c0, w0 = _cpu(), time.perf_counter()
        res = gpgrad.fit(gpgrad.GP(kernels.Matern52()), t[:, None], y, restarts=3)
        g = res.posterior.gradient(t[:, None])
        m, s = g.mean[:, 0], g.std[:, 0]
        cpu, wall = _cpu() - c0, time.perf_counter() - w0
        report(f" Matérn 5/2 alone ({res.posterior.method})", m, s, cpu, wall)
    if a.peers:
        import accuracy

        for name, fn in (
            ("GCV smoothing spline", accuracy.est_spline),
            ("PyNumDiff no truth", accuracy.est_pynumdiff_notruth),
        ):
            c0, w0 = _cpu(), time.perf_counter()
            try:
                m = fn(t, y)
            except Exception as e:  # a peer that cannot run at this size
                print(f"n={a.n} {name}: failed ({type(e).__name__}: {e})")
                continue
            report(f" {name}", m, None, _cpu() - c0, time.perf_counter() - w0)
    return out[0]


if __name__ == "__main__":
    main()
