"""Long series: fit (one start) and the derivative with bands at every sample.

For n = 10³ … ``--max-n`` samples of a noisy signal on a regular grid
(100 samples per unit of time), side by side in one run, each figure in a
process of its own (time and peak resident memory, interpreter included):

* gpgrad, state-space solver (``method="statespace"``): ``gpgrad.fit`` with
  one start and its default bounds, then ``post.gradient(t)`` mean and
  standard deviation at every sample;
* gpgrad on an irregular series (the same signal at sorted uniform random
  times, the general scan path): one likelihood evaluation with its gradient
  (a fit takes about 15) and the derivative with bands at every sample, at
  10⁵ samples and above;
* gpgrad, dense Cholesky, the same work, up to ``--dense-max`` samples;
* PyNumDiff's Kalman smoother ``kalman_smooth.rtsdiff`` (constant-acceleration
  model, no fitted hyperparameters, no bands; its ``log_qr_ratio`` picked once
  on the 10⁴ case against the true derivative, which favours it);
* celerite2: fit of a Matérn-3/2 term by L-BFGS-B on its O(n) likelihood (one
  start, finite-difference gradient); celerite2 has no derivative posterior.

Usage::

    python benchmarks/timeseries.py              # up to 10⁶ samples
    python benchmarks/timeseries.py --max-n 1e7  # also 10⁷ (state space only)

Writes ``benchmarks/results/timeseries.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DT = 0.01
NOISE = 0.1
KERNEL = "Matern52"
#: PyNumDiff's rtsdiff log_qr_ratio, the best on n = 10⁴ of {−4, −2, 0, 2, 4, 6, 8}
RTS_LOG_QR = 4.0


def _signal(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) * DT
    f = np.sin(t) + 0.5 * np.sin(3.1 * t)
    df = np.cos(t) + 1.55 * np.cos(3.1 * t)
    return t, f + NOISE * rng.normal(size=n), df


def _rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


# --------------------------------------------------------------------------
# workers (each in a process of its own)


def work_gpgrad(spec):
    # libraries imported before the clock, as for the peers (scipy.optimize
    # is the optimizer, imported by fit on first use)
    import scipy.optimize  # noqa: F401

    import gpgrad

    n, method = spec["n"], spec["method"]
    t, y, df = _signal(n)
    kernel = getattr(gpgrad.kernels, KERNEL)()
    t0 = time.perf_counter()
    res = gpgrad.fit(gpgrad.GP(kernel, method=method), t[:, None], y, restarts=1)
    t1 = time.perf_counter()
    g = res.posterior.gradient(t[:, None])
    mean, std = np.asarray(g.mean)[:, 0], np.asarray(g.std)[:, 0]
    t2 = time.perf_counter()
    z = (mean - df) / std
    return {
        "fit_s": t1 - t0,
        "derivative_s": t2 - t1,
        "total_s": t2 - t0,
        "peak_rss_mb": _machine.peak_rss_mb(),
        "method": res.posterior.method,
        "rmse": _rmse(mean, df),
        "coverage_2sd": float(np.mean(np.abs(z) <= 2.0)),
        "params": {k: float(np.asarray(v)) for k, v in res.params.items()},
        "evaluations": res.n_evaluations,
        "log_marginal_likelihood": float(res.log_marginal_likelihood),
    }


def work_irregular(spec):
    """One likelihood evaluation with its gradient (torch autograd through the
    solver's adjoint pass) and the derivative bands, irregular times."""
    import torch

    import gpgrad

    n = spec["n"]
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0.0, n * DT, n))
    y = np.sin(t) + 0.5 * np.sin(3.1 * t) + NOISE * rng.normal(size=n)
    df = np.cos(t) + 1.55 * np.cos(3.1 * t)
    theta = torch.tensor([1.4, 1.6, 0.01], dtype=torch.float64, requires_grad=True)
    t0 = time.perf_counter()
    k = gpgrad.kernels.Matern52(lengthscale=theta[0], variance=theta[1])
    gp = gpgrad.GP(k, noise=theta[2], method="statespace", backend="torch")
    lml = gp.log_marginal_likelihood(t[:, None], y)
    (grad,) = torch.autograd.grad(lml, theta)
    t1 = time.perf_counter()
    post = gpgrad.GP(
        gpgrad.kernels.Matern52(lengthscale=1.4, variance=1.6),
        noise=0.01,
        method="statespace",
    ).condition(t[:, None], y)
    g = post.gradient(t[:, None])
    mean, std = np.asarray(g.mean)[:, 0], np.asarray(g.std)[:, 0]
    t2 = time.perf_counter()
    return {
        "evaluation_s": t1 - t0,
        "derivative_s": t2 - t1,
        "total_s": t2 - t0,
        "peak_rss_mb": _machine.peak_rss_mb(),
        "rmse": _rmse(mean, df),
        "coverage_2sd": float(np.mean(np.abs((mean - df) / std) <= 2.0)),
    }


