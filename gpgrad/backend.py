"""The only place where numpy and torch differ.

Everything else in gpgrad is written once against an array namespace
(``array_api_compat``); the few operations that the array API standard lacks
or that need backend-specific care (triangular solves, in-place Cholesky,
random numbers, conversion at the public door) live here.
"""

from __future__ import annotations

import contextlib

import array_api_compat
import numpy as np

__all__ = [
    "namespace",
    "is_torch",
    "is_numpy",
    "is_tensor",
    "device_of",
    "to_namespace",
    "to_float",
    "to_numpy",
    "matrix_transpose",
    "solve_tril",
    "solve_triu_t",
    "cholesky_inplace",
    "diagonal",
    "diag_embed",
    "add_to_diagonal_",
    "set_diagonal_",
    "mirror_upper_to_lower_",
    "random_normal",
    "ndtr",
    "eigh",
    "eps",
    "as_index",
    "detach",
    "no_grad",
    "grad_enabled",
    "requires_grad",
]


def _torch():
    import torch

    return torch


def namespace(*arrays):
    """The array namespace of ``arrays`` (numpy or torch), ignoring scalars."""
    arrays = [a for a in arrays if a is not None and not isinstance(a, (int, float))]
    if not arrays:
        return array_api_compat.array_namespace(np.zeros(0))
    return array_api_compat.array_namespace(*arrays)


def is_torch(xp) -> bool:
    return array_api_compat.is_torch_namespace(xp)


def is_numpy(xp) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def is_tensor(x) -> bool:
    return array_api_compat.is_torch_array(x)


def device_of(x):
    return array_api_compat.device(x)


def to_namespace(x, xp, dtype=None, device=None):
    """Convert ``x`` (array, tensor, list or scalar) into ``xp``'s arrays.

    Torch tensors keep their autograd history (``Tensor.to``), so gradients flow
    back to hyperparameters and inputs given as tensors.
    """
    if is_torch(xp):
        torch = _torch()
        if isinstance(x, torch.Tensor):
            return x.to(device=device, dtype=dtype)
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    if is_tensor(x):
        raise TypeError(
            "expected a numpy array for the numpy backend, got a torch tensor; "
            "use backend='torch' or pass tensor.detach().cpu().numpy()"
        )
    return np.asarray(x, dtype=dtype)


def to_float(x) -> float:
    """A Python float from a 0-d array or tensor (one host sync on GPU)."""
    if is_tensor(x):
        return float(x.detach().cpu())
    return float(x)


def to_numpy(x):
    if is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def matrix_transpose(x):
    return x.swapaxes(-1, -2) if isinstance(x, np.ndarray) else x.transpose(-1, -2)


def solve_tril(L, B):
    """``L⁻¹ B`` for lower-triangular ``L`` (..., n, n) and ``B`` (..., n, k)."""
    if is_tensor(L):
        torch = _torch()
        return torch.linalg.solve_triangular(L, B, upper=False)
    import scipy.linalg

    return scipy.linalg.solve_triangular(L, B, lower=True, check_finite=False)


def solve_triu_t(L, B):
    """``L⁻ᵀ B`` for lower-triangular ``L`` (..., n, n) and ``B`` (..., n, k)."""
    if is_tensor(L):
        torch = _torch()
        return torch.linalg.solve_triangular(L.transpose(-1, -2), B, upper=True)
    import scipy.linalg

    return scipy.linalg.solve_triangular(
        L, B, lower=True, trans="T", check_finite=False
    )


def cholesky_inverse(L):
    """``(L Lᵀ)⁻¹`` (..., n, n) from the lower Cholesky factor ``L``."""
    if is_tensor(L):
        return _torch().cholesky_inverse(L)
    n = L.shape[-1]
    eye = np.broadcast_to(np.eye(n, dtype=L.dtype), L.shape)
    return solve_triu_t(L, solve_tril(L, eye))


def cholesky_inplace(A):
    """Try the lower Cholesky factor of symmetric ``A`` (..., n, n).

    Only ``A``'s upper triangle is read. Returns ``(L, ok, intact)``: the
    factor, a boolean array over the batch, and whether ``A`` still holds its
    original values. Where possible ``A``'s memory is reused for ``L`` (no
    second n×n buffer): a 2-D numpy matrix through LAPACK's ``potrf`` and torch
    tensors that need no autograd through ``torch.linalg.cholesky_ex(out=...)``;
    ``A`` is then lost when the factorization fails.
    """
    if is_tensor(A):
        torch = _torch()
        if A.requires_grad:
            L, info = torch.linalg.cholesky_ex(A.mT, upper=False)
            return L, info == 0, True
        info = torch.empty(A.shape[:-2], dtype=torch.int32, device=A.device)
        # factor the transposed view: it is column-major, LAPACK's (and
        # cuSOLVER's) own layout, so no internal n×n copy is made; A is
        # symmetric, so it is the same matrix
        At = A.mT
        L, info = torch.linalg.cholesky_ex(At, upper=False, out=(At, info))
        return L, info == 0, False
    if A.ndim == 2 and A.flags.c_contiguous:
        import scipy.linalg.lapack as lapack

        potrf = lapack.get_lapack_funcs("potrf", (A,))
        # A is symmetric and C-ordered, so A.T is the same matrix in Fortran
        # order: factor it in place (lower, OpenBLAS's faster variant; it reads
        # A's upper triangle only) and keep the factor in Fortran order.
        M, info = potrf(A.T, lower=True, overwrite_a=True, clean=False)
        if info == 0:
            _zero_strict_upper_(M)
            return M, np.asarray(True), True
        return A, np.asarray(False), False
    # batches: numpy's Cholesky reads the lower triangle, so pass the transpose
    At = A.swapaxes(-1, -2)
    try:
        return np.linalg.cholesky(At), np.ones(A.shape[:-2], dtype=bool), True
    except np.linalg.LinAlgError:
        pass
    L = np.empty_like(A)
    ok = np.ones(A.shape[:-2], dtype=bool)
    for idx in np.ndindex(*A.shape[:-2]):
        try:
            L[idx] = np.linalg.cholesky(At[idx])
        except np.linalg.LinAlgError:
            ok[idx] = False
    return L, ok, True


