"""Ill-conditioning, the jitter policy and the float32 envelope.

Each test builds a system that is hard in one known way (duplicated points,
tiny noise, extreme lengthscales, many dimensions, single precision) and checks
that the result is finite, close to an independent reference (a closed form,
the deduplicated problem, or a 40-digit mpmath solve), and that the trouble
was announced (:class:`gpgrad.JitterWarning`, a float32 warning) or refused
with :class:`gpgrad.NotPositiveDefiniteError` naming the remedy.
"""

import warnings

import mpmath
import numpy as np
import pytest
import torch

import gpgrad
from gpgrad import kernels as K
from gpgrad.covariance import as_blocks, covariance
from gpgrad.solvers.dense import cholesky

X8 = np.linspace(-1, 1, 8)[:, None]
XS = np.linspace(-1.2, 1.2, 13)[:, None]


def _sin_obs(X, w=3.0):
    """Values and gradients of sin(w x) at X (n, 1)."""
    return [
        gpgrad.values(X, np.sin(w * X[:, 0])),
        gpgrad.gradients(X, w * np.cos(w * X)),
    ]


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        return fn(*args)


def _all_finite(*arrays):
    return all(np.all(np.isfinite(np.asarray(a))) for a in arrays)


# --------------------------------------------------------------------------
# duplicated and near-duplicated inputs


@pytest.mark.parametrize("gap,atol", [(0.0, 1e-12), (1e-12, 1e-9), (1e-9, 1e-3)])
def test_duplicated_points_jitter_warns_and_matches_the_deduplicated_posterior(
    gap, atol
):
    """Copies of 5 points at distance ``gap``, noise 0. Exact duplicates add
    nothing, so the posterior must equal the deduplicated one; a pair 1e-9
    apart also carries a finite-difference slope (exact at gap ≥ 1e-7, where
    no jitter is needed), which the jitter partly erases: the posterior moves by ~3e-4 of its
    scale."""
    k = K.RBF(lengthscale=0.3)
    X = np.linspace(-1, 1, 5)[:, None]
    Xd = np.vstack([X, X + gap])
    with pytest.warns(gpgrad.JitterWarning, match="remove duplicated or near-dup"):
        post = gpgrad.GP(k, noise=0.0).condition(Xd, np.sin(3 * Xd[:, 0]))
    assert post.jitter > 0
    ref = gpgrad.GP(k, noise=0.0).condition(X, np.sin(3 * X[:, 0]))
    for name in ("value", "gradient"):
        a, b = getattr(post, name)(XS), getattr(ref, name)(XS)
        assert _all_finite(a.mean, a.var)
        # tolerances relative to the largest reference entry (gradient
        # variances reach σ²/ℓ² ≈ 11 here)
        for got, want in ((a.mean, b.mean), (a.var, b.var)):
            scale = max(1.0, np.abs(want).max())
            np.testing.assert_allclose(got, want, atol=atol * scale)


def test_gradients_observed_at_the_same_points_as_values():
    """[f(X); ∇f(X)] at the same X is a valid, if ill-conditioned, system: no
    NaN, exact interpolation of both at the training points."""
    post = _quiet(gpgrad.GP(K.RBF(lengthscale=0.5), noise=0.0).condition, *_sin_obs(X8))
    v, g = post.value(X8), post.gradient(X8)
    assert _all_finite(v.mean, v.var, g.mean, g.var)
    np.testing.assert_allclose(v.mean, np.sin(3 * X8[:, 0]), atol=1e-8)
    np.testing.assert_allclose(g.mean, 3 * np.cos(3 * X8), atol=1e-6)
    assert v.var.max() < 1e-8 and g.var.max() < 1e-6
    # between the points the interpolant of a smooth function is accurate
    mid = (X8[:-1] + X8[1:]) / 2
    np.testing.assert_allclose(post.gradient(mid).mean, 3 * np.cos(3 * mid), atol=1e-3)


def test_coincident_training_and_query_points_are_exact_for_rough_kernels():
    # Matern52's φ''' and φ'''' are singular at ρ = 0; predicting Hessians at
    # the training points must use their finite limits, not NaN
    X = np.array([[0.0, 0.0], [0.5, -0.2], [-0.3, 0.4]])
    post = gpgrad.GP(K.Matern52(lengthscale=0.7), noise=1e-10).condition(
        gpgrad.gradients(X, np.ones((3, 2))), gpgrad.hessians(X, np.zeros((3, 2, 2)))
    )
    h = post.hessian(X)
    assert _all_finite(h.mean, h.var)
    np.testing.assert_allclose(h.mean, 0.0, atol=1e-6)
    np.testing.assert_allclose(post.gradient(X).mean, 1.0, atol=1e-6)


