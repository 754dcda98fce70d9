#!/usr/bin/env python
"""Hyperparameter fitting speed: gpgrad against GPyTorch and against the floor.

Each problem observes values and full gradients of a smooth function of ``d``
inputs at ``n`` points (``n·(d+1)`` rows), with noise of standard deviation
0.01 on every entry. In one process, side by side:

* **gpgrad**: ``gpgrad.fit(GP(RBF()), values, gradients, ard=True,
  restarts=1)`` (dense Cholesky, closed-form likelihood gradient);
* **GPyTorch**: ``ScaleKernel(RBFKernelGrad(ard_num_dims=d))``,
  ``ConstantMeanGrad``, ``MultitaskGaussianLikelihood(num_tasks=d+1)``,
  Cholesky forced (``max_cholesky_size``, ``fast_computations`` off), torch
  ``LBFGS(lr=1, max_iter=200, line_search_fn="strong_wolfe")`` in one step;
* **floor**: one Cholesky factorization of the same matrix, one solve, and
  the backward pass of both through torch autograd (the least an
  autograd-based likelihood-and-gradient evaluation does).

For each size it prints the whole-fit time (median of ``--repeats``, the
two libraries' fits interleaved so that a change of the machine's load hits
both), the ratio of the median times with the range of the per-pair ratios
and the ratio of the median CPU times (``time.process_time``: the work done,
less sensitive than wall time to other jobs on a shared machine),
the final log marginal likelihood of both fits, the number of likelihood
evaluations, and one evaluation's time (likelihood and gradient, median of a
few) of gpgrad, of GPyTorch and of the floor. Whole fits above
``--fit-max-rows`` are skipped (only the one-evaluation columns are measured,
at the hyperparameters of a two-iteration gpgrad fit), and so is GPyTorch's
one evaluation above ``--gpytorch-eval-max-rows``. Above
``--gpytorch-fit-max-rows`` only GPyTorch's whole fit is skipped; the record
then gives ``gpytorch_evaluations_for_third``, the number of GPyTorch
evaluations (at the measured one-evaluation time) that would take three times
gpgrad's whole fit, to compare with the counts GPyTorch needs at the sizes
where it was run.
``--bo`` adds a Bayesian-optimization loop that refits at every step, cold
(three starts, ``fit``'s default) and warm-started (``gpgrad.fit(...,
start=previous)``, one start), and prints each iteration's fit time.

Every figure of one run comes from the same process on the same machine: on a
shared machine quote the ratios, not the absolute times.

    python benchmarks/fit_speed.py                          # all sizes
    python benchmarks/fit_speed.py --rows 140 700 --repeats 3 --bo \\
        --json benchmarks/results/fit_speed.json --md benchmarks/results/fit_speed.md
    python benchmarks/fit_speed.py --rows 5500 --gpytorch-fit-max-rows 2200
    python benchmarks/fit_speed.py --rows --bo              # the BO loop only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(1, str(_HERE.parent))

import _machine as M  # noqa: E402

#: rows -> (n points, d dimensions); rows = n (d + 1)
SIZES = {140: (20, 6), 550: (50, 10), 700: (100, 6), 2200: (200, 10), 5500: (500, 10)}
NOISE_SD = 0.01


def problem(n, d, seed=0):
    """Points in [0, 1]^d, values and gradients of a smooth function, noisy."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 1.0, (n, d))
    w = rng.normal(size=d)
    u = X @ w
    s = X.sum(axis=1)
    y = np.sin(2 * u) + 0.5 * np.cos(1.5 * s)
    G = (2 * np.cos(2 * u))[:, None] * w + (-0.75 * np.sin(1.5 * s))[:, None]
    y = y + NOISE_SD * rng.normal(size=n)
    G = G + NOISE_SD * rng.normal(size=(n, d))
    return X, y, G


# --------------------------------------------------------------------------
# gpgrad


def gpgrad_fit(X, y, G, start=None, restarts=1, maxiter=300):
    import gpgrad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gpgrad.fit(
            gpgrad.GP(gpgrad.kernels.RBF()),
            gpgrad.values(X, y),
            gpgrad.gradients(X, G),
            ard=True,
            restarts=restarts,
            start=start,
            maxiter=maxiter,  # fit's default: 300
        )


