"""Acquisition-ready quantities: posterior moments at candidate points with
their exact gradients with respect to the candidates.

For a candidate ``x`` the posterior mean and variance of ``f(x)`` are

.. math::

    μ(x) = m + k_x^\\top α, \\qquad
    v(x) = k(x, x) - k_x^\\top (K + Σ)^{-1} k_x ,

with ``k_x`` the covariances of the observations with ``f(x)``. Their gradients
in ``x`` come in closed form from the derivative kernels, no autograd needed:

.. math::

    \\nabla_x μ(x) = E[\\nabla f(x) \\mid y], \\qquad
    \\nabla_x v(x) = 2 \\bigl[\\partial_x k(x, x')\\big|_{x'=x}
        - (\\partial_x k_x)^\\top (K + Σ)^{-1} k_x\\bigr]
    = 2 \\operatorname{Cov}[\\nabla f(x), f(x) \\mid y],

(the first term uses the kernel's symmetry, ``d/dx k(x, x) = 2 ∂_x k(x, x')``
at ``x' = x``, and vanishes for stationary kernels). Both are computed from one
cross-covariance of the observations with ``[f(X), ∇f(X)]``, chunk by chunk
over the candidates, on either backend; with ``backend="torch"`` autograd still
works through them (for example to the hyperparameters).

On top of these, :func:`expected_improvement` and
:func:`upper_confidence_bound` return the acquisition value and its gradient,
ready for a gradient-based optimizer such as ``scipy.optimize.minimize(...,
jac=True)``.
"""

from __future__ import annotations

import math

from . import backend as B
from .covariance import point_covariance
from .functionals import gradients, values

__all__ = [
    "CandidateMoments",
    "posterior_moments",
    "expected_improvement",
    "upper_confidence_bound",
]

#: observation×candidate entries held at once (bounds memory for many candidates)
CHUNK_ELEMENTS = 1 << 23


class CandidateMoments:
    """Posterior mean and variance of ``f`` at candidates, with gradients.

    Attributes
    ----------
    mean : array (..., m)
        ``μ(x_p)``.
    var : array (..., m)
        ``v(x_p)``, clipped at 0 (round-off can make it slightly negative).
    mean_grad : array (..., m, d)
        ``∇_x μ(x_p)``, the posterior mean of the gradient.
    var_grad : array (..., m, d)
        ``∇_x v(x_p) = 2 Cov[∇f(x_p), f(x_p) | y]``.
    """

    __slots__ = ("mean", "var", "mean_grad", "var_grad")

    def __init__(self, mean, var, mean_grad, var_grad):
        self.mean = mean
        self.var = var
        self.mean_grad = mean_grad
        self.var_grad = var_grad

    @property
    def std(self):
        """``σ(x_p) = √v(x_p)`` (..., m)."""
        return B.namespace(self.var).sqrt(self.var)

    @property
    def std_grad(self):
        """``∇σ = ∇v / (2σ)`` (..., m, d); 0 where σ = 0 (there ``σ`` has no
        gradient, and the variance is at its minimum)."""
        xp = B.namespace(self.var)
        sd = xp.sqrt(self.var)
        pos = sd > 0
        safe = xp.where(pos, sd, xp.ones_like(sd))
        g = self.var_grad / (2.0 * safe[..., None])
        return xp.where(pos[..., None], g, xp.zeros_like(g))

    def __repr__(self):
        return f"CandidateMoments(m={self.mean.shape[-1]}, d={self.var_grad.shape[-1]})"


