"""Kernel choice by evidence and Bayesian model averaging (gpgrad.auto)."""

import math
import warnings

import numpy as np
import pytest

import gpgrad
from gpgrad import kernels as K
from gpgrad.auto import Candidate, detect_period, estimate, mixture
from gpgrad.posterior import Prediction


def test_mixture_moments_match_a_hand_computation():
    p1 = Prediction(np.array([1.0, 2.0]), np.array([0.5, 0.1]))
    p2 = Prediction(np.array([3.0, 2.0]), np.array([1.5, 0.3]))
    got = mixture([p1, p2], [0.25, 0.75])
    # mean 0.25·1 + 0.75·3 = 2.5; within 0.25·0.5 + 0.75·1.5 = 1.25;
    # between 0.25·(1 − 2.5)² + 0.75·(3 − 2.5)² = 0.75
    np.testing.assert_allclose(got.mean, [2.5, 2.0])
    np.testing.assert_allclose(got.var, [2.0, 0.25])
    np.testing.assert_allclose(got.std, np.sqrt([2.0, 0.25]))


def test_mixture_full_covariance_is_within_plus_between():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(3, 3))
    C1, C2 = A @ A.T, np.eye(3)
    m1, m2 = rng.normal(size=3), rng.normal(size=3)
    got = mixture(
        [Prediction(m1, np.diag(C1), C1), Prediction(m2, np.diag(C2), C2)],
        [0.4, 0.6],
        full_cov=True,
    )
    m = 0.4 * m1 + 0.6 * m2
    want = 0.4 * (C1 + np.outer(m1 - m, m1 - m)) + 0.6 * (C2 + np.outer(m2 - m, m2 - m))
    np.testing.assert_allclose(got.cov, want, rtol=1e-12)
    np.testing.assert_allclose(np.diag(got.cov), got.var, rtol=1e-12)


def _sample(kernel, n, noise, seed):
    x = np.linspace(0, 1, n)
    K_ = kernel(x[:, None]) + 1e-10 * np.eye(n)
    rng = np.random.default_rng(seed)
    f = np.linalg.cholesky(K_) @ rng.normal(size=n)
    return x, f + noise * rng.normal(size=n)


CANDS = {"Matern32": K.Matern32(), "RBF": K.RBF()}


@pytest.mark.parametrize(
    "truth,name",
    [(K.RBF(0.2), "RBF"), (K.Matern32(0.2), "Matern32")],
    ids=["rbf", "matern32"],
)
def test_weights_sum_to_one_and_favour_the_true_kernel(truth, name):
    x, y = _sample(truth, 60, 1e-3, seed=1)
    avg = gpgrad.fit_auto(x[:, None], y, candidates=CANDS, restarts=1)
    assert math.isclose(float(avg.weights.sum()), 1.0, rel_tol=1e-12)
    assert np.all(avg.weights >= 0)
    w = {m.name: m.weight for m in avg.members}
    assert w.get(name, 0.0) > 0.9, avg.summary()
    assert avg.best.name == name
    # the weights are the softmax of the members' log evidence
    le = np.array([m.log_evidence for m in avg.members])
    np.testing.assert_allclose(
        avg.weights, np.exp(le - le.max()) / np.exp(le - le.max()).sum()
    )
    # the Laplace Occam factor: det(I + S A S)^-1/2 over the member's log
    # coordinates (A = −Hessian, S = the prior's sds); every entry outside
    # them other than the mean (on a bound) keeps BIC's ½ log N
    for m in avg.members:
        names, _, theta = gpgrad.auto._log_coordinates(m.fit)
        S = np.diag(gpgrad.auto._prior_sd(m.fit, gpgrad.auto.EVIDENCE_PRIOR_SD))
        lam = np.linalg.eigvalsh(-S @ m.hessian @ S)
        occam = -0.5 * np.sum(np.log1p(np.maximum(lam, 0)))
        outside = m.n_params - theta.size - 1  # the constant mean
        assert m.log_evidence == pytest.approx(
            m.log_marginal_likelihood + occam - 0.5 * outside * math.log(60)
        )
        assert m.log_evidence < m.log_marginal_likelihood


