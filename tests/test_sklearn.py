"""gpgrad.sklearn: scikit-learn's estimator checks, the chain rule through
pipelines (against finite differences and against the equivalent GP on raw
inputs), GridSearchCV over kernels, clone, gradient observations."""

import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.linear_model import LinearRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import PolynomialFeatures, StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import gpgrad  # noqa: E402
from gpgrad import kernels  # noqa: E402
from gpgrad.sklearn import (  # noqa: E402
    GradientGPRegressor,
    fit_with_gradients,
    predict_gradient,
    predict_hessian,
)

# scikit-learn checks that are not run, each with its reason
EXPECTED_FAILED_CHECKS = {
    # needs SCIPY_ARRAY_API=1 in the environment before scipy is imported, so it
    # cannot run inside this test process; test_array_api_numpy_dispatch runs
    # it in a subprocess with the variable set
    "check_array_api_input": "needs SCIPY_ARRAY_API=1 before scipy is imported",
}


def _f(X):
    return np.sin(X[:, 0] / 50.0) + 30.0 * X[:, 1] ** 2


def _df(X):
    return np.column_stack([np.cos(X[:, 0] / 50.0) / 50.0, 60.0 * X[:, 1]])


def _data(n=25, seed=0):
    # two inputs on very different scales, so a missing chain rule shows
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.uniform(0, 300, n), rng.uniform(-0.2, 0.2, n)])
    return X, _f(X) + 1e-3 * rng.normal(size=n)


# every scikit-learn estimator check, on the conditioning path (fast); the
# fitting path runs them all in test_check_estimator_with_fitting (slow)
@parametrize_with_checks(
    [GradientGPRegressor(optimizer=None, noise=0.1)],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS,
)
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        check(estimator)


@pytest.mark.slow
def test_check_estimator_with_fitting():
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        check_estimator(
            GradientGPRegressor(restarts=1, maxiter=30),
            expected_failed_checks=EXPECTED_FAILED_CHECKS,
        )


