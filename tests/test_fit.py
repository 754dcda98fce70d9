"""Hyperparameter fitting: the likelihood's gradient against finite differences,
the optimum against an independent likelihood, recovery of known
hyperparameters, batched against looped, bounds, errors."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import gpgrad
from gpgrad import kernels as K
from gpgrad.fit import FitWarning, _few_threads, _Objective, _specs


def _rbf_lml(X, y, ls, var, noise, mean):
    """Independent log marginal likelihood of values under an RBF prior."""
    d2 = (X[:, None, 0] - X[None, :, 0]) ** 2
    C = var * np.exp(-0.5 * d2 / ls**2) + noise * np.eye(len(y))
    return multivariate_normal(mean=np.full(len(y), mean), cov=C).logpdf(y)


def _series(n=30, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    X = np.sort(rng.uniform(0, 5, n))[:, None]
    y = np.sin(1.3 * X[:, 0]) + 2.0 + noise * rng.normal(size=n)
    return X, y


def test_objective_gradient_matches_central_differences():
    X, y = _series()
    rng = np.random.default_rng(1)
    Xg = rng.uniform(0, 5, (6, 1))
    obs = [
        gpgrad.values(X, y),
        gpgrad.gradients(Xg, 1.3 * np.cos(1.3 * Xg)),
        gpgrad.second_partials(Xg, 0, 0, -(1.3**2) * np.sin(1.3 * Xg[:, 0])),
    ]
    gp = gpgrad.GP(K.Matern52() + K.RBF())
    specs, fixed = _specs(gp, obs, (), None, None, False, True)
    f = _Objective(gp, obs, specs, fixed, (), "autograd", False)
    theta = np.array([-0.3, 0.2, -0.5, 0.4, -4.0, -3.0, -5.0, 0.1])
    assert theta.size == len(specs)
    h = 1e-5
    with _few_threads("autograd", gp, 100):
        val, grad = f(theta)
        fd = np.array(
            [
                (f(theta + h * e)[0] - f(theta - h * e)[0]) / (2 * h)
                for e in np.eye(theta.size)
            ]
        )
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


def test_optimum_is_a_maximum_of_an_independent_likelihood():
    X, y = _series()
    res = gpgrad.fit(gpgrad.GP(K.RBF()), X, y, restarts=2)
    p = res.params
    args = (p["lengthscale"], p["variance"], p["noise.value"], p["mean"])
    best = _rbf_lml(X, y, *args)
    assert res.log_marginal_likelihood == pytest.approx(best, rel=1e-9)
    # every single-parameter perturbation lowers the likelihood
    for i in range(4):
        for f in (0.97, 1.03):
            a = list(args)
            a[i] = a[i] * f if i < 3 else a[i] + (f - 1.0)
            assert _rbf_lml(X, y, *a) < best
    assert res.on_bound == []
    assert res.fitted == ["variance", "lengthscale", "noise.value", "mean"]
    assert isinstance(res.gp, gpgrad.GP) and res.gp.backend == "numpy"


def test_recovers_known_hyperparameters_from_a_prior_sample():
    rng = np.random.default_rng(3)
    X = np.sort(rng.uniform(0, 10, 120))[:, None]
    kern = K.RBF(lengthscale=0.8, variance=2.0)
    C = kern(X) + 1e-10 * np.eye(120)
    f = np.linalg.cholesky(C) @ rng.normal(size=120)
    y = f + 0.5 + math.sqrt(0.01) * rng.normal(size=120)
    res = gpgrad.fit(gpgrad.GP(K.RBF()), X, y, restarts=2, seed=1)
    p = res.params
    assert p["lengthscale"] == pytest.approx(0.8, rel=0.2)
    assert p["noise.value"] == pytest.approx(0.01, rel=0.5)
    assert 0.5 < p["variance"] < 8.0


def test_derivative_noise_is_fitted_per_kind():
    rng = np.random.default_rng(4)
    X = rng.uniform(-2, 2, (40, 1))
    Xg = rng.uniform(-2, 2, (60, 1))
    y = np.sin(2 * X[:, 0]) + 0.01 * rng.normal(size=40)  # noise var 1e-4
    G = 2 * np.cos(2 * Xg) + 0.3 * rng.normal(size=(60, 1))  # noise var 0.09
    res = gpgrad.fit(
        gpgrad.GP(K.RBF()), gpgrad.values(X, y), gpgrad.gradients(Xg, G), restarts=1
    )
    assert res.params["noise.gradient"] == pytest.approx(0.09, rel=0.4)
    assert res.params["noise.value"] < 1e-3
    # an observation that carries its own noise fixes that kind
    res2 = gpgrad.fit(
        gpgrad.GP(K.RBF()),
        gpgrad.values(X, y),
        gpgrad.gradients(Xg, G, noise=0.09),
        restarts=1,
    )
    assert "noise.gradient" not in res2.params
    assert "noise.gradient" not in res2.fitted


def test_derivative_only_data_fits_no_mean():
    rng = np.random.default_rng(5)
    Xg = rng.uniform(-2, 2, (25, 1))
    G = np.cos(Xg) + 0.05 * rng.normal(size=(25, 1))
    res = gpgrad.fit(gpgrad.GP(K.RBF()), gpgrad.gradients(Xg, G), restarts=1)
    assert "mean" not in res.fitted
    g = res.posterior.gradient(np.array([[0.0], [1.0]]))
    np.testing.assert_allclose(g.mean[:, 0], np.cos([0.0, 1.0]), atol=0.1)


def test_fixed_names_and_values():
    X, y = _series()
    gp = gpgrad.GP(K.RBF(lengthscale=0.7), noise=0.003)
    res = gpgrad.fit(gp, X, y, fixed=["lengthscale", "noise.value"], restarts=1)
    assert res.params["lengthscale"] == 0.7
    assert res.params["noise.value"] == 0.003
    assert res.fitted == ["variance", "mean"]
    res = gpgrad.fit(gp, X, y, fixed={"mean": 2.0, "variance": 1.5}, restarts=1)
    assert res.params["mean"] == 2.0 and res.params["variance"] == 1.5
    # the free parameters are at a maximum of the independent likelihood
    p = res.params
    args = [p["lengthscale"], 1.5, p["noise.value"], 2.0]
    best = _rbf_lml(X, y, *args)
    for f in (0.97, 1.03):
        assert _rbf_lml(X, y, args[0] * f, *args[1:]) < best


def test_batched_torch_matches_looped_numpy():
    X1, y1 = _series(seed=6)
    X2, y2 = _series(seed=7, noise=0.2)
    Xb = torch.as_tensor(np.stack([X1, X2]))
    yb = torch.as_tensor(np.stack([y1, 3 * y2]))
    res = gpgrad.fit(gpgrad.GP(K.Matern52(), backend="torch"), Xb, yb, restarts=2)
    assert torch.is_tensor(res.params["variance"])
    assert res.log_marginal_likelihood.shape == (2,)
    for b, (X, y) in enumerate([(X1, y1), (X2, 3 * y2)]):
        one = gpgrad.fit(gpgrad.GP(K.Matern52()), X, y, restarts=2)
        assert float(res.log_marginal_likelihood[b]) == pytest.approx(
            one.log_marginal_likelihood, abs=1e-4
        )
        for name in ("variance", "noise.value", "mean"):
            assert float(res.params[name][b]) == pytest.approx(
                one.params[name], rel=1e-2
            )
        ls = float(res.params["lengthscale"].reshape(2)[b])
        assert ls == pytest.approx(one.params["lengthscale"], rel=1e-2)


def _batch_of_series(seeds, noises, scales):
    pairs = [_series(seed=s, noise=n) for s, n in zip(seeds, noises)]
    Xb = torch.as_tensor(np.stack([X for X, _ in pairs]))
    yb = torch.as_tensor(np.stack([c * y for (_, y), c in zip(pairs, scales)]))
    return Xb, yb


def test_each_problem_of_a_batch_is_optimized_on_its_own():
    # a problem's fit does not depend on the other problems in its batch:
    # every problem has its own line search, memory and stopping test
    gp = gpgrad.GP(K.Matern52(), backend="torch")
    Xb, yb = _batch_of_series([6, 7, 8], [0.05, 0.2, 0.01], [1.0, 3.0, 0.1])
    together = gpgrad.fit(gp, Xb, yb, restarts=1)
    alone = gpgrad.fit(gp, Xb[:1], yb[:1], restarts=1)
    pair = gpgrad.fit(gp, Xb[1:], yb[1:], restarts=1)
    for name in ("variance", "lengthscale", "noise.value", "mean"):
        a = np.asarray(together.params[name]).reshape(3)
        b = np.concatenate(
            [
                np.asarray(alone.params[name]).reshape(1),
                np.asarray(pair.params[name]).reshape(2),
            ]
        )
        np.testing.assert_allclose(a, b, rtol=1e-9, err_msg=name)
    # and each reaches its own single-problem optimum (to 10× the stopping
    # test's relative change of the loss, 1e-6 per step)
    for b in range(3):
        one = gpgrad.fit(
            gpgrad.GP(K.Matern52()), Xb[b].numpy(), yb[b].numpy(), restarts=1
        )
        assert float(together.log_marginal_likelihood[b]) == pytest.approx(
            one.log_marginal_likelihood, rel=1e-5
        )


def test_a_batch_evaluates_only_the_problems_still_searching(monkeypatch):
    from gpgrad import fit as F

    gp = gpgrad.GP(K.Matern52(), backend="torch")
    Xb, yb = _batch_of_series([6, 7, 8, 9], [0.05, 0.2, 0.01, 0.1], [1, 3, 0.1, 2])
    sizes = []
    real = F._sub_objective
    monkeypatch.setattr(
        F, "_sub_objective", lambda o, m: sizes.append(len(m)) or real(o, m)
    )
    compact = gpgrad.fit(gp, Xb, yb, restarts=1)
    assert sizes and sizes == sorted(sizes, reverse=True) and sizes[0] <= 2
    monkeypatch.setattr(F, "COMPACT_FRACTION", -1.0)  # never
    sizes.clear()
    full = gpgrad.fit(gp, Xb, yb, restarts=1)
    assert sizes == []
    np.testing.assert_allclose(
        np.asarray(compact.log_marginal_likelihood),
        np.asarray(full.log_marginal_likelihood),
        rtol=1e-10,
    )
    for name in ("variance", "lengthscale", "noise.value", "mean"):
        np.testing.assert_allclose(
            np.asarray(compact.params[name]),
            np.asarray(full.params[name]),
            rtol=1e-6,
            err_msg=name,
        )
    # a functional with fields (directions): every problem stays in the
    # evaluations
    U = torch.ones(30, 1, dtype=torch.float64)
    obs = [gpgrad.values(Xb, yb), gpgrad.directional(Xb, U, yb, noise=0.1)]
    sizes.clear()
    monkeypatch.setattr(F, "COMPACT_FRACTION", 0.5)
    res = gpgrad.fit(gp, *obs, restarts=1)
    assert sizes == [] and res.log_marginal_likelihood.shape == (4,)


def test_a_batch_reports_which_problems_did_not_converge():
    gp = gpgrad.GP(K.Matern52(), backend="torch")
    Xb, yb = _batch_of_series([6, 7], [0.05, 0.2], [1.0, 3.0])
    with pytest.warns(FitWarning, match="did not converge for 2 of 2 problems"):
        gpgrad.fit(gp, Xb, yb, restarts=1, maxiter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FitWarning)
        gpgrad.fit(gp, Xb, yb, restarts=1)


def test_torch_float32_gp_keeps_its_dtype():
    X, y = _series()
    gp = gpgrad.GP(K.RBF(), backend="torch", dtype=torch.float32)
    res = gpgrad.fit(gp, X, y, restarts=1)
    assert res.params["lengthscale"].dtype == torch.float32
    assert res.posterior.value(X[:3]).mean.dtype == torch.float32
    ref = gpgrad.fit(gpgrad.GP(K.RBF()), X, y, restarts=1)
    assert float(res.params["lengthscale"]) == pytest.approx(
        ref.params["lengthscale"], rel=1e-6
    )


def test_finite_difference_path_finds_the_same_optimum():
    X, y = _series()
    a = gpgrad.fit(gpgrad.GP(K.Matern52()), X, y, restarts=1)
    b = gpgrad.fit(
        gpgrad.GP(K.Matern52()), X, y, restarts=1, gradient="finite-difference"
    )
    assert b.gradient == "finite-difference" and a.gradient == "autograd"
    assert b.log_marginal_likelihood == pytest.approx(
        a.log_marginal_likelihood, abs=1e-4
    )


def test_normalize_y_reaches_the_same_likelihood():
    X, y = _series()
    y = 100.0 * y
    a = gpgrad.fit(gpgrad.GP(K.RBF()), X, y, restarts=2)
    b = gpgrad.fit(gpgrad.GP(K.RBF(), normalize_y=True), X, y, restarts=2)
    assert b.log_marginal_likelihood == pytest.approx(
        a.log_marginal_likelihood, abs=1e-3
    )
    Xs = np.array([[1.0], [2.5]])
    np.testing.assert_allclose(
        b.posterior.gradient(Xs).mean, a.posterior.gradient(Xs).mean, rtol=1e-3
    )


def test_ard_separates_a_relevant_from_an_irrelevant_input():
    rng = np.random.default_rng(8)
    X = rng.uniform(-1, 1, (40, 2))
    y = np.sin(3 * X[:, 0]) + 0.01 * rng.normal(size=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)  # the irrelevant one may hit it
        res = gpgrad.fit(gpgrad.GP(K.RBF()), X, y, ard=True, restarts=1)
    ls = res.params["lengthscale"]
    assert ls.shape == (2,)
    assert ls[1] > 5 * ls[0]


def test_noise_free_data_warn_about_the_lower_bound():
    X = np.linspace(0, 3, 12)[:, None]
    y = np.sin(X[:, 0])
    with pytest.warns(FitWarning, match=r"noise.value = .* sits on its lower bound"):
        res = gpgrad.fit(gpgrad.GP(K.RBF()), X, y, restarts=1)
    assert res.on_bound == ["noise.value"]
    assert res.params["noise.value"] <= 1.01 * res.bounds["noise.value"][0]


def test_user_bounds_are_respected():
    X, y = _series()
    with pytest.warns(FitWarning, match="lengthscale .* upper bound"):
        res = gpgrad.fit(
            gpgrad.GP(K.RBF()), X, y, bounds={"lengthscale": (0.01, 0.1)}, restarts=1
        )
    assert res.params["lengthscale"] == pytest.approx(0.1, rel=1e-3)


def test_progress_reports(capsys):
    X, y = _series()
    seen = []
    gpgrad.fit(gpgrad.GP(K.RBF()), X, y, restarts=2, progress=lambda *a: seen.append(a))
    assert {a[0] for a in seen} == {1, 2}
    assert all(isinstance(a[2], float) for a in seen)
    gpgrad.fit(gpgrad.GP(K.RBF()), X, y, restarts=2, progress=True)
    err = capsys.readouterr().err
    assert "start 2/2 done, log marginal likelihood" in err


def test_composite_kernel_names():
    X, y = _series()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)  # one part may switch off
        res = gpgrad.fit(gpgrad.GP(K.RBF() + K.Matern52()), X, y, restarts=1)
    assert {"0.lengthscale", "1.lengthscale", "0.variance", "1.variance"} <= set(
        res.params
    )
    assert "noise.value" in res.params and "mean" in res.params
    assert "FitResult" not in res.summary()
    assert "0.lengthscale" in res.summary()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"fixed": ["lenghtscale"]},
            ValueError,
            "unknown hyperparameter 'lenghtscale'",
        ),
        ({"bounds": {"variance": (2.0, 1.0)}}, ValueError, "0 < lower < upper"),
        ({"bounds": {"variance": 3.0}}, ValueError, r"must be a pair \(lower, upper\)"),
        ({"restarts": 0}, ValueError, "restarts must be a positive integer"),
        ({"gradient": "exact"}, ValueError, "gradient must be 'auto'"),
        ({"progress": "yes"}, TypeError, "progress must be True, False or a callable"),
        ({"fixed": 3}, TypeError, "fixed must be a list of names"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    X, y = _series(n=8)
    with pytest.raises(exc, match=match):
        gpgrad.fit(gpgrad.GP(K.RBF()), X, y, **kwargs)


def test_bad_models():
    X, y = _series(n=8)
    with pytest.raises(TypeError, match="fit expects a gpgrad.GP"):
        gpgrad.fit(K.RBF(), X, y)
    with pytest.raises(ValueError, match="batched problems are fitted with"):
        gpgrad.fit(gpgrad.GP(K.RBF()), np.stack([X, X]), np.stack([y, y]))
    with pytest.raises(ValueError, match="backend='torch' fits with autograd"):
        gpgrad.fit(
            gpgrad.GP(K.RBF(), backend="torch"), X, y, gradient="finite-difference"
        )


def test_without_torch_falls_back_to_finite_differences(monkeypatch):
    import sys

    mod = sys.modules["gpgrad.fit"]
    monkeypatch.setattr(mod, "_torch_available", lambda: False)
    X, y = _series(n=12)
    res = gpgrad.fit(gpgrad.GP(K.RBF()), X, y, restarts=1)
    assert res.gradient == "finite-difference"
    with pytest.raises(ValueError, match="gradient='autograd' needs torch"):
        gpgrad.fit(gpgrad.GP(K.RBF()), X, y, gradient="autograd")


def test_companions_reachable_from_the_function():
    assert gpgrad.fit.FitWarning is FitWarning
    assert issubclass(FitWarning, gpgrad.GPGradWarning)
    assert gpgrad.fit.FitResult.__name__ == "FitResult"


def test_point_subset_keeps_shared_points_and_per_entry_noise():
    from gpgrad.fit import _point_subset

    rng = np.random.default_rng(0)
    X, Xo = rng.uniform(size=(40, 3)), rng.uniform(size=(30, 3))
    y, G, Go = X.sum(1), np.cos(X), np.cos(Xo)
    noise = rng.uniform(0.1, 0.2, (40, 3))
    obs = [
        gpgrad.values(X, y),
        gpgrad.gradients(X, G, noise=noise),
        gpgrad.gradients(Xo, Go),
    ]
    sub = _point_subset(gpgrad.GP(K.RBF())._parse(obs), 0.25, seed=1)
    assert [f.kind for f in sub] == ["value", "gradient", "gradient"]
    assert sub[0].X.shape == (10, 3) and sub[2].X.shape == (8, 3)
    # values and gradients at the same inputs keep the same points
    np.testing.assert_array_equal(sub[0].X, sub[1].X)
    idx = [int(np.flatnonzero((X == x).all(1))[0]) for x in sub[0].X]
    np.testing.assert_array_equal(sub[0].y, y[idx])
    np.testing.assert_array_equal(sub[1].y, G[idx])
    np.testing.assert_array_equal(sub[1].noise, noise[idx])
    jdx = [int(np.flatnonzero((Xo == x).all(1))[0]) for x in sub[2].X]
    np.testing.assert_array_equal(sub[2].y, Go[jdx])


def test_iterative_fits_start_on_a_subset(monkeypatch):
    from gpgrad import fit as F

    monkeypatch.setattr(F, "SUBSET_MIN_ROWS", 40)
    rng = np.random.default_rng(2)
    X = rng.uniform(0, 1, (16, 2))
    e = 0.05 * rng.normal(size=(16, 3))
    obs = [
        gpgrad.values(X, np.sin(3 * X).sum(1) + e[:, 0]),
        gpgrad.gradients(X, 3 * np.cos(3 * X) + e[:, 1:]),
    ]
    starts = []

    def progress(start, evaluation, lml):
        if not starts or starts[-1] != start:
            starts.append(start)

    calls = []
    real = F._point_subset
    monkeypatch.setattr(F, "_point_subset", lambda *a: calls.append(a[1]) or real(*a))
    # the choice as if the problem were large (the fits themselves dense: the
    # iterative likelihood is tested in test_large.py)
    from gpgrad.solvers import select

    real_choose = select.choose
    monkeypatch.setattr(select, "choose", lambda *a: ("cg", None))
    monkeypatch.setattr(select, "AUTO_CG_MIN_ROWS", 0)
    # short starts: their order is what is checked here
    monkeypatch.setattr(F, "STALL_EVALUATIONS", 3)
    with pytest.warns(FitWarning, match="did not converge"):
        res = gpgrad.fit(
            gpgrad.GP(K.Matern52()), *obs, restarts=2, maxiter=2, progress=progress
        )
    assert calls == [F.SUBSET_FRACTION]
    # two starts on the subset, then the whole problem once from its optimum
    assert starts == [1, 2, 1]
    assert np.isfinite(float(res.log_marginal_likelihood))
    # a problem the automatic choice solves densely fits as before
    monkeypatch.setattr(select, "choose", real_choose)
    calls.clear()
    gpgrad.fit(gpgrad.GP(K.Matern52()), *obs, restarts=1)
    assert calls == []


def _cg_objective():
    """A small problem's objective on the iterative solver (4 probes), its GP
    and its parsed observations."""
    rng = np.random.default_rng(3)
    X = rng.uniform(0, 1, (12, 2))
    obs = gpgrad.GP(K.Matern52())._parse(
        [gpgrad.values(X, np.sin(3 * X).sum(1)), gpgrad.gradients(X, np.cos(X))]
    )
    gp = gpgrad.GP(K.Matern52(), method=gpgrad.CG(probes=4))
    specs, fixed = _specs(gp, obs, (), None, None, False, True)
    obj = _Objective(gp, obs, specs, fixed, (), "autograd", False)
    assert obj.cg is not None
    return gp, obs, obj


def test_iterative_evaluations_over_the_budget_fail_and_the_optimizer_backs_off(
    monkeypatch,
):
    from gpgrad import fit as F

    gp, obs, obj = _cg_objective()
    theta = obj.space.start()
    f0, g0 = obj(theta)
    assert f0 < F._BAD_OBJECTIVE and obj.cg_iterations > 1
    # a budget below what this θ needs: the evaluation fails like an
    # unfactorable one (the optimizer backs off), no warning escapes
    monkeypatch.setattr(F, "CG_BUDGET_MIN", 1)
    monkeypatch.setattr(F, "CG_BUDGET_FACTOR", 1)
    obj.cg_iterations = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f1, g1 = obj(theta)
    assert f1 == F._BAD_OBJECTIVE and not np.any(g1)
    assert obj.refused_since_best() == 1
    # a whole fit that ends next to refused trial points says so: from the
    # 5th evaluation on, every trial point is over the budget
    monkeypatch.setattr(F, "CG_BUDGET_FACTOR", 4)
    monkeypatch.setattr(F, "CG_BUDGET_MIN", 1000)

    def tighten(start, evaluation, lml):
        if evaluation == 5:
            F.CG_BUDGET_FACTOR, F.CG_BUDGET_MIN = 0, 1

    with pytest.warns(FitWarning, match="iteration budget"):
        gpgrad.fit(gp, *obs, restarts=1, progress=tighten)
    # a dense problem has no budget
    space = obj.space
    dense = _Objective(
        gpgrad.GP(K.Matern52()),
        obs,
        space.specs,
        space.fixed_values,
        (),
        "autograd",
        False,
    )
    assert dense.cg is None


def _plateau_objective(monkeypatch, wobble):
    """An :class:`_Objective` on the iterative solver whose log p is a
    concave quadratic of size 10⁶ in θ, its optimum inside the bounds 0.3 from
    the start in every coordinate, plus what a stochastic estimate adds: a
    value that wobbles by ``wobble`` nats between nearby points and a gradient
    that is not the value's (both pseudo-random in θ, deterministic)."""
    gp, obs, obj = _cg_objective()
    peak = torch.as_tensor(obj.space.start() + 0.3)

    def lml(t):
        d = t.detach()
        smooth = 1e6 - 1e4 * ((t - peak) ** 2).sum()
        value_noise = wobble * torch.sin(1e3 * d).sum()
        grad_noise = ((t - d) * 100 * wobble * torch.sin(777 * d)).sum()  # value 0
        return smooth + value_noise + grad_noise

    monkeypatch.setattr(obj, "_lml", lml)
    return obj


