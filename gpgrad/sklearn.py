"""A scikit-learn estimator over gpgrad's Gaussian process.

:class:`GradientGPRegressor` speaks scikit-learn's language (``fit`` /
``predict(return_std=True)`` / ``score``, ``get_params`` / ``set_params``,
``clone``, ``Pipeline``, ``GridSearchCV``, ``cross_val_score``) and adds what
gpgrad is for: gradient observations in ``fit(X, y, dy=...)`` and posterior
gradients and Hessians in ``predict_gradient`` / ``predict_hessian``.

Input scaling and the chain rule
--------------------------------
Inside ``make_pipeline(StandardScaler(), GradientGPRegressor())`` the
estimator sees scaled inputs ``z = x A + b``, so its own ``predict_gradient``
answers ``∇_z f``. The module's functions :func:`predict_gradient`,
:func:`predict_hessian` and :func:`fit_with_gradients` take the whole pipeline
and work in the original units of ``x``:

.. math::

    ∇_x f = A ∇_z f, \\qquad H_x = A H_z A^\\top, \\qquad
    \\operatorname{Cov}(∇_x f) = A \\operatorname{Cov}(∇_z f) A^\\top .

``A`` and ``b`` are read from the pipeline's transformers (any affine ones:
``StandardScaler``, ``MinMaxScaler``, ``MaxAbsScaler``, ``PCA``, ...), and the
map is checked to be affine on the data; anything else is refused with a
``ValueError``. Values need no correction: ``pipe.predict(X, return_std=True)``
is already in the original units.

scikit-learn is an optional dependency: ``pip install "gpgrad[sklearn]"``.
"""

from __future__ import annotations

import copy
import numbers

import numpy as np

try:
    from sklearn.base import BaseEstimator, RegressorMixin
    from sklearn.pipeline import Pipeline
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_array, check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - exercised without scikit-learn
    raise ImportError(
        "gpgrad.sklearn needs scikit-learn >= 1.6: pip install 'gpgrad[sklearn]'"
    ) from exc

from . import kernels as _kernels
from .fit import fit as _fit
from .functionals import gradients, partials, values
from .gp import GP

__all__ = [
    "GradientGPRegressor",
    "fit_with_gradients",
    "predict_gradient",
    "predict_hessian",
]

_OPTIMIZERS = ("lbfgs", None)


def _check_noise(v, what):
    if isinstance(v, str) and v == "fit":
        return v
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        v = float(v)
        if np.isfinite(v) and v >= 0:
            return v
        raise ValueError(f"{what} must be 'fit' or a non-negative variance, got {v}")
    raise TypeError(f"{what} must be 'fit' or a number (a variance), got {v!r}")


