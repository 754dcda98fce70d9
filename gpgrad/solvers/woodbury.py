"""Few points in many dimensions: the Woodbury form of the gradient Gram matrix.

With N gradient observations in D ≥ N dimensions the dense system has N·D rows
(50 points in 1,000 dimensions: 50,000 rows, 20 GB). For a stationary kernel
in scaled coordinates ``z = x/ℓ`` (``r_ab = z_a − z_b``) the gradient Gram
matrix is a Kronecker term plus a correction of rank at most N²
(de Roos, Gessner & Hennig, ICML 2021):

.. math::

    K_z = (−Φ_1) ⊗ I_D − U Ψ U^\\top,\\qquad U = I_N ⊗ Z^\\top,\\qquad
    Ψ_{(a,c),(b,e)} = Φ_2{}_{ab}\\,(δ_{ac} − δ_{bc})(δ_{ae} − δ_{be})

since ``φ''_{ab} r_{ab} r_{ab}^⊤ = Z^⊤ (e_a − e_b)(e_a − e_b)^⊤ Z`` scaled. With
one noise variance σ² for all entries, ``K_x + σ²I = S (K_z + σ² I_N ⊗ Λ) S``
with ``S = I_N ⊗ diag(1/ℓ)`` and ``Λ = diag(ℓ²)``. The Kronecker part
``A = (−Φ_1) ⊗ I + σ² I ⊗ Λ`` is diagonalized by the eigenvectors ``V`` of
``−Φ_1 = V diag(λ) V^⊤``: ``A = (V ⊗ I) diag(λ_k + σ²ℓ_i²) (V ⊗ I)^⊤``. Then

.. math::

    (A − UΨU^\\top)^{-1} = A^{-1} + A^{-1} U Ψ T^{-1} U^\\top A^{-1},\\qquad
    T = I − (U^\\top A^{-1} U) Ψ,

    \\log|K_x + σ^2 I| = \\sum_{k,i} \\log(λ_k + σ^2 ℓ_i^2) + \\log|T|
        − 2N \\sum_i \\log ℓ_i,

with ``(U^⊤A^{-1}U)_{(a,c),(b,e)} = Σ_k V_{ak} V_{bk} (Z diag(1/(λ_k + σ²ℓ²))
Z^⊤)_{ce}``: O(N³D) to set up, O(N⁶) for ``T⁻¹`` (an N²-square matrix), and
O(N²D + N⁴) per right-hand side. Posterior means at query points come from the
matrix-free cross-covariance product (O(N M D)).
"""

from __future__ import annotations

import numpy as np

from .. import backend as B
from ..covariance import covariance
from ..kernels.base import RadialKernel, StationaryMap, batch_scalar, vector_size
from .base import Solver
from .dense import cholesky
from .matfree import GramOperator

__all__ = [
    "WoodburySolver",
    "RotatedGradientSolver",
    "woodbury_solver",
    "woodbury_unsupported_reason",
]

#: largest N: T is an N²×N² matrix (N = 100: 800 MB in float64)
MAX_POINTS = 100


def woodbury_unsupported_reason(kernel, blocks, noise):
    """Why the Woodbury solver cannot handle this problem, or None."""
    if not isinstance(kernel, RadialKernel) or not isinstance(
        kernel.input_map, StationaryMap
    ):
        return (
            "the Woodbury solver needs a single stationary kernel (RBF, Matern32, "
            f"Matern52, RationalQuadratic), got {type(kernel).__name__}"
        )
    if kernel.order < 1:
        return f"{kernel!r} has no derivatives"
    kinds = sorted({b.f.kind for b in blocks})
    if kinds != ["gradient"]:
        return (
            "the Woodbury solver needs gradient observations only (full gradients "
            f"at every point), got {kinds}"
        )
    N = sum(b.n for b in blocks)
    if N > MAX_POINTS:
        return (
            f"the Woodbury solver's capacitance matrix is N²×N²; N = {N} points is "
            f"above its limit of {MAX_POINTS}"
        )
    nz = B.to_numpy(noise)
    spread = np.max(nz, axis=-1) - np.min(nz, axis=-1)
    if np.any(spread > 1e-12 * np.maximum(np.max(nz, axis=-1), 1e-300)):
        return (
            "the Woodbury solver needs one noise variance for all gradient entries, "
            "got different ones"
        )
    return None


