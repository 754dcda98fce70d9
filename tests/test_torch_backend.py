"""The torch backend: parity with numpy, batches, autograd, float32, devices."""

import numpy as np
import pytest
import torch
from reference import cases, functional_mix

import gpgrad
from gpgrad import kernels as K

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def _obs(kernel, rng, n=7, d=2):
    X = rng.uniform(-1, 1, (n, d))
    y = np.sin(2 * X[:, 0]) * np.cos(X[:, 1])
    obs = [gpgrad.values(X, y)]
    if kernel.order >= 1:
        obs += [
            gpgrad.gradients(X[:3], rng.normal(size=(3, d)), noise=1e-3),
            gpgrad.partials(X[3:5], [1, 0], [0.2, -0.1]),
            gpgrad.directional(X[5:], rng.normal(size=(2, d)), [0.3, 0.1]),
        ]
    if kernel.order >= 2:
        obs += [
            gpgrad.hessians(X[:1], np.array([[[1.0, 0.2], [0.2, -0.5]]]), noise=1e-2),
            gpgrad.second_partials(X[1:3], [0, 1], [1, 1], [0.1, 0.4]),
        ]
    return obs


def _rel(a, b):
    a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name,kernel,fref,smooth", cases(2), ids=[c[0] for c in cases(2)]
)
def test_float64_parity_with_numpy(name, kernel, fref, smooth, device):
    rng = np.random.default_rng(0)
    obs = _obs(kernel, rng)
    pn = gpgrad.GP(kernel, noise=1e-4).condition(*obs)
    pt = gpgrad.GP(kernel, noise=1e-4, backend="torch", device=device).condition(*obs)
    Xs = rng.uniform(-1, 1, (3, 2))
    qs = functional_mix(Xs, int(min(kernel.order, 2)), rng)
    a = pn.predict(*qs, full_cov=True)
    b = pt.predict(*qs, full_cov=True)
    assert isinstance(b.mean, torch.Tensor) and b.mean.dtype == torch.float64
    assert b.mean.device.type == device
    assert _rel(b.mean, a.mean) <= 1e-10
    assert _rel(b.var, a.var) <= 1e-10
    assert _rel(b.cov, a.cov) <= 1e-10
    ln, lt = pn.log_marginal_likelihood(), pt.log_marginal_likelihood()
    assert abs(float(lt) - ln) <= 1e-10 * max(1.0, abs(ln))
    if kernel.order >= 1:
        assert _rel(pt.gradient(Xs).cov, pn.gradient(Xs).cov) <= 1e-10


def test_float32_within_documented_tolerance():
    # well-conditioned: noise 1e-3 relative to unit variance, moderate lengthscale
    rng = np.random.default_rng(1)
    for kernel in [K.RBF(lengthscale=[0.5, 0.7]), K.Matern52(lengthscale=0.6)]:
        obs = [
            gpgrad.values(rng.uniform(-1, 1, (20, 2)), rng.normal(size=20), noise=1e-3),
            gpgrad.gradients(
                rng.uniform(-1, 1, (8, 2)), rng.normal(size=(8, 2)), noise=1e-3
            ),
        ]
        Xs = rng.uniform(-1, 1, (5, 2))
        p64 = gpgrad.GP(kernel).condition(*obs)
        p32 = gpgrad.GP(kernel, backend="torch", dtype=torch.float32).condition(*obs)
        g64, g32 = p64.gradient(Xs), p32.gradient(Xs)
        assert g32.mean.dtype == torch.float32
        scale = np.abs(g64.mean).max()
        assert np.abs(g32.mean.numpy() - g64.mean).max() <= 1e-3 * scale
        assert np.abs(g32.var.numpy() - g64.var).max() <= 1e-3 * g64.var.max()


