"""The matrix-free solver partitioned across devices and processes."""

import multiprocessing as mp
import os
import socket
import time

import _distributed_worker as W
import numpy as np
import pytest
import threadpoolctl
import torch

import gpgrad
import gpgrad.distributed as gd
from gpgrad import kernels as K
from gpgrad.solvers.partitioned import PartitionedOperator, partition_rows


@pytest.fixture(autouse=True)
def _no_partition_left_behind():
    # one BLAS thread, as in the ranks (several make numpy's small batched
    # eigh of the log-determinant 50x slower on a loaded 2-core machine)
    with threadpoolctl.threadpool_limits(1):
        yield
    gd._use(None)


def test_partition_rows_cover_every_point_once_unevenly():
    parts = partition_rows([7, 2, 5], 3)
    for b, n in enumerate([7, 2, 5]):
        got = np.concatenate([np.arange(*parts[w][b]) for w in range(3)])
        np.testing.assert_array_equal(got, np.arange(n))
    assert [parts[w][0][1] - parts[w][0][0] for w in range(3)] == [2, 3, 2]
    assert parts[0][1] == (0, 1) and parts[1][1] == (1, 1)  # one owns no point


def test_init_on_one_process_does_nothing():
    env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK") if k in os.environ}
    try:
        assert gd.init() is None
        assert gd.current() is None
    finally:
        os.environ.update(env)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"devices": "cuda:0"}, "devices must be a list of device names"),
        ({"devices": ["cpu"], "timeout": 0}, "timeout must be a positive number"),
    ],
)
def test_init_validates(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        gd.init(**bad)


def _solve(X, y, G, Xs):
    # a partitioned operator keeps the values in the CG system (no value
    # elimination), so the unpartitioned reference does as well: both run
    # the whole system's log-determinant estimator
    cg = gpgrad.CG(
        tol=W.TOL, max_iter=3000, probes=4, lanczos_steps=20, eliminate_values=False
    )
    gp = gpgrad.GP(K.Matern52(0.8), noise=1e-2, method=cg, backend="torch")
    post = gp.condition(gpgrad.values(X, y), gpgrad.gradients(X[:14], G[:14]))
    g = post.gradient(Xs)
    return post, g.mean, g.var, post.log_marginal_likelihood()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow  # ~10 s: a partitioned CG run over simulated devices
def test_devices_in_one_process_match_the_unpartitioned_solve():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    X = torch.tensor(rng.uniform(0, 1, (23, 2)))
    y, G = X.sin().sum(-1), X.cos()
    Xs = torch.tensor(rng.uniform(0, 1, (5, 2)))
    post0, m0, v0, l0 = _solve(X, y, G, Xs)
    w0 = post0.weights
    gd.init(devices=["cpu", "cpu", "cpu"])  # 23 value points over 3: uneven
    post, m1, v1, l1 = _solve(X, y, G, Xs)
    assert isinstance(post.solver.op, PartitionedOperator)
    assert post.solver.op.part.workers == 3
    assert _rel(m1, m0) <= 1e-12
    assert _rel(l1, l0) <= 1e-12
    assert _rel(v1, v0) <= 1e-12
    assert _rel(post.weights, w0) <= 1e-12


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, task, out, timeout=30, wait=120, watch=None):
    """Fork ``world`` ranks of tests/_distributed_worker.py (forked, so they
    share this process's imports: no second torch start-up) and wait until
    the ranks in ``watch`` (default all) have ended or ``wait`` s passed;
    the others are then killed. Returns the exit codes (None: killed while
    running) and the seconds until the last watched rank ended."""
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [
        ctx.Process(target=W.run_rank, args=(r, world, port, task, str(out), timeout))
        for r in range(world)
    ]
    watch = range(world) if watch is None else watch
    start = time.monotonic()
    for p in procs:
        p.start()
    while time.monotonic() - start < wait:
        if all(procs[r].exitcode is not None for r in watch):
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    return codes, elapsed


def _normwise(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def single_answers():
    """The one-process answers, computed once per world size when asked."""
    cache = {}

    def get(world):
        if world not in cache:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in the ranks
            try:
                cache[world] = W.single(world)
            finally:
                torch.set_num_threads(threads)
        return cache[world]

    return get


@pytest.mark.parametrize(
    "world",
    [2, pytest.param(3, marks=pytest.mark.slow)],  # 3 ranks: ~10 s
)
def test_processes_match_one_process(tmp_path, single_answers, world):
    """Rows split unevenly (23 and 14 points over 2 or 3 ranks) and whole
    batch members spread unevenly (3 over 2, 4 over 3), numpy and torch, CG
    and dense Cholesky: every rank holds the whole batch's answers, equal on
    all ranks and within 1e-12 (normwise relative) of one process."""
    codes, _ = _spawn(world, "agree", tmp_path)
    assert codes == [0] * world
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(world)]
    one = single_answers(world)
    checked = 0
    for name, _, split, _ in W.cases(world):
        solver = str(ranks[0][f"{name}/solver"])
        if split == "batch":
            assert solver.startswith("BatchSpreadSolver/"), solver
        else:
            assert solver == "IterativeSolver/PartitionedOperator", solver
        for key, want in one[name].items():
            got = ranks[0][f"{name}/{key}"]
            if key == "solver":
                continue
            if key == "method":
                assert str(got) == str(want)
                continue
            assert got.shape == want.shape, (name, key)
            assert _normwise(got, want) <= 1e-12, (name, key, _normwise(got, want))
            for other in ranks[1:]:  # every rank holds the same full answer
                np.testing.assert_array_equal(other[f"{name}/{key}"], got)
            checked += 1
    assert checked == 9 * len(W.cases(world))  # the nine arrays of problem()
    assert W.MEMBERS[world] % world != 0  # the batch really is uneven


