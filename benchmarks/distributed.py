"""Per-product time and communication share of the partitioned Gram operator.

Runs the value+gradient Gram product of one problem on 1, 2, 4 … CPU processes
(gloo on this machine; NCCL on GPUs with ``--device cuda``), each process
timing its own row slice and the all-gather separately, and prints the median
time per product, the share spent communicating, the bytes each rank receives
per product and the speed-up over one process. ``--solve`` adds a whole CG
solve of the weights on the same ranks (iterations, time, gathers' share).
``--project`` prints the cost of a 10⁷-row problem (10⁵ points in 100-D) on
eight GPUs from communication volume per iteration × iterations.

    python benchmarks/distributed.py --n 1000 --d 20 --ranks 1 2 4 --solve
    python benchmarks/scaling.py --distributed --n 1000 --d 20   # the same
    python benchmarks/distributed.py --project-only
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, machine_line, median  # noqa: E402

#: the 10⁷-row problem of the projection: points, dimensions, GPUs
PROJECT_N, PROJECT_D, PROJECT_GPUS = 100_000, 100, 8
#: assumed rates of the projection (not measured here): effective float64
#: throughput of the product per H100/H200 (about half the 67 TFLOP/s tensor
#: peak: the product is GEMMs plus elementwise profile work), NCCL all-gather
#: bus bandwidth inside an NVLink node, and per GPU across InfiniBand nodes
PROJECT_FLOPS = 30e12
PROJECT_NVLINK = 350e9
PROJECT_IB = 45e9


def _size(nbytes):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args):
    """One rank: build the operator, time slices and gathers, print JSON."""
    import numpy as np
    import torch

    import gpgrad
    import gpgrad.distributed as gd
    import gpgrad.solvers.partitioned as P
    from gpgrad.covariance import as_blocks
    from gpgrad.solvers.matfree import GramOperator

    torch.set_num_threads(args.threads)
    part = gd.init(timeout=600, split="rows")
    rng = np.random.default_rng(0)
    dev = torch.device(args.device)
    X = torch.tensor(rng.uniform(0, 1, (args.n, args.d)), device=dev)
    obs = [gpgrad.values(X), gpgrad.gradients(X)]
    ls = 0.5 * args.d**0.5
    kern = gpgrad.kernels.Matern52(lengthscale=ls)
    blocks = as_blocks(obs, gpgrad.backend.namespace(X), torch.float64, dev)
    N = args.n * (args.d + 1)
    noise = torch.full((N,), args.noise, dtype=torch.float64, device=dev)
    op = GramOperator(kern, blocks, noise)
    V = torch.tensor(rng.standard_normal((N, 1)), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        if part is None:
            times = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                op.matmul(V)
                sync()
                times.append(time.perf_counter() - t0)
            res = {"ranks": 1, "product": times[1:], "gather": [0.0] * args.repeats}
        else:
            pop = P.PartitionedOperator(op, part)
            rows = pop.local[0]
            prod, gath = [], []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                local = rows.matmul(V, True)
                sync()
                t1 = time.perf_counter()
                P._all_gather(part, local, local.shape[-2], pop.max_rows)
                sync()
                t2 = time.perf_counter()
                prod.append(t2 - t0)
                gath.append(t2 - t1)
            res = {"ranks": part.world_size, "product": prod[1:], "gather": gath[1:]}
            res["rows_per_rank"] = [len(i) for i in pop.index]
    if args.solve:
        res.update(_solve(args, X, kern, part))
    res["rows"] = N
    # each rank receives the other ranks' slices (padded to the largest)
    W = 1 if part is None else part.world_size
    res["bytes_received_per_product"] = (W - 1) * res.get("rows_per_rank", [N])[0] * 8
    if part is not None:
        gd.shutdown()
    if part is None or part.rank == 0:
        print("RESULT " + json.dumps(res), flush=True)


def _solve(args, X, kern, part):
    """A CG solve of the weights (values and gradients of a smooth function)
    on the plain API, with the gathers timed."""
    import torch

    import gpgrad
    import gpgrad.solvers.partitioned as P

    spent = {"n": 0, "s": 0.0}
    gather = P._gather_rows

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = gather(*a, **k)
        spent["s"] += time.perf_counter() - t0
        spent["n"] += 1
        return out

    P._gather_rows = timed
    y = torch.sin(X).sum(-1)
    G = torch.cos(X)
    gp = gpgrad.GP(
        kern, noise=args.noise, method=gpgrad.CG(tol=args.tol), backend="torch"
    )
    t0 = time.perf_counter()
    post = gp.condition(gpgrad.values(X, y), gpgrad.gradients(X, G))
    total = time.perf_counter() - t0
    P._gather_rows = gather
    st = post.solver.stats
    return {
        "solve_s": total,
        "iterations": st["iterations"],
        "solve_gathers": spent["n"],
        "solve_gather_s": spent["s"],
        "preconditioner": str(post.solver.preconditioner),
    }


def launch(args, world):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["OPENBLAS_NUM_THREADS"] = str(args.threads)
    if world > 1:
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            WORLD_SIZE=str(world),
        )
    procs = []
    for r in range(world):
        cmd = [sys.executable, __file__, "--worker", "--n", str(args.n)]
        cmd += ["--d", str(args.d), "--repeats", str(args.repeats)]
        cmd += ["--threads", str(args.threads), "--device", args.device]
        cmd += ["--noise", str(args.noise), "--tol", str(args.tol)]
        cmd += ["--solve"] if args.solve else []
        if args.device == "cuda":
            cmd[cmd.index("cuda")] = f"cuda:{r}"
        procs.append(
            subprocess.Popen(
                cmd,
                env=dict(env, RANK=str(r)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate()[0] for p in procs]
    for out in outs:
        for line in out.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
    raise RuntimeError("no result:\n" + "\n".join(outs))


def projection(iterations=(500, 2000), measured=None):
    """Rows of the 8-GPU projection: per product and per CG solve."""
    n, d, W = PROJECT_N, PROJECT_D, PROJECT_GPUS
    rows = n * (d + 1)
    flops = 10.0 * n * n * d
    recv = (W - 1) / W * rows * 8  # bytes each GPU receives per product
    t_comp = flops / W / PROJECT_FLOPS
    t_nv = recv / PROJECT_NVLINK
    t_ib = recv / PROJECT_IB
    profiles = 3 * (n / W) * n * 8

    def row(head, per_product, fmt):
        # a quantity per product, then times each solve's iteration count
        cells = " | ".join(fmt.format(per_product * i) for i in iterations)
        return f"| {head} | {cells} |"

    lines = [
        f"Projection: N = {n:,} points in D = {d} ({rows:.3g} rows), Matérn 5/2, "
        f"{W} GPUs, rows split evenly (not measured: assumed "
        f"{PROJECT_FLOPS / 1e12:.0f} TFLOP/s effective float64 per GPU, "
        f"{PROJECT_NVLINK / 1e9:.0f} GB/s NVLink all-gather bus bandwidth, "
        f"{PROJECT_IB / 1e9:.0f} GB/s per GPU across InfiniBand nodes)",
        "",
        "| quantity | per product | "
        + " | ".join(f"per CG solve ({i:,} iterations)" for i in iterations)
        + " |",
        "|---|---|" + "---|" * len(iterations),
        row(
            f"flops (10·N²·D) | {flops:.2g} ({flops / W:.2g} per GPU)", flops, "{:.2g}"
        ),
        row(f"compute per GPU | {t_comp * 1e3:.0f} ms", t_comp, "{:.0f} s"),
        row(
            f"all-gather volume received per GPU ((W−1)/W·rows·8 B) | "
            f"{recv / 1e6:.0f} MB",
            recv / 1e9,
            "{:.0f} GB",
        ),
        row(
            f"all-gather time, one NVLink node | {t_nv * 1e3:.2f} ms "
            f"({t_nv / t_comp:.1%} of compute)",
            t_nv,
            "{:.1f} s",
        ),
        row(
            f"all-gather time, across nodes | {t_ib * 1e3:.1f} ms "
            f"({t_ib / t_comp:.1%} of compute)",
            t_ib,
            "{:.1f} s",
        ),
        f"| cached profiles per GPU (3·(N/W)·N·8 B) | {profiles / 1e9:.0f} GB | "
        + " | " * (len(iterations) - 1)
        + " |",
    ]
    if measured:
        lines += ["", measured]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="points")
    ap.add_argument("--d", type=int, default=20, help="dimensions")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (rank r: cuda:r)")
    ap.add_argument("--noise", type=float, default=1e-4)
    ap.add_argument("--tol", type=float, default=1e-8, help="CG tolerance (--solve)")
    ap.add_argument("--solve", action="store_true", help="also time a CG solve")
    ap.add_argument("--project-only", action="store_true", help="only the projection")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.project_only:
        print(projection())
        return 0
    info = machine_info()
    print(machine_line(info))
    cores = os.cpu_count() or 1
    print(
        f"Gram product of N={args.n}, D={args.d} values+gradients "
        f"({args.n * (args.d + 1):,} rows), Matérn 5/2, {args.threads} thread(s) "
        f"per rank, {args.device}, {cores} cores"
        + (
            f"; {max(args.ranks)} ranks oversubscribe the {cores} cores"
            if args.device == "cpu" and max(args.ranks) * args.threads > cores
            else ""
        )
    )
    print(
        "| ranks | product (s, median) | communication share | received per "
        "product | gather bandwidth | speed-up |"
    )
    print("|---|---|---|---|---|---|")
    rows, base = [], None
    for w in args.ranks:
        r = launch(args, w)
        t = median(r["product"])
        g = median(r["gather"])
        base = base if base is not None else t
        r.update(median_product=t, median_gather=g)
        rows.append(r)
        recv = r["bytes_received_per_product"]
        bw = f"{_size(recv / g)}/s" if g > 0 else "–"
        print(
            f"| {w} | {t:.4f} | {g / t:.1%} | {_size(recv)} | {bw} | {base / t:.2f}× |",
            flush=True,
        )
    if args.solve:
        print()
        print(
            "| ranks | CG solve of the weights (s) | iterations | gathers | "
            "gathers' share | speed-up |"
        )
        print("|---|---|---|---|---|---|")
        s0 = rows[0]["solve_s"]
        for r in rows:
            print(
                f"| {r['ranks']} | {r['solve_s']:.2f} | {r['iterations']} | "
                f"{r['solve_gathers']} | {r['solve_gather_s'] / r['solve_s']:.1%} | "
                f"{s0 / r['solve_s']:.2f}× |"
            )
    print()
    its = sorted({rows[0].get("iterations", 500), 500, 2000})
    print(projection(tuple(its)))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
