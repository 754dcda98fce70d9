"""Exact state-space inference for 1-D Matérn kernels, in linear time.

A Matérn kernel with ν = p + ½ is the covariance of the stationary solution of
the linear SDE ``(d/dt + λ)^{p+1} f = w``, ``λ = √(2ν)/ℓ`` (Hartikainen &
Särkkä 2010), whose state is ``(f, f′, …, f⁽ᵖ⁾)``. Sums of such kernels (each
with its ``Scale``) and a ``Constant`` stack their states. Between two times
``Δ`` apart the state moves by

.. math::

    A(Δ) = e^{FΔ} = e^{-λΔ} \\sum_{j=0}^{p} \\frac{(NλΔ)^j}{j!},\\qquad
    Q(Δ) = P_∞ - A P_∞ A^\\top ,

with ``F`` the companion matrix and ``N = F/λ + I`` nilpotent (exact, and exactly
``I`` and ``0`` at ``Δ = 0``); ``P_∞`` is the stationary covariance, the
kernel's derivatives at 0. Values, first and second derivatives are rows of
the state. :mod:`gpgrad.solvers.kalman` filters, smooths and differentiates
the chain in O(n) over associative scans.

Coordinates: component ``i`` of a block is ``f⁽ⁱ⁾ / λ₀ⁱ`` with ``λ₀`` the
current numerical value of ``λ``, so the arrays stay near unit scale and the
observation rows do not depend on the hyperparameters (torch autograd reaches
``λ`` through ``A`` and ``P_∞``).
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend as B
from ..kernels.composite import Constant, Scale, Sum
from ..kernels.stationary import Matern12, Matern32, Matern52, Matern72
from . import kalman
from .base import Solver

__all__ = [
    "StateSpaceSolver",
    "statespace_solver",
    "statespace_unsupported_reason",
    "FULL_COV_MAX_ELEMENTS",
    "FitLikelihood",
    "fit_likelihood",
]

#: p of ν = p + ½ for each supported Matérn kernel
_MATERN_P = {Matern12: 0, Matern32: 1, Matern52: 2, Matern72: 3}
#: the profile polynomial c(u) of k = σ² e^{-u} c(u), u = λ|τ|, ascending
_POLY = {
    0: (1.0,),
    1: (1.0, 1.0),
    2: (1.0, 1.0, 1.0 / 3.0),
    3: (1.0, 1.0, 2.0 / 5.0, 1.0 / 15.0),
}
#: series at least this long on a regular grid take the steady-state path
#: (:func:`gpgrad.solvers.kalman.kalman_regular`)
REGULAR_MIN_STEPS = 256
#: steps equal to this relative tolerance count as one step (a grid
#: ``t₀ + kΔ`` written in floating point); the grid is then snapped to it
REGULAR_STEP_RTOL = 1e-9
#: marginal queries are answered this many at a time
QUERY_CHUNK = 1 << 20
#: largest (observations × query entries) cross-covariance a joint
#: ``full_cov`` query may build
FULL_COV_MAX_ELEMENTS = 20_000_000


# --------------------------------------------------------------------------
# kernels as stochastic differential equations


def _unit_pinf(p):
    """Stationary covariance of ``(f, f′/λ, …, f⁽ᵖ⁾/λᵖ)`` for unit variance."""
    c = np.array(_POLY[p] + (0.0,) * (p + 1))
    d0 = []
    for _ in range(2 * p + 1):
        d0.append(c[0])
        dc = np.append(c[1:] * np.arange(1, len(c)), 0.0)
        c = dc - c
    P = np.zeros((p + 1, p + 1))
    for i in range(p + 1):
        for j in range(p + 1):
            if (i + j) % 2 == 0:
                P[i, j] = (-1) ** j * d0[i + j]
    return P


def _nilpotent(p):
    """``N = F/λ + I`` for the companion matrix ``F`` of ``(d/dt + λ)^{p+1}``."""
    F = np.zeros((p + 1, p + 1))
    F[np.arange(p), np.arange(1, p + 1)] = 1.0
    F[p] = [-math.comb(p + 1, i) for i in range(p + 1)]
    return F + np.eye(p + 1)


class _Part:
    """One block of the state: a Matérn (``p``) or a constant (``p = None``),
    with its variance and lengthscale as given (float, array or tensor)."""

    def __init__(self, p, variance, lengthscale=None):
        self.p = p
        self.variance = variance
        self.lengthscale = lengthscale

    @property
    def size(self):
        return 1 if self.p is None else self.p + 1


def _parts(kernel, scale=1.0):
    """The kernel as a list of :class:`_Part`, or a reason string."""
    if isinstance(kernel, Sum):
        out = []
        for child in kernel.children:
            sub = _parts(child, scale)
            if isinstance(sub, str):
                return sub
            out.extend(sub)
        return out
    if isinstance(kernel, Scale):
        return _parts(kernel.children[0], scale * kernel.scale)
    if isinstance(kernel, Constant):
        return [_Part(None, scale * kernel.variance)]
    p = _MATERN_P.get(type(kernel))
    if p is None:
        return (
            f"{type(kernel).__name__} has no exact state-space form (supported: "
            "Matern12/32/52/72, their Scale, sums of them and Constant)"
        )
    ls = kernel.lengthscale
    if not isinstance(ls, float) and int(np.prod(tuple(ls.shape)[-1:])) != 1:
        return "the state-space solver takes one lengthscale (1-D inputs)"
    return [_Part(p, scale * kernel.variance, ls)]


def statespace_unsupported_reason(kernel, blocks):
    """Why the state-space solver cannot take this problem (None if it can)."""
    if blocks[0].d != 1:
        return f"the state-space solver needs 1-D inputs, got {blocks[0].d} columns"
    parts = _parts(kernel)
    if isinstance(parts, str):
        return parts
    if all(p.p is None for p in parts):
        return "the state-space solver needs at least one Matérn part"
    return None


def _member(value, b, batch, trailing=0):
    """Batch member ``b`` of a hyperparameter (scalar or (*batch, [1]))."""
    if isinstance(value, (int, float)):
        return value
    shape = tuple(value.shape)
    core = shape[len(shape) - trailing :] if trailing else ()
    lead = shape[: len(shape) - trailing] if trailing else shape
    if not lead:
        v = value
    else:
        full = tuple(batch) + core
        v = value.expand(full) if B.is_tensor(value) else np.broadcast_to(value, full)
        v = v[b] if b != () else v
    if trailing:
        v = v.reshape(()) if B.is_tensor(v) else np.reshape(v, ())
    return v


class _Model:
    """Transitions of one problem's state (numpy, float64), and the chain rule
    from the gradients in ``A``, ``Q``, ``P_∞`` to each part's ``λ`` and
    variance."""

    def __init__(self, parts):
        self.parts = parts
        self.sizes = [p.size for p in parts]
        self.D = sum(self.sizes)
        self.lam0, self.var0 = [], []
        for part in parts:
            self.var0.append(_num(part.variance))
            if part.p is None:
                self.lam0.append(None)
            else:
                self.lam0.append(math.sqrt(2 * part.p + 1) / _num(part.lengthscale))

    def _slices(self):
        off = 0
        for part, lam, var in zip(self.parts, self.lam0, self.var0):
            yield part, lam, var, slice(off, off + part.size)
            off += part.size

    def rows(self, order, coef):
        """Observation rows (n, D) for entries of derivative ``order`` (n,)
        with coefficients ``coef`` (n,)."""
        H = np.zeros((len(order), self.D))
        for part, lam, _, sl in self._slices():
            if part.p is None:
                H[:, sl.start] = np.where(order == 0, coef, 0.0)
            else:
                for o in range(min(part.p, 2) + 1):
                    H[:, sl.start + o] = np.where(order == o, coef * lam**o, 0.0)
        return H

    @staticmethod
    def _unit_transition(p, tau):
        """``e^{F̃τ}`` (T, p+1, p+1) in the f⁽ⁱ⁾/λⁱ coordinates."""
        Nm = _nilpotent(p)
        out = np.zeros((tau.shape[0], p + 1, p + 1))
        Nj = np.eye(p + 1)
        for j in range(p + 1):
            out += (tau**j / math.factorial(j))[:, None, None] * Nj
            Nj = Nj @ Nm
        return np.exp(-tau)[:, None, None] * out

    def transitions(self, dt):
        """``A(Δ)``, ``Q(Δ)`` (T, D, D) and ``P_∞`` (D, D) for steps ``dt``."""
        T = dt.shape[0]
        A = np.zeros((T, self.D, self.D))
        Pinf = np.zeros((self.D, self.D))
        for part, lam, var, sl in self._slices():
            if part.p is None:
                A[:, sl, sl] = 1.0
                Pinf[sl, sl] = var
            else:
                A[:, sl, sl] = self._unit_transition(part.p, lam * dt)
                Pinf[sl, sl] = var * _unit_pinf(part.p)
        Q = Pinf - A @ Pinf @ np.swapaxes(A, -1, -2)
        return A, 0.5 * (Q + np.swapaxes(Q, -1, -2)), Pinf

    def chain_regular(self, step, A1, Q1, Pinf, sum_gA, sum_gQ, gP0):
        """:meth:`chain` for a regular series from the sums over steps of the
        gradients in ``A`` and ``Q`` (every step has the same ``A``, ``Q``)."""
        return self.chain(
            np.array([step]), A1[None], Q1[None], Pinf, sum_gA[None], sum_gQ[None], gP0
        )

    def chain(self, dt, A, Q, Pinf, gA, gQ, gP0):
        """``(∂ℓ/∂λ, ∂ℓ/∂σ²)`` per part (``None`` for a constant's λ) from
        the gradients in every ``A_k``, ``Q_k`` and ``P_0 = P_∞``.

        In the f⁽ⁱ⁾/λ₀ⁱ coordinates (``E = diag(0, 1, …, p)``, ``F̃`` the
        unit-rate feedback matrix, ``W = −(F̃P_∞ + P_∞F̃ᵀ)`` the diffusion):

        .. math::

            ∂A/∂λ = Δ F̃A + [E, A]/λ,\\quad
            ∂Q/∂λ = Δ A W A^\top + (EQ + QE)/λ,\\quad
            ∂P_∞/∂λ = (EP_∞ + P_∞E)/λ,

        and ``Q``, ``P_∞`` are proportional to σ². Written this way (never as
        the difference ``∂P_∞ − ∂(AP_∞Aᵀ)``) no term cancels at small steps.
        """
        out = []
        for part, lam, var, sl in self._slices():
            a, q = A[:, sl, sl], Q[:, sl, sl]
            ga, gq = gA[:, sl, sl], gQ[:, sl, sl]
            gp, pinf = gP0[sl, sl], Pinf[sl, sl]
            g_var = (
                float(np.einsum("kij,kij->", gq, q)) + float(np.sum(gp * pinf))
            ) / var
            if part.p is None:
                out.append((None, g_var))
                continue
            E = np.diag(np.arange(part.p + 1.0))
            Ft = _nilpotent(part.p) - np.eye(part.p + 1)
            W = -(Ft @ pinf + pinf @ Ft.T)
            g_lam = float(np.einsum("kij,kij,k->", ga, Ft @ a, dt))
            g_lam += float(np.einsum("kij,kij->", ga, E @ a - a @ E)) / lam
            aWa = a @ W @ np.swapaxes(a, -1, -2)
            g_lam += float(np.einsum("kij,kij,k->", gq, aWa, dt))
            g_lam += float(np.einsum("kij,kij->", gq, E @ q + q @ E)) / lam
            g_lam += float(np.sum(gp * (E @ pinf + pinf @ E))) / lam
            out.append((g_lam, g_var))
        return out


class _Steps:
    """The transitions ``A(Δ_i)``, ``Q(Δ_i)`` of many steps, applied to
    vectors; steps taking few distinct values are grouped (one transition
    per value, no (m, D, D) arrays)."""

    def __init__(self, model, dt):
        self.groups = None
        if dt.shape[0] > 64:
            u, inv = np.unique(dt, return_inverse=True)
            if u.shape[0] <= 8:
                A, Q, self.Pinf = model.transitions(u)
                self.groups = [(A[j], Q[j], inv == j) for j in range(u.shape[0])]
                if u.shape[0] == 1:
                    self.groups = [(A[0], Q[0], None)]
        if self.groups is None:
            self.A, self.Q, self.Pinf = model.transitions(dt)

    def apply(self, x, transpose=False, Q=False):
        """``A_i x_i`` (``A_iᵀ x_i``, or ``Q_i x_i``) for x (m, D)."""
        if self.groups is None:
            M = self.Q if Q else self.A
            sub = "mji,mj->mi" if transpose else "mij,mj->mi"
            return np.einsum(sub, M, x)
        out = np.empty_like(x)
        for A, Qm, sel in self.groups:
            M = Qm if Q else (A if transpose else A.T)
            if sel is None:
                return x @ M
            out[sel] = x[sel] @ M
        return out


def _matvec(res, name, idx, x):
    """``M_idx x`` for the (T, D, D) sequence ``name`` of a Kalman result."""
    pw = getattr(res, name + "_pw", None)
    if pw is not None:
        return pw.matvec(idx, x)
    return np.einsum("mij,mj->mi", getattr(res, name)[idx], x)


def _num(v):
    if B.is_tensor(v):
        return float(v.detach().reshape(-1)[0])
    return float(np.reshape(v, -1)[0])


def _np(a):
    return np.asarray(B.to_numpy(a), dtype=np.float64)


# --------------------------------------------------------------------------
# one conditioned series


def _entries(blocks, b):
    """Times, derivative orders and coefficients of every observation entry,
    in the observations' flat order, for batch member ``b``."""
    ts, orders, coefs = [], [], []
    for blk in blocks:
        X = _np(blk.X)
        if X.ndim > 2:
            X = np.broadcast_to(X, tuple(_bshape(blk)) + X.shape[-2:])
            X = X[b] if b != () else X
        X = np.reshape(X, X.shape[-2:])
        ts.append(X[:, 0])
        orders.append(np.full(blk.n, blk.order))
        U = _np(blk.U)  # (nU, k=1, order, 1)
        w = np.prod(U[:, 0, :, 0], axis=-1) if blk.order else np.ones(U.shape[0])
        coefs.append(np.broadcast_to(w, (blk.n,)))
    return np.concatenate(ts), np.concatenate(orders), np.concatenate(coefs)


def _bshape(blk):
    return tuple(blk.X.shape[:-2])


class _Series:
    """One problem: the sorted chain, its filter/adjoint pass, and queries."""

    def __init__(self, model, t, order, coef, noise):
        perm = np.argsort(t, kind="stable")
        # already sorted (the common case): no gathers on every pass
        self.perm = None if np.all(perm[1:] > perm[:-1]) else perm
        self.t = self._sorted(t)
        self.order, self.coef = self._sorted(order), self._sorted(coef)
        self._uniform = bool(
            np.all(self.order == self.order[0]) and np.all(self.coef == self.coef[0])
        )
        self._grid = None
        self._hint = 256
        self.update(model, noise)

    def _sorted(self, a):
        return a if self.perm is None else a[self.perm]

    def _unsorted(self, a):
        if self.perm is None:
            return a
        out = np.empty_like(a)
        out[self.perm] = a
        return out

    def update(self, model, noise):
        """New hyperparameters (``model``) and noise (flat order) on the same
        times and observation kinds."""
        self.model = model
        T = len(self.t)
        if self._uniform:
            row = model.rows(self.order[:1], self.coef[:1])
            self.H = np.broadcast_to(row, (T, model.D))
        else:
            self.H = model.rows(self.order, self.coef)
        self.R = self._sorted(noise)
        if self._grid is None:
            dt = np.diff(self.t, prepend=self.t[0])
            self.regular = self._is_regular(dt)
            if self.regular:
                # a grid written as t₀ + kΔ in floating point: one exact step
                step = (self.t[-1] - self.t[0]) / (T - 1)
                self.t = self.t[0] + step * np.arange(T)
                dt = np.full(T, step)
                dt[0] = 0.0
            self._grid = dt
        elif self.regular:
            self.regular = bool(np.all(self.R == self.R[0]))
        dt = self.dt = self._grid
        if self.regular:
            # one step everywhere: one transition, broadcast (no T-sized copies)
            A2, Q2, self.P0 = model.transitions(dt[:2])
            finite = np.all(np.isfinite(A2)) and np.all(np.isfinite(Q2))
            shape = (T,) + A2.shape[1:]
            self.A = np.broadcast_to(A2[-1], shape)
            self.Q = np.broadcast_to(Q2[-1], shape)
        else:
            self.A, self.Q, self.P0 = model.transitions(dt)
            finite = np.all(np.isfinite(self.A)) and np.all(np.isfinite(self.Q))
        if not finite:
            raise np.linalg.LinAlgError(
                "the state-space transitions are not finite; check the "
                "lengthscales and the input times"
            )
        self.res = None

    def run(self, r):
        """Filter and adjoint for residuals ``r`` (flat order); ``S⁻¹ r``."""
        y = self._sorted(r)
        self.res = None
        with kalman.one_blas_thread():
            if self.regular:
                self.res = kalman.kalman_regular(
                    self.A, self.Q, self.P0, self.H, y, self.R, hint=self._hint
                )
                if self.res is not None:
                    # the next pass (a fit's next step) starts near this length
                    self._hint = int(1.25 * self.res.P_pw.nh) + 8
            if self.res is None:
                self.res = kalman.kalman(self.A, self.Q, self.P0, self.H, y, self.R)
        return self._unsorted(self.res.alpha)

    def _is_regular(self, dt):
        """One step (equal to ``REGULAR_STEP_RTOL``), one kind of observation
        and one noise throughout: the steady-state path applies."""
        T = len(dt)
        if T < REGULAR_MIN_STEPS:
            return False
        d = dt[1:]
        mean = (self.t[-1] - self.t[0]) / (T - 1)
        if not (mean > 0 and np.all(np.abs(d - mean) <= REGULAR_STEP_RTOL * mean)):
            return False
        return bool(np.all(self.H == self.H[0]) and np.all(self.R == self.R[0]))

    def solve(self, Rhs):
        """``S⁻¹ Rhs`` for (N, k) right-hand sides (gains from :meth:`run`)."""
        return self._unsorted(kalman.linear_solve(self.res, self._sorted(Rhs)))

    def logdet(self):
        if self.res.regular:
            return self.res.logdet()
        return float(np.sum(np.log(self.res.S)))

    def marginals(self, tq, Hq):
        """Smoothed mean and variance (m,) of the entries ``Hq`` (m, D) (one
        state row per query) at times ``tq`` (m,).

        From the filtered state at the last step ``k`` at or before ``t``,
        predicted over ``t − t_k`` (``m⁻, P⁻``), and the adjoint of the next
        step carried back over ``t_{k+1} − t`` (``λ̂, Λ̂``):
        ``mean = h·m⁻ + w·λ̂``, ``var = h·w − wᵀΛ̂w`` with ``w = P⁻h``; only
        (m, D) arrays are formed, and steps shared by many queries (a grid
        queried at its own times) get their transition once.
        """
        res = self.res
        T = len(self.t)
        k = np.searchsorted(self.t, tq, side="right") - 1
        before = k < 0
        kc = np.clip(k, 0, T - 1)
        d1 = np.where(before, 0.0, tq - self.t[kc])
        d2 = np.where(k + 1 < T, self.t[np.clip(k + 1, 0, T - 1)] - tq, 0.0)
        if self.regular:
            # the grid was snapped to t₀ + kΔ: so are queries on it
            tol = REGULAR_STEP_RTOL * self.dt[1]
            d1 = np.where(np.abs(d1) <= tol, 0.0, d1)
            d2 = np.where(np.abs(d2 - self.dt[1]) <= tol, self.dt[1], d2)
            d2 = np.where(np.abs(d2) <= tol, 0.0, d2)
        S1 = _Steps(self.model, d1)
        mp = S1.apply(res.m[kc])
        w = S1.apply(_matvec(res, "P", kc, S1.apply(Hq, transpose=True)))
        w += S1.apply(Hq, Q=True)
        mp[before] = 0.0
        w[before] = Hq[before] @ S1.Pinf
        nxt = np.clip(k + 1, 0, T - 1)
        has_next = k + 1 < T
        S2 = _Steps(self.model, d2)
        lam = S2.apply(res.lam[nxt], transpose=True)
        z = S2.apply(w)
        zLz = np.einsum("mi,mi->m", z, _matvec(res, "Lam", nxt, z))
        lam[~has_next] = 0.0
        zLz[~has_next] = 0.0
        mean = np.einsum("mi,mi->m", Hq, mp) + np.einsum("mi,mi->m", w, lam)
        var = np.einsum("mi,mi->m", Hq, w) - zLz
        return mean, var

    def lml_tensor(self, theta, r_t, R_t):
        """The log marginal likelihood as a tensor, with the exact O(n)
        gradient in ``theta`` (each Matérn part's λ, then every part's
        variance), the residuals and the noise (:class:`_KalmanLML`)."""
        return _KalmanLML.apply(theta, r_t, R_t, self)

    def grad_theta(self):
        """∂ℓ/∂θ (θ as in :func:`_theta`), ∂ℓ/∂y and ∂ℓ/∂R in sorted order."""
        if self.regular and self.res.regular:
            sgA, sgQ, gP0, gy, gR = kalman.gradient_sums(self.res, self.P0)
            g = self.model.chain_regular(
                self.dt[1], self.A[1], self.Q[1], self.P0, sgA, sgQ, gP0
            )
        else:
            gA, gQ, gP0, gy, gR = kalman.gradients(self.res, self.P0)
            g = self.model.chain(self.dt, self.A, self.Q, self.P0, gA, gQ, gP0)
        lam = [gl for gl, _ in g if gl is not None]
        return np.array(lam + [gv for _, gv in g]), gy, gR


def _lml_function():
    import torch

    class KalmanLML(torch.autograd.Function):
        """``ℓ(θ, r, R)`` with the adjoint gradient of
        :func:`gpgrad.solvers.kalman.gradients`."""

        @staticmethod
        def forward(ctx, theta, r, R, series):
            ctx.series = series
            return torch.as_tensor(series.res.loglik, dtype=torch.float64)

        @staticmethod
        def backward(ctx, g):
            s = ctx.series
            gt, gy, gR = s.grad_theta()
            gr, gRf = s._unsorted(gy), s._unsorted(gR)

            def t(a):
                return g * torch.as_tensor(a, dtype=torch.float64)

            return t(gt), t(gr), t(gRf), None

    return KalmanLML


class _Lazy:
    fn = None

    def apply(self, *args):
        if _Lazy.fn is None:
            _Lazy.fn = _lml_function()
        return _Lazy.fn.apply(*args)


_KalmanLML = _Lazy()


# --------------------------------------------------------------------------
# the solver


class StateSpaceSolver(Solver):
    """Kalman filter and smoother over the sorted inputs: exact GP inference
    for 1-D Matérn kernels (and sums with a constant) in O(n).

    The solver interface of :class:`gpgrad.Posterior` (``solve``,
    ``logdet``), the likelihood with its exact adjoint gradient
    (``log_marginal_likelihood``), and marginal predictions answered by the
    smoother at the query times (``moments``). Batches are looped.
    """

    method = "statespace"
    jitter = 0.0

    def __init__(self, kernel, blocks, noise):
        super().__init__(kernel, blocks, noise)
        self.batch = tuple(noise.shape[:-1])
        parts = _parts(kernel)
        self.torch = B.is_tensor(noise)
        noise_np = np.broadcast_to(_np(noise), self.batch + (noise.shape[-1],))
        self.series = {}
        self.parts = {}
        for b in np.ndindex(*self.batch) if self.batch else [()]:
            bparts = [
                _Part(
                    p.p,
                    _member(p.variance, b, self.batch),
                    None
                    if p.lengthscale is None
                    else _member(p.lengthscale, b, self.batch, trailing=1),
                )
                for p in parts
            ]
            t, order, coef = _entries(blocks, b)
            self.series[b] = _Series(_Model(bparts), t, order, coef, noise_np[b])
            self.parts[b] = bparts
        self.like = noise
        self._cache = {}

    def _out(self, arr):
        return B.to_namespace(
            arr, self.xp, dtype=self.like.dtype, device=B.device_of(self.like)
        )

    def _members(self):
        return list(self.series.items())

    def solve(self, R):
        """``(K + Σ)⁻¹ R`` for R (..., N, k)."""
        Rn = _np(R)
        Rn = np.broadcast_to(Rn, self.batch + Rn.shape[-2:])
        out = np.empty(Rn.shape)
        for b, s in self._members():
            if s.res is None:
                # the first solve (the residuals) runs the filter and adjoint
                out[b][..., 0] = s.run(np.ascontiguousarray(Rn[b][:, 0]))
                if Rn.shape[-1] > 1:
                    out[b] = s.solve(np.ascontiguousarray(Rn[b]))
            else:
                out[b] = s.solve(np.ascontiguousarray(Rn[b]))
        return self._out(out)

    def logdet(self):
        vals = np.array([s.logdet() for _, s in self._members()])
        return self._out(vals.reshape(self.batch))

    def log_marginal_likelihood(self, r):
        """``log p(r)`` for the residuals given to the first solve, (...,);
        on torch, differentiable in the hyperparameters, the residuals and
        the noise by the adjoint pass."""
        if not self.torch:
            vals = np.array([s.res.loglik for _, s in self._members()])
            return vals.reshape(self.batch) if self.batch else float(vals[0])
        import torch

        out = []
        noise = self.noise.expand(self.batch + (self.noise.shape[-1],))
        r = r.expand(self.batch + (r.shape[-1],))
        for b, s in self._members():
            theta = _theta(self.parts[b])
            lml = s.lml_tensor(
                theta, r[b].to(torch.float64), noise[b].to(torch.float64)
            )
            out.append(lml)
        vals = torch.stack(out).reshape(self.batch)
        return vals.to(device=self.like.device, dtype=self.like.dtype)

    def moments(self, qblocks, alpha, mode):
        """Flat mean (..., M), var (..., M) and, for ``mode="point"``, the
        per-point blocks (..., m, 1, 1) of the queries, from the smoothed state
        at the query times; ``"full"`` goes through O(N)-per-column solves."""
        if mode == "full":
            n_q = sum(qb.size for qb in qblocks)
            if n_q * self.num_rows > FULL_COV_MAX_ELEMENTS:
                raise ValueError(
                    f"a joint covariance over {n_q} query entries needs their "
                    f"cross-covariance with the {self.num_rows} observations, "
                    "above the state-space solver's limit of "
                    f"{FULL_COV_MAX_ELEMENTS} entries (gpgrad.solvers.statespace."
                    "FULL_COV_MAX_ELEMENTS); ask for marginals (full_cov=False) or "
                    "fewer query points"
                )
            # K_QX A⁻¹ K_XQ through O(N)-per-column solves
            return super().moments(qblocks, alpha, mode)
        mean, var = self._marginals(qblocks)
        return mean, var, (var[..., None, None] if mode == "point" else None)

    def mean(self, qblocks, alpha):
        """Posterior mean of the queries (..., M) from the smoother."""
        return self._marginals(qblocks)[0]

    def _marginals(self, qblocks):
        means, vars_ = [], []
        for b, s in self._members():
            t, order, coef = _entries(qblocks, b)
            # `.mean` then `.var` of one prediction ask for the same queries
            hit = self._cache.get(b)
            if hit is not None and all(
                np.array_equal(x, y) for x, y in zip(hit[0], (t, order, coef))
            ):
                mean, var = hit[1]
            else:
                mean, var = np.empty(t.shape), np.empty(t.shape)
                with kalman.one_blas_thread():
                    # chunks bound the (m, D) temporaries of long queries
                    for i in range(0, max(len(t), 1), QUERY_CHUNK):
                        sl = slice(i, i + QUERY_CHUNK)
                        Hq = s.model.rows(order[sl], coef[sl])
                        mean[sl], var[sl] = s.marginals(t[sl], Hq)
                self._cache[b] = ((t, order, coef), (mean, var))
            means.append(mean)
            vars_.append(var)
        shape = self.batch + (means[0].shape[-1],)
        mean = self._out(np.reshape(np.stack(means), shape))
        var = self._out(np.reshape(np.stack(vars_), shape))
        return mean, var


def _theta(parts):
    """Each Matérn part's λ = √(2p+1)/ℓ, then every part's variance, as one
    float64 tensor carrying the hyperparameters' autograd graph."""
    import torch

    def t(v):
        if B.is_tensor(v):
            return v.to(torch.float64).reshape(())
        return torch.as_tensor(float(np.reshape(v, -1)[0]), dtype=torch.float64)

    lam = [math.sqrt(2 * p.p + 1) / t(p.lengthscale) for p in parts if p.p is not None]
    return torch.stack(lam + [t(p.variance) for p in parts])


def _named_parts(kernel, prefix=""):
    """:func:`_parts`'s blocks as ``(lengthscale name or None, variance-factor
    names)``: a part's variance is the product of the named values."""
    if isinstance(kernel, Sum):
        out = []
        for i, child in enumerate(kernel.children):
            out.extend(_named_parts(child, f"{prefix}{i}."))
        return out
    if isinstance(kernel, Scale):
        sub = _named_parts(kernel.children[0], f"{prefix}0.")
        return [(ls, [prefix + "scale"] + vs) for ls, vs in sub]
    if isinstance(kernel, Constant):
        return [(None, [prefix + "variance"])]
    return [(prefix + "lengthscale", [prefix + "variance"])]


class FitLikelihood:
    """The log marginal likelihood of one (unbatched) problem and its exact
    gradient in every hyperparameter, in numpy, for :func:`gpgrad.fit`.

    The times are sorted once; each call updates the transitions and noise
    and runs one filter + adjoint pass (no torch, no GP rebuilt around it).
    Build it with :func:`fit_likelihood`.
    """

    def __init__(self, gp, obs, blocks, r0, shift, scale):
        self.kinds = [f.kind for f in obs]
        flat = [f.flat_targets(f.y) for f in obs]
        sizes = [int(y.shape[-1]) for y in flat]
        self.N = sum(sizes)
        self.is_val = np.concatenate(
            [np.full(n, f.kind == "value") for f, n in zip(obs, sizes)]
        )
        # per entry: the kind whose fitted noise it takes, or its own noise
        self.code = np.concatenate(
            [
                np.full(n, -1 if f.noise is not None else i, dtype=np.int16)
                for i, (f, n) in enumerate(zip(obs, sizes))
            ]
        )
        own = np.zeros(self.N)
        off = 0
        for f, y, n in zip(obs, flat, sizes):
            if f.noise is not None:
                own[off : off + n] = _np(f.flat_noise(f.noise, np, np.asarray(y)))
            off += n
        self.own = own
        self.r0, self.shift, self.scale = r0, shift, scale
        self.names = _named_parts(gp.kernel)
        self.entries = _entries(blocks, ())
        self.series = None
        # one kind, one fitted noise (the common case): no masks
        kinds = set(self.kinds)
        one = len(kinds) == 1 and bool(np.all(self.code >= 0))
        self.uniform = self.kinds[0] if one else None
        self.val_mask = None if bool(np.all(self.is_val)) else self.is_val

    def window(self, obs, size):
        """The observations inside a window of ``size`` consecutive times in
        the middle of the series, as new functionals (values only; None for
        other kinds or a series not longer than ``2 size``)."""
        if self.N <= 2 * size or any(f.kind != "value" for f in obs):
            return None
        t = np.sort(self.entries[0])
        lo = t[(len(t) - size) // 2]
        hi = t[(len(t) - size) // 2 + size - 1]
        out = []
        for f in obs:
            X = np.asarray(f.X)
            sel = (X[:, 0] >= lo) & (X[:, 0] <= hi)
            noise = f.noise
            if noise is not None and np.ndim(noise):
                noise = np.broadcast_to(np.asarray(noise), (X.shape[0],))[sel]
            out.append(type(f).build(f.kind, X[sel], np.asarray(f.y)[sel], noise))
        return out

    def _noise(self, gp):
        if self.uniform is not None:
            v = float(np.reshape(gp.noise_for(self.uniform), -1)[0])
            return np.full(self.N, v / self.scale**2)
        R = self.own.copy()
        for i, kind in enumerate(self.kinds):
            sel = self.code == i
            if np.any(sel):
                R[sel] = float(np.reshape(gp.noise_for(kind), -1)[0])
        return R / self.scale**2

    def _sum(self, a, mask):
        """Sum of ``a`` (sorted order) over ``mask`` (flat order; None: all)."""
        if mask is None:
            return float(np.sum(a))
        return float(np.sum(a[self.series._sorted(mask)]))

    def __call__(self, gp, grad=True):
        """``(ℓ, {name: ∂ℓ/∂value})`` at ``gp``'s hyperparameters (numpy
        GP, same kernel structure); the names are the kernel's parameters,
        ``noise.<kind>`` and ``mean``."""
        parts = _parts(gp.kernel)
        model = _Model(parts)
        R = self._noise(gp)
        mean = float(np.reshape(gp.mean, -1)[0])
        if self.val_mask is None:
            r = self.r0 - mean / self.scale
        else:
            r = self.r0 - self.is_val * (mean / self.scale)
        if self.series is None:
            t, order, coef = self.entries
            self.series = _Series(model, t, order, coef, R)
        else:
            self.series.update(model, R)
        s = self.series
        s.run(r)
        lml = s.res.loglik - self.N * math.log(self.scale)
        if not grad:
            return lml, None
        with kalman.one_blas_thread():
            gt, gy, gR = s.grad_theta()
        params = gp.kernel.parameters()
        out = {name: 0.0 for name in params}
        n_lam = sum(p.p is not None for p in parts)
        j = 0
        for i, (part, (ls_name, var_names)) in enumerate(zip(parts, self.names)):
            if part.p is not None:
                lam = model.lam0[i]
                out[ls_name] += gt[j] * (-lam / _num(params[ls_name]))
                j += 1
            g_var = gt[n_lam + i] * model.var0[i]
            for vn in var_names:
                out[vn] += g_var / _num(params[vn])
        s2 = self.scale**2
        if self.uniform is not None:
            out[f"noise.{self.uniform}"] = self._sum(gR, None) / s2
        else:
            for i, kind in enumerate(self.kinds):
                key = f"noise.{kind}"
                out[key] = out.get(key, 0.0) + self._sum(gR, self.code == i) / s2
        out["mean"] = -self._sum(gy, self.val_mask) / self.scale
        return lml, out


def fit_likelihood(gp, obs, names):
    """A :class:`FitLikelihood` when ``gp`` (numpy backend, the starting
    hyperparameters) would condition ``obs`` with the state-space solver and
    every fitted name is one it differentiates; else None."""
    from .select import AUTO_STATESPACE_MIN_ROWS

    if gp.backend != "numpy" or gp.method not in ("auto", "statespace"):
        return None
    zero = type(gp)(
        gp.kernel,
        noise=gp.noise,
        mean=0.0,
        normalize_y=gp.normalize_y,
        method=gp.method,
    )
    blocks, r0, noise, shift, scale = zero._prepare(obs)
    if noise.ndim != 1 or np.ndim(shift) or np.ndim(scale):
        return None
    if gp.method == "auto" and noise.shape[-1] < AUTO_STATESPACE_MIN_ROWS:
        return None
    if statespace_unsupported_reason(gp.kernel, blocks) is not None:
        return None
    known = set(gp.kernel.parameters()) | {"mean"}
    known |= {f"noise.{f.kind}" for f in obs if f.noise is None}
    if not set(names) <= known:
        return None
    for f in obs:
        if f.noise is None and np.size(gp.noise_for(f.kind)) != 1:
            return None
    return FitLikelihood(gp, obs, blocks, np.asarray(r0), float(shift), float(scale))


def statespace_solver(gp, blocks, noise):
    """A :class:`StateSpaceSolver`, or ValueError naming why it cannot be."""
    reason = statespace_unsupported_reason(gp.kernel, blocks)
    if reason is not None:
        raise ValueError(f"method='statespace' cannot be used here: {reason}")
    return StateSpaceSolver(gp.kernel, blocks, noise)