class GradientGPRegressor(RegressorMixin, BaseEstimator):
    """Gaussian-process regression over values and gradients, scikit-learn style.

    The hyperparameters (the kernel's, the noise levels and a constant mean)
    are fitted by maximizing the log marginal likelihood with
    :func:`gpgrad.fit`; predictions come from the exact posterior of
    :class:`gpgrad.GP`, for the function and for its derivatives.

    Parameters
    ----------
    kernel : gpgrad.kernels.Kernel, optional
        The prior covariance (default ``gpgrad.kernels.RBF()``). The fit keeps
        its structure and starts from the data, so its hyperparameter values
        matter only for those listed in ``fixed`` or with ``optimizer=None``.
    noise : "fit" or float, default "fit"
        Noise variance of the values: fitted, or fixed at this value.
    gradient_noise : "fit" or float, default "fit"
        Noise variance of the gradient entries passed as ``dy``: fitted (one
        level for all entries), or fixed at this value. It is in the units of
        the inputs the estimator sees (the scaled ones inside a pipeline).
    normalize_y : bool, default False
        Standardize ``y`` before fitting (see :class:`gpgrad.GP`); predictions
        are in the original units either way.
    ard : bool, default False
        One lengthscale per input dimension.
    optimizer : {"lbfgs", None}, default "lbfgs"
        ``None`` keeps the kernel's hyperparameters and the noise as given
        (``noise="fit"`` then means ``1e-8``) and only conditions on the data.
    restarts : int, default 3
        Optimizer starts (the first one data-driven).
    maxiter : int, default 300
        L-BFGS-B iterations per start.
    fixed : list of str or dict, optional
        Hyperparameters kept fixed, by name (``"lengthscale"``, ``"variance"``,
        ``"mean"``, ...) as in :attr:`gpgrad.fit.FitResult.params`.
    bounds : dict, optional
        ``{name: (lower, upper)}`` replacing :func:`gpgrad.fit`'s defaults.
    random_state : int, RandomState or None, default 0
        Seed of the optimizer's random restarts.
    method : str, default "auto"
        The linear solver (see :class:`gpgrad.GP`).

    Attributes
    ----------
    gp_ : gpgrad.GP
        The GP with the fitted hyperparameters.
    posterior_ : gpgrad.Posterior
        The posterior given the training data.
    kernel_ : gpgrad.kernels.Kernel
        The fitted kernel.
    hyperparameters_ : dict
        Every hyperparameter by name (fitted or fixed).
    log_marginal_likelihood_value_ : float
        ``log p(y, dy)`` at the fitted hyperparameters.
    n_features_in_ : int
        Number of input dimensions seen in ``fit``.
    X_train_ : ndarray of shape (n_samples, n_features)
    y_train_ : ndarray of shape (n_samples,)
    dy_train_ : ndarray of shape (n_samples, n_features) or None
        The gradient observations (NaN where not measured).

    Examples
    --------
    >>> import numpy as np
    >>> from gpgrad.sklearn import GradientGPRegressor
    >>> X = np.linspace(0, 3, 12)[:, None]
    >>> est = GradientGPRegressor(restarts=1).fit(X, np.sin(X[:, 0]))
    >>> est.predict_gradient(X[:2]).shape
    (2, 1)
    """

    def __init__(
        self,
        kernel=None,
        *,
        noise="fit",
        gradient_noise="fit",
        normalize_y=False,
        ard=False,
        optimizer="lbfgs",
        restarts=3,
        maxiter=300,
        fixed=None,
        bounds=None,
        random_state=0,
        method="auto",
    ):
        self.kernel = kernel
        self.noise = noise
        self.gradient_noise = gradient_noise
        self.normalize_y = normalize_y
        self.ard = ard
        self.optimizer = optimizer
        self.restarts = restarts
        self.maxiter = maxiter
        self.fixed = fixed
        self.bounds = bounds
        self.random_state = random_state
        self.method = method

    # ------------------------------------------------------------------
    def fit(self, X, y, dy=None) -> GradientGPRegressor:
        """Fit the hyperparameters to values and, optionally, gradients.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Observed values ``f(X_i)``.
        dy : array-like of shape (n_samples, n_features), optional
            Observed gradients ``∇f(X_i)``; NaN marks an entry not measured
            (then the measured entries enter as partial derivatives).

        Returns
        -------
        self
        """
        if self.kernel is None:
            kernel = _kernels.RBF()
        elif isinstance(self.kernel, _kernels.Kernel):
            kernel = copy.deepcopy(self.kernel)
        else:
            raise TypeError(
                "kernel must be a gpgrad kernel (e.g. gpgrad.kernels.RBF()) or "
                f"None, got {type(self.kernel).__name__}"
            )
        noise = _check_noise(self.noise, "noise")
        gnoise = _check_noise(self.gradient_noise, "gradient_noise")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"optimizer must be 'lbfgs' or None, got {self.optimizer!r}"
            )
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        n, d = X.shape
        if n < 2 and self.optimizer is not None:
            raise ValueError(
                "fitting hyperparameters needs at least 2 samples, got 1 sample; "
                "pass optimizer=None to condition on one point"
            )
        obs = [values(X, y)]
        if dy is not None:
            dy = check_array(
                dy, dtype=np.float64, ensure_all_finite="allow-nan", input_name="dy"
            )
            if dy.shape != (n, d):
                raise ValueError(
                    f"dy must have shape (n_samples, n_features) = {(n, d)}, got "
                    f"{dy.shape}"
                )
            g = _gradient_observations(X, dy, None if gnoise == "fit" else gnoise)
            if g is not None:
                obs.append(g)

        gp_noise = 1e-8 if noise == "fit" else noise
        gp = GP(
            kernel, noise=gp_noise, normalize_y=self.normalize_y, method=self.method
        )
        if self.optimizer is None:
            self.gp_ = gp
            self.posterior_ = gp.condition(*obs)
            self.hyperparameters_ = dict(kernel.parameters())
            self.hyperparameters_["noise.value"] = gp_noise
        else:
            fixed = self.fixed
            if noise != "fit":
                if isinstance(fixed, dict):
                    fixed = {**fixed, "noise.value": noise}
                elif isinstance(fixed, str):
                    fixed = [fixed, "noise.value"]
                else:
                    fixed = [*(fixed or ()), "noise.value"]
            rs = self.random_state
            seed = (
                int(rs)
                if isinstance(rs, numbers.Integral)
                else int(check_random_state(rs).randint(2**31 - 1))
            )
            res = _fit(
                gp,
                *obs,
                fixed=fixed,
                bounds=self.bounds,
                ard=self.ard,
                restarts=self.restarts,
                maxiter=self.maxiter,
                seed=seed,
            )
            self.gp_ = res.gp
            self.posterior_ = res.posterior
            self.hyperparameters_ = dict(res.params)
        self.kernel_ = self.gp_.kernel
        self.log_marginal_likelihood_value_ = float(
            self.posterior_.log_marginal_likelihood()
        )
        self.X_train_, self.y_train_, self.dy_train_ = X, y, dy
        self._observations = obs
        return self

    # ------------------------------------------------------------------
    def _check_X(self, X):
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=np.float64)

    def predict(self, X, return_std=False, return_cov=False):
        """Posterior mean of ``f`` at ``X``, with its std or covariance.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
        return_std : bool, default False
        return_cov : bool, default False
            At most one of the two.

        Returns
        -------
        y_mean : ndarray of shape (n_queries,)
        y_std : ndarray of shape (n_queries,), if ``return_std``
        y_cov : ndarray of shape (n_queries, n_queries), if ``return_cov``
        """
        _one_of(return_std, return_cov)
        X = self._check_X(X)
        p = self.posterior_.value(X, full_cov=return_cov)
        return _read(p, return_std, return_cov)

    def predict_gradient(self, X, return_std=False, return_cov=False):
        """Posterior mean of ``∇f`` at ``X``, with its std or covariance.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
        return_std : bool, default False
        return_cov : bool, default False
            At most one of the two.

        Returns
        -------
        grad_mean : ndarray of shape (n_queries, n_features)
        grad_std : ndarray of shape (n_queries, n_features), if ``return_std``
        grad_cov : ndarray of shape (n_queries, n_features, n_features), if
            ``return_cov``: each point's covariance between gradient entries.
        """
        _one_of(return_std, return_cov)
        X = self._check_X(X)
        return _read(self.posterior_.gradient(X), return_std, return_cov)

    def predict_hessian(self, X, return_std=False, return_cov=False):
        """Posterior mean of the Hessian of ``f`` at ``X``.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
        return_std : bool, default False
        return_cov : bool, default False
            At most one of the two.

        Returns
        -------
        hess_mean : ndarray of shape (n_queries, n_features, n_features)
        hess_std : ndarray of shape (n_queries, n_features, n_features), if
            ``return_std``
        hess_cov : ndarray of shape (n_queries, d, d, d, d), if ``return_cov``:
            each point's covariance between Hessian entries.
        """
        _one_of(return_std, return_cov)
        X = self._check_X(X)
        return _read(self.posterior_.hessian(X), return_std, return_cov)

    def sample_y(self, X, n_samples=1, random_state=0):
        """Draw joint samples of ``f`` at ``X`` from the posterior.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
        n_samples : int, default 1
        random_state : int, RandomState or None, default 0

        Returns
        -------
        ndarray of shape (n_queries, n_samples)
        """
        X = self._check_X(X)
        rs = random_state
        seed = (
            int(rs)
            if isinstance(rs, numbers.Integral)
            else int(check_random_state(rs).randint(2**31 - 1))
        )
        draws = self.posterior_.sample(X, n_samples=n_samples, seed=seed)
        return np.asarray(draws).T

    # ------------------------------------------------------------------
    # the GP's numpy backend holds an array-namespace module, which pickle
    # refuses: the posterior is rebuilt from the fitted kernel and the data
    def __getstate__(self):
        state = self.__dict__.copy()
        gp = state.pop("gp_", None)
        state.pop("posterior_", None)
        if gp is not None:
            state["_gp_args"] = {
                "noise": gp.noise,
                "mean": float(gp.mean),
                "normalize_y": gp.normalize_y,
                "method": gp.method,
            }
        return state

    def __setstate__(self, state):
        args = state.pop("_gp_args", None)
        self.__dict__.update(state)
        if args is not None:
            self.gp_ = GP(self.kernel_, **args)
            self.posterior_ = self.gp_.condition(*self._observations)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.single_output = True
        tags.target_tags.multi_output = False
        return tags