# --------------------------------------------------------------------------
# how far jitter moves the posterior


def _mp_solve(A, b):
    mpmath.mp.dps = 40
    sol = mpmath.lu_solve(mpmath.matrix(A.tolist()), mpmath.matrix(b.tolist()))
    return np.array(sol.tolist(), dtype=float).ravel()


def test_jitter_is_exactly_extra_noise():
    Xd = np.vstack([X8, X8])
    with pytest.warns(gpgrad.JitterWarning):
        post = gpgrad.GP(K.RBF(lengthscale=0.5), noise=0.0).condition(*_sin_obs(Xd))
    J = post.jitter
    same = gpgrad.GP(K.RBF(lengthscale=0.5), noise=J).condition(*_sin_obs(Xd))
    assert same.jitter == 0.0
    a, b = post.gradient(XS), same.gradient(XS)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.var, b.var, rtol=1e-12, atol=1e-14)


def test_jitter_move_quantified_against_a_40_digit_solve():
    """Values and gradients of sin(3x) at 8 points, each observed twice, no
    noise. The deduplicated system has condition number ~1e12, so the jitter J
    (~5.6e-14) moves the gradient mean by ~1e-5: about 1e8·J, far more than J.

    Reference: duplicating every observation makes ``K_dup + J·I`` act on the
    data like ``K + (J/2)·I`` on the unique system (K_dup = [[K, K], [K, K]],
    targets repeated), solved here in 40-digit arithmetic.
    """
    k = K.RBF(lengthscale=0.5)
    gp = gpgrad.GP(k, noise=0.0)
    obs, Q = _sin_obs(X8), [gpgrad.gradients(XS)]
    Kxx = covariance(k, as_blocks(obs, gp.xp, np.float64, None))
    Kxq = covariance(
        k,
        as_blocks(obs, gp.xp, np.float64, None),
        as_blocks(Q, gp.xp, np.float64, None),
    )
    y = np.concatenate([f.flat_targets(f.y) for f in obs])
    exact = Kxq.T @ _mp_solve(Kxx, y)  # the noise-free posterior mean

    Xd = np.vstack([X8, X8])
    with pytest.warns(gpgrad.JitterWarning, match="added jitter"):
        post = gp.condition(*_sin_obs(Xd))
    J = post.jitter
    got = post.gradient(XS).mean.ravel()
    jittered = Kxq.T @ _mp_solve(Kxx + (J / 2) * np.eye(len(y)), y)

    move = np.abs(got - exact).max()
    predicted = np.abs(jittered - exact).max()
    # the whole deviation is the jitter's exact effect (up to float64 round-off
    # of a cond ~1e12 system: ~1e-8 here)
    assert np.abs(got - jittered).max() <= 0.05 * predicted + 1e-7
    # and it is the documented size: tiny against the gradient scale (3), yet
    # many orders above J itself
    assert 1e-7 < move < 1e-4
    assert move / J > 1e6


# --------------------------------------------------------------------------
# tiny noise, extreme lengthscales, many dimensions


def test_tiny_noise_on_well_separated_points_needs_no_jitter():
    X = np.linspace(-1, 1, 6)[:, None]
    for noise in (0.0, 1e-300, 1e-12):
        with warnings.catch_warnings():
            warnings.simplefilter("error", gpgrad.GPGradWarning)
            post = gpgrad.GP(K.RBF(lengthscale=0.2), noise=noise).condition(
                X, np.cos(2 * X[:, 0])
            )
        assert post.jitter == 0.0
        np.testing.assert_allclose(post.value(X).mean, np.cos(2 * X[:, 0]), atol=1e-12)


def test_very_short_lengthscale_reverts_to_the_prior():
    ls, var = 1e-3, 1.7
    post = gpgrad.GP(K.RBF(lengthscale=ls, variance=var), noise=0.0).condition(
        *_sin_obs(X8)
    )
    far = np.array([[0.07], [0.5 + 0.123]])  # > 60 lengthscales from any point
    g, v = post.gradient(far), post.value(far)
    np.testing.assert_allclose(v.mean, 0.0, atol=1e-300)
    np.testing.assert_allclose(g.mean, 0.0, atol=1e-300)
    # prior variances: σ² for values, σ²/ℓ² for gradients
    np.testing.assert_allclose(v.var, var, rtol=1e-12)
    np.testing.assert_allclose(g.var[:, 0], var / ls**2, rtol=1e-12)
    # and the observations are reproduced exactly where they were made
    np.testing.assert_allclose(post.gradient(X8).mean, 3 * np.cos(3 * X8), rtol=1e-12)


