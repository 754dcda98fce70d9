"""Accuracy and calibration of derivative estimates from noisy samples:
gpgrad against classical methods, including PyNumDiff tuned on the truth.

For each test signal on [0, 1] with a known derivative (smooth, local
features, multi-scale, non-stationary and non-smooth ones), noise level
(0.1 % to 20 % of the signal's standard deviation) and sample size, ``n``
equally spaced samples get Gaussian noise; every method estimates ``f'`` at
the sample points:

* **gpgrad**: ``gpgrad.auto.estimate`` with the command's defaults (what
  ``gpgrad estimate`` runs; ``--kernel auto`` is its default): Matérn 3/2,
  5/2, 7/2, RBF, rational quadratic, a periodic kernel over the window and a
  cubic polynomial fitted by marginal likelihood; a Kumaraswamy input warping,
  a second lengthscale, a linear trend and (for periodic data) a periodic part
  tried on the best of them; the posterior of ``f'`` averaged over the
  candidates by their evidence (``--kernel rbf`` or ``matern52`` fits only
  that kernel). The single Matérn 5/2 fit, the command's former default, is
  shown as a reference column (not a competitor);
* **spline**: ``scipy.interpolate.make_smoothing_spline`` (smoothing by
  generalized cross-validation), differentiated;
* **Savitzky–Golay**: ``scipy.signal.savgol_filter(..., deriv=1)``, cubic,
  window the largest odd number ≤ n/5 (at least 5), ``mode="interp"``;
* **finite differences**: ``numpy.gradient``;
* **PyNumDiff (no truth)**: its Kalman (RTS) smoother ``rtsdiff`` tuned by
  ``pynumdiff.optimize`` with its ground-truth-free loss, whose
  regularization comes from the signal's bandlimit (estimated here from the
  data's periodogram: the highest frequency whose power stands 10× above the
  noise floor);
* **PyNumDiff (oracle)**: the best of its Kalman, spline, Savitzky–Golay,
  Butterworth, spectral, kernel-smoothing and polynomial methods, each tuned by
  ``pynumdiff.optimize`` *against the true derivative* of each data set. No
  user has that; it is an upper bound for what classical tuning can reach.

A case is one (signal, noise level, n); its RMSE is over the sample points
of all its replicates. gpgrad *wins* a case when its RMSE is the lowest of the
methods that do not see the truth. Calibration: the share of true ``f'``
inside gpgrad's central 50/90/95/99 % intervals, and the z-scores
``(mean − f')/std`` (mean and standard deviation; 0 and 1 when calibrated).

Usage::

    python benchmarks/accuracy.py                 # the full suite
    python benchmarks/accuracy.py --quick         # seconds, for the tests
    python benchmarks/accuracy.py --functions 4 5 --noise 0.001  # a subset
    python benchmarks/accuracy.py --out DIR       # where the outputs go
    python benchmarks/accuracy.py --held-out      # the held-out signals

``--held-out`` runs eight other signals (``HELD_OUT``: smooth, local,
non-smooth and non-stationary ones) written after the method was built and
tuned on ``FUNCTIONS``; its figures say how far those of ``FUNCTIONS``
carry to signals the method was not developed on.

Prints the machine, the table and the summary; writes ``accuracy.md``,
``accuracy.json`` (every case), ``accuracy.png`` (RMSE and coverage per case)
and ``calibration.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

Z95 = 1.959963984540054
#: central interval levels checked for calibration, and their z quantiles
LEVELS = (0.50, 0.90, 0.95, 0.99)
ZQ = {0.50: 0.6744897501960817, 0.90: 1.6448536269514722, 0.95: Z95,
      0.99: 2.5758293035489004}  # fmt: skip


# --------------------------------------------------------------------------
# test signals on [0, 1]: (name, kind, f, f')


def _pow15(x):
    u = x - 0.45
    return np.abs(u) ** 1.5, 1.5 * np.sign(u) * np.abs(u) ** 0.5


FUNCTIONS = [
    ("sin(2πx)", "smooth", lambda x: np.sin(2 * np.pi * x),
     lambda x: 2 * np.pi * np.cos(2 * np.pi * x)),
    ("exp(−x)cos(6x)", "smooth", lambda x: np.exp(-x) * np.cos(6 * x),
     lambda x: -np.exp(-x) * (np.cos(6 * x) + 6 * np.sin(6 * x))),
    ("x³ − x", "smooth", lambda x: x**3 - x, lambda x: 3 * x**2 - 1),
    ("sin(9x) + x", "smooth", lambda x: np.sin(9 * x) + x,
     lambda x: 9 * np.cos(9 * x) + 1),
    ("Runge 1/(1+25(2x−1)²)", "local", lambda x: 1 / (1 + 25 * (2 * x - 1) ** 2),
     lambda x: -100 * (2 * x - 1) / (1 + 25 * (2 * x - 1) ** 2) ** 2),
    ("tanh(5(x−½))", "local", lambda x: np.tanh(5 * (x - 0.5)),
     lambda x: 5 / np.cosh(5 * (x - 0.5)) ** 2),
    ("sin(2πx) + 0.2 sin(16πx)", "multi-scale",
     lambda x: np.sin(2 * np.pi * x) + 0.2 * np.sin(16 * np.pi * x),
     lambda x: 2 * np.pi * np.cos(2 * np.pi * x)
     + 3.2 * np.pi * np.cos(16 * np.pi * x)),
    ("chirp sin(2π(x + 3x²))", "non-stationary",
     lambda x: np.sin(2 * np.pi * (x + 3 * x**2)),
     lambda x: 2 * np.pi * (1 + 6 * x) * np.cos(2 * np.pi * (x + 3 * x**2))),
    ("|x − 0.45|^1.5", "non-smooth", lambda x: _pow15(x)[0],
     lambda x: _pow15(x)[1]),
]  # fmt: skip


def _logistic(x):
    return 1.0 / (1.0 + np.exp(-12.0 * (x - 0.35)))


#: signals written after the method was built (``--held-out``): a check that
#: its figures are not fitted to FUNCTIONS. Their derivatives are exact.
HELD_OUT = [
    ("cos(3x) + x²/2", "smooth", lambda x: np.cos(3 * x) + 0.5 * x**2,
     lambda x: -3 * np.sin(3 * x) + x),
    ("exp(−2x)sin(4πx)", "smooth",
     lambda x: np.exp(-2 * x) * np.sin(4 * np.pi * x),
     lambda x: np.exp(-2 * x)
     * (4 * np.pi * np.cos(4 * np.pi * x) - 2 * np.sin(4 * np.pi * x))),
    ("logistic 1/(1+e^(−12(x−0.35)))", "local", _logistic,
     lambda x: 12 * _logistic(x) * (1 - _logistic(x))),
    ("bump exp(−50(x−0.6)²)", "local", lambda x: np.exp(-50 * (x - 0.6) ** 2),
     lambda x: -100 * (x - 0.6) * np.exp(-50 * (x - 0.6) ** 2)),
    ("|x − 0.6|^2.5", "non-smooth", lambda x: np.abs(x - 0.6) ** 2.5,
     lambda x: 2.5 * np.sign(x - 0.6) * np.abs(x - 0.6) ** 1.5),
    ("max(0, x − 0.4)² + sin(2x)", "non-smooth",
     lambda x: np.maximum(0, x - 0.4) ** 2 + np.sin(2 * x),
     lambda x: 2 * np.maximum(0, x - 0.4) + 2 * np.cos(2 * x)),
    ("√(x + 0.05)", "non-stationary", lambda x: np.sqrt(x + 0.05),
     lambda x: 0.5 / np.sqrt(x + 0.05)),
    ("x sin(6x) + |x − 0.3|^1.5", "non-smooth",
     lambda x: x * np.sin(6 * x) + np.abs(x - 0.3) ** 1.5,
     lambda x: np.sin(6 * x) + 6 * x * np.cos(6 * x)
     + 1.5 * np.sign(x - 0.3) * np.abs(x - 0.3) ** 0.5),
]  # fmt: skip
NOISE = [0.001, 0.02, 0.2]
SIZES = [100]
REPLICATES = 3  # noise draws per case: one draw decides a case's coverage alone

NO_TRUTH = [
    "gpgrad",
    "spline",
    "Savitzky–Golay",
    "finite differences",
    "PyNumDiff (no truth)",
]
ORACLE = "PyNumDiff (oracle)"
#: the single-kernel fit that was ``gpgrad estimate``'s default before the
#: average (a reference column; not among the competitors)
SINGLE = "gpgrad Matérn 5/2"
METHODS = NO_TRUTH + [ORACLE, SINGLE]


# --------------------------------------------------------------------------
# the estimators


def est_gpgrad(x, y, seed, kernel="auto"):
    """Posterior mean and standard deviation of f' at x."""
    with warnings.catch_warnings():
        # a noise or lengthscale on a bound is part of what is measured here
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        if kernel == "auto":
            # the command's defaults: 3 starts (--restarts), seed 0 (--seed)
            est = gpgrad.auto.estimate(x, y, order=1, restarts=3, seed=seed)
            return est.df_mean, est.df_std, est.model.best.name
        k = {"rbf": kernels.RBF, "matern52": kernels.Matern52}[kernel]()
        res = gpgrad.fit(gpgrad.GP(k), x[:, None], y, restarts=3, seed=seed)
        g = res.posterior.gradient(x[:, None])
    return g.mean[:, 0], g.std[:, 0], kernel