def _inputs(xp, blocks, noise):
    """All observation points (..., N, D), broadcast to the noise's batch."""
    like = blocks[0].X
    X = xp.concat([b.X for b in blocks], axis=-2) if len(blocks) > 1 else like
    batch = tuple(noise.shape[:-1])
    if X.ndim - 2 < len(batch):
        X = xp.broadcast_to(X, batch + tuple(X.shape[-2:]))
    return X


def _centred(xp, Z):
    """Scaled inputs less their mean (stationary kernels do not see it)."""
    center = xp.mean(Z, axis=-2, keepdims=True)
    return Z - center, center


def _profile_matrices(xp, kernel, Z, like):
    """Pairwise differences, the identity, the variance and the N×N matrices
    ``σ²φ'(S)`` and ``σ²φ''(S)`` of the scaled points ``Z`` (..., N, k)."""
    N = Z.shape[-2]
    diff = Z[..., :, None, :] - Z[..., None, :, :]
    S = 0.5 * xp.sum(diff * diff, axis=-1)
    eye = xp.eye(N, dtype=S.dtype, device=B.device_of(S))
    S = S * (1.0 - eye)  # exact zeros on the diagonal
    var = batch_scalar(xp, kernel.variance, like, 2)
    prof = kernel.profile(xp, S, 2)
    P1 = var * prof[1]
    P2 = var * prof[2] if prof[2] is not None else 0.0 * P1
    return diff, eye, var, P1, P2


class _GradientSolver(Solver):
    """What the two N ≤ D gradient solvers share: the matrix-free cross
    products and the per-point gradient quadratic forms, built from each
    solver's ``_quad_one``."""

    method = "woodbury"

    def __init__(self, kernel, blocks, noise):
        reason = woodbury_unsupported_reason(kernel, blocks, noise)
        if reason is not None:
            raise ValueError(reason)
        super().__init__(kernel, blocks, noise)
        self._op = None

    def _operator(self):
        if self._op is None:
            self._op = GramOperator(self.kernel, self.blocks, None)
        return self._op

    def cross_mean(self, qblocks, alpha):
        """``K_{QL} α`` (…, M) matrix-free (O(N M D))."""
        return self._operator().cross_matmul(qblocks, alpha[..., None])[..., 0]

    def cross(self, qblocks, alpha, joint=False):
        """Posterior mean (…, M) and quadratic-form factors for the queries.

        For marginal gradient queries the per-point ``D×D`` quadratic form
        ``K_{*X}(K + σ²I)⁻¹K_{X*}`` is assembled from the Kronecker and
        low-rank pieces in O(N³D + N²D² + N⁴D) per point, never forming the
        (N·D × D) cross-covariance; other queries use it directly.
        """
        mean = self.cross_mean(qblocks, alpha)
        if (
            not joint
            and len(qblocks) == 1
            and qblocks[0].f.kind == "gradient"
            and qblocks[0].order == 1
        ):
            Q = self._gradient_quad(qblocks[0].X)  # (…, m, D, D)
            xp = self.xp
            m, D = Q.shape[-3], self.D
            # P = [I, I, …] (D × m·D) so that per point PᵀQ = quad
            eye = xp.eye(D, dtype=Q.dtype, device=B.device_of(Q))
            P = xp.reshape(xp.broadcast_to(eye[:, None, :], (D, m, D)), (D, m * D))
            Qf = xp.reshape(xp.moveaxis(Q, -3, -2), tuple(Q.shape[:-3]) + (D, m * D))
            return mean, P, Qf
        Ks = covariance(self.kernel, self.blocks, qblocks)
        P, Q = self.quad_factors(Ks)
        return mean, P, Q

    def _gradient_quad(self, Xq):
        """``K_{*X}(K + σ²I)⁻¹K_{X*}`` for the gradient at each query point,
        (…, m, D, D), in x-space units.

        With ``r_b = z_* − z_b``, ``f = Vᵀφ'_*``, ``W_k = diag(V_{:k} ⊙ φ''_*)``
        and ``D_k = diag(1/(λ_k + σ²ℓ²))``:

        .. math::

            \\sum_k (f_k I + J_k) D_k (f_k I + J_k)
                + B_*^\\top Ψ T^{-1} B_*,\\qquad J_k = R W_k R^\\top,
            \\quad B_* = U^\\top A^{-1} K_{X*}
        """
        xp = self.xp
        Zq = Xq / self.ls - self.center  # (…, m, D)
        outs = []
        for p in range(Zq.shape[-2]):
            outs.append(self._quad_one(Zq[..., p, :]))
        return xp.stack(outs, axis=-3)

    def _quad_one(self, zq):
        raise NotImplementedError


