"""Hyperparameters by maximizing the log marginal likelihood.

Every observation kind counts: values, gradients, partial, directional and
second derivatives enter the same likelihood

.. math::

    \\log p(y \\mid θ) = -\\tfrac12 r^\\top (K_θ + Σ_θ)^{-1} r
        - \\tfrac12 \\log|K_θ + Σ_θ| - \\tfrac N2 \\log 2π,
    \\qquad r = y - L m_θ,

with ``K_θ`` the kernel's cross-covariance of the observed functionals ``L``,
``Σ_θ`` one noise variance per observation kind and ``m_θ`` a constant mean.
Positive hyperparameters are optimized as ``log θ`` within bounds (L-BFGS-B).

The gradient ``∂ log p / ∂ log θ`` comes, for dense systems, from the closed
form of :mod:`gpgrad.likelihood` (one Cholesky factorization, its inverse, and
one vector-Jacobian product of the Gram assembly); for other solvers from
torch autograd through the same covariance code the posterior uses; and from
finite differences when torch is not installed.

:func:`fit` runs in named steps: the data's scales give starting values and
bounds (:func:`_specs`), :class:`_Space` maps between hyperparameters and the
optimizer's vector, :class:`_Objective` evaluates the likelihood,
:func:`_run_starts` runs L-BFGS-B from each start and :func:`_result` builds
the :class:`FitResult`.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from . import backend as B
from .exceptions import (
    GPGradWarning,
    JitterWarning,
    NotPositiveDefiniteError,
    is_out_of_memory,
    raise_if_out_of_memory,
)
from .functionals import KINDS
from .gp import GP

__all__ = ["fit", "FitResult", "FitWarning"]

#: a log-parameter closer than this to a bound (in log units) counts as on it
_BOUND_TOL = 1e-3
#: objective returned where the covariance cannot be factored: L-BFGS-B then
#: backtracks instead of stopping on an infinite value
_BAD_OBJECTIVE = 1e10
#: default ``tol``: relative change of the likelihood that ends a start
DEFAULT_TOL = 1e-6


class FitWarning(GPGradWarning):
    """A fitted hyperparameter sits on a bound, or the optimizer struggled."""


# --------------------------------------------------------------------------
# the result


@dataclass(repr=False)
class FitResult:
    """What :func:`fit` found.

    Attributes
    ----------
    gp : GP
        The GP with the fitted hyperparameters (same backend, dtype, device,
        ``normalize_y`` and solver as the GP passed in).
    posterior : Posterior
        ``gp.condition(*observations)``.
    params : dict
        Every hyperparameter by name, fitted or fixed: the kernel's names
        (``"lengthscale"``, ``"variance"``, ``"0.lengthscale"`` for a part of a
        composite, ...), ``"noise.value"``, ``"noise.gradient"``, ... for each
        observed kind, and ``"mean"``. Floats for a single problem on the numpy
        backend, else arrays (tensors on the torch backend) with the batch axes
        first.
    fitted : list of str
        The names that were optimized (the others were fixed).
    bounds : dict
        ``name -> (lower, upper)`` used for each fitted parameter.
    log_marginal_likelihood : float or array
        ``log p(y)`` at the optimum (one per problem when batched).
    on_bound : list of str
        Fitted parameters that ended within 0.1 % of a bound (warned about).
    restarts : list of float
        The summed log marginal likelihood reached from each start.
    gradient : str
        ``"autograd"`` (analytic gradients through torch: the closed-form
        backward pass of :mod:`gpgrad.likelihood` for dense systems) or
        ``"finite-difference"``.
    n_evaluations : int
        Likelihood evaluations over all restarts.
    """

    gp: GP
    posterior: object
    params: dict
    fitted: list
    bounds: dict
    log_marginal_likelihood: object
    on_bound: list
    restarts: list
    gradient: str
    n_evaluations: int

    def __repr__(self):
        return self.summary()

    def summary(self) -> str:
        """A short, human-readable table of the fitted hyperparameters."""
        lines = [f"log marginal likelihood: {_fmt(self.log_marginal_likelihood)}"]
        for name, value in self.params.items():
            tag = "" if name in self.fitted else "  (fixed)"
            if name in self.on_bound:
                tag = "  (on a bound)"
            lines.append(f"  {name:<18} {_fmt(value)}{tag}")
        return "\n".join(lines)


def _fmt(v):
    a = B.to_numpy(v) if not isinstance(v, float) else v
    if isinstance(a, np.ndarray) and a.ndim:
        return "[" + ", ".join(f"{x:.4g}" for x in a.reshape(-1)) + "]"
    return f"{float(a):.6g}"


# --------------------------------------------------------------------------
# the public entry point


def fit(
    gp: GP,
    *observations,
    fixed=None,
    bounds: dict | None = None,
    ard: bool = False,
    fit_mean: bool = True,
    restarts: int | None = None,
    seed: int = 0,
    maxiter: int = 300,
    gradient: str = "auto",
    progress=False,
    start=None,
    tol: float = DEFAULT_TOL,
    batch_starts: bool = False,
) -> FitResult:
    """Fit hyperparameters by maximizing the log marginal likelihood.

    Optimizes ``log θ`` for every positive hyperparameter of the kernel, one
    noise variance per observation kind that does not carry its own noise
    (``gpgrad.gradients(X, G, noise=...)`` fixes it), and the constant mean,
    with L-BFGS-B within bounds, from a data-driven start (or ``start``) and
    ``restarts − 1`` random starts around it; the best optimum wins (per
    problem when batched).

    Parameters
    ----------
    gp : GP
        The model: its kernel's structure and the GP's backend, dtype, device,
        ``normalize_y`` and solver are kept; its hyperparameter values are
        only used for those that are fixed.
    *observations : Functional or (X, y)
        As for :meth:`GP.condition`. With ``backend="torch"``, leading batch
        axes of the inputs are independent problems, fitted together (every
        hyperparameter gets the batch axes).
    fixed : iterable of str or dict, optional
        Names to keep at the GP's current value, or ``{name: value}`` to fix
        at a given value. Names as in :attr:`FitResult.params`.
    bounds : dict, optional
        ``{name: (lower, upper)}`` replacing the default bounds: lengthscales
        within ``[1e-3, 1e2]`` × the input's span (for 1-D inputs the lower
        bound is at most the mean spacing of the points), the variance within
        ``[1e-4, 1e4]`` × its initial value, a noise within ``[1e-8, 10]`` × the
        mean square of that kind's targets, other kernel parameters within a
        factor 1000 of their current value.
    ard : bool, default False
        Give a scalar lengthscale one entry per input dimension.
    fit_mean : bool, default True
        Fit the constant mean (only when there are value observations; the
        likelihood of derivative data does not depend on it).
    restarts : int, optional
        Number of starts (the first is the data-driven one, or ``start``).
        Default 3, or 1 with ``start``. A long 1-D series on the state-space
        solver (values only, no ``start``) runs its starts on a window of
        :data:`WINDOW` consecutive samples, then fits the whole series once
        from the window's optimum.
    seed : int, default 0
        Seed of the random starts.
    maxiter : int, default 300
        L-BFGS-B iterations per start (per problem when batched: each problem
        of a batch is optimized on its own, see ``BATCH_OPTIMIZER``).
    gradient : {"auto", "autograd", "finite-difference"}
        How the likelihood's gradient is computed. ``"auto"`` uses torch when
        it is installed (the closed-form backward pass of
        :mod:`gpgrad.likelihood` for dense systems, autograd for the others),
        else scipy's finite differences (slower and less precise; numpy
        backend only).
    progress : bool or callable, default False
        ``True`` prints a line per start and every 25 evaluations to stderr; a
        callable is called as ``progress(start, evaluation, lml)``.
    start : FitResult or dict, optional
        Warm start: the first start is these hyperparameters (a previous
        result, for example the last fit of a Bayesian-optimization loop, or
        ``{name: value}``), clipped into the bounds; names it lacks keep the
        data-driven start.
    tol : float, default 1e-6
        A start ends when an iteration changes ``log p(y) / N`` by less than
        ``tol`` relative to ``max(|log p(y)| / N, 1)``. On the iterative
        solver, whose likelihood is a stochastic estimate, it also ends when
        ``STALL_EVALUATIONS`` evaluations in a row have not raised the best
        ``log p(y)`` by ``STALL_RTOL`` of it.
    batch_starts : bool, default False
        Run the ``restarts`` starts of one problem as a batch of copies
        (``backend="torch"``): one batched factorization per evaluation, each
        start its own search.

    Returns
    -------
    FitResult

    Warns
    -----
    FitWarning
        When a fitted hyperparameter ends on a bound (the message names it and
        what to change), or when every start failed to converge.

    Examples
    --------
    >>> import numpy as np, gpgrad
    >>> X = np.linspace(0, 3, 25)[:, None]
    >>> y = np.sin(2 * X[:, 0]) + 0.05 * np.random.default_rng(0).normal(size=25)
    >>> res = gpgrad.fit(gpgrad.GP(gpgrad.kernels.Matern52()), X, y)
    >>> sorted(res.params)
    ['lengthscale', 'mean', 'noise.value', 'variance']
    >>> again = gpgrad.fit(res.gp, X, y, start=res)  # warm start, one start
    """
    if not isinstance(gp, GP):
        raise TypeError(f"fit expects a gpgrad.GP as first argument, got {type(gp)}")
    obs = gp._parse(observations)
    settings = _settings(gp, restarts, seed, maxiter, gradient, progress, start, tol)
    batch = _batch_of(obs)
    if batch and gp.backend != "torch":
        raise ValueError(
            f"the observations have batch axes {batch}: batched problems are "
            "fitted with GP(..., backend='torch')"
        )
    if batch_starts and settings.restarts > 1:
        if gp.backend != "torch" or batch:
            raise ValueError(
                "batch_starts=True needs GP(..., backend='torch') and observations "
                f"without batch axes, got backend={gp.backend!r} and batch axes "
                f"{batch}"
            )
        return _fit_batched_starts(gp, obs, (fixed, bounds, ard, fit_mean), settings)
    specs, fixed_values = _specs(gp, obs, batch, fixed, bounds, ard, fit_mean)
    objective = _Objective(
        gp, obs, specs, fixed_values, batch, settings.gradient, settings.progress
    )
    space = objective.space
    if objective.fast is not None and settings.start is None:
        settings = _window_start(gp, obs, objective, (fixed, bounds), settings)
    elif settings.start is None and not batch:
        spec_args = (fixed, bounds, ard, fit_mean)
        settings = _subset_start(gp, obs, objective, spec_args, settings)
    theta0 = space.start(settings.start)
    with _few_threads(settings.gradient, gp, objective.n_obs):
        best = _run_starts(objective, space, theta0, settings)
        return _result(gp, obs, space, best, objective, settings)


#: a long series (state-space solver) starts from the fit of a window of this
#: many consecutive samples in its middle
WINDOW = 4096


def _window_start(gp, obs, objective, spec_args, settings):
    """For a long 1-D series: fit a window of :data:`WINDOW` samples (with
    every start), then fit the whole series from its optimum, once.

    The data-driven start (a fifth of the span) is far from the optimum of a
    long series, from where L-BFGS-B may stop in the all-noise optimum; the
    window's optimum is close, and the whole fit then needs few evaluations.
    """
    sub = objective.fast.window(obs, WINDOW)
    if sub is None:
        return settings
    fixed, bounds = spec_args
    return _prefit(gp, sub, settings, fixed=fixed, bounds=bounds)


def _prefit(gp, sub, settings, **spec):
    """``settings`` for one start from the fit of ``sub`` (a window or a
    subset of the observations) with every start of ``settings``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        pre = fit(
            gp,
            *sub,
            restarts=settings.restarts,
            seed=settings.seed,
            maxiter=settings.maxiter,
            gradient=settings.gradient,
            tol=settings.tol,
            **spec,
        )
    return replace(settings, start=pre.params, restarts=1)