def est_spline(x, y):
    from scipy.interpolate import make_smoothing_spline

    return make_smoothing_spline(x, y).derivative()(x)


def savgol_window(n):
    w = int(n // 5)
    w -= 1 - w % 2  # odd
    return max(w, 5)


def est_savgol(x, y):
    from scipy.signal import savgol_filter

    dx = x[1] - x[0]
    return savgol_filter(y, savgol_window(len(x)), 3, deriv=1, delta=dx, mode="interp")


def est_fd(x, y):
    return np.gradient(y, x, edge_order=2)


def bandlimit(x, y):
    """The signal's bandlimit (Hz in x's units) read off the periodogram: the
    highest frequency whose power is 10× above the noise floor (the median
    power of the upper half of the spectrum)."""
    dt = x[1] - x[0]
    r = y - np.polyval(np.polyfit(x, y, 1), x)
    power = np.abs(np.fft.rfft(r)) ** 2
    freqs = np.fft.rfftfreq(len(y), dt)
    floor = np.median(power[len(power) // 2 :])
    above = np.nonzero(power[1:] > 10 * floor)[0]
    f = freqs[1:][above[-1]] if above.size else freqs[1]
    return float(max(f, freqs[1]))


def _pynumdiff():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pynumdiff
        from pynumdiff.optimize import optimize
    return pynumdiff, optimize


#: reduced search spaces (seeds of Nelder–Mead and categorical choices) that
#: keep the oracle affordable; the full defaults of pynumdiff.optimize take
#: minutes per data set
def _spaces(pnd, quick):
    sp = {
        pnd.rtsdiff: {"forwardbackward": {False}, "order": {2, 3},
                      "log_qr_ratio": [1.0, 7.0, 13.0]},
        pnd.splinediff: {"degree": {3, 5}, "s": [0.5, 1.0, 1.5]},
        pnd.savgoldiff: {"degree": [2, 3, 5], "window_size": [11, 31, 51],
                         "smoothing_win": [3, 11, 31]},
        pnd.butterdiff: {"filter_order": {2, 4}, "cutoff_freq": [0.01, 0.1, 0.5],
                         "num_iterations": [1]},
        pnd.spectraldiff: {"extension": {"even", "odd", "detrend"},
                           "pad_to_flat": {False}, "cutoff_freq": [0.05, 0.2, 0.5]},
        pnd.kerneldiff: {"kernel": {"gaussian", "friedrichs"},
                         "window_size": [5, 15, 31], "num_iterations": [1, 5]},
        pnd.polydiff: {"stride": [1], "kernel": {"friedrichs"},
                       "degree": [2, 4], "window_size": [11, 31, 51]},
    }  # fmt: skip
    if quick:
        sp = {k: sp[k] for k in (pnd.rtsdiff, pnd.savgoldiff)}
        sp[pnd.rtsdiff] = {"forwardbackward": {True}, "order": {2},
                           "log_qr_ratio": [3.0, 9.0]}  # fmt: skip
        sp[pnd.savgoldiff] = {"degree": [3], "window_size": [11],
                              "smoothing_win": [3, 11]}  # fmt: skip
    return sp


def est_pynumdiff_notruth(x, y, quick=False):
    """rtsdiff tuned by pynumdiff's own loss with the estimated bandlimit."""
    pnd, optimize = _pynumdiff()
    dt = float(x[1] - x[0])
    space = _spaces(pnd, quick)[pnd.rtsdiff]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, _ = optimize(
            pnd.rtsdiff, y, dt, bandlimit=bandlimit(x, y),
            search_space_updates=space, parallel=False,
        )  # fmt: skip
        _, dxdt = pnd.rtsdiff(y, dt, **params)
    return dxdt


def est_pynumdiff_oracle(x, y, true, quick=False):
    """The best PyNumDiff method, each tuned against the true derivative."""
    pnd, optimize = _pynumdiff()
    dt = float(x[1] - x[0])
    best, best_name = None, None
    # the Kalman smoother's one continuous parameter: a grid stands in for
    # Nelder-Mead (each of its evaluations is a Python-loop filter pass)
    for order in (1, 2, 3) if not quick else (2,):
        for lq in np.arange(-4.0, 20.1, 2.0):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, dxdt = pnd.rtsdiff(y, dt, order=order, log_qr_ratio=float(lq))
            err = float(np.sqrt(np.mean((dxdt - true) ** 2)))
            if np.isfinite(err) and (best is None or err < best[0]):
                best, best_name = (err, dxdt), "rtsdiff"
    for func, space in _spaces(pnd, quick).items():
        if func is pnd.rtsdiff:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                params, _ = optimize(
                    func, y, dt, dxdt_truth=true,
                    search_space_updates=space, parallel=False,
                )  # fmt: skip
                _, dxdt = func(y, dt, **params)
            except Exception:  # a method that cannot run on this series
                continue
        err = float(np.sqrt(np.mean((dxdt - true) ** 2)))
        if np.isfinite(err) and (best is None or err < best[0]):
            best, best_name = (err, dxdt), func.__name__
    return best[1], best_name


# --------------------------------------------------------------------------


def run_case(fname, kind, f, df, level, n, reps, seed0, kernel="auto", quick=False):
    x = np.linspace(0.0, 1.0, n)
    fine = np.linspace(0.0, 1.0, 2001)
    sd = level * np.std(f(fine))
    true = df(x)
    sq = {m: [] for m in METHODS}
    z, z_single = [], []
    t_gp = 0.0
    picked, oracle_names = [], []
    for r in range(reps):
        rng = np.random.default_rng([seed0, n, int(level * 10000), r])
        y = f(x) + sd * rng.normal(size=n)
        t0 = time.perf_counter()
        m, s, name = est_gpgrad(x, y, seed=r, kernel=kernel)
        t_gp += time.perf_counter() - t0
        picked.append(name)
        sq["gpgrad"].append((m - true) ** 2)
        z.append((m - true) / s)
        m1, s1, _ = est_gpgrad(x, y, seed=r, kernel="matern52")
        sq[SINGLE].append((m1 - true) ** 2)
        z_single.append((m1 - true) / s1)
        sq["spline"].append((est_spline(x, y) - true) ** 2)
        sq["Savitzky–Golay"].append((est_savgol(x, y) - true) ** 2)
        sq["finite differences"].append((est_fd(x, y) - true) ** 2)
        sq["PyNumDiff (no truth)"].append(
            (est_pynumdiff_notruth(x, y, quick) - true) ** 2
        )
        o, oname = est_pynumdiff_oracle(x, y, true, quick)
        oracle_names.append(oname)
        sq[ORACLE].append((o - true) ** 2)
    rmse = {k: float(np.sqrt(np.mean(np.concatenate(v)))) for k, v in sq.items()}
    z = np.concatenate(z)
    z_single = np.concatenate(z_single)
    cover = {str(lv): float(np.mean(np.abs(z) <= ZQ[lv])) for lv in LEVELS}
    return {
        "function": fname,
        "kind": kind,
        "noise": level,
        "n": n,
        "rmse": rmse,
        "inside": int(np.sum(np.abs(z) <= Z95)),
        "points": int(z.size),
        "coverage": cover["0.95"],
        "coverage_levels": cover,
        "z_mean": float(np.mean(z)),
        "z_std": float(np.std(z)),
        "z": [float(v) for v in z],
        "coverage_single": float(np.mean(np.abs(z_single) <= Z95)),
        "gpgrad_top_kernel": picked,
        "oracle_method": oracle_names,
        "seconds_per_fit": t_gp / reps,
    }


def _run_job(job):
    i, level, n, reps, seed, kernel, quick, held_out = job
    fname, kind, f, df = (HELD_OUT if held_out else FUNCTIONS)[i]
    return run_case(fname, kind, f, df, level, n, reps, seed, kernel, quick=quick)


def _report(k, r):
    print(
        f"  done {k}: {r['function']}, noise {r['noise']:g}, n {r['n']}: "
        f"gpgrad {r['rmse']['gpgrad']:.3g}, oracle {r['rmse'][ORACLE]:.3g}, "
        f"coverage {100 * r['coverage']:.0f}%",
        file=sys.stderr,
    )


def machine_lines():
    import scipy

    cpu = cpu_model()
    try:
        import torch

        tv = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        tv = "torch not installed (finite-difference likelihood gradients)"
    try:
        pnd, _ = _pynumdiff()
        pv = f"pynumdiff {pnd.__version__}"
    except ImportError:  # pragma: no cover
        pv = "pynumdiff not installed"
    return [
        f"machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()}",
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, {tv}, {pv}, gpgrad {gpgrad.__version__}",
    ]


SHORT = {
    "gpgrad": "gpgrad",
    "spline": "spline",
    "Savitzky–Golay": "Savitzky–Golay",
    "finite differences": "finite diff.",
    "PyNumDiff (no truth)": "PyNumDiff no truth",
    ORACLE: "PyNumDiff oracle",
    SINGLE: "Matérn 5/2 alone",
}


def table(results):
    head = (
        "| function | noise | n | "
        + " | ".join(SHORT[m] for m in METHODS)
        + " | gpgrad / oracle | coverage 50/90/95/99 % | z mean ± sd |"
    )
    lines = [head, "|---|---:|---:|" + "---:|" * (len(METHODS) + 3)]
    for r in results:
        best = min(r["rmse"][m] for m in NO_TRUTH)
        cells = []
        for m in METHODS:
            v = r["rmse"][m]
            txt = f"{v:.3g}"
            cells.append(f"**{txt}**" if m in NO_TRUTH and v == best else txt)
        cov = "/".join(f"{100 * r['coverage_levels'][str(lv)]:.0f}" for lv in LEVELS)
        ratio = r["rmse"]["gpgrad"] / r["rmse"][ORACLE]
        lines.append(
            # a "|" inside a cell would end it in Markdown
            f"| {r['function'].replace('|', chr(92) + '|')} | {r['noise']:g} | "
            f"{r['n']} | "
            + " | ".join(cells)
            + f" | {ratio:.2f} | {cov} | {r['z_mean']:+.2f} ± {r['z_std']:.2f} |"
        )
    return "\n".join(lines)


def summary(results):
    wins = sum(
        r["rmse"]["gpgrad"] == min(r["rmse"][m] for m in NO_TRUTH) for r in results
    )
    inside = sum(r["inside"] for r in results)
    points = sum(r["points"] for r in results)
    cov = inside / points
    worst = min(r["coverage"] for r in results)
    ratio = np.array([r["rmse"]["gpgrad"] / r["rmse"][ORACLE] for r in results])
    win_share = wins / len(results)
    z = np.concatenate([r["z"] for r in results])
    levels = {
        lv: float(np.mean(np.abs(z) <= ZQ[lv])) for lv in LEVELS
    }  # fmt: skip
    secs = [r["seconds_per_fit"] for r in results]
    single = np.array([r["rmse"]["gpgrad"] / r["rmse"][SINGLE] for r in results])
    cov_single = np.mean([r["coverage_single"] for r in results])
    lines = [
        f"gpgrad RMSE / PyNumDiff oracle RMSE: median {np.median(ratio):.2f} "
        f"(target ≤ 1): "
        + ("met" if np.median(ratio) <= 1 else "NOT met")
        + f"; gpgrad at or below the oracle in {int(np.sum(ratio <= 1))} of "
        f"{len(results)} cases",
        f"gpgrad has the lowest derivative RMSE among the no-truth methods in "
        f"{wins} of {len(results)} cases ({100 * win_share:.0f}%; target ≥ 90%): "
        + ("met" if win_share >= 0.9 else "NOT met"),
        f"gpgrad 95% intervals cover {inside} of {points} true derivatives "
        f"({100 * cov:.1f}%; target 90–98%): "
        + ("met" if 0.90 <= cov <= 0.98 else "NOT met")
        + f"; lowest case {100 * worst:.0f}% (target ≥ 85%): "
        + ("met" if worst >= 0.85 else "NOT met"),
        "coverage at 50/90/95/99%: "
        + ", ".join(f"{100 * levels[lv]:.1f}%" for lv in LEVELS)
        + f"; z-scores mean {np.mean(z):+.2f}, sd {np.std(z):.2f}",
        f"gpgrad fit + derivative: median {np.median(secs):.2f} s per data set",
        f"the average against Matérn 5/2 alone (the former default): RMSE ratio "
        f"median {np.median(single):.2f}, lower in {int(np.sum(single < 1))} of "
        f"{len(results)} cases; Matérn 5/2's 95% coverage "
        f"{100 * cov_single:.1f}%",
    ]
    return lines, win_share, cov


def _labels(results):
    names = list(dict.fromkeys(r["function"] for r in results))
    labels = [
        f"F{names.index(r['function']) + 1} σ{r['noise']:g} n{r['n']}" for r in results
    ]
    key = ",  ".join(f"F{i + 1}: {n}" for i, n in enumerate(names))
    return labels, key


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    labels, key = _labels(results)
    xs = np.arange(len(results))
    ax = axes[0]
    for m, mark in zip(METHODS, "o^sv<*x"):
        ax.semilogy(xs, [r["rmse"][m] for r in results], mark, ms=4, label=m)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("RMSE of f' (log scale)")
    ax.legend(fontsize=7)
    ax.set_title("derivative RMSE per case")
    ax = axes[1]
    ax.bar(xs, [100 * r["coverage"] for r in results], color="tab:blue")
    ax.axhline(95, color="k", lw=1, ls="--")
    ax.axhspan(90, 98, color="tab:green", alpha=0.15)
    ax.axhline(85, color="tab:red", lw=1, ls=":")
    ax.set_ylim(50, 100)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("share of true f' inside the 95% interval (%)")
    ax.set_title("gpgrad coverage per case")
    fig.text(0.5, 0.01, key, ha="center", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_calibration(results, path):
    """Nominal against empirical coverage (overall and per case) and the
    z-scores' histogram against the standard normal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    nominal = np.linspace(0.01, 0.995, 60)
    q = norm.ppf(0.5 + nominal / 2)
    ax = axes[0]
    for r in results:
        z = np.abs(np.asarray(r["z"]))
        ax.plot(nominal, [np.mean(z <= v) for v in q], color="0.6", lw=0.6)
    z_all = np.abs(np.concatenate([r["z"] for r in results]))
    ax.plot(nominal, [np.mean(z_all <= v) for v in q], color="tab:blue", lw=2,
            label="all cases")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    ax.plot([], [], color="0.6", lw=0.6, label="one case")
    ax.set_xlabel("nominal coverage of the central interval")
    ax.set_ylabel("share of true f' inside")
    ax.set_title("gpgrad calibration of f'")
    ax.legend(fontsize=8)
    ax = axes[1]
    z = np.concatenate([r["z"] for r in results])
    zc = np.clip(z, -6, 6)
    ax.hist(zc, bins=60, range=(-6, 6), density=True, color="tab:blue", alpha=0.7,
            label="(mean − f') / std")  # fmt: skip
    g = np.linspace(-6, 6, 300)
    ax.plot(g, norm.pdf(g), "k", lw=1.2, label="N(0, 1)")
    ax.set_title(f"z-scores: mean {np.mean(z):+.2f}, sd {np.std(z):.2f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny suite, for tests")
    p.add_argument("--out", default="accuracy_results", help="output folder")
    p.add_argument("--replicates", type=int, default=None)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument(
        "--functions",
        type=int,
        nargs="+",
        metavar="I",
        help="only these test signals (0-based indices into FUNCTIONS): a fast "
        "loop for development",
    )
    p.add_argument(
        "--noise", type=float, nargs="+", metavar="LEVEL", help="only these levels"
    )
    p.add_argument(
        "--held-out",
        action="store_true",
        help="the held-out signals (HELD_OUT, written after the method was "
        "built) instead of FUNCTIONS; outputs accuracy_held_out.* and "
        "calibration_held_out.png",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="cases run in this many processes"
    )
    p.add_argument(
        "--kernel",
        choices=["auto", "matern52", "rbf"],
        default="auto",
        help="gpgrad's kernel: 'auto' (default) is gpgrad.auto.estimate, the "
        "evidence-weighted average over a family of kernels",
    )
    a = p.parse_args(argv)
    signals = HELD_OUT if a.held_out else FUNCTIONS
    if a.quick:
        funcs, noise, sizes, reps = signals[:2], [0.05], [30], 1
    else:
        funcs, noise, sizes, reps = signals, NOISE, SIZES, REPLICATES
    if a.replicates is not None:
        reps = a.replicates
    index = list(range(len(funcs)))
    if a.functions is not None:
        bad = [i for i in a.functions if not 0 <= i < len(funcs)]
        if bad:
            p.error(f"--functions takes indices 0..{len(funcs) - 1}, got {bad}")
        index = a.functions
    if a.noise is not None:
        noise = a.noise
    os.makedirs(a.out, exist_ok=True)
    for line in machine_lines():
        print(line)
    cmd = "python benchmarks/accuracy.py" + (" --quick" if a.quick else "")
    if a.held_out:
        cmd += " --held-out"
    if a.kernel != "auto":
        cmd += f" --kernel {a.kernel}"
    if a.replicates is not None:
        cmd += f" --replicates {a.replicates}"
    if a.jobs > 1:
        cmd += f" --jobs {a.jobs}"
    if a.functions is not None:
        cmd += " --functions " + " ".join(map(str, a.functions))
    if a.noise is not None:
        cmd += " --noise " + " ".join(f"{v:g}" for v in a.noise)
    print(f"command: {cmd}; {reps} replicates per case, seed {a.seed}")
    t0 = time.perf_counter()
    jobs = [
        (i, level, n, reps, a.seed, a.kernel, a.quick, a.held_out)
        for i in index
        for level in noise
        for n in sizes
    ]
    if a.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(a.jobs) as pool:
            results = []
            for r in pool.imap(_run_job, jobs):
                results.append(r)
                _report(len(results), r)
    else:
        results = []
        for job in jobs:
            results.append(_run_job(job))
            _report(len(results), results[-1])
    md = table(results)
    lines, win_share, cov = summary(results)
    total = time.perf_counter() - t0
    print()
    print(md)
    print()
    for line in lines:
        print(line)
    print(f"total {total:.0f} s")
    tag = "_held_out" if a.held_out else ""
    with open(os.path.join(a.out, f"accuracy{tag}.md"), "w") as fh:
        fh.write(md + "\n\n" + "\n".join(f"- {s}" for s in lines) + "\n")
    with open(os.path.join(a.out, f"accuracy{tag}.json"), "w") as fh:
        json.dump(
            {"machine": machine_lines(), "command": cmd, "seconds": total,
             "cases": results},
            fh, indent=1, ensure_ascii=False,
        )  # fmt: skip
    plot(results, os.path.join(a.out, f"accuracy{tag}.png"))
    plot_calibration(results, os.path.join(a.out, f"calibration{tag}.png"))
    print(f"wrote accuracy{tag}.md, accuracy{tag}.json, accuracy{tag}.png and "
          f"calibration{tag}.png in {a.out}")  # fmt: skip
    return results, win_share, cov


if __name__ == "__main__":
    main()