def test_batched_problems_equal_loop_with_per_batch_hyperparameters():
    rng = np.random.default_rng(2)
    b, n, d = 3, 9, 2
    X = torch.tensor(rng.uniform(-1, 1, (b, n, d)))
    y = torch.sin(X).sum(-1)
    G = torch.cos(X)
    ls = torch.tensor([[0.5, 0.8], [0.7, 0.7], [1.1, 0.4]], dtype=torch.float64)
    var = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    kb = K.Matern52(lengthscale=ls, variance=var)
    obs = [gpgrad.values(X, y), gpgrad.gradients(X[:, :4], G[:, :4], noise=1e-4)]
    pb = gpgrad.GP(kb, backend="torch").condition(*obs)
    Xs = torch.tensor(rng.uniform(-1, 1, (4, d)))
    gb = pb.gradient(Xs, full_cov=True)
    hb = pb.hessian(Xs)
    lb = pb.log_marginal_likelihood()
    assert gb.mean.shape == (b, 4, d) and gb.cov.shape == (b, 4, d, 4, d)
    assert lb.shape == (b,)
    for i in range(b):
        k = K.Matern52(lengthscale=ls[i], variance=var[i])
        p = gpgrad.GP(k, backend="torch").condition(
            gpgrad.values(X[i], y[i]), gpgrad.gradients(X[i, :4], G[i, :4], noise=1e-4)
        )
        g = p.gradient(Xs, full_cov=True)
        assert torch.allclose(gb.mean[i], g.mean, rtol=1e-10, atol=1e-12)
        assert torch.allclose(gb.cov[i], g.cov, rtol=1e-9, atol=1e-12)
        assert torch.allclose(hb.mean[i], p.hessian(Xs).mean, rtol=1e-9, atol=1e-12)
        assert torch.allclose(lb[i], p.log_marginal_likelihood(), rtol=1e-10)


def test_batched_test_points_broadcast_against_batched_data():
    rng = np.random.default_rng(3)
    X = torch.tensor(rng.uniform(-1, 1, (2, 6, 1)))
    y = torch.sin(3 * X[..., 0])
    post = gpgrad.GP(K.RBF(0.4), backend="torch").condition(X, y)
    Xs = torch.tensor(rng.uniform(-1, 1, (2, 5, 1)))
    m = post.gradient(Xs).mean
    for i in range(2):
        p = gpgrad.GP(K.RBF(0.4), backend="torch").condition(X[i], y[i])
        assert torch.allclose(m[i], p.gradient(Xs[i]).mean, rtol=1e-10)


def _lml(ls, var, noise, X, y, G):
    k = K.Matern52(lengthscale=ls, variance=var)
    gp = gpgrad.GP(k, noise={"value": noise, "gradient": 1e-3}, backend="torch")
    return gp.log_marginal_likelihood(gpgrad.values(X, y), gpgrad.gradients(X[:4], G))


def test_autograd_hyperparameters_match_finite_differences():
    rng = np.random.default_rng(4)
    X = torch.tensor(rng.uniform(-1, 1, (8, 2)))
    y = torch.sin(2 * X[:, 0]) + X[:, 1]
    G = torch.tensor(rng.normal(size=(4, 2)))
    ls = torch.tensor([0.6, 0.9], dtype=torch.float64, requires_grad=True)
    var = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    noise = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    lml = _lml(ls, var, noise, X, y, G)
    g_ls, g_var, g_noise = torch.autograd.grad(lml, (ls, var, noise))
    h = 1e-6
    with torch.no_grad():
        for i in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[i] = h
            fd = (
                _lml(ls + e, var, noise, X, y, G) - _lml(ls - e, var, noise, X, y, G)
            ) / (2 * h)
            assert float(g_ls[i]) == pytest.approx(float(fd), rel=1e-6, abs=1e-7)
        fd = (_lml(ls, var + h, noise, X, y, G) - _lml(ls, var - h, noise, X, y, G)) / (
            2 * h
        )
        assert float(g_var) == pytest.approx(float(fd), rel=1e-6, abs=1e-7)
        fd = (_lml(ls, var, noise + h, X, y, G) - _lml(ls, var, noise - h, X, y, G)) / (
            2 * h
        )
        assert float(g_noise) == pytest.approx(float(fd), rel=1e-6, abs=1e-7)