#: a fit on the iterative solver runs its starts on a random subset of this
#: share of the points (a sixteenth of the cost per evaluation), then fits all
#: points once from the subset's optimum
SUBSET_FRACTION = 0.25
#: ... where the whole problem has at least this many observed entries
SUBSET_MIN_ROWS = 20_000


def _subset_start(gp, obs, objective, spec_args, settings):
    """For a problem the automatic choice (or ``method``) solves by conjugate
    gradients: fit :data:`SUBSET_FRACTION` of its points, chosen at random,
    with every start, then the whole problem from that optimum, once.

    Every evaluation on the iterative solver costs O(N²D) per CG iteration
    and the iterations grow as the fit sharpens the kernel, so the search
    (restarts included) runs where it is cheap; the subset's optimum is a
    consistent estimate of the same hyperparameters, and the whole fit from it
    needs few evaluations. Values and gradients only.
    """
    n_obs = sum(f.size for f in obs)
    if n_obs < SUBSET_MIN_ROWS or any(f.kind not in _SUBSET_KINDS for f in obs):
        return settings
    if objective.cg is None:  # not solved by conjugate gradients
        return settings
    sub = _point_subset(obs, SUBSET_FRACTION, settings.seed)
    fixed, bounds, ard, fit_mean = spec_args
    return _prefit(
        gp,
        sub,
        settings,
        fixed=fixed,
        bounds=bounds,
        ard=ard,
        fit_mean=fit_mean,
        progress=settings.progress,
    )


_SUBSET_KINDS = ("value", "gradient")


def _point_subset(obs, fraction, seed):
    """The observations at a random ``fraction`` of their points (the same
    points for functionals observed at the same inputs), as new functionals."""
    rng = np.random.default_rng(seed)
    chosen = []  # (inputs, indices) of the point sets seen so far
    out = []
    for f in obs:
        X = f.X
        idx = next((i for Y, i in chosen if _same(Y, X)), None)
        if idx is None:
            n = int(X.shape[-2])
            idx = np.sort(
                rng.choice(n, size=max(1, round(fraction * n)), replace=False)
            )
            chosen.append((X, idx))
        noise = f.noise
        if noise is not None and np.ndim(B.to_numpy(noise)):
            noise = _take(_broadcast(noise, f.y), idx)
        fields = {name: _take(getattr(f, name), idx) for name in f.fields}
        out.append(
            type(f).build(f.kind, _take(X, idx), _take(f.y, idx), noise, **fields)
        )
    return out


def _same(A, B_):
    return A is B_ or (
        tuple(A.shape) == tuple(B_.shape)
        and np.array_equal(B.to_numpy(A), B.to_numpy(B_))
    )


def _broadcast(a, like):
    xp = B.namespace(like)
    return (
        xp.broadcast_to(a, tuple(like.shape))
        if B.is_tensor(like)
        else np.broadcast_to(np.asarray(a), like.shape)
    )


def _take(a, idx):
    """Rows ``idx`` (the points' axis, the first) of ``a``."""
    if B.is_tensor(a):
        import torch

        return a[torch.as_tensor(idx, device=a.device)]
    return np.asarray(a)[idx]


# --------------------------------------------------------------------------
# step 1: the settings


@dataclass
class _Settings:
    """The optimizer's settings, validated."""

    restarts: int
    seed: int
    maxiter: int
    gradient: str
    progress: object
    start: dict | None
    tol: float


def _settings(gp, restarts, seed, maxiter, gradient, progress, start, tol):
    if gradient not in ("auto", "autograd", "finite-difference"):
        raise ValueError(
            "gradient must be 'auto', 'autograd' or 'finite-difference', got "
            f"{gradient!r}"
        )
    have_torch = _torch_available()
    if gradient == "auto":
        gradient = "autograd" if have_torch else "finite-difference"
    elif gradient == "autograd" and not have_torch:
        raise ValueError(
            "gradient='autograd' needs torch (pip install torch); use "
            "gradient='finite-difference'"
        )
    if gradient == "finite-difference" and gp.backend == "torch":
        raise ValueError(
            "backend='torch' fits with autograd; gradient='finite-difference' is "
            "for the numpy backend without torch"
        )
    if progress is not True and progress is not False and not callable(progress):
        raise TypeError(
            f"progress must be True, False or a callable, got {type(progress)}"
        )
    if start is not None:
        if isinstance(start, FitResult):
            start = start.params
        if not isinstance(start, dict):
            raise TypeError(
                f"start must be a FitResult or a dict {{name: value}}, got "
                f"{type(start).__name__}"
            )
    if restarts is None:
        restarts = 3 if start is None else 1
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise TypeError(f"tol must be a number, got {type(tol).__name__}") from None
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be positive and finite, got {tol}")
    return _Settings(
        restarts=_check_int(restarts, "restarts"),
        seed=seed,
        maxiter=_check_int(maxiter, "maxiter"),
        gradient=gradient,
        progress=progress,
        start=start,
        tol=tol,
    )