class WoodburySolver(_GradientSolver):
    """``(K + σ²I)⁻¹`` for gradient observations with N ≤ D (``method="woodbury"``).

    A :class:`~gpgrad.solvers.base.Solver` with matrix-free ``cross_mean``
    and structured gradient variances in ``cross``. Differentiable in torch
    (every step is an array operation).

    Parameters
    ----------
    kernel : stationary RadialKernel
    blocks : list of Block
        Gradient observations only.
    noise : array (…, N·D)
        One variance for all entries (per batch member).
    """

    def __init__(self, kernel, blocks, noise):
        super().__init__(kernel, blocks, noise)
        like = blocks[0].X
        xp = self.xp
        X = _inputs(xp, blocks, noise)
        self.N, self.D = X.shape[-2], X.shape[-1]
        N, D = self.N, self.D
        ls = kernel._ls(xp, like, 1)  # (*b, 1, D)
        ls = xp.broadcast_to(ls, tuple(ls.shape[:-2]) + (1, D))
        self.ls = ls
        Z, self.center = _centred(xp, X / ls)
        self.Z = Z
        self.sigma2 = noise[..., :1]  # (…, 1)
        _, _, self.var, P1, P2 = _profile_matrices(xp, kernel, Z, like)
        self.P2 = P2
        lam, V = B.eigh(-P1)
        self.V = V
        ell2 = (ls * ls)[..., 0, :]  # (*b, D)
        den = lam[..., :, None] + self.sigma2[..., None] * ell2[..., None, :]
        small = B.to_float(xp.min(den))
        if small <= 0:
            raise ValueError(
                "the gradient covariance's Kronecker part is singular (eigenvalue "
                f"{small:.3g}); raise the gradient noise (gpgrad.gradients(..., "
                "noise=...)) or use method='cholesky'"
            )
        self.Dinv = 1.0 / den  # (…, N, D): 1/(λ_k + σ²ℓ_i²)
        self._logdetA = xp.sum(xp.log(den), axis=(-2, -1))
        # G = Uᵀ A⁻¹ U, (…, N, N, N, N) indexed (a, c, b, e)
        H = (Z[..., None, :, :] * self.Dinv[..., :, None, :]) @ B.matrix_transpose(Z)[
            ..., None, :, :
        ]  # (…, k, c, e)
        Vk = xp.moveaxis(V, -1, -2)  # (…, k, a)
        VV = Vk[..., :, :, None] * Vk[..., :, None, :]  # (…, k, a, b)
        lead = tuple(VV.shape[:-3])
        VV = xp.reshape(VV, lead + (N, N * N))
        Hf = xp.reshape(H, tuple(H.shape[:-3]) + (N, N * N))
        G = B.matrix_transpose(VV) @ Hf  # (…, (a, b), (c, e))
        G = xp.reshape(G, tuple(G.shape[:-2]) + (N, N, N, N))
        nb = G.ndim - 4
        perm = tuple(range(nb)) + (nb, nb + 2, nb + 1, nb + 3)
        G = xp.permute_dims(G, perm)  # (…, a, c, b, e)
        G = xp.reshape(G, tuple(G.shape[:-4]) + (N * N, N, N))
        T = -self._psi_right(G)  # −GΨ, rows x = (a, c)
        T = xp.reshape(T, tuple(T.shape[:-2]) + (N * N,))
        T = T + xp.eye(N * N, dtype=T.dtype, device=B.device_of(T))
        self.T = T
        self.Tinv = xp.linalg.inv(T)
        self._logdetT = None

    # -- structured pieces -----------------------------------------------------
    def _psi_right(self, G):
        """``G Ψ`` for G (…, x, a, c) → (…, x, b, e) in O(x·N²)."""
        xp = self.xp
        N = self.N
        eye = xp.eye(N, dtype=G.dtype, device=B.device_of(G))
        g1 = xp.sum(G * eye, axis=-1)  # (…, x, a): G[x, a, a]
        h = self.P2[..., None, :, :] * (g1[..., :, None] - G)  # (…, x, a, b)
        out = B.matrix_transpose(h)  # [x, b, e] = h[x, e, b]
        colsum = xp.sum(h, axis=-2)  # (…, x, b)
        return out - colsum[..., :, None] * eye

    def _psi(self, w):
        """``Ψ w`` for w (…, N, N, k) indexed (b, e) → (…, N, N, k) as (a, c)."""
        xp = self.xp
        N = self.N
        eye = xp.eye(N, dtype=w.dtype, device=B.device_of(w))
        wd = xp.sum(w * eye[..., None], axis=-2)  # (…, b, k): w[b, b]
        # m[a, b] = φ''_ab (w[b, a] − w[b, b])
        m = self.P2[..., None] * (xp.moveaxis(w, -3, -2) - wd[..., None, :, :])
        return xp.sum(m, axis=-2)[..., :, None, :] * eye[..., None] - m

    def _ainv(self, Y):
        """``A⁻¹ Y`` for Y (…, N, D, k)."""
        xp = self.xp
        sh = tuple(Y.shape)
        Yf = xp.reshape(Y, sh[:-2] + (sh[-2] * sh[-1],))
        Yh = B.matrix_transpose(self.V) @ Yf
        Yh = xp.reshape(Yh, tuple(Yh.shape[:-1]) + sh[-2:]) * self.Dinv[..., None]
        Yh = xp.reshape(Yh, tuple(Yh.shape[:-3]) + (sh[-3], sh[-2] * sh[-1]))
        out = self.V @ Yh
        return xp.reshape(out, tuple(out.shape[:-1]) + sh[-2:])

    # -- the solver interface ------------------------------------------------------
    def solve(self, R):
        """``(K + σ²I)⁻¹ R`` for R (…, N·D, k)."""
        xp = self.xp
        N, D = self.N, self.D
        k = R.shape[-1]
        lsc = self.ls[..., 0, :, None]  # (…, D, 1)
        Rz = xp.reshape(R, tuple(R.shape[:-2]) + (N, D, k)) * lsc[..., None, :, :]
        y = self._ainv(Rz)
        w = self.Z[..., None, :, :] @ y  # Uᵀy: (…, a, c, k)
        wf = xp.reshape(w, tuple(w.shape[:-3]) + (N * N, k))
        t = self.Tinv @ wf
        t = self._psi(xp.reshape(t, tuple(t.shape[:-2]) + (N, N, k)))
        u = B.matrix_transpose(self.Z)[..., None, :, :] @ t  # U t: (…, a, D, k)
        x = (y + self._ainv(u)) * lsc[..., None, :, :]
        return xp.reshape(x, tuple(x.shape[:-3]) + (N * D, k))

    def logdet(self):
        xp = self.xp
        if self._logdetT is None:
            sign, logabs = xp.linalg.slogdet(self.T)
            if B.to_float(xp.min(sign)) <= 0:
                raise ValueError(
                    "the Woodbury capacitance matrix has a non-positive determinant "
                    "(round-off in an ill-conditioned system); raise the gradient "
                    "noise or use method='cholesky'"
                )
            self._logdetT = logabs
        logls = xp.sum(xp.log(self.ls[..., 0, :]), axis=-1)
        return self._logdetA + self._logdetT - 2.0 * self.N * logls

    def _quad_one(self, zq):
        xp = self.xp
        N = self.N
        Z, V, Dinv = self.Z, self.V, self.Dinv
        R = zq[..., None, :] - Z  # (…, N, D), rows r_b
        s = 0.5 * xp.sum(R * R, axis=-1)
        prof = self.kernel.profile(xp, s, 2)
        var = self.var[..., 0, 0] if self.var.ndim >= 2 else self.var
        var = xp.reshape(var, tuple(var.shape) + (1,))
        p1 = var * prof[1]  # (…, N)
        p2 = var * prof[2] if prof[2] is not None else 0.0 * p1
        Vt = B.matrix_transpose(V)  # (…, k, a)
        f = (Vt @ p1[..., None])[..., 0]  # (…, k)
        Yt = V @ (f[..., :, None] * Dinv)  # (…, N, D)
        # Term 1: Σ_k (f_k I + J_k) D_k (f_k I + J_k)
        u0 = ((f * f)[..., None, :] @ Dinv)[..., 0, :]  # (…, D)
        M1 = R * Yt * p2[..., None]
        T1b = B.matrix_transpose(M1) @ R
        Gk = (R[..., None, :, :] * Dinv[..., :, None, :]) @ B.matrix_transpose(R)[
            ..., None, :, :
        ]  # (…, k, N, N)
        Wk = Vt * p2[..., None, :]  # (…, k, b)
        S1 = xp.sum(Wk[..., :, :, None] * Gk * Wk[..., :, None, :], axis=-3)
        T1 = B.matrix_transpose(R) @ S1 @ R + T1b + B.matrix_transpose(T1b)
        D = self.D
        eye = xp.eye(D, dtype=T1.dtype, device=B.device_of(T1))
        T1 = T1 + u0[..., None, :] * eye
        # Term 2: B*ᵀ Ψ T⁻¹ B*
        B1 = Yt[..., :, None, :] * Z[..., None, :, :]  # (…, a, c, D)
        E = (Z[..., None, :, :] * Dinv[..., :, None, :]) @ B.matrix_transpose(R)[
            ..., None, :, :
        ]  # (…, k, c, b)
        EW = E * Wk[..., :, None, :]
        Hs = V @ xp.reshape(EW, tuple(EW.shape[:-2]) + (N * N,))  # (…, a, c·b)
        Hs = xp.reshape(Hs, tuple(Hs.shape[:-2]) + (N * N, N))
        Bst = -(xp.reshape(B1, tuple(B1.shape[:-3]) + (N * N, D)) + Hs @ R)
        t = self.Tinv @ Bst
        t = self._psi(xp.reshape(t, tuple(t.shape[:-2]) + (N, N, D)))
        T2 = B.matrix_transpose(Bst) @ xp.reshape(t, tuple(t.shape[:-3]) + (N * N, D))
        quad = T1 + T2
        il = 1.0 / self.ls[..., 0, :]  # (…, D)
        return quad * il[..., :, None] * il[..., None, :]


