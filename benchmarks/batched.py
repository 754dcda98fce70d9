"""Many small problems at once: fit + predict throughput of a batch.

``B`` independent problems (default 1,000), each ``n`` points (50) in ``d``
dimensions (3) with values and gradients observed (n·(d + 1) = 200 rows), noise
0.01, an RBF kernel per problem. gpgrad fits all of them in one batched
optimization (one hyperparameter set per problem, one batched Cholesky per
evaluation, torch backend) and predicts the gradient at ``m`` points (10) per
problem; beside it, the same fit + predict one problem at a time for the first
``--looped`` problems (default 20), extrapolated to ``B``. Run from the
repository root::

    python benchmarks/batched.py                      # CPU
    python benchmarks/batched.py --device cuda        # a GPU: the same script
    python benchmarks/batched.py --problems 200 --json out.json

Prints the machine, the wall time of each part and the throughput in problems
per second; the GPU figure divided by the CPU one (two runs, two machines) is
the GPU's speed-up on this workload.
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

NOISE_SD = 0.01


def problems(B, n, d, m, seed=0):
    """``B`` smooth test functions ``Σ_j a_j sin(w_j·x + c_j)`` (3 terms each),
    observed with noise at ``n`` points in [0, 1]^d; ``m`` query points each."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 1.0, (B, n, d))
    Xs = rng.uniform(0.0, 1.0, (B, m, d))
    w = rng.normal(0.0, 2.0, (B, 3, d))
    a = rng.uniform(0.5, 1.5, (B, 3))
    c = rng.uniform(0.0, 2 * np.pi, (B, 3))

    def f_and_grad(P):
        u = np.einsum("bnd,bjd->bnj", P, w) + c[:, None, :]
        f = np.sum(a[:, None, :] * np.sin(u), axis=-1)
        g = np.einsum("bnj,bjd->bnd", a[:, None, :] * np.cos(u), w)
        return f, g

    y, G = f_and_grad(X)
    _, Gs = f_and_grad(Xs)
    y = y + NOISE_SD * rng.normal(size=y.shape)
    G = G + NOISE_SD * rng.normal(size=G.shape)
    return X, y, G, Xs, Gs


def fit_predict(X, y, G, Xs, device, dtype, maxiter):
    """gpgrad's fit + gradient prediction of one batch (or one problem)."""
    import torch

    import gpgrad

    def t(a):
        return torch.as_tensor(a, dtype=dtype, device=device)

    gp = gpgrad.GP(gpgrad.kernels.RBF(), backend="torch", device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = gpgrad.fit(
            gp,
            gpgrad.values(t(X), t(y)),
            gpgrad.gradients(t(X), t(G)),
            restarts=1,
            maxiter=maxiter,
        )
    pred = res.posterior.gradient(t(Xs))
    mean, std = pred.mean, pred.std
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return res, mean.cpu().numpy(), std.cpu().numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--n", type=int, default=50, help="points per problem")
    ap.add_argument("--d", type=int, default=3, help="dimensions")
    ap.add_argument("--m", type=int, default=10, help="query points per problem")
    ap.add_argument("--looped", type=int, default=20, help="problems fitted one by one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--maxiter", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--optimizer",
        choices=["per-problem", "joint", "both"],
        default="both",
        help="gpgrad.fit.BATCH_OPTIMIZER: each problem its own L-BFGS in "
        "lockstep, or one L-BFGS-B over the summed loss",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    for name in ("problems", "n", "d", "m", "maxiter"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be a positive integer")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = M.machine_info(M.torch_info())
    print(M.machine_line(info), flush=True)
    B, n, d = args.problems, args.n, args.d
    X, y, G, Xs, Gs = problems(B, n, d, args.m)
    rows = n * (d + 1)
    print(f"{B} problems x {n} points in {d}-D, values + gradients ({rows} rows "
          f"each), {args.m} query points each; {args.dtype} on {device}",
          flush=True)  # fmt: skip
    # warm-up (imports, first kernels on the device) on two problems
    fit_predict(X[:2], y[:2], G[:2], Xs[:2], device, dtype, 5)

    import gpgrad.fit as gfit

    optimizers = (
        ["per-problem", "joint"] if args.optimizer == "both" else [args.optimizer]
    )
    runs = {}
    for opt in optimizers:
        gfit.BATCH_OPTIMIZER = opt
        t0 = time.perf_counter()
        res, mean, std = fit_predict(X, y, G, Xs, device, dtype, args.maxiter)
        t_batch = time.perf_counter() - t0
        err = np.sqrt(np.mean((mean - Gs) ** 2))
        inside = float(np.mean(np.abs(mean - Gs) <= 1.96 * std))
        lml = res.log_marginal_likelihood
        lml = np.asarray(lml.cpu() if hasattr(lml, "cpu") else lml, dtype=float)
        runs[opt] = {
            "seconds": t_batch,
            "problems_per_s": B / t_batch,
            "evaluations": res.n_evaluations,
            "gradient_rmse": float(err),
            "coverage_95": inside,
            "mean_lml": float(np.mean(lml)),
            "lml": lml.reshape(-1).tolist(),
        }
        print(f"batched ({opt}): {t_batch:.2f} s for {B} problems = "
              f"{B / t_batch:.1f} problems/s ({res.n_evaluations} evaluations); "
              f"gradient RMSE {err:.3g}, 95 % band coverage {inside:.3f}, mean "
              f"log p {np.mean(lml):.6g}", flush=True)  # fmt: skip
    gfit.BATCH_OPTIMIZER = "per-problem"
    first = runs[optimizers[0]]
    t_batch = first["seconds"]

    k = min(args.looped, B)
    t_loop = None
    looped_lml = []
    if k > 0:
        t0 = time.perf_counter()
        for i in range(k):
            r, _, _ = fit_predict(X[i], y[i], G[i], Xs[i], device, dtype, args.maxiter)
            looped_lml.append(float(r.log_marginal_likelihood))
        t_loop = (time.perf_counter() - t0) / k
        print(f"one at a time: {t_loop:.3f} s per problem = {1 / t_loop:.1f} "
              f"problems/s (first {k})", flush=True)  # fmt: skip
        for opt, r in runs.items():
            gap = np.asarray(looped_lml) - np.asarray(r["lml"][:k])
            r["lml_below_looped_max"] = float(gap.max())
            r["lml_below_looped_median"] = float(np.median(gap))
            r["looped_throughput_ratio"] = t_loop * B / r["seconds"]
            print(f"  {opt}: {r['looped_throughput_ratio']:.1f}x the looped "
                  f"throughput; log p below the one-at-a-time fit's by "
                  f"median {np.median(gap):.2g}, at most {gap.max():.2g} "
                  f"(first {k} problems)", flush=True)  # fmt: skip
    out = {
        "machine": info,
        "problems": B,
        "n": n,
        "d": d,
        "m": args.m,
        "rows_per_problem": rows,
        "device": str(device),
        "dtype": args.dtype,
        "batched_s": t_batch,
        "batched_problems_per_s": B / t_batch,
        "evaluations": first["evaluations"],
        "gradient_rmse": first["gradient_rmse"],
        "coverage_95": first["coverage_95"],
        "mean_lml": first["mean_lml"],
        "optimizers": runs,
        "looped_s_per_problem": t_loop,
        "looped_problems": k,
        "looped_lml": looped_lml,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