def _gradient_observations(X, dy, noise=None):
    """Gradient observations from ``dy`` (n, d) with NaN = not measured.

    Complete rows and no NaN give one :func:`gpgrad.gradients` set; otherwise
    the measured entries become :func:`gpgrad.partials` (one derivative
    noise level either way). Returns None when nothing was measured.
    """
    measured = ~np.isnan(dy)
    if measured.all():
        return gradients(X, dy, noise=noise)
    if not measured.any():
        return None
    rows, cols = np.nonzero(measured)
    return partials(X[rows], cols, dy[rows, cols], noise=noise)


def _read(p, return_std, return_cov):
    """A lazy prediction's mean, with its std or covariance if asked for
    (reading ``.mean`` alone computes no variance)."""
    mean = np.asarray(p.mean)
    if not (return_std or return_cov):
        return mean
    return mean, (p.cov if return_cov else p.std)


def _one_of(return_std, return_cov):
    if return_std and return_cov:
        raise ValueError(
            "at most one of return_std and return_cov can be requested, got both"
        )


# --------------------------------------------------------------------------
# pipelines: the chain rule through affine input transformers


def _split(model):
    """``(transformer or None, estimator)`` of an estimator or a pipeline."""
    model = getattr(model, "best_estimator_", model)  # a fitted search
    if isinstance(model, GradientGPRegressor):
        return None, model
    if isinstance(model, Pipeline):
        final = model.steps[-1][1]
        if isinstance(final, GradientGPRegressor):
            return (model[:-1] if len(model.steps) > 1 else None), final
        raise TypeError(
            "the pipeline's last step must be a GradientGPRegressor, got "
            f"{type(final).__name__}"
        )
    raise TypeError(
        "expected a GradientGPRegressor or a Pipeline ending in one, got "
        f"{type(model).__name__}"
    )


