"""Scaling benchmark: dense Cholesky, matrix-free CG and Woodbury.

Run from the repository root::

    python benchmarks/scaling.py                 # everything (several minutes)
    python benchmarks/scaling.py --only large    # one part (see below)
    python benchmarks/scaling.py --quick         # small sizes, a smoke run
    python benchmarks/scaling.py --only large --device cuda   # on a GPU

Parts:

``large``
    N = 2,000 points in D = 50 (102,000 rows), values and gradients observed,
    RBF and Matérn 5/2: conditioning with CG plus the posterior gradient mean
    at 100 test points; wall time and peak resident memory (of a fresh
    process per run).
``agree``
    N = 300, D = 20: CG against dense Cholesky, relative error of the
    posterior gradient mean (max |Δ| / max |mean|).
``wide``
    N = 50, D = 1,000, gradients observed (Woodbury): conditioning plus the
    posterior gradient mean and variance at one test point.
``huge``
    N = 5,000 and 10,000 points in D = 100 (505,000 and 1,010,000 rows),
    Matérn 5/2, the plain API (``--huge-n`` picks the sizes); only on request.
``product``
    One matrix-free product at N = 2,000, D = 50: the merged value+gradient
    GEMM against the separate products, interleaved, wall and CPU medians.
``growth``
    Time and peak memory against N (D = 10, values and gradients) and against
    D (N = 20, gradients only), for each method where it applies (Matérn 5/2
    unless ``--growth-kernel rbf``); saved as a plot.

Every timed run happens in its own subprocess so that its peak resident memory
(``ru_maxrss``) is its own, after a warm-up on a 3-point problem of the same
kind (lazy imports, first BLAS/LAPACK calls). Times are medians over
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------
# one run, in a child process


def _child(spec):
    """Run one configuration; print a JSON line with seconds and peak RSS.

    ``method="default"`` is the plain API: ``GP(kernel, noise=...)`` with no
    method, so the automatic choice (and its defaults) decide.
    """
    import resource
    import warnings

    import numpy as np

    sys.path.insert(0, ROOT)
    import gpgrad
    from gpgrad import kernels
    from gpgrad.solvers.iterative import CG

    rng = np.random.default_rng(spec["seed"])
    N, D, M = spec["N"], spec["D"], spec["M"]
    X = rng.uniform(0, 1, (N, D))
    Xs = rng.uniform(0, 1, (M, D))
    ls = spec["ls_factor"] * np.sqrt(D)
    kern = {"rbf": kernels.RBF, "matern52": kernels.Matern52}[spec["kernel"]]
    kernel = kern(lengthscale=ls)

    def f(X):
        return np.sin(X).sum(-1) / np.sqrt(X.shape[-1])

    def g(X):
        return np.cos(X) / np.sqrt(X.shape[-1])

    obs = [gpgrad.gradients(X, g(X))]
    if spec["values"]:
        obs.insert(0, gpgrad.values(X, f(X)))
    method = spec["method"]
    kw = {}
    if method == "cg":
        method = CG(
            tol=spec["tol"],
            preconditioner=spec["precond"],
            variance=spec.get("variance", "exact"),
        )
    if method == "default" and spec.get("max_iter"):
        # a probe: the default options with an iteration cap, for the cost
        # of setup and of one iteration where the full solve would not fit
        method = CG(max_iter=spec["max_iter"])
    if method == "cg-no-elimination":
        # the default options but plain CG on the whole system
        method = CG(eliminate_values=False)
    if method != "default":
        kw["method"] = method
    if spec.get("backend"):
        kw["backend"] = spec["backend"]
    device = spec.get("device") or "cpu"
    cuda = device.startswith("cuda")
    if device != "cpu" or spec.get("dtype"):
        import torch

        kw["backend"] = "torch"
        kw["device"] = device
        kw["dtype"] = getattr(torch, spec.get("dtype") or "float64")

    def sync():
        # CUDA runs asynchronously: a timer reads the clock after the work
        if cuda:
            torch.cuda.synchronize()

    def host(a):
        return gpgrad.backend.to_numpy(a) if gpgrad.backend.is_tensor(a) else a

    gp = gpgrad.GP(kernel, noise=spec["noise"], **kw)
    # warm-up on a tiny problem of the same kind: lazy imports and the BLAS
    # and LAPACK first-call costs are not part of the figure
    Xw = X[:3, :]
    warm = [gpgrad.gradients(Xw, g(Xw))]
    if spec["values"]:
        warm.insert(0, gpgrad.values(Xw, f(Xw)))
    _ = gp.condition(*warm).gradient(Xs[:1]).std
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # process CPU time beside wall time: on the shared machine it is the
        # figure other processes' load inflates least
        c0, t0 = time.process_time(), time.perf_counter()
        post = gp.condition(*obs)
        sync()
        t1 = time.perf_counter()
        pred = post.gradient(Xs)
        mean = np.asarray(host(pred.mean))
        c2, t2 = time.process_time(), time.perf_counter()
        out = {
            "method": post.method,
            "condition_s": t1 - t0,
            "query_s": t2 - t1,
            "cpu_s": c2 - c0,
        }
        solver = post._solver
        stats = dict(getattr(solver, "stats", {}) or {})
        if stats:
            out["iterations"] = stats["iterations"]
            out["eliminated_values"] = solver.info.get("eliminated_values", 0)
            # mixed precision: float32 iterations inside float64 refinements
            out["float32_iterations"] = solver.info.get("float32_iterations")
            out["refinements"] = solver.info.get("refinements")
            out["solves_for_mean"] = stats["solves"]
            out["preconditioner"] = str(solver.preconditioner)
            # the relative residual of the weights, recomputed independently
            op = solver.op
            r = post._r[..., None]
            res = r - op.matmul(post._alpha[..., None])
            out["relative_residual"] = float(
                np.linalg.norm(np.asarray(host(res)))
                / np.linalg.norm(np.asarray(host(r)))
            )
            # one more product, timed alone: the per-iteration cost
            sync()
            c4, t4 = time.process_time(), time.perf_counter()
            op.matmul(post._alpha[..., None])
            sync()
            out["product_s"] = time.perf_counter() - t4
            out["product_cpu_s"] = time.process_time() - c4
            out["preconditioner_s"] = stats.get("preconditioner_s")
            # iterations the same run needed to reach looser tolerances (the
            # history of a refined solve has one entry per refinement)
            hist = solver.info.get("history") or []
            if solver.info.get("refinements"):
                hist = []
            out["iterations_to"] = {
                f"{t:.0e}": next((i for i, h in enumerate(hist) if h <= t), None)
                for t in (1e-4, 1e-6, 1e-8)
            }
        if spec["query"] in ("meanstd", "meanvar"):
            c3, t3 = time.process_time(), time.perf_counter()
            std = np.asarray(host(pred.std))
            out["std_s"] = time.perf_counter() - t3
            out["std_cpu_s"] = time.process_time() - c3
            out["std"] = std.reshape(-1).tolist() if spec.get("keep") else None
    out["warnings"] = sorted({type(w.message).__name__ for w in caught})
    out["total_s"] = out["condition_s"] + out["query_s"]
    out["mean"] = mean.reshape(-1).tolist() if spec.get("keep") else None
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if cuda:
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    out["device"], out["dtype"] = device, spec.get("dtype") or "float64"
    print(json.dumps(out))


def run(spec, repeats):
    """Median time over ``repeats`` fresh processes; the largest peak RSS."""
    results = []
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            msg = proc.stderr.strip().splitlines()[-1:] or ["failed"]
            return {"error": msg[0]}
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = dict(results[0])
    for key in ("condition_s", "query_s", "total_s", "std_s", "cpu_s"):
        if key in out:
            out[key] = statistics.median(r[key] for r in results)
    out["peak_rss_gb"] = max(r["peak_rss_gb"] for r in results)
    out["repeats"] = repeats
    return out


def spec(**kw):
    base = dict(
        N=100,
        D=10,
        M=100,
        kernel="rbf",
        values=True,
        method="default",
        tol=1e-8,
        precond="auto",
        noise=1e-4,
        ls_factor=0.5,
        seed=0,
        query="mean",
    )
    base.update(kw)
    return base


# --------------------------------------------------------------------------
# the machine


def machine():
    import numpy as np
    from _machine import cpu_model

    cpu = cpu_model()
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for name in ("scipy", "torch"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        info[var] = os.environ.get(var, "unset")
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------
# parts


def _device_spec(args):
    """The device and dtype entries of a spec (none for the CPU defaults)."""
    out = {}
    if args.device != "cpu":
        out["device"] = args.device
    if args.dtype != "float64":
        out["dtype"] = args.dtype
    return out


def _device_tag(args):
    tag = f" {args.device}" if args.device != "cpu" else ""
    return tag + (f" {args.dtype}" if args.dtype != "float64" else "")


def part_large(args):
    """N = 2,000, D = 50: the plain API, numpy (default) and torch backends."""
    rows = []
    for backend in args.backends.split(","):
        for kernel in args.kernels.split(","):
            for method in args.large_methods.split(","):
                s = spec(
                    N=args.large_n,
                    D=50,
                    M=100,
                    kernel=kernel,
                    backend=backend,
                    method=method,
                    **_device_spec(args),
                )
                r = run(s, args.repeats_large)
                rows.append({"kernel": kernel, **s, **r})
                name = (
                    f"large {backend}{_device_tag(args)} {kernel} N={s['N']} D=50 "
                    f"{method}"
                )
                print(_fmt_row(name, r), flush=True)
    return rows


def part_product(args):
    """One matrix-free product at N = 2,000, D = 50 (values and gradients,
    RBF), the merged value+gradient GEMM against the separate products,
    interleaved in one process; medians of wall and CPU time."""
    import numpy as np

    sys.path.insert(0, ROOT)
    import gpgrad
    from gpgrad import kernels
    from gpgrad.covariance import as_blocks
    from gpgrad.solvers import matfree

    N, D = args.large_n, 50
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (N, D))
    obs = [gpgrad.values(X), gpgrad.gradients(X)]
    blocks = as_blocks(obs, np, np.float64, None)
    kern = kernels.RBF(lengthscale=0.5 * np.sqrt(D))
    op = matfree.GramOperator(kern, blocks, np.full(N * (D + 1), 1e-4))
    V = rng.normal(size=(op.N, 1))
    times = {True: [], False: []}
    for merged in (True, False):  # warm-up: profiles and the cached matrix
        matfree.MERGE_VALUE_GRADIENT = merged
        op.matmul(V)
    for _ in range(args.repeats * 2 + 1):
        for merged in (True, False):
            matfree.MERGE_VALUE_GRADIENT = merged
            c0, t0 = time.process_time(), time.perf_counter()
            op.matmul(V)
            times[merged].append((time.perf_counter() - t0, time.process_time() - c0))
    matfree.MERGE_VALUE_GRADIENT = True
    rows = []
    for merged, ts in times.items():
        row = {
            "N": N,
            "D": D,
            "merged": merged,
            "wall_s": statistics.median(t[0] for t in ts),
            "cpu_s": statistics.median(t[1] for t in ts),
            "runs": len(ts),
        }
        rows.append(row)
        print(
            f"product N={N} D={D} {'merged' if merged else 'separate'}: "
            f"{row['wall_s']:.3f} s wall, {row['cpu_s']:.3f} s CPU "
            f"(median of {len(ts)})",
            flush=True,
        )
    return rows


def part_huge(args):
    """N = 5,000 and 10,000 in D = 100, Matérn 5/2, the plain API."""
    rows = []
    for N in [int(n) for n in args.huge_n.split(",")]:
        s = spec(
            N=N,
            D=100,
            M=100,
            kernel="matern52",
            max_iter=args.max_iter,
            **_device_spec(args),
        )
        r = run(s, 1)
        rows.append({**s, **r})
        print(_fmt_row(f"huge{_device_tag(args)} matern52 N={N} D=100", r), flush=True)
    return rows


def part_agree(args):
    """N = 300, D = 20: the plain API's CG path (``method="cg"``, defaults)
    and the opt-in Lanczos variances against dense Cholesky."""
    import numpy as np

    rows = []
    for kernel in ("rbf", "matern52"):
        base = dict(
            N=300 if not args.quick else 60,
            D=20,
            M=20,
            kernel=kernel,
            query="meanstd",
            keep=True,
        )
        dense = run(spec(method="cholesky", **base), 1)
        for label, extra in (
            ("cg", dict(method="cg")),
            ("cg-lanczos", dict(method="cg", variance="lanczos")),
        ):
            cg = run(spec(**extra, **base), 1)
            if "error" in dense or "error" in cg:
                rows.append(
                    {"kernel": kernel, "error": dense.get("error", cg.get("error"))}
                )
                continue
            a, b = np.asarray(cg["mean"]), np.asarray(dense["mean"])
            rel = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
            sa, sb = np.asarray(cg["std"]), np.asarray(dense["std"])
            vrel = float(np.max(np.abs(sa**2 - sb**2) / sb**2))
            row = {
                "kernel": kernel,
                "variant": label,
                **base,
                "mean_rel_err": rel,
                "var_max_rel_err": vrel,
                "cg_s": cg["total_s"],
                "cg_std_s": cg["std_s"],
                "dense_s": dense["total_s"],
                "dense_std_s": dense["std_s"],
                "iterations": cg.get("iterations"),
                "preconditioner": cg.get("preconditioner"),
                "warnings": cg.get("warnings"),
            }
            rows.append(row)
            print(
                f"agree {label} {kernel} N={base['N']} D=20: mean error {rel:.1e}, "
                f"variance error {vrel:.1e} (max relative); cg {cg['total_s']:.1f} "
                f"s + std {cg['std_s']:.1f} s, {cg.get('iterations')} iterations; "
                f"dense {dense['total_s']:.1f} s + std {dense['std_s']:.1f} s",
                flush=True,
            )
    return rows


def part_crossover(args):
    """Dense Cholesky against CG, condition + gradient mean at 100 points,
    values and gradients observed, ℓ = 0.5√D; the automatic choice beside."""
    rows = []
    grid = {50: [40, 80, 160], 10: [200, 400, 800]}
    if args.quick:
        grid = {50: [20, 40], 10: [50, 100]}
    for kernel in args.kernels.split(","):
        for D, Ns in grid.items():
            for N in Ns:
                for method in ("cholesky", "cg", "default"):
                    s = spec(N=N, D=D, M=100, kernel=kernel, method=method)
                    r = run(s, 1)
                    rows.append({**s, **r})
                    label = f"crossover {kernel} N={N} D={D} rows={N * (D + 1)}"
                    print(_fmt_row(f"{label} {method}", r), flush=True)
    return rows


def part_wide(args):
    rows = []
    for kernel in ("rbf", "matern52"):
        s = spec(
            N=50,
            D=1000 if not args.quick else 200,
            M=1,
            kernel=kernel,
            values=False,
            query="meanvar",
            noise=1e-6,
        )
        r = run(s, args.repeats)
        rows.append({"kernel": kernel, **s, **r})
        print(_fmt_row(f"wide {kernel} N=50 D={s['D']} (mean+var)", r), flush=True)
    return rows


def part_growth(args):
    rows = []
    Ns = [50, 100, 200, 400, 800] if not args.quick else [20, 40]
    for N in Ns:
        for method in ("cholesky", "cg"):
            if method == "cholesky" and N * 11 > 9000:
                continue
            s = spec(
                N=N, D=10, M=20, method=method, tol=args.tol, kernel=args.growth_kernel
            )
            r = run(s, args.repeats)
            rows.append({"axis": "N", **s, **r})
            print(_fmt_row(f"growth N={N} D=10 {method}", r), flush=True)
    Ds = [25, 50, 100, 200, 400] if not args.quick else [25, 50]
    for D in Ds:
        for method in ("cholesky", "cg", "woodbury"):
            if method == "cholesky" and 20 * D > 9000:
                continue
            s = spec(
                N=20,
                D=D,
                M=20,
                method=method,
                values=False,
                tol=args.tol,
                kernel=args.growth_kernel,
            )
            r = run(s, args.repeats)
            rows.append({"axis": "D", **s, **r})
            print(_fmt_row(f"growth N=20 D={D} {method}", r), flush=True)
    return rows


def plot_growth(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (axis, fixed) in enumerate((("N", "D = 10"), ("D", "N = 20"))):
        for method, style in (("cholesky", "o-"), ("cg", "s-"), ("woodbury", "^-")):
            pts = [
                r
                for r in rows
                if r.get("axis") == axis and r["method"] == method and "error" not in r
            ]
            if not pts:
                continue
            x = [r[axis] for r in pts]
            axes[0, col].loglog(x, [r["total_s"] for r in pts], style, label=method)
            axes[1, col].loglog(x, [r["peak_rss_gb"] for r in pts], style, label=method)
        axes[0, col].set_title(f"condition + mean: time against {axis} ({fixed})")
        axes[1, col].set_title(f"peak memory against {axis} ({fixed})")
        axes[1, col].set_xlabel(axis)
        axes[0, col].set_ylabel("seconds (median)")
        axes[1, col].set_ylabel("peak RSS (GiB)")
        for ax in axes[:, col]:
            ax.legend()
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt_row(name, r):
    if "error" in r:
        return f"{name}: error: {r['error']}"
    it = f", {r['iterations']} CG iterations" if r.get("iterations") else ""
    if r.get("refinements"):
        it += (
            f" ({r['float32_iterations']} of them with float32 products, "
            f"{r['refinements']} float64 refinements)"
        )
    if "relative_residual" in r:
        it += (
            f" (preconditioner {r['preconditioner']}, relative residual "
            f"{r['relative_residual']:.1e}, {r['solves_for_mean']} solve(s))"
        )
    if r.get("warnings"):
        it += f", warnings: {', '.join(r['warnings'])}"
    if r.get("iterations_to"):
        it += ", iterations to 1e-6: " + str(r["iterations_to"].get("1e-06"))
    if "product_s" in r:
        it += f", one product {r['product_s']:.3f} s ({r['product_cpu_s']:.3f} s CPU)"
    if "std_s" in r:
        it += f", then the variances {r['std_s']:.2f} s"
    if "peak_gpu_gb" in r:
        it += f", peak {r['gpu']} memory {r['peak_gpu_gb']:.2f} GiB"
    cpu = f", {r['cpu_s']:.2f} s CPU" if "cpu_s" in r else ""
    return (
        f"{name}: {r['method']}, condition {r['condition_s']:.2f} s + query "
        f"{r['query_s']:.2f} s = {r['total_s']:.2f} s{cpu} (median of "
        f"{r['repeats']}), peak RSS {r['peak_rss_gb']:.2f} GiB{it}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only",
        choices=["large", "huge", "agree", "wide", "crossover", "growth", "product"],
    )
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-large", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-8, help="CG tolerance")
    ap.add_argument("--large-n", type=int, default=2000)
    ap.add_argument(
        "--huge-n", default="5000,10000", help="point counts of the huge part"
    )
    ap.add_argument(
        "--max-iter",
        type=int,
        default=None,
        help="huge part: cap the CG iterations (a probe of setup and per-"
        "iteration cost where the whole solve would take too long)",
    )
    ap.add_argument(
        "--backends", default="numpy,torch", help="backends of the large part"
    )
    ap.add_argument(
        "--growth-kernel",
        default="matern52",
        choices=["rbf", "matern52"],
        help="kernel of the growth curves (RBF at ℓ = 0.5√D needs ~1000 CG "
        "iterations already at N = 100, D = 10)",
    )
    ap.add_argument(
        "--kernels",
        default="rbf,matern52",
        help="kernels of the large and crossover parts",
    )
    ap.add_argument(
        "--large-methods",
        default="default",
        help="large part: 'default' (the plain API) and/or 'cg-no-elimination' "
        "(CG on the whole system, value elimination off), side by side",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        help="large and huge parts: a torch device (cuda, cuda:1); anything but "
        "cpu runs the torch backend there, timed with synchronization, with "
        "the peak device memory",
    )
    ap.add_argument(
        "--dtype",
        choices=["float64", "float32"],
        default="float64",
        help="large and huge parts: the GP's dtype (float32 implies torch)",
    )
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--distributed",
        nargs=argparse.REMAINDER,
        help="run benchmarks/distributed.py (per-product time and communication "
        "share on 1, 2, 4 ... ranks) with the arguments that follow",
    )
    args = ap.parse_args(argv)
    if args.distributed is not None:
        import distributed

        return distributed.main(args.distributed)
    if args.child:
        _child(json.loads(args.child))
        return
    if args.quick:
        args.large_n = 200
        args.repeats = 1
    os.makedirs(args.out, exist_ok=True)
    info = machine()
    print("machine:", json.dumps(info), flush=True)
    # "huge" (N = 10,000, D = 100) runs only when asked for
    parts = (
        [args.only] if args.only else ["agree", "wide", "crossover", "large", "growth"]
    )
    results = {"machine": info}
    for part in parts:
        results[part] = globals()[f"part_{part}"](args)
    if "growth" in results:
        path = os.path.join(args.out, "scaling.png")
        plot_growth(results["growth"], path)
        print("plot:", path)
    name = "scaling" + (f"_{args.only}" if args.only else "") + args.tag + ".json"
    with open(os.path.join(args.out, name), "w") as fh:
        json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
