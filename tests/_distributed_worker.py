"""Ranks of a partitioned solve, for tests/test_distributed.py.

:func:`run_rank` is the body of one process (forked from the test, so it starts
without importing torch again): it joins a gloo group of ``world`` processes on
``127.0.0.1:port``, solves the problems of :func:`cases` and writes its
results to ``OUT/rank{r}.npz``. A rank exits with code 7 after a
:class:`~gpgrad.distributed.DistributedError`, 3 when told to die, and 0
otherwise.
"""

import os
import time

import numpy as np
import threadpoolctl
import torch

import gpgrad
import gpgrad.distributed as gd
from gpgrad import kernels as K

#: batch members of the test problems: uneven over 2 processes (2 + 1) and
#: over 3 (1 + 2 + 1)
MEMBERS = {2: 3, 3: 4}

#: CG tolerance of the agreement checks: the weights of two CG runs whose
#: products differ in the last bit (row-sliced GEMMs) agree to about
#: κ·tol, so 1e-15 keeps them within 1e-12 at κ ≈ 3e3 (1e-13 did not)
TOL = 1e-15


def problem(backend, members, method):
    """Means, variances, weights and log marginal likelihoods of a batch of
    ``members`` value+gradient problems (23 values, 14 gradients in 2-D)."""
    rng = np.random.default_rng(0)
    N, D = 23, 2
    X = rng.uniform(0, 1, (members, N, D))
    y = np.sin(3 * X).sum(-1)
    G = 3 * np.cos(3 * X)
    Xs = rng.uniform(0, 1, (members, 5, D))
    if backend == "torch":
        X, y, G, Xs = (torch.tensor(a) for a in (X, y, G, Xs))
    if method == "cg":
        # the whole system's CG and log-determinant estimator in one process
        # too: rows spread over processes (a partitioned operator) keep the
        # values in the CG system, so the one-process reference does as well
        method = gpgrad.CG(
            tol=TOL, max_iter=3000, probes=4, lanczos_steps=20, eliminate_values=False
        )
    gp = gpgrad.GP(K.Matern52(0.8), noise=1e-2, method=method, backend=backend)
    post = gp.condition(gpgrad.values(X, y), gpgrad.gradients(X[:, :14], G[:, :14]))
    g = post.gradient(Xs)
    # the solver's cross factors (as acquisition functions use them): rank
    # differs by process under split="batch", so their data term is compared
    mean, P, Q = post.solver.cross(
        post.query_blocks(gpgrad.values(Xs[0])), post.weights, joint=True
    )
    out = {
        "cross_mean": mean,
        "cross_data": gpgrad.backend.matrix_transpose(P) @ Q,
        "value_cov": post.value(Xs[0], full_cov=True).cov,
        "mean": g.mean,
        "var": g.var,
        "value_mean": post.value(Xs[0]).mean,  # queries shared by all members
        "value_var": post.value(Xs[0]).var,
        "lml": post.log_marginal_likelihood(),
        "alpha": post.weights,
    }
    out = {k: np.asarray(gpgrad.backend.to_numpy(v)) for k, v in out.items()}
    out["method"] = np.asarray(post.method)
    op = getattr(post.solver, "op", None)
    out["solver"] = np.asarray(f"{type(post.solver).__name__}/{type(op).__name__}")
    return out


def cases(world):
    """(name, backend, split, method) of the agreement checks (numpy's CG,
    the slowest, only in the 3-process run)."""
    out = [
        ("rows-torch", "torch", "rows", "cg"),
        ("batch-torch", "torch", "batch", "cg"),
        ("batch-numpy-cholesky", "numpy", "batch", "cholesky"),
    ]
    if world > 2:
        out.append(("rows-numpy", "numpy", "rows", "cg"))
    return out


def single(world):
    """The one-process answers of every case, {name: {key: array}}."""
    # one BLAS thread: the ranks' setting, and several threads on a loaded
    # 2-core machine make numpy's small batched eigh 50x slower
    with threadpoolctl.threadpool_limits(1):
        return {
            name: problem(backend, MEMBERS[world], method)
            for name, backend, _, method in cases(world)
        }


def run_rank(rank, world, port, task, out, timeout):
    """One process of the group: ``task`` is "agree", "die" or "hang"."""
    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
    )
    code = 0
    try:
        results = {}
        for name, backend, split, method in cases(world):
            gd.init(timeout=timeout, split=split)
            last = rank == world - 1
            if task == "die" and last:
                os._exit(3)  # a rank that dies after joining the group
            if task == "hang" and last:
                time.sleep(10 * timeout)  # a rank that stops answering
            res = problem(backend, MEMBERS[world], method)
            results.update({f"{name}/{k}": v for k, v in res.items()})
        np.savez(os.path.join(out, f"rank{rank}.npz"), **results)
    except gd.DistributedError as exc:
        print(f"rank {rank}: DistributedError: {exc}", flush=True)
        code = 7
    # skip interpreter teardown (and gloo's destructors, which may abort on a
    # group whose peer is gone) so that the exit code is the one set here
    os._exit(code)
