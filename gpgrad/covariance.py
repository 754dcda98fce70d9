"""Cross-covariances of functional sets: the one place blocks are laid out.

A list of functionals ``[F_1, …, F_r]`` is a vector of ``N = Σ n_t k_t`` entries,
functional after functional, each point-major (see :mod:`gpgrad.functionals`).
:func:`covariance` fills the (..., N_A, N_B) matrix of their cross-covariances
block by block and chunk by chunk (a few points of ``F_A`` at a time), writing
each chunk straight into the final buffer, so the only temporaries are
chunk-sized: the value+gradient Gram matrix of 1000 points in 10 dimensions
(11,000 rows) is assembled with about 100 MB beside its own 968 MB.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import backend as B
from ._typing import Array, Device, DType, Namespace

if TYPE_CHECKING:
    from .functionals import Functional
    from .kernels.base import Kernel

__all__ = ["Block", "as_blocks", "covariance", "point_covariance"]

#: elements in one chunk's largest temporary (~32 MB in float64)
CHUNK_ELEMENTS = 1 << 22


class Block:
    """A functional converted to one backend: points ``X`` (..., n, d) and
    direction vectors ``U`` (nU, k, order, d)."""

    __slots__ = ("f", "X", "U", "order", "n", "k", "d")

    def __init__(
        self, f: Functional, xp: Namespace, dtype: DType, device: Device
    ) -> None:
        self.f = f
        self.X = B.to_namespace(f.X, xp, dtype=dtype, device=device)
        self.U = B.to_namespace(f.directions(), xp, dtype=dtype, device=device)
        self.order = f.order
        self.n, self.d = f.n, f.d
        self.k = f.k

    @property
    def size(self) -> int:
        return self.n * self.k

    def sub(self, i0: int, i1: int) -> Block:
        """The block of points ``i0:i1`` (itself when that is all of them)."""
        if i0 == 0 and i1 == self.n:
            return self
        sub = copy.copy(self)
        sub.X, sub.U = self.points(i0, i1)
        sub.n = i1 - i0
        return sub

    def to(self, device: Device) -> Block:
        """The same block with its arrays on ``device`` (torch tensors)."""
        new = copy.copy(self)
        new.X, new.U = self.X.to(device), self.U.to(device)
        return new

    def points(self, i0: int, i1: int) -> tuple[Array, Array]:
        X = self.X[..., i0:i1, :]
        U = self.U[i0:i1] if self.U.shape[0] == self.n and self.n > 1 else self.U
        return X, U


def as_blocks(
    functionals: Sequence[Functional], xp: Namespace, dtype: DType, device: Device
) -> list[Block]:
    return [Block(f, xp, dtype, device) for f in functionals]


def _kernel_batch_shape(kernel):
    shape = ()
    for name, v in kernel.parameters().items():
        if isinstance(v, (int, float)):
            continue
        s = tuple(v.shape)
        if name.rsplit(".", 1)[-1] == "lengthscale":
            s = s[:-1]
        shape = np.broadcast_shapes(shape, s)
    return tuple(shape)


def batch_shape(kernel: Kernel, blocks: Sequence[Block]) -> tuple[int, ...]:
    shape = _kernel_batch_shape(kernel)
    for b in blocks:
        shape = np.broadcast_shapes(shape, tuple(b.X.shape[:-2]))
    return tuple(shape)


def _contract_chunk(kernel, xp, XA, UA, XB, UB, pA, pB):
    ctx = kernel._prepare(xp, XA, XB, pA + pB)
    dA = [UA[..., t, :] for t in range(pA)]
    dB = [UB[..., t, :] for t in range(pB)]
    return kernel._contract(ctx, dA, dB)


def _split_view(xp, view, shape):
    """``view`` reshaped to ``shape`` without a copy (splitting axes only)."""
    if B.is_tensor(view):
        return view.view(shape)
    out = view.reshape(shape)
    if not np.shares_memory(out, view):  # pragma: no cover - split is a view
        raise RuntimeError("internal error: block view was copied")
    return out


def covariance(
    kernel: Kernel,
    A: Sequence[Block],
    Bl: Sequence[Block] | None = None,
    *,
    out: Array | None = None,
    xp: Namespace | None = None,
    upper_only: bool = False,
) -> Array:
    """Cross-covariance matrix of two lists of :class:`Block`.

    Parameters
    ----------
    kernel : Kernel
    A, Bl : list of Block
        ``Bl=None`` computes the symmetric Gram matrix of ``A``: only the upper
        triangle is computed and then mirrored.
    out : array (..., N_A, N_B), optional
        Buffer to fill (for example a preallocated, reused matrix).
    upper_only : bool, default False
        With ``Bl=None``, fill only the upper triangle (all a Cholesky
        factorization reads) and leave the strict lower triangle uninitialized.

    Returns
    -------
    array (..., N_A, N_B)
    """
    symmetric = Bl is None
    if symmetric:
        Bl = A
    like = A[0].X
    xp = xp or B.namespace(like)
    batch = batch_shape(kernel, list(A) + list(Bl))
    NA = sum(b.size for b in A)
    NB = sum(b.size for b in Bl)
    if out is None:
        out = xp.empty(batch + (NA, NB), dtype=like.dtype, device=B.device_of(like))
    nbatch = max(1, math.prod(batch))
    offA = np.cumsum([0] + [b.size for b in A])
    offB = np.cumsum([0] + [b.size for b in Bl])
    for ia, ba in enumerate(A):
        for ib, bb in enumerate(Bl):
            if symmetric and ib < ia:
                continue
            view = out[..., offA[ia] : offA[ia + 1], offB[ib] : offB[ib + 1]]
            v4 = _split_view(xp, view, batch + (ba.n, ba.k, bb.n, bb.k))
            per_point = max(1, ba.k * bb.n * bb.k * nbatch)
            step = max(1, CHUNK_ELEMENTS // per_point)
            diag = symmetric and ia == ib
            for i0 in range(0, ba.n, step):
                i1 = min(ba.n, i0 + step)
                j0 = i0 if diag else 0
                XA, UA = ba.points(i0, i1)
                XB, UB = bb.points(j0, bb.n)
                res = _contract_chunk(kernel, xp, XA, UA, XB, UB, ba.order, bb.order)
                v4[..., i0:i1, :, j0:, :] = res
    if symmetric and not upper_only:
        B.mirror_upper_to_lower_(out)
    return out


def point_covariance(kernel: Kernel, block: Block, other: Block | None = None) -> Array:
    """The prior covariance of each point's entries with themselves.

    Returns an array (..., n, k, k): for point p, the covariance of its k
    entries, computed pointwise (no n×n matrix). With ``other`` (a block at
    the same points) the covariance of ``block``'s entries with ``other``'s
    at each point, (..., n, k, k').
    """
    other = block if other is None else other
    xp = B.namespace(block.X)
    batch = batch_shape(kernel, [block])
    # the point axis becomes a leading batch axis, so per-batch hyperparameters
    # (aligned with the trailing batch axes) need X broadcast to the full batch
    X = xp.broadcast_to(block.X, batch + tuple(block.X.shape[-2:]))
    nb = X.ndim - 2
    Xp = xp.moveaxis(X, -2, 0)[..., None, :]  # (n, *b, 1, d)

    def directions(b):
        U = b.U
        if U.shape[0] == b.n and b.n > 1:
            U = xp.reshape(U, (b.n,) + (1,) * nb + (1,) + tuple(U.shape[1:]))
        return U

    res = _contract_chunk(
        kernel,
        xp,
        Xp,
        directions(block),
        Xp,
        directions(other),
        block.order,
        other.order,
    )
    k, k2 = block.k, other.k
    res = xp.broadcast_to(res, (block.n,) + batch + (1, k, 1, k2))
    res = xp.reshape(res, (block.n,) + batch + (k, k2))
    return xp.moveaxis(res, 0, -3)