def _torch_available():
    # found, not imported: a fit that never needs torch does not pay its import
    return importlib.util.find_spec("torch") is not None


def _check_int(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return int(v)


def _batch_of(obs):
    shape = ()
    for f in obs:
        shape = np.broadcast_shapes(shape, tuple(f.X.shape[:-2]))
    return tuple(shape)


# --------------------------------------------------------------------------
# step 2: starting values and bounds


@dataclass
class _Spec:
    """One hyperparameter being optimized.

    ``shape`` is its per-problem shape (``()`` or ``(d,)``); ``init``,
    ``lower`` and ``upper`` broadcast to ``batch + shape``. ``log``
    parameters are optimized as ``log θ``; the mean as ``(m − center) /
    width``.
    """

    name: str
    shape: tuple
    init: object
    lower: object
    upper: object
    log: bool = True
    center: object = 0.0
    width: object = 1.0

    def to_theta(self, v):
        if self.log:
            return np.log(v)
        return (v - self.center) / self.width

    def from_theta(self, t):
        """The value of optimizer coordinates ``t`` (numpy array or tensor)."""
        if self.log:
            return t.exp() if B.is_tensor(t) else np.exp(t)
        if B.is_tensor(t):
            xp = B.namespace(t)
            center = B.to_namespace(self.center, xp, dtype=t.dtype, device=t.device)
            width = B.to_namespace(self.width, xp, dtype=t.dtype, device=t.device)
            return center + width * t
        return self.center + self.width * t


def _stats(gp, obs, batch):
    """Per-problem scales of the data: input spans, value mean and variance,
    and the mean square of each derivative kind's targets."""
    Xs = [np.broadcast_to(_np(f.X), tuple(batch) + tuple(f.X.shape[-2:])) for f in obs]
    X = np.concatenate(Xs, axis=-2)
    span = np.ptp(X, axis=-2)  # batch + (d,)
    span = np.where(span > 0, span, 1.0)
    # the mean spacing of a 1-D series: a lengthscale bound below which the
    # data cannot tell the kernel from noise (1e-3 × a long series' span is
    # far above it)
    step = span[..., 0] / max(X.shape[-2] - 1, 1) if X.shape[-1] == 1 else None
    vals = [_np(f.y) for f in obs if f.kind == "value"]
    st = {"span": span, "d": X.shape[-1], "ms": {}, "step": step}
    if vals:
        v = np.concatenate(
            [np.broadcast_to(a, tuple(batch) + a.shape[-1:]) for a in vals], axis=-1
        )
        st["ybar"] = v.mean(axis=-1)
        sd = v.std(axis=-1) if v.shape[-1] > 1 else np.zeros(batch)
        st["ysd"] = np.where(sd > 0, sd, np.maximum(np.abs(st["ybar"]), 1.0))
    for kind in list(KINDS)[1:]:
        ys = [_np(f.y) for f in obs if f.kind == kind]
        if ys:
            flat = np.concatenate(
                [a.reshape(tuple(batch) + (-1,)) for a in ys], axis=-1
            )
            st["ms"][kind] = np.mean(flat * flat, axis=-1)
    return st


def _specs(gp, obs, batch, fixed, bounds, ard, fit_mean):
    """The fitted hyperparameters with starting values and bounds, and the
    values of the fixed ones: ``(specs, fixed_values)``."""
    st = _stats(gp, obs, batch)
    orders = {f.kind: f.order for f in obs}
    names_fixed, fixed_values = _parse_fixed(fixed)
    bounds = _check_bounds_arg(dict(bounds or {}))
    specs = _kernel_specs(gp, st, orders, batch, ard)
    specs += _noise_specs(gp, obs, st, orders, batch)
    if fit_mean and "ybar" in st:
        specs.append(_mean_spec(gp, st, batch))
    known = {s.name for s in specs} | {"mean"} | {f"noise.{k}" for k in KINDS}
    known |= set(gp.kernel.parameters())
    unknown = sorted((names_fixed | set(bounds)) - known)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter {unknown[0]!r}; the names are "
            f"{sorted(s.name for s in specs)}"
        )
    for s in specs:
        if s.name in bounds:
            lower, upper = bounds[s.name]
            s.lower = np.broadcast_to(lower, _full(s, batch)).astype(float)
            s.upper = np.broadcast_to(upper, _full(s, batch)).astype(float)
            s.init = np.clip(s.init, s.lower, s.upper)
    specs = [s for s in specs if s.name not in names_fixed]
    return specs, fixed_values


def _parse_fixed(fixed):
    """``fixed`` as ``(names, {name: value})``."""
    if fixed is None:
        return set(), {}
    if isinstance(fixed, str):
        fixed = [fixed]
    if isinstance(fixed, dict):
        return set(fixed), dict(fixed)
    try:
        return set(fixed), {}
    except TypeError:
        raise TypeError(
            "fixed must be a list of names or a dict {name: value}, got "
            f"{type(fixed).__name__}"
        ) from None


def _prior_variance(gp, st, orders, batch, ls0):
    """A starting kernel variance from the data's scales: the values'
    variance, or a derivative's mean square times ``ℓ^(2p)``."""
    ysd_model = np.ones(batch) if gp.normalize_y else st.get("ysd", np.ones(batch))
    if "ybar" in st:
        sig2 = (st["ysd"] / (st["ysd"] if gp.normalize_y else 1.0)) ** 2
    elif any(orders[k] == 1 for k in st["ms"]):
        ms = np.mean([v for k, v in st["ms"].items() if orders[k] == 1], axis=0)
        sig2 = ms * ls0**2 / ysd_model**2
    elif st["ms"]:
        ms = np.mean(list(st["ms"].values()), axis=0)
        sig2 = ms * ls0**4 / ysd_model**2
    else:  # pragma: no cover - observations always have targets
        sig2 = np.ones(batch)
    return np.where(np.isfinite(sig2) & (sig2 > 0), sig2, 1.0), ysd_model


def _lengthscale_start(st):
    """A starting (scalar) lengthscale: 0.2 × the inputs' span (geometric mean
    over dimensions) × √d, since distances between points grow as √d."""
    span = np.exp(np.mean(np.log(st["span"]), axis=-1))
    return 0.2 * np.sqrt(st["d"]) * span


def _kernel_specs(gp, st, orders, batch, ard):
    d, span = st["d"], st["span"]
    ls0 = _lengthscale_start(st)
    sig2, _ = _prior_variance(gp, st, orders, batch, ls0)
    kparams = gp.kernel.parameters()
    n_var = sum(1 for n in kparams if n.rsplit(".", 1)[-1] == "variance") or 1
    specs = []
    for name, value in kparams.items():
        base = name.rsplit(".", 1)[-1]
        cur = _np(value)
        if base == "lengthscale":
            if ard or (cur.ndim >= 1 and cur.shape[-1] == d and d > 1):
                shape, init = (d,), 0.2 * np.sqrt(d) * span
                lower, upper = 1e-3 * span, 1e2 * span
            else:
                # batched kernels read a lengthscale's last axis as dimensions
                shape = (1,) if batch else ()
                init = np.reshape(ls0, tuple(batch) + shape)
                geo = np.reshape(np.exp(np.mean(np.log(span), axis=-1)), init.shape)
                lower, upper = 1e-3 * geo, 1e2 * geo
                if st["step"] is not None:
                    lower = np.minimum(lower, np.reshape(st["step"], init.shape))
        elif base == "variance":
            shape, init = (), sig2 / n_var
            lower, upper = 1e-4 * init, 1e4 * init
        else:
            shape = () if cur.ndim == 0 else cur.shape[-1:]
            init = np.broadcast_to(cur, tuple(batch) + shape)
            lower, upper = 1e-3 * init, 1e3 * init
        specs.append(_Spec(name, shape, init, lower, upper))
    return specs