def test_autograd_test_inputs():
    rng = np.random.default_rng(5)
    X = torch.tensor(rng.uniform(-1, 1, (10, 2)))
    y = torch.sin(2 * X[:, 0]) + X[:, 1] ** 2
    post = gpgrad.GP(K.RBF([0.5, 0.7]), noise=1e-4, backend="torch").condition(X, y)
    xs = torch.tensor(rng.uniform(-1, 1, (3, 2)), requires_grad=True)
    pred = post.value(xs)
    (dm,) = torch.autograd.grad(pred.mean.sum(), xs, retain_graph=True)
    assert torch.allclose(dm, post.gradient(xs.detach()).mean, rtol=1e-9, atol=1e-12)
    (dv,) = torch.autograd.grad(pred.var.sum(), xs)
    h = 1e-6
    with torch.no_grad():
        for i in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[i] = h
            fd = (post.value(xs + e).var - post.value(xs - e).var) / (2 * h)
            assert torch.allclose(dv[:, i], fd, rtol=1e-5, atol=1e-9)


def test_numpy_inputs_and_tensor_outputs():
    rng = np.random.default_rng(6)
    X = rng.uniform(-1, 1, (5, 3))
    post = gpgrad.GP(K.RBF(1.0), backend="torch").condition(X, X.sum(1))
    g = post.gradient(rng.uniform(-1, 1, (2, 3)))
    assert isinstance(g.mean, torch.Tensor) and g.mean.shape == (2, 3)
    assert isinstance(g.std, torch.Tensor)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_batched_autograd_stays_on_device():
    rng = np.random.default_rng(7)
    X = torch.tensor(rng.uniform(-1, 1, (4, 30, 3)), device="cuda")
    y = torch.sin(X).sum(-1)
    ls = torch.full((3,), 0.7, dtype=torch.float64, device="cuda", requires_grad=True)
    gp = gpgrad.GP(K.Matern52(ls), backend="torch", device="cuda")
    post = gp.condition(
        gpgrad.values(X, y), gpgrad.gradients(X[:, :5], torch.cos(X[:, :5]))
    )
    lml = post.log_marginal_likelihood().sum()
    lml.backward()
    assert ls.grad.device.type == "cuda" and torch.isfinite(ls.grad).all()
    g = post.gradient(X[0, :3])
    assert g.mean.device.type == "cuda"


def test_query_with_more_batch_axes_than_the_data():
    rng = np.random.default_rng(8)
    Xb = torch.tensor(rng.uniform(0, 1, (5, 10, 3)))
    yb = Xb.sin().sum(-1)
    gp = gpgrad.GP(
        K.Matern52(lengthscale=0.5), noise=1e-6, backend="torch", normalize_y=True
    )
    post = gp.condition(gpgrad.values(Xb, yb))
    Xs = torch.tensor(rng.uniform(0, 1, (7, 5, 2, 3)))
    full = post.value(Xs, full_cov=True)
    assert full.cov.shape == (7, 5, 2, 2)
    g = post.gradient(Xs)
    assert g.cov.shape == (7, 5, 2, 3, 3)
    one = gpgrad.GP(
        K.Matern52(lengthscale=0.5), noise=1e-6, backend="torch", normalize_y=True
    )
    p1 = one.condition(gpgrad.values(Xb[2], yb[2]))
    assert torch.allclose(
        full.cov[4, 2], p1.value(Xs[4, 2], full_cov=True).cov, rtol=1e-10
    )
    assert torch.allclose(g.cov[4, 2], p1.gradient(Xs[4, 2]).cov, rtol=1e-10)