def posterior_moments(posterior, X) -> CandidateMoments:
    """Posterior mean and variance of ``f`` at ``X`` with their gradients.

    Parameters
    ----------
    posterior : gpgrad.Posterior
        A conditioned GP; its kernel must be at least once mean-square
        differentiable (``Matern12`` is not).
    X : array (..., m, d)
        Candidate points, in the posterior's backend.

    Returns
    -------
    CandidateMoments
        ``mean`` and ``var`` (..., m); ``mean_grad`` and ``var_grad``
        (..., m, d), all exact (closed form):

        .. math::

            ∇μ = E[∇f(x) | y],\\qquad
            ∇v = 2\\,(∂_x k(x,x')|_{x'=x} - (∂_x k_x)^\\top (K+Σ)^{-1} k_x).

    Examples
    --------
    >>> import numpy as np, gpgrad
    >>> X = np.random.default_rng(0).uniform(-1, 1, (10, 2))
    >>> post = gpgrad.GP(gpgrad.kernels.RBF(0.5)).condition(X, X.sum(-1))
    >>> mom = gpgrad.acquisition.posterior_moments(post, X[:3] + 0.1)
    >>> mom.mean.shape, mom.var_grad.shape
    ((3,), (3, 2))
    """
    from .posterior import Posterior

    if not isinstance(posterior, Posterior):
        raise TypeError(
            "posterior_moments expects a gpgrad Posterior (gp.condition(...)), got "
            f"{type(posterior).__name__}"
        )
    qv, qg = posterior.check_queries(values(X), gradients(X))
    xp = posterior.xp
    solver = posterior.solver
    N = posterior.num_observations
    d = qv.d
    vb_all, gb_all = posterior.query_blocks(qv, qg)
    step = max(1, CHUNK_ELEMENTS // max(1, N * (d + 1)))
    parts = []
    for i0 in range(0, qv.n, step):
        i1 = min(qv.n, i0 + step)
        vb = vb_all.sub(i0, i1)
        gb = gb_all.sub(i0, i1)
        m = i1 - i0
        flat, P, Q = solver.cross([vb, gb], posterior.weights)  # (..., m + m d)
        batch = tuple(flat.shape[:-1])
        mean = flat[..., :m]
        mgrad = xp.reshape(flat[..., m:], batch + (m, d))
        Pv, Qv = P[..., :m], Q[..., :m]  # (..., N, m)
        Pg = xp.reshape(P[..., m:], tuple(P.shape[:-1]) + (m, d))
        prior_v = point_covariance(posterior.kernel, vb)[..., 0, 0]  # (..., m)
        prior_c = point_covariance(posterior.kernel, gb, vb)[..., 0]  # (..., m, d)
        var = prior_v - xp.sum(Pv * Qv, axis=-2)
        data_c = xp.sum(Pg * Qv[..., None], axis=-3)  # (..., m, d)
        vgrad = 2.0 * (prior_c - data_c)
        var = xp.broadcast_to(var, batch + (m,))
        vgrad = xp.broadcast_to(vgrad, batch + (m, d))
        parts.append((mean, mgrad, var, vgrad))
    mean = xp.concat([p[0] for p in parts], axis=-1)
    mgrad = xp.concat([p[1] for p in parts], axis=-2)
    var = xp.concat([p[2] for p in parts], axis=-1)
    vgrad = xp.concat([p[3] for p in parts], axis=-2)
    # back to data units: values shifted and scaled, gradients scaled
    batch = tuple(mean.shape[:-1])
    flat = xp.concat([mean, xp.reshape(mgrad, batch + (-1,))], axis=-1)
    flat = posterior.mean_to_data_units(flat, [qv, qg])
    m = qv.n
    mean = flat[..., :m]
    mgrad = xp.reshape(flat[..., m:], batch + (m, d))
    var = posterior.var_to_data_units(xp.where(var < 0, xp.zeros_like(var), var))
    vgrad = posterior.var_to_data_units(vgrad, entry_axes=2)
    return CandidateMoments(mean, var, mgrad, vgrad)


# --------------------------------------------------------------------------
# acquisition functions with closed-form gradients


def _check_number(value, what):
    """A finite float (a 0-d tensor is kept for autograd)."""
    if B.is_tensor(value):
        return value
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{what} must be a number, got {type(value).__name__}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def expected_improvement(posterior, X, best_f, maximize=True):
    """Expected improvement over ``best_f`` and its gradient in the candidates.

    .. math::

        EI(x) = σ\\,(z Φ(z) + φ(z)),\\quad z = \\frac{±(μ - f^*)}{σ},\\qquad
        ∇EI = ±Φ(z)\\,∇μ + φ(z)\\,∇σ

    (upper signs to maximize ``f``, lower to minimize). Where ``σ = 0`` the
    value is ``max(±(μ − f*), 0)`` and the gradient ``±1[±(μ − f*) > 0] ∇μ``.

    Parameters
    ----------
    posterior : gpgrad.Posterior
    X : array (..., m, d)
    best_f : float
        The incumbent (best observed) value ``f*``.
    maximize : bool, default True

    Returns
    -------
    value : array (..., m)
    grad : array (..., m, d)
    """
    best_f = _check_number(best_f, "best_f")
    mom = posterior_moments(posterior, X)
    xp = posterior.xp
    sign = 1.0 if maximize else -1.0
    sd = mom.std
    pos = sd > 0
    safe = xp.where(pos, sd, xp.ones_like(sd))
    u = sign * (mom.mean - best_f)
    z = u / safe
    cdf = B.ndtr(z)
    pdf = xp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    ei = xp.where(pos, safe * (z * cdf + pdf), xp.where(u > 0, u, xp.zeros_like(u)))
    gcdf = xp.where(pos, cdf, xp.astype(u > 0, u.dtype))
    grad = (
        sign * gcdf[..., None] * mom.mean_grad
        + xp.where(pos, pdf, xp.zeros_like(pdf))[..., None] * mom.std_grad
    )
    return ei, grad


def upper_confidence_bound(posterior, X, beta=2.0, maximize=True):
    """Upper confidence bound ``±μ + √β σ`` and its gradient in the candidates.

    .. math:: UCB(x) = ±μ(x) + \\sqrt{β}\\,σ(x),\\qquad
        ∇UCB = ±∇μ + \\sqrt{β}\\,∇σ

    With ``maximize=False`` this is the negated lower confidence bound, so that
    larger is always better (BoTorch's convention).

    Parameters
    ----------
    posterior : gpgrad.Posterior
    X : array (..., m, d)
    beta : float, default 2.0
        Non-negative exploration weight.
    maximize : bool, default True

    Returns
    -------
    value : array (..., m)
    grad : array (..., m, d)
    """
    beta = _check_number(beta, "beta")
    if not B.is_tensor(beta) and beta < 0:
        raise ValueError(f"beta must be non-negative, got {beta}")
    mom = posterior_moments(posterior, X)
    sign = 1.0 if maximize else -1.0
    rb = math.sqrt(beta) if not B.is_tensor(beta) else beta**0.5
    return (
        sign * mom.mean + rb * mom.std,
        sign * mom.mean_grad + rb * mom.std_grad,
    )
