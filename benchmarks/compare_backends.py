#!/usr/bin/env python
"""Compare gpgrad's backends, and GPyTorch's derivative GPs, on the same problems.

Each problem is a GP with fixed hyperparameters (no fitting) conditioned on
``N`` points in ``D`` dimensions, observing values only (``v``) or values and
full gradients (``vg``), under an RBF or Matérn 5/2 kernel; it predicts the
posterior mean and variance at ``M`` test points of the value (``v``) or of the
value and the gradient (``vg``), and, for small systems, of the Hessian at a
few of those points (gpgrad only; timed separately). The system has
``N`` (``v``) or ``N·(D+1)`` (``vg``) rows.

Every cell (problem × backend) runs in a process of its own: one warm-up run,
then repeats, of which the median wall time is reported, with the process's
peak resident memory (interpreter included; ``torch.cuda.max_memory_allocated``
on a GPU) and the largest absolute difference of the posterior mean and
variance from the numpy float64 backend. A cell past its time or memory budget
is killed and recorded as ``timeout`` / ``over memory``.

Output: a markdown table on stdout, ``--json PATH`` (machine and one record per
cell) and ``--plot PATH`` (time against system size, log-log, per backend).

    python benchmarks/compare_backends.py                       # full grid
    python benchmarks/compare_backends.py --quick               # < 1 minute
    python benchmarks/compare_backends.py --n 100 1000 --d 10 --mix vg \\
        --kernel rbf --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(1, str(_HERE.parent))

import _machine as M  # noqa: E402

KERNELS = ("rbf", "matern52")
MIXES = ("v", "vg")
NOISE = 1e-4
VARIANCE = 1.0


# --------------------------------------------------------------------------
# problems


def lengthscale_for(d: int) -> float:
    """The fixed lengthscale of a problem in ``d`` dimensions.

    Points are uniform in the unit cube, whose typical pairwise distance grows
    like √d; ``0.5·√d`` keeps the number of correlated neighbours comparable
    across dimensions.
    """
    return 0.5 * math.sqrt(d)


def make_problem(kernel, mix, n, d, m, *, seed=0, hessian_points=0):
    """A JSON-serializable problem description (the data come from the seed)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
    return {
        "kernel": kernel,
        "mix": mix,
        "N": int(n),
        "D": int(d),
        "M": int(m),
        "rows": int(n) * (int(d) + 1 if mix == "vg" else 1),
        "seed": int(seed),
        "lengthscale": lengthscale_for(d),
        "variance": VARIANCE,
        "noise": NOISE,
        "hessian_points": int(hessian_points),
    }


def problem_data(p):
    """Inputs ``X`` (N, D), values ``y`` (N,), gradients ``G`` (N, D) and
    test points ``Xs`` (M, D) of problem ``p``.

    .. math:: f(x) = \\sum_i \\sin(3 x_i) + \\tfrac{1}{2D} (\\textstyle\\sum_i x_i)^2
    """
    rng = np.random.default_rng(p["seed"])
    n, d, m = p["N"], p["D"], p["M"]
    X = rng.uniform(0.0, 1.0, (n, d))
    Xs = rng.uniform(0.0, 1.0, (m, d))
    t = X.sum(axis=1)
    y = np.sin(3.0 * X).sum(axis=1) + 0.5 * t * t / d
    G = 3.0 * np.cos(3.0 * X) + (t / d)[:, None]
    return X, y, G, Xs


def problem_label(p):
    return f"{p['kernel']} {p['mix']} N={p['N']} D={p['D']}"


# --------------------------------------------------------------------------
# backends


