"""Kalman filtering, smoothing and the likelihood adjoint over associative scans.

The model is a linear-Gaussian chain with one scalar observation per step,

.. math::

    x_0 \\sim N(0, P_0),\\quad x_k = A_k x_{k-1} + q_k,\\ q_k \\sim N(0, Q_k),
    \\qquad y_k = h_k x_k + ε_k,\\ ε_k \\sim N(0, R_k),

with ``A_k = I, Q_k = 0`` between steps at the same time. Every recursion is
evaluated as an associative scan (Särkkä & García-Fernández 2021), in numpy,
so its cost is O(T D³) in compiled array operations and O(log T) Python steps:

* the filter in covariance form (no inverse of ``Q_k``, so tiny and zero
  steps are exact);
* the modified Bryson–Frazier adjoint, a linear recursion backwards in time,

  .. math::

      λ_k = B_k^\\top λ_{k+1} + h_k^\\top v_k / S_k,\\qquad
      Λ_k = B_k^\\top Λ_{k+1} B_k + h_k^\\top h_k / S_k,\\qquad
      B_k = A_{k+1}(I - K_k h_k),

  where ``λ_k = ∂ℓ/∂m⁻_k`` and ``∂ℓ/∂P⁻_k = ½(λ_kλ_k^\\top - Λ_k)`` for the
  predicted moments ``m⁻_k, P⁻_k``. They give the smoothed moments
  ``m⁻ + P⁻λ`` and ``P⁻ - P⁻ΛP⁻``, ``S^{-1} r`` and the exact gradient of the
  log marginal likelihood ``ℓ`` with respect to every ``A_k``, ``Q_k``,
  ``P_0``, target and noise variance.

Arrays: ``A``, ``Q`` (T, D, D) (entry 0 unused: ``P_0`` is the prior of step
0), ``h`` (T, D), ``y``, ``R`` (T,); vectors are kept as columns (T, D, k).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

__all__ = ["scan", "KalmanResult", "kalman", "linear_solve", "one_blas_thread"]

#: steps processed by one scan; longer chains are scanned chunk by chunk,
#: carrying the state across, which bounds the scan's temporaries
CHUNK = 1 << 17


def _t(M):
    return np.swapaxes(M, -1, -2)


def _sym(M):
    return 0.5 * (M + _t(M))


def scan(elems, combine):
    """Inclusive associative scan along axis 0 of a tuple of arrays.

    Work-efficient pairwise recursion: about 2T calls' worth of ``combine``
    work over vectorized halves, log2(T) levels deep.
    """
    T = elems[0].shape[0]
    if T == 1:
        return elems
    h = T // 2
    pairs = combine(
        tuple(e[0 : 2 * h : 2] for e in elems), tuple(e[1 : 2 * h : 2] for e in elems)
    )
    sub = scan(pairs, combine)
    out = tuple(np.empty_like(e) for e in elems)
    for o, s, e in zip(out, sub, elems):
        o[1 : 2 * h : 2] = s
        o[0] = e[0]
    n_even = (T - 1) // 2
    if n_even:
        comb = combine(tuple(s[:n_even] for s in sub), tuple(e[2::2] for e in elems))
        for o, c in zip(out, comb):
            o[2::2] = c
    return out


def one_blas_thread():
    """A context that runs BLAS on one thread (threadpoolctl; a no-op without it).

    The recursions' matrix products are thin ((T, D) × (D, D)); splitting
    them over threads costs more than it saves, and on a busy machine up to
    30 times more.
    """
    global _CONTROLLER
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - optional
            _CONTROLLER = False
        else:
            # found once: finding the libraries reads the process's memory map
            _CONTROLLER = ThreadpoolController()
    if _CONTROLLER is False:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return _CONTROLLER.limit(limits=1, user_api="blas")


_CONTROLLER = None


# --------------------------------------------------------------------------
# the filter


def _filter_combine(ei, ej):
    Ai, bi, Ci, ni, Ji = ei
    Aj, bj, Cj, nj, Jj = ej
    D = Ai.shape[-1]
    Winv = np.linalg.inv(np.eye(D) + Ci @ Jj)
    M = Aj @ Winv
    A = M @ Ai
    b = M @ (bi + Ci @ nj) + bj
    C = _sym(M @ Ci @ _t(Aj) + Cj)
    N = _t(Ai) @ _t(Winv)
    eta = N @ (nj - Jj @ bi) + ni
    J = _sym(N @ Jj @ Ai + Ji)
    return A, b, C, eta, J


def _filter_elements(A, Q, h, y, R):
    """Scan elements of the filter (A, b, C, η, J); element 0 conditions the
    prior ``N(0, Q[0])`` on ``y[0]`` (``A[0]`` is ignored)."""
    A = A.copy()
    A[0] = 0.0
    hc = h[:, :, None]  # (T, D, 1)
    Qh = Q @ hc  # (T, D, 1)
    S = (h[:, None, :] @ Qh)[:, 0, 0] + R
    inv = np.divide(1.0, S, out=np.zeros_like(S), where=S > 0)
    K = Qh * inv[:, None, None]
    IKh = np.eye(A.shape[-1]) - K @ h[:, None, :]
    Ae = IKh @ A
    b = K * y[:, None, None]
    C = _sym(IKh @ Q @ _t(IKh) + K @ _t(K) * R[:, None, None])
    Ah = _t(A) @ hc
    eta = Ah * (y * inv)[:, None, None]
    J = (Ah @ _t(Ah)) * inv[:, None, None]
    return Ae, b, C, eta, J


def _update(mp, Pp, h, y, R):
    """One exact measurement update (Joseph form) of a predicted state."""
    Ph = Pp @ h
    S = h @ Ph + R
    K = Ph / S if S > 0 else 0.0 * Ph
    IKh = np.eye(len(h)) - np.outer(K, h)
    m = mp + K * (y - h @ mp)
    P = _sym(IKh @ Pp @ IKh.T + np.outer(K, K) * R)
    return m, P


def _filter(A, Q, P0, h, y, R):
    """Filtered means (T, D) and covariances (T, D, D)."""
    T, D = h.shape
    m = np.empty((T, D))
    P = np.empty((T, D, D))
    for k0 in range(0, T, CHUNK):
        k1 = min(T, k0 + CHUNK)
        Qc = Q[k0:k1].copy()
        if k0 == 0:
            Qc[0] = P0
        els = _filter_elements(A[k0:k1], Qc, h[k0:k1], y[k0:k1], R[k0:k1])
        if k0 > 0:
            mp = A[k0] @ m[k0 - 1]
            Pp = A[k0] @ P[k0 - 1] @ A[k0].T + Q[k0]
            mk, Pk = _update(mp, Pp, h[k0], y[k0], R[k0])
            els[0][0] = 0.0
            els[1][0] = mk[:, None]
            els[2][0] = Pk
            els[3][0] = 0.0
            els[4][0] = 0.0
        out = scan(els, _filter_combine)
        m[k0:k1] = out[1][:, :, 0]
        P[k0:k1] = out[2]
    return m, P


# --------------------------------------------------------------------------
# linear recursions (the adjoint, and the mean filter for other right sides)


def _affine_combine(ei, ej):
    """``z → M z + c`` composed: first ``i``, then ``j``."""
    Mi, ci = ei
    Mj, cj = ej
    return Mj @ Mi, Mj @ ci + cj


def _adjoint_combine(ei, ej):
    """``(λ, Λ) → (Bᵀλ + c, BᵀΛB + C)`` composed: first ``i``, then ``j``."""
    Bi, ci, Ci = ei
    Bj, cj, Cj = ej
    Bjt = _t(Bj)
    return Bi @ Bj, Bjt @ ci + cj, _sym(Bjt @ Ci @ Bj + Cj)


def _adjoint(B, c, Cm=None):
    """Backward recursion ``λ_k = B_kᵀ λ_{k+1} + c_k`` (and the matrix one
    ``Λ_k = B_kᵀ Λ_{k+1} B_k + Cm_k`` when ``Cm`` is given), λ_T = 0."""
    T = B.shape[0]
    lam = np.empty_like(c)
    Lam = None if Cm is None else np.empty_like(Cm)
    carry = None
    for k1 in range(T, 0, -CHUNK):
        k0 = max(0, k1 - CHUNK)
        Br = B[k0:k1][::-1]
        cr = c[k0:k1][::-1].copy()
        if Cm is not None:
            Cr = Cm[k0:k1][::-1].copy()
        if carry is not None:
            Bt = B[k1 - 1].T
            cr[0] += Bt @ carry[0]
            if Cm is not None:
                Cr[0] += Bt @ carry[1] @ B[k1 - 1]
        if Cm is None:
            # λ_k = B_kᵀ λ_{k+1} + c_k as z → Mz + c with M = Bᵀ
            _, out = scan((np.ascontiguousarray(_t(Br)), cr), _affine_combine)
            lam[k0:k1] = out[::-1]
            carry = (lam[k0],)
        else:
            _, out, outL = scan((np.ascontiguousarray(Br), cr, Cr), _adjoint_combine)
            lam[k0:k1] = out[::-1]
            Lam[k0:k1] = outL[::-1]
            carry = (lam[k0], Lam[k0])
    return lam, Lam


def _forward_mean(B, G, r):
    """Predicted means ``z_k = B_{k-1} z_{k-1} + G_{k-1} r_{k-1}``, z_0 = 0, for
    right-hand sides r (T, k): (T, D, k)."""
    T, D = G.shape
    z = np.zeros((T, D, r.shape[-1]))
    if T == 1:
        return z
    c = G[:-1, :, None] * r[:-1, None, :]
    M = B[:-1]
    carry = None
    for k0 in range(0, T - 1, CHUNK):
        k1 = min(T - 1, k0 + CHUNK)
        cc = c[k0:k1].copy()
        if carry is not None:
            cc[0] += M[k0] @ carry
        _, out = scan((M[k0:k1], cc), _affine_combine)
        z[k0 + 1 : k1 + 1] = out
        carry = out[-1]
    return z


# --------------------------------------------------------------------------
# the whole pass


class KalmanResult:
    """Everything one filter + adjoint pass computes (numpy, float64).

    Attributes: ``m``, ``P`` filtered moments; ``mp``, ``Pp`` predicted;
    ``S``, ``K``, ``v`` innovations; ``lam``, ``Lam`` the adjoint at the
    predicted state; ``alpha = S⁻¹ r``; ``loglik`` the log marginal
    likelihood of the observed steps (``mask``).
    """


def kalman(A, Q, P0, h, y, R, mask=None):
    """Run the filter, the likelihood and the adjoint over one chain.

    Parameters
    ----------
    A, Q : (T, D, D)
        Transitions into each step (entry 0 unused).
    P0 : (D, D)
        Prior covariance of step 0.
    h : (T, D)
        Observation rows (zero for a step without an observation).
    y, R : (T,)
        Targets (residuals) and noise variances.
    mask : (T,) bool, optional
        Steps that carry an observation (default: all).

    Returns
    -------
    KalmanResult
    """
    T, D = h.shape
    res = KalmanResult()
    res.regular = False
    m, P = _filter(A, Q, P0, h, y, R)
    mp = np.zeros((T, D))
    Pp = np.empty((T, D, D))
    Pp[0] = P0
    if T > 1:
        mp[1:] = (A[1:] @ m[:-1, :, None])[:, :, 0]
        Pp[1:] = _sym(A[1:] @ P[:-1] @ _t(A[1:]) + Q[1:])
    Ph = (Pp @ h[:, :, None])[:, :, 0]
    S = np.einsum("td,td->t", h, Ph) + R
    if mask is None:
        mask = np.ones(T, dtype=bool)
    if np.any(S[mask] <= 0) or not np.all(np.isfinite(S)):
        raise np.linalg.LinAlgError(
            "an innovation variance is not positive: observations without "
            "noise at one time are linearly dependent"
        )
    S = np.where(mask, S, 1.0)
    K = Ph / S[:, None]
    v = y - np.einsum("td,td->t", h, mp)
    res.loglik = float(
        -0.5 * np.sum((v * v / S + np.log(S))[mask])
        - 0.5 * int(mask.sum()) * math.log(2 * math.pi)
    )
    B = np.zeros((T, D, D))
    if T > 1:
        B[:-1] = A[1:] @ (np.eye(D) - K[:-1, :, None] * h[:-1, None, :])
    c = (h * (v / S)[:, None])[:, :, None]
    Cm = h[:, :, None] * h[:, None, :] / S[:, None, None]
    lam, Lam = _adjoint(B, c, Cm)
    res.m, res.P, res.mp, res.Pp = m, P, mp, Pp
    res.S, res.K, res.v, res.B = S, K, v, B
    res.lam, res.Lam = lam[:, :, 0], Lam
    res.A, res.Q, res.h, res.mask = A, Q, h, mask
    lam_hat = np.zeros((T, D))
    Lam_hat = np.zeros((T, D, D))
    if T > 1:
        lam_hat[:-1] = (_t(A[1:]) @ lam[1:])[:, :, 0]
        Lam_hat[:-1] = _t(A[1:]) @ Lam[1:] @ A[1:]
    res.alpha = np.where(mask, v / S - np.einsum("td,td->t", K, lam_hat), 0.0)
    res.Sinv_diag = 1.0 / S + np.einsum("td,tde,te->t", K, Lam_hat, K)
    return res


def gradients(res, P0):
    """∂ℓ/∂A (T, D, D), ∂ℓ/∂Q (T, D, D), ∂ℓ/∂P_0, ∂ℓ/∂y (T,), ∂ℓ/∂R (T,)."""
    lam, Lam = res.lam, res.Lam
    G = lam[:, :, None] * lam[:, None, :] - Lam  # 2 ∂ℓ/∂P⁻
    gQ = 0.5 * G
    gQ[0] = 0.0
    gA = np.zeros_like(G)
    if G.shape[0] > 1:
        gA[1:] = G[1:] @ res.A[1:] @ res.P[:-1] + lam[1:, :, None] * res.m[:-1, None, :]
    gP0 = 0.5 * G[0]
    mask = res.mask
    gy = np.where(mask, -res.alpha, 0.0)
    gR = np.where(mask, 0.5 * (res.alpha**2 - res.Sinv_diag), 0.0)
    return gA, gQ, gP0, gy, gR


def smoothed(res):
    """Smoothed means (T, D) and covariances (T, D, D) at every step."""
    ms = res.mp + (res.Pp @ res.lam[:, :, None])[:, :, 0]
    Ps = _sym(res.Pp - res.Pp @ res.Lam @ res.Pp)
    return ms, Ps


def linear_solve(res, r):
    """``S⁻¹ r`` for right-hand sides r (T, k) with the gains of ``res``."""
    T, D = res.h.shape
    G = np.zeros((T, D))
    if T > 1:
        G[:-1] = (res.A[1:] @ res.K[:-1, :, None])[:, :, 0]
    z = _forward_mean(res.B, G, r)  # (T, D, k)
    v = r - np.einsum("td,tdk->tk", res.h, z)
    c = res.h[:, :, None] * (v / res.S[:, None])[:, None, :]
    lam, _ = _adjoint(res.B, c)
    lam_hat = np.zeros_like(lam)
    if T > 1:
        lam_hat[:-1] = _t(res.A[1:]) @ lam[1:]
    out = v / res.S[:, None] - np.einsum("td,tdk->tk", res.K, lam_hat)
    return np.where(res.mask[:, None], out, 0.0)


# --------------------------------------------------------------------------
# regular series: steady state


def const_recurrence(M, z0, c, block=16):
    """``z_{j+1} = M z_j + c_j`` for j = 0 … J−1: returns z_1 … z_J (J, D).

    A constant-coefficient recursion in blocks of ``block`` steps: inside a
    block the response is one matrix product with the block-Toeplitz matrix
    of the powers ``M^i`` (BLAS), the block starts follow the same recursion
    with ``M^block`` (recursively), so the Python loop is over
    ``J / block^depth`` steps only. Powers of a stable ``M`` cannot grow.

    Parameters
    ----------
    M : (D, D)
    z0 : (D,)
    c : (J, D)
    """
    J, D = c.shape
    if J <= 2 * block:
        out = np.empty_like(c)
        z = z0
        for j in range(J):
            z = M @ z + c[j]
            out[j] = z
        return out
    L = block
    nb = -(-J // L)
    if nb * L == J:
        cb = c.reshape(nb, L * D)
    else:
        cb = np.zeros((nb, L * D))
        cb.reshape(-1)[: J * D] = c.reshape(-1)
    powers = [np.eye(D)]
    for _ in range(L):
        powers.append(M @ powers[-1])
    W = np.zeros((L * D, L * D))
    for j in range(L):
        for i in range(j + 1):
            W[j * D : (j + 1) * D, i * D : (i + 1) * D] = powers[j - i]
    # zero-state response inside every block: row b is (z_{bL+1} … z_{bL+L})
    return _add_free_response(cb @ W.T, powers, z0, block, J)


def _add_free_response(out, powers, z0, block, J):
    """Blocks' zero-state responses ``out`` (nb, L·D) plus their free
    responses ``M^{i+1} s_b`` from the block starts, which follow
    ``s_{b+1} = M^L s_b + (zero-state end of block b)``: z_1 … z_J (J, D)."""
    nb = out.shape[0]
    L, D = len(powers) - 1, powers[0].shape[0]
    starts = np.empty((nb, D))
    starts[0] = z0
    if nb > 1:
        starts[1:] = const_recurrence(powers[L], z0, out[:-1, (L - 1) * D :], block)
    out += starts @ np.concatenate(powers[1:], axis=0).T
    return out.reshape(nb * L, D)[:J]


def const_recurrence_rank1(M, z0, u, s, block=16):
    """``z_{j+1} = M z_j + u s_j`` for j = 0 … J−1 (a fixed direction ``u``
    (D,) driven by the scalars ``s`` (J,)): returns z_1 … z_J (J, D).

    :func:`const_recurrence` with the block matrix applied to ``u`` once: the
    zero-state response of a block is ``s_block @ V`` with
    ``V[l, i] = M^{i−l} u`` (l ≤ i), D times fewer operations.
    """
    J = s.shape[0]
    D = u.shape[0]
    if J <= 2 * block:
        return const_recurrence(M, z0, s[:, None] * u)
    L = block
    nb = -(-J // L)
    if nb * L == J:
        sb = s.reshape(nb, L)
    else:
        sb = np.zeros((nb, L))
        sb.reshape(-1)[:J] = s
    powers = [np.eye(D)]
    for _ in range(L):
        powers.append(M @ powers[-1])
    pu = [p @ u for p in powers[:L]]
    V = np.zeros((L, L * D))
    for i in range(L):
        for l in range(i + 1):
            V[l, i * D : (i + 1) * D] = pu[i - l]
    return _add_free_response(sb @ V, powers, z0, block, J)


def _converged(new, old, tol):
    return np.max(np.abs(new - old)) <= tol * max(np.max(np.abs(new)), 1e-300)


class Piecewise:
    """A sequence of T equal-shaped arrays stored as its first rows (``head``),
    one value repeated in the middle (``mid``) and its last rows (``tail``).

    The covariances of a regular series are constant away from its ends, so
    they cost O(transient) memory instead of O(T).
    """

    def __init__(self, T, head, mid, tail=None):
        self.T = T
        self.head = head
        self.mid = mid
        self.tail = head[:0] if tail is None else tail
        self.nh, self.nt = len(head), len(self.tail)
        if self.nh + self.nt > T:
            raise ValueError("head and tail overlap")

    @property
    def shape(self):
        return (self.T,) + self.mid.shape

    def full(self):
        """The whole (T, …) array."""
        out = np.empty(self.shape)
        out[: self.nh] = self.head
        out[self.nh : self.T - self.nt] = self.mid
        out[self.T - self.nt :] = self.tail
        return out

    def take(self, idx):
        """Rows ``idx`` (integer array, (m,)): (m, …)."""
        idx = np.asarray(idx)
        out = np.empty(idx.shape + self.mid.shape)
        out[...] = self.mid
        h = idx < self.nh
        out[h] = self.head[idx[h]]
        t = idx >= self.T - self.nt
        out[t] = self.tail[idx[t] - (self.T - self.nt)]
        return out

    def matvec(self, idx, x):
        """``M_idx x`` for rows ``idx`` (m,) of a matrix sequence and x (m, D)."""
        idx = np.asarray(idx)
        out = x @ self.mid.T
        for sel, rows in (
            (idx < self.nh, lambda i: self.head[i]),
            (idx >= self.T - self.nt, lambda i: self.tail[i - (self.T - self.nt)]),
        ):
            if np.any(sel):
                out[sel] = np.einsum("mij,mj->mi", rows(idx[sel]), x[sel])
        return out

    def sum(self, lo=0, hi=None):
        """Sum over rows ``lo ≤ k < hi``."""
        hi = self.T if hi is None else hi
        nh, t0 = self.nh, self.T - self.nt
        out = self.head[min(lo, nh) : min(hi, nh)].sum(0)
        out = out + max(0, min(hi, t0) - max(lo, nh)) * self.mid
        return out + self.tail[max(lo, t0) - t0 : max(hi, t0) - t0].sum(0)


def _materialized(name):
    """A property: the whole (T, …) array of the :class:`Piecewise` ``name_pw``,
    built once."""

    def get(self):
        cache = self.__dict__.setdefault("_cache", {})
        if name not in cache:
            cache[name] = getattr(self, name + "_pw").full()
        return cache[name]

    return property(get)


class RegularResult:
    """:func:`kalman_regular`'s result: :class:`KalmanResult`'s attributes,
    with the covariances, gains and transitions kept as :class:`Piecewise`
    (``P_pw``, ``Pp_pw``, ``Lam_pw``, ``S_pw``, ``K_pw``, ``B_pw``); reading
    ``P``, ``Lam``, … builds the whole (T, …) arrays."""

    regular = True

    P = _materialized("P")
    Pp = _materialized("Pp")
    Lam = _materialized("Lam")
    S = _materialized("S")
    K = _materialized("K")
    B = _materialized("B")

    @property
    def A(self):
        return np.broadcast_to(self.A1, (self.T,) + self.A1.shape)

    @property
    def Q(self):
        return np.broadcast_to(self.Q1, (self.T,) + self.Q1.shape)

    @property
    def h(self):
        return np.broadcast_to(self.h1, (self.T, self.h1.shape[0]))

    @property
    def mask(self):
        return np.ones(self.T, dtype=bool)

    def logdet(self):
        return float(np.sum(np.log(self.S_pw.head))) + float(
            (self.T - self.S_pw.nh) * np.log(self.S_pw.mid)
        )


def _first_converged(X, tol):
    """The first k ≥ 2 with ``X_k`` equal to ``X_{k−1}`` to ``tol`` relative
    (largest entry), or None; ``X`` (L, …)."""
    if len(X) < 3:
        return None
    flat = X.reshape(len(X), -1)
    d = np.max(np.abs(flat[1:] - flat[:-1]), axis=1)
    s = np.maximum(np.max(np.abs(flat[1:]), axis=1), 1e-300)
    ok = d <= tol * s
    ok[0] = False
    idx = np.flatnonzero(ok)
    return int(idx[0]) + 1 if idx.size else None


def _forward_transient(A1, Q1, P0, h1, R1, T, tol, max_transient, first=256):
    """Filtered and predicted covariances, innovation variances and gains of
    the first steps of a regular series, up to the step where they have
    converged (by the filter's scan, on chunks growing fourfold): arrays
    ``(n, …)`` with n ≤ T, or None when not converged within
    ``max_transient`` steps."""
    D = h1.shape[0]
    L = min(T, max(first, 16))
    while True:
        _, P = _filter(
            np.broadcast_to(A1, (L, D, D)),
            np.broadcast_to(Q1, (L, D, D)),
            P0,
            np.broadcast_to(h1, (L, D)),
            np.zeros(L),
            np.full(L, R1),
        )
        Pp = np.empty_like(P)
        Pp[0] = P0
        Pp[1:] = _sym(A1 @ P[:-1] @ A1.T + Q1)
        k = _first_converged(np.concatenate([P, Pp], axis=1), tol)
        if k is not None:
            P, Pp = P[: k + 1], Pp[: k + 1]
            break
        if L >= T:
            break
        if L >= max_transient:
            return None
        L = min(T, 4 * L)
    S = np.einsum("d,kde,e->k", h1, Pp, h1) + R1
    if not np.all(S > 0):
        raise np.linalg.LinAlgError("an innovation variance is not positive")
    return P, Pp, S, (Pp @ h1) / S[:, None]


def _tail_adjoint(Bss, C_mid, C_end, n, tol):
    """``Λ`` of the last steps of a regular series, backwards from
    ``Λ_{T−1} = C_end`` by ``Λ_k = BᵀΛ_{k+1}B + C_mid`` for at most ``n``
    steps, until it converges: Λ_{T−1−j} … Λ_{T−1} (j + 1, D, D), and
    whether it converged. ``vec(BᵀΛB) = (Bᵀ⊗Bᵀ) vec(Λ)`` makes it a
    constant-coefficient linear recursion (:func:`const_recurrence`)."""
    D = Bss.shape[0]
    M = np.kron(Bss.T, Bss.T)
    L = min(n, 256)
    while True:
        c = np.broadcast_to(C_mid.reshape(-1), (L, D * D))
        xs = const_recurrence(M, C_end.reshape(-1), c).reshape(L, D, D)
        seq = np.concatenate([C_end[None], _sym(xs)])
        k = _first_converged(seq, tol)
        if k is not None:
            return seq[: k + 1][::-1], True
        if L >= n:
            return seq[::-1], False
        L = min(n, 4 * L)


def kalman_regular(A, Q, P0, h, y, R, tol=1e-15, max_transient=1 << 16, hint=256):
    """:func:`kalman` for a regular series: one step ``A[1]``, ``Q[1]``, one
    observation row ``h[0]`` and noise ``R[0]`` at every step.

    The covariance recursions (filter forwards, adjoint backwards) are run
    only until they reach their fixed point to ``tol`` relative (the Riccati
    recursion converges geometrically), by scans over their first and last
    steps, and are stored as :class:`Piecewise`; from there every gain is
    constant and the mean recursions are constant-coefficient linear
    recursions, solved blockwise by :func:`const_recurrence`. Returns a
    :class:`RegularResult`, or None when the covariances have not converged
    within ``max_transient`` steps (use :func:`kalman`). ``hint``: the
    expected length of the transient (the first scan's length; a previous
    pass's, in a fit).
    """
    T, D = h.shape
    A1, Q1, h1, R1 = np.array(A[1 if T > 1 else 0]), np.array(Q[-1]), h[0], float(R[0])
    I = np.eye(D)
    tr = _forward_transient(A1, Q1, P0, h1, R1, T, tol, max_transient, hint)
    if tr is None:
        return None
    # steps 0 … nh−1 carry their own covariances, later ones the last
    P_pw, Pp_pw, S_pw, K_pw = (Piecewise(T, x, x[-1]) for x in tr)
    nh = P_pw.nh
    Kh, Kss, Sh, Sss = K_pw.head, K_pw.mid, S_pw.head, float(S_pw.mid)
    Bh = A1 @ (I - Kh[:, :, None] * h1[None, None, :])  # (nh, D, D)
    Bss = A1 @ (I - np.outer(Kss, h1))
    # forward means: mp_{k+1} = B_k mp_k + A K_k y_k
    AK = Kss @ A1.T
    mp = np.zeros((T, D))
    stop = min(nh, T - 1)
    if stop:
        g = y[:stop, None] * (Kh[:stop] @ A1.T)
        _, zs = scan((Bh[:stop], g[:, :, None]), _affine_combine)
        mp[1 : stop + 1] = zs[:, :, 0]
    if T - 1 > stop:
        mp[stop + 1 :] = const_recurrence_rank1(Bss, mp[stop], AK, y[stop : T - 1])
    v = y - mp @ h1
    Sinv = np.full(T, 1.0 / Sss)
    Sinv[:nh] = 1.0 / Sh
    w = v * Sinv
    m = mp + v[:, None] * Kss
    m[:nh] = mp[:nh] + v[:nh, None] * Kh
    # backward adjoint: λ_k = B_kᵀ λ_{k+1} + h v_k/S_k,
    # Λ_k = B_kᵀ Λ_{k+1} B_k + hhᵀ/S_k (B_{T−1} = 0)
    hh = np.outer(h1, h1)
    # Λ on steps ≥ stop (constant B and S) backwards from the end, until it
    # converges: the tail holds the last steps, the middle repeats its first
    tail, _ = _tail_adjoint(Bss, hh / Sss, hh * Sinv[T - 1], T - 1 - stop, tol)
    # λ: constant coefficients on [stop, T−2]
    lam = np.empty((T, D))
    lam[T - 1] = h1 * w[T - 1]
    if T - 2 >= stop:
        ws = np.ascontiguousarray(w[stop : T - 1][::-1])
        lam[stop : T - 1] = const_recurrence_rank1(Bss.T, lam[T - 1], h1, ws)[::-1]
    # the head, steps 0 … stop−1, from λ_stop and Λ_stop (the chain ends there)
    Bx = np.concatenate([Bh[:stop], np.zeros((1, D, D))])
    cx = np.concatenate([h1 * w[:stop, None], lam[stop][None]])[:, :, None]
    Cx = np.concatenate([hh * Sinv[:stop, None, None], tail[:1]])
    lam_h, Lam_h = _adjoint(Bx, cx, Cx)
    lam[:stop] = lam_h[:stop, :, 0]
    Lam_pw = Piecewise(T, Lam_h[:stop], tail[0], tail)
    res = RegularResult()
    res.T, res.A1, res.Q1, res.h1 = T, A1, Q1, h1
    B_pw = Piecewise(T, Bh[:stop], Bss, np.zeros((1, D, D)) if stop < T else None)
    if stop == T:  # every step in the head: the last one has no transition
        B_pw.head = B_pw.head.copy()
        B_pw.head[-1] = 0.0
    res.m, res.mp, res.v, res.lam = m, mp, v, lam
    res.P_pw, res.Pp_pw, res.S_pw, res.K_pw = P_pw, Pp_pw, S_pw, K_pw
    res.Lam_pw, res.B_pw = Lam_pw, B_pw
    res.loglik = float(
        -0.5 * np.dot(v, w) - 0.5 * res.logdet() - 0.5 * T * math.log(2 * math.pi)
    )
    # S⁻¹r = v/S − K_k·(Aᵀλ_{k+1}); diag S⁻¹ = 1/S_k + (AK_k)ᵀ Λ_{k+1} (AK_k)
    res.alpha = w.copy()
    if T > 1:
        res.alpha[:-1] -= lam[1:] @ (A1 @ Kss)
        n1 = min(nh, T - 1)
        res.alpha[:n1] += lam[1 : n1 + 1] @ (A1 @ Kss) - np.einsum(
            "td,td->t", Kh[:n1], lam[1 : n1 + 1] @ A1
        )
    # constant between the head and the tail: computed there once
    res.Sinv_diag = np.full(T, 1.0 / Sss + AK @ Lam_pw.mid @ AK)
    res.Sinv_diag[T - 1] = Sinv[T - 1]
    ks = np.union1d(np.arange(min(nh, T - 1)), np.arange(T - 1 - Lam_pw.nt, T - 1))
    ks = ks[(ks >= 0) & (ks < T - 1)]
    if ks.size:
        u = np.where((ks < nh)[:, None], K_pw.take(ks) @ A1.T, AK)
        Lu = Lam_pw.matvec(ks + 1, u)
        res.Sinv_diag[ks] = Sinv[ks] + np.einsum("td,td->t", u, Lu)
    return res


def gradient_sums(res, P0):
    """For a regular series (one ``A``, ``Q`` for every step ≥ 1): ``Σ_k ∂ℓ/∂A_k``
    and ``Σ_k ∂ℓ/∂Q_k`` over k ≥ 1, ``∂ℓ/∂P_0``, ``∂ℓ/∂y`` and ``∂ℓ/∂R``, with
    matrix products over the series done as single (D, T) × (T, D) products.

    ``Σ_k G_k A P_{k−1}`` with ``G_k = λ_kλ_kᵀ − Λ_k`` splits into
    ``Σ λ_k (λ_kᵀ A P_{k−1})`` and ``Σ Λ_k A P_{k−1}``; ``P_{k−1}`` is
    constant after the head of :class:`Piecewise` rows.
    """
    lam, Lam = res.lam, res.Lam_pw
    A1, T = res.A1, res.T
    P = res.P_pw
    nh = P.nh
    APh = A1 @ P.head  # (nh, D, D)
    APss = A1 @ P.mid
    # k = 1 … min(nh, T−1): P_{k−1} from the head; k > nh: the constant
    k1 = min(nh, T - 1)
    ks = np.arange(1, k1 + 1)
    lh = lam[1 : k1 + 1]
    sum_gA = lh.T @ np.einsum("td,tde->te", lh, APh[ks - 1])
    sum_gA -= np.einsum("tde,tef->df", Lam.take(ks), APh[ks - 1])
    if T - 1 > k1:
        lt = lam[k1 + 1 :]
        sum_gA += (lt.T @ lt) @ APss - Lam.sum(k1 + 1, T) @ APss
    sum_gA += lam[1:].T @ res.m[:-1]
    sum_gQ = 0.5 * (lam[1:].T @ lam[1:] - Lam.sum(1, T))
    L0 = Lam.take(np.array([0]))[0]
    gP0 = 0.5 * (np.outer(lam[0], lam[0]) - L0)
    return sum_gA, sum_gQ, gP0, -res.alpha, 0.5 * (res.alpha**2 - res.Sinv_diag)