def _affine(transformer, X, Z):
    """``A`` (d, k), ``b`` (k,) with ``transformer(x) = x A + b``, checked on X."""
    d = X.shape[1]
    basis = transformer.transform(
        _like_fit(transformer, np.vstack([np.zeros(d), np.eye(d)]))
    )
    basis = np.asarray(basis, dtype=np.float64)
    b = basis[0]
    A = basis[1:] - b
    probe = np.vstack([X[:8], 0.5 * X[:8] + 0.25])
    more = transformer.transform(_like_fit(transformer, probe[len(Z[:8]) :]))
    got = np.vstack([Z[:8], np.asarray(more)])
    want = probe @ A + b
    scale = np.max(np.abs(got)) + np.max(np.abs(want)) + 1e-300
    err = float(np.max(np.abs(got - want)))
    if not err <= 1e-8 * scale:
        raise ValueError(
            "the pipeline's steps before the estimator must be an affine map of "
            "X (StandardScaler, MinMaxScaler, MaxAbsScaler, PCA, ...) for the "
            f"chain rule; got a map that deviates from affine by {err:.3g}"
        )
    return A, b


def _like_fit(transformer, arr):
    """``arr`` as a DataFrame with the column names the transformer was
    fitted with (so that scikit-learn does not warn about missing names)."""
    names = getattr(transformer, "feature_names_in_", None)
    if names is None:
        return arr
    import pandas as pd

    return pd.DataFrame(arr, columns=names)


def _gradients_to_inputs(A, dy):
    """``∇_z f`` from ``∇_x f`` (rows of ``dy``) for ``z = x A + b``."""
    d, k = A.shape
    if np.count_nonzero(A - np.diag(np.diag(A))) == 0 and d == k:
        a = np.diag(A)
        if np.any(a == 0):
            raise ValueError("the input transform maps a feature to a constant")
        return dy / a  # NaN (not measured) stays NaN
    if d != k:
        raise ValueError(
            f"gradients dy need a square input transform; the pipeline maps {d} "
            f"features to {k}"
        )
    if np.isnan(dy).any():
        raise ValueError(
            "dy with NaN (not measured) entries needs a per-feature input transform "
            "(StandardScaler, MinMaxScaler, MaxAbsScaler); this one mixes features"
        )
    # dy_x = dz A^T  ->  dz = dy_x A^{-T}
    return np.linalg.solve(A, dy.T).T