def backends_available(cuda=None, methods=None):
    """The backends (dicts) to run, detected at run time.

    The matrix-free methods are those of ``gpgrad.solvers.select.METHODS``
    other than ``"auto"`` and ``"cholesky"``.
    """
    if methods is None:
        methods = _matfree_methods()
    if cuda is None:
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
    out = [
        {"name": "gpgrad numpy f64", "lib": "gpgrad", "backend": "numpy"},
        {"name": "gpgrad torch f64", "lib": "gpgrad", "backend": "torch"},
        {
            "name": "gpgrad torch f32",
            "lib": "gpgrad",
            "backend": "torch",
            "dtype": "float32",
        },
    ]
    devices = ["cpu"] + (["cuda"] if cuda else [])
    if cuda:
        out += [
            {
                "name": "gpgrad torch f64 cuda",
                "lib": "gpgrad",
                "backend": "torch",
                "device": "cuda",
            },
            {
                "name": "gpgrad torch f32 cuda",
                "lib": "gpgrad",
                "backend": "torch",
                "dtype": "float32",
                "device": "cuda",
            },
        ]
    for meth in methods:
        for dev in devices:
            sfx = " cuda" if dev == "cuda" else ""
            out.append(
                {
                    "name": f"gpgrad torch f64 {meth}{sfx}",
                    "lib": "gpgrad",
                    "backend": "torch",
                    "device": dev,
                    "method": meth,
                }
            )
    for dev in devices:
        sfx = " cuda" if dev == "cuda" else ""
        out += [
            {"name": f"gpytorch default{sfx}", "lib": "gpytorch", "mode": "default"},
            {"name": f"gpytorch cholesky{sfx}", "lib": "gpytorch", "mode": "cholesky"},
        ]
        if dev == "cuda":
            out[-1]["device"] = out[-2]["device"] = "cuda"
    for b in out:
        b.setdefault("backend", "torch")
        b.setdefault("dtype", "float64")
        b.setdefault("device", "cpu")
        b.setdefault("method", "auto")
    return out


REFERENCE = "gpgrad numpy f64"


# --------------------------------------------------------------------------
# the worker: one cell in its own process


def _status_error(exc, backend=None):
    """``n/a`` where a specialised solver declines the problem (it raises
    ValueError or NotImplementedError naming why), else ``error``."""
    special = backend is not None and backend.get("method") not in (
        "auto",
        "cholesky",
    )
    if isinstance(exc, NotImplementedError) or (
        special and isinstance(exc, ValueError)
    ):
        status = "n/a"
    else:
        status = "error"
    return {"status": status, "message": f"{type(exc).__name__}: {exc}"[:500]}


def run_cell(spec):
    """Run one cell: warm-up, timed repeats, predictions saved for the errors.

    ``spec`` holds ``problem``, ``backend`` (dicts as above), ``warmup``,
    ``repeats``, ``repeat_time`` (stop repeating once the timed runs add up to
    this many seconds; at least one) and ``pred_path`` (an ``.npz`` file for
    the predictions, float64). Returns a JSON-ready dict.
    """
    try:
        return _run_cell(spec)
    except Exception as exc:  # noqa: BLE001 - recorded in the cell, not fatal
        out = _status_error(exc, spec.get("backend"))
        out["traceback"] = traceback.format_exc()[-1500:]
        out["peak_rss_mb"] = M.peak_rss_mb()
        return out


def _sync(dev):
    if dev == "cuda":
        import torch

        torch.cuda.synchronize()


def _run_cell(spec):
    p, b = spec["problem"], spec["backend"]
    X, y, G, Xs = problem_data(p)
    meta = {}
    if b["lib"] == "gpgrad":
        run, run_hessian = _gpgrad_runner(p, b, X, y, G, Xs, meta)
    else:
        run, run_hessian = _gpytorch_runner(p, b, X, y, G, Xs), None
    dev = b.get("device", "cpu")
    if dev == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    rss_base = M.current_rss_mb()
    caught = []
    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always")
        for _ in range(int(spec.get("warmup", 1))):
            run()
            _sync(dev)
        times, cpu, pred = [], [], None
        for _ in range(max(1, int(spec.get("repeats", 3)))):
            pred = None
            c0, t0 = time.process_time(), time.perf_counter()
            pred = run()
            _sync(dev)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if sum(times) >= float(spec.get("repeat_time", 60.0)):
                break
        hess = {}
        if run_hessian is not None and p.get("hessian_points", 0) > 0:
            try:
                t0 = time.perf_counter()
                hpred = run_hessian()
                _sync(dev)
                hess["hess_s"] = time.perf_counter() - t0
                pred.update(hpred)
            except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                hess["hess_status"] = _status_error(exc)["message"]
        caught = sorted({f"{w.category.__name__}: {w.message}"[:200] for w in wlist})
    out = {
        "status": "ok",
        "time_s": M.median(times),
        "times_s": times,
        # CPU seconds of all this process's threads: on a busy machine a
        # steadier figure than wall time (on an idle one, about threads × wall)
        "cpu_s": M.median(cpu),
        "repeats": len(times),
        "rss_base_mb": rss_base,
        "peak_rss_mb": M.peak_rss_mb(),
        "warnings": caught,
        **hess,
    }
    if dev == "cuda":
        import torch

        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out.update(meta)
    if spec.get("pred_path"):
        np.savez(spec["pred_path"], **pred)
    return out


