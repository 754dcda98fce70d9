"""Preconditioners for conjugate gradients on derivative Gram matrices.

Every preconditioner is an object with

``apply(R)``
    ``P⁻¹R`` for R (…, N, k);
``matmul(R)``
    ``PR``;
``sample(G1, G2)``
    maps two standard normal draws (…, N, p) to a draw from ``N(0, P)`` (the
    probes of the log-determinant estimator);
``logdet``
    ``log|P|`` (…,), exact.

:class:`PointCholesky` is a partial pivoted Cholesky factorization that pivots
on whole points: each step adds every entry observed at the chosen points (the
value and all D partial derivatives), so that one step is a handful of GEMMs
over the closed-form cross-covariance of those points instead of one
covariance row at a time. With ``L`` the factor (…, N, r),

.. math::

    P = L L^\\top + \\operatorname{diag}(K - L L^\\top) + Σ,

applied by the Woodbury identity in O(N r) per column. For the smooth kernels
whose Gram matrices have a few large, slowly resolved eigenvalue clusters
(low-degree polynomial trends in the data at lengthscales long against the
data's spread) the factor captures those clusters, and conjugate gradients only
has to resolve what is left.
"""

from __future__ import annotations

import numpy as np

from .. import backend as B

__all__ = ["Jacobi", "Identity", "PointCholesky", "point_pivoted_cholesky"]


class Identity:
    """``P = I`` (plain conjugate gradients)."""

    name = None

    def __init__(self, diag):
        self.logdet = 0.0 * diag[..., 0]

    def apply(self, R):
        return R

    def matmul(self, R):
        return R

    def sample(self, G1, G2):
        return G2


class Jacobi:
    """``P = diag(K + Σ)``."""

    name = "jacobi"

    def __init__(self, diag):
        xp = B.namespace(diag)
        self.d = diag
        self.inv = 1.0 / diag
        self.logdet = xp.sum(xp.log(diag), axis=-1)

    def apply(self, R):
        return self.inv[..., None] * R

    def matmul(self, R):
        return self.d[..., None] * R

    def sample(self, G1, G2):
        xp = B.namespace(G2)
        return xp.sqrt(self.d)[..., None] * G2


class PointCholesky:
    """``P = LLᵀ + diag(K − LLᵀ) + Σ`` from :func:`point_pivoted_cholesky`.

    Parameters
    ----------
    L : array (…, N, r)
        Partial Cholesky factor of ``K`` (no noise).
    kdiag : array (…, N)
        ``diag(K)``.
    noise : array (…, N)
        ``diag(Σ)``.
    """

    name = "pivchol"

    def __init__(self, L, kdiag, noise):
        xp = B.namespace(L)
        self.xp = xp
        self.L = L
        resid = kdiag - xp.sum(L * L, axis=-1)
        resid = xp.where(resid > 0, resid, xp.zeros_like(resid))
        Dg = resid + noise
        floor = 1e-12 * xp.max(kdiag + noise, axis=-1, keepdims=True)
        Dg = xp.where(Dg > floor, Dg, floor)
        self.Dg = Dg
        self.Dinv = 1.0 / Dg
        r = L.shape[-1]
        self.DL = self.Dinv[..., None] * L
        inner = B.matrix_transpose(L) @ self.DL + xp.eye(
            r, dtype=L.dtype, device=B.device_of(L)
        )
        self.Lc = xp.linalg.cholesky(inner)
        # log|P| = log|D| + log|I + LᵀD⁻¹L| (matrix determinant lemma)
        self.logdet = xp.sum(xp.log(Dg), axis=-1) + 2.0 * xp.sum(
            xp.log(B.diagonal(self.Lc)), axis=-1
        )

    @property
    def rank(self) -> int:
        return int(self.L.shape[-1])

    def apply(self, R):
        t = self.Dinv[..., None] * R
        u = B.matrix_transpose(self.L) @ t
        u = B.solve_triu_t(self.Lc, B.solve_tril(self.Lc, u))
        return t - self.DL @ u

    def matmul(self, R):
        L = self.L
        return L @ (B.matrix_transpose(L) @ R) + self.Dg[..., None] * R

    def sample(self, G1, G2):
        xp = self.xp
        r = self.rank
        return self.L @ G1[..., :r, :] + xp.sqrt(self.Dg)[..., None] * G2


def _take_points(block, idx):
    """The sub-block of ``block`` at point indices ``idx`` (numpy ints)."""
    from ..covariance import Block

    xp = B.namespace(block.X)
    sub = object.__new__(Block)
    sub.f = block.f
    ii = idx if B.is_numpy(xp) else _as_index(block.X, idx)
    sub.X = xp.take(block.X, ii, axis=-2)
    if block.U.shape[0] == block.n and block.n > 1:
        sub.U = block.U[ii]
    else:
        sub.U = block.U
    sub.order, sub.k, sub.d = block.order, block.k, block.d
    sub.n = len(idx)
    return sub


def _as_index(like, idx):
    import torch

    return torch.as_tensor(np.asarray(idx), device=like.device)