def work_pynumdiff(spec):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pynumdiff.kalman_smooth import rtsdiff

    t, y, df = _signal(spec["n"])
    t0 = time.perf_counter()
    _, dx = rtsdiff(y, DT, 2, spec.get("log_qr", RTS_LOG_QR), forwardbackward=False)
    t1 = time.perf_counter()
    return {
        "total_s": t1 - t0,
        "peak_rss_mb": _machine.peak_rss_mb(),
        "rmse": _rmse(dx, df),
    }


def work_celerite2(spec):
    import celerite2
    from celerite2 import terms
    from scipy.optimize import minimize

    t, y, _ = _signal(spec["n"])

    def nll(p):
        sigma, rho, jit = np.exp(p)
        gp = celerite2.GaussianProcess(terms.Matern32Term(sigma=sigma, rho=rho))
        gp.compute(t, diag=jit)
        return -gp.log_likelihood(y)

    x0 = np.log([np.std(y), 1.0, 0.1 * np.var(y)])
    t0 = time.perf_counter()
    nll(x0)
    t1 = time.perf_counter()
    res = minimize(nll, x0, method="L-BFGS-B")
    t2 = time.perf_counter()
    return {
        "likelihood_s": t1 - t0,
        "total_s": t2 - t1,
        "evaluations": int(res.nfev),
        "peak_rss_mb": _machine.peak_rss_mb(),
    }