def _to_numpy(a):
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _gpgrad_runner(p, b, X, y, G, Xs, meta):
    import gpgrad
    from gpgrad import kernels

    kcls = {"rbf": kernels.RBF, "matern52": kernels.Matern52}[p["kernel"]]
    kern = kcls(lengthscale=p["lengthscale"], variance=p["variance"])
    if b["backend"] == "torch":
        import torch

        dtype = {"float64": torch.float64, "float32": torch.float32}[b["dtype"]]
        dev = torch.device(b.get("device", "cpu"))

        def conv(a):
            return torch.as_tensor(a, dtype=dtype, device=dev)

        gp = gpgrad.GP(
            kern, noise=p["noise"], backend="torch", device=dev, dtype=dtype,
            method=b.get("method", "auto"),
        )  # fmt: skip
    else:
        dtype = np.dtype(b["dtype"])

        def conv(a):
            return np.asarray(a, dtype=dtype)

        gp = gpgrad.GP(
            kern, noise=p["noise"], dtype=dtype, method=b.get("method", "auto")
        )
    X, y, G, Xs = conv(X), conv(y), conv(G), conv(Xs)
    obs = [gpgrad.values(X, y)]
    if p["mix"] == "vg":
        obs.append(gpgrad.gradients(X, G))
    state = {}

    def run():
        # drop the previous run's posterior first: holding it while the next
        # one is built would count two factors in the peak memory
        state.clear()
        post = gp.condition(*obs)
        state["post"] = post
        meta["solver"] = post.method
        v = post.value(Xs)
        out = {"value_mean": v.mean, "value_var": v.var}
        if p["mix"] == "vg":
            g = post.gradient(Xs)
            out.update(grad_mean=g.mean, grad_var=g.var)
        return {k: _to_numpy(a) for k, a in out.items()}

    def run_hessian():
        h = state["post"].hessian(Xs[: p["hessian_points"]])
        return {"hess_mean": _to_numpy(h.mean), "hess_var": _to_numpy(h.var)}

    return run, run_hessian


def _gpytorch_runner(p, b, X, y, G, Xs):
    import contextlib

    import gpytorch
    import torch

    dtype = {"float64": torch.float64, "float32": torch.float32}[b["dtype"]]
    dev = torch.device(b.get("device", "cpu"))
    d = p["D"]
    vg = p["mix"] == "vg"
    tX = torch.as_tensor(X, dtype=dtype, device=dev)
    tXs = torch.as_tensor(Xs, dtype=dtype, device=dev)
    if vg:
        tY = torch.as_tensor(np.column_stack([y, G]), dtype=dtype, device=dev)
    else:
        tY = torch.as_tensor(y, dtype=dtype, device=dev)
    tiny = gpytorch.constraints.GreaterThan(1e-12)

    class Model(gpytorch.models.ExactGP):
        def __init__(self, likelihood):
            super().__init__(tX, tY, likelihood)
            if vg:
                # zero constant mean: gpgrad's GP(mean=0.0)
                self.mean_module = gpytorch.means.ConstantMeanGrad()
                base = {
                    "rbf": gpytorch.kernels.RBFKernelGrad,
                    "matern52": gpytorch.kernels.Matern52KernelGrad,
                }[p["kernel"]]()
            else:
                self.mean_module = gpytorch.means.ZeroMean()
                base = (
                    gpytorch.kernels.RBFKernel()
                    if p["kernel"] == "rbf"
                    else gpytorch.kernels.MaternKernel(nu=2.5)
                )
            # GPyTorch's RBF is exp(-|x-x'|²/(2ℓ²)) and its Matérn 5/2 uses
            # r = |x-x'|/ℓ with (1 + √5 r + 5r²/3) e^{-√5 r}: the same
            # lengthscale as gpgrad's (s = r²/2, ρ = √(10 s) = √5 r)
            self.covar_module = gpytorch.kernels.ScaleKernel(base)

        def forward(self, x):
            mean, cov = self.mean_module(x), self.covar_module(x)
            if vg:
                return gpytorch.distributions.MultitaskMultivariateNormal(mean, cov)
            return gpytorch.distributions.MultivariateNormal(mean, cov)

    def build():
        if vg:
            lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(
                num_tasks=d + 1, has_task_noise=False, noise_constraint=tiny
            )
        else:
            lik = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=tiny)
        model = Model(lik).to(device=dev, dtype=dtype)

        # as tensors of the model's dtype: GPyTorch turns a Python float into
        # a float32 tensor first, which would change them by ~1e-8 relative
        def hyper(v):
            return torch.tensor(v, dtype=dtype, device=dev)

        lik.noise = hyper(p["noise"])
        model.covar_module.base_kernel.lengthscale = hyper(p["lengthscale"])
        model.covar_module.outputscale = hyper(p["variance"])
        model.eval()
        lik.eval()
        return model

    def settings():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if b["mode"] == "cholesky":
            stack.enter_context(gpytorch.settings.max_cholesky_size(10**9))
            stack.enter_context(
                gpytorch.settings.fast_computations(
                    covar_root_decomposition=False, log_prob=False, solves=False
                )
            )
        return stack

    def run():
        # a fresh model each run: GPyTorch caches the solve on the model
        with settings():
            model = build()
            out = model(tXs)
            mean, var = out.mean, out.variance
        if vg:
            return {
                "value_mean": _to_numpy(mean[:, 0]),
                "value_var": _to_numpy(var[:, 0]),
                "grad_mean": _to_numpy(mean[:, 1:]),
                "grad_var": _to_numpy(var[:, 1:]),
            }
        return {"value_mean": _to_numpy(mean), "value_var": _to_numpy(var)}

    return run