def _noise_specs(gp, obs, st, orders, batch):
    """One noise variance per observed kind that carries no noise of its own."""
    ls0 = _lengthscale_start(st)
    sig2, ysd_model = _prior_variance(gp, st, orders, batch, ls0)
    specs = []
    for kind in KINDS:
        if not any(f.kind == kind and f.noise is None for f in obs):
            continue
        if kind == "value":
            scale = st["ysd"] ** 2
        else:
            ms = st["ms"].get(kind, np.zeros(batch))
            # a derivative of order p scales as σ/ℓ^p
            fallback = sig2 * ysd_model**2 / ls0 ** (2 * orders[kind])
            scale = np.where(ms > 0, ms, fallback)
        specs.append(_Spec(f"noise.{kind}", (), 1e-2 * scale, 1e-8 * scale, 10 * scale))
    return specs


def _mean_spec(gp, st, batch):
    """The constant mean, optimized in units of the values' spread."""
    center = np.zeros(batch) if gp.normalize_y else st["ybar"]
    width = st["ysd"]
    lower, upper = center - 1e3 * width, center + 1e3 * width
    return _Spec(
        "mean", (), center, lower, upper, log=False, center=center, width=width
    )


def _check_bounds_arg(bounds):
    out = {}
    for name, b in bounds.items():
        try:
            lower, upper = b
            lower, upper = np.asarray(lower, float), np.asarray(upper, float)
        except (TypeError, ValueError):
            raise ValueError(
                f"bounds[{name!r}] must be a pair (lower, upper), got {b!r}"
            ) from None
        bad = not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper)))
        if bad or np.any(lower >= upper) or (name != "mean" and np.any(lower <= 0)):
            raise ValueError(
                f"bounds[{name!r}] must be finite with 0 < lower < upper (any "
                f"lower < upper for 'mean'), got {b!r}"
            )
        out[name] = (lower, upper)
    return out


# --------------------------------------------------------------------------
# step 3: the optimizer's vector


def _np(a):
    return np.asarray(B.to_numpy(a), dtype=np.float64)


def _full(spec, batch):
    return tuple(batch) + spec.shape


@dataclass
class _Space:
    """The optimizer's vector ``θ``: every fitted hyperparameter in its
    coordinates, batch axes first, concatenated; and the way back."""

    specs: list
    batch: tuple
    fixed_values: dict = field(default_factory=dict)
    target_axes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sizes = [int(np.prod(_full(s, self.batch))) for s in self.specs]
        self.lo = self.pack([s.to_theta(s.lower) for s in self.specs])
        self.hi = self.pack([s.to_theta(s.upper) for s in self.specs])

    def pack(self, arrays):
        if not self.specs:
            return np.zeros(0)
        return np.concatenate(
            [
                np.broadcast_to(a, _full(s, self.batch)).ravel()
                for s, a in zip(self.specs, arrays)
            ]
        )

    def split(self, theta):
        """``θ`` (numpy or tensor) as one array per spec, ``batch + shape``."""
        out, i = [], 0
        for s, size in zip(self.specs, self.sizes):
            out.append(theta[i : i + size].reshape(_full(s, self.batch)))
            i += size
        return out

    def values(self, theta):
        """The hyperparameter values at ``θ`` (in ``θ``'s namespace)."""
        return [s.from_theta(t) for s, t in zip(self.specs, self.split(theta))]

    def start(self, start=None):
        """The first start: the data-driven values, or ``start``'s where it
        names a fitted hyperparameter; clipped into the bounds."""
        inits = []
        for s in self.specs:
            init = s.init
            if start is not None and start.get(s.name) is not None:
                init = np.broadcast_to(_np(start[s.name]), _full(s, self.batch))
            inits.append(s.to_theta(init))
        return np.clip(self.pack(inits), self.lo, self.hi)

    def merge(self, old, new, better):
        """``new`` where ``better`` (per problem), else ``old``."""
        parts = []
        for s, a, b in zip(self.specs, self.split(old), self.split(new)):
            mask = np.reshape(better, tuple(self.batch) + (1,) * len(s.shape))
            parts.append(np.where(mask, b, a).ravel())
        return np.concatenate(parts) if parts else old

    def on_bound(self, theta):
        """Names of the log-parameters within ``_BOUND_TOL`` of a bound, each
        warned about with what to change."""
        names = []
        for s, t, a, b in zip(
            self.specs, self.split(theta), self.split(self.lo), self.split(self.hi)
        ):
            if not s.log:
                continue
            at_lo = t <= a + _BOUND_TOL
            at_hi = t >= b - _BOUND_TOL
            if not (np.any(at_lo) or np.any(at_hi)):
                continue
            names.append(s.name)
            _warn_on_bound(s, t, at_lo, at_hi, self.batch)
        return names

    def model(self, gp, theta, backend, dtype=None, device=None):
        """A GP like ``gp`` with the hyperparameters at ``θ`` and the fixed
        ones, every value in ``backend``'s type (``dtype``/``device`` default
        to ``gp``'s)."""
        entries = dict(zip((s.name for s in self.specs), self.values(theta)))
        entries.update(self.fixed_values)
        return _assemble(
            gp, entries, self.batch, self.target_axes, backend, dtype, device
        )


def _warn_on_bound(s, t, at_lo, at_hi, batch):
    side = "lower" if np.any(at_lo) else "upper"
    value = float(np.exp(t[at_lo | at_hi].reshape(-1)[0]))
    where = "" if not batch else f" (in {int(np.sum(at_lo | at_hi))} entries)"
    hint = _BOUND_HINTS.get(s.name.rsplit(".", 1)[-1], "")
    if s.name.startswith("noise.") and side == "lower":
        hint = " The data may be (nearly) noise-free."
    warnings.warn(
        f"fitted {s.name} = {value:.3g} sits on its {side} bound{where}. Widen "
        f"it with fit(..., bounds={{{s.name!r}: (lower, upper)}}) or fix it "
        f"with fixed={{{s.name!r}: value}}.{hint}",
        FitWarning,
        stacklevel=5,
    )


_BOUND_HINTS = {
    "lengthscale": (
        " A lengthscale on its upper bound often means the data barely vary "
        "along that input; on its lower bound, that the data are too sparse or "
        "too noisy for the kernel."
    ),
}


def _assemble(gp, entries, batch, target_axes, backend, dtype=None, device=None):
    """A GP like ``gp`` with the kernel, noise and mean of ``entries``
    (``{name: value}``), every value converted to ``backend``'s type."""
    if backend == "torch":
        import torch

        dtype = gp.dtype if dtype is None and gp.backend == "torch" else dtype
        dtype = torch.float64 if dtype is None else dtype
        device = device if device is not None else getattr(gp, "device", None)
        device = torch.device("cpu") if device is None else device

        def conv(v):
            # python floats (fixed values, the GP's defaults) stay floats
            if type(v) is float or B.is_tensor(v):
                return v
            return torch.as_tensor(np.asarray(v, float), dtype=dtype, device=device)

    else:
        dtype = gp.dtype

        def conv(v):
            return float(v) if np.ndim(v) == 0 else np.asarray(v, float)

    kparams, noise, mean = {}, {k: gp.noise_for(k) for k in KINDS}, gp.mean
    for name, v in entries.items():
        v = conv(v)
        if name == "mean":
            mean = v
        elif name.startswith("noise."):
            kind = name.split(".", 1)[1]
            if batch and not isinstance(v, float) and v.ndim:
                v = v.reshape(tuple(batch) + (1,) * target_axes[kind])
            noise[kind] = v
        else:
            kparams[name] = v
    if backend == "torch":
        noise = {k: conv(v) for k, v in noise.items()}
        mean = conv(mean)
    kernel = gp.kernel.replace(**kparams) if kparams else gp.kernel
    return GP(
        kernel,
        noise=noise,
        mean=mean,
        normalize_y=gp.normalize_y,
        backend=backend,
        dtype=dtype,
        device=device if backend == "torch" else None,
        method=gp.method,
    )


