"""The posterior over values and derivatives, checked independently: finite
differences of the posterior mean and covariance, closed-form 1-D cases,
reference covariances built from tests/reference.py, and internal
consistency between query kinds."""

import math

import numpy as np
import pytest
from reference import cases, functional_mix, reference_covariance
from scipy.stats import multivariate_normal

import gpgrad
from gpgrad import kernels as K

SMOOTH_KERNELS = [
    K.RBF(lengthscale=[0.6, 0.9], variance=1.3),
    K.Matern52(lengthscale=[0.7, 0.5]),
    K.RationalQuadratic(lengthscale=0.8, alpha=1.5),
    K.Periodic(lengthscale=1.0, period=2.5) * K.RBF(lengthscale=1.5),
]


def _data(rng, n=12, d=2):
    X = rng.uniform(-1, 1, (n, d))
    y = np.sin(2 * X[:, 0]) + X[:, 1] ** 2
    G = np.stack([2 * np.cos(2 * X[:, 0]), 2 * X[:, 1]], axis=1)
    return X, y, G


def _mixed_posterior(kernel, rng, noise=1e-6):
    X, y, G = _data(rng)
    obs = [
        gpgrad.values(X[:8], y[:8]),
        gpgrad.gradients(X[8:], G[8:], noise=1e-4),
        gpgrad.partials(X[:3], [0, 1, 0], G[[0, 1, 2], [0, 1, 0]], noise=1e-5),
        gpgrad.directional(X[3:5], [[1.0, 2.0], [0.5, -1.0]], [0.1, -0.2]),
    ]
    if kernel.order >= 2:
        obs.append(gpgrad.second_partials(X[5:7], 0, 0, [-0.4, -0.3], noise=1e-3))
        obs.append(gpgrad.hessians(X[7:8], np.array([[[-0.5, 0.0], [0.0, 2.0]]])))
    return gpgrad.GP(kernel, noise=noise).condition(*obs)


