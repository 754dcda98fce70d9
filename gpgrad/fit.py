"""Hyperparameters by maximizing the log marginal likelihood.

Every observation kind counts: values, gradients, partial, directional and
second derivatives enter the same likelihood

.. math::

    \\log p(y \\mid θ) = -\\tfrac12 r^\\top (K_θ + Σ_θ)^{-1} r
        - \\tfrac12 \\log|K_θ + Σ_θ| - \\tfrac N2 \\log 2π,
    \\qquad r = y - L m_θ,

with ``K_θ`` the kernel's cross-covariance of the observed functionals ``L``,
``Σ_θ`` one noise variance per observation kind and ``m_θ`` a constant mean.
Positive hyperparameters are optimized as ``log θ`` within bounds (L-BFGS-B);
the gradient ``∂ log p / ∂ log θ`` comes from torch autograd through the same
covariance code the posterior uses (for either backend), or from finite
differences when torch is not installed.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from . import backend as B
from .exceptions import (
    GPGradWarning,
    JitterWarning,
    NotPositiveDefiniteError,
    raise_if_out_of_memory,
)
from .gp import _KINDS, GP

__all__ = ["fit", "FitResult", "FitWarning"]

#: extra target axes (after the batch axes and the point axis) of each kind,
#: so that a per-problem noise tensor broadcasts against the targets
_TARGET_AXES = {
    "value": 1,
    "gradient": 2,
    "partial": 1,
    "directional": 1,
    "second": 1,
    "hessian": 3,
}
#: number of derivatives in each kind's entries
_ORDER = {
    "value": 0,
    "gradient": 1,
    "partial": 1,
    "directional": 1,
    "second": 2,
    "hessian": 2,
}
#: a log-parameter closer than this to a bound (in log units) counts as on it
_BOUND_TOL = 1e-3
#: objective returned where the covariance cannot be factored: L-BFGS-B then
#: backtracks instead of stopping on an infinite value
_BAD_OBJECTIVE = 1e10


class FitWarning(GPGradWarning):
    """A fitted hyperparameter sits on a bound, or the optimizer struggled."""


class _Spec:
    """One hyperparameter being optimized.

    ``shape`` is its per-problem shape (``()`` or ``(d,)``); values are stored
    with the batch axes first, ``batch + shape``. ``log`` parameters are
    optimized as ``log θ``; the mean as ``(m − center) / width``.
    """

    def __init__(self, name, shape, init, lower, upper, log=True, center=0, width=1):
        self.name = name
        self.shape = tuple(shape)
        self.init = init
        self.lower = lower
        self.upper = upper
        self.log = log
        self.center = center
        self.width = width

    def to_theta(self, v):
        if self.log:
            return np.log(v)
        return (v - self.center) / self.width

    def from_theta(self, t, xp=np):
        if self.log:
            return xp.exp(t)
        return self.center + self.width * t


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
        ``"autograd"`` or ``"finite-difference"``.
    n_evaluations : int
        Likelihood evaluations over all restarts.
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)

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
    gp,
    *observations,
    fixed=None,
    bounds=None,
    ard=False,
    fit_mean=True,
    restarts=3,
    seed=0,
    maxiter=300,
    gradient="auto",
    progress=False,
) -> FitResult:
    """Fit hyperparameters by maximizing the log marginal likelihood.

    Optimizes ``log θ`` for every positive hyperparameter of the kernel, one
    noise variance per observation kind that does not carry its own noise
    (``gpgrad.gradients(X, G, noise=...)`` fixes it), and the constant mean,
    with L-BFGS-B within bounds, from a data-driven start and ``restarts − 1``
    random starts around it; the best optimum wins (per problem when batched).

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
        within ``[1e-3, 1e2]`` × the input's span, the variance within
        ``[1e-4, 1e4]`` × its initial value, a noise within ``[1e-8, 10]`` × the
        mean square of that kind's targets, other kernel parameters within a
        factor 1000 of their current value.
    ard : bool, default False
        Give a scalar lengthscale one entry per input dimension.
    fit_mean : bool, default True
        Fit the constant mean (only when there are value observations; the
        likelihood of derivative data does not depend on it).
    restarts : int, default 3
        Number of starts (the first is the data-driven one).
    seed : int, default 0
        Seed of the random starts.
    maxiter : int, default 300
        L-BFGS-B iterations per start.
    gradient : {"auto", "autograd", "finite-difference"}
        How the likelihood's gradient is computed. ``"auto"`` uses torch
        autograd when torch is installed, else scipy's finite differences
        (slower and less precise; numpy backend only).
    progress : bool or callable, default False
        ``True`` prints a line per start and every 25 evaluations to stderr; a
        callable is called as ``progress(start, evaluation, lml)``.

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
    """
    if not isinstance(gp, GP):
        raise TypeError(f"fit expects a gpgrad.GP as first argument, got {type(gp)}")
    obs = gp._parse(observations)
    restarts = _check_int(restarts, "restarts")
    maxiter = _check_int(maxiter, "maxiter")
    if gradient not in ("auto", "autograd", "finite-difference"):
        raise ValueError(
            "gradient must be 'auto', 'autograd' or 'finite-difference', got "
            f"{gradient!r}"
        )
    have_torch = _torch_available()
    if gradient == "auto":
        gradient = "autograd" if have_torch else "finite-difference"
    if gradient == "autograd" and not have_torch:
        raise ValueError(
            "gradient='autograd' needs torch (pip install torch); use "
            "gradient='finite-difference'"
        )
    if gradient == "finite-difference" and gp.backend == "torch":
        raise ValueError(
            "backend='torch' fits with autograd; gradient='finite-difference' is "
            "for the numpy backend without torch"
        )
    batch = _batch_of(obs)
    if batch and gp.backend != "torch":
        raise ValueError(
            f"the observations have batch axes {batch}: batched problems are "
            "fitted with GP(..., backend='torch')"
        )
    if progress is not True and progress is not False and not callable(progress):
        raise TypeError(
            f"progress must be True, False or a callable, got {type(progress)}"
        )

    specs, fixed_values = _specs(gp, obs, batch, fixed, bounds, ard, fit_mean)
    lo = _pack(specs, batch, [s.to_theta(s.lower) for s in specs])
    hi = _pack(specs, batch, [s.to_theta(s.upper) for s in specs])
    theta0 = _pack(specs, batch, [s.to_theta(s.init) for s in specs])
    theta0 = np.clip(theta0, lo, hi)

    objective = _Objective(gp, obs, specs, fixed_values, batch, gradient, progress)
    with _few_threads(gradient, gp, objective.n_obs):
        best_theta, best_member, totals, converged = _run_starts(
            objective,
            specs,
            batch,
            theta0,
            lo,
            hi,
            restarts,
            seed,
            maxiter,
            gradient,
            progress,
        )
    if not np.all(np.isfinite(best_member)):
        raise NotPositiveDefiniteError(
            "no start gave a covariance matrix that could be factored; raise the "
            "noise bounds (bounds={'noise.value': (lo, hi)}) or check the data "
            "for duplicated points"
        )
    if specs and not converged:
        warnings.warn(
            f"L-BFGS-B did not converge from any of the {restarts} starts within "
            f"{maxiter} iterations; raise maxiter or check the bounds",
            FitWarning,
            stacklevel=2,
        )

    values = _unpack(specs, batch, best_theta)
    on_bound = _check_bounds(specs, batch, best_theta, lo, hi)
    noise_kinds = {f.kind for f in obs if f.noise is None}
    new_gp, params = _build_final(gp, specs, values, fixed_values, batch, noise_kinds)
    post = new_gp.condition(*obs)
    lml = post.log_marginal_likelihood()
    if not batch:
        lml = B.to_float(lml)
    return FitResult(
        gp=new_gp,
        posterior=post,
        params=params,
        fitted=[s.name for s in specs],
        bounds={s.name: (_plain(s.lower), _plain(s.upper)) for s in specs},
        log_marginal_likelihood=lml,
        on_bound=on_bound,
        restarts=totals,
        gradient=gradient,
        n_evaluations=objective.count,
    )


def _run_starts(
    objective,
    specs,
    batch,
    theta0,
    lo,
    hi,
    restarts,
    seed,
    maxiter,
    gradient,
    progress,
):
    """L-BFGS-B from each start; the best optimum per problem."""
    rng = np.random.default_rng(seed)
    best_theta = theta0.copy()
    best_member = np.full(batch, -np.inf)
    totals = []
    converged = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JitterWarning)
        for start in range(restarts):
            if start == 0:
                x0 = theta0
            else:
                # log-uniform within a factor e^±2 of the data-driven start
                x0 = np.clip(theta0 + rng.uniform(-2.0, 2.0, theta0.shape), lo, hi)
            objective.start = start + 1
            if specs:
                res = _minimize(objective, x0, lo, hi, maxiter, gradient)
                theta, ok = res.x, bool(res.success)
            else:
                theta, ok = x0, True
            converged |= ok
            member = objective.member_lml(theta)
            totals.append(float(np.sum(member)))
            better = member > best_member
            if np.any(better):
                best_theta = _merge(specs, batch, best_theta, theta, better)
                best_member = np.where(better, member, best_member)
            if progress is True:
                print(
                    f"gpgrad.fit: start {start + 1}/{restarts} done, log marginal "
                    f"likelihood {totals[-1]:.6g} ({objective.count} evaluations)",
                    file=sys.stderr,
                )
    return best_theta, best_member, totals, converged


class _few_threads:
    """Run small autograd fits on one CPU thread.

    Torch's OpenMP threads cost far more than they save on the small matrices
    of a typical fit, and on a busy machine they wait for each other (a
    40-point likelihood and its gradient took 200 ms with two threads and
    1.5 ms with one). The setting is restored afterwards.
    """

    def __init__(self, gradient, gp, n_obs):
        self.active = (
            gradient == "autograd"
            and (gp.backend == "numpy" or gp.device.type == "cpu")
            and n_obs <= 2000
        )

    def __enter__(self):
        if self.active:
            import torch

            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.active:
            import torch

            torch.set_num_threads(self.saved)
        return False


# ``gpgrad.fit`` is this function (it shadows the module in the package's
# namespace), so its companions are reachable from it as well
fit.FitResult = FitResult
fit.FitWarning = FitWarning


# --------------------------------------------------------------------------
# helpers


def _torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:  # pragma: no cover - torch is a dev dependency
        return False
    return True


def _check_int(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return int(v)


def _plain(v):
    a = np.asarray(v, dtype=float)
    return float(a) if a.ndim == 0 else a


def _np(a):
    return np.asarray(B.to_numpy(a), dtype=np.float64)


def _batch_of(obs):
    shape = ()
    for f in obs:
        shape = np.broadcast_shapes(shape, tuple(f.X.shape[:-2]))
    return tuple(shape)


def _full(spec, batch):
    return tuple(batch) + spec.shape


def _pack(specs, batch, arrays):
    if not specs:
        return np.zeros(0)
    return np.concatenate(
        [np.broadcast_to(a, _full(s, batch)).ravel() for s, a in zip(specs, arrays)]
    )


def _unpack(specs, batch, theta):
    out, i = [], 0
    for s in specs:
        shape = _full(s, batch)
        size = int(np.prod(shape))
        out.append(s.from_theta(theta[i : i + size].reshape(shape)))
        i += size
    return out


def _merge(specs, batch, old, new, better):
    """``new`` where ``better`` (per problem), else ``old``."""
    parts, i = [], 0
    for s in specs:
        shape = _full(s, batch)
        size = int(np.prod(shape))
        mask = np.reshape(better, tuple(batch) + (1,) * len(s.shape))
        a = old[i : i + size].reshape(shape)
        b = new[i : i + size].reshape(shape)
        parts.append(np.where(mask, b, a).ravel())
        i += size
    return np.concatenate(parts)


def _check_bounds(specs, batch, theta, lo, hi):
    names, i = [], 0
    for s in specs:
        size = int(np.prod(_full(s, batch)))
        t, a, b = theta[i : i + size], lo[i : i + size], hi[i : i + size]
        i += size
        if not s.log:
            continue
        at_lo = t <= a + _BOUND_TOL
        at_hi = t >= b - _BOUND_TOL
        if not (np.any(at_lo) or np.any(at_hi)):
            continue
        names.append(s.name)
        side = "lower" if np.any(at_lo) else "upper"
        value = float(np.exp(t[at_lo | at_hi][0]))
        where = "" if not batch else f" (in {int(np.sum(at_lo | at_hi))} entries)"
        hint = _BOUND_HINTS.get(s.name.rsplit(".", 1)[-1], "")
        if s.name.startswith("noise.") and side == "lower":
            hint = " The data may be (nearly) noise-free."
        warnings.warn(
            f"fitted {s.name} = {value:.3g} sits on its {side} bound{where}. Widen "
            f"it with fit(..., bounds={{{s.name!r}: (lower, upper)}}) or fix it "
            f"with fixed={{{s.name!r}: value}}.{hint}",
            FitWarning,
            stacklevel=3,
        )
    return names


_BOUND_HINTS = {
    "lengthscale": (
        " A lengthscale on its upper bound often means the data barely vary "
        "along that input; on its lower bound, that the data are too sparse or "
        "too noisy for the kernel."
    ),
}


# --------------------------------------------------------------------------
# parameters: names, data-driven starts, bounds


def _stats(gp, obs, batch):
    """Per-problem scales of the data: input spans, value mean and variance,
    and the mean square of each derivative kind's targets."""
    Xs = [np.broadcast_to(_np(f.X), tuple(batch) + tuple(f.X.shape[-2:])) for f in obs]
    X = np.concatenate(Xs, axis=-2)
    span = np.ptp(X, axis=-2)  # batch + (d,)
    span = np.where(span > 0, span, 1.0)
    vals = [_np(f.y) for f in obs if f.kind == "value"]
    st = {"span": span, "d": X.shape[-1], "ms": {}}
    if vals:
        v = np.concatenate(
            [np.broadcast_to(a, tuple(batch) + a.shape[-1:]) for a in vals], axis=-1
        )
        st["ybar"] = v.mean(axis=-1)
        sd = v.std(axis=-1) if v.shape[-1] > 1 else np.zeros(batch)
        st["ysd"] = np.where(sd > 0, sd, np.maximum(np.abs(st["ybar"]), 1.0))
    for kind in _KINDS[1:]:
        ys = [_np(f.y) for f in obs if f.kind == kind]
        if ys:
            flat = np.concatenate(
                [a.reshape(tuple(batch) + (-1,)) for a in ys], axis=-1
            )
            st["ms"][kind] = np.mean(flat * flat, axis=-1)
    return st


