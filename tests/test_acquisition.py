"""Acquisition-ready moments and their closed-form gradients, against central
finite differences of the posterior, torch autograd, and scipy's normal
distribution, on both backends."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

import gpgrad
from gpgrad import acquisition as acq
from gpgrad import kernels as K


def _data(rng, n=8, d=2):
    X = rng.uniform(-1, 1, (n, d))
    y = np.sin(3 * X[:, 0]) * X[:, 1]
    G = np.stack([3 * np.cos(3 * X[:, 0]) * X[:, 1], np.sin(3 * X[:, 0])], axis=-1)
    return X, y, G


KERNELS = [
    ("RBF-ARD", K.RBF(lengthscale=[0.5, 0.7], variance=1.3)),
    ("Matern52", K.Matern52(lengthscale=0.8)),
    # not stationary: d/dx k(x, x) ≠ 0, the prior term of ∇v counts
    ("Linear+RBF", K.Linear(variance=0.5) + K.RBF(lengthscale=0.6)),
    ("Matern32*RQ", K.Matern32(lengthscale=1.1) * K.RationalQuadratic(0.9, alpha=2.0)),
]


def _fd(fun, Xs, h=1e-6):
    """Central differences of fun (m,) -> (m,) along each coordinate: (m, d)."""
    out = np.zeros(Xs.shape)
    for i in range(Xs.shape[-1]):
        e = np.zeros(Xs.shape[-1])
        e[i] = h
        out[:, i] = (fun(Xs + e) - fun(Xs - e)) / (2 * h)
    return out


@pytest.mark.parametrize("normalize_y", [False, True])
@pytest.mark.parametrize("name,kernel", KERNELS, ids=[k[0] for k in KERNELS])
def test_moments_and_gradients_match_finite_differences(name, kernel, normalize_y):
    rng = np.random.default_rng(3)
    X, y, G = _data(rng)
    gp = gpgrad.GP(kernel, noise=1e-4, normalize_y=normalize_y, mean=0.3)
    post = gp.condition(gpgrad.values(X, y), gpgrad.gradients(X[:4], G[:4]))
    Xs = rng.uniform(-1, 1, (6, 2))
    mom = acq.posterior_moments(post, Xs)
    pv = post.value(Xs)
    np.testing.assert_allclose(mom.mean, pv.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mom.var, pv.var, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(mom.std, np.sqrt(pv.var), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(
        mom.mean_grad, post.gradient(Xs).mean, rtol=1e-10, atol=1e-12
    )
    fd_mean = _fd(lambda Z: post.value(Z).mean, Xs)
    fd_var = _fd(lambda Z: post.value(Z).var, Xs)
    scale = max(1.0, np.abs(fd_mean).max())
    np.testing.assert_allclose(mom.mean_grad, fd_mean, atol=1e-7 * scale)
    np.testing.assert_allclose(mom.var_grad, fd_var, atol=1e-7)
    fd_std = _fd(lambda Z: np.sqrt(post.value(Z).var), Xs)
    np.testing.assert_allclose(mom.std_grad, fd_std, atol=1e-6)


def test_variance_gradient_is_twice_the_joint_cross_covariance():
    rng = np.random.default_rng(4)
    X, y, G = _data(rng)
    post = gpgrad.GP(K.Linear() + K.RBF(0.5), noise=1e-3).condition(gpgrad.values(X, y))
    Xs = rng.uniform(-1, 1, (3, 2))
    mom = acq.posterior_moments(post, Xs)
    joint = post.predict(gpgrad.values(Xs), gpgrad.gradients(Xs), full_cov=True)
    # entries: 3 values, then 3×2 gradient entries point-major
    cross = joint.cov[3:, :3].reshape(3, 2, 3)
    want = 2 * np.stack([cross[p, :, p] for p in range(3)])
    np.testing.assert_allclose(mom.var_grad, want, rtol=1e-10, atol=1e-13)


def test_torch_backend_matches_autograd_and_numpy():
    rng = np.random.default_rng(5)
    X, y, G = _data(rng)
    kern = K.Matern52(lengthscale=[0.6, 0.9], variance=1.5)
    obs = (gpgrad.values(X, y), gpgrad.gradients(X, G))
    post_np = gpgrad.GP(kern, noise=1e-5).condition(*obs)
    post_t = gpgrad.GP(kern, noise=1e-5, backend="torch").condition(*obs)
    Xs = rng.uniform(-1, 1, (5, 2))
    Xt = torch.tensor(Xs, requires_grad=True)
    mom = acq.posterior_moments(post_t, Xt)
    ref = acq.posterior_moments(post_np, Xs)
    assert isinstance(mom.var_grad, torch.Tensor)
    np.testing.assert_allclose(
        mom.mean_grad.detach().numpy(), ref.mean_grad, rtol=1e-10
    )
    np.testing.assert_allclose(mom.var_grad.detach().numpy(), ref.var_grad, atol=1e-12)
    # autograd of the posterior value's moments: each candidate only sees itself
    pv = post_t.value(Xt)
    (gm,) = torch.autograd.grad(pv.mean.sum(), Xt, retain_graph=True)
    (gv,) = torch.autograd.grad(pv.var.sum(), Xt)
    torch.testing.assert_close(mom.mean_grad, gm, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mom.var_grad, gv, rtol=1e-8, atol=1e-11)


def test_torch_batched_observations_match_loop():
    rng = np.random.default_rng(6)
    Xb = torch.tensor(rng.uniform(-1, 1, (2, 7, 2)))
    yb = torch.sin(2 * Xb[..., 0]) + Xb[..., 1] ** 2
    gp = gpgrad.GP(K.RBF(0.6), noise=1e-4, backend="torch")
    Xs = torch.tensor(rng.uniform(-1, 1, (2, 4, 2)))
    mom = acq.posterior_moments(gp.condition(Xb, yb), Xs)
    assert mom.var_grad.shape == (2, 4, 2)
    for b in range(2):
        one = acq.posterior_moments(gp.condition(Xb[b], yb[b]), Xs[b])
        torch.testing.assert_close(mom.mean[b], one.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            mom.var_grad[b], one.var_grad, rtol=1e-10, atol=1e-13
        )


def test_chunking_over_candidates_changes_nothing(monkeypatch):
    rng = np.random.default_rng(7)
    X, y, G = _data(rng)
    post = gpgrad.GP(K.RBF(0.5), noise=1e-4).condition(
        gpgrad.values(X, y), gpgrad.gradients(X, G)
    )
    Xs = rng.uniform(-1, 1, (11, 2))
    whole = acq.posterior_moments(post, Xs)
    monkeypatch.setattr(acq, "CHUNK_ELEMENTS", 2 * 24 * 3)  # two candidates a chunk
    parts = acq.posterior_moments(post, Xs)
    for a in ("mean", "var", "mean_grad", "var_grad"):
        np.testing.assert_allclose(
            getattr(parts, a), getattr(whole, a), rtol=1e-13, atol=1e-15
        )


@pytest.mark.parametrize("maximize", [True, False])
def test_expected_improvement_value_and_gradient(maximize):
    rng = np.random.default_rng(8)
    X, y, _ = _data(rng)
    post = gpgrad.GP(K.Matern52(0.7), noise=1e-4).condition(X, y)
    Xs = rng.uniform(-1, 1, (6, 2))
    best = float(y.max() if maximize else y.min())
    ei, grad = acq.expected_improvement(post, Xs, best, maximize=maximize)
    pv = post.value(Xs)
    sd = np.sqrt(pv.var)
    u = (pv.mean - best) if maximize else (best - pv.mean)
    want = u * norm.cdf(u / sd) + sd * norm.pdf(u / sd)
    np.testing.assert_allclose(ei, want, rtol=1e-10, atol=1e-14)
    fd = _fd(lambda Z: acq.expected_improvement(post, Z, best, maximize)[0], Xs)
    np.testing.assert_allclose(grad, fd, atol=1e-7)


def test_expected_improvement_without_uncertainty():
    # noise-free data: at a training input σ = 0 and EI = max(μ − f*, 0)
    rng = np.random.default_rng(9)
    X, y, _ = _data(rng)
    post = gpgrad.GP(K.RBF(0.5), noise=0.0).condition(X, y)
    mom = acq.posterior_moments(post, X[:2])
    np.testing.assert_allclose(mom.var, 0.0, atol=1e-9)
    ei, grad = acq.expected_improvement(post, X[:2], float(y.min()) - 1.0)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(ei, y[:2] - y.min() + 1.0, atol=1e-6)


def test_upper_confidence_bound_value_and_gradient():
    rng = np.random.default_rng(10)
    X, y, G = _data(rng)
    post = gpgrad.GP(K.RBF(0.6), noise=1e-4, backend="torch").condition(
        gpgrad.values(X, y), gpgrad.gradients(X, G)
    )
    Xs = torch.tensor(rng.uniform(-1, 1, (5, 2)), requires_grad=True)
    for maximize in (True, False):
        val, grad = acq.upper_confidence_bound(post, Xs, beta=3.0, maximize=maximize)
        pv = post.value(Xs)
        sign = 1.0 if maximize else -1.0
        want = sign * pv.mean + math.sqrt(3.0) * pv.var.sqrt()
        torch.testing.assert_close(val, want, rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad(want.sum(), Xs)
        torch.testing.assert_close(grad, g, rtol=1e-8, atol=1e-10)


def test_acquisition_rejects_bad_input():
    rng = np.random.default_rng(11)
    X, y, _ = _data(rng)
    post = gpgrad.GP(K.RBF(0.5)).condition(X, y)
    with pytest.raises(TypeError, match="expects a gpgrad Posterior.*got GP"):
        acq.posterior_moments(gpgrad.GP(K.RBF()), X)
    with pytest.raises(ValueError, match="query points have 3 columns.*have 2"):
        acq.posterior_moments(post, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="beta must be non-negative, got -1.0"):
        acq.upper_confidence_bound(post, X, beta=-1.0)
    with pytest.raises(TypeError, match="best_f must be a number, got str"):
        acq.expected_improvement(post, X, best_f="high")
    rough = gpgrad.GP(K.Matern12()).condition(X, y)
    with pytest.raises(ValueError, match="never mean-square differentiable"):
        acq.posterior_moments(rough, X)