def _run_one_start(monkeypatch, obj):
    from gpgrad import fit as F

    seen = []
    real_track = obj._track
    monkeypatch.setattr(
        obj, "_track", lambda th, tot, m: seen.append(tot) or real_track(th, tot, m)
    )
    # L-BFGS-B's own tolerance far below the wobble
    settings = F._Settings(
        restarts=1,
        seed=0,
        maxiter=300,
        gradient="autograd",
        progress=False,
        start=None,
        tol=1e-15,
    )
    obj.new_start(1)
    return F._minimize(obj, obj.space.start(), obj.space, settings), seen


def test_a_stochastic_objective_stops_when_it_no_longer_improves(monkeypatch):
    from gpgrad import fit as F

    obj = _plateau_objective(monkeypatch, wobble=3.0)
    res, seen = _run_one_start(monkeypatch, obj)
    assert res.success, res.message
    assert "resolution" in res.message
    # the start ended STALL_EVALUATIONS evaluations after the last gain above
    # STALL_RTOL of log p, and returned the best point it saw
    best = int(np.argmax(seen))
    gains = np.diff(np.maximum.accumulate(seen))
    last_gain = np.flatnonzero(gains > F.STALL_RTOL * 1e6)[-1] + 1
    assert len(seen) - 1 - last_gain == F.STALL_EVALUATIONS
    assert best >= last_gain
    np.testing.assert_array_equal(res.x, obj.best.theta)
    assert seen[best] == float(np.sum(obj.member_lml(res.x)))
    # near the optimum (within ~10 nats: |θ − peak| ≲ 0.03)
    assert np.all(np.abs(res.x - (obj.space.start() + 0.3)) < 0.1)
    # without the rule L-BFGS-B takes more evaluations to the same point
    obj2 = _plateau_objective(monkeypatch, wobble=3.0)
    monkeypatch.setattr(F, "STALL_EVALUATIONS", 10**6)
    res2, seen2 = _run_one_start(monkeypatch, obj2)
    assert len(seen2) > len(seen) and max(seen2) - max(seen) < 10
    # a new start forgets the old one's best
    obj.new_start(2)
    assert obj.best is None


def test_a_dense_objective_has_no_stall_rule(monkeypatch):
    obj = _plateau_objective(monkeypatch, wobble=0.0)
    obj.cg = None
    for _ in range(30):
        obj(obj.space.start())  # the same point: no gain, but no stop
    assert obj.best is None


def test_read_only_inputs_fit_without_a_warning():
    # scikit-learn's checks pass read-only arrays; torch warns when it wraps
    # one (and could write to it), so the fit copies them first
    X, y = _series(seed=3)
    X.setflags(write=False)
    y.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", FitWarning)
        gpgrad.fit(gpgrad.GP(K.RBF()), X, y, restarts=1)
    assert not X.flags.writeable and not y.flags.writeable