def _specs(gp, obs, batch, fixed, bounds, ard, fit_mean):
    st = _stats(gp, obs, batch)
    d = st["d"]
    span = st["span"]
    kernel = gp.kernel
    kparams = kernel.parameters()
    has_values = "ybar" in st
    # the standardized scale the kernel's variance refers to
    ysd_model = np.ones(batch) if gp.normalize_y else st.get("ysd", np.ones(batch))
    ls_scalar_span = np.exp(np.mean(np.log(span), axis=-1))  # geometric mean
    ls0_scalar = 0.2 * ls_scalar_span
    if has_values:
        sig2 = (st["ysd"] / (st["ysd"] if gp.normalize_y else 1.0)) ** 2
    elif any(_ORDER[k] == 1 for k in st["ms"]):
        ms = np.mean([v for k, v in st["ms"].items() if _ORDER[k] == 1], axis=0)
        sig2 = ms * ls0_scalar**2 / ysd_model**2
    elif st["ms"]:
        ms = np.mean(list(st["ms"].values()), axis=0)
        sig2 = ms * ls0_scalar**4 / ysd_model**2
    else:  # pragma: no cover - observations always have targets
        sig2 = np.ones(batch)
    sig2 = np.where(np.isfinite(sig2) & (sig2 > 0), sig2, 1.0)
    n_var = sum(1 for n in kparams if n.rsplit(".", 1)[-1] == "variance") or 1

    fixed_values = {}
    names_fixed = set()
    if fixed is not None:
        if isinstance(fixed, str):
            fixed = [fixed]
        if isinstance(fixed, dict):
            fixed_values.update(fixed)
            names_fixed = set(fixed)
        else:
            try:
                names_fixed = set(fixed)
            except TypeError:
                raise TypeError(
                    "fixed must be a list of names or a dict {name: value}, got "
                    f"{type(fixed).__name__}"
                ) from None
    bounds = dict(bounds or {})

    specs = []
    for name, value in kparams.items():
        base = name.rsplit(".", 1)[-1]
        cur = _np(value)
        if base == "lengthscale":
            per_dim = ard or (cur.ndim >= 1 and cur.shape[-1] == d and d > 1)
            if per_dim:
                shape, init = (d,), 0.2 * span
                lower, upper = 1e-3 * span, 1e2 * span
            else:
                # batched kernels read a lengthscale's last axis as dimensions
                shape = (1,) if batch else ()
                init = np.reshape(ls0_scalar, tuple(batch) + shape)
                lower, upper = 1e-3 * init / 0.2, 1e2 * init / 0.2
        elif base == "variance":
            shape, init = (), sig2 / n_var
            lower, upper = 1e-4 * init, 1e4 * init
        else:
            shape = () if cur.ndim == 0 else cur.shape[-1:]
            init = np.broadcast_to(cur, tuple(batch) + shape)
            lower, upper = 1e-3 * init, 1e3 * init
        specs.append(_Spec(name, shape, init, lower, upper))

    kinds = [k for k in _KINDS if any(f.kind == k and f.noise is None for f in obs)]
    for kind in kinds:
        name = f"noise.{kind}"
        if kind == "value":
            scale = st["ysd"] ** 2
        else:
            ms = st["ms"].get(kind, np.zeros(batch))
            # a derivative of order p scales as σ/ℓ^p
            fallback = sig2 * ysd_model**2 / ls0_scalar ** (2 * _ORDER[kind])
            scale = np.where(ms > 0, ms, fallback)
        specs.append(_Spec(name, (), 1e-2 * scale, 1e-8 * scale, 10.0 * scale))

    if fit_mean and has_values:
        center = np.zeros(batch) if gp.normalize_y else st["ybar"]
        specs.append(
            _Spec(
                "mean",
                (),
                center,
                None,
                None,
                log=False,
                center=center,
                width=st["ysd"],
            )
        )
        # the mean's θ lives in units of the values' spread
        specs[-1].lower = center - 1e3 * st["ysd"]
        specs[-1].upper = center + 1e3 * st["ysd"]

    known = {s.name for s in specs} | {"mean"} | {f"noise.{k}" for k in _KINDS}
    known |= set(kparams)
    unknown = sorted((names_fixed | set(bounds)) - known)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter {unknown[0]!r}; the names are "
            f"{sorted(s.name for s in specs)}"
        )
    for name, (lower, upper) in _check_bounds_arg(bounds).items():
        for s in specs:
            if s.name == name:
                s.lower = np.broadcast_to(lower, _full(s, batch)).astype(float)
                s.upper = np.broadcast_to(upper, _full(s, batch)).astype(float)
                s.init = np.clip(s.init, s.lower, s.upper)
    specs = [s for s in specs if s.name not in names_fixed]
    return specs, fixed_values


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
# the objective