def _target_axes(obs):
    """``{kind: number of target axes after the batch axes}`` of the observed
    kinds (1 for values, 2 for gradients, 3 for Hessians), so that a
    per-problem noise reshaped to ``batch + (1,) * axes`` broadcasts against
    the targets."""
    return {f.kind: len(f.target_shape()) - (len(f.X.shape) - 2) for f in obs}


# --------------------------------------------------------------------------
# step 4: the objective


def _evaluation_failed(exc) -> bool:
    """Whether ``exc``, raised by one likelihood evaluation, only says that
    this ``θ`` gives a covariance that cannot be factored, or conjugate
    gradients that did not converge within the fit's budget (the optimizer
    then backs off). Running out of memory is not that: it propagates, as
    :class:`~gpgrad.exceptions.OutOfMemoryError`."""
    from .solvers.iterative import ConvergenceWarning

    raise_if_out_of_memory(exc)  # memory, not conditioning: stop here
    if is_out_of_memory(exc):
        return False
    return isinstance(
        exc,
        (
            NotPositiveDefiniteError,
            np.linalg.LinAlgError,
            RuntimeError,
            ConvergenceWarning,
        ),
    )


#: within a fit, an evaluation on the iterative solver may take this many
#: times the most CG iterations an earlier evaluation needed ...
CG_BUDGET_FACTOR = 4
#: ... and at least this many
CG_BUDGET_MIN = 1000

#: on the iterative solver (a stochastic estimate of the likelihood), a start
#: ends when this many evaluations in a row have not raised the best log
#: marginal likelihood by more than :data:`STALL_RTOL` of its size ...
STALL_EVALUATIONS = 10
#: ... (the estimate wobbles between nearby points: ±5 nats of 213,000, 2.5e-5
#: of it, at 51,000 rows with 4 probes; L-BFGS-B's ``ftol`` is far below
#: that, so without this rule it keeps taking steps that only chase the
#: wobble)
STALL_RTOL = 5e-5


@dataclass
class _StartBest:
    """The best point of the current start on the iterative solver."""

    theta: np.ndarray
    member: np.ndarray
    #: evaluations since the best log p last rose by more than STALL_RTOL
    stale: int = 0
    #: trial points refused by the iteration budget since it was found
    refused: int = 0


class _Stalled(Exception):
    """Raised by :class:`_Objective` to end a start on a stochastic objective
    that has stopped improving (see :data:`STALL_EVALUATIONS`)."""


def _iterative_options(gp, obs, space):
    """The :class:`~gpgrad.solvers.iterative.CG` options where the model at
    the start is solved by conjugate gradients alone, else None."""
    from .solvers.iterative import CG
    from .solvers.select import AUTO_CG_MIN_ROWS, choose

    explicit = isinstance(gp.method, CG) or gp.method == "cg"
    if not explicit and sum(f.size for f in obs) < AUTO_CG_MIN_ROWS:
        return None  # "auto" never picks CG here: no model to build
    try:
        model = space.model(gp, space.start(None), gp.backend, gp.dtype, gp.device)
        blocks, _, noise, _, _ = model._prepare(obs)
        kind, options = choose(model, blocks, noise)
    except Exception:  # noqa: BLE001 - the evaluations report their own errors
        return None
    return (options or CG()) if kind == "cg" else None


class _Objective:
    """``−Σ log p(y) / N`` and its gradient in the optimizer's coordinates."""

    def __init__(self, gp, obs, specs, fixed_values, batch, gradient, progress):
        self.gp, self.obs = gp, obs
        self.space = _Space(specs, batch, fixed_values, _target_axes(obs))
        self.batch = batch
        self.progress = progress
        self.count = 0
        self.start = 1
        self.n_obs = sum(f.size for f in obs) * max(1, int(np.prod(batch)))
        self._last = None
        self.gradient = gradient
        # 1-D Matérn series: the state-space solver's own numpy gradient
        self.fast = None
        if gradient == "autograd" and gp.backend == "numpy" and not batch:
            from .solvers.statespace import fit_likelihood

            start = self.space.model(gp, self.space.start(), "numpy")
            self.fast = fit_likelihood(start, obs, [s.name for s in specs])
        if gradient == "autograd" and self.fast is None:
            import torch

            self.torch = torch
            self.device = gp.device if gp.backend == "torch" else torch.device("cpu")
            # points and targets become float64 tensors once, not per evaluation
            self.obs_t = [_to_torch(f, torch.float64, self.device) for f in obs]
        #: the CG options of a problem solved by conjugate gradients (None
        #: otherwise) and the most iterations an evaluation has needed
        self.cg = None if batch else _iterative_options(gp, obs, self.space)
        self.cg_iterations = 0
        #: this start's :class:`_StartBest`, tracked on the iterative solver
        #: only
        self.best = None
        self._refused = False

    def refused_since_best(self):
        """Trial points refused by the CG iteration budget since this start's
        best point was found (0 off the iterative solver)."""
        return 0 if self.best is None else self.best.refused

    def new_start(self, start):
        """Begin start number ``start`` (1-based)."""
        self.start = start
        self.best = None

    def _track(self, theta, total, member):
        """Record an evaluation on the iterative solver; :class:`_Stalled`
        when :data:`STALL_EVALUATIONS` in a row have not improved the best by
        more than :data:`STALL_RTOL` of it."""
        if self.cg is None or member is None:
            if self.cg is not None and self.best is not None:
                self.best.stale += 1  # a failed evaluation is no improvement
                self.best.refused += self._refused
        elif self.best is None:
            self.best = _StartBest(np.array(theta, copy=True), member)
        else:
            best_total = float(np.sum(self.best.member))
            if total > best_total:
                gain = total - best_total
                stale = self.best.stale + 1
                if gain > STALL_RTOL * abs(best_total):
                    stale = 0
                self.best = _StartBest(np.array(theta, copy=True), member, stale)
            else:
                self.best.stale += 1
        if self.best is not None and self.best.stale >= STALL_EVALUATIONS:
            raise _Stalled

    def _lml(self, theta):
        """``log p(y)`` per problem at ``θ`` (a float64 tensor or an array)."""
        if self.gradient == "autograd":
            gp = self.space.model(
                self.gp, theta, "torch", self.torch.float64, self.device
            )
            if self.cg is not None:
                return self._cg_lml(gp, self.obs_t)
            # dense systems: the closed-form backward pass of gpgrad.likelihood
            return gp.log_marginal_likelihood(*self.obs_t)
        gp = self.space.model(self.gp, theta, "numpy")
        if self.cg is not None:
            return self._cg_lml(gp, self.obs)
        return gp.log_marginal_likelihood(*self.obs)

    def _cg_lml(self, gp, obs):
        """``log p(y)`` on the iterative solver within an iteration budget:
        :data:`CG_BUDGET_FACTOR` times the most iterations an evaluation has
        needed so far (at least the options' own cap for the first). A trial
        point whose system needs more (an optimizer step towards a far worse
        conditioned system, typically a tiny noise) fails like an unfactorable
        one, and the optimizer backs off, instead of running for minutes."""
        from .solvers.iterative import ConvergenceWarning

        if self.cg_iterations:
            budget = max(CG_BUDGET_MIN, CG_BUDGET_FACTOR * self.cg_iterations)
            gp.method = self.cg.with_max_iter(budget)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            try:
                post = gp.condition(*obs)
                lml = post.log_marginal_likelihood()
            except ConvergenceWarning:
                self._refused = True
                raise
        used = int(getattr(post.solver, "stats", {}).get("iterations", 0))
        self.cg_iterations = max(self.cg_iterations, used)
        return lml

    def __call__(self, theta):
        self.count += 1
        self._refused = False
        g = None
        try:
            if self.fast is not None:
                member, g = self._fast(theta)
            elif self.gradient == "autograd":
                torch = self.torch
                t = torch.tensor(
                    theta, dtype=torch.float64, device=self.device, requires_grad=True
                )
                lml = self._lml(t)
                loss = -lml.sum() / self.n_obs
                (g,) = torch.autograd.grad(loss, t)
                g = g.cpu().numpy()
                member = _np(lml.detach())
            else:
                member = _np(self._lml(theta))
            total = float(np.sum(member))
            f = -total / self.n_obs
        except Exception as exc:
            if not _evaluation_failed(exc):
                raise
            f, total, member = _BAD_OBJECTIVE, -np.inf, None
        if not np.isfinite(f) or (g is not None and not np.all(np.isfinite(g))):
            f, g, member = _BAD_OBJECTIVE, np.zeros_like(theta), None
        self._last = (np.array(theta, copy=True), member)
        self._report(total)
        self._track(theta, total, member)
        return f if self.gradient != "autograd" else (f, g)

    def _fast(self, theta, grad=True):
        """``log p(y)`` and the gradient of the loss by :attr:`fast`."""
        lml, d = self.fast(self.space.model(self.gp, theta, "numpy"), grad)
        if not grad:
            return np.asarray(lml), None
        parts = [
            d[s.name] * (v if s.log else s.width)
            for s, v in zip(self.space.specs, self.space.values(theta))
        ]
        return np.asarray(lml), -self.space.pack(parts) / self.n_obs

    def _report(self, total):
        if self.progress is False:
            return
        if callable(self.progress):
            self.progress(self.start, self.count, total)
        elif self.count % 25 == 0:
            print(
                f"gpgrad.fit: start {self.start}, evaluation {self.count}, log "
                f"marginal likelihood {total:.6g}",
                file=sys.stderr,
            )

    def member_lml(self, theta):
        """Log marginal likelihood per problem (``-inf`` where it fails); the
        last evaluation's (or this start's best one's) when it was at
        ``theta``."""
        known = [self._last]
        if self.best is not None:
            known.append((self.best.theta, self.best.member))
        member = None
        for k in known:
            if k is not None and k[1] is not None and np.array_equal(k[0], theta):
                member = k[1]
                break
        if member is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", JitterWarning)
                    if self.fast is not None:
                        member = self._fast(theta, grad=False)[0]
                    elif self.gradient == "autograd":
                        torch = self.torch
                        with torch.no_grad():
                            t = torch.tensor(
                                theta, dtype=torch.float64, device=self.device
                            )
                            member = _np(self._lml(t))
                    else:
                        member = _np(self._lml(theta))
            except Exception as exc:
                if not _evaluation_failed(exc):
                    raise
                return np.full(self.batch, -np.inf)
        out = np.broadcast_to(member, self.batch).copy()
        out[~np.isfinite(out)] = -np.inf
        return out