@pytest.mark.parametrize("task", ["die", pytest.param("hang", marks=pytest.mark.slow)])
def test_a_failed_rank_ends_the_others_with_an_error(tmp_path, task):
    """A rank that exits (or stops answering) after joining the group: the
    other two raise DistributedError (exit code 7) within the timeout."""
    timeout = 4
    codes, elapsed = _spawn(3, task, tmp_path, timeout=timeout, wait=60, watch=[0, 1])
    assert codes[:2] == [7, 7], codes
    assert codes[2] == (3 if task == "die" else None)  # None: still asleep
    # a dead peer is noticed at once; a silent one after the timeout (the
    # ranks' first collectives, then one timed-out gather)
    assert elapsed < 3 * timeout + 10, elapsed


def test_auto_split_spreads_batches_with_a_member_per_process():
    from gpgrad.covariance import as_blocks
    from gpgrad.solvers.partitioned import partition_batch, spreads_batch

    kern = K.RBF(1.0)

    def blocks(shape):
        X = np.zeros(shape + (5, 2))
        return as_blocks([gpgrad.values(X)], np, np.float64, None)

    two = gd.Partition(rank=0, world_size=2)
    assert spreads_batch(two, kern, blocks((2, 4)))
    assert not spreads_batch(two, kern, blocks((1, 4)))  # rows of one member
    assert not spreads_batch(two, kern, blocks(()))
    assert not spreads_batch(
        gd.Partition(world_size=2, split="rows"), kern, blocks((3,))
    )
    assert not spreads_batch(gd.Partition(devices=["cpu", "cpu"]), kern, blocks((3,)))
    assert partition_batch(4, 3) == [(0, 1), (1, 3), (3, 4)]


def test_batch_split_validates():
    part = gd.Partition(rank=0, world_size=4, split="batch")
    X = np.zeros((3, 5, 2))
    gp = gpgrad.GP(K.RBF(1.0), backend="torch")
    gd._use(part)
    with pytest.raises(ValueError, match="split='batch' needs at least one batch"):
        gp.condition(torch.tensor(X), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="split must be one of"):
        gd.Partition(split="members")


def test_memory_is_checked_per_worker_before_allocating(monkeypatch):
    """Each worker's profiles (its points × all points, three matrices) are
    compared with the available memory before any product."""
    import gpgrad.solvers.select as sel
    from gpgrad.solvers.partitioned import per_worker_memory

    X = torch.tensor(np.random.default_rng(0).uniform(0, 1, (30, 3)))
    obs = (gpgrad.values(X, X.sum(-1)), gpgrad.gradients(X, torch.ones(30, 3)))
    gp = gpgrad.GP(K.Matern52(1.0), noise=1e-2, method="cg", backend="torch")
    gd._use(gd.Partition(devices=["cpu", "cpu"]))
    one = per_worker_memory(15, 30, 8)  # points, not the 120 entries
    monkeypatch.setattr(sel, "available_memory", lambda like=None: 2 * one - 1)
    with pytest.raises(sel.InsufficientMemoryError, match="workers' row slice"):
        gp.condition(*obs)
    monkeypatch.setattr(sel, "available_memory", lambda like=None: 2 * one)
    assert gp.condition(*obs).solver.op.part.workers == 2


@pytest.mark.slow  # ~10 s: a partitioned CG run over simulated devices
def test_gradients_through_devices_match_and_processes_refuse():
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.uniform(0, 1, (20, 2)))
    y, G = X.sin().sum(-1), X.cos()

    def lml_grad():
        ls = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        # no value elimination, as on the partitioned operator (see _solve)
        cg = gpgrad.CG(tol=1e-12, eliminate_values=False)
        gp = gpgrad.GP(K.Matern52(ls), noise=1e-2, method=cg, backend="torch")
        obs = (gpgrad.values(X, y), gpgrad.gradients(X[:10], G[:10]))
        gp.log_marginal_likelihood(*obs).backward()
        return ls.grad

    want = lml_grad()
    gd.init(devices=["cpu", "cpu"])
    got = lml_grad()
    assert float(abs(got - want)) <= 1e-9 * float(abs(want))
    from gpgrad.solvers.partitioned import _all_gather

    t = torch.zeros(3, 1, dtype=torch.float64, requires_grad=True) * 2.0
    with pytest.raises(ValueError, match="partitioned across processes are not"):
        _all_gather(gd.Partition(rank=0, world_size=2), t, 3, 3)
