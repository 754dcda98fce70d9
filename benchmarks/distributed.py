"""Per-product time and communication share of the partitioned Gram operator.

Runs the value+gradient Gram product of one problem on 1, 2, 4 … CPU processes
(gloo on this machine; NCCL on GPUs with ``--device cuda``), each process
timing its own row slice and the all-gather separately, and prints the median
time per product, the share spent communicating and the speed-up over one
process. With ``--project`` it adds the projected cost of a 10⁷-row problem on
eight GPUs from the measured communication volume.

    python benchmarks/distributed.py --n 2000 --d 50 --ranks 1 2 4
    python benchmarks/scaling.py --distributed   # the same, from the scaling script
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
    from gpgrad.covariance import as_blocks
    from gpgrad.solvers.matfree import GramOperator
    from gpgrad.solvers.partitioned import PartitionedOperator, _all_gather

    torch.set_num_threads(args.threads)
    part = gd.init(timeout=600)
    rng = np.random.default_rng(0)
    dev = torch.device(args.device)
    X = torch.tensor(rng.uniform(0, 1, (args.n, args.d)), device=dev)
    obs = [gpgrad.values(X), gpgrad.gradients(X)]
    kern = gpgrad.kernels.Matern52(lengthscale=0.5 * args.d**0.5)
    blocks = as_blocks(obs, gpgrad.backend.namespace(X), torch.float64, dev)
    N = args.n * (args.d + 1)
    noise = torch.full((N,), 1e-4, dtype=torch.float64, device=dev)
    op = GramOperator(kern, blocks, noise)
    V = torch.tensor(rng.standard_normal((N, 1)), device=dev)
    with torch.no_grad():
        if part is None:
            times = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                op.matmul(V)
                times.append(time.perf_counter() - t0)
            res = {"ranks": 1, "product": times[1:], "gather": [0.0] * args.repeats}
        else:
            pop = PartitionedOperator(op, part)
            rows = pop.local[0]
            prod, gath = [], []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                local = rows.matmul(V, True)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                _all_gather(part, local, local.shape[-2], pop.max_rows)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                prod.append(t2 - t0)
                gath.append(t2 - t1)
            res = {"ranks": part.world_size, "product": prod[1:], "gather": gath[1:]}
            gd.shutdown()
    res["rows"] = N
    res["bytes_per_product"] = N * 8
    if part is None or part.rank == 0:
        print("RESULT " + json.dumps(res), flush=True)


def launch(args, world):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="points")
    ap.add_argument("--d", type=int, default=50, help="dimensions")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    print(machine_line(machine_info()))
    print(
        f"Gram product of N={args.n}, D={args.d} values+gradients "
        f"({args.n * (args.d + 1):,} rows), {args.threads} thread(s) per rank"
    )
    print("| ranks | product (s, median) | communication share | speed-up |")
    print("|---|---|---|---|")
    rows, base = [], None
    for w in args.ranks:
        r = launch(args, w)
        t = median(r["product"])
        g = median(r["gather"])
        base = base if base is not None else t
        r.update(median_product=t, median_gather=g)
        rows.append(r)
        print(f"| {w} | {t:.3f} | {g / t:.1%} | {base / t:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