@pytest.mark.parametrize("ls", [1e2, 1e4])
def test_very_long_lengthscale_warns_and_recovers_a_linear_function(ls):
    # with ℓ ≫ the data's extent the value Gram matrix is numerically rank one;
    # jitter makes it factor, and the slope of a linear function survives
    X = np.linspace(-1, 1, 8)[:, None]
    with pytest.warns(gpgrad.JitterWarning):
        post = gpgrad.GP(K.RBF(lengthscale=ls), noise=0.0).condition(X, 0.7 * X[:, 0])
    g = post.gradient(np.array([[0.3], [-0.8]]))
    assert _all_finite(g.mean, g.var)
    np.testing.assert_allclose(g.mean, 0.7, atol=1e-4)


def test_large_dimension_gradients():
    """D = 40 with values and gradients at 6 points (246 observations): the
    posterior reproduces the observed gradients of f(x) = sin(wᵀx)."""
    rng = np.random.default_rng(0)
    d, n = 40, 6
    X = rng.normal(size=(n, d))
    w = rng.normal(size=d) / np.sqrt(d)
    G = np.cos(X @ w)[:, None] * w
    post = gpgrad.GP(K.RBF(lengthscale=np.sqrt(d)), noise=1e-10).condition(
        gpgrad.values(X, np.sin(X @ w)), gpgrad.gradients(X, G)
    )
    g = post.gradient(X)
    assert g.mean.shape == (n, d) and _all_finite(g.mean, g.var)
    np.testing.assert_allclose(g.mean, G, atol=1e-7)
    # directional derivatives along w at new points: the quantity the data
    # informs; compare with the truth loosely (6 points in 40-D)
    Xn = X[:2] + 0.05 * rng.normal(size=(2, d))
    u = post.directional(Xn, w).mean
    np.testing.assert_allclose(u, np.cos(Xn @ w) * (w @ w), atol=0.05)


# --------------------------------------------------------------------------
# failures that cannot be repaired name the remedy


def test_not_positive_definite_names_the_remedy():
    with pytest.raises(
        gpgrad.NotPositiveDefiniteError,
        match=r"not positive definite even with jitter 1e-06.*Raise the observation "
        r"noise \(GP\(noise=...\).*remove duplicated.*longer lengthscale or float64",
    ):
        cholesky(np.array([[1.0, 2.0], [2.0, 1.0]]))


def test_overflowing_covariance_is_refused_not_nan():
    # σ²/ℓ⁴ overflows float32 for Hessian observations at ℓ = 1e-12
    X = np.array([[0.0], [1.0]])
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(
            gpgrad.NotPositiveDefiniteError,
            match="has NaN or infinite entries; check the inputs and the kernel's "
            "hyperparameters",
        ):
            gpgrad.GP(K.RBF(lengthscale=1e-12), dtype=np.float32).condition(
                gpgrad.hessians(X, np.ones((2, 1, 1)))
            )


def test_not_positive_definite_error_is_a_value_error():
    assert issubclass(gpgrad.NotPositiveDefiniteError, ValueError)


# --------------------------------------------------------------------------
# float32


def _f32_problem(rng, d, n, ls, noise, hess=False):
    X = rng.uniform(0, 1, (n, d))
    w = rng.normal(size=d)
    obs = [
        gpgrad.values(X, np.sin(X @ w)),
        gpgrad.gradients(X, np.cos(X @ w)[:, None] * w),
    ]
    if hess:
        obs.append(gpgrad.hessians(X, -np.sin(X @ w)[:, None, None] * np.outer(w, w)))
    return obs, rng.uniform(0, 1, (10, d))


def _f32_error(kernel, obs, Xs, ls, backend="numpy"):
    """Max deviation of float32 from float64 (values, and gradients × ℓ so
    both are on the prior's unit scale); whether float32 warned."""
    out = {}
    warned = False
    for dt in ("float64", "float32"):
        dtype = getattr(torch if backend == "torch" else np, dt)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            gp = gpgrad.GP(kernel, noise=obs[1], backend=backend, dtype=dtype)
            post = gp.condition(*obs[0])
            # (clipped negative variances may warn here too; only means count)
            v = np.asarray(post.value(Xs).mean, dtype=np.float64)
            g = np.asarray(post.gradient(Xs).mean, dtype=np.float64) * ls
        if dt == "float32":
            warned = any("float32 is too coarse" in str(r.message) for r in rec)
        out[dt] = (v, g)
    err = max(np.abs(out["float32"][i] - out["float64"][i]).max() for i in range(2))
    return err, warned


