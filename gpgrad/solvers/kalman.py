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

import math

import numpy as np

__all__ = ["scan", "KalmanResult", "kalman", "linear_solve"]

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


def const_recurrence(M, z0, c, block=32):
    """``z_{j+1} = M z_j + c_j`` for j = 0 … J−1: returns z_1 … z_J (J, D, k).

    A constant-coefficient recursion in blocks of ``block`` steps: inside a
    block the response is one matrix product with the block-Toeplitz matrix
    of the powers ``M^i`` (BLAS), the block starts follow the same recursion
    with ``M^block`` (recursively), so the Python loop is over
    ``J / block^depth`` steps only. Powers of a stable ``M`` cannot grow.
    """
    J, D, k = c.shape
    if J <= block:
        out = np.empty_like(c)
        z = z0
        for j in range(J):
            z = M @ z + c[j]
            out[j] = z
        return out
    L = block
    nb = -(-J // L)
    cp = np.zeros((nb * L, D, k))
    cp[:J] = c
    powers = [np.eye(D)]
    for _ in range(L):
        powers.append(M @ powers[-1])
    W = np.zeros((L * D, L * D))
    for j in range(L):
        for i in range(j + 1):
            W[j * D : (j + 1) * D, i * D : (i + 1) * D] = powers[j - i]
    # zero-state response inside every block: (L·D, L·D) @ (L·D, nb·k)
    cb = cp.reshape(nb, L * D, k).transpose(1, 0, 2).reshape(L * D, nb * k)
    zs = (W @ cb).reshape(L, D, nb, k)
    # block starts: s_{b+1} = M^L s_b + zs[L−1, :, b]
    ends = np.ascontiguousarray(zs[L - 1].transpose(1, 0, 2))  # (nb, D, k)
    starts = np.empty((nb, D, k))
    starts[0] = z0
    if nb > 1:
        starts[1:] = const_recurrence(powers[L], z0, ends[:-1], block)
    # free response M^{j+1} s_b
    Pw = np.stack(powers[1:])  # (L, D, D)
    free = np.einsum("jde,bek->jdbk", Pw, starts)
    out = (zs + free).transpose(2, 0, 1, 3).reshape(nb * L, D, k)
    return out[:J]


def _converged(new, old, tol):
    return np.max(np.abs(new - old)) <= tol * max(np.max(np.abs(new)), 1e-300)


def kalman_regular(A, Q, P0, h, y, R, tol=1e-15, max_transient=20000):
    """:func:`kalman` for a regular series: one step ``A[1]``, ``Q[1]``, one
    observation row ``h[0]`` and noise ``R[0]`` at every step.

    The covariance recursions (filter forwards, adjoint backwards) are run
    step by step only until they reach their fixed point to ``tol`` relative
    (the Riccati recursion converges geometrically); from there every gain is
    constant and the mean recursions are constant-coefficient linear
    recursions, solved blockwise by :func:`const_recurrence`. Returns None
    when the covariances have not converged within ``max_transient`` steps
    (use :func:`kalman`).
    """
    T, D = h.shape
    A1, Q1, h1, R1 = A[1], Q[1], h[0], float(R[0])
    I = np.eye(D)
    # forward covariance transient
    Pp_l, P_l, S_l, K_l = [], [], [], []
    Pp = P0
    kc = None
    for k in range(min(T, max_transient)):
        if k > 0:
            Pp = _sym(A1 @ P_l[-1] @ A1.T + Q1)
        Ph = Pp @ h1
        S = float(h1 @ Ph) + R1
        if not S > 0:
            raise np.linalg.LinAlgError("an innovation variance is not positive")
        K = Ph / S
        IKh = I - np.outer(K, h1)
        P = _sym(IKh @ Pp @ IKh.T + np.outer(K, K) * R1)
        Pp_l.append(Pp)
        P_l.append(P)
        S_l.append(S)
        K_l.append(K)
        if k >= 2 and _converged(P, P_l[-2], tol) and _converged(Pp, Pp_l[-2], tol):
            kc = k
            break
    if kc is None:
        if len(P_l) < T:
            return None
        kc = T - 1
    n_tr = kc + 1
    Pp = np.empty((T, D, D))
    P = np.empty((T, D, D))
    S = np.empty(T)
    K = np.empty((T, D))
    Pp[:n_tr], P[:n_tr], S[:n_tr], K[:n_tr] = Pp_l, P_l, S_l, K_l
    Pp[n_tr:], P[n_tr:], S[n_tr:], K[n_tr:] = Pp_l[-1], P_l[-1], S_l[-1], K_l[-1]
    B = np.empty((T, D, D))
    nb = min(n_tr, T - 1)
    B[:nb] = A1 @ (I - K[:nb, :, None] * h1[None, None, :])
    B[nb:] = A1 @ (I - np.outer(K[-1], h1))
    B[-1] = 0.0
    # forward means: mp_{k+1} = B_k mp_k + A K_k y_k
    mp = np.zeros((T, D))
    g = (A1 @ K[:, :, None])[:, :, 0] * y[:, None]
    z = np.zeros(D)
    stop = min(n_tr, T - 1)
    for k in range(stop):
        z = B[k] @ z + g[k]
        mp[k + 1] = z
    if T - 1 > stop:
        mp[stop + 1 :] = const_recurrence(
            B[stop], mp[stop][:, None], g[stop : T - 1, :, None]
        )[:, :, 0]
    v = y - mp @ h1
    m = mp + K * v[:, None]
    # backward adjoint: λ_k = B_kᵀ λ_{k+1} + h v_k/S_k, Λ_k = B_kᵀ Λ_{k+1} B_k + hhᵀ/S_k
    c = h1[None, :] * (v / S)[:, None]
    hh = np.outer(h1, h1)
    lam = np.empty((T, D))
    Lam = np.empty((T, D, D))
    lam[T - 1], Lam[T - 1] = c[T - 1], hh / S[T - 1]
    k = T - 2
    # Λ's transient at the end, step by step until it converges
    while k >= n_tr:
        Lam[k] = _sym(B[k].T @ Lam[k + 1] @ B[k] + hh / S[k])
        if _converged(Lam[k], Lam[k + 1], tol):
            Lam[n_tr:k] = Lam[k]
            break
        k -= 1
    for j in range(min(n_tr, T - 1) - 1, -1, -1):
        Lam[j] = _sym(B[j].T @ Lam[j + 1] @ B[j] + hh / S[j])
    # λ: constant coefficients on [n_tr, T−2], step by step before
    if T - 2 >= n_tr:
        cr = c[n_tr : T - 1][::-1, :, None]
        lam[n_tr : T - 1] = const_recurrence(B[n_tr].T, lam[T - 1][:, None], cr)[
            ::-1, :, 0
        ]
    for j in range(min(n_tr, T - 1) - 1, -1, -1):
        lam[j] = B[j].T @ lam[j + 1] + c[j]
    res = KalmanResult()
    res.regular = True
    mask = np.ones(T, dtype=bool)
    res.loglik = float(
        -0.5 * np.sum(v * v / S + np.log(S)) - 0.5 * T * math.log(2 * math.pi)
    )
    hs = np.broadcast_to(h1, (T, D))
    res.m, res.P, res.mp, res.Pp = m, P, mp, Pp
    res.S, res.K, res.v, res.B = S, K, v, B
    res.lam, res.Lam = lam, Lam
    res.A, res.Q, res.h, res.mask = A, Q, hs, mask
    lam_hat = np.zeros((T, D))
    lam_hat[:-1] = lam[1:] @ A1
    res.alpha = v / S - np.einsum("td,td->t", K, lam_hat)
    u = K[:-1] @ A1.T  # A K_k
    res.Sinv_diag = 1.0 / S
    res.Sinv_diag[:-1] += np.einsum("td,tde,te->t", u, Lam[1:], u)
    return res


def gradient_sums(res, P0):
    """For a regular series (one ``A``, ``Q`` for every step ≥ 1): ``Σ_k ∂ℓ/∂A_k``
    and ``Σ_k ∂ℓ/∂Q_k`` over k ≥ 1, ``∂ℓ/∂P_0``, ``∂ℓ/∂y`` and ``∂ℓ/∂R``, with
    matrix products over the series done as single (D, T) × (T, D) products.

    ``Σ_k G_k A P_{k−1}`` with ``G_k = λ_kλ_kᵀ − Λ_k`` splits into
    ``Σ λ_k (λ_kᵀ A P_{k−1})`` and ``Σ Λ_k A P_{k−1}``.
    """
    lam, Lam = res.lam, res.Lam
    A1 = res.A[1]
    T = lam.shape[0]
    AP = A1 @ res.P[:-1]  # (T−1, D, D): transient plus a constant
    w = np.einsum("td,tde->te", lam[1:], AP)  # λ_kᵀ A P_{k−1}
    sum_gA = lam[1:].T @ w - np.einsum("tde,tef->df", Lam[1:], AP)
    sum_gA += lam[1:].T @ res.m[:-1]
    sum_gQ = 0.5 * (lam[1:].T @ lam[1:] - Lam[1:].sum(0))
    gP0 = 0.5 * (np.outer(lam[0], lam[0]) - Lam[0])
    del T
    return sum_gA, sum_gQ, gP0, -res.alpha, 0.5 * (res.alpha**2 - res.Sinv_diag)
