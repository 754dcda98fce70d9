"""The matrix-free solver partitioned across devices and processes."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import gpgrad
import gpgrad.distributed as gd
from gpgrad import kernels as K
from gpgrad.solvers.partitioned import PartitionedOperator, partition_rows

WORKER = Path(__file__).with_name("_distributed_worker.py")


@pytest.fixture(autouse=True)
def _no_partition_left_behind():
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
    gp = gpgrad.GP(
        K.Matern52(0.8), noise=1e-2, method=gpgrad.CG(tol=1e-13), backend="torch"
    )
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
    _, m0, v0, l0 = _solve(X, y, G, Xs)
    gd.init(devices=["cpu", "cpu", "cpu"])  # 23 value points over 3: uneven
    post, m1, v1, l1 = _solve(X, y, G, Xs)
    assert isinstance(post.solver.op, PartitionedOperator)
    assert post.solver.op.part.workers == 3
    assert _rel(m1, m0) <= 1e-12
    assert _rel(l1, l0) <= 1e-12
    # variances are prior − data term: CG's tolerance shows up a little more
    assert _rel(v1, v0) <= 1e-11


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, backend, out, *extra, timeout=30):
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        GPGRAD_TEST_TIMEOUT=str(timeout),
        OMP_NUM_THREADS="1",
    )
    procs = []
    for r in range(world):
        env_r = dict(env, RANK=str(r))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), backend, str(out), *extra],
                env=env_r,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("world, backend", [(2, "torch"), (3, "numpy"), (3, "torch")])
def test_processes_match_one_process(tmp_path, world, backend):
    out = tmp_path / "res.npz"
    procs = _launch(world, backend, out)
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    r = np.load(out)
    for key in ("mean", "value_mean", "lml", "alpha"):
        a, b = r[f"multi_{key}"], r[f"single_{key}"]
        assert np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(b)), key
    a, b = r["multi_var"], r["single_var"]
    assert np.max(np.abs(a - b)) <= 1e-11 * np.max(np.abs(b))


@pytest.mark.slow
def test_a_dead_rank_ends_the_others_with_an_error(tmp_path):
    procs = _launch(2, "torch", tmp_path / "res.npz", "die", timeout=20)
    start = time.monotonic()
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert procs[1].returncode == 3
    assert procs[0].returncode == 7, logs[0]
    assert "another rank has died or did not answer" in logs[0]
    assert time.monotonic() - start < 200


@pytest.mark.slow  # ~10 s: a partitioned CG run over simulated devices
def test_gradients_through_devices_match_and_processes_refuse():
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.uniform(0, 1, (20, 2)))
    y, G = X.sin().sum(-1), X.cos()

    def lml_grad():
        ls = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        gp = gpgrad.GP(
            K.Matern52(ls), noise=1e-2, method=gpgrad.CG(tol=1e-12), backend="torch"
        )
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
