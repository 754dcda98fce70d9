"""Dense Cholesky with one visible jitter policy."""

from __future__ import annotations

import warnings

import numpy as np

from .. import backend as B
from ..covariance import covariance
from ..exceptions import JitterWarning, NotPositiveDefiniteError
from .base import Solver

__all__ = ["cholesky", "DenseCholeskySolver", "JITTER_START", "JITTER_MAX"]

#: first jitter tried, relative to the mean diagonal, in units of the dtype's eps
JITTER_START = 100.0
#: largest relative jitter before giving up: float64, and float32 or narrower
JITTER_MAX = {"float64": 1e-6, "float32": 1e-3}


def _eps_and_max(A):
    eps = B.eps(A.dtype)
    # float32 and narrower get the float32 ceiling; float64 its own
    return eps, JITTER_MAX["float64" if eps < 1e-10 else "float32"]


def cholesky(
    K,
    *,
    what="the observations' covariance matrix",
    hint="",
    warn=True,
    max_jitter=None,
    rebuild=None,
):
    """Lower Cholesky factor of symmetric ``K`` (..., N, N), with jitter.

    Tries the plain factorization first; where it fails, adds
    ``ε · mean(diag K)`` to the diagonal of the failed batch members, with ε
    rising tenfold from ``100·eps(dtype)`` up to ``max_jitter`` (1e-6 in float64,
    1e-3 in float32), warning with :class:`~gpgrad.JitterWarning` when jitter
    was used, and raising :class:`~gpgrad.NotPositiveDefiniteError` (naming what
    to change) when even the largest jitter fails.

    Only ``K``'s upper triangle is read. With ``rebuild`` (a function that
    returns ``K`` anew), ``K``'s memory is reused for the factor and a failed
    attempt rebuilds it; without it, ``K`` is kept and copies are factored.

    Returns
    -------
    L : array (..., N, N)
    jitter : float
        The absolute jitter added (largest over the batch; 0.0 if none).
    """
    eps, big = _eps_and_max(K)
    if max_jitter is not None:
        big = max_jitter
    xp = B.namespace(K)
    d0 = B.diagonal(K)
    d0 = d0.clone() if B.is_tensor(d0) else d0.copy()
    if B.is_tensor(d0):
        bad = bool((~d0.isfinite()).any())
    else:
        bad = not np.all(np.isfinite(d0))
    if bad:
        raise NotPositiveDefiniteError(
            f"{what} has NaN or infinite entries; check the inputs and the "
            "kernel's hyperparameters"
        )
    grad = B.is_tensor(K) and K.requires_grad
    if rebuild is None and not grad:
        K_keep = K  # factor copies: K must survive a failed attempt
        L, ok, _ = B.cholesky_inplace(_copy(K))
    else:
        L, ok, intact = B.cholesky_inplace(K)
    if bool(ok.all()):
        return L, 0.0
    scale = xp.mean(d0, axis=-1)
    need = ~ok  # batch members that need jitter
    N = K.shape[-1]
    rel = JITTER_START * eps
    added = 0.0 * scale
    while rel <= big * (1 + 1e-9):
        target = xp.where(need, rel * scale, added)
        if grad:
            # autograd: out of place
            add = target - added
            K = K + xp.reshape(add, tuple(add.shape) + (1, 1)) * _eye(xp, N, K)
            L, ok, _ = B.cholesky_inplace(K)
        elif rebuild is None:
            K_keep = B.add_to_diagonal_(K_keep, (target - added)[..., None])
            L, ok, _ = B.cholesky_inplace(_copy(K_keep))
        else:
            if not intact:
                K = rebuild()
                B.add_to_diagonal_(K, target[..., None])
            else:
                B.add_to_diagonal_(K, (target - added)[..., None])
            L, ok, intact = B.cholesky_inplace(K)
        added = target
        if bool(ok.all()):
            jitter = float(B.to_numpy(added).max())
            if warn:
                warnings.warn(
                    f"added jitter {jitter:.3g} ({rel:.1e} of the mean diagonal) to "
                    f"{what} ({N}×{N}) to make it positive definite. That is the "
                    "same as that much extra noise variance on every observation; "
                    "in an ill-conditioned system predictions can move by far more "
                    "than the jitter itself. To avoid it: raise the observation "
                    f"noise, remove duplicated or near-duplicated points{hint}.",
                    JitterWarning,
                    stacklevel=3,
                )
            return L, jitter
        need = need | ~ok
        rel *= 10.0
    raise NotPositiveDefiniteError(
        f"{what} ({N}×{N}) is not positive definite even with jitter {big:.0e} × "
        "its mean diagonal. Raise the observation noise (GP(noise=...) or the "
        "observation's noise=), remove duplicated or near-duplicated points, "
        f"use a longer lengthscale or float64{hint}."
    )


def _copy(A):
    return A.clone() if B.is_tensor(A) else np.array(A, copy=True)


def _eye(xp, N, like):
    return xp.eye(N, dtype=like.dtype, device=B.device_of(like))


class DenseCholeskySolver(Solver):
    """``(K + Σ)⁻¹`` through the Cholesky factor ``L`` of the dense matrix.

    The matrix is assembled chunk by chunk straight into its final buffer
    (only its upper triangle when no autograd is involved) and factored in
    place, with the jitter policy of :func:`cholesky`.
    """

    method = "cholesky"

    def __init__(self, kernel, blocks, noise):
        super().__init__(kernel, blocks, noise)
        n_obs = int(noise.shape[-1])

        def build():
            # the Cholesky factorization reads the upper triangle only; autograd
            # needs the whole symmetric matrix (its backward pass symmetrizes)
            K = covariance(kernel, self.blocks, upper_only=True)
            if B.is_tensor(K) and K.requires_grad:
                B.mirror_upper_to_lower_(K)
            return _add_diag(K, noise)

        self.L, self.jitter = cholesky(
            build(),
            what=f"the covariance matrix of the {n_obs} observations",
            hint=" (identical points observed twice need noise > 0)",
            rebuild=build,
        )

    def solve(self, R):
        return B.solve_triu_t(self.L, B.solve_tril(self.L, R))

    def quad_factors(self, Ks):
        V = B.solve_tril(self.L, Ks)
        return V, V

    def logdet(self):
        xp = B.namespace(self.L)
        return 2.0 * xp.sum(xp.log(B.diagonal(self.L)), axis=-1)

    def condition_estimate(self):
        """``(max_i L_ii / min_i L_ii)²``, a lower bound on cond(A)."""
        diag = np.asarray(B.to_numpy(B.diagonal(self.L)), dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.max((diag.max(axis=-1) / diag.min(axis=-1)) ** 2))


def _add_diag(K, noise):
    if B.is_tensor(K) and (K.requires_grad or noise.requires_grad):
        return K + B.diag_embed(noise)
    return B.add_to_diagonal_(K, noise)
