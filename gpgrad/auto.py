"""Kernel choice by evidence, and Bayesian model averaging of the posterior.

:func:`fit_auto` fits a family of kernels by maximum marginal likelihood
(:func:`gpgrad.fit`), scores each by its evidence, and returns an
:class:`AveragedPosterior`: the mixture of the members' posteriors with
weights proportional to their evidence. For every query the mixture's moments
are

.. math::

    \\bar m = \\sum_k w_k m_k,\\qquad
    \\bar v = \\underbrace{\\sum_k w_k v_k}_{\\text{within}}
        + \\underbrace{\\sum_k w_k (m_k - \\bar m)^2}_{\\text{between}},

so a band is wide where the candidate kernels disagree as well as where each
is unsure.

The evidence of a member is the Laplace approximation of
``∫ p(y | θ) p(θ) dθ`` in ``log θ`` at the fitted values, with a Gaussian
prior of standard deviation :data:`EVIDENCE_PRIOR_SD` on each log
hyperparameter (that of a uniform prior over the fit's bounds where those are
narrower, e.g. a period's),

.. math::

    \\log Z_k ≈ \\log p(y \\mid \\hat θ_k, M_k)
        - \\tfrac12 \\log\\det(I + S A_k S),
    \\qquad w_k ∝ π_k Z_k,

with ``A_k`` the negative Hessian of the log likelihood in ``log θ`` (central
differences) and ``S`` the prior's standard deviations. A direction the data
pin down costs ``log(s √λ)``; one they leave loose (the redundant scale of a
cubic polynomial, the second scale of a rational quadratic near its RBF
limit) costs nothing, which BIC (``½ log N`` for every hyperparameter) does
not see: on ``x³ − x`` with 20 % noise BIC gave the true cubic 0.26–0.51 of
the weight in three draws. Entries on a bound, where the likelihood is not
locally quadratic, keep BIC's ``½ log N``; the constant mean is shared by
every member and left out. The search itself (which candidates are tried and
kept) ranks them by BIC, which needs no Hessian.

Each member is in turn averaged over its own hyperparameters
(:func:`hyperparameter_points`): the Laplace approximation of
``p(log θ | y)`` at the fitted values, integrated by a cubature rule of
``2p`` points. A plug-in fit treats the fitted lengthscales, variances and
noise as known; where the data pin them down loosely (few points, much
noise, a variance traded against a lengthscale) its bands are too narrow.
Measured on ``benchmarks/accuracy.py`` (27 cases): 95 % bands covering
95.1 % of the true derivatives instead of 93.7 % (z-scores' standard
deviation 1.01 instead of 1.11), higher coverage in 19 cases and lower in
none, the RMSE within −5 % … +1.3 %. Above
:data:`MARGINALIZE_VARIANCE_MAX` observations the points bring their means
and the mode its variance.

The search is staged so that it stays interactive: the base families are fitted
once each on at most ``search_points`` observations (an evenly spread
subset); refinements (an input warping, a second lengthscale, a linear
trend, a periodic part when the data look periodic, a rough Matérn 3/2 part)
are tried on the best bases only; members whose
evidence trails the best by more than ``prune`` nats are dropped; only the
best member gets ``restarts`` starts. Candidates whose posteriors are the
same model (a refinement whose added part fitted to nothing, and its base)
are merged into one member carrying their summed weight, so that the cap on
members (``max_members``) counts distinct models. Long series are then
conditioned on all the data at the searched hyperparameters. Each fit goes through
``GP(method=...)``: a Matérn member of a 1-D series of 1,000 rows or more is
conditioned by the linear-time state-space solver when ``method="auto"``
picks it, but the dense members (RBF, warped kernels, trends) still cost
O(N³). ``family="statespace"`` keeps to the kernels the state-space solver
takes (Matérn 3/2, 5/2, 7/2 and their two-scale sums), so that every fit,
hyperparameter point and prediction costs O(N): measured with
``benchmarks/auto_speed.py --family statespace`` on ``sin(9t) + t`` (2-core
CPU): 19.2 s for 20,000 samples, 82.0 s for 100,000, 88.6 s and 6.7 GB for
1,000,000, the derivative RMSE 0.39–0.72 of Matérn 5/2 alone's. It is what
``gpgrad estimate --kernel auto`` runs above 5,000 rows.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import backend as B
from . import kernels as K
from .exceptions import GPGradWarning, JitterWarning, NotPositiveDefiniteError
from .fit import FitResult, fit
from .functionals import gradients, hessians, values
from .gp import GP
from .kernels.base import DotProductMap, StationaryMap
from .posterior import Prediction

__all__ = [
    "fit_auto",
    "AveragedPosterior",
    "Member",
    "Candidate",
    "default_candidates",
    "statespace_candidates",
    "estimate",
    "hyperparameter_points",
    "DerivativeEstimate",
]

#: bounds of the Kumaraswamy concentrations when a warping is fitted
WARP_BOUNDS = (0.25, 4.0)
#: share of the identity in the warping: the effective lengthscale at the
#: box's ends stays within 10× of the unwarped one (see ``Warped(floor=)``)
WARP_FLOOR = 0.1
#: largest standard deviation of a log-hyperparameter in a member's Laplace
#: approximation (a factor e): a direction the likelihood leaves flat (the
#: second scale of a rational quadratic near its RBF limit) is explored that
#: far and no further
LAPLACE_MAX_SD = 1.0
#: step of the finite-difference Hessian of ``log p(y | θ)`` in ``log θ``
HESSIAN_STEP = 1e-2
#: members lighter than this are not averaged over their hyperparameters
#: (their mode alone stands for them)
MARGINALIZE_MIN_WEIGHT = 0.05
#: above this many scalar observations a hyperparameter point contributes its
#: mean only, and the member's mode its variance (the mixture's variance to
#: first order in the spread): each point's variances would cost a
#: triangular solve with every queried column, N² per column (at 1,000
#: samples with f, f' and f'' at each, ~0.3 s per point; at 5,000, ~13 s).
#: On ``benchmarks/accuracy.py`` (100 samples) means-only points moved the
#: 95 % coverage from 95.8 % to 95.4 %, no case by more than 2 points, and
#: the hyperparameters are pinned down tighter as N grows. Members on the
#: state-space solver keep their points' variances (O(N) there)
MARGINALIZE_VARIANCE_MAX = 500
#: ``fit_auto(family="statespace")`` scores its candidates on at most this
#: many observations (an evenly spread subset), unless that subset aliases
#: the series (:data:`ALIAS_NOISE_RATIO`): then on all of them
STATESPACE_SEARCH_POINTS = 20_000
#: the spread subset aliases a series when its best candidate's noise
#: variance is more than 1 / this times the one read on consecutive samples
ALIAS_NOISE_RATIO = 0.5
#: the Hessians of a state-space search on all observations are taken on a
#: window of at most this many consecutive ones (scaled by N / window)
STATESPACE_HESSIAN_WINDOW = 20_000
#: members whose mode posteriors of ``f'`` differ by less than this times
#: their standard deviation, in mean and standard deviation, are one model
#: (see ``_merge_indistinguishable``)
MERGE_TOLERANCE = 0.02
#: members are compared at most at this many of the search inputs (evenly
#: spread)
MERGE_PROBE_POINTS = 200
#: the members scored by their Laplace evidence before merging and capping:
#: at most this many times ``max_members``, within ``prune`` plus this many
#: nats of the best search score (BIC on the search subset, which ranks
#: members a few nats differently from the evidence)
POOL_FACTOR = 3
POOL_MARGIN = 10.0
#: standard deviation of each log hyperparameter's prior in the members'
#: Laplace evidence: a factor e² ≈ 7 either way within one sd (``None``
#: weighs by BIC instead). 3 gives the same benchmark figures to 1 %
EVIDENCE_PRIOR_SD = 2.0


# --------------------------------------------------------------------------
# candidates


@dataclass
class Candidate:
    """A kernel to try, with what :func:`gpgrad.fit` needs to fit it.

    Attributes
    ----------
    name : str
    kernel : Kernel
        The structure (starting values are chosen from the data by the fit).
    fixed : dict
        Hyperparameters held fixed (``{name: value}``), e.g. a linear trend's
        redundant lengthscale.
    bounds : dict
        Extra bounds for :func:`gpgrad.fit`.
    prior : float
        Prior probability weight (relative; default 1).
    start : dict or list of dict
        Starting values for :func:`gpgrad.fit` (``{name: value}``; the others
        start from the data). A list fits from each (an empty dict: the
        data-driven start) and keeps the best.
    """

    name: str
    kernel: K.Kernel
    fixed: dict = field(default_factory=dict)
    bounds: dict = field(default_factory=dict)
    prior: float = 1.0
    start: dict | list = field(default_factory=dict)


def _base_families() -> list:
    fam = [
        ("Matern32", K.Matern32),
        ("Matern52", K.Matern52),
    ]
    if hasattr(K, "Matern72"):
        fam.append(("Matern72", K.Matern72))
    fam += [("RBF", K.RBF), ("RQ", K.RationalQuadratic)]
    return fam


def default_candidates(X, *, period=None) -> list:
    """The base families: Matérn 3/2, 5/2 (7/2 when available), RBF, RQ,
    for one input column a periodic kernel over the window (period starting
    at the span, within 0.5–1.5 × span), and a cubic polynomial.

    Refinements of the best bases (warping, second scale, trend, periodic
    part) are built by :func:`refinements` once the bases are scored.

    Parameters
    ----------
    X : array (n, d)
        The inputs (unused by the base families; kept for custom families).
    period : float, optional
        Unused here; see :func:`refinements`.

    Returns
    -------
    list of Candidate
    """
    out = [Candidate(name, cls()) for name, cls in _base_families()]
    X = np.asarray(X, dtype=float)
    span = np.ptp(X, axis=0)
    if X.ndim == 2 and X.shape[1] == 1 and span[0] > 0:
        p = float(span[0])
        # a function periodic over the window (both ends continue each other)
        out.append(
            Candidate(
                "Periodic",
                K.Periodic(period=p),
                bounds={"period": (0.5 * p, 1.5 * p)},
                # the periodic lengthscale is relative to the period: one
                # start smooth within a period, one from the data (a fifth of
                # the span: many harmonics); their optima differ
                start=[{"lengthscale": 1.0}, {}],
            )
        )
    # a cubic polynomial (Bayesian cubic regression)
    out.append(Candidate("Cubic", K.Polynomial(degree=3)))
    return out


def statespace_candidates() -> list:
    """The bases of ``fit_auto(family="statespace")``: Matérn 3/2, 5/2 and
    7/2, which the state-space solver takes in linear time (1-D inputs).
    Their refinements there are the two-scale sums ``k + k`` (see
    :func:`refinements`); warping, trends and periodic parts have no
    state-space form."""
    return [
        Candidate(name, cls())
        for name, cls in _base_families()
        if name.startswith("Matern")
    ]


def _has_statespace_form(kernel) -> bool:
    from .solvers.statespace import _parts

    return not isinstance(_parts(kernel), str)


def _prefixed(d: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in d.items()}


def _as_first_part(fitted) -> dict:
    """A fit's hyperparameters as the start of a sum whose first part is
    its kernel: the kernel's names prefixed ``0.``, the noise and the mean as
    they are."""
    start = {}
    for name, v in fitted.params.items():
        own = name.startswith("noise.") or name == "mean"
        start[name if own else f"0.{name}"] = v
    return start


def _span(lo, hi) -> float:
    """The window's mean width over the input columns (at least 1e-12)."""
    return float(np.mean(np.maximum(np.asarray(hi) - np.asarray(lo), 1e-12)))


