"""Linear functionals of the process at points: what is observed or asked.

One constructor per kind, each taking points ``X`` (..., n, d) and, for an
observation, targets; a query omits the targets. Every functional is a set of
*entries*: ``k`` per point, in the order documented below, laid out point-major
(point 0's entries first).

===================  =========================================  ==============
constructor          entries at each point                      targets
===================  =========================================  ==============
``values``           ``f(x)``                                   (..., n)
``gradients``        ``∂f/∂x_i``, i = 0..d−1                    (..., n, d)
``partials``         ``∂f/∂x_{dims[p]}``                        (..., n)
``directional``      ``u_pᵀ∇f(x)``                              (..., n)
``second_partials``  ``∂²f/∂x_i∂x_j``                           (..., n)
``hessians``         ``∂²f/∂x_i∂x_j``, i ≤ j, row-major          (..., n, d, d)
===================  =========================================  ==============

Noise is a variance: a scalar or one value per target entry (anything that
broadcasts to the targets' shape); ``None`` takes the GP's default for that
kind.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any

import numpy as np

from . import backend as B
from ._typing import Array, ArrayLike, Namespace
from ._validate import _as_points, _check_finite, _float_array, _is_array, _shape

__all__ = [
    "Functional",
    "KINDS",
    "values",
    "gradients",
    "partials",
    "directional",
    "second_partials",
    "hessians",
]


def _index_array(idx, n, d, what):
    """Per-point coordinate indices: an int or an (n,) integer array."""
    if B.is_tensor(idx):
        idx = idx.detach().cpu().numpy()
    arr = np.asarray(idx)
    if arr.dtype.kind == "f":
        if not np.all(arr == np.round(arr)):
            raise TypeError(f"{what} must be integers, got {arr.tolist()}")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full(n, int(arr))
    if arr.shape != (n,):
        raise ValueError(f"{what} must be an int or have shape ({n},), got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= d):
        bad = int(arr[(arr < 0) | (arr >= d)][0])
        raise ValueError(
            f"{what} has index {bad} but the inputs have {d} dimensions "
            f"(valid: 0..{d - 1})"
        )
    return arr


class Functional:
    """A set of linear functionals of the process at points ``X``.

    Attributes
    ----------
    kind : str
        ``"value"``, ``"gradient"``, ``"partial"``, ``"directional"``,
        ``"second"`` or ``"hessian"``.
    X : array (..., n, d)
    y : array or None
        Targets in the shape of the constructor's documentation.
    noise : None, float or array
        Noise variance of each target entry.
    order : int
        Number of derivatives of the process in each entry (0, 1 or 2).
    """

    kind = "value"
    order = 0
    #: constructor arguments beside X, y and noise (index or direction
    #: arrays), saved with the observation by :func:`gpgrad.save`
    fields: tuple = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KINDS[cls.kind] = cls

    @classmethod
    def build(
        cls,
        kind: str,
        X: ArrayLike,
        y: ArrayLike | None = None,
        noise: ArrayLike | None = None,
        **fields: Any,
    ) -> Functional:
        """A functional of a registered ``kind`` from its parts (the inverse
        of ``kind``, ``X``, ``y``, ``noise`` and ``fields``)."""
        if kind not in KINDS:
            raise ValueError(f"unknown functional kind {kind!r}; known: {list(KINDS)}")
        return KINDS[kind](X, y=y, noise=noise, **fields)

    def __init__(
        self, X: ArrayLike, y: ArrayLike | None = None, noise: ArrayLike | None = None
    ) -> None:
        self.X = _as_points(X)
        self.y = None if y is None else self._check_targets(y)
        self.noise = None if noise is None else self._check_noise(noise)

    # -- shapes ------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.X.shape[-2]

    @property
    def d(self) -> int:
        return self.X.shape[-1]

    @property
    def k(self) -> int:
        """Entries per point."""
        return 1

    @property
    def size(self) -> int:
        return self.n * self.k

    def target_shape(self) -> tuple[int, ...]:
        return _shape(self.X)[:-1]

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        obs = "observed" if self.y is not None else "query"
        return f"{self.kind}s({obs}, n={self.n}, d={self.d})"

    # -- validation --------------------------------------------------------
    def _check_targets(self, y):
        y = _float_array(y, f"{self.kind} targets")
        want = self.target_shape()
        got = _shape(y)
        if got != want:
            # allow targets without the batch dims of X only if they match exactly
            raise ValueError(
                f"{self.kind} targets must have shape {want} for X of shape "
                f"{_shape(self.X)}, got {got}"
            )
        _check_finite(y, f"{self.kind} targets")
        return y

    def _check_noise(self, noise):
        if not _is_array(noise):
            if isinstance(noise, (list, tuple)):
                noise = np.asarray(noise, dtype=np.float64)
            elif isinstance(noise, numbers.Real) and not isinstance(noise, bool):
                noise = float(noise)
            else:
                raise TypeError(
                    f"{self.kind} noise must be a number or an array, "
                    f"got {type(noise).__name__}"
                )
        if _is_array(noise):
            try:
                np.broadcast_shapes(_shape(noise), self.target_shape())
            except ValueError:
                raise ValueError(
                    f"{self.kind} noise of shape {_shape(noise)} does not broadcast "
                    f"to the targets' shape {self.target_shape()}"
                ) from None
            _check_finite(noise, f"{self.kind} noise")
            neg = bool((noise < 0).any())
        else:
            if not np.isfinite(noise):
                raise ValueError(f"{self.kind} noise must be finite, got {noise}")
            neg = noise < 0
        if neg:
            raise ValueError(
                f"{self.kind} noise is a variance and must be non-negative"
            )
        return noise

    # -- what the covariance code needs --------------------------------------
    def directions(self) -> np.ndarray:
        """Direction vectors (nU, k, order, d) as a numpy array, nU ∈ {1, n}."""
        return np.zeros((1, 1, 0, self.d))

    def flat_targets(self, y: Array) -> Array:
        """Targets (..., n, *) flattened to entries (..., n·k)."""
        return y

    def flat_noise(self, noise: ArrayLike, xp: Namespace, like: Array) -> Array:
        """Per-entry noise (..., n·k) in ``like``'s namespace."""
        full = B.to_namespace(noise, xp, dtype=like.dtype, device=B.device_of(like))
        shape = self.target_shape()
        full = xp.broadcast_to(full, tuple(np.broadcast_shapes(_shape(full), shape)))
        return self.flat_targets(full)

    def with_targets(
        self, y: ArrayLike | None, noise: ArrayLike | None = None
    ) -> Functional:
        """The same functionals at the same points with other targets (and
        noise); ``with_targets(None)`` is a query."""
        new = copy.copy(self)
        new.y = None if y is None else new._check_targets(y)
        new.noise = None if noise is None else new._check_noise(noise)
        return new

    def query(self) -> Functional:
        """The same functional without targets (for prediction)."""
        return self.with_targets(None)


