"""Choosing how to solve the observations' linear system.

``GP(method=...)`` names the solver:

``"cholesky"``
    Dense Cholesky of the full (N_obs × N_obs) matrix: exact, O(N_obs³) time
    and O(N_obs²) memory.
``"cg"`` (or a :class:`~gpgrad.solvers.iterative.CG` with options)
    Preconditioned conjugate gradients on the matrix-free Gram product:
    O(N²D) memory-light products, for values and first derivatives of single
    stationary or dot-product kernels.
``"woodbury"``
    Gradient observations at N ≤ D points of a stationary kernel:
    O(N³D + N⁶) (:mod:`gpgrad.solvers.woodbury`).
``"statespace"``
    Kalman filter and smoother for 1-D inputs and Matérn 1/2 … 7/2 kernels
    (their ``Scale``, sums, a ``Constant``): exact, O(N) time and memory
    (:mod:`gpgrad.solvers.statespace`).
``"auto"``
    The state-space solver where it applies and N_obs ≥
    :data:`AUTO_STATESPACE_MIN_ROWS`; else Woodbury where it applies and
    N < D; otherwise CG where it applies and the cost model
    :func:`cg_cheaper` prefers it (many dimensions: where the dense matrix
    would also fit, the first request for variances or the log-determinant
    factors it densely, so those stay exact); otherwise dense Cholesky
    when the system has at most :data:`AUTO_DENSE_MAX_ROWS` rows and its
    matrix fits in half the available memory; otherwise CG where it applies.

Before any dense matrix is allocated its size is compared with the available
memory (``MemAvailable`` of ``/proc/meminfo``, or the free memory of the CUDA
device); a dense request that cannot fit raises
:class:`InsufficientMemoryError` naming the size needed, the size available
and the alternative.
"""

from __future__ import annotations

import math

from .. import backend as B
from .. import distributed
from ..covariance import batch_shape
from .dense import DenseCholeskySolver
from .iterative import CG, IterativeSolver
from .matfree import GramOperator, unsupported_reason
from .partitioned import BatchSpreadSolver, PartitionedOperator, spreads_batch
from .statespace import statespace_solver, statespace_unsupported_reason
from .woodbury import woodbury_solver, woodbury_unsupported_reason

__all__ = [
    "METHODS",
    "make_solver",
    "InsufficientMemoryError",
    "available_memory",
    "dense_memory",
    "AUTO_DENSE_MAX_ROWS",
    "AUTO_STATESPACE_MIN_ROWS",
    "matfree_memory",
]


class _Methods(tuple):
    """The method names, also accepting a configured :class:`CG` instance."""

    def __contains__(self, item):
        if isinstance(item, CG):
            return True
        return isinstance(item, str) and tuple.__contains__(self, item)


#: solver names accepted by ``GP(method=...)`` (a ``CG(...)`` instance too)
METHODS = _Methods(("auto", "cholesky", "cg", "woodbury", "statespace"))

#: ``"auto"`` uses the state-space solver (where it applies) from this many
#: observation entries: below it dense Cholesky is as fast
AUTO_STATESPACE_MIN_ROWS = 1_000

#: ``"auto"`` uses dense Cholesky up to this many rows (when it fits in memory):
#: beyond it a dense factorization takes minutes on a few CPU cores
AUTO_DENSE_MAX_ROWS = 12_000

#: the matrix-free solver's memory is checked only above this many bytes
MATFREE_GUARD_MIN_BYTES = 1 << 26

#: fraction of the available memory a dense matrix may take under ``"auto"``
AUTO_MEMORY_FRACTION = 0.5


class InsufficientMemoryError(MemoryError):
    """A dense covariance matrix would not fit in the available memory.

    Raised before anything is allocated; the message names the bytes needed,
    the bytes available and the alternative method.
    """