#: the documented envelope: when gpgrad stays silent, float32 agrees with float64
#: to this much of the prior scale (values, ℓ × gradients)
FLOAT32_ENVELOPE = 2e-3


def test_float32_warns_for_an_ill_conditioned_derivative_system():
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (20, 1))
    obs = [gpgrad.values(X, np.sin(X[:, 0])), gpgrad.gradients(X, np.cos(X))]
    with pytest.warns(
        gpgrad.GPGradWarning, match=r"float32 is too coarse .* Use dtype=float64"
    ):
        _quiet_jitter(
            gpgrad.GP(K.RBF(lengthscale=0.5), noise=1e-6, dtype=np.float32), obs
        )
    # the same problem in float64, or with enough noise, is silent
    for gp in (
        gpgrad.GP(K.RBF(lengthscale=0.5), noise=1e-6),
        gpgrad.GP(K.RBF(lengthscale=0.5), noise=1e-2, dtype=np.float32),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error", gpgrad.GPGradWarning)
            gp.condition(*obs)


def _quiet_jitter(gp, obs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=gpgrad.JitterWarning)
        return gp.condition(*obs)


def test_float32_value_only_systems_are_not_flagged():
    # the check is scoped to derivative observations
    X = np.linspace(0, 1, 20)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", gpgrad.GPGradWarning)
        warnings.filterwarnings("ignore", category=gpgrad.JitterWarning)
        gpgrad.GP(K.RBF(lengthscale=0.5), noise=1e-6, dtype=np.float32).condition(
            X, np.sin(X[:, 0])
        )


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float32_envelope(backend):
    """Random value/gradient/Hessian problems across noise levels: whenever
    float32 stays silent it is within FLOAT32_ENVELOPE of float64, and the
    problems with the worst errors are the ones it warned about."""
    rng = np.random.default_rng(7)
    silent_errs, warned_errs = [], []
    for t in range(12):
        d = 1 + t % 3
        ls = [0.4, 0.8, 1.5][t % 3]
        noise = [1e-2, 1e-4, 1e-6, 1e-8][t % 4]
        kernel = [K.RBF, K.Matern52, K.RationalQuadratic][(t // 3) % 3](lengthscale=ls)
        obs, Xs = _f32_problem(rng, d, 8 + 3 * t, ls, noise, hess=t % 2 == 1)
        err, warned = _f32_error(kernel, (obs, noise), Xs, ls, backend)
        (warned_errs if warned else silent_errs).append(err)
    assert silent_errs and warned_errs
    assert max(silent_errs) <= FLOAT32_ENVELOPE, silent_errs
    assert max(warned_errs) > max(silent_errs)


def test_float32_well_conditioned_derivatives_are_accurate():
    rng = np.random.default_rng(1)
    obs, Xs = _f32_problem(rng, 2, 10, 0.5, 1e-2)
    err, warned = _f32_error(K.RBF(lengthscale=0.5), (obs, 1e-2), Xs, 0.5)
    assert not warned
    assert err < 1e-5


def measure_float32_envelope(n_problems=200, seed=0):
    """Float32-vs-float64 deviation over random problems, by observation kind
    and by whether gpgrad warned; prints the table quoted in the numerical
    notes. Run: ``python tests/test_numerics.py``.
    """
    import os
    import platform

    rng = np.random.default_rng(seed)
    rows = {}
    for _ in range(n_problems):
        d = int(rng.integers(1, 6))
        n = int(rng.integers(3, 40))
        ls = float(10 ** rng.uniform(-0.7, 0.5))
        noise = float(10 ** rng.uniform(-9, -1))
        kind = ["value", "gradient", "hessian"][int(rng.integers(3))]
        kernel = [K.RBF, K.Matern52, K.RationalQuadratic][int(rng.integers(3))](
            lengthscale=ls
        )
        obs, Xs = _f32_problem(rng, d, n, ls, noise, hess=kind == "hessian")
        if kind == "value":
            obs = obs[:1]
        try:
            err, warned = _f32_error(kernel, (obs, noise), Xs, ls)
        except gpgrad.NotPositiveDefiniteError:
            err, warned = np.inf, True
        rows.setdefault((kind, warned), []).append(err)
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, numpy {np.__version__}, torch {torch.__version__}"
    )
    print("observations | float32 warning | problems | median | 95% | max")
    for key in sorted(rows):
        e = np.array(rows[key])
        print(
            f"{key[0]} | {'yes' if key[1] else 'no'} | {e.size} | "
            f"{np.median(e):.1e} | {np.quantile(e, 0.95):.1e} | {e.max():.1e}"
        )


if __name__ == "__main__":  # pragma: no cover
    measure_float32_envelope()
