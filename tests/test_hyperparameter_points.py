"""Averaging a member over its hyperparameters' Laplace approximation
(gpgrad.auto.hyperparameter_points)."""

import math
import warnings

import numpy as np
import pytest
import torch

import gpgrad
from gpgrad import kernels as K
from gpgrad.auto import (
    LAPLACE_MAX_SD,
    _lml_hessian,
    _log_coordinates,
    hyperparameter_points,
)
from gpgrad.functionals import values


def _data(n=30, noise=0.05, seed=0):
    x = np.linspace(0, 1, n)
    rng = np.random.default_rng(seed)
    return x, np.sin(5 * x) + noise * rng.normal(size=n)


def _fit(kernel, x, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        return gpgrad.fit(gpgrad.GP(kernel), x[:, None], y, restarts=1, **kw)


def _log_theta(post, names):
    """log θ of a conditioned point, in ``names`` order."""
    params = post.kernel.parameters()
    out = []
    for n in names:
        v = post.gp.noise_for("value") if n == "noise.value" else params[n]
        out.append(np.log(np.asarray(v, float)).ravel())
    return np.concatenate(out)


def test_lml_hessian_matches_autodiff_of_an_independent_likelihood():
    x, y = _data()
    res = _fit(K.RBF(), x, y)
    names, shapes, theta = _log_coordinates(res)
    assert names == ["variance", "lengthscale", "noise.value"]
    H = _lml_hessian(res, names, shapes, theta, [values(x[:, None], y)], 1e-2)

    X = torch.tensor(x, dtype=torch.float64)
    r = torch.tensor(y - res.params["mean"], dtype=torch.float64)

    def lml(t):  # log p(y) of k = σ² exp(−(x − x')²/2ℓ²) + noise, by hand
        s2, ell, nz = torch.exp(t)
        C = s2 * torch.exp(-0.5 * (X[:, None] - X[None, :]) ** 2 / ell**2)
        C = C + nz * torch.eye(len(x), dtype=torch.float64)
        L = torch.linalg.cholesky(C)
        a = torch.cholesky_solve(r[:, None], L)[:, 0]
        return -0.5 * r @ a - torch.log(torch.diagonal(L)).sum()

    want = torch.func.jacrev(torch.func.jacrev(lml))(torch.tensor(theta)).numpy()
    # central differences: error O(h²) of the fourth derivatives
    np.testing.assert_allclose(H, want, atol=1e-3 * np.abs(want).max())
    assert np.all(np.linalg.eigvalsh(-want) > 0)  # a maximum


def test_points_are_the_cubature_of_the_capped_laplace_gaussian():
    x, y = _data(n=25, noise=0.1, seed=1)
    res = _fit(K.RationalQuadratic(), x, y)
    obs = [values(x[:, None], y)]
    names, shapes, theta = _log_coordinates(res)
    pts, w, log_sd = hyperparameter_points(res, obs)
    p = theta.size
    # the Gaussian: precision −H, each eigen-direction's sd capped
    H = _lml_hessian(res, names, shapes, theta, obs, gpgrad.auto.HESSIAN_STEP)
    lam, V = np.linalg.eigh(-0.5 * (H + H.T))
    lam = np.maximum(lam, LAPLACE_MAX_SD**-2)
    cov = (V / lam) @ V.T
    cubature, mode = pts[: 2 * p], pts[2 * p :]
    T = np.array([_log_theta(q, names) for q in cubature])
    lo, hi = np.log([res.bounds[n] for n in names]).T
    # no point was clipped to a bound, so the moments are exact
    assert np.all((T > lo + 1e-9) & (T < hi - 1e-9))
    # with equal weights the 2p points match the first two moments of
    # N(log θ̂, cov)
    np.testing.assert_allclose(T.mean(axis=0), theta, atol=1e-10)
    D = T - theta
    np.testing.assert_allclose(D.T @ D / (2 * p), cov, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(
        [log_sd[n] for n in names], np.sqrt(np.diag(cov)), rtol=1e-10
    )
    assert max(log_sd.values()) <= LAPLACE_MAX_SD + 1e-12
    # each weight is 1/2p, less where the likelihood at the point falls below
    # the Gaussian's prediction; the mode keeps the rest
    lml0 = res.posterior.log_marginal_likelihood()
    precision = (V * lam) @ V.T
    gap = np.array(
        [
            q.log_marginal_likelihood() - (lml0 - 0.5 * d @ precision @ d)
            for q, d in zip(cubature, D)
        ]
    )
    np.testing.assert_allclose(w[: 2 * p], np.exp(np.minimum(gap, 0)) / (2 * p))
    assert len(mode) == 1 and mode[0] is res.posterior
    assert w[-1] == pytest.approx(1 - w[: 2 * p].sum()) and w[-1] >= 0
    assert np.sum(w) == pytest.approx(1.0, abs=1e-12)
    # every point is the member conditioned on all observations
    assert all(q.num_observations == 25 for q in pts)


def test_a_narrow_peak_gets_a_finer_difference_step():
    # 12 periods of a sinusoid pin the period down to ~1e-3 in log: a step
    # of 1e-2 would straddle the peak and read a far smaller curvature
    x = np.linspace(0, 12, 200)
    y = np.sin(2 * np.pi * x) + 0.01 * np.random.default_rng(5).normal(size=200)
    res = _fit(K.Periodic(period=1.0), x, y, bounds={"period": (0.9, 1.1)})
    obs = [values(x[:, None], y)]
    names, shapes, theta = _log_coordinates(res)
    k = names.index("period")
    H = _lml_hessian(res, names, shapes, theta, obs, 1e-2)

    def along(h):  # the period's curvature at step h, by hand
        vals = []
        for s in (-h, 0.0, h):
            t = theta.copy()
            t[k] += s
            gp = gpgrad.auto._model_at(res, names, shapes, t)
            vals.append(float(gp.log_marginal_likelihood(*obs)))
        return (vals[0] - 2 * vals[1] + vals[2]) / h**2

    sd = 1 / math.sqrt(-H[k, k])
    assert sd < 2e-3
    # converged: agrees with a step ten times finer still
    assert H[k, k] == pytest.approx(along(sd / 50), rel=1e-3)
    assert along(1e-2) > 2 * H[k, k]  # the coarse step's reading is too flat


def test_a_hyperparameter_on_a_bound_keeps_its_fitted_value():
    x = np.linspace(0, 1, 20)
    y = np.sin(4 * x)  # noise-free: the noise ends on its lower bound
    res = _fit(K.Matern52(), x, y)
    assert "noise.value" in res.on_bound
    pts, w, log_sd = hyperparameter_points(res, [values(x[:, None], y)])
    assert "noise.value" not in log_sd and set(log_sd) == {"variance", "lengthscale"}
    assert len(pts) in (4, 5)  # 2p points, and the mode where they lost weight
    for q in pts:
        assert q.gp.noise_for("value") == pytest.approx(res.params["noise.value"])


def test_nothing_to_marginalize_returns_the_mode():
    x, y = _data(n=15)
    res = _fit(K.RBF(), x, y, fixed={"variance": 1.0, "lengthscale": 0.3})
    res.on_bound = ["noise.value"]  # the one fitted scale: excluded
    pts, w, log_sd = hyperparameter_points(res, [values(x[:, None], y)])
    assert pts == [res.posterior] and list(w) == [1.0] and log_sd == {}


def test_marginalized_bands_are_wider_where_the_data_are_few():
    # 8 noisy samples pin the lengthscale down loosely: averaging over it
    # widens the derivative band over the plug-in band
    x, y = _data(n=8, noise=0.1, seed=3)
    cands = {"RBF": K.RBF()}
    kw = dict(candidates=cands, restarts=1)
    plug = gpgrad.fit_auto(x[:, None], y, marginalize=False, **kw)
    avg = gpgrad.fit_auto(x[:, None], y, **kw)
    Xs = np.linspace(0, 1, 21)[:, None]
    np.testing.assert_allclose(
        avg.best.posterior.gradient(Xs).mean, plug.best.posterior.gradient(Xs).mean
    )
    assert avg.best.log_sd["lengthscale"] > 0.1
    ratio = np.mean(avg.gradient(Xs).std) / np.mean(plug.gradient(Xs).std)
    assert ratio > 1.05, ratio
    with pytest.raises(TypeError, match="marginalize must be True or False"):
        gpgrad.fit_auto(x[:, None], y, marginalize="yes", **kw)
    assert math.isfinite(avg.log_evidence)


def test_torch_members_are_marginalized_like_numpy_ones():
    x, y = _data(n=12, noise=0.05, seed=4)
    kw = dict(candidates={"RBF": K.RBF()}, restarts=1)
    a = gpgrad.fit_auto(x[:, None], y, **kw)
    t = gpgrad.fit_auto(x[:, None], y, backend="torch", **kw)
    assert len(t.best.points) == len(a.best.points) >= 6
    np.testing.assert_allclose(t.best.point_weights, a.best.point_weights, rtol=1e-3)
    Xs = x[:4, None]
    gt, ga = t.gradient(Xs), a.gradient(Xs)
    assert isinstance(gt.mean, torch.Tensor)
    np.testing.assert_allclose(gt.std.numpy(), ga.std, rtol=1e-3)
    np.testing.assert_allclose(gt.mean.numpy(), ga.mean, rtol=1e-3, atol=1e-6)


def test_above_the_size_limit_points_bring_their_means_and_the_mode_its_variance(
    monkeypatch,
):
    x, y = _data(n=12, noise=0.05, seed=6)
    kw = dict(candidates={"RBF": K.RBF()}, restarts=1)
    monkeypatch.setattr(gpgrad.auto, "MARGINALIZE_VARIANCE_MAX", 11)
    avg = gpgrad.fit_auto(x[:, None], y, **kw)
    m = avg.best
    assert not m.point_variances and len(m.points) >= 6
    Xs = x[:5, None]
    g = avg.gradient(Xs)
    means = np.array([p.gradient(Xs).mean for p in m.points])
    u = m.point_weights[:, None, None]
    mean = np.sum(u * means, axis=0)
    mode_var = m.posterior.gradient(Xs).var
    np.testing.assert_allclose(g.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(
        g.var, mode_var + np.sum(u * (means - mean) ** 2, axis=0), rtol=1e-12
    )
    # at or below the limit every point brings its own variance
    monkeypatch.setattr(gpgrad.auto, "MARGINALIZE_VARIANCE_MAX", 12)
    assert gpgrad.fit_auto(x[:, None], y, **kw).best.point_variances
    # and on the state-space solver at any size (its variances cost O(N))
    monkeypatch.setattr(gpgrad.auto, "MARGINALIZE_VARIANCE_MAX", 11)
    ss = gpgrad.fit_auto(
        x[:, None], y, candidates={"M52": K.Matern52()}, method="statespace"
    )
    assert ss.best.posterior.method == "statespace" and ss.best.point_variances


def test_member_evidence_is_the_laplace_integral_over_its_prior():
    # two fitted hyperparameters (variance, lengthscale): the member's log
    # evidence against ∫ p(y | θ) N(log θ; log θ̂, S²) d log θ by quadrature
    # on a grid, with an RBF likelihood written out independently
    x = np.linspace(0, 1, 40)
    y = np.sin(5 * x) + 0.05 * np.random.default_rng(0).normal(size=40)
    nz = 0.05**2
    cand = gpgrad.auto.Candidate("RBF", K.RBF(), fixed={"noise.value": nz, "mean": 0.0})
    avg = gpgrad.fit_auto(x[:, None], y, candidates=[cand], marginalize=False)
    m = avg.members[0]
    names, _, theta = _log_coordinates(m.fit)
    assert names == ["variance", "lengthscale"]
    # the prior's sd: EVIDENCE_PRIOR_SD, or a uniform over the (log) bounds
    # when that is narrower (not here: both bounds are wide)
    s = gpgrad.auto.EVIDENCE_PRIOR_SD
    assert all(np.log(b / a) / math.sqrt(2 * math.pi) > s for a, b in
               (m.fit.bounds[n] for n in names))  # fmt: skip

    def lml(t):  # log p(y | exp(t)) on a batch of points t (..., 2)
        s2, ell = np.exp(t[..., 0]), np.exp(t[..., 1])
        d2 = (x[:, None] - x[None, :]) ** 2
        C = s2[..., None, None] * np.exp(-0.5 * d2 / ell[..., None, None] ** 2)
        C = C + nz * np.eye(x.size)
        L = np.linalg.cholesky(C)
        a = np.linalg.solve(L, np.broadcast_to(y, C.shape[:-1])[..., None])[..., 0]
        return (
            -0.5 * np.sum(a**2, -1)
            - np.log(np.diagonal(L, axis1=-2, axis2=-1)).sum(-1)
            - 0.5 * x.size * math.log(2 * math.pi)
        )

    assert lml(theta) == pytest.approx(m.log_marginal_likelihood, abs=1e-8)
    # a grid over ±8 posterior sds of each coordinate
    sd = np.sqrt(np.diag(np.linalg.inv(-m.hessian)))
    g = [np.linspace(t - 8 * v, t + 8 * v, 81) for t, v in zip(theta, sd)]
    T = np.stack(np.meshgrid(*g, indexing="ij"), axis=-1)
    log_prior = np.sum(-0.5 * ((T - theta) / s) ** 2, -1) - math.log(2 * math.pi * s**2)
    f = lml(T) + log_prior
    top = f.max()
    integral = np.trapezoid(np.trapezoid(np.exp(f - top), g[1], axis=1), g[0])
    want = top + math.log(integral)
    # the Laplace approximation's own error on 40 points: hundredths of a nat
    assert m.log_evidence == pytest.approx(want, abs=0.05)