def _spacing(X) -> float | None:
    """The typical spacing of 1-D inputs: the median gap between consecutive
    distinct points (the mean spacing on an even grid; the dense stretches'
    spacing for clustered samples). None for several columns or fewer than
    two distinct points. It is the shortest lengthscale a fast part may
    take: below it, a part decorrelates neighbouring samples and the data
    cannot tell it from the noise, while its derivative at the samples is
    prior alone."""
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or X.shape[1] != 1:
        return None
    u = np.unique(X[:, 0])
    return float(np.median(np.diff(u))) if u.size > 1 else None


def _plain_stationary(kernel) -> bool:
    """A stationary radial kernel on unwarped inputs (Matérn, RBF, RQ): what
    warping, a second scale and a rough part are built beside."""
    return (
        isinstance(kernel, K.RadialKernel)
        and isinstance(kernel.input_map, StationaryMap)
        and not isinstance(kernel, K.Warped)
    )


def _fast_part_bounds(spacing, span) -> dict:
    """Bounds for the second (fast) part's lengthscale: at least the
    spacing (see :func:`_spacing`); nothing where that is unknown."""
    if spacing is None:
        return {}
    return {"1.lengthscale": (spacing, max(100.0 * span, 2.0 * spacing))}


def rough_part(
    lead: Candidate, *, fitted=None, spacing=None, span=None
) -> Candidate | None:
    """``lead+Matern32`` for a warped lead ``W(base)`` or a stationary radial
    one (Matérn, RBF, RQ); None for others (periodic, polynomial, sums).

    The lead's part starts at its fitted hyperparameters (``fitted``) and the
    Matérn 3/2 part at 1e-4 of its variance and a lengthscale of 5 % of the
    window: what a smooth kernel misses at low noise (a kink, a steep
    flank). Started at the nested model, the fit ends at least as high as
    the lead. Measured on Runge's function at 0.1 % noise (100 samples):
    log marginal likelihood +7.7 over W(RQ), derivative band coverage 82 %
    → 99 %, RMSE 0.0074 → 0.0060; on ``tanh`` its variance goes to zero.
    Beside a stationary Matérn 5/2 on ``|x − 0.45|^1.5`` (0.1 % and 2 %
    noise) it takes 0.05–0.58 of the weight, and the derivative band
    coverage rises 91 → 96 % at 2 % noise.

    Parameters
    ----------
    lead : Candidate
    fitted : FitResult, optional
        The lead's fit (its optimum is the start).
    spacing : float, optional
        The 1-D inputs' typical spacing (:func:`_spacing`): the Matérn 3/2
        lengthscale's lower bound. Under it the part absorbs the noise
        (measured on the chirp at 2 % noise: lengthscale 0.57 × the spacing,
        noise variance to its floor, derivative RMSE 0.41 → 0.79).
    span : float, optional
        The window's width for a stationary lead (a warped one knows its
        own); default 1.
    """
    kern = lead.kernel
    warped = isinstance(kern, K.Warped)
    if not (warped or _plain_stationary(kern)):
        return None
    var = 1.0
    start = {}
    if fitted is not None:
        var = float(B.to_float(fitted.params["variance"]))
        # the lead's optimum with a small rough part: the search starts at
        # the nested model and can only rise from it
        start = _as_first_part(fitted)
    if warped:
        span = _span(kern.lower, kern.upper)
        smooth = K.Warped(
            type(kern.kernel)(), lower=kern.lower, upper=kern.upper, floor=kern.floor
        )
    else:
        span = 1.0 if span is None else float(span)
        smooth = type(kern)()
    start["1.variance"] = 1e-4 * var
    start["1.lengthscale"] = max(0.05 * span, 2.0 * (spacing or 0.0))
    return Candidate(
        f"{lead.name}+Matern32",
        smooth + K.Matern32(),
        bounds={**_prefixed(lead.bounds, "0."), **_fast_part_bounds(spacing, span)},
        prior=lead.prior,
        start=start,
    )


