"""Accuracy of derivative estimates from noisy samples: gpgrad against the
usual alternatives.

For each smooth test function with a known derivative, noise level and sample
size, ``n`` equally spaced samples on [0, 1] get Gaussian noise of standard
deviation ``level × std(f)``; every method then estimates ``f'`` at the
sample points:

* **gpgrad**: an RBF and a Matérn-5/2 GP, each with its hyperparameters
  (lengthscale, variance, noise, mean) fitted by maximum marginal likelihood
  (``gpgrad.fit``, 3 starts); the one with the higher marginal likelihood
  gives the posterior mean of ``f'`` and its 95 % interval
  ``mean ± 1.96 std`` (``--kernel rbf`` or ``matern52`` fits only that one);
* **spline**: ``scipy.interpolate.make_smoothing_spline`` (smoothing chosen
  by generalized cross-validation), differentiated;
* **Savitzky–Golay**: ``scipy.signal.savgol_filter(..., deriv=1)``, cubic,
  window the largest odd number ≤ n/5 (at least 5), ``mode="interp"``;
* **finite differences**: ``numpy.gradient`` (central inside, second-order
  one-sided at the ends).

A case is one (function, noise level, n); its RMSE against the true ``f'`` is
the root mean square over the sample points of all its replicates. gpgrad
*wins* a case when its RMSE is the lowest of the four. Coverage is the share of
true derivatives (over every point of every replicate) inside gpgrad's 95 %
intervals.

Usage::

    python benchmarks/accuracy.py                 # the full suite (minutes)
    python benchmarks/accuracy.py --quick         # a few seconds, for tests
    python benchmarks/accuracy.py --out DIR       # where accuracy.md/.png go

Prints the machine, the table, and the summary; writes ``accuracy.md``
(the same table) and ``accuracy.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
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


# --------------------------------------------------------------------------
# test functions on [0, 1]: (name, f, f')

FUNCTIONS = [
    ("sin(2πx)", lambda x: np.sin(2 * np.pi * x),
     lambda x: 2 * np.pi * np.cos(2 * np.pi * x)),
    ("exp(−x)cos(6x)", lambda x: np.exp(-x) * np.cos(6 * x),
     lambda x: -np.exp(-x) * (np.cos(6 * x) + 6 * np.sin(6 * x))),
    ("x³ − x", lambda x: x**3 - x, lambda x: 3 * x**2 - 1),
    ("Runge 1/(1+25(2x−1)²)", lambda x: 1 / (1 + 25 * (2 * x - 1) ** 2),
     lambda x: -100 * (2 * x - 1) / (1 + 25 * (2 * x - 1) ** 2) ** 2),
    ("tanh(5(x−½))", lambda x: np.tanh(5 * (x - 0.5)),
     lambda x: 5 / np.cosh(5 * (x - 0.5)) ** 2),
    ("sin(9x) + x", lambda x: np.sin(9 * x) + x, lambda x: 9 * np.cos(9 * x) + 1),
]  # fmt: skip
NOISE = [0.01, 0.05, 0.1]
SIZES = [30, 100]
REPLICATES = 5

METHODS = ["gpgrad", "spline", "Savitzky–Golay", "finite differences"]


# --------------------------------------------------------------------------
# the estimators


#: kernels gpgrad fits; the one with the higher marginal likelihood is used
GP_KERNELS = {
    "auto": (kernels.RBF, kernels.Matern52),
    "rbf": (kernels.RBF,),
    "matern52": (kernels.Matern52,),
}


def est_gpgrad(x, y, seed, kernel="auto"):
    best = None
    with warnings.catch_warnings():
        # a noise or lengthscale on a bound is part of what is measured here
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        for k in GP_KERNELS[kernel]:
            res = gpgrad.fit(gpgrad.GP(k()), x[:, None], y, restarts=3, seed=seed)
            if (
                best is None
                or res.log_marginal_likelihood > best.log_marginal_likelihood
            ):
                best = res
        g = best.posterior.gradient(x[:, None])
    return g.mean[:, 0], g.std[:, 0]


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


# --------------------------------------------------------------------------


def run_case(fname, f, df, level, n, reps, seed0, kernel="auto"):
    x = np.linspace(0.0, 1.0, n)
    fine = np.linspace(0.0, 1.0, 2001)
    sd = level * np.std(f(fine))
    true = df(x)
    sq = {m: [] for m in METHODS}
    inside = []
    width = []
    t_gp = 0.0
    for r in range(reps):
        rng = np.random.default_rng([seed0, n, int(level * 1000), r])
        y = f(x) + sd * rng.normal(size=n)
        t0 = time.perf_counter()
        m, s = est_gpgrad(x, y, seed=r, kernel=kernel)
        t_gp += time.perf_counter() - t0
        sq["gpgrad"].append((m - true) ** 2)
        inside.append(np.abs(m - true) <= Z95 * s)
        width.append(2 * Z95 * s)
        sq["spline"].append((est_spline(x, y) - true) ** 2)
        sq["Savitzky–Golay"].append((est_savgol(x, y) - true) ** 2)
        sq["finite differences"].append((est_fd(x, y) - true) ** 2)
    rmse = {k: float(np.sqrt(np.mean(np.concatenate(v)))) for k, v in sq.items()}
    inside = np.concatenate(inside)
    return {
        "function": fname,
        "noise": level,
        "n": n,
        "rmse": rmse,
        "inside": int(inside.sum()),
        "points": int(inside.size),
        "coverage": float(inside.mean()),
        "seconds_per_fit": t_gp / reps,
    }


def machine_lines():
    import scipy

    cpu = cpu_model()
    try:
        import torch

        tv = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        tv = "torch not installed (finite-difference likelihood gradients)"
    return [
        f"machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()}",
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, {tv}, gpgrad {gpgrad.__version__}",
    ]


def table(results):
    head = (
        "| function | noise | n | gpgrad | spline | Savitzky–Golay | finite diff. "
        "| gpgrad 95% coverage |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        best = min(r["rmse"].values())
        cells = []
        for m in METHODS:
            v = r["rmse"][m]
            s = f"{v:.3g}"
            cells.append(f"**{s}**" if v == best else s)
        lines.append(
            f"| {r['function']} | {r['noise']:g} | {r['n']} | "
            + " | ".join(cells)
            + f" | {100 * r['coverage']:.0f}% |"
        )
    return "\n".join(lines)


def summary(results):
    wins = sum(r["rmse"]["gpgrad"] == min(r["rmse"].values()) for r in results)
    inside = sum(r["inside"] for r in results)
    points = sum(r["points"] for r in results)
    cov = inside / points
    ratio = [
        r["rmse"]["gpgrad"] / min(v for k, v in r["rmse"].items() if k != "gpgrad")
        for r in results
    ]
    win_share = wins / len(results)
    secs = [r["seconds_per_fit"] for r in results]
    lines = [
        f"gpgrad has the lowest derivative RMSE in {wins} of {len(results)} cases "
        f"({100 * win_share:.0f}%; target ≥ 80%): "
        + ("met" if win_share >= 0.8 else "NOT met"),
        f"gpgrad 95% intervals cover {inside} of {points} true derivatives "
        f"({100 * cov:.1f}%; target 90–98%): "
        + ("met" if 0.90 <= cov <= 0.98 else "NOT met"),
        f"gpgrad RMSE / best other RMSE: median {np.median(ratio):.2f}, "
        f"worst {np.max(ratio):.2f}",
        f"gpgrad fit + gradient: median {np.median(secs):.2f} s per data set "
        "(preliminary timing)",
    ]
    return lines, win_share, cov


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    names = list(dict.fromkeys(r["function"] for r in results))
    labels = [
        f"F{names.index(r['function']) + 1} σ{r['noise']:g} n{r['n']}" for r in results
    ]
    xs = np.arange(len(results))
    ax = axes[0]
    for m, mark in zip(METHODS, "o^sv"):
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
    ax.set_ylim(50, 100)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("share of true f' inside the 95% interval (%)")
    ax.set_title("gpgrad coverage per case")
    key = ",  ".join(f"F{i + 1}: {n}" for i, n in enumerate(names))
    fig.text(0.5, 0.01, key, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny suite, for tests")
    p.add_argument("--out", default="accuracy_results", help="output folder")
    p.add_argument("--replicates", type=int, default=None)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument(
        "--kernel",
        choices=sorted(GP_KERNELS),
        default="auto",
        help="gpgrad's kernel; 'auto' fits RBF and Matern-5/2 and keeps the one "
        "with the higher marginal likelihood (default)",
    )
    a = p.parse_args(argv)
    if a.quick:
        funcs, noise, sizes, reps = FUNCTIONS[:2], [0.05], [30], 1
    else:
        funcs, noise, sizes, reps = FUNCTIONS, NOISE, SIZES, REPLICATES
    if a.replicates is not None:
        reps = a.replicates
    os.makedirs(a.out, exist_ok=True)
    for line in machine_lines():
        print(line)
    cmd = "python benchmarks/accuracy.py" + (" --quick" if a.quick else "")
    if a.kernel != "auto":
        cmd += f" --kernel {a.kernel}"
    if a.replicates is not None:
        cmd += f" --replicates {a.replicates}"
    print(f"command: {cmd}; {reps} replicates per case, seed {a.seed}")
    t0 = time.perf_counter()
    results = []
    for fname, f, df in funcs:
        for level in noise:
            for n in sizes:
                results.append(run_case(fname, f, df, level, n, reps, a.seed, a.kernel))
                print(
                    f"  done {len(results)}: {fname}, noise {level:g}, n {n}",
                    file=sys.stderr,
                )
    md = table(results)
    lines, win_share, cov = summary(results)
    print()
    print(md)
    print()
    for line in lines:
        print(line)
    print(f"total {time.perf_counter() - t0:.0f} s")
    with open(os.path.join(a.out, "accuracy.md"), "w") as fh:
        fh.write(md + "\n\n" + "\n".join(f"- {s}" for s in lines) + "\n")
    plot(results, os.path.join(a.out, "accuracy.png"))
    print(f"wrote {os.path.join(a.out, 'accuracy.md')} and accuracy.png")
    return results, win_share, cov


if __name__ == "__main__":
    main()
