"""One rank of a partitioned solve, for tests/test_distributed.py.

Usage: python _distributed_worker.py BACKEND OUT.npz [die]
Reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment; rank 0
writes the results of the partitioned and of the single-process solve.
"""

import os
import sys

import numpy as np
import torch

import gpgrad
import gpgrad.distributed as gd
from gpgrad import kernels as K

torch.set_num_threads(1)


def problem(backend):
    rng = np.random.default_rng(0)
    N, D = 23, 2
    X = rng.uniform(0, 1, (2, N, D))  # a batch of two problems
    y = np.sin(X).sum(-1)
    G = np.cos(X)
    Xs = rng.uniform(0, 1, (2, 5, D))
    if backend == "torch":
        X, y, G, Xs = (torch.tensor(a) for a in (X, y, G, Xs))
    gp = gpgrad.GP(
        K.Matern52(0.8), noise=1e-2, method=gpgrad.CG(tol=1e-13), backend=backend
    )
    post = gp.condition(gpgrad.values(X, y), gpgrad.gradients(X[:, :14], G[:, :14]))
    g = post.gradient(Xs)
    out = {
        "mean": g.mean,
        "var": g.var,
        "value_mean": post.value(Xs).mean,
        "lml": post.log_marginal_likelihood(),
        "alpha": post.weights,
    }
    return {k: np.asarray(gpgrad.backend.to_numpy(v)) for k, v in out.items()}


def main():
    backend, path = sys.argv[1], sys.argv[2]
    die = len(sys.argv) > 3
    single = problem(backend)
    part = gd.init(timeout=float(os.environ.get("GPGRAD_TEST_TIMEOUT", "30")))
    if die and part.rank == part.world_size - 1:
        os._exit(3)  # a rank that dies after joining the group
    try:
        multi = problem(backend)
    except gd.DistributedError as exc:
        print(f"DistributedError: {exc}", flush=True)
        # skip interpreter teardown: gloo's destructor may abort (SIGABRT)
        # on a group whose peer is gone, which would hide this exit code
        os._exit(7)
    if part.rank == 0:
        np.savez(
            path,
            **{f"single_{k}": v for k, v in single.items()},
            **{f"multi_{k}": v for k, v in multi.items()},
        )
    gd.shutdown()


if __name__ == "__main__":
    main()