class _Objective:
    """``−Σ log p(y) / N`` and its gradient in the optimizer's coordinates."""

    def __init__(self, gp, obs, specs, fixed_values, batch, gradient, progress):
        self.gp, self.obs, self.specs = gp, obs, specs
        self.fixed_values = fixed_values
        self.batch = batch
        self.gradient = gradient
        self.progress = progress
        self.count = 0
        self.start = 1
        self.n_obs = sum(f.size for f in obs) * max(1, int(np.prod(batch)))
        if gradient == "autograd":
            import torch

            self.torch = torch
            self.device = gp.device if gp.backend == "torch" else torch.device("cpu")

    def _model(self, theta, backend):
        """A GP with hyperparameters ``theta`` (a tensor for autograd)."""
        if backend == "torch":
            torch = self.torch
            vals, i = [], 0
            for s in self.specs:
                shape = _full(s, self.batch)
                size = int(np.prod(shape))
                t = theta[i : i + size].reshape(shape)
                if s.log:
                    vals.append(torch.exp(t))
                else:
                    center = torch.as_tensor(
                        s.center, dtype=theta.dtype, device=theta.device
                    )
                    width = torch.as_tensor(
                        s.width, dtype=theta.dtype, device=theta.device
                    )
                    vals.append(center + width * t)
                i += size
        else:
            vals = _unpack(self.specs, self.batch, theta)
            vals = [float(v) if np.ndim(v) == 0 else v for v in vals]
        return _assemble(
            self.gp,
            self.specs,
            vals,
            self.fixed_values,
            self.batch,
            backend,
            dtype=None if backend == "numpy" else "float64",
            device=getattr(self, "device", None),
        )

    def __call__(self, theta):
        self.count += 1
        try:
            if self.gradient == "autograd":
                torch = self.torch
                t = torch.tensor(
                    theta, dtype=torch.float64, device=self.device, requires_grad=True
                )
                gp = self._model(t, "torch")
                lml = gp.log_marginal_likelihood(*self.obs)
                loss = -lml.sum() / self.n_obs
                (g,) = torch.autograd.grad(loss, t)
                f, g = float(loss.detach().cpu()), g.cpu().numpy()
                total = -f * self.n_obs
            else:
                gp = self._model(theta, "numpy")
                total = float(np.sum(gp.log_marginal_likelihood(*self.obs)))
                f = -total / self.n_obs
                g = None
        except (NotPositiveDefiniteError, RuntimeError, np.linalg.LinAlgError) as e:
            raise_if_out_of_memory(e)  # memory, not conditioning: stop here
            f, total = _BAD_OBJECTIVE, -np.inf
            g = np.zeros_like(theta)
        if not np.isfinite(f) or (g is not None and not np.all(np.isfinite(g))):
            f, g = _BAD_OBJECTIVE, np.zeros_like(theta)
        self._report(total)
        return f if g is None else (f, g)

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
        """Log marginal likelihood per problem (``-inf`` where it fails)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", JitterWarning)
                if self.gradient == "autograd":
                    torch = self.torch
                    with torch.no_grad():
                        t = torch.tensor(theta, dtype=torch.float64, device=self.device)
                        lml = self._model(t, "torch").log_marginal_likelihood(*self.obs)
                else:
                    lml = self._model(theta, "numpy").log_marginal_likelihood(*self.obs)
        except (NotPositiveDefiniteError, RuntimeError, np.linalg.LinAlgError) as e:
            raise_if_out_of_memory(e)
            return np.full(self.batch, -np.inf)
        out = np.broadcast_to(_np(lml), self.batch).copy()
        out[~np.isfinite(out)] = -np.inf
        return out


def _minimize(objective, x0, lo, hi, maxiter, gradient):
    from scipy.optimize import minimize

    return minimize(
        objective,
        x0,
        jac=gradient == "autograd",
        method="L-BFGS-B",
        bounds=list(zip(lo, hi)),
        options={"maxiter": maxiter},
    )


def _noise_shape(kind, batch):
    return tuple(batch) + (1,) * _TARGET_AXES[kind]


def _assemble(gp, specs, vals, fixed_values, batch, backend, dtype=None, device=None):
    """A GP like ``gp`` with the kernel, noise and mean from ``vals`` and
    ``fixed_values`` (each value already in its backend's type)."""
    kparams = {}
    noise = {k: gp.noise_for(k) for k in _KINDS}
    mean = gp.mean
    entries = [(s.name, v) for s, v in zip(specs, vals)]
    entries += list(fixed_values.items())
    for name, v in entries:
        if name == "mean":
            mean = v
        elif name.startswith("noise."):
            kind = name.split(".", 1)[1]
            if batch and (B.is_tensor(v) or isinstance(v, np.ndarray)) and v.ndim:
                v = v.reshape(_noise_shape(kind, batch))
            noise[kind] = v
        else:
            kparams[name] = v
    kernel = gp.kernel.replace(**kparams) if kparams else gp.kernel
    if backend == "torch":
        import torch

        dt = torch.float64 if dtype == "float64" else gp.dtype
        dev = device if device is not None else gp.device

        def conv(v):
            return v if B.is_tensor(v) else torch.as_tensor(v, dtype=dt, device=dev)

        if gp.backend == "numpy" or dtype == "float64":
            # the objective's model: everything as float64 tensors
            noise = {
                k: (conv(v) if not isinstance(v, float) else v)
                for k, v in noise.items()
            }
            mean = mean if isinstance(mean, float) else conv(mean)
        return GP(
            kernel,
            noise=noise,
            mean=mean,
            normalize_y=gp.normalize_y,
            backend="torch",
            dtype=dt,
            device=dev,
            method=gp.method,
        )
    return GP(
        kernel,
        noise=noise,
        mean=mean,
        normalize_y=gp.normalize_y,
        backend="numpy",
        dtype=gp.dtype,
        method=gp.method,
    )


def _build_final(gp, specs, values, fixed_values, batch, noise_kinds):
    """The fitted GP in the user's backend, and every hyperparameter by name."""
    if gp.backend == "torch":
        import torch

        vals = [torch.as_tensor(v, dtype=gp.dtype, device=gp.device) for v in values]
        fixed = {
            k: v
            if isinstance(v, float) or B.is_tensor(v)
            else torch.as_tensor(np.asarray(v, float), dtype=gp.dtype, device=gp.device)
            for k, v in fixed_values.items()
        }
    else:
        vals = [float(v) if np.ndim(v) == 0 else np.asarray(v) for v in values]
        fixed = {
            k: float(v) if np.ndim(v) == 0 else np.asarray(v, float)
            for k, v in fixed_values.items()
        }
    new = _assemble(gp, specs, vals, fixed, batch, gp.backend)
    params = dict(new.kernel.parameters())
    for kind in _KINDS:
        if kind in noise_kinds:
            v = new.noise_for(kind)
            if B.is_tensor(v) or isinstance(v, np.ndarray):
                v = v.reshape(tuple(batch)) if batch else v.reshape(())
                if isinstance(v, np.ndarray):
                    v = float(v) if v.ndim == 0 else v
            params[f"noise.{kind}"] = v
    params["mean"] = new.mean
    return new, params