# --------------------------------------------------------------------------
# errors against the reference


def max_abs_errors(pred, ref):
    """Largest |difference| of means and of variances, over value and gradient
    (``err_mean``, ``err_var``) and over the Hessian (``err_hess_mean``,
    ``err_hess_var``), for the quantities both predicted."""
    out = {}
    groups = {
        "err_mean": ("value_mean", "grad_mean"),
        "err_var": ("value_var", "grad_var"),
        "err_hess_mean": ("hess_mean",),
        "err_hess_var": ("hess_var",),
    }
    for name, keys in groups.items():
        errs = [
            float(np.max(np.abs(pred[k] - ref[k])))
            for k in keys
            if k in pred and k in ref
        ]
        if errs:
            out[name] = max(errs)
    return out


# --------------------------------------------------------------------------
# the driver


def preload_for(backends):
    mods = ["numpy", "scipy.linalg", "gpgrad"]
    if any(b["lib"] == "gpytorch" or b["backend"] == "torch" for b in backends):
        mods.insert(1, "torch")
    if any(b["lib"] == "gpytorch" for b in backends):
        mods.append("gpytorch")
    return mods


def run_grid(problems, backends, args, log=None):
    """Run every cell; returns the list of records (one per cell)."""
    log = log or (lambda s: None)
    records = []
    tmp = tempfile.mkdtemp(prefix="gpgrad_bench_pred_")
    names = [b["name"] for b in backends]
    if REFERENCE in names:  # the reference first, for the errors
        backends = [backends[names.index(REFERENCE)]] + [
            b for b in backends if b["name"] != REFERENCE
        ]
    preload = preload_for(backends)
    for ip, p in enumerate(problems):
        ref = None
        for ib, b in enumerate(backends):
            pred_path = os.path.join(tmp, f"p{ip}_b{ib}.npz")
            spec = {
                "problem": p,
                "backend": b,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "repeat_time": args.repeat_time,
                "pred_path": pred_path,
            }
            res = M.run_isolated(
                __file__,
                "run_cell",
                spec,
                time_budget=args.time_budget,
                mem_budget_mb=args.mem_budget,
                isolate=args.isolate,
                preload=preload,
            )
            rec = {"problem": problem_label(p), **p, "backend": b["name"], **res}
            rec["config"] = b
            if res.get("status") == "ok" and os.path.exists(pred_path):
                with np.load(pred_path) as z:
                    pred = {k: z[k] for k in z.files}
                if b["name"] == REFERENCE:
                    ref = pred
                if ref is not None:
                    rec.update(max_abs_errors(pred, ref))
                os.unlink(pred_path)
            records.append(rec)
            log(
                f"{problem_label(p):>28s} | {b['name']:<26s} | {rec['status']:<11s} "
                f"| {_fmt_time(rec.get('time_s'))} s"
            )
    try:
        os.rmdir(tmp)
    except OSError:
        pass
    return records