def gpgrad_evaluation(res, X, y, G):
    """One likelihood-and-gradient evaluation at the fitted hyperparameters,
    as the fit's objective does it (w.r.t. the log parameters and the mean)."""
    import torch

    import gpgrad
    from gpgrad.likelihood import dense_log_marginal_likelihood

    p = res.params
    theta = torch.tensor(
        np.r_[
            np.log(p["lengthscale"]),
            np.log([p["variance"], p["noise.value"], p["noise.gradient"]]),
            p["mean"],
        ],
        requires_grad=True,
    )
    d = X.shape[1]

    def run():
        t = theta
        gp = gpgrad.GP(
            gpgrad.kernels.RBF(lengthscale=t[:d].exp(), variance=t[d].exp()),
            noise={"value": t[d + 1].exp(), "gradient": t[d + 2].exp()},
            mean=t[d + 3],
            backend="torch",
        )
        obs = gp._parse([gpgrad.values(X, y), gpgrad.gradients(X, G)])
        lml = dense_log_marginal_likelihood(gp, obs)
        (g,) = torch.autograd.grad(lml, t)
        return g

    return run


def floor_evaluation(res, X, y, G):
    """Cholesky + solve + their backward pass for the fitted model's matrix."""
    import torch

    import gpgrad
    from gpgrad.covariance import as_blocks, covariance

    gp = res.gp
    obs = [gpgrad.values(X, y), gpgrad.gradients(X, G)]
    blocks = as_blocks(obs, np, np.float64, None)
    K = covariance(gp.kernel, blocks)
    noise = np.r_[
        np.full(len(y), res.params["noise.value"]),
        np.full(G.size, res.params["noise.gradient"]),
    ]
    A0 = torch.as_tensor(K + np.diag(noise))
    r = torch.as_tensor(np.r_[y - res.params["mean"], G.ravel()])[:, None]

    def run():
        A = A0.clone().requires_grad_(True)
        L = torch.linalg.cholesky(A)
        alpha = torch.cholesky_solve(r, L)
        loss = (r * alpha).sum() + 2 * L.diagonal().log().sum()
        loss.backward()
        return A.grad

    return run


# --------------------------------------------------------------------------
# GPyTorch


def gpytorch_fit(X, y, G, maxiter=200, evaluation_only=False):
    """The GPyTorch derivative GP fitted with strong-Wolfe L-BFGS; returns
    ``(lml, evaluations)`` or, with ``evaluation_only``, a function that runs
    one likelihood-and-gradient evaluation."""
    import gpytorch
    import torch

    n, d = X.shape
    Xt = torch.as_tensor(X)
    Yt = torch.as_tensor(np.c_[y, G])

    class Model(gpytorch.models.ExactGP):
        def __init__(self, lik):
            super().__init__(Xt, Yt, lik)
            self.mean_module = gpytorch.means.ConstantMeanGrad()
            base = gpytorch.kernels.RBFKernelGrad(ard_num_dims=d)
            self.covar_module = gpytorch.kernels.ScaleKernel(base)

        def forward(self, x):
            return gpytorch.distributions.MultitaskMultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=d + 1)
    model = Model(lik).double()
    model.train()
    lik.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=maxiter, line_search_fn="strong_wolfe"
    )
    count = [0]

    def closure():
        opt.zero_grad()
        count[0] += 1
        loss = -mll(model(Xt), Yt)
        loss.backward()
        return loss

    settings = (
        gpytorch.settings.max_cholesky_size(10**9),
        gpytorch.settings.fast_computations(False, False, False),
    )

    def run(fn):
        with settings[0], settings[1]:
            return fn()

    if evaluation_only:
        return lambda: run(closure)
    run(lambda: opt.step(closure))
    with torch.no_grad():
        lml = run(lambda: float(mll(model(Xt), Yt))) * Yt.numel()
    return lml, count[0]


# --------------------------------------------------------------------------
# measurement


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return M.median(times), out