@pytest.mark.parametrize("kernel", SMOOTH_KERNELS, ids=lambda k: type(k).__name__)
def test_gradient_mean_is_derivative_of_mean(kernel):
    post = _mixed_posterior(kernel, np.random.default_rng(0))
    Xs = np.random.default_rng(1).uniform(-1, 1, (4, 2))
    h = 1e-5
    fd = np.stack(
        [
            (post.value(Xs + h * e).mean - post.value(Xs - h * e).mean) / (2 * h)
            for e in np.eye(2)
        ],
        axis=1,
    )
    g = post.gradient(Xs).mean
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", SMOOTH_KERNELS, ids=lambda k: type(k).__name__)
def test_hessian_mean_is_derivative_of_gradient_mean(kernel):
    post = _mixed_posterior(kernel, np.random.default_rng(2))
    Xs = np.random.default_rng(3).uniform(-1, 1, (3, 2))
    h = 1e-5
    fd = np.stack(
        [
            (post.gradient(Xs + h * e).mean - post.gradient(Xs - h * e).mean) / (2 * h)
            for e in np.eye(2)
        ],
        axis=2,
    )
    H = post.hessian(Xs).mean
    np.testing.assert_allclose(H, fd, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(H, H.swapaxes(-1, -2))


@pytest.mark.parametrize("kernel", SMOOTH_KERNELS[:3], ids=lambda k: type(k).__name__)
def test_gradient_covariance_is_cross_difference_of_value_covariance(kernel):
    post = _mixed_posterior(kernel, np.random.default_rng(4), noise=1e-4)
    x = np.array([[0.3, -0.2]])
    xp = np.array([[-0.4, 0.5]])
    h = 1e-4
    E = np.eye(2)
    fd = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            pts = np.concatenate(
                [x + h * E[i], x - h * E[i], xp + h * E[j], xp - h * E[j]]
            )
            C = post.value(pts, full_cov=True).cov
            fd[i, j] = (C[0, 2] - C[0, 3] - C[1, 2] + C[1, 3]) / (4 * h * h)
    joint = post.gradient(np.concatenate([x, xp]), full_cov=True).cov
    np.testing.assert_allclose(joint[0, :, 1, :], fd, rtol=1e-5, atol=1e-6)


def test_closed_form_one_dimensional_rbf():
    # one value observation y0 at x0 and one derivative observation g at x1
    ell, var, nv, ng = 0.7, 1.8, 0.01, 0.02
    x0, y0, x1, g = 0.1, 0.8, 0.9, -1.2
    post = gpgrad.GP(K.RBF(lengthscale=ell, variance=var)).condition(
        gpgrad.values([[x0]], [y0], noise=nv),
        gpgrad.gradients([[x1]], [[g]], noise=ng),
    )

    def k(a, b):
        return var * math.exp(-((a - b) ** 2) / (2 * ell**2))

    def k_d2(a, b):  # cov(f(a), f'(b)) = ∂k/∂b
        return (a - b) / ell**2 * k(a, b)

    def k_d1d2(a, b):  # cov(f'(a), f'(b))
        return (1 / ell**2 - (a - b) ** 2 / ell**4) * k(a, b)

    Kobs = np.array([[k(x0, x0) + nv, k_d2(x0, x1)], [k_d2(x0, x1), var / ell**2 + ng]])
    yobs = np.array([y0, g])
    x = -0.35
    kv = np.array([k(x, x0), k_d2(x, x1)])  # cov(f(x), obs)
    kd = np.array([k_d2(x0, x), k_d1d2(x, x1)])  # cov(f'(x), obs)
    w = np.linalg.solve(Kobs, yobs)
    assert post.value([[x]]).mean[0] == pytest.approx(kv @ w, rel=1e-12)
    assert post.gradient([[x]]).mean[0, 0] == pytest.approx(kd @ w, rel=1e-12)
    var_d = var / ell**2 - kd @ np.linalg.solve(Kobs, kd)
    assert post.gradient([[x]]).var[0, 0] == pytest.approx(var_d, rel=1e-12)
    cov_vd = -0.0 - kv @ np.linalg.solve(Kobs, kd)  # prior cov(f(x), f'(x)) = 0
    joint = post.predict(gpgrad.values([[x]]), gpgrad.gradients([[x]]), full_cov=True)
    assert joint.cov[0, 1] == pytest.approx(cov_vd, rel=1e-12)


@pytest.mark.parametrize(
    "name,kernel,fref,smooth", cases(2), ids=[c[0] for c in cases(2)]
)
def test_log_marginal_likelihood_matches_reference(name, kernel, fref, smooth):
    rng = np.random.default_rng(5)
    X = rng.uniform(-1, 1, (4, 2))
    F = functional_mix(X, int(min(kernel.order, 2)), rng)
    Kref = reference_covariance(fref, F, F, mp_mode=not smooth)
    noise = 0.05
    y = rng.normal(size=Kref.shape[0])
    obs, start = [], 0
    for f in F:
        seg = y[start : start + f.size]
        start += f.size
        shape = f.target_shape()
        if f.kind == "hessian":
            H = np.zeros(shape)
            t = 0
            for i in range(2):
                for j in range(i, 2):
                    H[:, i, j] = H[:, j, i] = seg.reshape(f.n, 3)[:, t]
                    t += 1
            target = H
        else:
            target = seg.reshape(shape)
        obs.append(type(f).__new__(type(f)))
        obs[-1].__dict__.update(f.__dict__)
        obs[-1].y = target
        obs[-1].noise = None
    lml = gpgrad.GP(kernel, noise=noise).log_marginal_likelihood(*obs)
    want = multivariate_normal(np.zeros(len(y)), Kref + noise * np.eye(len(y))).logpdf(
        y
    )
    assert lml == pytest.approx(want, rel=1e-9)


def test_query_kinds_are_consistent():
    post = _mixed_posterior(
        K.Matern52(lengthscale=[0.7, 0.5]), np.random.default_rng(6)
    )
    Xs = np.random.default_rng(7).uniform(-1, 1, (5, 2))
    U = np.random.default_rng(8).normal(size=(5, 2))
    g = post.gradient(Xs)
    np.testing.assert_allclose(
        post.directional(Xs, U).mean, (g.mean * U).sum(1), rtol=1e-12, atol=1e-14
    )
    dvar = np.einsum("mi,mij,mj->m", U, g.cov, U)
    np.testing.assert_allclose(post.directional(Xs, U).var, dvar, rtol=1e-9, atol=1e-14)
    dims = np.array([0, 1, 1, 0, 1])
    p = post.partial(Xs, dims)
    np.testing.assert_allclose(p.mean, g.mean[np.arange(5), dims], rtol=1e-12)
    np.testing.assert_allclose(p.var, g.var[np.arange(5), dims], rtol=1e-12)
    H = post.hessian(Xs)
    s = post.second_partial(Xs, 1, 0)
    np.testing.assert_allclose(s.mean, H.mean[:, 1, 0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s.var, H.var[:, 0, 1], rtol=1e-12, atol=1e-14)
    # per-point blocks are the diagonal blocks of the joint covariance
    full = post.gradient(Xs, full_cov=True).cov
    for p_ in range(5):
        np.testing.assert_allclose(
            full[p_, :, p_, :], g.cov[p_], rtol=1e-10, atol=1e-13
        )
    Hf = post.hessian(Xs, full_cov=True).cov
    np.testing.assert_allclose(Hf[2, :, :, 2, :, :], H.cov[2], rtol=1e-10, atol=1e-13)
    assert H.cov.shape == (5, 2, 2, 2, 2)
    np.testing.assert_allclose(np.einsum("mijij->mij", H.cov), H.var, rtol=1e-12)


def test_joint_covariance_symmetric_psd_over_every_kind():
    for kernel in SMOOTH_KERNELS:
        post = _mixed_posterior(kernel, np.random.default_rng(9))
        Xs = np.random.default_rng(10).uniform(-1, 1, (3, 2))
        qs = functional_mix(Xs, 2, np.random.default_rng(11))
        pred = post.predict(*qs, full_cov=True)
        C = pred.cov
        np.testing.assert_array_equal(C, C.T)
        ev = np.linalg.eigvalsh(C)
        assert ev.min() >= -1e-10 * ev.max()
        np.testing.assert_allclose(np.diag(C), pred.var, rtol=1e-12, atol=1e-15)
        marg = post.predict(*qs)
        np.testing.assert_allclose(marg.mean, pred.mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(marg.var, pred.var, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "kernel", [K.Matern32(0.5), K.Matern52([0.4, 0.9]), K.Matern12(0.3)]
)
def test_prediction_at_training_inputs_is_finite_and_interpolates(kernel):
    rng = np.random.default_rng(12)
    X, y, G = _data(rng, n=6)
    obs = [gpgrad.values(X, y)]
    if kernel.order >= 1:
        obs.append(gpgrad.gradients(X[:3], G[:3]))
    post = gpgrad.GP(kernel, noise=1e-10).condition(*obs)
    v = post.value(X)
    assert np.all(np.isfinite(v.mean)) and np.all(np.isfinite(v.var))
    np.testing.assert_allclose(v.mean, y, atol=1e-6)
    assert np.all(v.var < 1e-6)
    if kernel.order >= 1:
        g = post.gradient(X[:3], full_cov=True)
        assert np.all(np.isfinite(g.cov))
        np.testing.assert_allclose(g.mean, G[:3], atol=1e-5)
    if kernel.order >= 2:
        h = post.hessian(X, full_cov=True)
        assert np.all(np.isfinite(h.mean)) and np.all(np.isfinite(h.cov))


def test_normalize_y_equals_rescaled_model():
    rng = np.random.default_rng(13)
    X, y, G = _data(rng)
    y = 50.0 + 20.0 * y
    G = 20.0 * G
    obs = [
        gpgrad.values(X[:9], y[:9], noise=0.3),
        gpgrad.gradients(X[9:], G[9:], noise=0.5),
    ]
    k = K.Matern52(lengthscale=[0.6, 0.8], variance=1.4)
    pn = gpgrad.GP(k, normalize_y=True).condition(*obs)
    mu, sd = y[:9].mean(), y[:9].std()
    k2 = K.Matern52(lengthscale=[0.6, 0.8], variance=1.4 * sd**2)
    pr = gpgrad.GP(k2, mean=mu).condition(*obs)
    Xs = rng.uniform(-1, 1, (4, 2))
    for a, b in [(pn.value(Xs), pr.value(Xs)), (pn.gradient(Xs), pr.gradient(Xs))]:
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-9)
        np.testing.assert_allclose(a.var, b.var, rtol=1e-8)
    assert pn.log_marginal_likelihood() == pytest.approx(
        pr.log_marginal_likelihood(), rel=1e-10
    )


def test_constant_mean_shifts_values_not_derivatives():
    rng = np.random.default_rng(14)
    X, y, G = _data(rng)
    k = K.RBF(lengthscale=0.6)
    p0 = gpgrad.GP(k).condition(gpgrad.values(X, y), gpgrad.gradients(X[:4], G[:4]))
    pc = gpgrad.GP(k, mean=3.0).condition(
        gpgrad.values(X, y + 3.0), gpgrad.gradients(X[:4], G[:4])
    )
    Xs = rng.uniform(-1, 1, (3, 2))
    np.testing.assert_allclose(pc.value(Xs).mean, p0.value(Xs).mean + 3.0, rtol=1e-10)
    np.testing.assert_allclose(pc.gradient(Xs).mean, p0.gradient(Xs).mean, rtol=1e-10)


def test_samples_have_posterior_moments():
    post = _mixed_posterior(K.RBF(lengthscale=[0.6, 0.9]), np.random.default_rng(15))
    Xs = np.random.default_rng(16).uniform(-1, 1, (2, 2))
    S = post.sample(gpgrad.gradients(Xs), n_samples=20000, seed=0)
    assert S.shape == (20000, 2, 2)
    g = post.gradient(Xs, full_cov=True)
    emp_mean = S.mean(0)
    sd = np.sqrt(g.var)
    assert np.all(np.abs(emp_mean - g.mean) < 5 * sd / math.sqrt(20000))
    emp_cov = np.cov(S.reshape(20000, 4).T)
    np.testing.assert_allclose(emp_cov, g.cov.reshape(4, 4), atol=0.05 * sd.max() ** 2)
    H = post.sample(gpgrad.hessians(Xs), n_samples=3, seed=1)
    assert H.shape == (3, 2, 2, 2)
    np.testing.assert_array_equal(H, H.swapaxes(-1, -2))
    v = post.sample(Xs, n_samples=2, seed=3)
    assert v.shape == (2, 2)
    np.testing.assert_array_equal(v, post.sample(Xs, n_samples=2, seed=3))
    joint = post.sample(gpgrad.values(Xs), gpgrad.gradients(Xs), n_samples=5, seed=2)
    assert joint.shape == (5, 6)


def test_numpy_batches_equal_loop():
    rng = np.random.default_rng(17)
    X = rng.uniform(-1, 1, (3, 7, 2))
    y = np.sin(X).sum(-1)
    G = np.cos(X)
    k = K.Matern52(lengthscale=[0.5, 0.8])
    pb = gpgrad.GP(k).condition(gpgrad.values(X, y), gpgrad.gradients(X, G, noise=1e-4))
    Xs = rng.uniform(-1, 1, (4, 2))
    gb = pb.gradient(Xs, full_cov=True)
    lb = pb.log_marginal_likelihood()
    for b in range(3):
        p = gpgrad.GP(k).condition(
            gpgrad.values(X[b], y[b]), gpgrad.gradients(X[b], G[b], noise=1e-4)
        )
        g = p.gradient(Xs, full_cov=True)
        np.testing.assert_allclose(gb.mean[b], g.mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gb.cov[b], g.cov, rtol=1e-9, atol=1e-12)
        assert lb[b] == pytest.approx(p.log_marginal_likelihood(), rel=1e-10)


def test_more_data_never_increases_gradient_variance():
    rng = np.random.default_rng(18)
    X, y, G = _data(rng)
    k = K.RBF(lengthscale=0.5)
    Xs = rng.uniform(-1, 1, (6, 2))
    p1 = gpgrad.GP(k, noise=1e-4).condition(X, y)
    p2 = gpgrad.GP(k, noise=1e-4).condition(
        gpgrad.values(X, y), gpgrad.gradients(X, G, noise=1e-2)
    )
    assert np.all(p2.gradient(Xs).var <= p1.gradient(Xs).var + 1e-12)


def test_posterior_condition_adds_observations():
    rng = np.random.default_rng(19)
    X, y, G = _data(rng)
    gp = gpgrad.GP(K.RBF(lengthscale=0.6), noise=1e-5)
    two_step = gp.condition(X[:6], y[:6]).condition(gpgrad.gradients(X[6:], G[6:]))
    at_once = gp.condition(gpgrad.values(X[:6], y[:6]), gpgrad.gradients(X[6:], G[6:]))
    Xs = rng.uniform(-1, 1, (3, 2))
    np.testing.assert_allclose(
        two_step.gradient(Xs).mean, at_once.gradient(Xs).mean, rtol=1e-12
    )
    with pytest.raises(ValueError, match="query has targets"):
        at_once.predict(gpgrad.values(Xs, np.zeros(3)))
    with pytest.raises(TypeError, match="full_cov must be True or False"):
        at_once.value(Xs, full_cov="yes")
    with pytest.raises(TypeError, match="seed must be an int"):
        at_once.sample(Xs, seed="a")