def test_averaged_posterior_is_the_mixture_of_its_members():
    x = np.linspace(0, 1, 25)
    y = np.sin(5 * x) + 0.02 * np.random.default_rng(2).normal(size=25)
    cands = {"Matern52": K.Matern52(), "RQ": K.RationalQuadratic()}
    Xs = np.array([[0.1], [0.55]])
    for marginalize in (False, True):
        avg = gpgrad.fit_auto(
            x[:, None], y, candidates=cands, restarts=1, marginalize=marginalize
        )
        g = avg.gradient(Xs)
        # every member's hyperparameter points, weighted w_member · w_point
        preds, w = [], []
        for m in avg.members:
            if not marginalize or m.weight < gpgrad.auto.MARGINALIZE_MIN_WEIGHT:
                assert m.points == [m.posterior] and list(m.point_weights) == [1.0]
            assert math.isclose(float(np.sum(m.point_weights)), 1.0, rel_tol=1e-12)
            preds += [p.gradient(Xs) for p in m.points]
            w += [m.weight * u for u in m.point_weights]
        assert len(preds) > len(avg.members) or not marginalize
        mean = sum(wk * p.mean for wk, p in zip(w, preds))
        var = sum(wk * (p.var + (p.mean - mean) ** 2) for wk, p in zip(w, preds))
        np.testing.assert_allclose(g.mean, mean)
        np.testing.assert_allclose(g.var, var)
        assert g.mean.shape == (2, 1) and avg.value(Xs).mean.shape == (2,)
        assert avg.hessian(Xs).mean.shape == (2, 1, 1)
        assert "model average of" in avg.summary()


def test_hessian_averages_over_twice_differentiable_members_only():
    x = np.linspace(0, 1, 20)
    y = np.cos(4 * x)
    cands = {"Matern32": K.Matern32(), "Matern52": K.Matern52()}
    avg = gpgrad.fit_auto(x[:, None], y, candidates=cands, restarts=1, prune=1e3)
    names = [m.name for m in avg.members]
    assert "Matern32" in names and "Matern52" in names
    m52 = next(m for m in avg.members if m.name == "Matern52")
    h = avg.hessian(x[:2, None])
    want = sum(
        u * p.hessian(x[:2, None]).mean for p, u in zip(m52.points, m52.point_weights)
    )
    np.testing.assert_allclose(h.mean, want)
    only32 = gpgrad.fit_auto(x[:, None], y, candidates={"M32": K.Matern32()})
    with pytest.raises(ValueError, match="2 times mean-square differentiable"):
        only32.hessian(x[:2, None])


@pytest.mark.slow
def test_default_search_tries_the_family_and_refinements():
    x = np.linspace(0, 1, 30)
    y = np.tanh(8 * (x - 0.5)) + 0.01 * np.random.default_rng(3).normal(size=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gpgrad.GPGradWarning)
        avg = gpgrad.fit_auto(x[:, None], y, restarts=1)
    tried = [name for name, _ in avg.searched]
    for base in ("Matern32", "Matern52", "RBF", "RQ"):
        assert base in tried
    assert any(t.startswith("W(") for t in tried)
    assert any(t.endswith("+Linear") for t in tried)
    assert len(avg.members) <= 5
    best = max(s for _, s in avg.searched)
    assert all(m.log_evidence > best - 10 - 5 for m in avg.members)


def test_estimate_returns_moments_of_f_and_its_derivatives():
    t = np.linspace(0, 2, 30)
    y = np.sin(3 * t) + 0.01 * np.random.default_rng(4).normal(size=30)
    at = np.array([0.5, 1.0])
    est = estimate(t, y, at=at, candidates={"RBF": K.RBF()}, restarts=1)
    assert est.t.shape == (2,) and est.d2f_mean.shape == (2,)
    np.testing.assert_allclose(est.df_mean, 3 * np.cos(3 * at), atol=0.1)
    np.testing.assert_allclose(est.d2f_mean, -9 * np.sin(3 * at), atol=1.0)
    assert np.all(est.df_std > 0) and set(est.table()) >= {"t", "f_mean", "d2f_std"}
    first = estimate(t, y, order=1, candidates={"RBF": K.RBF()}, restarts=1)
    assert first.d2f_mean is None and "d2f_mean" not in first.table()
    # measured derivatives are used as gradient observations
    with_dy = estimate(
        t, y, dy=3 * np.cos(3 * t), order=1, candidates={"RBF": K.RBF()}, restarts=1
    )
    assert with_dy.model.best.posterior.num_observations == 60