def measure(
    rows,
    repeats,
    eval_repeats,
    fit_max_rows,
    gpytorch_eval_max_rows,
    gpytorch_fit_max_rows=10**9,
):
    n, d = SIZES[rows]
    repeats = repeats if rows <= 1000 else 1
    X, y, G = problem(n, d)
    rec = {"rows": rows, "n": n, "d": d}
    if rows <= fit_max_rows:
        # interleaved: gpgrad, GPyTorch, gpgrad, GPyTorch, ...
        run_t = rows <= gpytorch_fit_max_rows
        t_g, t_t, c_g, c_t, res, out_t = [], [], [], [], None, None
        for _ in range(repeats):
            c0 = time.process_time()
            t, res = timed(lambda: gpgrad_fit(X, y, G), 1)
            c_g.append(time.process_time() - c0)
            t_g.append(t)
            if run_t:
                c0 = time.process_time()
                t, out_t = timed(lambda: gpytorch_fit(X, y, G), 1)
                c_t.append(time.process_time() - c0)
                t_t.append(t)
        rec.update(
            gpgrad_fit_s=M.median(t_g),
            gpgrad_fit_all_s=t_g,
            gpgrad_fit_cpu_s=M.median(c_g),
            gpgrad_lml=float(res.log_marginal_likelihood),
            gpgrad_evaluations=res.n_evaluations,
        )
        if run_t:
            lml_t, evals_t = out_t
            rec.update(
                gpytorch_fit_s=M.median(t_t),
                gpytorch_fit_all_s=t_t,
                fit_ratio=M.median(t_g) / M.median(t_t),
                fit_ratio_pairs=[a / b for a, b in zip(t_g, t_t)],
                gpytorch_fit_cpu_s=M.median(c_t),
                fit_cpu_ratio=M.median(c_g) / M.median(c_t),
                gpytorch_lml=lml_t,
                gpytorch_evaluations=evals_t,
            )
    else:
        # one evaluation at the data-driven starting point's short fit
        res = gpgrad_fit(X, y, G, maxiter=2)
    reps = eval_repeats if rows <= 1000 else 1
    ev_g, _ = timed(gpgrad_evaluation(res, X, y, G), reps)
    ev_f, _ = timed(floor_evaluation(res, X, y, G), reps)
    rec.update(gpgrad_eval_s=ev_g, floor_eval_s=ev_f, eval_over_floor=ev_g / ev_f)
    # what is measured so far, in case GPyTorch's evaluation does not finish
    print("partial:", json.dumps(rec), flush=True)
    if rows <= gpytorch_eval_max_rows:
        ev_t, _ = timed(gpytorch_fit(X, y, G, evaluation_only=True), reps)
        rec.update(gpytorch_eval_s=ev_t)
        if "gpgrad_fit_s" in rec and "gpytorch_fit_s" not in rec:
            rec.update(gpytorch_evaluations_for_third=3 * rec["gpgrad_fit_s"] / ev_t)
    rec["load_average_after"] = list(os.getloadavg())
    return rec


def bo_loop(iterations=8, d=4, n0=10, seed=0):
    """A Bayesian-optimization loop on values and gradients: at each step the
    GP is refitted cold (``fit``'s default: the data-driven start and two
    random ones) and warm (one start, from the last warm fit); the
    next point is the lowest lower confidence bound over random candidates."""
    rng = np.random.default_rng(seed)
    w = np.linspace(1.0, 2.0, d)

    def f(X):
        y = np.sum(np.sin(3 * X * w) + (X - 0.3) ** 2, axis=1)
        G = 3 * w * np.cos(3 * X * w) + 2 * (X - 0.3)
        return y, G

    X = rng.uniform(0, 1, (n0, d))
    y, G = f(X)
    prev = None
    rows = []
    for it in range(iterations):
        t0 = time.perf_counter()
        cold = gpgrad_fit(X, y, G, restarts=3)
        t1 = time.perf_counter()
        warm = gpgrad_fit(X, y, G, start=prev)
        t_cold, t_warm = t1 - t0, time.perf_counter() - t1
        prev = warm
        rows.append(
            {
                "iteration": it + 1,
                "points": len(X),
                "cold_s": t_cold,
                "warm_s": t_warm,
                "cold_evaluations": cold.n_evaluations,
                "warm_evaluations": warm.n_evaluations,
                "cold_lml": float(cold.log_marginal_likelihood),
                "warm_lml": float(warm.log_marginal_likelihood),
            }
        )
        C = rng.uniform(0, 1, (512, d))
        pred = warm.posterior.value(C)
        x = C[np.argmin(pred.mean - 2.0 * pred.std)][None, :]
        yx, Gx = f(x)
        X, y, G = np.r_[X, x], np.r_[y, yx], np.r_[G, Gx]
    return rows


# --------------------------------------------------------------------------
# output


def _ms(seconds):
    return "not run" if seconds is None else f"{1e3 * seconds:.4g} ms"


