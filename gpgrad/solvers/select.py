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
    N < D; otherwise dense Cholesky when the
    system has at most :data:`AUTO_DENSE_MAX_ROWS` rows and its matrix fits in
    half the available memory; otherwise CG where it applies.

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
from .partitioned import PartitionedOperator
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
    method = gp.method
    like = blocks[0].X
    n_obs = int(noise.shape[-1])
    batch = math.prod(batch_shape(gp.kernel, blocks)) or 1
    need = dense_memory(n_obs, _itemsize(like), batch)
    if isinstance(method, CG):
        return _iterative(gp, blocks, noise, method)
    if method == "cg":
        return _iterative(gp, blocks, noise, CG())
    if method == "woodbury":
        return woodbury_solver(gp.kernel, blocks, noise)
    if method == "statespace":
        return statespace_solver(gp, blocks, noise)
    if method == "cholesky":
        _guard(need, like, n_obs, gp, blocks, noise)
        return _dense(gp, blocks, noise)
    # auto
    if (
        n_obs >= AUTO_STATESPACE_MIN_ROWS
        and statespace_unsupported_reason(gp.kernel, blocks) is None
    ):
        return statespace_solver(gp, blocks, noise)
    n_pts = sum(b.n for b in blocks)
    d = blocks[0].d
    if n_pts < d and woodbury_unsupported_reason(gp.kernel, blocks, noise) is None:
        return woodbury_solver(gp.kernel, blocks, noise)
    avail = available_memory(like)
    if n_obs <= AUTO_DENSE_MAX_ROWS and need <= AUTO_MEMORY_FRACTION * avail:
        return _dense(gp, blocks, noise)
    if unsupported_reason(gp.kernel, blocks) is None:
        return _iterative(gp, blocks, noise, CG())
    _guard(need, like, n_obs, gp, blocks, noise)
    return _dense(gp, blocks, noise)


def _iterative(gp, blocks, noise, options):
    reason = unsupported_reason(gp.kernel, blocks)
    if reason is not None:
        raise ValueError(
            f"method='cg' cannot be used here: {reason}; use method='cholesky'"
        )
    op = GramOperator(gp.kernel, blocks, noise)
    part = distributed.current()
    if part is not None:
        op = PartitionedOperator(op, part)
    return IterativeSolver(op, options)


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