def refinements(base: Candidate, X, *, period=None, fitted=None) -> list:
    """Local and global refinements of a base candidate.

    * ``W(base)``: the base on Kumaraswamy-warped inputs (local features),
      fitted from two starts: the identity warping at the base's optimum
      (``fitted``; the nested model, from which the fit can only rise) and
      the data-driven one;
    * ``base+base``: a second part of the same family, started at a fifth of
      the fitted lengthscale (two scales: a slow signal and a fast ripple;
      for 1-D inputs its lengthscale at least the typical spacing);
    * ``base+Linear``: a linear trend (its lengthscale fixed, the variance
      alone scales it);
    * ``base+Periodic``: a periodic part, when ``period`` is given;
    * ``base+Matern52`` for a polynomial base: a stationary residual beside
      the polynomial trend (universal kriging), started at the polynomial's
      optimum with a small residual (the nested model), its lengthscale at
      least the 1-D inputs' typical spacing. A polynomial alone is certain
      of its own shape: measured on ``cos(3x) + x²/2`` at 2 % noise (100
      samples), the cubic took 0.98 of one draw's weight and its derivative
      band covered the truth at 40 % of the points (77 % over three draws);
      with the residual beside it, 100 % (97 % over three), the RMSE +3 %.
      On an exact cubic the residual takes 0.2–0.3 of the weight at 2 %
      noise (RMSE 0.0022 → 0.0030).

    The warping and the second scale apply to stationary bases only.

    Parameters
    ----------
    base : Candidate
    X : array (n, d)
    period : float, optional
    fitted : FitResult, optional
        The base's fit (the second scale starts from its hyperparameters).
    """
    out = []
    X = np.asarray(X, dtype=float)
    lo = np.min(X, axis=0)
    hi = np.max(X, axis=0)
    kern = base.kernel
    stationary = _plain_stationary(kern)
    if stationary and np.all(hi > lo):
        warped = K.Warped(type(kern)(), lower=lo, upper=hi, floor=WARP_FLOOR)
        start = {}
        if fitted is not None:
            # the identity warping (a = b = 1) at the base's optimum, its
            # lengthscale in the rescaled box's units: the nested model, from
            # which the fit can only rise; and the data-driven start
            p = dict(fitted.params)
            ls = np.asarray(B.to_numpy(p.pop("lengthscale")), dtype=float)
            width = (1.0 - 2.0 * warped.margin) / (hi - lo)
            if ls.ndim == 0 or ls.size != width.size:
                width = float(np.exp(np.mean(np.log(width))))
            nested = {**p, "lengthscale": ls * width}
            nested["concentration1"] = 1.0
            nested["concentration0"] = 1.0
            start = [nested, {}]
        out.append(
            Candidate(
                f"W({base.name})",
                warped,
                bounds={
                    "concentration1": WARP_BOUNDS,
                    "concentration0": WARP_BOUNDS,
                },
                start=start,
            )
        )
    if stationary and fitted is not None:
        p = fitted.params
        ls = np.asarray(B.to_numpy(p["lengthscale"]), dtype=float)
        var = float(B.to_float(p["variance"]))
        spacing = _spacing(X)
        start = {
            "0.lengthscale": ls,
            "1.lengthscale": np.maximum(ls / 5.0, spacing or 0.0),
            "0.variance": var,
            "1.variance": var / 25.0,
        }
        out.append(
            Candidate(
                f"{base.name}+{base.name}",
                type(kern)() + type(kern)(),
                bounds=_fast_part_bounds(spacing, _span(lo, hi)),
                start=start,
            )
        )
    if not isinstance(kern.input_map, DotProductMap):
        out.append(
            Candidate(
                f"{base.name}+Linear",
                kern + K.Linear(),
                fixed={"1.lengthscale": _span(lo, hi)},
                bounds=_prefixed(base.bounds, "0."),
                start=(
                    [_prefixed(st, "0.") for st in base.start]
                    if isinstance(base.start, list)
                    else _prefixed(base.start, "0.")
                ),
            )
        )
    if isinstance(kern, K.Polynomial):
        spacing = _spacing(X)
        span = _span(lo, hi)
        start = {}
        if fitted is not None:
            # the polynomial's optimum with a small residual: the fit starts
            # at the nested model and can only rise from it
            start = _as_first_part(fitted)
            noise = fitted.params.get("noise.value")
            start["1.variance"] = 1e-2 * (
                B.to_float(noise) if noise is not None else 1e-4
            )
            start["1.lengthscale"] = max(0.2 * span, 2.0 * (spacing or 0.0))
        out.append(
            Candidate(
                f"{base.name}+Matern52",
                K.Polynomial(degree=kern.degree) + K.Matern52(),
                bounds={
                    **_prefixed(base.bounds, "0."),
                    **_fast_part_bounds(spacing, span),
                },
                start=[start, {}] if start else {},
            )
        )
    if period is not None and stationary:
        out.append(
            Candidate(
                f"{base.name}+Periodic",
                type(kern)() + K.Periodic(period=period),
                bounds={"1.period": (0.8 * period, 1.25 * period)},
            )
        )
    for c in out:  # a variant of the base keeps its prior weight
        c.prior = base.prior
    return out


