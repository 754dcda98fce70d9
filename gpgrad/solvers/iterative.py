"""Preconditioned conjugate gradients on the matrix-free derivative Gram matrix.

The posterior needs ``(K + Σ)⁻¹ R`` for the weights (one right-hand side) and,
for predictive variances, for the cross-covariance columns of the queried
entries. :class:`IterativeSolver` solves these by preconditioned conjugate
gradients (PCG) with products from :class:`~gpgrad.solvers.matfree.GramOperator`
(O(N²D) each, no N(D+1)-square matrix), stopping when every column's residual
satisfies ``‖r‖ ≤ tol·‖b‖``.

Preconditioners (``preconditioner=``):

``"jacobi"`` (default)
    ``diag(K + Σ)``.
``"kronecker"``
    Per point group, ``Φ₀ + Σ`` for values and ``(−Φ₁) ⊗ diag(ℓ⁻²) + σ²I`` for
    full gradients (the Kronecker part of the gradient block).
``"pivchol"``
    A rank-``rank`` pivoted Cholesky factor ``L`` of ``K`` plus the diagonal
    of what it misses: ``P = LLᵀ + diag(K − LLᵀ) + Σ``, applied by Woodbury.
    Rows of K come from the closed-form covariances (O(N D²) each).
``None``
    Plain CG.

The log marginal likelihood's ``log|K + Σ|`` is estimated by preconditioned
stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Gardner et al. 2018)
with the preconditioner ``P`` (whose log-determinant is exact):

.. math::

    \\log|K + Σ| = \\log|P| + \\operatorname{tr}\\log(P^{-1/2}(K+Σ)P^{-1/2}),
    \\qquad \\operatorname{tr}\\log M ≈ \\frac{1}{p}\\sum_{j=1}^{p}
        \\|z̃_j\\|^2 \\sum_{l} τ_{jl}^2 \\log θ_{jl}

with Gaussian probes ``z̃_j`` and the Ritz values ``θ`` and first eigenvector
components ``τ`` of each probe's ``lanczos_steps``-step Lanczos tridiagonal. The
estimate is unbiased up to the quadrature error, exact when ``P = K + Σ``, and
has a standard error that shrinks as ``1/√p`` (about 1 nat at 16 probes on a
120-row Matérn problem with the Jacobi preconditioner). In torch its gradient is
the Hutchinson estimate of ``tr((K + Σ)⁻¹ ∂K)``: unbiased but noisy, so
hyperparameter fitting on this path is stochastic. The data-fit term
``rᵀ(K + Σ)⁻¹r`` is exact to the solver tolerance.

Where the value entries are eliminated (values and derivatives observed, the
default for smooth kernels), ``log|K + Σ| = log|A| + log|S|`` instead: the value
block ``A`` exactly from its Cholesky factor, the Schur complement ``S`` by the
quadrature of its probes' own CG solves (:func:`cg_quadrature`), whose
solutions also give the Hutchinson gradient; no separate Lanczos run and no
solve in the backward pass (:meth:`IterativeSolver.log_marginal_likelihood`).
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from .. import backend as B
from ..covariance import covariance
from ..exceptions import GPGradWarning
from .base import Solver
from .matfree import GramOperator
from .precondition import (
    Identity,
    Jacobi,
    PointCholesky,
    point_pivoted_cholesky,
)

__all__ = ["CG", "IterativeSolver", "pcg", "ConvergenceWarning"]


class ConvergenceWarning(GPGradWarning):
    """Conjugate gradients stopped at ``max_iter`` above the tolerance."""


_PRECONDITIONERS = ("auto", "kronecker", "jacobi", "pivchol", None)
_VARIANCES = ("exact", "lanczos")


class CG:
    """Options of the iterative solver: pass as ``GP(method=CG(...))``.

    Parameters
    ----------
    tol : float or None
        Relative residual ``‖b − (K+Σ)x‖ / ‖b‖`` at which each column stops
        (default 1e-8 in float64, 1e-5 in float32, where round-off in the
        products leaves residuals of about 1e-6 on ill-conditioned systems).
    max_iter : int or None
        Iteration cap (default ``max(1000, 2·√N)``); a warning names the
        remedy when it is reached.
    preconditioner : {"auto", "jacobi", "pivchol", "kronecker", None}, default "auto"
        Which helps depends on the lengthscale (measured, Matérn 5/2, 300
        points in 5-D, values and gradients, noise 1e-4; iterations for
        ℓ = 0.15 / 0.5 / 2: none 64 / 760 / 2006, jacobi 23 / 393 / 2723,
        pivchol 23 / 358 / 718, kronecker 23 / 136 / 1316). "auto" picks
        plain CG for strongly correlated points and Jacobi otherwise
        (:func:`auto_preconditioner`).
    rank : int, default 100
        Rank of the pivoted Cholesky preconditioner.
    probes : int, default 16
        Gaussian probes (drawn from N(0, P)) of the log-determinant estimator.
    lanczos_steps : int, default 50
        Lanczos steps per probe (where the values are not eliminated; with
        eliminated values the probes' own CG solves, run to
        :data:`PROBE_TOL`, give the quadrature: see
        :meth:`IterativeSolver.log_marginal_likelihood`).
    seed : int, default 0
        Seed of the probes (the estimate is deterministic for a fixed seed).
    variance : {"exact", "lanczos"}, default "exact"
        How predictive variances are computed (see
        :meth:`IterativeSolver.quad_factors`).
    variance_rank : int, default 400
        Lanczos steps of ``variance="lanczos"``.
    eliminate_values : {"auto", True, False}, default "auto"
        Solve for the value entries exactly (dense Cholesky of their
        ``n_v × n_v`` block) and run CG on the Schur complement of the
        derivative entries (see :meth:`IterativeSolver.schur_solve`). "auto"
        does so where values and derivatives are both observed, there are at
        most :data:`ELIMINATE_MAX_VALUES` value entries and plain CG was chosen
        (the smooth case: measured 2.2× fewer iterations for RBF and 1.7× for
        Matérn 5/2 at N = 300, D = 50, at 1.33× the cost per iteration).
    mixed_precision : {"auto", True, False}, default "auto"
        Run the Schur complement's conjugate gradients with float32 products
        inside an iterative refinement in float64 (see
        :meth:`IterativeSolver.refined_pcg`): each float64 correction step
        solves for the remaining residual with float32 products (half the
        memory traffic, twice the GEMM speed), and the final residual is the
        float64 one, to the same tolerance. "auto" does so for float64 data
        when values are eliminated without a preconditioner and there are at
        least :data:`MIXED_MIN_POINTS` points; a refinement that stops
        gaining finishes in float64.
    """

    method = "cg"

    def __init__(
        self,
        tol=None,
        max_iter=None,
        preconditioner="auto",
        rank=100,
        probes=16,
        lanczos_steps=50,
        seed=0,
        variance="exact",
        variance_rank=400,
        eliminate_values="auto",
        mixed_precision="auto",
    ):
        if tol is not None and (
            isinstance(tol, bool)
            or not isinstance(tol, (int, float))
            or not (0 < tol < 1)
        ):
            raise ValueError(f"CG tol must be a number in (0, 1), got {tol!r}")
        for name, v in (
            ("rank", rank),
            ("probes", probes),
            ("lanczos_steps", lanczos_steps),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CG {name} must be a positive integer, got {v!r}")
        if max_iter is not None and (
            isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1
        ):
            raise ValueError(
                f"CG max_iter must be a positive integer or None, got {max_iter!r}"
            )
        if preconditioner not in _PRECONDITIONERS:
            raise ValueError(
                f"CG preconditioner must be one of {_PRECONDITIONERS}, got "
                f"{preconditioner!r}"
            )
        if variance not in _VARIANCES:
            raise ValueError(
                f"CG variance must be one of {_VARIANCES}, got {variance!r}"
            )
        if (
            isinstance(variance_rank, bool)
            or not isinstance(variance_rank, int)
            or variance_rank < 1
        ):
            raise ValueError(
                f"CG variance_rank must be a positive integer, got {variance_rank!r}"
            )
        self.tol = None if tol is None else float(tol)
        self.max_iter = max_iter
        self.preconditioner = preconditioner
        self.rank = rank
        self.probes = probes
        self.lanczos_steps = lanczos_steps
        self.seed = seed
        for name, v in (
            ("eliminate_values", eliminate_values),
            ("mixed_precision", mixed_precision),
        ):
            if not (v == "auto" or isinstance(v, bool)):
                raise ValueError(f"CG {name} must be 'auto', True or False, got {v!r}")
        self.variance = variance
        self.variance_rank = variance_rank
        self.eliminate_values = eliminate_values
        self.mixed_precision = mixed_precision

    def with_max_iter(self, max_iter):
        """These options with another iteration cap."""
        import copy

        new = copy.copy(self)
        new.max_iter = int(max_iter)
        return new

    def __eq__(self, other):
        return isinstance(other, CG) and vars(self) == vars(other)

    def __hash__(self):
        return hash(tuple(sorted((k, repr(v)) for k, v in vars(self).items())))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"CG({args})"


def _dtype_name(a):
    return str(a.dtype).rsplit(".", 1)[-1]


def _float32(xp):
    """float32 of ``xp`` (numpy or torch)."""
    return _torch_float32() if B.is_torch(xp) else np.float32


def _colnorm(xp, a):
    """Euclidean norms of the columns of ``a`` (…, N, k): (…, 1, k)."""
    return xp.sqrt(xp.sum(a * a, axis=-2, keepdims=True))


def _rows(xp, a, idx):
    """The rows ``idx`` of ``a`` (…, N, k)."""
    return xp.take(a, idx, axis=-2)


def _torch_float32():
    import torch

    return torch.float32


def pcg(matmul, b, precond=None, *, tol=1e-8, max_iter=1000, x0=None, record=None):
    """Preconditioned conjugate gradients for SPD systems, many columns at once.

    Parameters
    ----------
    matmul : callable
        ``V ↦ A V`` for V (…, N, k).
    b : array (…, N, k)
    precond : callable or None
        ``R ↦ P⁻¹ R``.
    tol : float
        Stop a column when ``‖r‖ ≤ tol·‖b‖``.
    record : list or None
        If a list, each iteration appends its step lengths, direction
        updates and active columns as numpy arrays ``(α, β, active)`` (…, k):
        the Lanczos tridiagonal of every column (:func:`cg_tridiagonals`).

    Returns
    -------
    x : array (…, N, k)
    info : dict
        ``iterations``, the largest final ``relative_residual`` and its
        ``history`` (the largest relative residual before each iteration and
        after the last).
    """
    xp = B.namespace(b)
    bnorm = _colnorm(xp, b)
    bnorm = xp.where(bnorm > 0, bnorm, xp.ones_like(bnorm))
    x = xp.zeros_like(b) if x0 is None else x0
    r = b - matmul(x) if x0 is not None else b
    z = precond(r) if precond is not None else r
    p = z
    rz = xp.sum(r * z, axis=-2, keepdims=True)
    it = 0
    rel = _colnorm(xp, r) / bnorm
    worst = B.to_float(xp.max(rel))
    history = [worst]
    while worst > tol and it < max_iter:
        Ap = matmul(p)
        pAp = xp.sum(p * Ap, axis=-2, keepdims=True)
        active = rel > tol
        safe = xp.where(pAp > 0, pAp, xp.ones_like(pAp))
        alpha = xp.where(active & (pAp > 0), rz / safe, xp.zeros_like(rz))
        x = x + alpha * p
        r = r - alpha * Ap
        z = precond(r) if precond is not None else r
        rz_new = xp.sum(r * z, axis=-2, keepdims=True)
        rzs = xp.where(rz != 0, rz, xp.ones_like(rz))
        beta = xp.where(active, rz_new / rzs, xp.zeros_like(rz))
        if record is not None:
            record.append(
                tuple(B.to_numpy(a[..., 0, :]) for a in (alpha, beta, active))
            )
        p = z + beta * p
        rz = rz_new
        rel = _colnorm(xp, r) / bnorm
        worst = B.to_float(xp.max(rel))
        history.append(worst)
        it += 1
    return x, {"iterations": it, "relative_residual": worst, "history": history}


#: mean kernel correlation between observed points above which plain CG
#: beats Jacobi (measured: RBF and Matérn 5/2, ℓ = 0.5√D, unit cube, correlation
#: ≈ 0.7: Jacobi needs 1.7x the iterations of plain CG; ℓ = 0.1√D in 5-D,
#: correlation ≈ 0.01: Jacobi needs fewer)
SMOOTH_CORRELATION = 0.3


def auto_preconditioner(op, sample=256, seed=0):
    """The preconditioner ``"auto"`` picks: None or ``"jacobi"``.

    Jacobi rescales value and derivative entries to unit variance. That helps
    when points are nearly uncorrelated (short lengthscales: the blocks of
    different scale barely couple) and hurts when they are strongly
    correlated, where the Gram matrix's large eigenvalues come from smooth
    trends shared by values and derivatives. The rule: plain CG when the mean
    correlation ``φ(s)/φ(0)`` between distinct observed points (estimated on
    up to ``sample`` of them) exceeds :data:`SMOOTH_CORRELATION`; Jacobi
    otherwise, and for dot-product kernels.
    """
    if not op.stationary:
        return "jacobi"
    xp = op.xp
    Z = xp.concat([g.Z for g in op.groups], axis=-2)
    n = Z.shape[-2]
    if n < 2:
        return "jacobi"
    idx = np.random.default_rng(seed).permutation(n)[: min(n, sample)]
    ii = idx if B.is_numpy(xp) else B.to_namespace(idx, xp, device=B.device_of(Z))
    Zs = B.detach(xp.take(Z, ii, axis=-2))
    diff = Zs[..., :, None, :] - Zs[..., None, :, :]
    S = 0.5 * xp.sum(diff * diff, axis=-1)
    with B.no_grad(xp):
        phi = op.kernel.profile(xp, S, 0)[0]
        phi0 = op.kernel.profile(xp, 0.0 * S[..., :1, :1], 0)[0]
    m = S.shape[-1]
    corr = (xp.sum(phi, axis=(-2, -1)) - xp.sum(B.diagonal(phi), axis=-1)) / (
        m * (m - 1) * phi0[..., 0, 0]
    )
    return None if B.to_float(xp.min(corr)) > SMOOTH_CORRELATION else "jacobi"


#: ``mixed_precision="auto"`` refines float32 solves from this many points
#: (below, the products are too small for float32's speed to pay)
MIXED_MIN_POINTS = 1_000

#: relative residual each float32 solve of :meth:`IterativeSolver.refined_pcg`
#: aims for (float32 products leave about 1e-6 of the residual's norm)
MIXED_INNER_TOL = 1e-4

#: most value entries whose block ``eliminate_values`` factors densely
#: (10,000: 800 MB in float64 and about as many flops as five products at
#: N = 10,000, D = 100)
ELIMINATE_MAX_VALUES = 10_000
#: relative residual of the probe solves ``S⁻¹z`` of the log-likelihood
#: (their Lanczos tridiagonals give ``log|S|``, the solves ``tr(S⁻¹∂S)``)
PROBE_TOL = 1e-3


class IterativeSolver(Solver):
    """``(K + Σ)⁻¹`` by preconditioned conjugate gradients (``method="cg"``).

    A :class:`~gpgrad.solvers.base.Solver` whose ``cross_mean`` (posterior
    means at query points from the weights) is matrix-free, O(N M D).

    In torch, ``solve`` is differentiable: the returned ``x`` equals the CG
    solution and its gradient is that of the exact ``(K + Σ)⁻¹ R`` (one more
    CG solve in the backward pass, implicit differentiation).
    """

    method = "cg"

    def __init__(self, op: GramOperator, options: CG | None = None):
        super().__init__(op.kernel, op.blocks, op.noise)
        self.op = op
        self.opts = options or CG()
        self.N = op.N
        # CG converges in at most N steps in exact arithmetic; the cap only
        # stops a stagnating run (round-off), it is not a time budget
        self.max_iter = self.opts.max_iter or max(
            1000, min(self.N, 20 * int(math.sqrt(self.N)) + 5000)
        )
        self.jitter = 0.0
        self.tol = self.opts.tol
        if self.tol is None:
            single = B.is_tensor(op.like) and op.like.dtype == _torch_float32()
            single = single or getattr(op.like, "dtype", None) == np.float32
            self.tol = 1e-5 if single else 1e-8
        self.info = {}
        #: CG solves, right-hand-side columns and iterations so far
        self.stats = {"solves": 0, "columns": 0, "iterations": 0}
        self._rhs = None
        self._weights = None
        self._lanczos = None
        #: set by ``method="auto"`` where a dense factorization would fit: the
        #: first variance or log-determinant request then factors the system
        #: densely (exact, O(N³) once) instead of running block CG or SLQ
        self.dense_fallback = False
        self._dense = None
        #: ``(lo, hi, b)`` when this solver holds members lo:hi of a batch of b
        #: spread over processes: probes are drawn for all b members and
        #: sliced, so each member's estimate equals the whole batch's
        self.batch_members = None
        t0 = time.perf_counter()
        with B.no_grad(self.xp):
            self._diag = B.detach(op.diagonal())
            self._precond = self._build_preconditioner()
            self._schur = self._build_schur()
        #: seconds spent building the preconditioner
        self.stats["preconditioner_s"] = time.perf_counter() - t0

    # -- preconditioners ---------------------------------------------------------
    def _build_preconditioner(self):
        """``P⁻¹`` as a function (or None for plain CG).

        Sets ``self._plogdet`` (…,), ``self._psample(G1, G2)`` which maps
        standard normal draws to draws from N(0, P) (for the log-determinant
        estimator) and ``self.preconditioner`` (the name of the one used).
        """
        kind = self.opts.preconditioner
        if kind == "auto":
            kind = auto_preconditioner(self.op)
        self.preconditioner = kind
        if kind == "kronecker":
            return self._kronecker()
        if kind is None:
            pre = Identity(self._diag)
        elif kind == "jacobi":
            pre = Jacobi(self._diag)
        else:
            pre = self._pivoted_cholesky()
            if pre is None:
                self.preconditioner = "jacobi"
                pre = Jacobi(self._diag)
        self._pre = pre
        self._plogdet = pre.logdet
        self._psample = pre.sample
        self._pmul = pre.matmul
        return None if kind is None else pre.apply

    def _kronecker(self):
        """Block preconditioner from the Kronecker part of each point group.

        For points observed as values and full gradients it keeps
        ``Φ₀ + Σ_v`` for the values and ``(−Φ₁) ⊗ diag(ℓ⁻²) + σ̄²_g I`` for the
        gradients (σ̄²_g the mean gradient noise), dropping the value–gradient
        coupling ``φ' r`` and the ``φ'' r rᵀ`` term; the gradient part is
        inverted through the eigenvectors of ``−Φ₁`` (O(n³) once, O(n²D) per
        product). Other entries get their diagonal.
        """
        xp = self.xp
        op = self.op
        if not op.stationary:
            return self._jacobi()
        dg = self._diag
        noise = op.noise if op.noise is not None else 0.0 * dg
        offs = np.cumsum([0] + op.sizes)
        parts = []  # (start, stop, kind, data)
        logdet = 0.0 * dg[..., 0]
        covered = set()
        for g in op.groups:
            phi = op._group_profiles(g, g)
            for i, kind in g.parts:
                a, b = int(offs[i]), int(offs[i + 1])
                nz = noise[..., a:b]
                if kind == "value":
                    Kv = phi[0] + nz[..., None] * xp.eye(
                        b - a, dtype=dg.dtype, device=B.device_of(dg)
                    )
                    L = xp.linalg.cholesky(Kv)
                    parts.append((a, b, "chol", L))
                    logdet = logdet + 2.0 * xp.sum(xp.log(B.diagonal(L)), axis=-1)
                elif kind == "grad":
                    lam, V = B.eigh(-phi[1])
                    ell2 = (op.ls * op.ls)[..., 0, :]  # (*b, D)
                    sn = xp.mean(nz, axis=-1)[..., None, None]
                    den = lam[..., :, None] / ell2[..., None, :] + sn
                    floor = 1e-12 * xp.max(dg, axis=-1)[..., None, None]
                    den = xp.where(den > floor, den, floor)
                    D = g.Z.shape[-1]
                    den = xp.broadcast_to(den, tuple(den.shape[:-1]) + (D,))
                    parts.append((a, b, "kron", (V, den)))
                    logdet = logdet + xp.sum(xp.log(den), axis=(-2, -1))
                else:
                    continue
                covered.add(i)
        for i in range(len(op.blocks)):
            if i not in covered:
                a, b = int(offs[i]), int(offs[i + 1])
                d = dg[..., a:b]
                parts.append((a, b, "diag", d))
                logdet = logdet + xp.sum(xp.log(d), axis=-1)
        parts.sort(key=lambda t: t[0])
        self._plogdet = logdet

        def kron(V, den, R, inverse):
            n, D = den.shape[-2], den.shape[-1]
            k = R.shape[-1]
            Rf = xp.reshape(R, tuple(R.shape[:-2]) + (n, D * k))
            Rh = xp.reshape(
                B.matrix_transpose(V) @ Rf, tuple(Rf.shape[:-2]) + (n, D, k)
            )
            Rh = Rh / den[..., None] if inverse else Rh * xp.sqrt(den)[..., None]
            out = V @ xp.reshape(Rh, tuple(Rh.shape[:-3]) + (n, D * k))
            return xp.reshape(out, tuple(out.shape[:-2]) + (n * D, k))

        def run(R, inverse):
            outs = []
            for a, b, kind, data in parts:
                r = R[..., a:b, :]
                if kind == "chol":
                    if inverse:
                        outs.append(B.solve_triu_t(data, B.solve_tril(data, r)))
                    else:
                        outs.append(data @ r)
                elif kind == "kron":
                    outs.append(kron(data[0], data[1], r, inverse))
                else:
                    outs.append(
                        r / data[..., None] if inverse else xp.sqrt(data)[..., None] * r
                    )
            return xp.concat(outs, axis=-2)

        self._psample = lambda G1, G2: run(G2, False)
        return lambda R: run(R, True)

    def _jacobi(self):
        pre = Jacobi(self._diag)
        self._plogdet, self._psample, self._pmul = pre.logdet, pre.sample, pre.matmul
        return pre.apply

    def _pivoted_cholesky(self):
        """``P = LLᵀ + diag(K − LLᵀ) + Σ``, pivoting on whole points."""
        op = self.op
        noise = op.noise if op.noise is not None else 0.0 * self._diag
        kdiag = self._diag - noise
        L = point_pivoted_cholesky(
            op.kernel, op.groups, op.blocks, kdiag, max_rank=min(self.opts.rank, self.N)
        )
        if L is None:
            return None
        return PointCholesky(B.detach(L), kdiag, noise)

    # -- value elimination (Schur complement) -------------------------------------
    def _build_schur(self):
        """The Cholesky factor of the value block and the entry indices, or
        None where :attr:`CG.eliminate_values` does not apply."""
        want = self.opts.eliminate_values
        if want is False or not isinstance(self.op, GramOperator):
            return None
        if want == "auto" and self.preconditioner is not None:
            return None
        if self.preconditioner not in (None, "jacobi"):
            return None
        op = self.op
        offs = np.cumsum([0] + op.sizes)
        vb = [i for i, b in enumerate(op.blocks) if b.order == 0]
        db = [i for i, b in enumerate(op.blocks) if b.order != 0]
        if not vb or not db:
            return None
        iv = np.concatenate([np.arange(offs[i], offs[i + 1]) for i in vb])
        ig = np.concatenate([np.arange(offs[i], offs[i + 1]) for i in db])
        if len(iv) > ELIMINATE_MAX_VALUES:
            return None
        xp = self.xp
        dev = B.device_of(self._diag)

        def index(a):
            return a if B.is_numpy(xp) else B.to_namespace(a, xp, device=dev)

        with B.no_grad(xp):
            # a fresh copy, factored in place: one N×N buffer for the value
            # block and its factor
            A = self._value_gram()
            if op.noise is not None:
                nv = B.detach(xp.take(op.noise, index(iv), axis=-1))
                B.add_to_diagonal_(A, xp.broadcast_to(nv, tuple(A.shape[:-1])))
            try:
                # no jitter: a value block that needs it is left to plain CG
                L, ok, _ = B.cholesky_inplace(A)
            except Exception:  # noqa: BLE001 - numpy and torch raise different types
                return None
            if not bool(B.to_numpy(xp.all(ok))):
                return None
            if not bool(B.to_numpy(xp.all(xp.isfinite(B.diagonal(L))))):
                return None
        perm = np.concatenate([iv, ig])
        inv = np.empty_like(perm)
        inv[perm] = np.arange(len(perm))
        pre = None
        if self.preconditioner == "jacobi":
            pre = Jacobi(xp.take(self._diag, index(ig), axis=-1))
        return {
            "L": L,
            "iv": index(iv),
            "ig": index(ig),
            "inv": index(inv),
            "pre": pre,
            "precond": None if pre is None else pre.apply,
        }

    def schur_solve(self, R):
        """``(K + Σ)⁻¹ R`` by eliminating the value entries: with ``v`` the
        value and ``g`` the derivative entries,

        .. math::

            S = C_{gg} − C_{gv} A^{-1} C_{vg},\\quad A = C_{vv}
                \\ \\text{(Cholesky)},

            S x_g = R_g − C_{gv} A^{-1} R_v \\ \\text{(CG)},\\qquad
            x_v = A^{-1}(R_v − C_{vg} x_g).

        ``S⁻¹`` is a principal block of ``(K + Σ)⁻¹``, so its condition number
        is at most that of ``K + Σ``; on smooth kernels the values carry the
        low-degree trends behind the largest eigenvalue clusters and ``S``
        is far better conditioned. One product with ``S`` is one pass over the
        derivative coefficients and one over the value coefficients (``8 N² D``
        flops against ``6 N² D`` for a product with ``K + Σ``). The tolerance
        applies to the full system: CG on ``S`` stops at ``tol·‖R‖`` per
        column, and the returned ``relative_residual`` is recomputed from one
        product with ``K + Σ``.
        """
        xp = self.xp
        op = self.op
        sc = self._schur
        iv, ig = sc["iv"], sc["ig"]
        Rv, Rg = _rows(xp, R, iv), _rows(xp, R, ig)
        rhs = Rg - self._from_values(op, self._value_solve(Rv), Rg)

        def S(w):
            return self._schur_matmul(op, w)

        bnorm = _colnorm(xp, R)
        rnorm = _colnorm(xp, rhs)
        ratio = bnorm / xp.where(rnorm > 0, rnorm, xp.ones_like(rnorm))
        tol = self.tol * B.to_float(xp.min(ratio))
        S32 = self._float32_schur()
        if S32 is not None:
            xg, info = self.refined_pcg(S, S32, rhs, tol)
        else:
            xg, info = pcg(S, rhs, sc["precond"], tol=tol, max_iter=self.max_iter)
        cg_out = op.matmul(
            self._place(xp.zeros_like(Rv), xg), inputs="derivatives", with_noise=False
        )
        xv = self._value_solve(Rv - _rows(xp, cg_out, iv))
        x = self._place(xv, xg)
        res = R - op.matmul(x)
        bn = xp.where(bnorm > 0, bnorm, xp.ones_like(bnorm))
        rel = _colnorm(xp, res) / bn
        scale = B.to_float(xp.max(1.0 / ratio))
        info = dict(info)
        info["relative_residual"] = B.to_float(xp.max(rel))
        info["history"] = [h * scale for h in info["history"]]
        info["eliminated_values"] = int(Rv.shape[-2])
        return x, info

    def _value_solve(self, b):
        """``A⁻¹ b`` by the value block's Cholesky factor, in its precision."""
        L = self._schur["L"]
        b = B.to_namespace(b, self.xp, dtype=L.dtype)
        return B.solve_triu_t(L, B.solve_tril(L, b))

    def _place(self, xv, xg):
        """Value and derivative rows back in the observations' order."""
        xp = self.xp
        return xp.take(xp.concat([xv, xg], axis=-2), self._schur["inv"], axis=-2)

    def _from_values(self, op, u, like):
        """``C_gv u`` by ``op``'s products, in the precision of ``like`` (the
        derivative rows it is subtracted from)."""
        xp = self.xp
        u = B.to_namespace(u, xp, dtype=like.dtype)
        out = op.matmul(
            self._place(u, xp.zeros_like(like)),
            inputs="values",
            outputs="derivatives",
            with_noise=False,
        )
        return _rows(xp, out, self._schur["ig"])

    def _schur_matmul(self, op, w):
        """``S w = C_gg w − C_gv A⁻¹ C_vg w`` by ``op``'s products (the
        float64 operator or its float32 twin); ``A⁻¹`` in the factor's
        precision."""
        xp = self.xp
        out = self._from_derivatives(op, w)
        u = self._value_solve(_rows(xp, out, self._schur["iv"]))
        return _rows(xp, out, self._schur["ig"]) - self._from_values(op, u, w)

    def _from_derivatives(self, op, w, outputs=None):
        """``(K + Σ) [0; w]`` (all rows, or those ``outputs`` names) for
        derivative coefficients ``w`` (…, n_g, k), by ``op``'s products."""
        iv = self._schur["iv"]
        zv = self.xp.zeros(
            tuple(w.shape[:-2]) + (int(iv.shape[0]), w.shape[-1]),
            dtype=w.dtype,
            device=B.device_of(w),
        )
        return op.matmul(self._place(zv, w), inputs="derivatives", outputs=outputs)

    def _float32_schur(self):
        """``w ↦ S w`` with float32 products (the value block's solve stays in
        float64), or None where :attr:`CG.mixed_precision` does not apply."""
        want = self.opts.mixed_precision
        sc = self._schur
        if want is False or sc["precond"] is not None:
            return None
        if _dtype_name(self._diag) != "float64":
            return None
        npts = sum(int(g.X.shape[-2]) for g in self.op.groups)
        if want == "auto" and npts < MIXED_MIN_POINTS:
            return None
        if "op32" not in sc:
            sc["op32"] = self.op.astype(_float32(self.xp))
        op32 = sc["op32"]
        return lambda w: self._schur_matmul(op32, w)

    def refined_pcg(self, S, S32, b, tol):
        """CG for ``S x = b`` to relative residual ``tol`` by iterative
        refinement: each round solves ``S e = r`` for the current residual
        with float32 products (to :data:`MIXED_INNER_TOL`), adds ``e`` in
        float64 and recomputes ``r = b − S x`` with one float64 product.

        The float32 rounds stop when one fails to halve the residual (float32
        round-off amplified by a large condition number); plain float64 CG
        then continues from the refined ``x``. Returns ``(x, info)`` as
        :func:`pcg`, with ``info["float32_iterations"]`` and
        ``info["refinements"]``.
        """
        xp = self.xp

        def relres(r):
            return B.to_float(xp.max(_colnorm(xp, r) / bnorm))

        bnorm = _colnorm(xp, b)
        bnorm = xp.where(bnorm > 0, bnorm, xp.ones_like(bnorm))
        x = xp.zeros_like(b)
        r = b
        rel = relres(r)
        history = [rel]
        inner_total, rounds, f64 = 0, 0, 0
        f32 = _float32(xp)
        while rel > tol and rounds < 20:
            rn = _colnorm(xp, r)
            rn = xp.where(rn > 0, rn, xp.ones_like(rn))
            inner = max(MIXED_INNER_TOL, 0.5 * tol / rel)
            r32 = B.to_namespace(r / rn, xp, dtype=f32)
            e, inf = pcg(S32, r32, None, tol=inner, max_iter=self.max_iter)
            inner_total += inf["iterations"]
            x = x + B.to_namespace(e, xp, dtype=b.dtype) * rn
            r = b - S(x)
            f64 += 1
            rounds += 1
            new = relres(r)
            history.append(new)
            gained = new < 0.5 * rel
            rel = new
            if not gained:
                break
        if rel > tol:
            x, inf = pcg(S, b, None, tol=tol, max_iter=self.max_iter, x0=x)
            f64 += inf["iterations"] + 1
            history.extend(inf["history"][1:])
            rel = inf["relative_residual"]
        info = {
            "iterations": f64 + inner_total,
            "float32_iterations": inner_total,
            "refinements": rounds,
            "relative_residual": rel,
            "history": history,
        }
        return x, info

    # -- the solver interface ------------------------------------------------------
    def _cg(self, R):
        with B.no_grad(self.xp):
            Rd = B.detach(R)
            op = self.op

            def mm(V):
                return op.matmul(V)

            if self._schur is not None:
                x, info = self.schur_solve(Rd)
            else:
                x, info = pcg(
                    mm, Rd, self._precond, tol=self.tol, max_iter=self.max_iter
                )
        self.info = info
        self.stats["solves"] += 1
        self.stats["columns"] += int(Rd.shape[-1])
        self.stats["iterations"] += info["iterations"]
        if self._rhs is None and Rd.shape[-1] == 1:
            self._rhs = Rd  # the first single solve: the data (Lanczos start)
            self._weights = x  # its solution: the likelihood's weights
        if info["relative_residual"] > self.tol:
            warnings.warn(
                f"conjugate gradients stopped after {info['iterations']} iterations "
                f"at relative residual {info['relative_residual']:.2e} > tol "
                f"{self.tol:.0e}; raise max_iter, raise the observation "
                "noise, or try another preconditioner "
                "(gpgrad.CG(max_iter=..., preconditioner=...))",
                ConvergenceWarning,
                stacklevel=5,
            )
        return x

    def solve(self, R):
        """``(K + Σ)⁻¹ R`` for R (…, N, k), to the relative tolerance."""
        x = self._cg(R)
        if _needs_grad(R, self.op):
            # implicit differentiation: x + (K+Σ)⁻¹(R − (K+Σ)x) has the value x
            # (to tolerance) and the gradient of the exact solve
            resid = R - self.op.matmul(x)
            x = x + _solve_fn(self)(resid)
        return x

    def quad_factors(self, Ks):
        """``(P, Q)`` with ``Ksᵀ(K+Σ)⁻¹Ks ≈ PᵀQ``.

        ``variance="exact"`` (default): ``(F, F)`` from :func:`block_galerkin`,
        block conjugate gradients over all columns of Ks in one shared Krylov
        space, to the solver's tolerance (``(Ks, (K+Σ)⁻¹Ks)`` where autograd
        must flow through the variances). ``variance="lanczos"``: ``(F, F)`` with
        ``F = L_T⁻¹QᵀKs`` from the Lanczos cache (see :meth:`variance_bounds`),
        except where autograd must flow through the variances.
        """
        if self._variance_method(Ks) == "exact":
            if _needs_grad(Ks, self.op):
                return Ks, self.solve(Ks)
            if self.dense_fallback:
                return self._dense_solver().quad_factors(Ks)
            max_dim = self._basis_limit(Ks)
            with B.no_grad(self.xp):
                F, info = block_galerkin(
                    self.op.matmul, B.detach(Ks), tol=self.tol, max_dim=max_dim
                )
            self.stats["block_steps"] = self.stats.get("block_steps", 0) + info["steps"]
            self.stats["columns"] += info["products"]
            if info["relative_residual"] > self.tol:
                limited = max_dim < self.N and info["products"] >= max_dim
                why = (
                    f" (its basis reached the {max_dim} columns that fit in "
                    "memory: ask for fewer query points per call)"
                    if limited
                    else ""
                )
                warnings.warn(
                    f"block conjugate gradients for the variances stopped after "
                    f"{info['steps']} steps at relative residual "
                    f"{info['relative_residual']:.2e} > tol {self.tol:.0e}{why}",
                    ConvergenceWarning,
                    stacklevel=4,
                )
            return F, F
        F, _ = self.lanczos_factors(Ks)
        return F, F

    def _dense_solver(self):
        """The dense Cholesky solver of the same system, built on first use."""
        if self._dense is None:
            from .dense import DenseCholeskySolver

            self._dense = DenseCholeskySolver(self.kernel, self.blocks, self.noise)
        return self._dense

    def _basis_limit(self, Ks):
        """The largest Krylov basis (columns) the exact variances may grow to
        in the available memory; refuses, before any product, a query whose
        first block alone would not fit.

        :func:`block_galerkin` holds its basis (N, k) plus about five (N, M)
        temporaries for M queried entries; it stops at ``k = N`` where the
        projection is exact.
        """
        from .select import InsufficientMemoryError, _fmt, _itemsize, available_memory

        N, M = int(Ks.shape[-2]), int(Ks.shape[-1])
        batch = int(np.prod(Ks.shape[:-2])) if len(Ks.shape) > 2 else 1
        column = batch * N * _itemsize(Ks)
        avail = available_memory(Ks)
        room = int(0.8 * avail) - 5 * M * column
        if room < 2 * M * column:
            need = int(7 * M * column / 0.8)
            raise InsufficientMemoryError(
                f"the exact variances of {M} queried entries at {N} data rows "
                f"need at least {_fmt(need)} for their first Krylov block; "
                f"{_fmt(avail)} is available. Ask for fewer query points per "
                "call, read only .mean, or use "
                "GP(method=gpgrad.CG(variance='lanczos')) (an upper bound on "
                "each variance with a certified error, solver.variance_bounds)"
            )
        return min(self.N, room // column)

    def _variance_method(self, Ks):
        if _needs_grad(Ks, self.op):
            return "exact"
        return self.opts.variance

    def _lanczos_steps(self):
        return min(self.opts.variance_rank, self.N)

    def lanczos_factors(self, Ks):
        """Galerkin factors of ``Ksᵀ(K+Σ)⁻¹Ks`` from the Lanczos cache.

        Returns ``F`` (…, r, M) with ``FᵀF = KsᵀQ(Qᵀ(K+Σ)Q)⁻¹QᵀKs`` and the
        error bound of :meth:`variance_bounds` (…, M) for each column.
        """
        cache = self._lanczos_cache()
        with B.no_grad(self.xp):
            F, bound = cache.factors(B.detach(Ks))
        return F, bound

    def variance_bounds(self, Ks):
        """``(q, e)``: the Lanczos estimate ``q`` of each ``k_iᵀ(K+Σ)⁻¹k_i``
        and a bound ``e`` on its error, both (…, M), with

        .. math:: q_i ≤ k_iᵀ(K+Σ)^{-1}k_i ≤ q_i + e_i,\\qquad
            e_i = \\frac{\\|k_i − (K+Σ)QT^{-1}Q^\\top k_i\\|^2}{\\min Σ}

        (the Galerkin solution's error in the energy norm, bounded by the
        residual over the smallest eigenvalue of ``K + Σ``). The predictive
        variance ``prior − q`` is therefore never below the exact one and at
        most ``e`` above it.
        """
        F, bound = self.lanczos_factors(Ks)
        xp = self.xp
        return xp.sum(F * F, axis=-2), bound

    def _lanczos_cache(self):
        if self._lanczos is None:
            start = self._rhs
            if start is None:
                rng = np.random.default_rng(self.opts.seed)
                dg = self._diag
                start = B.to_namespace(
                    rng.standard_normal(tuple(dg.shape) + (1,)),
                    self.xp,
                    dtype=dg.dtype,
                    device=B.device_of(dg),
                )
            noise = self.op.noise
            lam_min = None if noise is None else B.detach(noise)
            with B.no_grad(self.xp):
                self._lanczos = LanczosCache(
                    self.op.matmul, start, self._lanczos_steps(), lam_min
                )
        return self._lanczos

    def cross_mean(self, qblocks, alpha):
        """``K_{QL} α`` (…, M) matrix-free."""
        return self.op.cross_matmul(qblocks, alpha[..., None])[..., 0]

    def cross(self, qblocks, alpha, joint=False):
        """Mean (…, M) matrix-free and quadratic-form factors for the posterior."""
        mean = self.cross_mean(qblocks, alpha)
        Ks = covariance(self.kernel, self.blocks, qblocks)
        P, Q = self.quad_factors(Ks)
        return mean, P, Q

    def _draw(self, rng, shape):
        """Standard normal probes ``shape`` (…, n, p) in the operator's type;
        a batch spread over processes draws for all members and keeps its own."""
        dg = self._diag
        part = self.batch_members
        if part is None:
            z = rng.standard_normal(shape)
        else:
            z = rng.standard_normal((part[2],) + shape[1:])[part[0] : part[1]]
        return B.to_namespace(z, self.xp, dtype=dg.dtype, device=B.device_of(dg))

    def _lift(self, w):
        """``[−A⁻¹ C_vg w; w]`` in the observations' order for derivative
        coefficients ``w`` (…, n_g, k): the full vector whose products with
        ``K + Σ`` reproduce those of the Schur complement,
        ``[−A⁻¹C_vg a; a]ᵀ ∂K [−A⁻¹C_vg b; b] = aᵀ ∂S b`` for any change
        ``∂K`` of the Gram matrix."""
        out = self._from_derivatives(self.op, w, outputs="values")
        u = self._value_solve(_rows(self.xp, out, self._schur["iv"]))
        return self._place(-u, w)

    def _value_gram(self):
        """``C_vv`` without noise from the operator's own profile matrices
        (Φ₀ between the groups the value blocks belong to; no closed-form
        assembly), a fresh array (concat copies even one block), with autograd
        where it is enabled."""
        xp = self.xp
        op = self.op
        groups = [
            next(g for g in op.groups if (i, "value") in g.parts)
            for i, b in enumerate(op.blocks)
            if b.order == 0
        ]
        return xp.concat(
            [
                xp.concat([op._group_profiles(ga, gb)[0] for gb in groups], axis=-1)
                for ga in groups
            ],
            axis=-2,
        )

    def _value_block(self):
        """The value block ``A = C_vv + Σ_v`` with autograd (the profile
        matrices the differentiable products use)."""
        xp = self.xp
        op = self.op
        A = self._value_gram()
        if op.noise is not None:
            nv = xp.take(op.noise, self._schur["iv"], axis=-1)
            n = int(nv.shape[-1])
            A = A + nv[..., None] * xp.eye(n, dtype=A.dtype, device=B.device_of(A))
        return A

    def log_marginal_likelihood(self, residual):
        """``log p(r)`` where the value entries are eliminated, else None.

        ``log|K + Σ| = log|A| + log|S|``: the value block's term is exact
        (its Cholesky factor is already at hand) and the Schur complement's
        is a stochastic Lanczos quadrature whose tridiagonals come from the
        CG solves ``S⁻¹ z_j`` of the probes themselves (:func:`cg_quadrature`;
        float32 products where :attr:`CG.mixed_precision` applies). ``S`` is
        far better conditioned than ``K + Σ``, so the quadrature converges in
        the iterations the solves take anyway.

        In torch the gradient is exact for the data-fit term and
        ``tr(A⁻¹ ∂A)``, and the Hutchinson estimate
        ``(1/p) Σ_j (S⁻¹z_j)ᵀ ∂S z_j`` of ``tr(S⁻¹ ∂S)`` with the same probes,
        applied through ``K + Σ`` by :meth:`_lift`: one differentiable
        product with ``1 + p`` columns and no solve in the backward pass.
        Fixed probes (``CG.seed``) make it a deterministic function of the
        hyperparameters.
        """
        if self._schur is None or self.dense_fallback:
            return None
        xp, op, sc = self.xp, self.op, self._schur
        n = int(residual.shape[-1])
        p = self.opts.probes
        grad = _needs_grad(residual, op)
        with B.no_grad(xp):
            rd = B.detach(residual)
            alpha = self._weights
            if alpha is None or not bool(B.to_numpy(xp.all(self._rhs[..., 0] == rd))):
                alpha = self._cg(rd[..., None])
            alpha = alpha[..., 0]
            logdet_a = 2.0 * xp.sum(xp.log(B.diagonal(sc["L"])), axis=-1)
            batch = tuple(self._diag.shape[:-1])
            Z = self._draw(
                np.random.default_rng(self.opts.seed),
                batch + (int(sc["ig"].shape[0]), p),
            )
            pre = sc["pre"]
            if pre is not None:
                Z = pre.sample(None, Z)
            PZ = Z if pre is None else pre.apply(Z)
            s2 = B.to_numpy(xp.sum(Z * PZ, axis=-2))
            U, record = self._probe_solve(Z)
            est = cg_quadrature(record, s2)
            logdet_s = B.to_namespace(est, xp, dtype=rd.dtype, device=B.device_of(rd))
            if pre is not None:
                logdet_s = logdet_s + pre.logdet
            quad = xp.sum(rd * alpha, axis=-1)
            value = (
                -0.5 * quad
                - 0.5 * (B.to_namespace(logdet_a, xp, dtype=rd.dtype) + logdet_s)
                - 0.5 * n * math.log(2 * math.pi)
            )
            if not grad:
                return value
            # the probes' partners, lifted to full vectors (see _lift)
            Wb = self._lift(PZ)
            Wa = self._lift(U)
            Ainv = B.cholesky_inverse(sc["L"])
        KV = op.matmul(xp.concat([alpha[..., None], Wb], axis=-1))
        quad_s = 2.0 * xp.sum(residual * alpha, axis=-1) - xp.sum(
            alpha * KV[..., 0], axis=-1
        )
        tr_s = xp.sum(Wa * KV[..., 1:], axis=(-2, -1)) / p
        tr_a = xp.sum(Ainv * self._value_block(), axis=(-2, -1))
        sur = -0.5 * quad_s - 0.5 * (tr_a + tr_s)
        return value + (sur - B.detach(sur))

    def _probe_solve(self, Z):
        """``S⁻¹ Z`` to :data:`PROBE_TOL` and the CG record of the solve
        (float32 products where mixed precision applies)."""
        xp = self.xp
        record = []
        S = self._float32_schur()
        if S is not None:
            rhs, precond = B.to_namespace(Z, xp, dtype=_float32(xp)), None
        else:
            op = self.op
            S, rhs, precond = (
                (lambda w: self._schur_matmul(op, w)),
                Z,
                self._schur["precond"],
            )
        U, info = pcg(
            S, rhs, precond, tol=PROBE_TOL, max_iter=self.max_iter, record=record
        )
        U = B.to_namespace(U, xp, dtype=Z.dtype)
        self.stats["probe_iterations"] = self.stats.get("probe_iterations", 0) + int(
            info["iterations"]
        )
        return U, record

    def logdet(self):
        """Preconditioned stochastic Lanczos quadrature estimate of
        ``log|K + Σ|`` (see the module docstring); exact from a dense
        factorization where :attr:`dense_fallback` is set."""
        if self.dense_fallback:
            return self._dense_solver().logdet()
        xp = self.xp
        op = self.op
        opts = self.opts
        dg = self._diag
        batch = tuple(dg.shape[:-1])
        N = self.N
        p = opts.probes
        rng = np.random.default_rng(opts.seed)
        with B.no_grad(xp):
            Zp = self._psample(
                self._draw(rng, batch + (N, p)), self._draw(rng, batch + (N, p))
            )
            Pinv = self._precond if self._precond is not None else (lambda R: R)
            est = _slq(xp, op.matmul, Pinv, Zp, min(opts.lanczos_steps, N))
            value = B.detach(self._plogdet) + est
        if _needs_grad(None, op):
            # Hutchinson: ∂ log|A| = tr(A⁻¹ ∂A) ≈ mean_j (A⁻¹z_j)ᵀ ∂A z_j
            Zr = self._draw(rng, batch + (N, p))
            U = B.detach(self._cg(Zr))
            AZ = op.matmul(Zr)
            sur = xp.sum(U * AZ, axis=(-2, -1)) / p
            value = value + (sur - B.detach(sur))
        return value


def block_galerkin(matmul, Ks, *, tol=1e-8, max_dim=None):
    """Factors of ``Ksᵀ A⁻¹ Ks`` by block Lanczos started at ``Ks`` itself.

    Block conjugate gradients in Lanczos form: all M columns share one Krylov
    space ``span{Ks, A Ks, A² Ks, …}`` (kept orthonormal by full
    reorthogonalization), so each step adds M directions that serve every
    column, and a column whose answer lies mostly in its neighbours'
    directions converges with theirs. With ``Q`` the basis and
    ``T = QᵀAQ = L_T L_Tᵀ``, the Galerkin solution ``Q T⁻¹ Qᵀ Ks`` has residual
    ``Ks − AQ T⁻¹QᵀKs``, checked column by column against ``tol·‖k_i‖``.

    Parameters
    ----------
    matmul : callable
        ``V ↦ A V`` for V (…, N, k).
    Ks : array (…, N, M)
    tol : float
        Relative residual at which to stop.
    max_dim : int or None
        Largest basis (default N, where the projection is exact).

    Returns
    -------
    F : array (…, r, M)
        ``FᵀF = KsᵀQ T⁻¹QᵀKs``, a lower bound on ``KsᵀA⁻¹Ks`` that converges to
        it.
    info : dict
        ``steps``, ``products`` (columns multiplied by A) and the largest
        final ``relative_residual``.
    """
    xp = B.namespace(Ks)
    N = Ks.shape[-2]
    max_dim = N if max_dim is None else min(max_dim, N)
    knorm = xp.sqrt(xp.sum(Ks * Ks, axis=-2))
    knorm = xp.where(knorm > 0, knorm, xp.ones_like(knorm))
    tr = B.matrix_transpose
    Qall = _orthonormal_block(xp, Ks, None)
    T = QK = F = None
    products = steps = 0
    worst = float("inf")
    while Qall is not None:
        k = Qall.shape[-1]
        Qn = Qall[..., :, k - _last_width(T, k) :] if T is not None else Qall
        AQn = matmul(Qn)
        products += int(Qn.shape[-1])
        steps += 1
        # T = QᵀAQ and QᵀKs grow by the new block's rows and columns only
        QtAQn = tr(Qall) @ AQn  # (…, k, s)
        if T is None:
            T = 0.5 * (QtAQn + tr(QtAQn))
            QK = tr(Qall) @ Ks
        else:
            k0 = T.shape[-1]
            new = QtAQn[..., :k0, :]
            corner = QtAQn[..., k0:, :]
            corner = 0.5 * (corner + tr(corner))
            T = xp.concat(
                [xp.concat([T, new], axis=-1), xp.concat([tr(new), corner], axis=-1)],
                axis=-2,
            )
            QK = xp.concat([QK, tr(Qn) @ Ks], axis=-2)
        try:
            LT = xp.linalg.cholesky(T)
        except Exception:  # noqa: BLE001 - numpy and torch raise different types
            # the basis lost orthogonality to round-off (float32): keep the
            # last factors, whose residual was measured
            break
        F = B.solve_tril(LT, QK)
        C = B.solve_triu_t(LT, F)
        # the residual Ks − AQC lies outside span(Q): only the newest block
        # reaches out of it, through W = (I − QQᵀ)AQₙ
        W = AQn - Qall @ QtAQn
        W = W - Qall @ (tr(Qall) @ W)
        R = W @ C[..., k - Qn.shape[-1] :, :]
        rel = xp.sqrt(xp.sum(R * R, axis=-2)) / knorm
        worst = B.to_float(xp.max(rel))
        if worst <= tol or k >= max_dim:
            break
        Qnext = _orthonormal_block(xp, W, Qall)
        if Qnext is None:
            break
        Qall = xp.concat([Qall, Qnext], axis=-1)
    return F, {"steps": steps, "products": products, "relative_residual": worst}


def _eps(a):
    if B.is_tensor(a):
        import torch

        return torch.finfo(a.dtype).eps
    return float(np.finfo(a.dtype).eps)


def _last_width(T, k):
    """Width of the newest block: the basis columns not yet in ``T``."""
    return k - T.shape[-1]


def _orthonormal_block(xp, V, Qall):
    """An orthonormal basis of ``V`` with ``Qall``'s span removed, without the
    directions that are numerically inside it; None if nothing is left.

    Two passes of block Gram-Schmidt, each followed by an eigenvalue-based
    Cholesky-QR (``W ← W V Λ^{-1/2}`` from ``WᵀW = VΛVᵀ``): GEMMs and one small
    eigendecomposition instead of a Householder QR of a tall matrix.
    """
    scale = xp.sqrt(xp.sum(V * V, axis=-2, keepdims=True))
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    W = V / scale
    for _ in range(2):
        if Qall is not None:
            W = W - Qall @ (B.matrix_transpose(Qall) @ W)
        G = B.matrix_transpose(W) @ W
        lam, U = B.eigh(0.5 * (G + B.matrix_transpose(G)))
        # a direction is new if its norm survived the projection (columns of
        # V had unit norm): below 1e-6 it is too close to round-off to keep
        floor = max(1e-12, (1e3 * _eps(W)) ** 2)
        keep = B.to_numpy(lam).reshape(-1, lam.shape[-1]).min(axis=0) > floor
        if not keep.any():
            return None
        cols = np.nonzero(keep)[0]
        idx = (
            cols if B.is_numpy(xp) else B.to_namespace(cols, xp, device=B.device_of(W))
        )
        U = xp.take(U, idx, axis=-1)
        lam = xp.take(lam, idx, axis=-1)
        W = W @ (U / xp.sqrt(lam)[..., None, :])
    return W


class LanczosCache:
    """``(K + Σ)⁻¹ ≈ Q T⁻¹ Qᵀ`` from ``m`` Lanczos steps (a LOVE-style cache).

    Lanczos with full reorthogonalization on ``A = K + Σ`` from ``start``
    gives an orthonormal ``Q`` (…, N, m), the tridiagonal ``T = QᵀAQ`` and
    the next vector and coefficient, ``AQ = QT + β q_{m+1} e_mᵀ``. A
    quadratic form ``kᵀA⁻¹k`` is approximated by its Galerkin projection
    ``kᵀQT⁻¹Qᵀk`` (a lower bound) at O(N m) per column, with the residual
    bound of :meth:`IterativeSolver.variance_bounds` computed from the same
    quantities (no further products with ``A``).

    Cost: ``m`` products with ``A`` and ``O(N m²)`` for reorthogonalization,
    once; memory ``N (m + 1)`` numbers.
    """

    def __init__(self, matmul, start, m, lam_min=None):
        xp = B.namespace(start)
        self.xp = xp
        N = start.shape[-2]
        batch = tuple(start.shape[:-2])
        Qb = xp.zeros(batch + (N, m + 1), dtype=start.dtype, device=B.device_of(start))
        nrm = xp.sqrt(xp.sum(start * start, axis=-2, keepdims=True))
        q = start / xp.where(nrm > 0, nrm, xp.ones_like(nrm))
        alphas, betas = [], []
        beta_last = 0.0 * nrm[..., 0, 0]
        k = 0
        for j in range(m):
            Qb[..., :, j] = q[..., 0]
            w = matmul(q)
            a = xp.sum(q * w, axis=-2, keepdims=True)
            alphas.append(a[..., 0, 0])
            k = j + 1
            Qj = Qb[..., :, : j + 1]
            # two passes of classical Gram-Schmidt against all previous vectors
            for _ in range(2):
                w = w - Qj @ (B.matrix_transpose(Qj) @ w)
            b = xp.sqrt(xp.sum(w * w, axis=-2, keepdims=True))
            scale = B.to_float(xp.max(xp.abs(xp.stack(alphas, axis=-1))))
            if B.to_float(xp.min(b)) <= 1e-12 * scale:
                # an invariant subspace: the projection is exact
                beta_last = 0.0 * b[..., 0, 0]
                q = 0.0 * w
                break
            q = w / b
            if j == m - 1:
                beta_last = b[..., 0, 0]
                break
            betas.append(b[..., 0, 0])
        self.k = k
        self.Q = Qb[..., :, :k]
        self.q_next = q
        self.beta = beta_last
        al = xp.stack(alphas, axis=-1)
        T = al[..., :, None] * xp.eye(k, dtype=al.dtype, device=B.device_of(al))
        if k > 1:
            be = xp.stack(betas[: k - 1], axis=-1)
            off = xp.zeros_like(T)
            idx = np.arange(k - 1)
            ii = (
                idx
                if B.is_numpy(xp)
                else B.to_namespace(idx, xp, device=B.device_of(T))
            )
            off[..., ii, ii + 1] = be
            T = T + off + B.matrix_transpose(off)
        self.T = T
        self.LT = xp.linalg.cholesky(T)
        self.lam_min = None if lam_min is None else xp.min(lam_min, axis=-1)

    def factors(self, Ks):
        """``(F, e)``: ``F = L_T⁻¹QᵀKs`` (…, k, M) and the error bound (…, M)."""
        xp = self.xp
        A = B.matrix_transpose(self.Q) @ Ks  # (…, k, M)
        F = B.solve_tril(self.LT, A)
        c = B.solve_triu_t(self.LT, F)  # T⁻¹QᵀKs
        kk = xp.sum(Ks * Ks, axis=-2)
        aa = xp.sum(A * A, axis=-2)
        qk = xp.sum(self.q_next * Ks, axis=-2)  # (…, M)
        bc = self.beta[..., None] * c[..., -1, :]
        # ‖k − AQc‖² with AQ = QT + β q_{m+1} e_mᵀ, Tc = Qᵀk, q_{m+1} ⟂ Q
        r2 = kk - aa - 2.0 * bc * qk + bc * bc
        r2 = xp.where(r2 > 0, r2, xp.zeros_like(r2))
        if self.lam_min is None:
            bound = xp.full_like(r2, float("inf"))
        else:
            bound = r2 / self.lam_min[..., None]
        return F, bound


def _slq(xp, matmul, pinv, Z, m):
    """``log|A| − log|P|`` by Lanczos on ``P⁻¹A`` in the P-inner product.

    Probes Z (…, N, p) are draws from N(0, P); for each, ``z̃ = P^{-1/2}z`` is
    standard normal and ``z̃ᵀ log(P^{-1/2}AP^{-1/2}) z̃ ≈ ‖z̃‖² e₁ᵀ log(T) e₁``
    with the Lanczos tridiagonal T started at ``P⁻¹z``.
    """

    def dot(a, b):
        return xp.sum(a * b, axis=-2, keepdims=True)

    u = pinv(Z)
    s2 = dot(u, Z)  # ‖z̃‖² = zᵀP⁻¹z
    s = xp.sqrt(s2)
    q, pq = u / s, Z / s  # q and P q
    Q, PQ = [q], [pq]
    alphas, betas = [], []
    for j in range(m):
        Kq = matmul(q)
        a = dot(q, Kq)
        # P w = K q − α P q − β P q_prev;  w = P⁻¹K q − α q − β q_prev
        pw = Kq - a * pq
        w = pinv(Kq) - a * q
        if j > 0:
            pw = pw - betas[-1][..., None, :] * PQ[-2]
            w = w - betas[-1][..., None, :] * Q[-2]
        # full reorthogonalization in the P-inner product
        for qq, pp in zip(Q, PQ):
            c = dot(pw, qq)
            w = w - c * qq
            pw = pw - c * pp
        alphas.append(a[..., 0, :])
        b2 = dot(w, pw)
        b = xp.sqrt(xp.where(b2 > 0, b2, xp.zeros_like(b2)))
        if j == m - 1 or B.to_float(xp.min(b)) <= 1e-10 * B.to_float(xp.max(xp.abs(a))):
            break
        betas.append(b[..., 0, :])
        q, pq = w / b, pw / b
        Q.append(q)
        PQ.append(pq)
    k = len(alphas)
    al = B.to_numpy(xp.stack(alphas, axis=-1))  # (…, p, k)
    T = np.zeros(al.shape + (k,))
    idx = np.arange(k)
    T[..., idx, idx] = al
    if k > 1:
        be = B.to_numpy(xp.stack(betas[: k - 1], axis=-1))
        T[..., idx[:-1], idx[1:]] = be
        T[..., idx[1:], idx[:-1]] = be
    theta, V = np.linalg.eigh(T)
    theta = np.maximum(theta, np.finfo(float).tiny)
    quad = np.sum(V[..., 0, :] ** 2 * np.log(theta), axis=-1)  # (…, p)
    est = (B.to_numpy(s2)[..., 0, :] * quad).mean(axis=-1)
    return B.to_namespace(est, xp, dtype=Z.dtype, device=B.device_of(Z))


def cg_quadrature(record, s2):
    """``mean_j s2_j e₁ᵀ log(T_j) e₁`` over the columns of a :func:`pcg` run.

    ``T_j`` is the Lanczos tridiagonal of column j, read off its CG step
    lengths ``α`` and direction updates ``β`` over the iterations it was
    active (Saad 2003, §6.7.3): ``T_kk = 1/α_k + β_{k−1}/α_{k−1}``,
    ``T_k,k+1 = √β_k / α_k``. With preconditioner ``P`` and right-hand
    sides ``z_j``, it is that of ``P^{-1/2} A P^{-1/2}`` started at
    ``P^{-1/2} z_j`` and ``s2_j = z_jᵀ P⁻¹ z_j``: the stochastic Lanczos
    quadrature of ``tr log(P^{-1/2} A P^{-1/2})`` from the solves
    themselves (Gardner et al. 2018, mBCG), no separate Lanczos run.
    Returns (…,) from ``record`` entries (…, p) and ``s2`` (…, p).
    """
    import scipy.linalg

    al = np.stack([r[0] for r in record], axis=-1)  # (…, p, m)
    be = np.stack([r[1] for r in record], axis=-1)
    act = np.stack([r[2] for r in record], axis=-1)
    s2 = np.asarray(s2, dtype=float)
    out = np.zeros(al.shape[:-1])
    tiny = np.finfo(float).tiny
    for idx in np.ndindex(*out.shape):
        # the steps while the column was active and had a positive step
        # length (a zero probe has none; a breakdown ends the sequence)
        ok = act[idx] & (al[idx] > 0)
        m = int(np.argmin(ok)) if not np.all(ok) else ok.size
        if m == 0:
            continue
        a = np.asarray(al[idx][:m], dtype=float)
        b = np.asarray(be[idx][:m], dtype=float)
        d = 1.0 / a
        d[1:] += b[:-1] / a[:-1]
        e = np.sqrt(np.maximum(b[:-1], 0.0)) / a[:-1]
        theta, V = scipy.linalg.eigh_tridiagonal(d, e)
        out[idx] = s2[idx] * np.sum(V[0] ** 2 * np.log(np.maximum(theta, tiny)))
    return out.mean(axis=-1)


def _needs_grad(R, op):
    params = list(op.kernel.parameters().values())
    return B.requires_grad(R, *params, *[b.X for b in op.blocks], op.noise)


def _solve_fn(solver):
    """A torch function ``R ↦ (K+Σ)⁻¹R`` whose forward returns zeros (its input
    is a residual that vanishes to tolerance) and whose backward solves."""
    import torch

    class _Solve(torch.autograd.Function):
        @staticmethod
        def forward(ctx, R):
            return torch.zeros_like(R)

        @staticmethod
        def backward(ctx, g):
            return solver._cg(g)

    return _Solve.apply
