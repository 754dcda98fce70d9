"""Hyperparameter fitting past a dense Cholesky: N points in D dimensions with
values and gradients observed (N·(D + 1) rows), Matérn 5/2, the plain API.

The data are those of ``scaling.py --only large`` (``f(x) = Σ sin(x_d)/√D``
and its gradient at N uniform points in the unit cube) with Gaussian noise of
standard deviation ``--data-noise`` (1e-3) on every entry. The model is
``gpgrad.GP(Matern52(), backend="torch")`` with no method, fitted by
``gpgrad.fit(gp, values, gradients, restarts=1)``: the automatic choice picks
conjugate gradients with the value entries eliminated, the log-determinant of
the Schur complement from the probe solves themselves (stochastic Lanczos
quadrature, seeded probes) and exact gradients of every other term.

Each fit records its wall and CPU time, the number of evaluations, the time of
each and the fitted hyperparameters. ``--seeds`` fits once per probe seed
(``method=CG(seed=s)``, otherwise the defaults) to show how much the stochastic
log-determinant moves the optimum; ``--check-probes`` re-evaluates the log
marginal likelihood at every fitted optimum with that many probes (one common
estimate, so that the optima are compared on one scale). Run from the
repository root::

    python benchmarks/fit_large.py                        # N = 2,000, D = 50
    python benchmarks/fit_large.py --n 1000 --seeds 0 1 2 # 51,000 rows, 3 seeds
    python benchmarks/fit_large.py --probes 4             # 4 probes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(1, str(_HERE.parent))

import _machine as M  # noqa: E402


def data(N, D, noise, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 1.0, (N, D))
    f = np.sin(X).sum(-1) / np.sqrt(D)
    G = np.cos(X) / np.sqrt(D)
    f = f + noise * rng.standard_normal(f.shape)
    G = G + noise * rng.standard_normal(G.shape)
    return X, f, G


def _params(res):
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in res.params.items()}


def fit_once(X, f, G, seed, probes, threads):
    import torch

    import gpgrad
    from gpgrad.solvers.iterative import CG

    torch.set_num_threads(threads)
    opts = {}
    if seed is not None:
        opts["seed"] = seed
    if probes is not None:
        opts["probes"] = probes
    kw = {"method": CG(**opts)} if opts else {}
    gp = gpgrad.GP(gpgrad.kernels.Matern52(), backend="torch", **kw)
    times = []
    last = [time.perf_counter()]

    def progress(start, evaluation, lml):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        print(
            f"  evaluation {evaluation}: log p(y) {lml:.6g} ({times[-1]:.1f} s)",
            flush=True,
        )

    c0, t0 = time.process_time(), time.perf_counter()
    last[0] = t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = gpgrad.fit(
            gp,
            gpgrad.values(X, f),
            gpgrad.gradients(X, G),
            restarts=1,
            progress=progress,
        )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    post = res.gp.condition(gpgrad.values(X, f), gpgrad.gradients(X, G))
    return res.gp, {
        "seed": seed,
        "wall_s": wall,
        "cpu_s": cpu,
        "evaluations": len(times),
        "evaluation_s": times,
        "log_marginal_likelihood": float(res.log_marginal_likelihood),
        "params": _params(res),
        "method": post.method,
        "warnings": sorted(
            {f"{type(w.message).__name__}: {w.message}" for w in caught}
        ),
        "peak_rss_gb": M.peak_rss_mb() / 1024,
    }


def common_estimate(X, f, G, fitted, probes, threads):
    """log p(y) under the ``fitted`` GP with ``probes`` probes (seed 12345)."""
    import torch

    import gpgrad
    from gpgrad.solvers.iterative import CG

    torch.set_num_threads(threads)
    gp = gpgrad.GP(
        fitted.kernel,
        noise=fitted.noise,
        mean=fitted.mean,
        normalize_y=fitted.normalize_y,
        backend="torch",
        method=CG(probes=probes, seed=12345),
    )
    with torch.no_grad():
        return float(
            gp.log_marginal_likelihood(gpgrad.values(X, f), gpgrad.gradients(X, G))
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="points")
    ap.add_argument("--d", type=int, default=50, help="dimensions")
    ap.add_argument("--data-noise", type=float, default=1e-3)
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=[],
        help="fit once per probe seed (method=CG(seed=s)) instead of the defaults",
    )
    ap.add_argument(
        "--probes",
        type=int,
        default=None,
        help="log-determinant probes (method=CG(probes=p)); default: the defaults",
    )
    ap.add_argument("--check-probes", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    info = M.machine_info()
    print(M.machine_line(info))
    X, f, G = data(args.n, args.d, args.data_noise)
    rows = args.n * (args.d + 1)
    print(f"{args.n} points in {args.d}-D, values and gradients: {rows:,} rows")
    runs, fitted = [], []
    for seed in args.seeds or [None]:
        opts = [f"seed={seed}"] if seed is not None else []
        opts += [f"probes={args.probes}"] if args.probes is not None else []
        label = f"method=CG({', '.join(opts)})" if opts else "defaults"
        print(f"fit, {label}:", flush=True)
        gp, r = fit_once(X, f, G, seed, args.probes, args.threads)
        runs.append(r)
        fitted.append(gp)
        print(
            f"  {r['wall_s']:.0f} s wall ({r['cpu_s']:.0f} s CPU), "
            f"{r['evaluations']} evaluations (median "
            f"{np.median(r['evaluation_s']):.1f} s), log p(y) "
            f"{r['log_marginal_likelihood']:.6g}, {r['method']}, peak "
            f"{r['peak_rss_gb']:.2f} GiB",
            flush=True,
        )
        print("  " + ", ".join(f"{k} {v:.6g}" for k, v in r["params"].items()))
        for w in r["warnings"]:
            print("  warning: " + w[:300])
    if args.check_probes:
        for r, gp in zip(runs, fitted):
            r["check_lml"] = common_estimate(
                X, f, G, gp, args.check_probes, args.threads
            )
            print(
                f"log p(y) at the optimum of seed {r['seed']}, "
                f"{args.check_probes} probes: {r['check_lml']:.6g}",
                flush=True,
            )
    if len(runs) > 1:
        names = list(runs[0]["params"])
        print("spread of the fitted hyperparameters over the fits (max/min − 1):")
        for k in names:
            v = np.array([r["params"][k] for r in runs])
            print(f"  {k}: {np.max(v) / np.min(v) - 1:.2%}")
    if args.json:
        out = {
            "machine": info,
            "n": args.n,
            "d": args.d,
            "rows": rows,
            "data_noise": args.data_noise,
            "threads": args.threads,
            "probes": args.probes,
            "runs": runs,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