def _fmt_time(t):
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "—"
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def _fmt_err(e):
    return "—" if e is None else f"{e:.1e}"


def _fmt_mem(rec):
    if rec.get("cuda_peak_mb") is not None:
        return f"{rec['cuda_peak_mb']:.0f} (GPU)"
    v = rec.get("peak_rss_mb")
    return "—" if v is None else f"{v:.0f}"


def markdown_table(records):
    """The records as a markdown table (one row per cell), followed by the
    reasons of the cells that did not run."""
    head = (
        "| problem | rows | backend | status | time [s] | CPU [s] | repeats | "
        "peak memory [MiB] | err mean | err var | Hessian [s] | "
        "err Hessian mean |\n"
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines, notes = [], {}
    for r in records:
        status = r["status"]
        if r.get("warnings") and any("Jitter" in w for w in r["warnings"]):
            status += " (jitter)"
        hess = "n/a" if r.get("hess_status") else _fmt_time(r.get("hess_s"))
        lines.append(
            f"| {r['problem']} | {r['rows']} | {r['backend']} | {status} | "
            f"{_fmt_time(r.get('time_s'))} | {_fmt_time(r.get('cpu_s'))} | "
            f"{r.get('repeats', '—')} | {_fmt_mem(r)} | "
            f"{_fmt_err(r.get('err_mean'))} | {_fmt_err(r.get('err_var'))} | "
            f"{hess} | {_fmt_err(r.get('err_hess_mean'))} |"
        )
        if r["status"] != "ok" and r.get("message"):
            notes.setdefault((r["backend"], r["message"]), None)
        if r.get("hess_status"):
            notes.setdefault((r["backend"], f"Hessian: {r['hess_status']}"), None)
    text = head + "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {b}: {why}" for b, why in notes) + "\n"
    return text


def summary_table(records):
    """A pivot of the records: one row per problem, one column per backend,
    each cell ``time [s] / peak memory [MiB]`` or the status."""
    names = list(dict.fromkeys(r["backend"] for r in records))
    problems = list(dict.fromkeys((r["problem"], r["rows"]) for r in records))
    cell = {(r["problem"], r["backend"]): r for r in records}
    head = "| problem | rows | " + " | ".join(names) + " |\n"
    head += "|---|---:|" + "---:|" * len(names) + "\n"
    lines = []
    for prob, rows in problems:
        row = [prob, str(rows)]
        for name in names:
            r = cell.get((prob, name))
            if r is None:
                row.append("")
            elif r["status"] == "ok":
                row.append(f"{_fmt_time(r['time_s'])} / {_fmt_mem(r)}")
            else:
                row.append(r["status"])
        lines.append("| " + " | ".join(row) + " |")
    return head + "\n".join(lines) + "\n"