def markdown(machine, records, bo):
    out = [f"Machine: {machine}", ""]
    out.append(
        "| rows (n, d) | gpgrad fit | GPyTorch fit | ratio (range; CPU time) | "
        "gpgrad LML | "
        "GPyTorch LML | evaluations (gpgrad / GPyTorch) | one evaluation: gpgrad "
        "| GPyTorch | floor | gpgrad / floor |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if "gpytorch_fit_s" in r:
            pairs = r.get("fit_ratio_pairs", [r["fit_ratio"]])
            spread = f" ({min(pairs):.2f}–{max(pairs):.2f})" if len(pairs) > 1 else ""
            cpu = r.get("fit_cpu_ratio")
            cpu = "" if cpu is None else f"; CPU time {cpu:.2f}"
            fitcols = (
                f"{r['gpgrad_fit_s']:.3g} s | {r['gpytorch_fit_s']:.3g} s | "
                f"**{r['fit_ratio']:.2f}**{spread}{cpu} | {r['gpgrad_lml']:.2f} | "
                f"{r['gpytorch_lml']:.2f} | {r['gpgrad_evaluations']} / "
                f"{r['gpytorch_evaluations']}"
            )
        elif "gpgrad_fit_s" in r:
            need = r.get("gpytorch_evaluations_for_third")
            need = "" if need is None else f" (⅓ if it needs ≥ {need:.1f} evaluations)"
            fitcols = (
                f"{r['gpgrad_fit_s']:.3g} s | not run{need} | | "
                f"{r['gpgrad_lml']:.2f} | | {r['gpgrad_evaluations']} / "
            )
        else:
            fitcols = "not run | not run | | | | "
        out.append(
            f"| {r['rows']} ({r['n']}, {r['d']}) | {fitcols} | "
            f"{1e3 * r['gpgrad_eval_s']:.4g} ms | {_ms(r.get('gpytorch_eval_s'))} "
            f"| {1e3 * r['floor_eval_s']:.4g} ms | **{r['eval_over_floor']:.2f}** |"
        )
    if bo:
        out += ["", "Bayesian-optimization loop (values + gradients, d = 4):", ""]
        out.append(
            "| iteration | points | cold fit | warm fit | evaluations (cold / warm)"
            " | LML (cold / warm) |"
        )
        out.append("|---|---|---|---|---|---|")
        for b in bo:
            out.append(
                f"| {b['iteration']} | {b['points']} | {b['cold_s']:.3g} s | "
                f"{b['warm_s']:.3g} s | {b['cold_evaluations']} / "
                f"{b['warm_evaluations']} | {b['cold_lml']:.2f} / "
                f"{b['warm_lml']:.2f} |"
            )
        cold = M.median([b["cold_s"] for b in bo])
        warm = M.median([b["warm_s"] for b in bo])
        out += ["", f"Median fit per iteration: cold {cold:.3g} s, warm {warm:.3g} s."]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--rows",
        type=int,
        nargs="*",
        default=sorted(SIZES),
        help="sizes to measure (none: only the --bo loop)",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="whole fits per size (1 above 1000 rows)"
    )
    ap.add_argument("--eval-repeats", type=int, default=5)
    ap.add_argument("--fit-max-rows", type=int, default=10**9)
    ap.add_argument(
        "--gpytorch-eval-max-rows",
        type=int,
        default=10**9,
        help="time GPyTorch's one evaluation only up to this many rows",
    )
    ap.add_argument(
        "--gpytorch-fit-max-rows",
        type=int,
        default=10**9,
        help="run GPyTorch's whole fit only up to this many rows",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bo", action="store_true")
    ap.add_argument("--bo-iterations", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    unknown = sorted(set(args.rows) - set(SIZES))
    if unknown:
        ap.error(f"--rows must be among {sorted(SIZES)}, got {unknown}")

    import torch

    torch.set_num_threads(args.threads)
    info = M.machine_info(M.torch_info())
    machine = M.machine_line(info) + " (shared with other jobs)"
    print(machine, flush=True)
    # warm-up: imports and first calls of both libraries
    X, y, G = problem(8, 2)
    gpgrad_fit(X, y, G)
    gpytorch_fit(X, y, G, maxiter=5)

    records = []
    for rows in args.rows:
        rec = measure(
            rows,
            args.repeats,
            args.eval_repeats,
            args.fit_max_rows,
            args.gpytorch_eval_max_rows,
            args.gpytorch_fit_max_rows,
        )
        records.append(rec)
        print(json.dumps(rec), flush=True)
    bo = bo_loop(args.bo_iterations) if args.bo else []
    for b in bo:
        print(json.dumps(b), flush=True)
    md = markdown(machine, records, bo)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    md += f"\n\nLoad average (1, 5, 15 min) at the end: {load}."
    print(md)
    info = {
        "machine": info,
        "threads": args.threads,
        "repeats": args.repeats,
        "records": records,
        "bo": bo,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=1, default=str) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