def _zero_strict_upper_(L, tile: int = 1024):
    n = L.shape[-1]
    for r0 in range(0, n, tile):
        r1 = min(n, r0 + tile)
        L[..., r0:r1, r1:] = 0
        L[..., r0:r1, r0:r1] = np.tril(L[..., r0:r1, r0:r1])


def diagonal(A):
    """A view or copy of the last two axes' diagonal (..., n)."""
    if is_tensor(A):
        return A.diagonal(dim1=-2, dim2=-1)
    return np.diagonal(A, axis1=-2, axis2=-1)


def add_to_diagonal_(A, v):
    """``A[..., i, i] += v[..., i]`` in place (numpy or torch)."""
    if is_tensor(A):
        A.diagonal(dim1=-2, dim2=-1).add_(v)
        return A
    n = A.shape[-1]
    idx = np.arange(n)
    A[..., idx, idx] += v
    return A


def set_diagonal_(A, v):
    if is_tensor(A):
        A.diagonal(dim1=-2, dim2=-1).copy_(v)
        return A
    n = A.shape[-1]
    idx = np.arange(n)
    A[..., idx, idx] = v
    return A


def mirror_upper_to_lower_(A, tile: int = 1024):
    """Copy the upper triangle of ``A`` (..., n, n) onto its lower one, in place.

    Works tile by tile so that no n×n temporary is created.
    """
    n = A.shape[-1]
    for r0 in range(0, n, tile):
        r1 = min(n, r0 + tile)
        if r0 > 0:
            A[..., r0:r1, :r0] = matrix_transpose(A[..., :r0, r0:r1])
        t = A[..., r0:r1, r0:r1]
        if is_tensor(A):
            torch = _torch()
            upper = torch.triu(t)
            A[..., r0:r1, r0:r1] = upper + torch.triu(t, 1).transpose(-1, -2)
        else:
            upper = np.triu(t)
            A[..., r0:r1, r0:r1] = upper + np.triu(t, 1).swapaxes(-1, -2)
    return A


def random_normal(xp, shape, dtype, device, seed):
    """Standard normal draws in ``xp`` (a seed, a Generator, or None)."""
    if is_torch(xp):
        torch = _torch()
        if isinstance(seed, torch.Generator):
            gen = seed
        else:
            gen = torch.Generator(device=device or "cpu")
            if seed is None:
                gen.seed()
            else:
                gen.manual_seed(int(seed))
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype or np.float64)


def ndtr(z):
    """The standard normal CDF Φ(z), differentiable for tensors."""
    if is_tensor(z):
        return _torch().special.ndtr(z)
    from scipy.special import ndtr as _ndtr

    return _ndtr(z)


def eigh(A):
    if is_tensor(A):
        return _torch().linalg.eigh(A)
    return np.linalg.eigh(A)


def diag_embed(v):
    """A (..., n, n) matrix with ``v`` (..., n) on its diagonal."""
    if is_tensor(v):
        return _torch().diag_embed(v)
    out = np.zeros(v.shape + (v.shape[-1],), dtype=v.dtype)
    return set_diagonal_(out, v)


def eps(dtype) -> float:
    """Machine epsilon of a numpy or torch floating dtype."""
    if not isinstance(dtype, np.dtype) and type(dtype).__module__ == "torch":
        return float(_torch().finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def as_index(idx, like):
    """Integer indices ``idx`` (numpy) in the namespace and device of ``like``."""
    if is_tensor(like):
        return _torch().as_tensor(np.asarray(idx), device=like.device)
    return np.asarray(idx)


def detach(a):
    """``a`` cut from autograd (numpy arrays pass through)."""
    return a.detach() if is_tensor(a) else a


def no_grad(xp):
    """A context that disables autograd for torch and does nothing for numpy."""
    if is_torch(xp):
        return _torch().no_grad()
    return contextlib.nullcontext()


def grad_enabled(xp) -> bool:
    """Whether torch records autograd operations now (False for numpy)."""
    return is_torch(xp) and _torch().is_grad_enabled()


def requires_grad(*arrays) -> bool:
    """Whether autograd is on and any of ``arrays`` is a tensor that needs it."""
    arrays = [a for a in arrays if is_tensor(a)]
    if not arrays or not _torch().is_grad_enabled():
        return False
    return any(a.requires_grad for a in arrays)