class RotatedGradientSolver(_GradientSolver):
    """The N ≤ D gradient system for an isotropic lengthscale, by rotation.

    With one lengthscale ℓ and one noise variance σ², ``K_x + σ²I = ℓ⁻²(K_z +
    τI)``, ``τ = σ²ℓ²``, and ``K_z`` is invariant under rotations of z. In an
    orthonormal basis ``[Q, Q_⊥]`` with Q (D × m, m = min(N, D)) spanning the
    centered points, every difference ``z_a − z_b`` lies in span(Q), so the
    gradient components along Q form an m-dimensional gradient GP (N·m rows,
    dense Cholesky) and each of the ``D − m`` directions of ``Q_⊥`` an
    independent copy of ``A = −Φ₁ + τI`` (N rows):

    .. math::

        (K_z + τI)^{-1} = (I_N ⊗ Q) K_Q^{-1} (I_N ⊗ Q)^\\top
            + A^{-1} ⊗ (I − QQ^\\top),\\qquad
        \\log|K_z + τI| = \\log|K_Q| + (D − m)\\log|A|.

    O(N²D + (Nm)³) once, O(N²D + (Nm)²m + m D²) per queried gradient: the same
    regime as :class:`WoodburySolver` with a symmetric (Cholesky) core.
    """

    def __init__(self, kernel, blocks, noise):
        if vector_size(kernel.lengthscale) != 1:
            raise ValueError(
                "the rotated solver needs one lengthscale for all dimensions"
            )
        super().__init__(kernel, blocks, noise)
        like = blocks[0].X
        xp = self.xp
        X = _inputs(xp, blocks, noise)
        self.N, self.D = N, D = X.shape[-2], X.shape[-1]
        ls = kernel._ls(xp, like, 1)  # (*b, 1, 1)
        self.ls = xp.broadcast_to(ls, tuple(ls.shape[:-2]) + (1, D))
        self.ell = ls[..., 0, 0]  # (*b,)
        Z, self.center = _centred(xp, X / ls)
        self.Z = Z
        self.tau = noise[..., 0] * self.ell * self.ell  # (…,)
        Q, _ = xp.linalg.qr(B.matrix_transpose(Z))  # (…, D, m)
        self.Q = Q
        self.m = m = Q.shape[-1]
        Zh = Z @ Q  # (…, N, m)
        diff, eye, self.var, P1, P2 = _profile_matrices(xp, kernel, Zh, like)
        tau = self.tau[..., None, None]
        A = -P1 + tau * eye
        self.LA, jA = cholesky(A, what="the gradient covariance's Kronecker part")
        em = xp.eye(m, dtype=P1.dtype, device=B.device_of(P1))
        rr = diff[..., :, :, :, None] * diff[..., :, :, None, :]  # (…, a, b, i, j)
        Kq = -(
            P1[..., :, :, None, None] * em + P2[..., :, :, None, None] * rr
        )  # (…, a, b, i, j)
        Kq = xp.reshape(xp.moveaxis(Kq, -3, -2), tuple(Kq.shape[:-4]) + (N * m, N * m))
        Kq = Kq + self.tau[..., None, None] * xp.eye(
            N * m, dtype=P1.dtype, device=B.device_of(P1)
        )
        self.LQ, jQ = cholesky(Kq, what="the gradient covariance's rotated part")
        self.jitter = max(jA, jQ)

    def solve(self, R):
        xp = self.xp
        N, D, m = self.N, self.D, self.m
        k = R.shape[-1]
        Y = xp.reshape(R, tuple(R.shape[:-2]) + (N, D, k))
        Qt = B.matrix_transpose(self.Q)[..., None, :, :]  # (…, 1, m, D)
        Ys = Qt @ Y  # (…, N, m, k)
        Yc = Y - self.Q[..., None, :, :] @ Ys
        Xs = xp.reshape(Ys, tuple(Ys.shape[:-3]) + (N * m, k))
        Xs = B.solve_triu_t(self.LQ, B.solve_tril(self.LQ, Xs))
        Xs = self.Q[..., None, :, :] @ xp.reshape(Xs, tuple(Xs.shape[:-2]) + (N, m, k))
        Ycf = xp.reshape(Yc, tuple(Yc.shape[:-3]) + (N, D * k))
        Xc = B.solve_triu_t(self.LA, B.solve_tril(self.LA, Ycf))
        x = Xs + xp.reshape(Xc, tuple(Xc.shape[:-2]) + (N, D, k))
        ell2 = (self.ell * self.ell)[..., None, None]
        return xp.reshape(x, tuple(x.shape[:-3]) + (N * D, k)) * ell2

    def logdet(self):
        xp = self.xp
        ldq = 2.0 * xp.sum(xp.log(B.diagonal(self.LQ)), axis=-1)
        lda = 2.0 * xp.sum(xp.log(B.diagonal(self.LA)), axis=-1)
        return ldq + (self.D - self.m) * lda - 2.0 * self.N * self.D * xp.log(self.ell)

    def _quad_one(self, zq):
        xp = self.xp
        N, m, D = self.N, self.m, self.D
        Q = self.Q
        zp = zq - (Q @ (B.matrix_transpose(Q) @ zq[..., None]))[..., 0]  # ⊥ part
        h = xp.sqrt(xp.sum(zp * zp, axis=-1))  # (…,)
        small = h <= 1e-12 * (1.0 + xp.sqrt(xp.sum(zq * zq, axis=-1)))
        hs = xp.where(small, xp.ones_like(h), h)
        u = xp.where(small[..., None], xp.zeros_like(zp), zp / hs[..., None])
        h = xp.where(small, xp.zeros_like(h), h)
        Qh = xp.concat([Q, u[..., :, None]], axis=-1)  # (…, D, m+1)
        R = zq[..., None, :] - self.Z  # (…, N, D)
        s = 0.5 * xp.sum(R * R, axis=-1)
        prof = self.kernel.profile(xp, s, 2)
        var = xp.reshape(self.var[..., 0, 0], tuple(self.var.shape[:-2]) + (1,))
        p1 = var * prof[1]
        p2 = var * prof[2] if prof[2] is not None else 0.0 * p1
        rh = R @ Qh  # (…, N, m+1): r̂_b
        e1 = xp.eye(m + 1, dtype=R.dtype, device=B.device_of(R))
        # span cross-covariance (…, m+1, N, m)
        Fs = -(
            p1[..., None, :, None] * e1[:, None, :m]
            + p2[..., None, :, None]
            * xp.moveaxis(rh, -1, -2)[..., :, :, None]
            * rh[..., None, :, :m]
        )
        Fs = xp.reshape(Fs, tuple(Fs.shape[:-2]) + (N * m,))
        V = B.solve_tril(self.LQ, B.matrix_transpose(Fs))  # (…, N·m, m+1)
        quad = B.matrix_transpose(V) @ V
        # the u-direction of the training gradients: (…, m+1, N)
        Fu = -(
            p1[..., None, :] * e1[:, m : m + 1]
            + p2[..., None, :] * xp.moveaxis(rh, -1, -2) * h[..., None, None]
        )
        W = B.solve_tril(self.LA, B.matrix_transpose(Fu))
        quad = quad + B.matrix_transpose(W) @ W
        w1 = B.solve_tril(self.LA, p1[..., :, None])
        qrest = xp.sum(w1 * w1, axis=(-2, -1))  # φ'ᵀA⁻¹φ'
        eyeD = xp.eye(D, dtype=R.dtype, device=B.device_of(R))
        full = Qh @ (quad - qrest[..., None, None] * e1) @ B.matrix_transpose(Qh)
        full = full + qrest[..., None, None] * eyeD
        ell2 = (self.ell * self.ell)[..., None, None]
        return full / ell2


def woodbury_solver(kernel, blocks, noise):
    """The N ≤ D gradient solver: rotated (Cholesky core) for one lengthscale,
    Woodbury (ARD lengthscales) otherwise."""
    if vector_size(kernel.lengthscale) == 1:
        return RotatedGradientSolver(kernel, blocks, noise)
    return WoodburySolver(kernel, blocks, noise)
