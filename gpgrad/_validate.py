"""Checks of arrays at the public door, shared by the kernels and the
functionals (below both in the layering)."""

from __future__ import annotations

import numpy as np

from . import backend as B

__all__ = ["as_points"]


def _shape(a):
    return tuple(a.shape)


def _is_array(a):
    return isinstance(a, np.ndarray) or B.is_tensor(a)


def _check_finite(a, what):
    if B.is_tensor(a):
        ok = bool(a.detach().isfinite().all())
    else:
        ok = bool(np.all(np.isfinite(a)))
    if not ok:
        raise ValueError(f"{what} contains NaN or infinite values")


def _float_array(a, what):
    if B.is_tensor(a):
        if a.is_complex():
            raise TypeError(f"{what} must be real, got a complex tensor")
        if not a.is_floating_point():
            a = a.double()
        return a
    if isinstance(a, (str, bytes)):
        raise TypeError(f"{what} must be an array of numbers, got a string")
    try:
        raw = np.asarray(a)
        complex_ = raw.dtype.kind == "c"
        arr = None if complex_ else np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"{what} must be an array of numbers, got {type(a).__name__}"
        ) from None
    if complex_:
        # float64 conversion would silently drop the imaginary part
        raise TypeError(f"{what} must be real, got complex values")
    return arr


def _as_points(X, what="X"):
    """Points as an array (..., n, d); a 1-D array is n points in 1-D."""
    if X is None:
        raise TypeError(f"{what} must be an array of points, got None")
    X = _float_array(X, what)
    if X.ndim == 0:
        raise ValueError(f"{what} must have shape (n, d), got a scalar")
    if X.ndim == 1:
        X = X[:, None]
    if X.shape[-2] == 0:
        raise ValueError(f"{what} has no points (shape {_shape(X)})")
    if X.shape[-1] == 0:
        raise ValueError(f"{what} has zero columns (shape {_shape(X)})")
    _check_finite(X, what)
    return X


as_points = _as_points