@pytest.mark.slow
def test_array_api_numpy_dispatch():
    code = (
        "from sklearn.utils.estimator_checks import check_array_api_input\n"
        "from gpgrad.sklearn import GradientGPRegressor\n"
        "check_array_api_input('GradientGPRegressor', "
        "GradientGPRegressor(optimizer=None, noise=0.1), array_namespace='numpy', "
        "expect_only_array_outputs=False)\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, SCIPY_ARRAY_API="1", PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# --------------------------------------------------------------------------
# the chain rule through pipelines


def test_pipeline_gradient_in_original_units_vs_finite_differences():
    X, y = _data()
    pipe = make_pipeline(StandardScaler(), GradientGPRegressor(restarts=1))
    pipe.fit(X, y)  # (a scalar lengthscale on the raw inputs could not fit)
    Xq = np.array([[80.0, 0.05], [150.0, -0.1], [220.0, 0.12]])
    g, s = predict_gradient(pipe, Xq, return_std=True)
    assert g.shape == s.shape == (3, 2)
    # central differences of the pipeline's own prediction, in x's units
    fd = np.empty_like(g)
    for j, h in enumerate([1e-2, 1e-6]):
        e = np.zeros(2)
        e[j] = h
        fd[:, j] = (pipe.predict(Xq + e) - pipe.predict(Xq - e)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-9)
    # and the fitted model has learned the derivative in the original units
    true = _df(Xq)
    assert np.all(np.abs(g - true) < 0.15 * np.abs(true).max(0))
    # the estimator alone answers in the scaled units: a factor of the scale
    sc = pipe[0].scale_
    np.testing.assert_allclose(pipe[-1].predict_gradient(pipe[0].transform(Xq)), g * sc)
    H = predict_hessian(pipe, Xq)
    fdH = np.empty_like(H)
    for j, h in enumerate([1e-2, 1e-6]):
        e = np.zeros(2)
        e[j] = h
        fdH[:, :, j] = (
            predict_gradient(pipe, Xq + e) - predict_gradient(pipe, Xq - e)
        ) / (2 * h)
    np.testing.assert_allclose(H, fdH, rtol=1e-4, atol=1e-8 * np.abs(H).max())


@pytest.mark.parametrize("with_dy", [False, True])
def test_pipeline_scaler_equals_gp_on_raw_inputs(with_dy):
    # an RBF on z = (x - m)/s with lengthscale l is the RBF on x with l*s: the
    # two models must agree in means, stds, covariances and Hessians
    X, y = _data(15)
    dy = _df(X) if with_dy else None
    if with_dy:
        dy[::3, 1] = np.nan  # some entries not measured
    ls = np.array([0.8, 1.3])
    scaler = StandardScaler().fit(X)
    kw = dict(optimizer=None, noise=1e-4, gradient_noise=0.0)
    pipe = make_pipeline(
        StandardScaler(), GradientGPRegressor(kernels.RBF(lengthscale=ls), **kw)
    )
    fit_with_gradients(pipe, X, y, dy)
    # the derivative noise is in the estimator's (scaled) units; it is 0 here
    raw = GradientGPRegressor(kernels.RBF(lengthscale=ls * scaler.scale_), **kw)
    raw.fit(X, y, dy=dy)
    Xq = _data(4, seed=1)[0]
    np.testing.assert_allclose(pipe.predict(Xq), raw.predict(Xq), rtol=1e-6)
    for a, b in zip(
        predict_gradient(pipe, Xq, return_cov=True),
        raw.predict_gradient(Xq, return_cov=True),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-10 * np.abs(b).max())
    for a, b in zip(
        predict_hessian(pipe, Xq, return_std=True),
        raw.predict_hessian(Xq, return_std=True),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9 * np.abs(b).max())


def test_pipeline_rotation_equals_gp_on_raw_inputs():
    # PCA without whitening is a rotation: an isotropic RBF is unchanged, and
    # the chain rule mixes the gradient's entries (non-diagonal A)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(14, 3))
    y = np.sin(X[:, 0]) * X[:, 1] + X[:, 2]
    dy = np.column_stack([np.cos(X[:, 0]) * X[:, 1], np.sin(X[:, 0]), np.ones(len(X))])
    kw = dict(optimizer=None, noise=1e-4, gradient_noise=1e-6)
    k = kernels.RBF(lengthscale=1.1)
    pipe = make_pipeline(PCA(n_components=3), GradientGPRegressor(k, **kw))
    fit_with_gradients(pipe, X, y, dy)
    raw = GradientGPRegressor(k, **kw).fit(X, y, dy=dy)
    Xq = rng.normal(size=(3, 3))
    for a, b in zip(
        predict_gradient(pipe, Xq, return_cov=True),
        raw.predict_gradient(Xq, return_cov=True),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for a, b in zip(
        predict_hessian(pipe, Xq, return_std=True),
        raw.predict_hessian(Xq, return_std=True),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    dy[0, 0] = np.nan
    with pytest.raises(ValueError, match="per-feature input transform"):
        fit_with_gradients(pipe, X, y, dy)


def test_pipeline_with_dataframe_inputs():
    pd = pytest.importorskip("pandas")
    X, y = _data(12)
    df = pd.DataFrame(X, columns=["t", "u"])
    kw = dict(optimizer=None, noise=1e-4)
    pipe = make_pipeline(StandardScaler(), GradientGPRegressor(**kw)).fit(df, y)
    ref = make_pipeline(StandardScaler(), GradientGPRegressor(**kw)).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about feature names
        g = predict_gradient(pipe, df.iloc[:3])
    np.testing.assert_allclose(g, predict_gradient(ref, X[:3]))


def test_pipeline_errors():
    X, y = _data(10)
    poly = make_pipeline(
        PolynomialFeatures(2), GradientGPRegressor(optimizer=None, noise=0.1)
    ).fit(X, y)
    with pytest.raises(ValueError, match="must be an affine map"):
        predict_gradient(poly, X[:2])
    lin = make_pipeline(StandardScaler(), LinearRegression()).fit(X, y)
    with pytest.raises(TypeError, match="last step must be a GradientGPRegressor"):
        predict_gradient(lin, X[:2])
    with pytest.raises(TypeError, match="expected a GradientGPRegressor or a Pipeline"):
        predict_hessian(LinearRegression(), X[:2])
    pca = make_pipeline(PCA(n_components=1), GradientGPRegressor(optimizer=None))
    with pytest.raises(ValueError, match="square input transform"):
        fit_with_gradients(pca, X, y, _df(X))
    with pytest.raises(ValueError, match=r"dy must have the shape of X \(10, 2\)"):
        fit_with_gradients(pca, X, y, _df(X)[:, :1])


# --------------------------------------------------------------------------
# model selection, clone, pickling


def test_grid_search_over_kernels_and_cross_val_score():
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 6, (16, 1))
    y = np.sin(X[:, 0])
    est = GradientGPRegressor(noise=1e-6, restarts=1, maxiter=60)
    grid = GridSearchCV(est, {"kernel": [kernels.Matern12(), kernels.RBF()]}, cv=2).fit(
        X, y
    )
    assert isinstance(grid.best_params_["kernel"], kernels.RBF)
    assert grid.cv_results_["mean_test_score"][1] > 0.95
    # the grid's kernels were cloned, never fitted in place
    assert grid.param_grid["kernel"][1].parameters()["lengthscale"] == 1.0
    g = predict_gradient(grid, X[:3])  # the search's best estimator
    np.testing.assert_allclose(g[:, 0], np.cos(X[:3, 0]), atol=0.1)
    pipe = make_pipeline(StandardScaler(), clone(est))
    assert cross_val_score(pipe, X, y, cv=2).min() > 0.9


def test_clone_and_params():
    k = kernels.Matern52(lengthscale=0.5)
    est = GradientGPRegressor(k, restarts=2, ard=True)
    assert est.get_params()["kernel"] is k
    c = clone(est)
    assert c.get_params()["restarts"] == 2 and c.ard is True
    assert c.kernel is not k and repr(c.kernel) == repr(k)
    est.set_params(noise=0.01, kernel=kernels.RBF())
    assert est.noise == 0.01 and isinstance(est.kernel, kernels.RBF)
    X, y = _data(12)
    est.set_params(optimizer=None).fit(X, y)
    assert hasattr(est, "posterior_") and not hasattr(clone(est), "posterior_")


def test_pickle_round_trip():
    X, y = _data(12)
    est = GradientGPRegressor(restarts=1).fit(X, y, dy=_df(X))
    back = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(
        back.predict_gradient(X[:3]), est.predict_gradient(X[:3])
    )
    assert back.log_marginal_likelihood_value_ == est.log_marginal_likelihood_value_


# --------------------------------------------------------------------------
# the estimator itself


def test_fit_predict_score_and_likelihood_match_gpgrad():
    rng = np.random.default_rng(1)
    X = rng.uniform(0, 4, (20, 1))
    y = np.sin(2 * X[:, 0]) + 0.05 * rng.normal(size=20)
    est = GradientGPRegressor(kernels.Matern52(), restarts=1).fit(X, y)
    res = gpgrad.fit(gpgrad.GP(kernels.Matern52()), X, y, restarts=1)
    assert est.log_marginal_likelihood_value_ == pytest.approx(
        res.log_marginal_likelihood, rel=1e-8
    )
    assert est.hyperparameters_ == pytest.approx(res.params, rel=1e-8)
    Xq = np.linspace(0.5, 3.5, 7)[:, None]
    m, s = est.predict(Xq, return_std=True)
    m2, c = est.predict(Xq, return_cov=True)
    np.testing.assert_allclose(m, res.posterior.value(Xq).mean)
    np.testing.assert_allclose(s, np.sqrt(np.diag(c)), rtol=1e-8)
    g, gs = est.predict_gradient(Xq, return_std=True)
    np.testing.assert_allclose(g, res.posterior.gradient(Xq).mean)
    np.testing.assert_allclose(gs, res.posterior.gradient(Xq).std)
    np.testing.assert_allclose(g[:, 0], 2 * np.cos(2 * Xq[:, 0]), atol=0.5)
    assert np.all(gs > 0)
    assert est.score(X, y) > 0.95
    assert est.n_features_in_ == 1 and est.X_train_.shape == (20, 1)


def test_gradient_observations_with_missing_entries():
    rng = np.random.default_rng(2)
    X = rng.uniform(-1, 1, (10, 2))
    y = X[:, 0] ** 2 + np.sin(X[:, 1])
    dy = np.column_stack([2 * X[:, 0], np.cos(X[:, 1])])
    dy[[1, 4], 0] = np.nan
    dy[7, 1] = np.nan
    k = kernels.RBF(lengthscale=[0.7, 0.9])
    est = GradientGPRegressor(k, optimizer=None, noise=1e-6, gradient_noise=1e-6)
    est.fit(X, y, dy=dy)
    rows, cols = np.nonzero(~np.isnan(dy))
    post = gpgrad.GP(k, noise=1e-6).condition(
        gpgrad.values(X, y), gpgrad.partials(X[rows], cols, dy[rows, cols], noise=1e-6)
    )
    Xq = rng.uniform(-1, 1, (4, 2))
    np.testing.assert_allclose(est.predict_gradient(Xq), post.gradient(Xq).mean)
    # gradients make the derivative estimate better than values alone
    alone = GradientGPRegressor(k, optimizer=None, noise=1e-6).fit(X, y)
    true = np.column_stack([2 * Xq[:, 0], np.cos(Xq[:, 1])])
    err = np.abs(est.predict_gradient(Xq) - true).max()
    assert err < 0.5 * np.abs(alone.predict_gradient(Xq) - true).max()
    # fitting learns the one derivative noise level; an all-NaN dy is no data
    fitted = GradientGPRegressor(restarts=1).fit(X, y, dy=dy)
    assert "noise.partial" in fitted.hyperparameters_
    none = GradientGPRegressor(k, optimizer=None, noise=1e-6)
    none.fit(X, y, dy=np.full_like(dy, np.nan))
    np.testing.assert_allclose(none.predict(Xq), alone.predict(Xq))


def test_sample_y_and_hessian_shapes():
    X, y = _data(10)
    est = GradientGPRegressor(kernels.RBF(lengthscale=[100.0, 0.1]), optimizer=None)
    est.set_params(noise=1e-6).fit(X, y)
    Xq = X[:3] + 1.0
    S = est.sample_y(Xq, n_samples=4000, random_state=0)
    assert S.shape == (3, 4000)
    m, s = est.predict(Xq, return_std=True)
    np.testing.assert_allclose(S.mean(1), m, atol=5 * s.max() / np.sqrt(4000) + 1e-9)
    np.testing.assert_array_equal(S, est.sample_y(Xq, n_samples=4000, random_state=0))
    H, Hs = est.predict_hessian(Xq, return_std=True)
    assert H.shape == Hs.shape == (3, 2, 2)
    np.testing.assert_allclose(H, np.swapaxes(H, 1, 2))


def test_validation_messages():
    X, y = _data(8)
    with pytest.raises(TypeError, match="kernel must be a gpgrad kernel"):
        GradientGPRegressor(kernel="rbf").fit(X, y)
    with pytest.raises(ValueError, match="noise must be 'fit' or a non-negative"):
        GradientGPRegressor(noise=-1.0).fit(X, y)
    with pytest.raises(TypeError, match="gradient_noise must be 'fit' or a number"):
        GradientGPRegressor(gradient_noise="big").fit(X, y)
    with pytest.raises(ValueError, match="optimizer must be 'lbfgs' or None"):
        GradientGPRegressor(optimizer="adam").fit(X, y)
    with pytest.raises(
        ValueError, match=r"dy must have shape .* = \(8, 2\), got \(8, 1\)"
    ):
        GradientGPRegressor(optimizer=None).fit(X, y, dy=np.zeros((8, 1)))
    with pytest.raises(ValueError, match="dy contains infinity"):
        GradientGPRegressor(optimizer=None).fit(X, y, dy=np.full((8, 2), np.inf))
    with pytest.raises(ValueError, match="at least 2 samples, got 1 sample"):
        GradientGPRegressor().fit(X[:1], y[:1])
    est = GradientGPRegressor(optimizer=None, noise=0.1).fit(X, y)
    with pytest.raises(ValueError, match="at most one of return_std and return_cov"):
        est.predict_gradient(X, return_std=True, return_cov=True)
    with pytest.raises(ValueError, match="X has 3 features, but GradientGPRegressor"):
        est.predict_hessian(np.zeros((2, 3)))
