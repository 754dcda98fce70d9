#!/usr/bin/env python
"""The lean dense target: 11,000-row value+gradient GP in float64, beside GPyTorch.

N = 1000 points in D = 10 dimensions observing values and full gradients (an
N(D+1) = 11,000-row system), RBF kernel with fixed hyperparameters; posterior
mean and variance of the value and the gradient at M = 100 test points. Run,
each in a fresh interpreter of its own, by

* gpgrad, torch backend (float64, CPU),
* gpgrad, numpy backend (float64), the reference for the errors,
* GPyTorch's exact derivative GP (``ScaleKernel(RBFKernelGrad)``, the same
  hyperparameters) with Cholesky forced
  (``gpytorch.settings.max_cholesky_size(10**9)``, ``fast_computations`` off),

and reported as wall time of conditioning and prediction (imports and data
generation excluded) and the process's peak resident memory (``VmHWM``,
interpreter and imports included), with GPyTorch's figures divided by
gpgrad's. The target for gpgrad: at most 10 s and 2 GB on a 2-core CPU.

    python benchmarks/dense_target.py [--json out.json] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

import _machine as M  # noqa: E402
import compare_backends as C  # noqa: E402

TARGET_S = 10.0
#: 2 GB (10⁹ bytes each) in MiB, the unit of the memory figures
TARGET_MB = 2e9 / 2**20

CONFIGS = ("gpgrad numpy f64", "gpgrad torch f64", "gpytorch cholesky")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--d", type=int, default=10)
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--kernel", choices=C.KERNELS, default="rbf")
    ap.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed runs before the timed ones (default 0: one cold run, as a "
        "user's script would do it once)",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--repeat-time", type=float, default=300.0)
    ap.add_argument("--time-budget", type=float, default=900.0, help="s per config")
    ap.add_argument("--mem-budget", type=float, default=16384.0, help="MiB")
    ap.add_argument(
        "--with-default",
        action="store_true",
        help="also run GPyTorch with its default settings (CG above 800 rows)",
    )
    ap.add_argument(
        "--isolate",
        choices=("process", "fork"),
        default="process",
        help="'process' (default): a fresh interpreter per configuration, whose "
        "peak memory includes the interpreter and imports; 'fork': children of "
        "a fork server (fast, for tests; memory reads lower)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if min(args.n, args.d, args.m, args.repeats) < 1 or args.warmup < 0:
        ap.error("--n, --d, --m and --repeats must be >= 1, --warmup >= 0")
    return args


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def main(argv=None):
    args = parse_args(argv)
    names = list(CONFIGS) + (["gpytorch default"] if args.with_default else [])
    args.only = names
    details, backends = C.select_backends(args)
    # the CPU configurations only, whatever GPU the machine has
    backends = [b for b in backends if b["name"] in names]
    info = M.machine_info(details)
    problem = C.make_problem(args.kernel, "vg", args.n, args.d, args.m)
    t0 = time.perf_counter()
    records = C.run_grid(
        [problem],
        backends,
        args,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    by = {r["backend"]: r for r in records}
    gp_t = by.get("gpytorch cholesky", {})
    cmd = "python benchmarks/dense_target.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(f"Machine: {M.machine_line(info)}")
    print(f"Command: `{cmd.strip()}` ({time.perf_counter() - t0:.0f} s)")
    print(
        f"Problem: {C.problem_label(problem)}, {problem['rows']} rows, "
        f"M={problem['M']} test points (value and gradient mean and variance), "
        "float64"
    )
    print()
    print(
        "| configuration | status | time [s] | peak RSS [MiB] | GPyTorch ÷ this "
        "(time) | GPyTorch ÷ this (memory) | err mean | err var |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in records:
        rt = _ratio(gp_t.get("time_s"), r.get("time_s"))
        rm = _ratio(gp_t.get("peak_rss_mb"), r.get("peak_rss_mb"))
        print(
            f"| {r['backend']} | {r['status']} | {C._fmt_time(r.get('time_s'))} | "
            f"{C._fmt_mem(r)} | {'—' if rt is None else f'{rt:.2f}'} | "
            f"{'—' if rm is None else f'{rm:.2f}'} | "
            f"{C._fmt_err(r.get('err_mean'))} | {C._fmt_err(r.get('err_var'))} |"
        )
    print()
    verdicts = {}
    for name in ("gpgrad torch f64", "gpgrad numpy f64"):
        r = by.get(name, {})
        ok = (
            r.get("status") == "ok"
            and r["time_s"] <= TARGET_S
            and r["peak_rss_mb"] <= TARGET_MB
        )
        verdicts[name] = ok
        if r.get("status") == "ok":
            print(
                f"{name}: {r['time_s']:.1f} s, {r['peak_rss_mb']:.0f} MiB -> "
                f"{'meets' if ok else 'misses'} the target "
                f"(<= {TARGET_S:g} s, <= 2 GB = {TARGET_MB:.0f} MiB)"
            )
        else:
            print(f"{name}: {r.get('status')} ({r.get('message', '')})")
    if args.json:
        doc = {
            "command": cmd.strip(),
            "machine": info,
            "problem": problem,
            "target": {"time_s": TARGET_S, "peak_rss_mb": TARGET_MB},
            "meets_target": verdicts,
            "records": records,
        }
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    return records


if __name__ == "__main__":
    main()