def detect_period(x, y, *, min_cycles: float = 3.0, min_share: float = 0.5):
    """A dominant period of 1-D data, or None.

    Fits a linear trend, then a sinusoid at each frequency of a grid from
    ``min_cycles`` cycles over the span to a quarter of the mean sampling
    rate (Lomb–Scargle); the best frequency counts when its sinusoid explains
    at least ``min_share`` of the detrended variance.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n = x.size
    span = float(np.ptp(x))
    if n < 16 or span <= 0:
        return None
    r = y - np.polyval(np.polyfit(x, y, 1), x)
    var = float(np.mean(r * r))
    if var <= 0:
        return None
    f_lo = min_cycles / span
    f_hi = 0.25 * (n - 1) / span
    if f_hi <= f_lo:
        return None
    freqs = np.linspace(f_lo, f_hi, 400)
    power = _lombscargle(x, r - r.mean(), 2 * np.pi * freqs)
    best = int(np.argmax(power))
    # power of the unnormalized periodogram: amplitude² N / 4 for a sinusoid
    share = 2.0 * power[best] / (n * var)
    return 1.0 / freqs[best] if share >= min_share else None


def _lombscargle(x, y, omega, block: int = 1 << 22):
    """The classical (unnormalized) Lomb–Scargle periodogram of ``y`` at the
    angular frequencies ``omega``: ``½ [(Σ y c)² / Σ c² + (Σ y s)² / Σ s²]``
    with ``c = cos ω(x − τ)``, ``s = sin ω(x − τ)`` and ``tan 2ωτ = Σ sin 2ωx /
    Σ cos 2ωx``; ``scipy.signal.lombscargle``'s value, without the second
    of import time that scipy.signal costs each command-line run. Memory:
    ``block`` entries of ``len(x) × len(omega)`` at a time."""
    out = np.empty(omega.shape)
    step = max(1, block // max(x.size, 1))
    for lo in range(0, omega.size, step):
        w = omega[lo : lo + step]
        wx = np.multiply.outer(w, x)  # (k, n)
        tau = 0.5 * np.arctan2(np.sin(2 * wx).sum(1), np.cos(2 * wx).sum(1))
        arg = wx - tau[:, None]
        c, s = np.cos(arg), np.sin(arg)
        yc, ys = c @ y, s @ y
        out[lo : lo + step] = 0.5 * (yc**2 / (c * c).sum(1) + ys**2 / (s * s).sum(1))
    return out


# --------------------------------------------------------------------------
# the averaged posterior


@dataclass
class Member:
    """One fitted candidate of a model average.

    Attributes
    ----------
    name : str
    fit : FitResult
        The fit (hyperparameters, log marginal likelihood on the data it saw).
    posterior : Posterior
        The member conditioned on all observations.
    log_marginal_likelihood : float
        ``log p(y | θ̂)`` on all observations.
    n_params : int
        Fitted hyperparameters (entries).
    log_evidence : float
        ``log p(y | θ̂)`` plus the Laplace Occam factor (module docstring)
        and the log prior weight.
    weight : float
        Posterior model probability.
    points : list of Posterior
        The member conditioned at the cubature points of its hyperparameters'
        Laplace approximation (:func:`hyperparameter_points`); its queries
        average over them. ``[posterior]`` when not marginalized.
    point_weights : ndarray
        The points' weights (sum to 1).
    log_sd : dict
        ``name -> standard deviation of log θ`` in the Laplace approximation
        (the marginalized hyperparameters; empty when not marginalized).
    hessian : ndarray or None
        ``∇² log p(y | θ)`` in the member's log coordinates at the fitted
        values (``None`` when weighed by BIC).
    point_variances : bool
        Whether each point contributes its own variance (True), or its mean
        with the mode's variance (above :data:`MARGINALIZE_VARIANCE_MAX`
        observations).
    merged : list of str
        Candidates whose posteriors were indistinguishable from this one's
        (a trend or second part fitted to nothing): their weight is part of
        ``weight``.
    """

    name: str
    fit: FitResult
    posterior: object
    log_marginal_likelihood: float
    n_params: int
    log_evidence: float
    weight: float = 0.0
    points: list = field(default_factory=list)
    point_weights: np.ndarray = field(default_factory=lambda: np.ones(1))
    log_sd: dict = field(default_factory=dict)
    point_variances: bool = True
    hessian: np.ndarray | None = field(default=None, repr=False)
    merged: list = field(default_factory=list)

    def __post_init__(self):
        if not self.points:
            self.points = [self.posterior]
            self.point_weights = np.ones(1)

    @property
    def kernel(self):
        return self.posterior.kernel


class AveragedPosterior:
    """A mixture of GP posteriors weighted by their evidence.

    Queries mirror :class:`gpgrad.Posterior`: each returns a
    :class:`gpgrad.Prediction` whose ``mean`` and ``var`` are the mixture's
    (within-member plus between-member variance). A query of derivatives of
    order p averages over the members that are p times mean-square
    differentiable (Matérn 3/2 has no second derivative), with their weights
    renormalized.

    Attributes
    ----------
    members : list of Member
        Sorted by weight, largest first.
    weights : ndarray (K,)
        The members' weights (sum to 1).
    log_evidence : float
        ``log Σ_k π_k Z_k`` (priors normalized): the averaged model's evidence.
    searched : list of (str, float)
        Every candidate tried, with its search-stage log evidence (``-inf``
        where the fit failed), in the order tried.
    seconds : float
        Wall time of :func:`fit_auto`.
    """

    def __init__(self, members, searched, log_evidence, seconds=float("nan")):
        self.members = list(members)
        self.searched = list(searched)
        self.log_evidence = float(log_evidence)
        self.seconds = seconds

    @property
    def weights(self) -> np.ndarray:
        return np.array([m.weight for m in self.members])

    @property
    def best(self) -> Member:
        """The member with the largest weight."""
        return self.members[0]

    def _usable(self, order):
        ms = [m for m in self.members if m.posterior.kernel.order >= order]
        if not ms:
            raise ValueError(
                f"no member of the average is {order} times mean-square "
                "differentiable; add a smoother candidate (Matern52, RBF)"
            )
        w = np.array([m.weight for m in ms])
        return ms, w / w.sum()

    def _mix(self, order, query, full_cov):
        """The mixture over the usable members and, within each, over its
        hyperparameter points; ``query(posterior)`` is one prediction."""
        ms, w = self._usable(order)
        preds, weights = [], []
        for m, wm in zip(ms, w):
            mode = None
            if not m.point_variances and len(m.points) > 1:
                mode = query(m.posterior)
            for post, wp in zip(m.points, m.point_weights):
                if mode is not None and post is m.posterior:
                    pred = mode  # the mode closing the points: queried above
                elif mode is not None:
                    pred = Prediction(source=_ModeSpread(query(post), mode))
                else:
                    pred = query(post)
                preds.append(pred)
                weights.append(wm * wp)
        return mixture(preds, np.asarray(weights), full_cov=full_cov)

    def value(self, X, full_cov=False) -> Prediction:
        """Mixture posterior of ``f`` at ``X``: mean and var (..., m)."""
        return self._mix(0, lambda p: p.value(X, full_cov), full_cov)

    def gradient(self, X, full_cov=False) -> Prediction:
        """Mixture posterior of ``∇f`` at ``X``: mean and var (..., m, d)."""
        return self._mix(1, lambda p: p.gradient(X, full_cov), full_cov)

    def hessian(self, X, full_cov=False) -> Prediction:
        """Mixture posterior of the Hessian at ``X``: (..., m, d, d)."""
        return self._mix(2, lambda p: p.hessian(X, full_cov), full_cov)

    def directional(self, X, U, full_cov=False) -> Prediction:
        """Mixture posterior of ``u·∇f`` at ``X``: (..., m)."""
        return self._mix(1, lambda p: p.directional(X, U, full_cov), full_cov)

    def predict(self, *queries, full_cov=False) -> Prediction:
        """Mixture posterior of a joint query set (see ``Posterior.predict``)."""
        order = max(q.order for q in queries) if queries else 0
        return self._mix(
            order, lambda p: p.predict(*queries, full_cov=full_cov), full_cov
        )

    def summary(self) -> str:
        """The members, their evidence and weights, one line each."""
        lines = [
            f"model average of {len(self.members)} "
            f"kernel{'s' if len(self.members) != 1 else ''} "
            f"(log evidence {self.log_evidence:.6g}; {len(self.searched)} tried "
            f"in {self.seconds:.2f} s)"
        ]
        for m in self.members:
            spread = ""
            if len(m.points) > 1:
                spread = f", averaged over {len(m.points)} hyperparameter points"
            if m.merged:
                spread += f"; the same posterior as {', '.join(m.merged)}"
            lines.append(
                f"  {m.weight:7.3f}  {m.name:<18} log ML "
                f"{m.log_marginal_likelihood:.6g}, {m.n_params} parameters, "
                f"log evidence {m.log_evidence:.6g}{spread}"
            )
        return "\n".join(lines)

    def __repr__(self):
        return self.summary()


def mixture(preds, weights, *, full_cov=False) -> Prediction:
    """Moments of a mixture of Gaussian predictions.

    Parameters
    ----------
    preds : list of Prediction
        Member predictions of one query (same shapes).
    weights : array (K,)
        Non-negative, summing to 1.
    full_cov : bool
        Also mix the joint covariances (``mean.shape + mean.shape``).

    Returns
    -------
    Prediction
        ``mean = Σ w_k m_k``, ``var = Σ w_k v_k + Σ w_k (m_k − mean)²`` and,
        with ``full_cov``, ``cov = Σ w_k [C_k + (m_k − mean)(m_k − mean)ᵀ]``.
    """
    return Prediction(source=_MixtureSource(preds, weights, full_cov))


class _ModeSpread:
    """A hyperparameter point's mean with the mode's variance and covariance
    (the point's own are not computed)."""

    def __init__(self, point, mode):
        self.point, self.mode = point, mode

    def mean(self):
        return self.point.mean

    def moments(self):
        return self.point.mean, self.mode.var, self.mode.cov


class _MixtureSource:
    """Lazy moments of a mixture: reading ``mean`` reads only the members'
    means (no member pays for its variances)."""

    def __init__(self, preds, weights, full_cov):
        self.preds = preds
        self.w = [float(v) for v in weights]
        self.full_cov = full_cov

    def mean(self):
        return sum(wk * p.mean for wk, p in zip(self.w, self.preds))

    def moments(self):
        preds, w = self.preds, self.w
        # each prediction's variance first: it fills its mean on the way (one
        # cross-covariance per point, not one for the mean and one again)
        variances = [p.var for p in preds]
        xp = B.namespace(preds[0].mean)
        mean = self.mean()
        var = sum(
            wk * (v + (p.mean - mean) ** 2) for wk, v, p in zip(w, variances, preds)
        )
        cov = None
        if self.full_cov:
            shape = tuple(mean.shape)
            size = int(np.prod(shape)) if shape else 1
            cov = 0.0
            for wk, p in zip(w, preds):
                dm = xp.reshape(p.mean - mean, (size,))
                outer = xp.reshape(dm[:, None] * dm[None, :], shape + shape)
                cov = cov + wk * (p.cov + outer)
        return mean, var, cov


# --------------------------------------------------------------------------
# the search


def _n_params(res: FitResult, exclude_mean: bool = False) -> int:
    total = 0
    for name in res.fitted:
        if exclude_mean and name == "mean":
            continue
        v = res.params[name]
        total += int(np.size(B.to_numpy(v)))
    return total


def _subsample(obs, max_points, seed):
    """An evenly spread subset of value/gradient observations, or ``obs``."""
    n = sum(f.n for f in obs)
    if n <= max_points:
        return obs, False
    if any(f.kind not in ("value", "gradient") or f.X.ndim != 2 for f in obs):
        return obs, False
    out = []
    for f in obs:
        m = max(2, int(round(max_points * f.n / n)))
        X = B.to_numpy(f.X)
        if X.shape[1] == 1:
            order = np.argsort(X[:, 0], kind="stable")
            idx = order[np.unique(np.linspace(0, f.n - 1, m).round().astype(int))]
        else:
            idx = np.sort(np.random.default_rng(seed).choice(f.n, m, replace=False))
        out.append(_take(f, idx))
    return out, True


def _take(f, idx):
    """The value or gradient observations ``f`` at rows ``idx``."""
    noise = f.noise
    if noise is not None and np.ndim(noise) > 0:
        noise = np.asarray(noise)[idx]
    ctor = values if f.kind == "value" else gradients
    return ctor(B.to_numpy(f.X)[idx], B.to_numpy(f.y)[idx], noise=noise)


def _window(obs, max_points):
    """The observations of 1-D inputs inside the middle window of
    ``max_points`` consecutive inputs, or ``obs`` (a long series keeps its
    resolution, unlike an evenly spread subset)."""
    n = sum(f.n for f in obs)
    if n <= max_points:
        return obs
    if any(f.kind not in ("value", "gradient") or f.X.ndim != 2 for f in obs):
        return obs
    xs = np.sort(np.concatenate([B.to_numpy(f.X)[:, 0] for f in obs]))
    start = (n - max_points) // 2
    lo, hi = xs[start], xs[start + max_points - 1]
    out = []
    for f in obs:
        x = B.to_numpy(f.X)[:, 0]
        idx = np.flatnonzero((x >= lo) & (x <= hi))
        if idx.size:
            out.append(_take(f, idx))
    return out


def _aliased(tried, obs, search, kw) -> bool:
    """Whether an evenly spread subset (``search``) of a long 1-D series
    aliases it: its best candidate's lengthscale is under twice the subset's
    spacing (it interpolates what the subset cannot resolve), or its noise
    variance is more than 1 / :data:`ALIAS_NOISE_RATIO` times the one read
    on :data:`gpgrad.fit.WINDOW` consecutive samples (it took a fast
    oscillation for noise)."""
    from .fit import WINDOW

    fitted = [(c, r, sc) for c, r, sc in tried.values() if r is not None]
    if not fitted:
        return False
    c, res, _ = max(fitted, key=lambda v: v[2])
    xs = np.concatenate([B.to_numpy(f.X)[:, 0] for f in search])
    spacing = np.ptp(xs) / max(1, np.unique(xs).size - 1)
    ls = [
        float(np.min(B.to_numpy(v)))
        for name, v in res.params.items()
        if name.split(".")[-1] == "lengthscale" and name in res.fitted
    ]
    if ls and min(ls) < 2.0 * spacing:
        return True
    if "noise.value" not in res.fitted:
        return False
    try:
        res_w = _fit_one(c, _window(obs, WINDOW), restarts=1, **kw)
    except (NotPositiveDefiniteError, ValueError):
        return False
    spread = float(B.to_float(res.params["noise.value"]))
    local = float(B.to_float(res_w.params["noise.value"]))
    return local < ALIAS_NOISE_RATIO * spread


def _fit_one(cand, obs, *, backend, method, restarts, seed, ard, maxiter):
    """Fit a candidate; a list of starts fits from each, the best one wins."""
    gp = GP(cand.kernel, backend=backend, method=method)
    starts = cand.start if isinstance(cand.start, list) else [cand.start]
    best = None
    with warnings.catch_warnings():
        # a hyperparameter on a bound is part of what the evidence weighs
        warnings.simplefilter("ignore", GPGradWarning)
        for start in starts:
            res = fit(
                gp,
                *obs,
                fixed=cand.fixed or None,
                start=start or None,
                bounds=cand.bounds or None,
                ard=ard,
                restarts=restarts,
                seed=seed,
                maxiter=maxiter,
            )
            if (
                best is None
                or res.log_marginal_likelihood > best.log_marginal_likelihood
            ):
                best = res
    return best


# --------------------------------------------------------------------------
# hyperparameter uncertainty


def _log_coordinates(res: FitResult):
    """The fitted hyperparameters a Laplace approximation covers: positive,
    not on a bound (there the likelihood is not locally quadratic), not the
    constant mean. Returns ``(names, shapes, log θ̂ flattened)``."""
    names, shapes, flat = [], [], []
    for name in res.fitted:
        if name == "mean" or name in res.on_bound:
            continue
        v = res.params[name]
        v = np.asarray(B.to_numpy(v), dtype=float)
        if np.any(v <= 0):
            continue
        names.append(name)
        shapes.append(v.shape)
        flat.append(np.log(v).ravel())
    theta = np.concatenate(flat) if flat else np.zeros(0)
    return names, shapes, theta


def _unflatten(flat, names, shapes) -> dict:
    """``name -> entries of flat`` in :func:`_log_coordinates`'s layout
    (floats for scalar hyperparameters)."""
    out, i = {}, 0
    for name, shape in zip(names, shapes):
        size = int(np.prod(shape)) if shape else 1
        v = flat[i : i + size].reshape(shape)
        out[name] = float(v) if not shape else v
        i += size
    return out


def _log_bounds(res: FitResult, names, shapes):
    """``(lower, upper)`` of ``log θ`` in :func:`_log_coordinates`'s layout."""
    lo, hi = [], []
    for name, shape in zip(names, shapes):
        a, b = (np.broadcast_to(np.asarray(v, float), shape) for v in res.bounds[name])
        lo.append(np.log(a).ravel())
        hi.append(np.log(b).ravel())
    return np.concatenate(lo), np.concatenate(hi)


def _model_at(res: FitResult, names, shapes, theta) -> GP:
    """``res.gp`` with the hyperparameters ``names`` at ``exp(θ)``."""
    from .fit import _assemble

    entries = _unflatten(np.exp(theta), names, shapes)
    return _assemble(res.gp, entries, (), {}, res.gp.backend)


def _lml_hessian(res, names, shapes, theta, obs, step):
    """Central-difference Hessian of ``log p(y | θ)`` in ``log θ``.

    Each coordinate's step starts at ``step`` and shrinks to a fifth of the
    standard deviation its own curvature implies when that is smaller (a
    period pinned down to 0.3 % by many cycles): a step wider than the peak
    would read a curvature far too small."""

    def lml(t):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", JitterWarning)
                gp = _model_at(res, names, shapes, t)
                return B.to_float(gp.log_marginal_likelihood(*obs))
        except NotPositiveDefiniteError:
            return -math.inf

    p = theta.size
    f0 = lml(theta)
    h = np.full(p, float(step))
    diag = np.empty(p)
    for i in range(p):
        for _ in range(6):
            e = np.zeros(p)
            e[i] = h[i]
            diag[i] = (lml(theta + e) - 2.0 * f0 + lml(theta - e)) / h[i] ** 2
            if not (
                math.isfinite(diag[i])
                and diag[i] < 0
                and 1.0 / math.sqrt(-diag[i]) < 5.0 * h[i]
            ):
                break  # wide enough, not concave, or a side failed to factor
            h[i] = 0.2 / math.sqrt(-diag[i])
    H = np.diag(diag)
    for i in range(p):
        for j in range(i + 1, p):
            ei = np.zeros(p)
            ej = np.zeros(p)
            ei[i], ej[j] = h[i], h[j]
            H[i, j] = H[j, i] = (
                lml(theta + ei + ej)
                - lml(theta + ei - ej)
                - lml(theta - ei + ej)
                + lml(theta - ei - ej)
            ) / (4.0 * h[i] * h[j])
    return H


def _member_hessian(res, observations, scale):
    """``scale ×`` the Hessian of ``log p(y | θ)`` in the member's Laplace
    coordinates (:func:`_log_coordinates`), on ``observations``."""
    names, shapes, theta = _log_coordinates(res)
    if theta.size == 0:
        return np.zeros((0, 0))
    return scale * _lml_hessian(res, names, shapes, theta, observations, HESSIAN_STEP)


def _prior_sd(res, sd):
    """Each Laplace coordinate's prior sd: ``sd``, or that of a uniform
    prior over the coordinate's bounds (in log) when those are narrower."""
    names, shapes, _ = _log_coordinates(res)
    if not names:
        return np.zeros(0)
    lo, hi = _log_bounds(res, names, shapes)
    return np.minimum(sd, (hi - lo) / math.sqrt(2 * math.pi))


def _log_occam(hessian, prior_sd):
    """``log`` of the Laplace Occam factor ``det(I + S A S)^{-1/2}`` with
    ``A = −hessian`` and ``S = diag(prior_sd)`` (negative eigenvalues of
    ``S A S`` count as flat)."""
    H = np.asarray(hessian, dtype=float)
    if H.size == 0:
        return 0.0
    if not np.all(np.isfinite(H)):
        return -math.inf
    S = np.asarray(prior_sd, dtype=float)
    A = -0.5 * (H + H.T) * S[:, None] * S[None, :]
    lam = np.linalg.eigvalsh(A)
    return float(-0.5 * np.sum(np.log1p(np.maximum(lam, 0.0))))


def _probe(member, X):
    """A member's mode posterior where members are compared: ``f'`` (``f``
    for a kernel with no mean-square derivative), its mean and standard
    deviation as flat float arrays."""
    post = member.posterior
    pred = post.gradient(X) if post.kernel.order >= 1 else post.value(X)
    std = B.to_numpy(pred.std)  # before the mean: it fills the mean on the way
    mean = B.to_numpy(pred.mean)
    return np.ravel(np.asarray(mean, float)), np.ravel(np.asarray(std, float))


def _merge_indistinguishable(members, search, max_members):
    """Merge members whose posteriors are the same model, and keep the
    ``max_members`` heaviest distinct ones.

    A refinement whose added part fitted to nothing (a linear trend or a
    second scale of variance ~0, a warping at the identity, a rational
    quadratic at its RBF limit) predicts what its base predicts. Two such
    members are one model counted twice: their mixture is either of them with
    the summed weight, so merging them changes no prediction (beyond the
    tolerance below), while a cap on the members counted them separately and
    crowded the distinct kernels out. Measured on the held-out
    ``|x − 0.6|^2.5`` of ``benchmarks/accuracy.py`` (2 % noise): RBF, RQ,
    RBF+Linear and RBF+RBF had the same evidence to 0.1 nats and would fill
    four places, while Matérn 7/2 (0.15 nats behind) and RBF+Matern32, whose
    bands covered the true derivative where RBF's covered 45 % of it, were
    left out.

    Members are compared by their mode posterior of ``f'`` (``f`` without a
    derivative) at the search inputs (at most :data:`MERGE_PROBE_POINTS`,
    evenly spread): the same to within :data:`MERGE_TOLERANCE` of the heavier
    one's typical standard deviation, in mean and standard deviation alike.
    ``members`` is sorted by weight, heaviest first; the merged member keeps
    the heavier one's fit and lists the others in ``merged``.
    """
    # the value observations' inputs (else the first kind's)
    X = next((f.X for f in search if f.kind == "value"), search[0].X)
    X = B.to_numpy(X)
    if X.shape[0] > MERGE_PROBE_POINTS:  # an evenly spread subset
        X = X[np.linspace(0, X.shape[0] - 1, MERGE_PROBE_POINTS).astype(int)]
    kept, probes = [], []
    for m in members:
        try:
            mean, std = _probe(m, X)
        except NotPositiveDefiniteError:  # pragma: no cover - conditioned above
            continue
        for k, (mk, sk) in zip(kept, probes):
            scale = MERGE_TOLERANCE * float(np.sqrt(np.mean(sk**2)))
            if np.max(np.abs(mean - mk)) <= scale and np.max(np.abs(std - sk)) <= scale:
                k.weight += m.weight
                k.merged.append(m.name)
                break
        else:
            if len(kept) < max_members:
                kept.append(m)
                probes.append((mean, std))
    return kept


def hyperparameter_points(
    res: FitResult,
    observations,
    *,
    posterior=None,
    hessian_observations=None,
    scale: float = 1.0,
    hessian=None,
):
    """A member's posterior averaged over its hyperparameters' uncertainty.

    The Laplace approximation of ``p(log θ | y)`` (flat prior in ``log θ``)
    is the Gaussian at the fitted ``log θ̂`` with precision ``−∇² log p(y|θ)``
    (central differences, :data:`HESSIAN_STEP`); each eigen-direction's
    standard deviation is capped at :data:`LAPLACE_MAX_SD`. The third-degree
    spherical-radial cubature rule (``2p`` points ``log θ̂ ± √p σ_i v_i``,
    equal weights; Arasaratnam & Haykin 2009) integrates the member's
    prediction over it: exact for the moments of predictions quadratic in
    ``log θ``. A point whose log likelihood falls ``g`` below the Gaussian's
    prediction there keeps ``e^{−g}`` of its weight, and the mode (then the
    last point) takes the rest: mass the Gaussian puts where the likelihood
    is not. A plug-in fit ignores this spread and gives bands that are too
    narrow where the data pin the hyperparameters down loosely.

    Hyperparameters on a bound, the constant mean and fixed values stay at
    their fitted values.

    Parameters
    ----------
    res : FitResult
    observations : list of Functional
        What the points are conditioned on.
    posterior : Posterior, optional
        The fitted model conditioned on ``observations`` (default
        ``res.posterior``): it stands in for a point whose system cannot be
        factored.
    hessian_observations : list of Functional, optional
        Where the Hessian is taken (default ``observations``; a subset is
        cheaper, with ``scale`` the ratio of sizes: information grows with N).
    scale : float
        Multiplies the Hessian.
    hessian : ndarray (p, p), optional
        The Hessian of ``log p(y | θ)`` in the member's log coordinates,
        already scaled (``Member.hessian``, which the weights used); taken
        by central differences when not given.

    Returns
    -------
    points : list of Posterior
        The ``2p`` cubature points (fewer where a system could not be
        factored even halfway back), then the mode if it keeps weight; the
        mode alone when nothing is marginalized or the Hessian failed.
    weights : ndarray
        Summing to 1.
    log_sd : dict
        ``name -> marginal standard deviation of log θ`` (one float per
        entry of a vector hyperparameter).
    """
    mode = res.posterior if posterior is None else posterior
    names, shapes, theta = _log_coordinates(res)
    p = theta.size
    if p == 0:
        return [mode], np.ones(1), {}
    if hessian is None:
        obs_h = observations if hessian_observations is None else hessian_observations
        hessian = scale * _lml_hessian(res, names, shapes, theta, obs_h, HESSIAN_STEP)
    H = np.asarray(hessian, dtype=float)
    if H.shape != (p, p) or not np.all(np.isfinite(H)):
        return [mode], np.ones(1), {}
    lam, V = np.linalg.eigh(-0.5 * (H + H.T))
    lam = np.maximum(lam, 1.0 / LAPLACE_MAX_SD**2)
    cov = (V / lam) @ V.T
    sd = np.sqrt(np.diag(cov))
    log_sd = _unflatten(sd, names, shapes)
    lo, hi = _log_bounds(res, names, shapes)
    radius = math.sqrt(p)
    precision = (V * lam) @ V.T
    lml_mode = B.to_float(mode.log_marginal_likelihood())
    points, weights = [], []
    for k in range(p):
        for sign in (1.0, -1.0):
            step = sign * radius * V[:, k] / math.sqrt(lam[k])
            # a point whose system does not factor moves halfway back
            for _ in range(4):
                t = np.clip(theta + step, lo, hi)
                try:
                    with warnings.catch_warnings():
                        # a point's jitter (≤ 1e-6 of the diagonal) is part
                        # of the approximation, not the user's model
                        warnings.simplefilter("ignore", JitterWarning)
                        post = _model_at(res, names, shapes, t).condition(*observations)
                        lml = B.to_float(post.log_marginal_likelihood())
                    break
                except NotPositiveDefiniteError:
                    step = 0.5 * step
            else:
                continue
            # the likelihood where the Gaussian puts this point, against what
            # the Gaussian predicts there: mass it puts where the likelihood
            # is not stays at the mode
            d = t - theta
            gap = lml - (lml_mode - 0.5 * d @ precision @ d)
            points.append(post)
            weights.append(math.exp(min(0.0, gap)) / (2 * p))
    rest = 1.0 - sum(weights)
    if rest > 1e-12:
        points.append(mode)
        weights.append(rest)
    return points, np.asarray(weights), log_sd


def _check_candidates(candidates):
    if candidates is None:
        return None
    if isinstance(candidates, (K.Kernel, Candidate)):
        candidates = [candidates]
    try:
        items = list(candidates.items()) if isinstance(candidates, dict) else None
    except AttributeError:  # pragma: no cover
        items = None
    out = []
    if items is not None:
        for name, k in items:
            if not isinstance(k, K.Kernel):
                raise TypeError(
                    f"candidates[{name!r}] must be a gpgrad kernel, got "
                    f"{type(k).__name__}"
                )
            out.append(Candidate(str(name), k))
    else:
        for c in candidates:
            if isinstance(c, Candidate):
                out.append(c)
            elif isinstance(c, K.Kernel):
                out.append(Candidate(repr(c), c))
            else:
                raise TypeError(
                    "candidates must be gpgrad kernels or gpgrad.auto.Candidate, "
                    f"got {type(c).__name__}"
                )
    if not out:
        raise ValueError("candidates is empty: give at least one kernel")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    return out


def fit_auto(
    *observations,
    candidates=None,
    backend: str = "numpy",
    method="auto",
    restarts: int = 2,
    seed: int = 0,
    ard: bool | None = None,
    refine: bool = True,
    periodic: bool | float | None = None,
    prune: float = 7.0,
    max_members: int = 5,
    search_points: int | None = None,
    maxiter: int = 200,
    marginalize: bool = True,
    family: str = "default",
    progress: bool = False,
) -> AveragedPosterior:
    """Fit a family of kernels and average their posteriors by evidence.

    Parameters
    ----------
    *observations : Functional or (X, y)
        As for :meth:`gpgrad.GP.condition` (values, gradients, ...); no batch
        axes.
    candidates : list of Kernel or Candidate, or dict name -> Kernel, optional
        The kernels to try. Default: Matérn 3/2, 5/2 (7/2 when the package has
        it), RBF, rational quadratic, a periodic kernel over the window (1-D)
        and a cubic polynomial (:func:`default_candidates`), then for the best
        of them a Kumaraswamy input warping (floor ``WARP_FLOOR``), a second
        lengthscale, a linear trend and, for periodic 1-D data, a periodic
        part (for a polynomial: a Matérn 5/2 residual beside it), the
        warping of the runner-up, and a rough Matérn 3/2 part beside the
        best kernel so far (:func:`rough_part`; ``refine``).
    backend : {"numpy", "torch"}
        The members' backend (results are tensors with ``"torch"``).
    method : str
        The solver, as ``GP(method=...)``.
    restarts : int, default 2
        Starts for the best member (refitted on all data); the others keep
        their single search start.
    seed : int
    ard : bool, optional
        Per-dimension lengthscales (default: when the inputs have more than one
        column).
    refine : bool, default True
        Try the refinements of the best base family, the warping of the
        runner-up and the rough part (default candidates only).
    periodic : bool or float, optional
        ``None`` detects a dominant period in 1-D value data
        (:func:`detect_period`); ``False`` never adds a periodic part; a
        number is the starting period.
    prune : float, default 7
        Drop members whose log evidence trails the best by more than this
        (their weight would be below ``e^-prune`` ≈ 0.001 of the best's: no
        query moves by more than that share of the members' differences,
        while each member costs its predictions).
    max_members : int, default 5
        Keep at most this many distinct members: candidates whose posteriors
        of ``f'`` are the same (a refinement whose added part fitted to
        nothing, and its base) are merged into one member carrying their
        summed weight. The evidence is scored for up to ``3 * max_members``
        candidates within ``prune + 10`` nats of the best search score.
    search_points : int, optional
        Candidates are scored on at most this many points (an evenly spread
        subset of value and gradient observations); the members are then
        conditioned on all of them. Default 120, and
        :data:`STATESPACE_SEARCH_POINTS` for ``family="statespace"`` (each
        likelihood costs O(N) there). Where the best base reads a noise
        variance on that subset more than twice the one on consecutive
        samples, the subset aliases a fast oscillation, and the state-space
        family searches on all observations instead (Hessians on
        :data:`STATESPACE_HESSIAN_WINDOW` consecutive ones).
    maxiter : int, default 200
        L-BFGS-B iterations per start.
    marginalize : bool, default True
        Average each member (of weight at least
        :data:`MARGINALIZE_MIN_WEIGHT`) over its hyperparameters' Laplace
        approximation (:func:`hyperparameter_points`), so that the bands
        include how loosely the data determine the lengthscales, variances
        and noise. ``False`` plugs in the fitted values.
    family : {"default", "statespace"}
        ``"statespace"``: linear time in the number of observations, for long
        1-D series. The bases are Matérn 3/2, 5/2 and 7/2
        (:func:`statespace_candidates`), the refinement of the best is its
        two-scale sum, and every fit, Hessian, hyperparameter point and
        prediction runs on the state-space solver (``method="statespace"``).
    progress : bool
        Print a line per candidate to stderr.

    Returns
    -------
    AveragedPosterior

    Raises
    ------
    ValueError, TypeError
        Bad arguments (the message says what was expected).
    NotPositiveDefiniteError
        When no candidate could be fitted.

    Examples
    --------
    >>> import numpy as np, gpgrad
    >>> x = np.linspace(0, 1, 30)
    >>> y = np.sin(6 * x) + 0.01 * np.random.default_rng(0).normal(size=30)
    >>> avg = gpgrad.fit_auto(x[:, None], y, refine=False)
    >>> round(float(avg.weights.sum()), 12)
    1.0
    >>> avg.gradient(x[:3, None]).mean.shape
    (3, 1)
    """
    t_start = time.perf_counter()
    if backend not in ("numpy", "torch"):
        raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
    if family not in ("default", "statespace"):
        raise ValueError(f"family must be 'default' or 'statespace', got {family!r}")
    if search_points is None:
        search_points = STATESPACE_SEARCH_POINTS if family == "statespace" else 120
    for name, v in (
        ("restarts", restarts),
        ("max_members", max_members),
        ("search_points", search_points),
        ("maxiter", maxiter),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(marginalize, (bool, np.bool_)):
        raise TypeError(f"marginalize must be True or False, got {marginalize!r}")
    if not (isinstance(prune, (int, float)) and prune > 0 and math.isfinite(prune)):
        raise ValueError(f"prune must be a positive number of nats, got {prune!r}")
    if periodic is not None and not isinstance(periodic, (bool, int, float)):
        raise TypeError(
            f"periodic must be None, a bool or a period, got {type(periodic).__name__}"
        )
    if (
        periodic is not None
        and not isinstance(periodic, bool)
        and not (periodic > 0 and math.isfinite(periodic))
    ):
        raise ValueError(f"periodic must be a positive period, got {periodic!r}")
    custom = _check_candidates(candidates)
    obs = GP(K.RBF(), backend=backend)._parse(observations)
    if any(len(f.X.shape) != 2 for f in obs):
        raise ValueError(
            "fit_auto fits one problem at a time: inputs must be (n, d), got "
            f"shapes {[tuple(f.X.shape) for f in obs]}"
        )
    Xall = np.concatenate([B.to_numpy(f.X) for f in obs])
    d = Xall.shape[1]
    if family == "statespace":
        from .solvers.select import METHODS

        if d != 1:
            raise ValueError(
                f"family='statespace' needs 1-D inputs, got {d} columns; use "
                "family='default'"
            )
        if "statespace" not in METHODS:  # pragma: no cover - always built in
            raise ValueError("this gpgrad has no state-space solver")
        if custom is not None:
            raise ValueError(
                "family='statespace' chooses its own candidates; pass either "
                "candidates= or family=, not both"
            )
        if method not in ("auto", "statespace"):
            raise ValueError(
                f"family='statespace' runs on method='statespace', got {method!r}"
            )
        method = "statespace"
    if ard is None:
        ard = d > 1
    N = sum(f.size for f in obs)
    search, subsampled = _subsample(obs, search_points, seed)
    N_search = sum(f.size for f in search)
    # where the members' Hessians are taken: the search set (a window of
    # consecutive samples when the state-space family searches on all data)
    hess_obs, N_hess = search, N_search

    period = None
    if family == "statespace":
        pass  # no periodic part has a state-space form here
    elif periodic is True or periodic is None:
        vals = [f for f in obs if f.kind == "value"]
        if d == 1 and len(vals) == 1:
            xv, yv = B.to_numpy(vals[0].X), B.to_numpy(vals[0].y)
            period = detect_period(xv[:, 0], yv)
    elif periodic is not False:
        period = float(periodic)

    kw = dict(backend=backend, method=method, seed=seed, ard=ard, maxiter=maxiter)
    tried = {}  # name -> (candidate, FitResult, search log evidence)
    searched = []

    def score(res):
        return float(res.log_marginal_likelihood) - 0.5 * _n_params(res) * math.log(
            N_search
        )

    def run(cands):
        for c in cands:
            if c.name in tried:
                continue
            t0 = time.perf_counter()
            try:
                res = _fit_one(c, search, restarts=1, **kw)
                s = score(res) + math.log(c.prior)
            except (NotPositiveDefiniteError, ValueError) as e:
                if custom is not None and isinstance(e, ValueError):
                    raise
                res, s = None, -math.inf
            tried[c.name] = (c, res, s)
            searched.append((c.name, s))
            if progress:
                print(
                    f"gpgrad.fit_auto: {c.name:<18} log evidence {s:.6g} "
                    f"({time.perf_counter() - t0:.2f} s)",
                    file=sys.stderr,
                )

    if custom is not None:
        run(custom)
    else:
        if family == "statespace":
            bases = statespace_candidates()
        else:
            bases = default_candidates(Xall, period=period)
        if any(f.order >= 2 for f in obs):
            bases = [c for c in bases if c.kernel.order >= 2]
        run(bases)
        if family == "statespace" and subsampled and _aliased(tried, obs, search, kw):
            # the spread subset took a fast oscillation for noise: search on
            # every sample (gpgrad.fit starts a long series from a window)
            search, subsampled, N_search = obs, False, N
            hess_obs = _window(obs, STATESPACE_HESSIAN_WINDOW)
            N_hess = sum(f.size for f in hess_obs)
            tried.clear()
            searched.clear()
            run(bases)
        if refine:
            ranked = sorted(
                (v for v in tried.values() if v[1] is not None), key=lambda v: -v[2]
            )
            # every refinement of the best base, the warping of the runner-up
            for i, (c, res, _) in enumerate(ranked[:2]):
                extra = refinements(c, Xall, period=period, fitted=res)
                if family == "statespace":
                    extra = [e for e in extra if _has_statespace_form(e.kernel)]
                run(extra if i == 0 else [e for e in extra if e.name[:2] == "W("])
            # a rough part beside the leading kernel (the state-space
            # family's refinements are its two-scale sums alone)
            if family != "statespace":
                lead = max(
                    (v for v in tried.values() if v[1] is not None),
                    key=lambda v: v[2],
                )
                rough = rough_part(
                    lead[0],
                    fitted=lead[1],
                    spacing=_spacing(Xall),
                    span=_span(Xall.min(axis=0), Xall.max(axis=0)),
                )
                if rough is not None:
                    run([rough])

    ok = [(c, r, s) for c, r, s in tried.values() if r is not None]
    if not ok:
        raise NotPositiveDefiniteError(
            "no candidate kernel could be fitted: check the data for repeated "
            "inputs with different targets, or pass candidates= explicitly"
        )
    ok.sort(key=lambda v: -v[2])
    best_s = ok[0][2]
    # the pool scored by Laplace evidence: wider than what is kept, since
    # indistinguishable members are merged below and the search's BIC ranks
    # a little differently from the evidence
    keep = [v for v in ok if v[2] >= best_s - prune - POOL_MARGIN]
    keep = keep[: POOL_FACTOR * max_members]

    members = []
    logN = math.log(N)
    for rank, (c, res, _) in enumerate(keep):
        if not subsampled and restarts > 1 and rank == 0:
            # the leader: worth more starts
            res2 = _fit_one(c, obs, restarts=restarts, **kw)
            if res2.log_marginal_likelihood >= res.log_marginal_likelihood:
                res = res2
        if subsampled:
            try:
                post = res.gp.condition(*obs)
                lml = B.to_float(post.log_marginal_likelihood())
            except NotPositiveDefiniteError:
                continue
        else:
            post = res.posterior
            lml = float(res.log_marginal_likelihood)
        p = _n_params(res)
        hess = None
        if EVIDENCE_PRIOR_SD is None:
            occam = -0.5 * p * logN
        else:
            hess = _member_hessian(res, hess_obs, N / N_hess)
            occam = _log_occam(hess, _prior_sd(res, EVIDENCE_PRIOR_SD))
            if math.isfinite(occam):
                # entries outside the Laplace coordinates other than the
                # mean (on a bound, where the likelihood is not locally
                # quadratic) keep the BIC penalty
                outside = _n_params(res, exclude_mean=True) - hess.shape[0]
                occam -= 0.5 * outside * logN
            else:  # the Hessian failed: BIC for the whole member
                hess, occam = None, -0.5 * p * logN
        members.append(
            Member(
                name=c.name,
                fit=res,
                posterior=post,
                log_marginal_likelihood=lml,
                n_params=p,
                log_evidence=lml + occam + math.log(c.prior),
                hessian=hess,
            )
        )
    if not members:
        raise NotPositiveDefiniteError(
            "no fitted kernel could be conditioned on all observations; raise the "
            "noise or pass search_points >= the number of points"
        )
    le = np.array([m.log_evidence for m in members])
    top = le.max()
    w = np.exp(le - top)
    total_prior = sum(v[0].prior for v in tried.values())
    log_ev = top + math.log(w.sum()) - math.log(total_prior)
    w = w / w.sum()
    for m, wk in zip(members, w):
        m.weight = float(wk)
    members.sort(key=lambda m: -m.weight)
    members = [m for m in members if m.log_evidence >= top - prune]
    members = _merge_indistinguishable(members, search, max_members)
    total = sum(m.weight for m in members)
    for m in members:
        m.weight /= total
    members.sort(key=lambda m: -m.weight)
    if marginalize:
        for m in members:
            if m.weight < MARGINALIZE_MIN_WEIGHT:
                continue
            m.points, m.point_weights, m.log_sd = hyperparameter_points(
                m.fit,
                obs,
                posterior=m.posterior,
                hessian_observations=hess_obs,
                scale=N / N_hess,
                hessian=m.hessian,
            )
            # the state-space smoother's variances cost O(N) like its means
            m.point_variances = (
                N <= MARGINALIZE_VARIANCE_MAX
                or getattr(m.posterior, "method", None) == "statespace"
            )
    return AveragedPosterior(
        members, searched, log_ev, seconds=time.perf_counter() - t_start
    )


# --------------------------------------------------------------------------
# derivative estimation for series: what `gpgrad estimate --kernel auto` runs


@dataclass
class DerivativeEstimate:
    """Posterior mean and standard deviation of ``f``, ``f'`` and ``f''``.

    Attributes
    ----------
    t : ndarray (m,)
        Where the estimates hold.
    f_mean, f_std, df_mean, df_std : ndarray (m,)
    d2f_mean, d2f_std : ndarray (m,) or None
        ``None`` when ``order < 2``.
    model : AveragedPosterior
        The averaged model (members, weights, summary()).
    """

    t: np.ndarray
    f_mean: np.ndarray
    f_std: np.ndarray
    df_mean: np.ndarray
    df_std: np.ndarray
    d2f_mean: np.ndarray | None
    d2f_std: np.ndarray | None
    model: AveragedPosterior

    def table(self) -> dict:
        """The columns ``t, f_mean, f_std, df_mean, ...`` as a dict."""
        out = {
            "t": self.t,
            "f_mean": self.f_mean,
            "f_std": self.f_std,
            "df_mean": self.df_mean,
            "df_std": self.df_std,
        }
        if self.d2f_mean is not None:
            out["d2f_mean"] = self.d2f_mean
            out["d2f_std"] = self.d2f_std
        return out


def _series(v, name, n=None):
    if isinstance(v, (str, bytes)) or v is None:
        raise TypeError(
            f"{name} must be a 1-D array of numbers, got {type(v).__name__}"
        )
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D array of numbers") from None
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries but t has {n}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has NaN or infinite entries")
    return a


def estimate(
    t,
    y,
    dy=None,
    *,
    at=None,
    order: int = 2,
    restarts: int = 2,
    seed: int = 0,
    **options,
) -> DerivativeEstimate:
    """Derivatives of a noisy series with kernel choice by evidence and
    Bayesian model averaging (the ``gpgrad estimate --kernel auto`` path).

    Parameters
    ----------
    t : array (n,)
        Sample times (any order, any spacing; at least 3 distinct).
    y : array (n,)
        Noisy values ``f(t_i) + ε_i``.
    dy : array (n,), optional
        Measured derivatives ``f'(t_i)`` (with their own fitted noise).
    at : array (m,), optional
        Where to estimate (default ``t``).
    order : {1, 2}, default 2
        Highest derivative returned (2 adds ``f''``).
    restarts, seed :
        As for :func:`fit_auto`.
    **options :
        Passed to :func:`fit_auto` (``candidates``, ``prune``, ``backend``,
        ``search_points``, ...).

    Returns
    -------
    DerivativeEstimate
        Means and standard deviations of ``f``, ``f'`` and ``f''`` at ``at``,
        and the averaged model.

    Examples
    --------
    >>> import numpy as np
    >>> from gpgrad.auto import estimate
    >>> t = np.linspace(0, 1, 40)
    >>> y = np.sin(5 * t) + 0.01 * np.random.default_rng(1).normal(size=40)
    >>> est = estimate(t, y, refine=False)
    >>> bool(np.max(np.abs(est.df_mean - 5 * np.cos(5 * t))) < 0.5)
    True
    """
    t = _series(t, "t")
    y = _series(y, "y", t.shape[0])
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if np.unique(t).size < 3:
        raise ValueError(f"t needs at least 3 distinct times, got {np.unique(t).size}")
    obs = [values(t[:, None], y)]
    if dy is not None:
        obs.append(gradients(t[:, None], _series(dy, "dy", t.shape[0])[:, None]))
    P = t if at is None else _series(at, "at")
    model = fit_auto(*obs, restarts=restarts, seed=seed, **options)
    Q = P[:, None]

    moments = _series_moments(model, Q, order)
    out = dict(t=P, d2f_mean=None, d2f_std=None)
    for key, (mean, var) in zip(("f", "df", "d2f"), moments):
        out[f"{key}_mean"] = mean
        out[f"{key}_std"] = np.sqrt(np.maximum(var, 0.0))
    return DerivativeEstimate(model=model, **out)


def _series_moments(model, Q, order):
    """The mixture moments of ``f``, ``f'`` and (``order`` 2) ``f''`` at
    the points ``Q`` (m, 1): ``[(mean, var)]`` per order as numpy arrays (m,),
    what ``model.value``, ``.gradient`` and ``.hessian`` give, with one joint
    query per hyperparameter point (one cross-covariance of ``f``, ``f'`` and
    ``f''`` with the data, one solve for their variances) instead of one per
    order: each order's mixture (``AveragedPosterior._mix``) reads its slice
    of the points' joint predictions. Measured on the series of
    ``benchmarks/auto_speed.py`` (1,000 samples, under cProfile, 2-core AMD
    EPYC): the predictions 4.7 s → 4.2 s."""
    m = Q.shape[0]
    queries = [values(Q), gradients(Q), hessians(Q)]
    joint = {}  # id(posterior) -> its joint prediction, up to its order

    def sliced(k):
        def query(post):
            if id(post) not in joint:
                n = min(post.kernel.order, order) + 1
                joint[id(post)] = post.predict(*queries[:n])
            return Prediction(source=_Slice(joint[id(post)], k * m, (k + 1) * m))

        return query

    out = []
    for k in range(order + 1):
        pred = model._mix(k, sliced(k), False)
        var = B.to_numpy(pred.var)  # the variances fill the means on the way
        out.append((np.asarray(B.to_numpy(pred.mean), float), np.asarray(var, float)))
    return out


class _Slice:
    """Entries ``lo:hi`` of a flat joint prediction (its variances read
    first: they fill its mean on the way)."""

    def __init__(self, pred, lo, hi):
        self.pred, self.lo, self.hi = pred, lo, hi

    def mean(self):
        return self.pred.mean[self.lo : self.hi]

    def moments(self):
        var = self.pred.var[self.lo : self.hi]
        return self.pred.mean[self.lo : self.hi], var, None