def available_memory(like=None) -> int:
    """Bytes available for new arrays: free CUDA memory for a CUDA tensor,
    otherwise ``MemAvailable`` from ``/proc/meminfo`` (or a large number where
    that cannot be read)."""
    if like is not None and B.is_tensor(like) and like.device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(like.device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 1 << 62  # pragma: no cover


def dense_memory(n_rows: int, itemsize: int, batch: int = 1) -> int:
    """Bytes a dense Cholesky solve needs: the matrix (factored in place where
    possible) plus ~10% of temporaries.

    .. math:: \\text{bytes} ≈ 1.1 · \\text{batch} · N_{obs}^2 · \\text{itemsize}
    """
    return int(1.1 * batch * n_rows * n_rows * itemsize)


def _fmt(nbytes):
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def _itemsize(like):
    if B.is_tensor(like):
        return like.element_size()
    return like.dtype.itemsize


def make_solver(gp, blocks, noise):
    """A solver for ``K + diag(noise)`` of the observation blocks.

    Parameters
    ----------
    gp : GP
        ``gp.method`` names the solver (see the module docstring).
    blocks : list of Block
    noise : array (…, N_obs)

    Returns
    -------
    Solver
        See :mod:`gpgrad.solvers.base` for the protocol.
    """
    part = distributed.current()
    if spreads_batch(part, gp.kernel, blocks):
        # whole batch members per process, each solved by the choice below
        return BatchSpreadSolver(gp, blocks, noise, part, make_solver)
    kind, options = choose(gp, blocks, noise)
    if kind == "cg":
        return _iterative(gp, blocks, noise, options)
    if kind == "cg+dense":
        # solves by CG; variances and the log-determinant exact and dense
        return _iterative(gp, blocks, noise, options, dense_fallback=True)
    if kind == "woodbury":
        return woodbury_solver(gp.kernel, blocks, noise)
    if kind == "statespace":
        return statespace_solver(gp, blocks, noise)
    like = blocks[0].X
    n_obs = int(noise.shape[-1])
    batch = math.prod(batch_shape(gp.kernel, blocks)) or 1
    _guard(dense_memory(n_obs, _itemsize(like), batch), like, n_obs, gp, blocks, noise)
    return _dense(gp, blocks, noise)


def choose(gp, blocks, noise):
    """Which solver :func:`make_solver` builds, without building it:
    ``("cg" | "cg+dense" | "woodbury" | "statespace" | "cholesky", options)``
    (``options`` the :class:`CG` options of the iterative kinds, else None).
    ``"cg+dense"`` solves by CG and answers variances and the
    log-determinant from a dense factor."""
    method = gp.method
    like = blocks[0].X
    n_obs = int(noise.shape[-1])
    batch = math.prod(batch_shape(gp.kernel, blocks)) or 1
    need = dense_memory(n_obs, _itemsize(like), batch)
    if isinstance(method, CG):
        return "cg", method
    if method == "cg":
        return "cg", CG()
    if method in ("woodbury", "statespace", "cholesky"):
        return method, None
    # auto
    if (
        n_obs >= AUTO_STATESPACE_MIN_ROWS
        and statespace_unsupported_reason(gp.kernel, blocks) is None
    ):
        return "statespace", None
    n_pts = sum(b.n for b in blocks)
    d = blocks[0].d
    if n_pts < d and woodbury_unsupported_reason(gp.kernel, blocks, noise) is None:
        return "woodbury", None
    avail = available_memory(like)
    cg_ok = unsupported_reason(gp.kernel, blocks) is None
    dense_fits = n_obs <= AUTO_DENSE_MAX_ROWS and need <= AUTO_MEMORY_FRACTION * avail
    if cg_ok and cg_cheaper(n_obs, _distinct_points(blocks), d):
        return ("cg+dense" if dense_fits else "cg"), CG()
    if dense_fits or not cg_ok:
        return "cholesky", None
    return "cg", CG()


#: ``"auto"`` never picks CG below this many rows: dense is exact (variances,
#: log marginal likelihood) and takes seconds there
AUTO_CG_MIN_ROWS = 2_000

#: CG iterations the cost model charges: about four times the 180–525 that
#: RBF at ℓ = 0.5√D needed to 1e-8 with the values eliminated (crossover
#: measurement and 102,000 rows; Matérn 5/2: 69–145), so that CG is chosen only
#: where it takes at most about a quarter of the dense time — a margin for the
#: many callers (Bayesian optimization) who then read variances, which the
#: automatic choice computes densely (see :func:`cg_cheaper`)
AUTO_CG_ITERATIONS = 2_000

#: CG flops cost this many times a dense Cholesky flop (the matrix-free
#: product's element-wise passes and the dense path's faster GEMMs)
AUTO_CG_FLOP_PENALTY = 3.0


def cg_cheaper(n_rows: int, n_points: int, d: int) -> bool:
    """Whether ``"auto"`` prefers CG over dense Cholesky for conditioning plus
    posterior means: the dense factorization's flops exceed those of
    :data:`AUTO_CG_ITERATIONS` matrix-free products (``8 N² D`` each) times
    :data:`AUTO_CG_FLOP_PENALTY`, and there are at least
    :data:`AUTO_CG_MIN_ROWS` rows.

    .. math:: N_{rows}^3/3 > 3 · 2000 · 8 N^2 D

    Measured crossover (idle 2-core CPU, RBF and Matérn 5/2, ℓ = 0.5√D,
    values and gradients, condition plus the gradient mean at 100 points,
    values eliminated in CG): in D = 50 CG is faster from 2,040 rows (RBF 0.19
    against 0.61 s); in D = 10 dense is faster at 2,200 rows (0.24 against
    0.41 s) and CG from 4,400 (0.65 against 1.41 s; 8,800 rows: 1.5 against
    6.2 s). For the mean alone CG pays from about 3,300 rows in D = 10; the
    model charges four times the iterations measured, so it switches where
    CG costs about a quarter of the dense time: at about 2,800 rows in
    D = 50 (measured ratio 0.24 at 4,080 rows), 6,500 in D = 20 and 11,900
    in D = 10 (measured 0.25 at 8,800). Where CG is chosen and the dense
    matrix would fit, variances and the log-determinant are computed densely
    and exactly on first request, so a caller who reads them pays at most
    about a quarter more than dense alone.
    """
    if n_rows < AUTO_CG_MIN_ROWS:
        return False
    dense = n_rows**3 / 3.0
    cg = AUTO_CG_FLOP_PENALTY * AUTO_CG_ITERATIONS * 8.0 * n_points**2 * d
    return dense > cg


def _distinct_points(blocks):
    """Points of the blocks, counting blocks at the same points once."""
    seen, total = [], 0
    for b in blocks:
        if any(b.X is x for x in seen):
            continue
        seen.append(b.X)
        total += b.n
    return total


def _iterative(gp, blocks, noise, options, dense_fallback=False):
    reason = unsupported_reason(gp.kernel, blocks)
    if reason is not None:
        raise ValueError(
            f"method='cg' cannot be used here: {reason}; use method='cholesky'"
        )
    like = blocks[0].X
    op = GramOperator(gp.kernel, blocks, noise)  # allocates no N×N array yet
    part = distributed.current()
    if part is not None:
        # each worker checks its own row slice's memory
        return IterativeSolver(PartitionedOperator(op, part), options)
    n_pts = sum(int(g.X.shape[-2]) for g in op.groups)
    batch = math.prod(batch_shape(gp.kernel, blocks)) or 1
    need = matfree_memory(n_pts, _itemsize(like), batch)
    avail = available_memory(like) if need > MATFREE_GUARD_MIN_BYTES else need
    if need > avail:
        raise InsufficientMemoryError(
            f"the matrix-free solver's profile matrices for {n_pts} points need "
            f"{_fmt(need)} but only {_fmt(avail)} is available"
            + (" on the CUDA device" if _on_cuda(like) else "")
            + "; use fewer points or a smaller batch, or partition the product "
            "across processes or devices (gpgrad.distributed.init)"
        )
    solver = IterativeSolver(op, options)
    # not across processes: each rank holds a row slice, not the system
    solver.dense_fallback = dense_fallback
    return solver


def matfree_memory(n_points: int, itemsize: int, batch: int = 1) -> int:
    """Bytes the matrix-free CG solver needs: three N×N profile matrices, the
    cached ``Φ₀ + Φ₁ ⊙ ZZᵀ`` and one N×N temporary of the product, N the number
    of distinct points.

    .. math:: \\text{bytes} ≈ 5.4 · \\text{batch} · N^2 · \\text{itemsize}
    """
    return int(5.4 * batch * n_points * n_points * itemsize)


def _on_cuda(like):
    return B.is_tensor(like) and like.device.type == "cuda"


def _guard(need, like, n_obs, gp, blocks, noise):
    """Refuse a dense system that cannot fit, before allocating it."""
    avail = available_memory(like)
    if need <= avail:
        return
    if woodbury_unsupported_reason(gp.kernel, blocks, noise) is None:
        alt = "method='woodbury' (gradient observations, few points) or method='cg'"
    elif unsupported_reason(gp.kernel, blocks) is None:
        alt = "method='cg' (matrix-free conjugate gradients)"
    else:
        alt = (
            "fewer observations, or values and first derivatives of a single "
            "stationary kernel with method='cg'"
        )
    raise InsufficientMemoryError(
        f"the dense covariance matrix of the {n_obs} observations needs "
        f"{_fmt(need)} but only {_fmt(avail)} is available; use {alt}"
    )


def _dense(gp, blocks, noise):
    return DenseCholeskySolver(gp.kernel, blocks, noise)