def plot(records, path, title=""):
    """Log-log plot of median time against system rows, one line per backend,
    one panel per kernel and observation mix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["kernel"], r["mix"]) for r in records})
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False
    )
    names = list(dict.fromkeys(r["backend"] for r in records))
    # one colour and marker per backend across all panels (a panel may lack
    # a backend whose cells all failed)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {
        name: (cycle[i % len(cycle)], "osD^v<>"[i // len(cycle) % 7])
        for i, name in enumerate(names)
    }
    handles = {}
    for ax, (kern, mix) in zip(axes[0], panels):
        for name in names:
            pts = sorted(
                (r["rows"], r["time_s"])
                for r in records
                if r["backend"] == name
                and r["kernel"] == kern
                and r["mix"] == mix
                and r["status"] == "ok"
            )
            if pts:
                color, marker = style[name]
                (handles[name],) = ax.plot(
                    *zip(*pts), color=color, marker=marker, label=name
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("system rows  N (v)  or  N(D+1) (vg)")
        ax.set_ylabel("median wall time [s]")
        ax.set_title(f"{kern}, {'values' if mix == 'v' else 'values + gradients'}")
        ax.grid(True, which="both", alpha=0.3)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="lower center",
            ncol=min(4, len(handles)),
            fontsize=8,
        )
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--n", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--d", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--m", type=int, default=100, help="test points")
    ap.add_argument("--mix", nargs="+", default=list(MIXES), choices=MIXES)
    ap.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=KERNELS)
    ap.add_argument(
        "--hessian-rows",
        type=int,
        default=1500,
        help="predict Hessians where the system has at most this many rows",
    )
    ap.add_argument("--hessian-points", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--repeat-time",
        type=float,
        default=60.0,
        help="stop repeating a cell once its timed runs add up to this (s)",
    )
    ap.add_argument("--time-budget", type=float, default=600.0, help="s per cell")
    ap.add_argument("--mem-budget", type=float, default=8192.0, help="MiB per cell")
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run only backends whose name contains one of these strings "
        "(the numpy reference always runs)",
    )
    ap.add_argument("--isolate", choices=("process", "fork"), default=None)
    ap.add_argument("--quick", action="store_true", help="tiny grid, < 1 minute")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.d, args.m = [12], [2], 5
        args.hessian_points = 3
        args.warmup, args.repeats = 1, 2
        args.isolate = args.isolate or "fork"
        args.time_budget = min(args.time_budget, 60.0)
    args.isolate = args.isolate or "process"
    for name in ("n", "d"):
        if any(v < 1 for v in getattr(args, name)):
            ap.error(f"--{name} values must be positive integers")
    if args.m < 1 or args.repeats < 1 or args.warmup < 0:
        ap.error("--m and --repeats must be >= 1 and --warmup >= 0")
    return args


def probe_torch(spec):
    """Worker: torch's threads and GPU, read where the cells run."""
    return M.torch_info()


def select_backends(args):
    """The machine's torch details and the backends to run (``--only``)."""

    def keep(b):
        return (
            not args.only
            or b["name"] == REFERENCE
            or any(s in b["name"] for s in args.only)
        )

    # torch is probed when any kept backend, CUDA ones included, needs it
    needs_torch = any(
        keep(b) and b["backend"] == "torch" for b in backends_available(cuda=True)
    )
    details = {}
    if needs_torch:
        details = M.run_isolated(
            __file__,
            "probe_torch",
            {},
            isolate=args.isolate,
            preload=preload_for(backends_available(cuda=False)),
            time_budget=max(60.0, args.time_budget),
        )
        details = {k: details.get(k) for k in ("torch_threads", "cuda", "gpu")}
    backends = backends_available(cuda=bool(details.get("cuda")))
    return details, [b for b in backends if keep(b)]


def _matfree_methods():
    from gpgrad.solvers.select import METHODS

    return [m for m in METHODS if m not in ("auto", "cholesky")]


def main(argv=None):
    args = parse_args(argv)
    details, backends = select_backends(args)
    info = M.machine_info(details)
    problems = []
    for kern in args.kernel:
        for mix in args.mix:
            for d in args.d:
                for n in args.n:
                    rows = n * (d + 1 if mix == "vg" else 1)
                    hp = args.hessian_points if rows <= args.hessian_rows else 0
                    problems.append(
                        make_problem(
                            kern,
                            mix,
                            n,
                            d,
                            args.m,
                            seed=args.seed,
                            hessian_points=min(hp, args.m),
                        )
                    )
    t0 = time.perf_counter()
    records = run_grid(
        problems, backends, args, log=lambda s: print(s, file=sys.stderr, flush=True)
    )
    elapsed = time.perf_counter() - t0
    cmd = "python benchmarks/compare_backends.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(f"Machine: {M.machine_line(info)}")
    print(f"Command: `{cmd.strip()}` ({elapsed:.0f} s, isolation: {args.isolate})")
    print()
    print(markdown_table(records))
    print("Summary: median time [s] / peak memory [MiB] per cell")
    print()
    print(summary_table(records))
    if args.json:
        doc = {
            "command": cmd.strip(),
            "machine": info,
            "settings": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            },
            "reference": REFERENCE,
            "elapsed_s": elapsed,
            "records": records,
        }
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    if args.plot:
        plot(records, args.plot, title=M.machine_line(info))
    return records


if __name__ == "__main__":
    if "--worker" in sys.argv:
        M.worker_main(globals())
    else:
        main()