def _to_torch(f, dtype, device):
    """The functional ``f`` with its points, targets and direction fields as
    tensors of ``dtype`` on ``device`` (integer fields kept)."""
    import torch

    def conv(a):
        if a is None:
            return None
        if isinstance(a, np.ndarray) and not np.issubdtype(a.dtype, np.floating):
            return a
        if B.is_tensor(a) and not a.is_floating_point():
            return a
        if not (isinstance(a, np.ndarray) or B.is_tensor(a)):
            return a
        if isinstance(a, np.ndarray) and not a.flags.writeable:
            a = np.array(a)  # torch warns on (and may write to) read-only memory
        return torch.as_tensor(a, dtype=dtype, device=device)

    fields = {name: conv(getattr(f, name)) for name in f.fields}
    return type(f).build(f.kind, conv(f.X), conv(f.y), f.noise, **fields)


class _few_threads:
    """Run small CPU fits on one thread (torch and BLAS), the final
    conditioning included.

    Thread start-up and synchronization cost more than they save on the small
    matrices of a typical fit, and far more on a busy machine, where threads
    wait for each other. The settings are restored afterwards.
    """

    def __init__(self, gradient, gp, n_obs):
        self.active = (
            gradient != "finite-difference"
            and (gp.backend == "numpy" or gp.device.type == "cpu")
            and n_obs <= 2000
        )
        self.limits = None

    def __enter__(self):
        # a fit that never imported torch (numpy state-space) does not import it
        self.torch = sys.modules.get("torch") if self.active else None
        if self.active:
            if self.torch is not None:
                self.saved = self.torch.get_num_threads()
                self.torch.set_num_threads(1)
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:  # pragma: no cover - optional
                pass
            else:
                self.limits = threadpool_limits(1, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self.active:
            if self.torch is not None:
                self.torch.set_num_threads(self.saved)
            if self.limits is not None:
                self.limits.restore_original_limits()
        return False


# --------------------------------------------------------------------------
# step 5: the restarts


@dataclass
class _Best:
    """The best optimum over the starts, per problem."""

    theta: np.ndarray
    member: np.ndarray
    totals: list
    #: from any start (per problem when batched)
    converged: bool | np.ndarray
    #: trial points next to the best one refused by the CG iteration budget
    refused: int = 0


def _run_starts(objective, space, theta0, settings):
    """L-BFGS-B from each start; the best optimum per problem."""
    rng = np.random.default_rng(settings.seed)
    best = _Best(theta0.copy(), np.full(space.batch, -np.inf), [], False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JitterWarning)
        for start in range(settings.restarts):
            x0 = theta0
            if start > 0:
                # log-uniform within a factor e^±2 of the first start
                x0 = theta0 + rng.uniform(-2.0, 2.0, theta0.shape)
                x0 = np.clip(x0, space.lo, space.hi)
            objective.new_start(start + 1)
            theta, ok = x0, True
            if space.specs:
                res = _minimize(objective, x0, space, settings)
                theta, ok = res.x, getattr(res, "converged", bool(res.success))
            best.converged = best.converged | ok
            member = objective.member_lml(theta)
            best.totals.append(float(np.sum(member)))
            better = member > best.member
            if np.any(better):
                best.theta = space.merge(best.theta, theta, better)
                best.member = np.where(better, member, best.member)
                best.refused = objective.refused_since_best()
            if settings.progress is True:
                print(
                    f"gpgrad.fit: start {start + 1}/{settings.restarts} done, log "
                    f"marginal likelihood {best.totals[-1]:.6g} "
                    f"({objective.count} evaluations)",
                    file=sys.stderr,
                )
    return best


def _fit_batched_starts(gp, obs, spec_args, settings):
    """All starts as one batch of ``restarts`` identical problems; the best
    start's hyperparameters as the result of the unbatched problem."""
    R = settings.restarts
    stacked = [_repeat(f, R) for f in obs]
    specs, fixed_values = _specs(gp, stacked, (R,), *spec_args)
    objective = _Objective(
        gp, stacked, specs, fixed_values, (R,), settings.gradient, settings.progress
    )
    space = objective.space
    first = space.start(settings.start)
    rng = np.random.default_rng(settings.seed)
    # start 0 is the data-driven (or given) one, the others random around it
    others = np.clip(first + rng.uniform(-2.0, 2.0, first.shape), space.lo, space.hi)
    theta0 = space.merge(others, first, np.arange(R) == 0)
    with _few_threads(settings.gradient, gp, objective.n_obs):
        best = _run_starts(objective, space, theta0, replace(settings, restarts=1))
        k = int(np.argmax(best.member))
        single, _ = _specs(gp, obs, (), *spec_args)
        theta = np.concatenate([t[k].reshape(-1) for t in space.split(best.theta)])
        totals = [float(m) for m in best.member]
        converged = bool(np.any(best.converged))
        winner = _Best(theta, np.asarray(best.member[k]), totals, converged)
        space = _Space(single, (), fixed_values)
        return _result(gp, obs, space, winner, objective, settings)


def _repeat(f, R):
    """The functional ``f`` with its points and targets repeated along a new
    leading batch axis of length ``R`` (views, no copies)."""
    import torch

    def rep(a):
        t = torch.as_tensor(a)
        return t.expand((R,) + tuple(t.shape))

    fields = {name: getattr(f, name) for name in f.fields}
    return type(f).build(f.kind, rep(f.X), rep(f.y), f.noise, **fields)


#: L-BFGS-B's projected-gradient tolerance on ``log p(y) / N``
GTOL = 1e-5
#: above this many observations a state-space fit's tolerances shrink as 1/N
LONG = 10_000


def _minimize(objective, x0, space, settings):
    from scipy.optimize import OptimizeResult, minimize

    if space.batch and BATCH_OPTIMIZER == "per-problem":
        return _minimize_batched(objective, x0, space, settings)

    options = {"maxiter": settings.maxiter, "ftol": settings.tol}
    if objective.fast is not None and objective.n_obs > LONG:
        # a long series: per sample, tol is tol·N units of log p (17 units
        # between a stop and the optimum were seen at 10⁶ samples); keep the
        # tolerances at their size for LONG samples
        shrink = LONG / objective.n_obs
        options["ftol"] = settings.tol * shrink
        options["gtol"] = GTOL * shrink
    try:
        return minimize(
            objective,
            x0,
            jac=objective.gradient == "autograd",
            method="L-BFGS-B",
            bounds=list(zip(space.lo, space.hi)),
            options=options,
        )
    except _Stalled:
        # converged as far as the stochastic estimate can tell: the best
        # point of this start
        return OptimizeResult(
            x=objective.best.theta,
            success=True,
            message="no gain above the estimator's resolution",
        )


#: how a batch of problems is optimized: ``"per-problem"`` (each problem its
#: own L-BFGS in lockstep, :func:`_minimize_batched`) or ``"joint"`` (one
#: L-BFGS-B over all problems' hyperparameters, the summed loss; kept for
#: comparison)
BATCH_OPTIMIZER = "per-problem"
#: L-BFGS memory (correction pairs) of the batched optimizer, as scipy's
#: L-BFGS-B default
LBFGS_MEMORY = 10
#: step halvings before a batched problem's line search gives up
MAX_BACKTRACKS = 30


#: the batched optimizer evaluates only the problems still searching once
#: they are at most this share of the problems it evaluates
COMPACT_FRACTION = 0.5


def _problem_index(space):
    """``(nb, p)``: the entries of the packed ``θ`` that belong to each
    problem of ``space``'s (flattened) batch, in spec order."""
    nb = int(np.prod(space.batch))
    parts = space.split(np.arange(sum(space.sizes)))
    return np.concatenate([a.reshape(nb, -1) for a in parts], axis=1)


def _size(v):
    return int(np.size(B.to_numpy(v))) if v is not None else 1


def _compactable(objective):
    """Whether :func:`_sub_objective` can take a subset of ``objective``'s
    problems: every per-problem quantity has the batch axes in front (points,
    targets, the fitted hyperparameters' bounds); noises, fixed values and
    functional fields shared by all problems."""
    if objective.fast is not None or objective.gradient != "autograd":
        return False
    fitted = {s.name for s in objective.space.specs}
    if any(_size(v) != 1 for v in objective.space.fixed_values.values()):
        return False
    gp = objective.gp
    for name, v in gp.kernel.parameters().items():
        if name not in fitted and _size(v) != 1:
            return False
    for f in objective.obs:
        if f.noise is not None and _size(f.noise) != 1:
            return False
        if any(getattr(f, name) is not None for name in f.fields):
            return False
        if f"noise.{f.kind}" not in fitted and _size(gp.noise_for(f.kind)) != 1:
            return False
    return "mean" in fitted or _size(gp.mean) == 1


def _sub_objective(objective, members):
    """An :class:`_Objective` for the problems ``members`` (indices into the
    flattened batch) of ``objective``, which :func:`_compactable` allows."""
    import torch

    space = objective.space
    batch = tuple(space.batch)
    nb, k = int(np.prod(batch)), len(batch)
    rows = torch.as_tensor(members, dtype=torch.long)

    def take(a, tail):
        full = batch + tuple(tail)
        return np.broadcast_to(np.asarray(a, dtype=float), full).reshape(
            (nb,) + tuple(tail)
        )[members]

    specs = [
        replace(
            sp,
            init=take(sp.init, sp.shape),
            lower=take(sp.lower, sp.shape),
            upper=take(sp.upper, sp.shape),
            center=take(sp.center, sp.shape) if np.ndim(sp.center) else sp.center,
            width=take(sp.width, sp.shape) if np.ndim(sp.width) else sp.width,
        )
        for sp in space.specs
    ]

    def rows_of(t):
        t = torch.as_tensor(t)
        return t.reshape((nb,) + tuple(t.shape[k:]))[rows.to(t.device)]

    obs = [
        type(f).build(f.kind, rows_of(f.X), rows_of(f.y), f.noise)
        for f in objective.obs
    ]
    sub = _Objective(
        objective.gp,
        obs,
        specs,
        space.fixed_values,
        (len(members),),
        objective.gradient,
        objective.progress,
    )
    sub.count, sub.start = objective.count, objective.start
    return sub


def _minimize_batched(objective, x0, space, settings):
    """Every problem of a batch by its own projected L-BFGS, in lockstep.

    The batch's problems are independent, but one L-BFGS-B over their joint
    vector shares a single line search, curvature memory and stopping test
    between them: one hard problem sets the step length for all, and the
    summed loss stops on the batch's average progress, not each problem's.
    Here every problem keeps its own memory, step length and convergence
    test (L-BFGS-B's ``ftol`` and projected-gradient tests on its own
    ``−log p / n``), and each batched evaluation advances every problem one
    step of its own search; a converged problem stays where it stopped. The
    direction is the two-loop L-BFGS direction on the variables not held at
    a bound, the step a projected backtracking (Armijo) search.

    Returns an :class:`~scipy.optimize.OptimizeResult` with ``x`` (the packed
    ``θ``), ``success`` (every problem converged), ``converged`` and
    ``steps`` (per problem, ``batch`` shaped) and ``nit`` (the most steps a
    problem took).
    """
    from scipy.optimize import OptimizeResult

    nb = int(np.prod(space.batch))
    index = _problem_index(space)  # (nb, p): problem b's entries of θ

    def unpack(v):
        return v[index]

    def pack(m, idx=index):
        out = np.empty(idx.size)
        out[idx] = m
        return out

    lo, hi = unpack(space.lo), unpack(space.hi)
    n_per = objective.n_obs / nb
    # the problems evaluated (all, until few are left searching) and their
    # objective
    state = {"members": np.arange(nb), "obj": objective, "index": index}
    compact = _compactable(objective)

    def evaluate(xm, f_now, g_now, lml_now):
        """Per problem ``−log p / n`` and its gradient (inf where the batch
        evaluation failed) and the per-problem ``log p``; the problems not
        evaluated keep ``f_now``, ``g_now``, ``lml_now``."""
        members, obj = state["members"], state["obj"]
        f, g = obj(pack(xm[members], state["index"]))
        objective.count = obj.count
        member = obj._last[1]
        m = len(members)
        if member is None or f >= _BAD_OBJECTIVE:
            ft = f_now.copy()
            ft[members] = np.inf
            gt = g_now.copy()
            return ft, gt, None
        member = np.asarray(member, dtype=float).reshape(m)
        ft, gt, lt = f_now.copy(), g_now.copy(), lml_now.copy()
        ft[members] = -member / n_per
        gt[members] = g[state["index"]] * m
        lt[members] = member
        return ft, gt, lt

    def free(x, g):
        """Variables not held at a bound by their gradient."""
        return ~(((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)))

    def direction(g, mask, S, Y, k):
        """The two-loop L-BFGS direction, restricted to ``mask``."""
        q = np.where(mask, g, 0.0)
        m = S.shape[1]
        alpha = np.zeros((nb, m))
        rho = np.zeros((nb, m))
        valid = np.arange(m)[None, :] < k[:, None]
        sy = np.einsum("bjp,bjp->bj", S, Y)
        rho[valid] = 1.0 / sy[valid]
        for j in range(m):  # newest first
            a = rho[:, j] * np.einsum("bp,bp->b", S[:, j], q)
            alpha[:, j] = a
            q = q - a[:, None] * Y[:, j]
        yy = np.einsum("bp,bp->b", Y[:, 0], Y[:, 0])
        gamma = np.where(k > 0, sy[:, 0] / np.where(yy > 0, yy, 1.0), 1.0)
        r = gamma[:, None] * q
        for j in reversed(range(m)):
            b = rho[:, j] * np.einsum("bp,bp->b", Y[:, j], r)
            r = r + (alpha[:, j] - b)[:, None] * S[:, j]
        d = np.where(mask, -r, 0.0)
        # not a descent direction (a stale memory): steepest descent afresh
        bad = np.einsum("bp,bp->b", d, g) >= 0
        if np.any(bad):
            d[bad] = np.where(mask[bad], -g[bad], 0.0)
            k[bad] = 0
        return d

    x = np.clip(unpack(np.asarray(x0, dtype=float)), lo, hi)
    f, g, lml = evaluate(x, np.zeros(nb), np.zeros_like(x), np.zeros(nb))
    if lml is None:  # the start itself cannot be evaluated
        return OptimizeResult(
            x=pack(x), success=False, converged=np.zeros(space.batch, bool), nit=0
        )
    p = x.shape[1]
    S = np.zeros((nb, LBFGS_MEMORY, p))
    Y = np.zeros((nb, LBFGS_MEMORY, p))
    k = np.zeros(nb, dtype=int)
    steps = np.zeros(nb, dtype=int)
    done = np.zeros(nb, dtype=bool)
    converged = np.zeros(nb, dtype=bool)

    def projected_gradient(x, g):
        return np.max(np.abs(np.clip(x - g, lo, hi) - x), axis=1)

    converged[:] = projected_gradient(x, g) <= GTOL
    done[:] = converged
    d = direction(g, free(x, g), S, Y, k)
    # the first step as L-BFGS-B's: 1/‖d‖, at most 1
    t = np.minimum(1.0, 1.0 / np.maximum(np.linalg.norm(d, axis=1), 1e-300))
    backtracks = np.zeros(nb, dtype=int)
    while not np.all(done):
        searching = np.flatnonzero(~done)
        if compact and searching.size <= COMPACT_FRACTION * len(state["members"]):
            # evaluate only the problems still searching from now on
            state["obj"] = _sub_objective(objective, searching)
            state["members"] = searching
            state["index"] = _problem_index(state["obj"].space)
        xt = np.where(done[:, None], x, np.clip(x + t[:, None] * d, lo, hi))
        ft, gt, lt = evaluate(xt, f, g, lml)
        search = ~done
        # Armijo on the projected path: f(x_t) ≤ f(x) + c₁ gᵀ(x_t − x)
        slope = np.einsum("bp,bp->b", g, xt - x)
        ok = search & np.isfinite(ft) & (ft <= f + 1e-4 * slope)
        fail = search & ~ok
        if np.any(ok):
            s_new, y_new = xt[ok] - x[ok], gt[ok] - g[ok]
            sy = np.einsum("bp,bp->b", s_new, y_new)
            yy = np.einsum("bp,bp->b", y_new, y_new)
            keep = sy > 2.2e-16 * yy  # curvature pairs L-BFGS-B would keep
            rows = np.flatnonzero(ok)[keep]
            if rows.size:
                S[rows] = np.roll(S[rows], 1, axis=1)
                Y[rows] = np.roll(Y[rows], 1, axis=1)
                S[rows, 0] = s_new[keep]
                Y[rows, 0] = y_new[keep]
                k[rows] = np.minimum(k[rows] + 1, LBFGS_MEMORY)
            reduction = (f[ok] - ft[ok]) / np.maximum.reduce(
                [np.abs(f[ok]), np.abs(ft[ok]), np.ones(int(ok.sum()))]
            )
            x[ok], f[ok], g[ok], lml[ok] = xt[ok], ft[ok], gt[ok], lt[ok]
            steps[ok] += 1
            backtracks[ok] = 0
            conv = np.zeros(nb, dtype=bool)
            conv[ok] = (reduction <= settings.tol) | (
                projected_gradient(x, g)[ok] <= GTOL
            )
            converged |= conv
            done |= conv | (ok & (steps >= settings.maxiter))
            go = ok & ~done
            if np.any(go):
                d_all = direction(g, free(x, g), S, Y, k)
                d[go] = d_all[go]
                t[go] = 1.0
        if np.any(fail):
            # backtrack: a safeguarded quadratic fit of f along the step, or
            # a quarter of it where the evaluation failed
            fin = np.isfinite(ft)
            curv = ft - f - slope
            tq = np.where(
                fin & (curv > 0), -0.5 * slope * t / np.where(curv > 0, curv, 1.0), 0
            )
            shrink = np.where(fin, np.clip(tq / t, 0.1, 0.5), 0.25)
            t[fail] *= shrink[fail]
            backtracks[fail] += 1
            done |= fail & (backtracks > MAX_BACKTRACKS)
    objective._last = (pack(x), lml.reshape(space.batch))
    conv = converged.reshape(space.batch)
    return OptimizeResult(
        x=pack(x),
        success=bool(np.all(conv)),
        converged=conv,
        nit=int(steps.max()),
        steps=steps.reshape(space.batch),
    )


# --------------------------------------------------------------------------
# step 6: the result


def _result(gp, obs, space, best, objective, settings):
    if not np.all(np.isfinite(best.member)):
        raise NotPositiveDefiniteError(
            "no start gave a covariance matrix that could be factored; raise the "
            "noise bounds (bounds={'noise.value': (lo, hi)}) or check the data "
            "for duplicated points"
        )
    if space.specs and not np.all(best.converged):
        which = ""
        if np.ndim(best.converged):
            bad = int(np.size(best.converged) - np.count_nonzero(best.converged))
            which = f" for {bad} of {np.size(best.converged)} problems"
        warnings.warn(
            f"L-BFGS-B did not converge{which} from any of the {settings.restarts} "
            f"starts within {settings.maxiter} iterations; raise maxiter or check "
            "the bounds",
            FitWarning,
            stacklevel=3,
        )
    if best.refused:
        warnings.warn(
            f"the fit stopped next to {best.refused} trial point(s) whose "
            "conjugate-gradient solves needed more than the iteration budget "
            f"({CG_BUDGET_FACTOR}x the most an earlier evaluation needed): the "
            "likelihood may rise further towards a worse conditioned system, "
            "typically a smaller noise. Bound the noise from below (fit(..., "
            "bounds={'noise.gradient': (lower, upper)})) or fix it, or raise "
            "gpgrad.fit.CG_BUDGET_FACTOR",
            FitWarning,
            stacklevel=3,
        )
    on_bound = space.on_bound(best.theta)
    if objective.fast is not None:
        # the last pass's arrays are not needed by the posterior built below
        objective.fast.series = None
    new_gp = space.model(gp, best.theta, gp.backend)
    params = dict(new_gp.kernel.parameters())
    for kind in KINDS:
        if any(f.kind == kind and f.noise is None for f in obs):
            v = new_gp.noise_for(kind)
            if B.is_tensor(v) or isinstance(v, np.ndarray):
                v = v.reshape(tuple(space.batch))
                if isinstance(v, np.ndarray):
                    v = float(v) if v.ndim == 0 else v
            params[f"noise.{kind}"] = v
    params["mean"] = new_gp.mean
    post = new_gp.condition(*obs)
    lml = post.log_marginal_likelihood()
    if not space.batch:
        lml = B.to_float(lml)
    return FitResult(
        gp=new_gp,
        posterior=post,
        params=params,
        fitted=[s.name for s in space.specs],
        bounds={s.name: (_plain(s.lower), _plain(s.upper)) for s in space.specs},
        log_marginal_likelihood=lml,
        on_bound=on_bound,
        restarts=best.totals,
        gradient=settings.gradient,
        n_evaluations=objective.count,
    )


def _plain(v):
    a = np.asarray(v, dtype=float)
    return float(a) if a.ndim == 0 else a


# --------------------------------------------------------------------------
# ``gpgrad.fit`` is this module, and calling it fits: one object under one
# name, so ``gpgrad.fit(gp, X, y)``, ``gpgrad.fit.FitResult`` and
# ``from gpgrad.fit import fit`` all work


class _FitModule(types.ModuleType):
    """The :mod:`gpgrad.fit` module; calling it calls :func:`fit`."""

    def __call__(self, *args, **kwargs) -> FitResult:
        return fit(*args, **kwargs)


sys.modules[__name__].__class__ = _FitModule
__signature__ = inspect.signature(fit)