def point_pivoted_cholesky(
    kernel, groups, blocks, kdiag, *, max_rank, batch_points=None, rtol=1e-10
):
    """Partial pivoted Cholesky of the Gram matrix, pivoting on whole points.

    Parameters
    ----------
    kernel : Kernel
    groups : list
        Point groups (each with ``parts``, a list of ``(block_index, kind)``
        whose blocks share the group's points), as built by
        :class:`~gpgrad.solvers.matfree.GramOperator`.
    blocks : list of Block
        The observation blocks (N entries in all).
    kdiag : array (…, N)
        ``diag(K)`` without noise.
    max_rank : int
        Stop before the factor has more columns than this.
    batch_points : int or None
        Points added per step (default: about 256 entries' worth).
    rtol : float
        Stop when the largest residual variance of a point falls below
        ``rtol`` times the largest prior one.

    Returns
    -------
    L : array (…, N, r)
        With ``LLᵀ`` the Nyström approximation of ``K`` on the chosen points'
        entries (their columns are reproduced exactly).

    Notes
    -----
    A step with ``s`` new entries costs the ``s × N`` closed-form cross-
    covariance, one ``N × r × s`` GEMM and an ``s × s`` eigendecomposition
    (the pivot block is pseudo-inverted, so points that add little are
    harmless). Pivots are shared over batch dimensions.
    """
    from ..covariance import covariance

    xp = B.namespace(kdiag)
    offs = np.cumsum([0] + [b.size for b in blocks])
    # entry indices of every point of every group: (n_g, k_g) per group
    gentries = []
    for g in groups:
        cols = []
        for i, _ in g.parts:
            b = blocks[i]
            cols.append(offs[i] + np.arange(b.n * b.k).reshape(b.n, b.k))
        gentries.append(np.concatenate(cols, axis=1))
    per_point = max(e.shape[1] for e in gentries)
    if batch_points is None:
        batch_points = max(1, 256 // per_point)
    gstart = np.cumsum([0] + [e.shape[0] for e in gentries])
    npts = int(gstart[-1])

    def score_of(resid):
        r = B.to_numpy(resid).reshape(-1, resid.shape[-1]).sum(axis=0)
        return np.concatenate([r[e].sum(axis=1) for e in gentries])

    resid = kdiag
    s0 = score_of(resid)
    top = float(s0.max()) if npts else 0.0
    chosen = np.zeros(npts, bool)
    Ls = []
    rank = 0
    while rank < max_rank:
        score = score_of(resid)
        score[chosen] = -np.inf
        room = max(1, (max_rank - rank) // per_point)
        take = min(batch_points, room, int(np.sum(~chosen)))
        if take <= 0:
            break
        pick = np.argsort(-score)[:take]
        pick = pick[score[pick] > rtol * top]
        if len(pick) == 0:
            break
        chosen[pick] = True
        pick.sort()
        # the chosen points' sub-blocks, and the global indices of their rows
        subs, rows = [], []
        for gi, g in enumerate(groups):
            loc = pick[(pick >= gstart[gi]) & (pick < gstart[gi + 1])] - gstart[gi]
            if len(loc) == 0:
                continue
            for i, _ in g.parts:
                b = blocks[i]
                subs.append(_take_points(b, loc))
                rows.append(
                    (offs[i] + loc[:, None] * b.k + np.arange(b.k)[None, :]).ravel()
                )
        rows = np.concatenate(rows)
        C = B.matrix_transpose(covariance(kernel, subs, blocks))  # (…, N, s)
        ridx = rows if B.is_numpy(xp) else _as_index(C, rows)
        if Ls:
            Lp = Ls[0] if len(Ls) == 1 else xp.concat(Ls, axis=-1)
            Ls = [Lp]
            C = C - Lp @ B.matrix_transpose(xp.take(Lp, ridx, axis=-2))
        G = xp.take(C, ridx, axis=-2)  # (…, s, s)
        G = 0.5 * (G + B.matrix_transpose(G))
        lam, V = B.eigh(G)
        big = xp.max(lam, axis=-1, keepdims=True)
        keep = lam > 1e-10 * big
        inv_sqrt = xp.where(
            keep, 1.0 / xp.sqrt(xp.where(keep, lam, big)), xp.zeros_like(lam)
        )
        # drop directions no batch member keeps (they would be zero columns)
        any_keep = B.to_numpy(keep).reshape(-1, keep.shape[-1]).any(axis=0)
        if not any_keep.any():
            break
        cols = np.nonzero(any_keep)[0]
        cidx = cols if B.is_numpy(xp) else _as_index(C, cols)
        W = xp.take(V, cidx, axis=-1) * xp.take(inv_sqrt, cidx, axis=-1)[..., None, :]
        Lnew = C @ W  # (…, N, s')
        Ls.append(Lnew)
        rank += Lnew.shape[-1]
        resid = resid - xp.sum(Lnew * Lnew, axis=-1)
    if not Ls:
        return None
    return Ls[0] if len(Ls) == 1 else xp.concat(Ls, axis=-1)
