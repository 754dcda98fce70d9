"""Gradient-enhanced Bayesian optimization against value-only BO.

Minimizes three standard test functions whose gradients are known in closed
form (Branin in 2-D, Hartmann in 6-D, Rosenbrock in 10-D) with BoTorch's
``LogExpectedImprovement`` and ``optimize_acqf`` on a
:class:`gpgrad.interop.botorch.GradientGP`: once trained on values and
gradients, once on values only, from the same initial design, over several
seeds. Every evaluation returns the value and the gradient (as an adjoint
solver would); the value-only run simply ignores the gradient. Two more
methods (``--methods``): ``d-KG``, the gradient-enhanced knowledge gradient
(Wu et al. 2017: BoTorch's ``qKnowledgeGradient`` on fantasies that include
gradients), and ``transforms``, LogEI with gradients in the problem's own
coordinates (Branin on [-5, 10] × [0, 15]) with ``Normalize`` and
``Standardize`` inside the model. Prints the machine, a table of the median
simple regret and wall time, and saves a plot of regret against the number of
evaluations.

Run::

    python examples/bayesopt_gradients.py            # full: a few minutes
    python examples/bayesopt_gradients.py --quick    # smoke test: < 1 minute
    python examples/bayesopt_gradients.py --methods "gradients,d-KG,transforms"
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
import warnings

import numpy as np
import torch

DT = torch.float64


# --------------------------------------------------------------------------
# test functions on the unit cube, with analytic gradients


class Problem:
    """``f(lo + (hi − lo) u)`` for ``u`` in the unit cube, with ``∇_u f``."""

    def __init__(self, name, d, lo, hi, f_min, fun, grad):
        self.name, self.d, self.f_min = name, d, f_min
        self.lo = torch.as_tensor(lo, dtype=DT).expand(d)
        self.hi = torch.as_tensor(hi, dtype=DT).expand(d)
        self._fun, self._grad = fun, grad

    def __call__(self, U):
        """Values (n, 1) and gradients w.r.t. ``U`` (n, d) at ``U`` (n, d)."""
        span = self.hi - self.lo
        X = self.lo + span * U
        return self._fun(X)[:, None], self._grad(X) * span


def branin(X):
    x, y = X[:, 0], X[:, 1]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (y - b * x**2 + c * x - 6) ** 2 + 10 * (1 - t) * torch.cos(x) + 10


def branin_grad(X):
    x, y = X[:, 0], X[:, 1]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    inner = y - b * x**2 + c * x - 6
    gx = 2 * inner * (-2 * b * x + c) - 10 * (1 - t) * torch.sin(x)
    return torch.stack([gx, 2 * inner], dim=-1)


_H_ALPHA = torch.tensor([1.0, 1.2, 3.0, 3.2], dtype=DT)
_H_A = torch.tensor(
    [
        [10, 3, 17, 3.5, 1.7, 8],
        [0.05, 10, 17, 0.1, 8, 14],
        [3, 3.5, 1.7, 10, 17, 8],
        [17, 8, 0.05, 10, 0.1, 14],
    ],
    dtype=DT,
)
_H_P = 1e-4 * torch.tensor(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ],
    dtype=DT,
)


def hartmann6(X):
    e = torch.exp(-((_H_A * (X[:, None, :] - _H_P) ** 2).sum(-1)))  # (n, 4)
    return -(e * _H_ALPHA).sum(-1)


def hartmann6_grad(X):
    diff = X[:, None, :] - _H_P  # (n, 4, 6)
    e = torch.exp(-((_H_A * diff**2).sum(-1)))
    return ((_H_ALPHA * e)[..., None] * 2 * _H_A * diff).sum(1)


def rosenbrock(X):
    return (100 * (X[:, 1:] - X[:, :-1] ** 2) ** 2 + (1 - X[:, :-1]) ** 2).sum(-1)


def rosenbrock_grad(X):
    g = torch.zeros_like(X)
    a = X[:, 1:] - X[:, :-1] ** 2
    g[:, :-1] = -400 * X[:, :-1] * a - 2 * (1 - X[:, :-1])
    g[:, 1:] += 200 * a
    return g


PROBLEMS = {
    "branin": Problem(
        "Branin", 2, [-5.0, 0.0], [10.0, 15.0], 0.397887, branin, branin_grad
    ),
    "hartmann6": Problem("Hartmann", 6, 0.0, 1.0, -3.32237, hartmann6, hartmann6_grad),
    "rosenbrock10": Problem(
        "Rosenbrock", 10, -2.048, 2.048, 0.0, rosenbrock, rosenbrock_grad
    ),
}


# --------------------------------------------------------------------------
# one BO run


#: the compared methods: (acquisition, trained on gradients, search space)
METHODS = {
    "gradients": ("ei", True, "unit"),
    "values only": ("ei", False, "unit"),
    "d-KG": ("kg", True, "unit"),
    "transforms": ("ei", True, "native"),
}


def run_bo(problem, method, n_init, n_iter, seed, settings):
    """Simple regret after each evaluation, and the wall time of the run.

    ``method`` is a key of :data:`METHODS`: LogEI on a model trained on
    values and gradients (``"gradients"``) or on values only; the
    gradient-enhanced knowledge gradient (``"d-KG"``: qKnowledgeGradient on
    fantasies that include gradients, Wu et al. 2017); or LogEI with gradients
    in the problem's own coordinates (``"transforms"``: inputs in
    ``[lo, hi]``, gradients ``∂f/∂x``, ``Normalize`` and ``Standardize``
    inside the model, which carry the gradients over by the chain rule).
    """
    from botorch.acquisition import LogExpectedImprovement, qKnowledgeGradient
    from botorch.acquisition.objective import ScalarizedPosteriorTransform
    from botorch.models.transforms import Normalize, Standardize
    from botorch.optim import optimize_acqf

    from gpgrad.interop.botorch import GradientGP

    acq, use_gradients, space = METHODS[method]
    d = problem.d
    gen = torch.Generator().manual_seed(seed)
    U = torch.rand(n_init, d, generator=gen, dtype=DT)
    Y, G = problem(U)
    span = problem.hi - problem.lo
    if space == "unit":
        bounds = torch.stack([torch.zeros(d, dtype=DT), torch.ones(d, dtype=DT)])
    else:
        bounds = torch.stack([problem.lo, problem.hi])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = None
    for it in range(n_iter):
        if space == "unit":
            X, dY, tf = U, G, {}
        else:  # the problem's coordinates: x = lo + span u, ∂f/∂x = ∂f/∂u / span
            X, dY = problem.lo + span * U, G / span
            tf = {
                "input_transform": Normalize(d, bounds=bounds),
                "outcome_transform": Standardize(m=1),
            }
        dY = dY if use_gradients else None
        kw = dict(fantasize_gradients=acq == "kg", **tf)
        refit = model is None or it % settings["refit_every"] == 0
        if refit:
            model = GradientGP(
                X,
                Y,
                dY,
                noise=settings["noise"],
                fit_kwargs={"maxiter": settings["fit_maxiter"]},
                **kw,
            )
        else:  # the last fitted hyperparameters, on the new data
            gp = model.gp
            model = GradientGP(
                X,
                Y,
                dY,
                kernel=gp.kernel,
                noise=gp.noise,
                mean=gp.mean,
                fit=False,
                **kw,
            )
        if acq == "kg":
            # qKG maximizes the posterior mean; the problems are minimized
            acqf = qKnowledgeGradient(
                model,
                num_fantasies=settings["kg_fantasies"],
                posterior_transform=ScalarizedPosteriorTransform(
                    weights=torch.tensor([-1.0], dtype=DT)
                ),
            )
        else:
            acqf = LogExpectedImprovement(model, best_f=Y.min(), maximize=False)
        cand, _ = optimize_acqf(
            acqf,
            bounds=bounds,
            q=1,
            num_restarts=settings["restarts"],
            raw_samples=settings["raw_samples"],
            options={"maxiter": settings["acq_maxiter"]},
        )
        cand = cand.detach()
        u_new = cand if space == "unit" else (cand - problem.lo) / span
        y_new, g_new = problem(u_new.clamp(0, 1))
        U = torch.cat([U, u_new.clamp(0, 1)])
        Y = torch.cat([Y, y_new])
        G = torch.cat([G, g_new])
    elapsed = time.perf_counter() - t0
    best = torch.cummin(Y[:, 0], dim=0).values
    return (best - problem.f_min).clamp_min(1e-12).numpy(), elapsed


# --------------------------------------------------------------------------
# reporting


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import botorch
    import gpytorch

    import gpgrad

    return (
        f"{cpu}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"gpytorch {gpytorch.__version__}, botorch {botorch.__version__}, "
        f"gpgrad {gpgrad.__version__}"
    )


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6))
    axes = np.atleast_1d(axes)
    for ax, (key, res) in zip(axes, results.items()):
        labels = [m for m in METHODS if m in res]
        for label, color in zip(labels, ("C0", "C1", "C2", "C3")):
            R = np.log10(np.stack(res[label]["regret"]))  # (seeds, evaluations)
            n = np.arange(1, R.shape[1] + 1)
            med = np.median(R, axis=0)
            ax.plot(n, med, color=color, label=f"{label} (median)")
            if R.shape[0] > 1:
                lo, hi = np.percentile(R, [25, 75], axis=0)
                ax.fill_between(n, lo, hi, color=color, alpha=0.2)
        ax.axvline(res["n_init"], color="0.6", lw=0.8, ls=":")
        ax.set_title(f"{PROBLEMS[key].name} ({PROBLEMS[key].d}-D)")
        ax.set_xlabel("evaluations (value + gradient each)")
        ax.set_ylabel("log10 simple regret")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny budgets, one seed (a smoke test, < 1 minute)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--problems",
        default="branin,hartmann6,rosenbrock10",
        help="comma-separated subset of " + ",".join(PROBLEMS),
    )
    parser.add_argument(
        "--methods",
        default="gradients,values only",
        help="comma-separated subset of " + ",".join(METHODS),
    )
    parser.add_argument(
        "--out", default="bayesopt_gradients.png", help="where to save the plot"
    )
    args = parser.parse_args(argv)

    keys = [k.strip() for k in args.problems.split(",") if k.strip()]
    bad = [k for k in keys if k not in PROBLEMS]
    if bad:
        parser.error(f"unknown problem {bad[0]!r}; choose from {list(PROBLEMS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"unknown method {bad[0]!r}; choose from {list(METHODS)}")
    seeds = args.seeds or (1 if args.quick else 3)
    if args.quick:
        budgets = {"branin": (3, 2), "hartmann6": (3, 2), "rosenbrock10": (3, 1)}
        settings = dict(
            refit_every=10,
            fit_maxiter=10,
            restarts=2,
            raw_samples=16,
            acq_maxiter=10,
            kg_fantasies=4,
            noise={"value": 1e-6, "gradient": 1e-6},
        )
    else:
        budgets = {"branin": (4, 12), "hartmann6": (7, 18), "rosenbrock10": (11, 14)}
        settings = dict(
            refit_every=4,
            fit_maxiter=50,
            restarts=2,
            raw_samples=64,
            acq_maxiter=30,
            kg_fantasies=8,
            noise={"value": 1e-6, "gradient": 1e-6},
        )

    # noise-free data: jitter warnings, and BoTorch's notes that an acquisition
    # optimizer restarted from new points, say nothing new here
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    t_start = time.perf_counter()
    print("machine:", machine())
    print(f"mode: {'quick' if args.quick else 'full'}; seeds: {seeds}")
    results = {}
    header = (
        f"{'problem':<12}{'d':>3}{'evals':>7}  {'method':<12}"
        f"{'median regret':>15}{'IQR':>24}{'median time/run':>17}"
    )
    print(header)
    for key in keys:
        prob = PROBLEMS[key]
        n_init, n_iter = budgets[key]
        results[key] = {"n_init": n_init}
        for label in methods:
            regs, times = [], []
            for s in range(seeds):
                r, t = run_bo(prob, label, n_init, n_iter, 1000 + s, settings)
                regs.append(r)
                times.append(t)
            results[key][label] = {"regret": regs, "time": times}
            final = np.array([r[-1] for r in regs])
            q1, q3 = np.percentile(final, [25, 75])
            print(
                f"{prob.name:<12}{prob.d:>3}{n_init + n_iter:>7}  {label:<12}"
                f"{np.median(final):>15.3g}{f'[{q1:.3g}, {q3:.3g}]':>24}"
                f"{np.median(times):>16.1f}s",
                flush=True,
            )
    plot(results, args.out)
    total = time.perf_counter() - t_start
    print(
        f"total wall time: {total:.0f} s (process CPU time {time.process_time():.0f} s)"
    )
    print(f"plot: {args.out} (median over seeds, band: 25th-75th percentile)")
    return results


if __name__ == "__main__":
    main()