# --------------------------------------------------------------------------


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = {
        "statespace": "gpgrad state space (fit + f′ with bands)",
        "dense": "gpgrad dense (fit + f′ with bands)",
        "rtsdiff": "PyNumDiff rtsdiff (f′, fixed tuning)",
        "celerite2": "celerite2 (fit, no derivative)",
        "irregular": "gpgrad irregular times (1 evaluation + f′ with bands)",
    }
    for key, label in labels.items():
        pts = [(r["n"], r[key]) for r in rows if r.get(key, {}).get("status") == "ok"]
        if not pts:
            continue
        n = [p[0] for p in pts]
        ax1.loglog(n, [p[1]["total_s"] for p in pts], "o-", label=label)
        ax2.loglog(n, [p[1]["peak_rss_mb"] for p in pts], "o-", label=label)
    ax1.set_xlabel("samples")
    ax1.set_ylabel("wall time (s)")
    ax2.set_xlabel("samples")
    ax2.set_ylabel("peak resident memory (MiB)")
    ax1.axhline(20, color="grey", lw=0.5, ls="--")
    ax2.axhline(2048, color="grey", lw=0.5, ls="--")
    ax1.legend(fontsize=7)
    fig.suptitle("Long series: fit and derivative (shared 2-core CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _table(rows, info):
    lines = [
        f"Machine: {_machine.machine_line(info)} (shared with other jobs: "
        "absolute times are inflated; compare within a row).",
        "",
        "| n | state space: fit + f′ bands (s) | evaluations | MiB | f′ RMSE "
        "| 2σ coverage | irregular: 1 evaluation (s) | + f′ bands (s) | MiB "
        "| dense (s) | MiB | rtsdiff (s) | MiB | f′ RMSE | celerite2 fit (s) "
        "| 1 likelihood (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
        "|---:|---:|",
    ]

    def cell(r, key, field, fmt="{:.2f}"):
        v = r.get(key, {})
        if v.get("status") != "ok":
            return v.get("status", "–")
        return fmt.format(v[field])

    for r in rows:
        lines.append(
            f"| {r['n']:,} | {cell(r, 'statespace', 'total_s')} "
            f"| {cell(r, 'statespace', 'evaluations', '{:d}')} "
            f"| {cell(r, 'statespace', 'peak_rss_mb', '{:.0f}')} "
            f"| {cell(r, 'statespace', 'rmse', '{:.3f}')} "
            f"| {cell(r, 'statespace', 'coverage_2sd', '{:.2f}')} "
            f"| {cell(r, 'irregular', 'evaluation_s')} "
            f"| {cell(r, 'irregular', 'derivative_s')} "
            f"| {cell(r, 'irregular', 'peak_rss_mb', '{:.0f}')} "
            f"| {cell(r, 'dense', 'total_s')} "
            f"| {cell(r, 'dense', 'peak_rss_mb', '{:.0f}')} "
            f"| {cell(r, 'rtsdiff', 'total_s')} "
            f"| {cell(r, 'rtsdiff', 'peak_rss_mb', '{:.0f}')} "
            f"| {cell(r, 'rtsdiff', 'rmse', '{:.3f}')} "
            f"| {cell(r, 'celerite2', 'total_s')} "
            f"| {cell(r, 'celerite2', 'likelihood_s', '{:.3f}')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-n", type=float, default=1e6, help="largest series")
    ap.add_argument("--min-n", type=float, default=1e3, help="smallest series")
    ap.add_argument("--dense-max", type=float, default=2000, help="largest dense")
    ap.add_argument(
        "--irregular-min", type=float, default=1e5, help="smallest irregular series"
    )
    ap.add_argument("--peers-max", type=float, default=1e6, help="largest for peers")
    ap.add_argument("--time-budget", type=float, default=900.0, help="s per run")
    ap.add_argument("--mem-budget", type=float, default=6000.0, help="MiB per run")
    ap.add_argument("--out", default=str(RESULTS / "timeseries"))
    args = ap.parse_args(argv)
    info = _machine.machine_info()
    print(_machine.machine_line(info), flush=True)
    sizes = [
        n for n in (10**3, 10**4, 10**5, 10**6, 10**7) if args.min_n <= n <= args.max_n
    ]
    rows = []
    script = Path(__file__).resolve()
    budget = dict(time_budget=args.time_budget, mem_budget_mb=args.mem_budget)
    for n in sizes:
        row = {"n": n}
        row["statespace"] = _machine.run_isolated(
            script, "work_gpgrad", {"n": n, "method": "statespace"}, **budget
        )
        if n >= args.irregular_min:
            row["irregular"] = _machine.run_isolated(
                script, "work_irregular", {"n": n}, **budget
            )
        if n <= args.dense_max:
            row["dense"] = _machine.run_isolated(
                script, "work_gpgrad", {"n": n, "method": "cholesky"}, **budget
            )
        if n <= args.peers_max:
            row["rtsdiff"] = _machine.run_isolated(
                script, "work_pynumdiff", {"n": n}, **budget
            )
            row["celerite2"] = _machine.run_isolated(
                script, "work_celerite2", {"n": n}, **budget
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"machine": info, "rows": rows}, indent=1)
    )
    out.with_suffix(".md").write_text(_table(rows, info))
    _plot(rows, out.with_suffix(".png"))
    print(_table(rows, info))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _machine.worker_main(globals())
    else:
        main()