#: the functional classes by kind, in the order they are defined
KINDS: dict = {}


class _Values(Functional):
    kind = "value"
    order = 0


class _Gradients(Functional):
    kind = "gradient"
    order = 1

    @property
    def k(self) -> int:
        return self.d

    def target_shape(self) -> tuple[int, ...]:
        return _shape(self.X)

    def directions(self) -> np.ndarray:
        return np.eye(self.d)[None, :, None, :]

    def flat_targets(self, y: Array) -> Array:
        return y.reshape(tuple(y.shape[:-2]) + (y.shape[-2] * y.shape[-1],))


class _Partials(Functional):
    kind = "partial"
    order = 1
    fields = ("dims",)

    def __init__(self, X, dims, y=None, noise=None):
        X = _as_points(X)
        self.dims = _index_array(dims, X.shape[-2], X.shape[-1], "partials dims")
        super().__init__(X, y, noise)

    def directions(self) -> np.ndarray:
        U = np.zeros((self.n, 1, 1, self.d))
        U[np.arange(self.n), 0, 0, self.dims] = 1.0
        return U


class _Directional(Functional):
    kind = "directional"
    order = 1
    fields = ("U",)

    def __init__(self, X, U, y=None, noise=None):
        X = _as_points(X)
        U = _float_array(U, "directions U")
        if B.is_tensor(U):
            U = U.detach().cpu().numpy()
        if U.ndim == 1:
            U = U[None, :]
        n, d = X.shape[-2], X.shape[-1]
        if U.ndim != 2 or U.shape[-1] != d or U.shape[0] not in (1, n):
            raise ValueError(
                f"directions U must have shape ({n}, {d}) or ({d},) for X of shape "
                f"{_shape(X)}, got {_shape(U)}"
            )
        _check_finite(U, "directions U")
        self.U = U
        super().__init__(X, y, noise)

    def directions(self) -> np.ndarray:
        return self.U[:, None, None, :]


class _SecondPartials(Functional):
    kind = "second"
    order = 2
    fields = ("i", "j")

    def __init__(self, X, i, j, y=None, noise=None):
        X = _as_points(X)
        n, d = X.shape[-2], X.shape[-1]
        self.i = _index_array(i, n, d, "second_partials i")
        self.j = _index_array(j, n, d, "second_partials j")
        super().__init__(X, y, noise)

    def directions(self) -> np.ndarray:
        U = np.zeros((self.n, 1, 2, self.d))
        U[np.arange(self.n), 0, 0, self.i] = 1.0
        U[np.arange(self.n), 0, 1, self.j] = 1.0
        return U