def test_detect_period():
    x = np.linspace(0, 10, 200)
    y = np.sin(2 * np.pi * x / 1.7) + 0.3 * x
    assert detect_period(x, y) == pytest.approx(1.7, rel=0.05)
    assert detect_period(x, 0.3 * x + np.exp(-x)) is None


@pytest.mark.parametrize("even", [True, False])
def test_lombscargle_is_scipys(even):
    from scipy.signal import lombscargle

    from gpgrad.auto import _lombscargle

    rng = np.random.default_rng(3)
    x = np.linspace(0, 5, 150) if even else np.sort(rng.uniform(0, 5, 150))
    y = np.sin(3 * x) + rng.normal(size=150)
    y -= y.mean()
    w = np.linspace(0.5, 40, 401)
    want = lombscargle(x, y, w)
    np.testing.assert_allclose(_lombscargle(x, y, w), want, rtol=1e-10, atol=0)
    # a block smaller than one row of frequencies: one frequency at a time
    np.testing.assert_allclose(_lombscargle(x, y, w, block=7), want, rtol=1e-10)


def test_validation_errors():
    x = np.linspace(0, 1, 10)[:, None]
    y = np.sin(x[:, 0])
    with pytest.raises(ValueError, match="backend must be 'numpy' or 'torch'"):
        gpgrad.fit_auto(x, y, backend="jax")
    with pytest.raises(ValueError, match="restarts must be a positive integer"):
        gpgrad.fit_auto(x, y, restarts=0)
    with pytest.raises(ValueError, match="prune must be a positive number"):
        gpgrad.fit_auto(x, y, prune=-1)
    with pytest.raises(ValueError, match="candidates is empty"):
        gpgrad.fit_auto(x, y, candidates=[])
    with pytest.raises(TypeError, match="candidates must be gpgrad kernels"):
        gpgrad.fit_auto(x, y, candidates=["RBF"])
    with pytest.raises(TypeError, match=r"candidates\['a'\] must be a gpgrad kernel"):
        gpgrad.fit_auto(x, y, candidates={"a": 1})
    with pytest.raises(ValueError, match="candidate names must be unique"):
        gpgrad.fit_auto(
            x, y, candidates=[Candidate("a", K.RBF()), Candidate("a", K.Matern52())]
        )
    with pytest.raises(ValueError, match="periodic must be a positive period"):
        gpgrad.fit_auto(x, y, periodic=-2.0)
    with pytest.raises(ValueError, match="y has 9 entries but t has 10"):
        estimate(x[:, 0], y[:9])
    with pytest.raises(ValueError, match="t needs at least 3 distinct times"):
        estimate([0.0, 0.0, 1.0], [1.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        estimate(x[:, 0], y, order=3)
    with pytest.raises(ValueError, match="t has NaN"):
        estimate([0.0, np.nan, 1.0, 2.0], [1.0, 1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="t must be a 1-D array of numbers"):
        estimate("abc", y)


def test_mixture_mean_does_not_read_member_variances():
    class Source:
        def mean(self):
            return np.array([1.0])

        def moments(self):
            raise AssertionError("variances were computed")

    p = Prediction(source=Source())
    got = mixture([p, Prediction(np.array([3.0]), np.array([1.0]))], [0.5, 0.5])
    np.testing.assert_allclose(got.mean, [2.0])


def test_default_candidates_add_a_window_periodic_and_a_cubic():
    x = np.linspace(2.0, 5.0, 20)[:, None]
    cands = {c.name: c for c in gpgrad.auto.default_candidates(x)}
    assert {"Matern32", "Matern52", "RBF", "RQ", "Periodic", "Cubic"} <= set(cands)
    assert cands["Periodic"].kernel.period == pytest.approx(3.0)
    assert cands["Periodic"].bounds["period"] == pytest.approx((1.5, 4.5))
    assert cands["Cubic"].kernel.degree == 3
    # a period over the window only means something for one input column
    two = gpgrad.auto.default_candidates(np.hstack([x, x**2]))
    assert "Periodic" not in [c.name for c in two]


def test_refinements_by_kind_of_base():
    class Fitted:  # what refinements reads of a fit
        params = {"lengthscale": 0.4, "variance": 2.0}

    x = np.linspace(0.0, 2.0, 41)[:, None]  # spacing 0.05, under 0.4 / 5
    rbf = {c.name: c for c in gpgrad.auto.refinements(Candidate("RBF", K.RBF()), x,
                                                      fitted=Fitted())}  # fmt: skip
    assert set(rbf) == {"W(RBF)", "RBF+RBF", "RBF+Linear"}
    assert rbf["W(RBF)"].kernel.floor == gpgrad.auto.WARP_FLOOR == 0.1
    start = rbf["RBF+RBF"].start
    assert start["1.lengthscale"] == pytest.approx(0.4 / 5)
    assert start["1.variance"] == pytest.approx(2.0 / 25)
    per = gpgrad.auto.refinements(
        Candidate(
            "Periodic",
            K.Periodic(period=2.0),
            bounds={"period": (1.0, 3.0)},
            start=[{"lengthscale": 1.0}, {}],
        ),
        x,
        fitted=Fitted(),
    )
    # no warping or second scale of a non-stationary kernel; the trend keeps
    # the base's bounds and starts
    assert [c.name for c in per] == ["Periodic+Linear"]
    assert per[0].bounds == {"0.period": (1.0, 3.0)}
    assert per[0].start == [{"0.lengthscale": 1.0}, {}]
    # a polynomial: no warping, second scale or trend, a stationary residual
    # (without a fit to start from, the data-driven start alone)
    cubic = Candidate("Cubic", K.Polynomial(degree=3))
    (residual,) = gpgrad.auto.refinements(cubic, x)
    assert residual.name == "Cubic+Matern52" and residual.start == {}
    assert residual.bounds["1.lengthscale"][0] == pytest.approx(0.05)
    # variants keep their base's prior weight
    rare = Candidate("RBF", K.RBF(), prior=0.3)
    assert {c.prior for c in gpgrad.auto.refinements(rare, x, fitted=Fitted())} == {0.3}
    assert gpgrad.auto.rough_part(rare).prior == 0.3


def test_rough_part_of_a_warped_lead():
    class Fitted:  # what rough_part reads of a fit
        params = {"variance": 2.0, "noise.value": 1e-3, "mean": 0.5}

    x = np.linspace(0.0, 2.0, 10)[:, None]
    (warped,) = [
        c
        for c in gpgrad.auto.refinements(Candidate("RQ", K.RationalQuadratic()), x)
        if c.name == "W(RQ)"
    ]
    rough = gpgrad.auto.rough_part(warped, fitted=Fitted())
    assert rough.name == "W(RQ)+Matern32"
    w, m = rough.kernel.children
    assert isinstance(w, K.Warped) and isinstance(w.kernel, K.RationalQuadratic)
    assert w.floor == warped.kernel.floor and isinstance(m, K.Matern32)
    # the lead's optimum (its kernel's names prefixed "0.", its noise and mean
    # as they are) with a small rough part
    assert rough.start == {
        "0.variance": 2.0,
        "noise.value": 1e-3,
        "mean": 0.5,
        "1.variance": pytest.approx(2e-4),
        "1.lengthscale": 0.1,
    }
    assert rough.bounds == {
        "0.concentration1": gpgrad.auto.WARP_BOUNDS,
        "0.concentration0": gpgrad.auto.WARP_BOUNDS,
    }
    # a stationary lead gets one beside it (started at 5 % of the window);
    # a periodic, polynomial or summed lead none
    fitted = Fitted()
    fitted.params = {"variance": 2.0, "lengthscale": 0.3, "noise.value": 1e-3}
    beside = gpgrad.auto.rough_part(
        Candidate("RBF", K.RBF()), fitted=fitted, spacing=0.01, span=4.0
    )
    assert beside.name == "RBF+Matern32"
    assert [type(k) for k in beside.kernel.children] == [K.RBF, K.Matern32]
    assert beside.start == {
        "0.variance": 2.0,
        "0.lengthscale": 0.3,
        "noise.value": 1e-3,
        "1.variance": pytest.approx(2e-4),
        "1.lengthscale": pytest.approx(0.2),
    }
    assert beside.bounds == {"1.lengthscale": (0.01, 400.0)}
    for other in (
        K.Periodic(period=1.0),
        K.Polynomial(degree=3),
        K.RBF() + K.Linear(),
    ):
        assert gpgrad.auto.rough_part(Candidate("x", other)) is None
    # with the inputs' spacing, the rough part's lengthscale stays above it
    # (and starts at least twice it)
    rough = gpgrad.auto.rough_part(warped, fitted=Fitted(), spacing=0.08)
    assert rough.bounds["1.lengthscale"] == (0.08, pytest.approx(200.0))
    assert rough.start["1.lengthscale"] == pytest.approx(0.16)


def test_fast_parts_stay_above_the_sample_spacing():
    # the median gap between distinct 1-D inputs (repeats and order
    # ignored; a long gap does not raise it); none for several columns or a
    # single point
    x = np.array([0.5, 0.0, 1.0, 0.5, 2.0, 5.0])[:, None]
    assert gpgrad.auto._spacing(x) == pytest.approx(0.75)
    assert gpgrad.auto._spacing(np.linspace(0, 3, 31)[:, None]) == pytest.approx(0.1)
    assert gpgrad.auto._spacing(np.zeros((4, 2))) is None
    assert gpgrad.auto._spacing(np.ones((3, 1))) is None

    class Fitted:
        params = {"lengthscale": 0.05, "variance": 1.0}

    x = np.linspace(0.0, 1.0, 21)[:, None]
    (two,) = [
        c
        for c in gpgrad.auto.refinements(
            Candidate("M32", K.Matern32()), x, fitted=Fitted()
        )  # fmt: skip
        if c.name == "M32+M32"
    ]
    assert two.bounds == {"1.lengthscale": (pytest.approx(0.05), 100.0)}
    # the start (a fifth of the base's lengthscale, 0.01) is lifted to it
    assert two.start["1.lengthscale"] == pytest.approx(0.05)
    # fitted: white noise with a slow signal, where an unbounded fast part
    # can take the noise for itself
    rng = np.random.default_rng(3)
    x = np.linspace(0.0, 1.0, 60)
    y = np.sin(3 * x) + 0.05 * rng.normal(size=60)
    avg = gpgrad.fit_auto(x[:, None], y, candidates=[two], marginalize=False)
    ls = float(avg.best.fit.params["1.lengthscale"])
    assert ls >= 1.0 / 59 * (1 - 1e-9)


@pytest.mark.parametrize(
    "f, winner",
    [(lambda x: x**3 - x, "Cubic"), (lambda x: np.sin(2 * np.pi * x), "Periodic")],
)
def test_evidence_picks_the_cubic_and_the_window_periodic(f, winner):
    x = np.linspace(0.0, 1.0, 40)
    y = f(x) + 1e-3 * np.random.default_rng(5).normal(size=40)
    cands = {c.name: c for c in gpgrad.auto.default_candidates(x[:, None])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        avg = gpgrad.fit_auto(
            x[:, None], y, candidates=[cands["RBF"], cands[winner]], restarts=1
        )
    assert avg.best.name == winner and avg.best.weight > 0.99


def test_estimate_command_defaults_to_the_average():
    from gpgrad.cli import _parser

    a = _parser().parse_args(
        ["estimate", "d.csv", "--x", "t", "--y", "y", "--out", "o"]
    )
    assert a.kernel == "auto"


def test_statespace_family_runs_on_the_statespace_solver_and_matches_dense():
    t = np.linspace(0, 4, 150)
    y = np.sin(2 * t) + 0.3 * t + 0.02 * np.random.default_rng(4).normal(size=150)
    avg = gpgrad.fit_auto(t[:, None], y, family="statespace", restarts=1)
    tried = [name for name, _ in avg.searched]
    assert {"Matern32", "Matern52", "Matern72"} <= set(tried)
    assert all(name.startswith("Matern") for name in tried)
    assert any("+" in name for name in tried)  # the two-scale refinement
    Q = t[::7, None]
    g = avg.gradient(Q)
    # the same mixture rebuilt with each point refactored densely
    means, var2, ws = [], [], []
    for m in avg.members:
        assert m.posterior.method == "statespace"
        for post, wp in zip(m.points, m.point_weights):
            assert post.method == "statespace"
            gp = post.gp
            dense = gpgrad.GP(
                post.kernel, noise=gp.noise, mean=gp.mean, method="cholesky"
            )
            dense = dense.condition(*post.observations).gradient(Q)
            means.append(dense.mean[:, 0])
            var2.append(dense.var[:, 0] + dense.mean[:, 0] ** 2)
            ws.append(m.weight * wp)
    ws = np.asarray(ws)
    mean = np.einsum("k,kq->q", ws, np.asarray(means))
    var = np.einsum("k,kq->q", ws, np.asarray(var2)) - mean**2
    np.testing.assert_allclose(g.mean[:, 0], mean, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(g.var[:, 0], var, rtol=1e-6, atol=1e-12)


def test_statespace_family_refuses_what_it_cannot_run():
    x = np.linspace(0, 1, 20)
    with pytest.raises(ValueError, match="1-D inputs"):
        gpgrad.fit_auto(np.c_[x, x], x, family="statespace")
    with pytest.raises(ValueError, match="family must be"):
        gpgrad.fit_auto(x[:, None], x, family="fast")
    with pytest.raises(ValueError, match="not both"):
        gpgrad.fit_auto(x[:, None], x, family="statespace", candidates=[K.RBF()])
    with pytest.raises(ValueError, match="method='statespace'"):
        gpgrad.fit_auto(x[:, None], x, family="statespace", method="cholesky")


def test_window_keeps_consecutive_samples_of_every_observation():
    from gpgrad.auto import _window

    x = np.arange(100.0)
    obs = [
        gpgrad.values(x[:, None], np.sin(x)),
        gpgrad.gradients(x[::2, None], np.cos(x[::2])[:, None], noise=0.1),
    ]
    w = _window(obs, 30)
    xs = np.sort(np.concatenate([f.X[:, 0] for f in w]))
    assert xs.size == 30
    # the middle of the 150 inputs, every one between its ends kept
    assert np.all(np.isin(np.arange(xs.min(), xs.max() + 1), w[0].X[:, 0]))
    assert abs((xs.min() + xs.max()) / 2 - 49.5) <= 1
    np.testing.assert_array_equal(w[0].y, np.sin(w[0].X[:, 0]))
    np.testing.assert_array_equal(w[1].y[:, 0], np.cos(w[1].X[:, 0]))
    assert w[1].kind == "gradient"
    assert _window(obs, 1000) is obs


def test_a_kink_brings_a_rough_part_beside_a_stationary_lead():
    # |x − 0.45|^1.5 has a derivative with a square-root tip: a Matérn 5/2
    # lead, and its sum with a rough Matérn 3/2 part carries real weight
    x = np.linspace(0.0, 1.0, 60)
    y = np.abs(x - 0.45) ** 1.5 + 1e-3 * np.random.default_rng(1).normal(size=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        avg = gpgrad.fit_auto(x[:, None], y, restarts=1)
    weights = {m.name: m.weight for m in avg.members}
    assert avg.best.name == "Matern52"
    assert weights.get("Matern52+Matern32", 0.0) > 0.05
    rough = next(m for m in avg.members if m.name == "Matern52+Matern32")
    assert float(rough.fit.params["1.lengthscale"]) >= 1.0 / 59 * (1 - 1e-9)


def test_warping_starts_at_the_nested_model():
    # W(k)'s first start is the identity warping at k's optimum (its
    # lengthscale in the rescaled box's units), where the likelihood is k's:
    # the warped fit cannot end below its base
    x = np.linspace(0.2, 2.2, 40)
    y = np.sin(3 * x) + 0.02 * np.random.default_rng(0).normal(size=40)
    base = gpgrad.fit(gpgrad.GP(K.RationalQuadratic()), x[:, None], y)
    (warped,) = [
        c
        for c in gpgrad.auto.refinements(
            Candidate("RQ", K.RationalQuadratic()), x[:, None], fitted=base
        )
        if c.name == "W(RQ)"
    ]
    nested, data_driven = warped.start
    assert data_driven == {}
    assert nested["concentration1"] == nested["concentration0"] == 1.0
    assert nested["lengthscale"] == pytest.approx(
        float(base.params["lengthscale"]) * 0.9 / 2.0
    )
    fixed = {k: v for k, v in nested.items() if k != "mean"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        at = gpgrad.fit(gpgrad.GP(warped.kernel), x[:, None], y, fixed=fixed)
    assert float(at.log_marginal_likelihood) == pytest.approx(
        float(base.log_marginal_likelihood), abs=1e-6
    )
    # without a fit to start from, the data-driven start alone
    (plain,) = [
        c
        for c in gpgrad.auto.refinements(
            Candidate("RQ", K.RationalQuadratic()), x[:, None]
        )
        if c.name == "W(RQ)"
    ]
    assert plain.start == {}


def test_a_polynomial_lead_gets_a_residual_started_at_the_nested_model():
    # a polynomial is certain of its own shape: its refinement is a Matérn
    # 5/2 residual beside it, started at the polynomial's optimum, its
    # lengthscale at least the spacing (else it would fit the noise)
    x = np.linspace(0.0, 1.0, 40)
    y = np.cos(3 * x) + 0.5 * x**2 + 0.02 * np.random.default_rng(0).normal(size=40)
    cubic = Candidate("Cubic", K.Polynomial(degree=3))
    base = gpgrad.fit(gpgrad.GP(cubic.kernel), x[:, None], y, restarts=1)
    (res,) = [
        c
        for c in gpgrad.auto.refinements(cubic, x[:, None], fitted=base)
        if c.name == "Cubic+Matern52"
    ]
    nested, data_driven = res.start
    assert data_driven == {}
    assert res.bounds["1.lengthscale"][0] == pytest.approx(1.0 / 39)
    for name, v in base.params.items():
        key = name if name.startswith("noise.") or name == "mean" else f"0.{name}"
        assert float(nested[key]) == float(v)
    # the polynomial's likelihood where the residual vanishes, and a fit
    # from the nested start ends at least as high
    at_zero = {**nested, "1.variance": 1e-12}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        zero = gpgrad.fit(gpgrad.GP(res.kernel), x[:, None], y, fixed=at_zero)
        fitted = gpgrad.fit(
            gpgrad.GP(res.kernel), x[:, None], y, start=nested, bounds=res.bounds
        )
    assert float(zero.log_marginal_likelihood) == pytest.approx(
        float(base.log_marginal_likelihood), abs=1e-6
    )
    assert fitted.log_marginal_likelihood >= base.log_marginal_likelihood - 1e-6
    assert float(fitted.params["1.lengthscale"]) >= 1.0 / 39 * (1 - 1e-9)
    # stationary bases get no such residual (their refinements are others)
    names = [
        c.name for c in gpgrad.auto.refinements(Candidate("RBF", K.RBF()), x[:, None])
    ]
    assert "RBF+Matern52" not in names


def test_a_part_fitted_to_nothing_is_merged_into_its_base():
    # RBF+Linear with the trend's variance held at ~0 is RBF: one model
    # counted twice. It must not take a member's place from a distinct kernel,
    # and its weight goes to the member it duplicates.
    x = np.linspace(0, 1, 25)
    y = np.sin(5 * x) + 0.05 * np.random.default_rng(4).normal(size=25)
    cands = [
        Candidate("RBF", K.RBF()),
        Candidate(
            "RBF+Linear",
            K.RBF() + K.Linear(),
            fixed={"1.variance": 1e-12, "1.lengthscale": 1.0},
        ),
        Candidate("Matern32", K.Matern32()),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        avg = gpgrad.fit_auto(
            x[:, None], y, candidates=cands, restarts=1, max_members=2,
            prune=1e3, marginalize=False,
        )  # fmt: skip
        # each on its own: the evidence of the two copies and of Matern32
        alone = {
            c.name: gpgrad.fit_auto(
                x[:, None], y, candidates=[c], restarts=1, marginalize=False
            ).members[0]
            for c in cands
        }
    names = sorted(m.name for m in avg.members)
    assert len(names) == 2 and "Matern32" in names
    rbf = next(m for m in avg.members if m.name != "Matern32")
    m32 = next(m for m in avg.members if m.name == "Matern32")
    assert sorted([rbf.name] + rbf.merged) == ["RBF", "RBF+Linear"]
    assert m32.merged == []
    z = {k: np.exp(m.log_evidence - alone["Matern32"].log_evidence)
         for k, m in alone.items()}  # fmt: skip
    assert rbf.weight / m32.weight == pytest.approx(
        z["RBF"] + z["RBF+Linear"], rel=1e-6
    )
    # the merged member predicts what either copy predicts
    Xs = np.array([[0.2], [0.7]])
    np.testing.assert_allclose(
        rbf.posterior.gradient(Xs).mean,
        alone["RBF+Linear"].posterior.gradient(Xs).mean,
        rtol=1e-4, atol=1e-6,
    )  # fmt: skip
    assert "the same posterior as" in avg.summary()


def test_distinct_kernels_are_not_merged():
    x = np.linspace(0, 1, 25)
    y = np.abs(x - 0.4) + 0.01 * np.random.default_rng(5).normal(size=25)
    cands = {"RBF": K.RBF(), "Matern32": K.Matern32()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        avg = gpgrad.fit_auto(x[:, None], y, candidates=cands, restarts=1, prune=1e3)
    assert sorted(m.name for m in avg.members) == ["Matern32", "RBF"]
    assert all(m.merged == [] for m in avg.members)


@pytest.mark.parametrize("variance_max", [10_000, 10])
def test_estimate_joint_pass_equals_the_separate_queries(monkeypatch, variance_max):
    # estimate queries f, f' and f'' jointly per hyperparameter point; the
    # moments must be those of the averaged posterior's value, gradient and
    # hessian (Matern32 is averaged for f and f' but not for f''); below
    # variance_max the points bring their means and the mode its variance
    monkeypatch.setattr(gpgrad.auto, "MARGINALIZE_VARIANCE_MAX", variance_max)
    t = np.linspace(0, 1, 30)
    y = np.abs(t - 0.4) ** 1.5 + 0.01 * np.random.default_rng(6).normal(size=30)
    at = np.linspace(-0.1, 1.1, 17)
    cands = {"Matern32": K.Matern32(), "Matern52": K.Matern52()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        est = estimate(t, y, at=at, candidates=cands, restarts=1, prune=1e3)
    avg = est.model
    assert {m.name for m in avg.members} == {"Matern32", "Matern52"}
    assert all(len(m.points) > 1 for m in avg.members)
    assert all(m.point_variances == (variance_max > 30) for m in avg.members)
    Q = at[:, None]
    v, g, h = avg.value(Q), avg.gradient(Q), avg.hessian(Q)
    for got, want in [
        (est.f_mean, v.mean), (est.f_std, v.std),
        (est.df_mean, g.mean[:, 0]), (est.df_std, g.std[:, 0]),
        (est.d2f_mean, h.mean[:, 0, 0]), (est.d2f_std, h.std[:, 0, 0]),
    ]:  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_estimate_on_the_torch_backend_matches_numpy():
    # the merge's probes and the joint pass read tensors on the torch backend
    pytest.importorskip("torch")
    t = np.linspace(0, 1, 30)
    y = np.abs(t - 0.4) ** 1.5 + 0.01 * np.random.default_rng(7).normal(size=30)

    def cands():
        return [
            Candidate("Matern52", K.Matern52()),
            Candidate("RBF", K.RBF()),
            Candidate(
                "RBF+Linear",
                K.RBF() + K.Linear(),
                fixed={"1.variance": 1e-12, "1.lengthscale": 1.0},
            ),
        ]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        a = estimate(t, y, candidates=cands(), restarts=1, prune=1e3)
        b = estimate(t, y, candidates=cands(), restarts=1, prune=1e3, backend="torch")
    assert [m.name for m in a.model.members] == [m.name for m in b.model.members]
    assert [m.merged for m in a.model.members] == [m.merged for m in b.model.members]
    assert any(m.merged for m in b.model.members)
    np.testing.assert_allclose(b.model.weights, a.model.weights, rtol=1e-3)
    for key in ("f_mean", "df_mean", "d2f_mean", "df_std", "d2f_std"):
        got, want = getattr(b, key), getattr(a, key)
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.std(want))
