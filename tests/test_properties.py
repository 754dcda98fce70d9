"""Property-based tests (hypothesis): random kernels, dimensions, observation
mixes and points.

Each property is an identity of Gaussian conditioning or of calculus that the
implementation must satisfy whatever the inputs:

- joint covariances (prior and posterior) are symmetric and positive
  semi-definite;
- the posterior does not depend on the order of the observations;
- conditioning on A and then on B equals conditioning on A ∪ B at once;
- a directional derivative is the gradient dotted with the direction;
- central differences of the posterior mean are the posterior gradient mean
  (and of the gradient mean, the Hessian mean);
- a batch of problems equals the problems solved one by one (torch).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpgrad
from gpgrad import kernels as K
from gpgrad.covariance import as_blocks, covariance

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)

# name, order (mean-square differentiability, capped at 2 for the kinds used)
_BASES = ["RBF", "Matern52", "Matern32", "RQ", "Periodic", "Poly", "Linear"]
_ORDER = {"Matern32": 1, "Matern52": 2}


def _base(name, rng, d):
    ls = (
        rng.uniform(0.4, 1.5, d) if rng.random() < 0.5 else float(rng.uniform(0.4, 1.5))
    )
    var = float(rng.uniform(0.5, 2.0))
    if name == "RBF":
        return K.RBF(lengthscale=ls, variance=var)
    if name == "Matern52":
        return K.Matern52(lengthscale=ls, variance=var)
    if name == "Matern32":
        return K.Matern32(lengthscale=ls, variance=var)
    if name == "RQ":
        return K.RationalQuadratic(
            lengthscale=ls, variance=var, alpha=float(rng.uniform(0.5, 3))
        )
    if name == "Periodic":
        return K.Periodic(lengthscale=ls, variance=var, period=float(rng.uniform(1, 3)))
    if name == "Poly":
        return K.Polynomial(degree=int(rng.integers(1, 4)), variance=var, offset=0.5)
    return K.Linear(variance=var)


@st.composite
def kernels(draw, smooth=False):
    """A random kernel: a base kernel, or a sum, product or scaling of two."""
    bases = [b for b in _BASES if not smooth or b not in _ORDER]
    names = [draw(st.sampled_from(bases))]
    combo = draw(st.sampled_from(["one", "sum", "product", "scale"]))
    if combo in ("sum", "product"):
        names.append(draw(st.sampled_from(bases)))
    seed = draw(st.integers(0, 2**31 - 1))
    d = draw(st.integers(1, 3))
    rng = np.random.default_rng(seed)
    parts = [_base(n, rng, d) for n in names]
    if combo == "sum":
        k = parts[0] + parts[1]
    elif combo == "product":
        k = parts[0] * parts[1]
    elif combo == "scale":
        k = float(rng.uniform(0.5, 2.0)) * parts[0]
    else:
        k = parts[0]
    order = min([_ORDER.get(n, 2) for n in names])
    return k, d, order, rng


def _kinds(order):
    kinds = ["value"]
    if order >= 1:
        kinds += ["gradient", "partial", "directional"]
    if order >= 2:
        kinds += ["second", "hessian"]
    return kinds


def _functional(kind, X, rng, noise):
    """An observed functional of ``kind`` at X with random targets and noise."""
    n, d = X.shape
    if kind == "value":
        return gpgrad.values(X, rng.normal(size=n), noise)
    if kind == "gradient":
        return gpgrad.gradients(X, rng.normal(size=(n, d)), noise)
    if kind == "partial":
        return gpgrad.partials(X, rng.integers(0, d, n), rng.normal(size=n), noise)
    if kind == "directional":
        return gpgrad.directional(X, rng.normal(size=(n, d)), rng.normal(size=n), noise)
    if kind == "second":
        i, j = rng.integers(0, d, n), rng.integers(0, d, n)
        return gpgrad.second_partials(X, i, j, rng.normal(size=n), noise)
    H = rng.normal(size=(n, d, d))
    return gpgrad.hessians(X, H + H.swapaxes(-1, -2), noise)


@st.composite
def problems(draw, smooth=False, min_sets=1):
    """(kernel, d, order, observations, query points)."""
    k, d, order, rng = draw(kernels(smooth=smooth))
    n_sets = draw(st.integers(min_sets, 4))
    kinds = draw(
        st.lists(st.sampled_from(_kinds(order)), min_size=n_sets, max_size=n_sets)
    )
    obs = []
    for kind in kinds:
        n = draw(st.integers(1, 3))
        X = rng.uniform(-1, 1, (n, d))
        obs.append(_functional(kind, X, rng, float(rng.uniform(1e-3, 1e-1))))
    Xq = rng.uniform(-1, 1, (2, d))
    return k, d, order, obs, Xq


def _queries(order, Xq):
    qs = [gpgrad.values(Xq)]
    if order >= 1:
        qs.append(gpgrad.gradients(Xq))
    if order >= 2:
        qs.append(gpgrad.hessians(Xq))
    return qs


def _assert_close(a, b, scale=None, rtol=1e-7):
    scale = max(1.0, float(np.max(np.abs(b)))) if scale is None else scale
    err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol * scale:.3g}"


def _assert_psd(C, what):
    assert np.array_equal(C, C.T), f"{what} is not exactly symmetric"
    ev = np.linalg.eigvalsh(C)
    assert ev.min() >= -1e-9 * max(1.0, ev.max()), f"{what}: eigenvalue {ev.min():.3g}"


# --------------------------------------------------------------------------


@SETTINGS
@given(problems())
def test_joint_covariances_are_symmetric_psd(problem):
    k, d, order, obs, Xq = problem
    gp = gpgrad.GP(k)
    prior = covariance(k, as_blocks(obs, gp.xp, np.float64, None))
    _assert_psd(prior, "prior covariance of the observations")
    post = gp.condition(*obs)
    pred = post.predict(*_queries(order, Xq), *[f.query() for f in obs], full_cov=True)
    _assert_psd(pred.cov, "posterior joint covariance")
    # the variances are the diagonal of the joint covariance
    np.testing.assert_allclose(pred.var, np.diagonal(pred.cov), rtol=1e-12, atol=0)


@SETTINGS
@given(problems(min_sets=2), st.randoms(use_true_random=False))
def test_observation_order_does_not_matter(problem, rnd):
    k, d, order, obs, Xq = problem
    perm = list(obs)
    rnd.shuffle(perm)
    qs = _queries(order, Xq)
    a = gpgrad.GP(k).condition(*obs).predict(*qs, full_cov=True)
    b = gpgrad.GP(k).condition(*perm).predict(*qs, full_cov=True)
    _assert_close(b.mean, a.mean)
    _assert_close(b.cov, a.cov)
    la = gpgrad.GP(k).log_marginal_likelihood(*obs)
    lb = gpgrad.GP(k).log_marginal_likelihood(*perm)
    assert math.isclose(float(la), float(lb), rel_tol=1e-9, abs_tol=1e-9)


@SETTINGS
@given(problems(min_sets=2), st.integers(1, 3))
def test_two_step_conditioning_equals_at_once(problem, split):
    """Condition on A, then update by hand with B's joint posterior moments:

    .. math::

        μ_{Q|AB} = μ_{Q|A} + C_{QB} (C_{BB} + Σ_B)^{-1} (y_B - μ_{B|A}),\\quad
        C_{Q|AB} = C_{QQ} - C_{QB} (C_{BB} + Σ_B)^{-1} C_{BQ}

    with every ``μ`` and ``C`` taken from the posterior given A.
    """
    k, d, order, obs, Xq = problem
    split = min(split, len(obs) - 1)
    A, Bset = obs[:split], obs[split:]
    qs = _queries(order, Xq)
    both = gpgrad.GP(k).condition(*obs).predict(*qs, full_cov=True)

    postA = gpgrad.GP(k).condition(*A)
    joint = postA.predict(*[f.query() for f in Bset], *qs, full_cov=True)
    nB = sum(f.size for f in Bset)
    mB, mQ = joint.mean[:nB], joint.mean[nB:]
    CBB, CBQ, CQQ = joint.cov[:nB, :nB], joint.cov[:nB, nB:], joint.cov[nB:, nB:]
    yB = np.concatenate([f.flat_targets(f.y) for f in Bset])
    noiseB = np.concatenate([np.full(f.size, f.noise) for f in Bset])
    S = CBB + np.diag(noiseB)
    mean = mQ + CBQ.T @ np.linalg.solve(S, yB - mB)
    cov = CQQ - CBQ.T @ np.linalg.solve(S, CBQ)
    _assert_close(mean, both.mean, rtol=1e-6)
    _assert_close(cov, both.cov, scale=max(1.0, np.abs(CQQ).max()), rtol=1e-6)


@SETTINGS
@given(problems())
def test_directional_is_gradient_dot_direction(problem):
    k, d, order, obs, Xq = problem
    if order < 1:
        return
    post = gpgrad.GP(k).condition(*obs)
    U = np.random.default_rng(d).normal(size=Xq.shape)
    g = post.gradient(Xq)  # mean (m, d), cov (m, d, d) per point
    u = post.directional(Xq, U)
    _assert_close(u.mean, np.sum(g.mean * U, axis=-1))
    want_var = np.einsum("pi,pij,pj->p", U, g.cov, U)
    _assert_close(u.var, want_var, scale=max(1.0, float(np.abs(g.cov).max())))
    # and one partial per point is a directional derivative along a unit vector
    dims = np.arange(Xq.shape[0]) % d
    p = post.partial(Xq, dims)
    _assert_close(p.mean, g.mean[np.arange(Xq.shape[0]), dims])


@SETTINGS
@given(problems(smooth=True))
def test_finite_differences_of_the_posterior_mean(problem):
    """Central differences (h = 1e-5, error O(h²) + O(eps/h)) of the mean
    against the posterior gradient mean, and of the gradient mean against the
    Hessian mean; every kernel here is infinitely differentiable."""
    k, d, order, obs, Xq = problem
    post = gpgrad.GP(k).condition(*obs)
    h = 1e-5
    g = post.gradient(Xq).mean
    H = post.hessian(Xq).mean
    for i in range(d):
        e = np.zeros(d)
        e[i] = h
        fd = (post.value(Xq + e).mean - post.value(Xq - e).mean) / (2 * h)
        _assert_close(fd, g[:, i], scale=max(1.0, np.abs(g).max()), rtol=1e-5)
        fdg = (post.gradient(Xq + e).mean - post.gradient(Xq - e).mean) / (2 * h)
        _assert_close(fdg, H[:, :, i], scale=max(1.0, np.abs(H).max()), rtol=1e-5)


@settings(SETTINGS, max_examples=8)
@given(problems(), st.integers(2, 3))
def test_batched_equals_looped_torch(problem, nb):
    """A batch of problems (leading dims of X and y, one lengthscale per batch
    member) against each problem conditioned alone."""
    k, d, order, obs, Xq = problem
    rng = np.random.default_rng(nb)
    n = 3
    Xb = rng.uniform(-1, 1, (nb, n, d))
    yb = rng.normal(size=(nb, n))
    Gb = rng.normal(size=(nb, n, d))
    Xqb = rng.uniform(-1, 1, (nb, 2, d))
    ls = rng.uniform(0.5, 1.5, (nb, d))

    def kern(lengthscale):
        return K.RBF(lengthscale=lengthscale) + k

    def obs_of(X, y, G):
        out = [gpgrad.values(X, y)]
        if order >= 1:
            out.append(gpgrad.gradients(X, G, noise=1e-3))
        return out

    t = torch.tensor
    gp = gpgrad.GP(kern(t(ls)), noise=1e-4, backend="torch")
    post = gp.condition(*obs_of(t(Xb), t(yb), t(Gb)))
    qs = _queries(order, t(Xqb))
    got = post.predict(*qs, full_cov=True)
    lml = post.log_marginal_likelihood()
    assert tuple(got.mean.shape[:-1]) == (nb,)
    for b in range(nb):
        one = gpgrad.GP(kern(t(ls[b])), noise=1e-4, backend="torch")
        pb = one.condition(*obs_of(t(Xb[b]), t(yb[b]), t(Gb[b])))
        want = pb.predict(*_queries(order, t(Xqb[b])), full_cov=True)
        _assert_close(got.mean[b].numpy(), want.mean.numpy(), rtol=1e-9)
        _assert_close(got.cov[b].numpy(), want.cov.numpy(), rtol=1e-9)
        assert math.isclose(
            float(lml[b]), float(pb.log_marginal_likelihood()), rel_tol=1e-10
        )


def test_properties_detect_a_wrong_posterior():
    """The two-step identity is not vacuous: dropping B's noise breaks it."""
    rng = np.random.default_rng(0)
    k = K.RBF(lengthscale=0.7)
    A = [gpgrad.values(rng.uniform(-1, 1, (3, 1)), rng.normal(size=3), 1e-2)]
    Bset = [gpgrad.gradients(rng.uniform(-1, 1, (2, 1)), rng.normal(size=(2, 1)), 0.5)]
    Xq = np.array([[0.1], [0.4]])
    both = gpgrad.GP(k).condition(*A, *Bset).value(Xq).mean
    postA = gpgrad.GP(k).condition(*A)
    j = postA.predict(Bset[0].query(), gpgrad.values(Xq), full_cov=True)
    yB = Bset[0].y[:, 0]
    wrong = j.mean[2:] + j.cov[:2, 2:].T @ np.linalg.solve(
        j.cov[:2, :2], yB - j.mean[:2]
    )
    assert np.max(np.abs(wrong - both)) > 1e-3


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