def hessian_pairs(d: int) -> list[tuple[int, int]]:
    """The distinct Hessian entries (i, j), i ≤ j, in row-major order."""
    return [(i, j) for i in range(d) for j in range(i, d)]


def hessian_index(d: int) -> np.ndarray:
    """``idx[i, j]``: the position of entry (min(i,j), max(i,j)) among the pairs."""
    pos = {p: t for t, p in enumerate(hessian_pairs(d))}
    return np.array([[pos[(min(i, j), max(i, j))] for j in range(d)] for i in range(d)])


class _Hessians(Functional):
    kind = "hessian"
    order = 2

    @property
    def k(self) -> int:
        return self.d * (self.d + 1) // 2

    def target_shape(self) -> tuple[int, ...]:
        return _shape(self.X) + (self.d,)

    def _check_targets(self, y):
        y = super()._check_targets(y)
        yt = y.swapaxes(-1, -2) if not B.is_tensor(y) else y.transpose(-1, -2)
        diff = float(B.to_numpy(abs(y - yt)).max(initial=0.0))
        scale = float(B.to_numpy(abs(y)).max(initial=0.0))
        if diff > 1e-8 * max(scale, 1e-300):
            raise ValueError(
                f"hessian targets must be symmetric, but H and its transpose differ "
                f"by up to {diff:.3g}; pass (H + H.swapaxes(-1, -2)) / 2 to average "
                "the two measurements of each mixed partial"
            )
        return y

    def directions(self) -> np.ndarray:
        pairs = hessian_pairs(self.d)
        U = np.zeros((1, len(pairs), 2, self.d))
        for t, (i, j) in enumerate(pairs):
            U[0, t, 0, i] = 1.0
            U[0, t, 1, j] = 1.0
        return U

    def flat_targets(self, y: Array) -> Array:
        pairs = hessian_pairs(self.d)
        ii = [p[0] for p in pairs]
        jj = [p[1] for p in pairs]
        flat = y[..., ii, jj]  # (..., n, q)
        return flat.reshape(tuple(flat.shape[:-2]) + (flat.shape[-2] * flat.shape[-1],))


# --------------------------------------------------------------------------
# public constructors


def values(
    X: ArrayLike, y: ArrayLike | None = None, noise: ArrayLike | None = None
) -> Functional:
    """Function values ``f(x_p)``; targets (..., n)."""
    return _Values(X, y, noise)


def gradients(
    X: ArrayLike, G: ArrayLike | None = None, noise: ArrayLike | None = None
) -> Functional:
    """Full gradients ``∇f(x_p)``; targets (..., n, d), entry order i = 0..d−1."""
    return _Gradients(X, G, noise)


def partials(
    X: ArrayLike,
    dims: int | ArrayLike,
    y: ArrayLike | None = None,
    noise: ArrayLike | None = None,
) -> Functional:
    """One partial derivative per point, ``∂f/∂x_{dims[p]}`` at ``x_p``.

    ``dims`` is an int (the same coordinate everywhere) or an (n,) int array.
    """
    return _Partials(X, dims, y, noise)


def directional(
    X: ArrayLike,
    U: ArrayLike,
    y: ArrayLike | None = None,
    noise: ArrayLike | None = None,
) -> Functional:
    """Directional derivatives ``u_pᵀ∇f(x_p)``; ``U`` is (n, d) or one (d,)
    direction for all points (not normalized: the derivative scales with |u|)."""
    return _Directional(X, U, y, noise)


def second_partials(
    X: ArrayLike,
    i: int | ArrayLike,
    j: int | ArrayLike,
    y: ArrayLike | None = None,
    noise: ArrayLike | None = None,
) -> Functional:
    """Second partial derivatives ``∂²f/∂x_i∂x_j`` at each point; ``i`` and
    ``j`` are ints or (n,) int arrays."""
    return _SecondPartials(X, i, j, y, noise)


def hessians(
    X: ArrayLike, H: ArrayLike | None = None, noise: ArrayLike | None = None
) -> Functional:
    """Full Hessians; targets (..., n, d, d), symmetric. Entries are the
    d(d+1)/2 distinct ``(i, j)``, i ≤ j, row-major; noise may be given per
    (..., n, d, d) entry (only i ≤ j is used) or as a scalar."""
    return _Hessians(X, H, noise)