def fit_with_gradients(model, X, y, dy=None):
    """Fit an estimator or a pipeline on values and gradients in X's units.

    For a :class:`~sklearn.pipeline.Pipeline` ending in a
    :class:`GradientGPRegressor`, the transformers are fitted on ``X``, the
    gradients are carried into the transformed inputs (``∇_z f = A^{-1}∇_x f``
    for ``z = x A + b``) and the estimator is fitted on them. Passing ``dy``
    through ``Pipeline.fit(..., gradientgpregressor__dy=dy)`` would skip that
    conversion.

    Parameters
    ----------
    model : GradientGPRegressor or Pipeline
    X : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
    dy : array-like of shape (n_samples, n_features), optional
        ``∇f(X_i)`` in the original units; NaN = not measured.

    Returns
    -------
    model
        Fitted.
    """
    transformer, est = _split(model)
    if transformer is None:
        est.fit(X, y, dy=dy)
        return model
    Z = transformer.fit_transform(X, y)
    dz = None
    if dy is not None:
        Xa = check_array(X, dtype=np.float64)
        dy = check_array(
            dy, dtype=np.float64, ensure_all_finite="allow-nan", input_name="dy"
        )
        if dy.shape != Xa.shape:
            raise ValueError(f"dy must have the shape of X {Xa.shape}, got {dy.shape}")
        A, _ = _affine(transformer, Xa, np.asarray(Z, dtype=np.float64))
        dz = _gradients_to_inputs(A, dy)
    est.fit(Z, y, dy=dz)
    return model


def _transformed(model, X):
    transformer, est = _split(model)
    if transformer is None:
        return None, est, X, None
    Xa = check_array(X, dtype=np.float64)
    Z = np.asarray(transformer.transform(X), dtype=np.float64)
    A, _ = _affine(transformer, Xa, Z)
    return transformer, est, Z, A


def predict_gradient(model, X, return_std=False, return_cov=False):
    """``∇_x f`` at ``X`` in X's own units, through a pipeline's transformers.

    Parameters
    ----------
    model : GradientGPRegressor, Pipeline or fitted GridSearchCV
        An estimator, or a pipeline of affine transformers ending in one.
    X : array-like of shape (n_queries, n_features)
        Untransformed inputs.
    return_std, return_cov : bool
        As in :meth:`GradientGPRegressor.predict_gradient`.

    Returns
    -------
    grad_mean : ndarray of shape (n_queries, n_features)
    grad_std or grad_cov : as in :meth:`GradientGPRegressor.predict_gradient`

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from gpgrad.sklearn import GradientGPRegressor, predict_gradient
    >>> X = np.linspace(0, 300, 15)[:, None]
    >>> pipe = make_pipeline(StandardScaler(), GradientGPRegressor(restarts=1))
    >>> pipe = pipe.fit(X, np.sin(X[:, 0] / 50))
    >>> g = predict_gradient(pipe, [[150.0]])  # d sin(x/50)/dx = cos(3)/50
    >>> bool(abs(g[0, 0] - np.cos(3) / 50) < 1e-3)
    True
    """
    _one_of(return_std, return_cov)
    _, est, Z, A = _transformed(model, X)
    if A is None:
        return est.predict_gradient(Z, return_std=return_std, return_cov=return_cov)
    if not (return_std or return_cov):
        return est.predict_gradient(Z) @ A.T
    mean, cov = est.predict_gradient(Z, return_cov=True)
    cov = np.einsum("ia,mab,jb->mij", A, cov, A)
    if return_cov:
        return mean @ A.T, cov
    var = np.clip(np.einsum("mii->mi", cov), 0.0, None)
    return mean @ A.T, np.sqrt(var)


def predict_hessian(model, X, return_std=False, return_cov=False):
    """The Hessian ``H_x = A H_z Aᵀ`` at ``X`` in X's own units.

    Parameters
    ----------
    model : GradientGPRegressor, Pipeline or fitted GridSearchCV
    X : array-like of shape (n_queries, n_features)
    return_std, return_cov : bool
        As in :meth:`GradientGPRegressor.predict_hessian`.

    Returns
    -------
    hess_mean : ndarray of shape (n_queries, n_features, n_features)
    hess_std or hess_cov : as in :meth:`GradientGPRegressor.predict_hessian`
    """
    _one_of(return_std, return_cov)
    _, est, Z, A = _transformed(model, X)
    if A is None:
        return est.predict_hessian(Z, return_std=return_std, return_cov=return_cov)
    if not (return_std or return_cov):
        return np.einsum("ia,mab,jb->mij", A, est.predict_hessian(Z), A)
    mean, cov = est.predict_hessian(Z, return_cov=True)
    mean = np.einsum("ia,mab,jb->mij", A, mean, A)
    cov = np.einsum("ia,jb,kc,ld,mabcd->mijkl", A, A, A, A, cov)
    if return_cov:
        return mean, cov
    var = np.clip(np.einsum("mijij->mij", cov), 0.0, None)
    return mean, np.sqrt(var)
