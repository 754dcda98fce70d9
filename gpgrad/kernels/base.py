"""The kernel contract, and the chain rule applied once for every kernel.

Every derivative cross-covariance gpgrad computes is a contraction

.. math::

    \\operatorname{cov}\\bigl(\\partial_{a_1\\cdots a_p} f(x),\\;
    \\partial_{b_1\\cdots b_q} f(x')\\bigr)
    = \\partial_{a_1}\\cdots\\partial_{a_p}\\,\\partial'_{b_1}\\cdots\\partial'_{b_q}
      \\,k(x, x')

of the kernel with direction vectors ``a_t`` (acting on ``x``) and ``b_t``
(acting on ``x'``). Every kernel here has the form ``k = φ(s(x, x'))`` with a
scalar input map ``s``; by Faà di Bruno's formula the derivative along a list of
directions is a sum over the set partitions π of that list,

.. math::

    \\partial_{t_1}\\cdots\\partial_{t_n}\\,φ(s)
    = \\sum_{π} φ^{(|π|)}(s) \\prod_{B\\in π} \\partial_B\\, s ,

where ``∂_B s`` is the derivative of ``s`` along the directions in block ``B``.
A kernel therefore writes only its profile ``φ`` with its derivatives
(:class:`RadialKernel` subclasses) and names its input map (:class:`InputMap`);
this module does the rest. For the stationary map ``s = ½ δᵀPδ`` and the
dot-product map ``s = xᵀPx'`` the derivatives of ``s`` vanish beyond second
order, so only partitions into blocks of one or two directions contribute.

Shapes, used throughout: points ``XA`` (..., n, d) and ``XB`` (..., m, d);
directions on ``x`` as arrays (..., nA, c, d) with ``nA`` equal to n or 1 (shared
by all points), directions on ``x'`` as (..., nB, k, d) with ``nB`` equal to m or
1. A contraction returns an array that broadcasts to (..., n, c, m, k).
"""

from __future__ import annotations

import copy
import itertools
import math
from functools import cache
from typing import Any

import numpy as np

from .. import backend as B
from .._typing import Array, ArrayLike, Namespace, Param

__all__ = ["Kernel", "RadialKernel", "InputMap", "positive_param"]


# --------------------------------------------------------------------------
# hyperparameters


def positive_param(
    name: str,
    value: Param,
    *,
    allow_vector: bool = False,
    kernel: str = "",
    allow_zero: bool = False,
) -> Param:
    """Validate a positive (or, with ``allow_zero``, non-negative) finite
    hyperparameter: a number, a list or array, or a tensor (kept as it is, so
    that autograd flows through it). The one check used by every kernel."""
    what = "non-negative" if allow_zero else "positive"
    rule = "finite and non-negative" if allow_zero else "positive and finite"

    def ok(v, finite, xp_all):
        return xp_all(finite) and xp_all(v >= 0 if allow_zero else v > 0)

    if B.is_tensor(value):
        v = value.detach()
        if not ok(v, v.isfinite(), lambda t: bool(t.all())):
            raise ValueError(f"{kernel} {name} must be {rule}, got {value!r}")
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim > 1 and not allow_vector:
            raise ValueError(
                f"{kernel} {name} must be a scalar or a 1-D array, "
                f"got shape {arr.shape}"
            )
        if arr.size == 0:
            raise ValueError(f"{kernel} {name} must not be empty")
        if not ok(arr, np.isfinite(arr), np.all):
            raise ValueError(f"{kernel} {name} must be {rule}, got {arr.tolist()}")
        return arr
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise TypeError(
            f"{kernel} {name} must be a {what} number or array, "
            f"got {type(value).__name__}"
        )
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{kernel} {name} must be a {what} number or array, "
            f"got {type(value).__name__}"
        ) from None
    if not ok(v, math.isfinite(v), bool):
        raise ValueError(f"{kernel} {name} must be {rule}, got {v}")
    return v


def _as(xp, value, like):
    """``value`` as an array of ``like``'s namespace, dtype and device."""
    return B.to_namespace(value, xp, dtype=like.dtype, device=B.device_of(like))


def _ndim(value) -> int:
    return 0 if isinstance(value, (int, float)) else len(value.shape)


def batch_scalar(xp: Namespace, value: Param, like: Array, trailing: int) -> Array:
    """A scalar hyperparameter (or one per batch member, shape (*b,)) shaped to
    broadcast against arrays with ``trailing`` non-batch axes."""
    v = _as(xp, value, like)
    return xp.reshape(v, tuple(v.shape) + (1,) * trailing)


def batch_vector(xp: Namespace, value: Param, like: Array, trailing: int) -> Array:
    """A per-dimension hyperparameter (shape (), (d,) or (*b, d)) shaped
    (*b, 1, ..., 1, d) with ``trailing`` singleton axes before d."""
    v = _as(xp, value, like)
    if v.ndim == 0:
        v = xp.reshape(v, (1,))
    return xp.reshape(v, tuple(v.shape[:-1]) + (1,) * trailing + (v.shape[-1],))


def vector_size(value: Param) -> int:
    """How many entries a per-dimension hyperparameter has (1 for a scalar)."""
    if isinstance(value, (int, float)):
        return 1
    shape = tuple(value.shape)
    return shape[-1] if shape else 1


# --------------------------------------------------------------------------
# set partitions for Faà di Bruno


@cache
def set_partitions(n: int, max_block: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """All partitions of ``range(n)`` into blocks of at most ``max_block``."""

    def rec(items):
        if not items:
            yield ()
            return
        first, rest = items[0], items[1:]
        for size in range(0, min(max_block, len(items)) - 1 + 1):
            for others in itertools.combinations(rest, size):
                block = (first,) + others
                remaining = tuple(i for i in rest if i not in others)
                for tail in rec(remaining):
                    yield (block,) + tail

    return tuple(rec(tuple(range(n))))


# --------------------------------------------------------------------------
# the kernel contract


#: gpgrad's kernel classes by name (filled as the classes are defined)
REGISTRY: dict = {}


class Kernel:
    """Base class of all gpgrad kernels.

    Subclasses implement ``_prepare`` (the geometry of two point sets) and
    ``_contract`` (a derivative cross-covariance for lists of directions).
    ``order`` is the number of times the process is mean-square differentiable:
    derivative observations and queries of order ``p`` need ``order >= p``.
    """

    #: mean-square differentiability of the process (math.inf: any order)
    order: float = math.inf
    #: names of the hyperparameters, in ``parameters()`` order
    _param_names: tuple = ()
    #: constructor arguments that are settings, not hyperparameters (saved
    #: as plain values by :func:`gpgrad.save`), e.g. a polynomial's degree
    _settings: tuple = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # gpgrad's own public kernel classes register themselves by name, so
        # that files written by gpgrad.save can name them (and nothing else)
        # (the abstract bases of this module are not kernels one can build)
        public = not cls.__name__.startswith("_") and cls.__module__ != __name__
        if public and cls.__module__.startswith("gpgrad."):
            REGISTRY[cls.__name__] = cls

    # -- hyperparameters ---------------------------------------------------
    def parameters(self) -> dict[str, Param]:
        """The hyperparameters by name (composites prefix their children's)."""
        return {name: getattr(self, name) for name in self._param_names}

    def replace(self, **params: Param) -> Kernel:
        """A copy with some hyperparameters replaced (names as in
        :meth:`parameters`)."""
        new = copy.copy(self)
        own = {k: v for k, v in params.items() if "." not in k}
        unknown = [k for k in own if k not in self._param_names]
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no hyperparameter {unknown[0]!r}; "
                f"it has {list(self.parameters())}"
            )
        for name, value in own.items():
            setattr(new, name, value)
        new._validate()
        return new

    def _validate(self):
        pass

    @property
    def input_dim(self) -> int | None:
        """The number of input dimensions fixed by an ARD lengthscale, else None."""
        return None

    def check_input_dim(self, d: int) -> None:
        """Raise if a per-dimension hyperparameter disagrees with ``d`` columns."""
        for name, value in self.parameters().items():
            if name.rsplit(".", 1)[-1] != "lengthscale":
                continue
            size = vector_size(value)
            if size not in (1, d):
                raise ValueError(
                    f"X has {d} columns but the kernel's {name} has {size} entries"
                )

    def check_order(self, p: int, what: str = "derivative") -> None:
        """Raise unless the process is ``p`` times mean-square differentiable."""
        if p > self.order:
            names = {0: "never", 1: "once", 2: "twice"}
            can = names.get(self.order, f"{self.order} times")
            raise ValueError(
                f"{self!r} is {can} mean-square differentiable, but {what} "
                f"needs derivatives of order {p} of the process; use a smoother "
                "kernel (e.g. Matern52 or RBF)"
            )

    # -- algebra -----------------------------------------------------------
    def __add__(self, other: Kernel) -> Kernel:
        from .composite import Sum

        if not isinstance(other, Kernel):
            return NotImplemented
        return Sum(self, other)

    def __mul__(self, other: Kernel | Param) -> Kernel:
        from .composite import Product, Scale

        if isinstance(other, Kernel):
            return Product(self, other)
        if (
            isinstance(other, (int, float))
            or B.is_tensor(other)
            or isinstance(other, np.ndarray)
        ):
            return Scale(self, other)
        return NotImplemented

    __rmul__ = __mul__

    # -- evaluation --------------------------------------------------------
    def __call__(self, X1: ArrayLike, X2: ArrayLike | None = None) -> Array:
        """The value covariance matrix ``k(X1, X2)`` of shape (..., n1, n2)."""
        from .._validate import _as_points

        X1 = _as_points(X1, "X1")
        X2 = X1 if X2 is None else _as_points(X2, "X2")
        xp = B.namespace(X1, X2)
        self.check_input_dim(X1.shape[-1])
        ctx = self._prepare(xp, X1, X2, 0)
        out = self._contract(ctx, [], [])
        shape = tuple(np.broadcast_shapes(tuple(out.shape[:-4]), X1.shape[:-2]))
        out = xp.broadcast_to(out, shape + (X1.shape[-2], 1, X2.shape[-2], 1))
        return xp.reshape(out, shape + (X1.shape[-2], X2.shape[-2]))

    def _prepare(self, xp, XA, XB, max_order: int):
        raise NotImplementedError

    def _contract(self, ctx, dA: list, dB: list):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = []
        for k, v in self.parameters().items():
            if B.is_tensor(v):
                v = v.detach().cpu().numpy()
            if isinstance(v, np.ndarray):
                v = np.round(v, 6).tolist() if v.ndim else float(v)
            elif isinstance(v, float):
                v = float(f"{v:.6g}")
            args.append(f"{k}={v}")
        return f"{type(self).__name__}({', '.join(args)})"


class _Ctx:
    """What a kernel precomputes for a pair of point sets."""

    __slots__ = ("xp", "like", "map", "phi")

    def __init__(self, xp, like):
        self.xp = xp
        self.like = like
        self.phi = None
        self.map = None


# --------------------------------------------------------------------------
# input maps


class InputMap:
    """The scalar input map ``s(x, x')`` of a radial kernel, with the
    derivatives of ``s`` contracted with direction vectors.

    ``prepare`` returns ``(s, state)`` with ``s`` shaped (..., n, 1, m, 1).
    ``derivative(state, dirs)`` returns the derivative of ``s`` along the listed
    directions, each ``(array, side)`` with side ``"A"`` (on x) or ``"B"``
    (on x'), broadcastable to (..., n, c, m, k), or ``None`` where it is zero.
    """

    #: largest number of directions with a non-zero derivative of s
    max_block: int = 2

    def prepare(
        self, xp: Namespace, XA: Array, XB: Array, kernel: RadialKernel
    ) -> tuple[Array, Any]:
        raise NotImplementedError

    def derivative(
        self, xp: Namespace, state: Any, dirs: list[tuple[Array, str]]
    ) -> Array | None:
        raise NotImplementedError


def _dir_on_rows(xp, a, G):
    """``Σ_d G[..., i, j, d] a[..., i|0, c, d]`` shaped (..., n, c, m, 1)."""
    return (a @ B.matrix_transpose(G))[..., None]


def _dir_on_cols(xp, b, G):
    """``Σ_d G[..., i, j, d] b[..., j|0, k, d]`` shaped (..., n, 1, m, k)."""
    Gt = xp.moveaxis(G, -3, -2)  # (..., m, n, d)
    r = Gt @ B.matrix_transpose(b)  # (..., m, n, k)
    return xp.moveaxis(r, -3, -2)[..., None, :, :]


def _dir_pair(xp, a, b):
    """``a[..., i, c, :] · b[..., j, k, :]`` shaped (..., nA, c, nB, k)."""
    nA, c, d = a.shape[-3:]
    nB, k = b.shape[-3], b.shape[-2]
    lhs = xp.reshape(a, tuple(a.shape[:-3]) + (nA * c, d))
    rhs = xp.reshape(b, tuple(b.shape[:-3]) + (nB * k, d))
    out = lhs @ B.matrix_transpose(rhs)
    return xp.reshape(out, tuple(out.shape[:-2]) + (nA, c, nB, k))


class StationaryMap(InputMap):
    """``s = ½ (x − x')ᵀ P (x − x')`` with ``P = diag(ℓ⁻²)``.

    With scaled inputs ``z = x/ℓ`` and scaled directions ``ã = a/ℓ``:
    ``∂_a s = ã·(z − z')``, ``∂_{a'} s = −ã·(z − z')``,
    ``∂_a ∂_b s = ã·b̃`` (same side) or ``−ã·b̃`` (opposite sides).
    """

    max_block = 2

    def prepare(
        self, xp: Namespace, XA: Array, XB: Array, kernel: RadialKernel
    ) -> tuple[Array, Any]:
        ls = kernel._ls(xp, XA, 1)  # (*b, 1, d)
        ZA = XA / ls
        ZB = XB / ls
        # differences, never expanded squares
        D = ZA[..., :, None, :] - ZB[..., None, :, :]  # (..., n, m, d)
        s = 0.5 * xp.sum(D * D, axis=-1)
        return s[..., :, None, :, None], (D, kernel._ls(xp, XA, 2))

    def derivative(
        self, xp: Namespace, state: Any, dirs: list[tuple[Array, str]]
    ) -> Array | None:
        D, ls = state
        if len(dirs) == 1:
            ((a, side),) = dirs
            if side == "A":
                return _dir_on_rows(xp, a / ls, D)
            return -_dir_on_cols(xp, a / ls, D)
        (a, sa), (b, sb) = dirs
        if sa == sb:
            v = xp.sum((a / ls) * (b / ls), axis=-1)  # (..., nU, c|k)
            if sa == "A":
                return v[..., :, :, None, None]
            return v[..., None, None, :, :]
        if sa == "B":
            a, b = b, a
        return -_dir_pair(xp, a / ls, b / ls)


class DotProductMap(InputMap):
    """``s = xᵀ P x'``: ``∂_a s = ã·z'``, ``∂_{b'} s = b̃·z``, ``∂_a ∂_{b'} s
    = ã·b̃``, and ``∂_a ∂_b s = ∂_{a'} ∂_{b'} s = 0``."""

    max_block = 2

    def prepare(
        self, xp: Namespace, XA: Array, XB: Array, kernel: RadialKernel
    ) -> tuple[Array, Any]:
        ls = kernel._ls(xp, XA, 1)
        ZA = XA / ls
        ZB = XB / ls
        s = ZA @ B.matrix_transpose(ZB)
        return s[..., :, None, :, None], (ZA, ZB, kernel._ls(xp, XA, 2))

    def derivative(
        self, xp: Namespace, state: Any, dirs: list[tuple[Array, str]]
    ) -> Array | None:
        ZA, ZB, ls = state
        if len(dirs) == 1:
            ((a, side),) = dirs
            if side == "A":
                # (..., nA, c, d) @ (..., 1, d, m) -> (..., nA, c, m)
                return (a / ls @ B.matrix_transpose(ZB)[..., None, :, :])[..., None]
            # (..., nB, k, d) @ (..., 1, d, n) -> (..., nB, k, n)
            r = (a / ls) @ B.matrix_transpose(ZA)[..., None, :, :]
            return xp.moveaxis(r, -1, -3)[..., :, None, :, :]
        (a, sa), (b, sb) = dirs
        if sa == sb:
            return None
        if sa == "B":
            a, b = b, a
        return _dir_pair(xp, a / ls, b / ls)


# --------------------------------------------------------------------------
# radial kernels: k = variance * φ(s)


class RadialKernel(Kernel):
    """A kernel ``k(x, x') = σ² φ(s(x, x'))``: subclasses give the profile.

    Subclasses set ``input_map`` and implement :meth:`profile`, which returns
    ``[φ(s), φ'(s), …, φ⁽ᵐ⁾(s)]`` for unit variance, with ``None`` for a
    derivative that is identically zero.
    """

    input_map: InputMap = StationaryMap()
    _param_names = ("variance", "lengthscale")

    def __init__(self, lengthscale: Param = 1.0, variance: Param = 1.0) -> None:
        self.lengthscale = lengthscale
        self.variance = variance
        self._validate()

    def _validate(self):
        name = type(self).__name__
        self.lengthscale = positive_param(
            "lengthscale", self.lengthscale, allow_vector=True, kernel=name
        )
        self.variance = positive_param(
            "variance", self.variance, allow_vector=True, kernel=name
        )

    @property
    def input_dim(self) -> int | None:
        size = vector_size(self.lengthscale)
        return size if size > 1 else None

    def _ls(self, xp, like, trailing):
        return batch_vector(xp, self.lengthscale, like, trailing)

    def profile(self, xp: Namespace, s: Array, m: int) -> list[Array | None]:
        """``[φ, φ', …, φ⁽ᵐ⁾]`` at ``s`` for unit variance."""
        raise NotImplementedError

    def _prepare(self, xp, XA, XB, max_order):
        ctx = _Ctx(xp, XA)
        s, state = self.input_map.prepare(xp, XA, XB, self)
        ctx.map = state
        var = batch_scalar(xp, self.variance, XA, 4)
        ctx.phi = [
            None if p is None else var * p for p in self.profile(xp, s, max_order)
        ]
        return ctx

    def _contract(self, ctx, dA, dB):
        xp = ctx.xp
        dirs = [(a, "A") for a in dA] + [(b, "B") for b in dB]
        n = len(dirs)
        total = None
        cache = {}
        for part in set_partitions(n, self.input_map.max_block):
            phi = ctx.phi[len(part)] if len(part) < len(ctx.phi) else None
            if phi is None:
                continue
            term = phi
            for block in part:
                if block not in cache:
                    cache[block] = self.input_map.derivative(
                        xp, ctx.map, [dirs[t] for t in block]
                    )
                D = cache[block]
                if D is None:
                    term = None
                    break
                term = term * D
            if term is not None:
                total = term if total is None else total + term
        if total is None:
            return xp.zeros((), dtype=ctx.like.dtype, device=B.device_of(ctx.like))
        return total


# --------------------------------------------------------------------------
# guarded square roots for profiles that depend on |x − x'|


def safe_radius(xp: Namespace, s: Array, scale: float) -> tuple[Array, Array, Array]:
    """``ρ = √(scale·s)`` safe for autograd at s = 0: returns ``(ρ with zeros
    where s = 0, ρ of the guarded s (never 0), the mask s > 0)``.

    Points closer than ``√tiny`` in ``s`` count as coincident: every term with a
    negative power of ρ multiplies a product of ``r = P(x − x')`` that vanishes
    at least as fast, so the covariance's limit there is the term without them.
    """
    tiny = math.sqrt(float(np.finfo(_np_dtype(s)).tiny))
    pos = s > tiny
    s_safe = xp.where(pos, s, xp.ones_like(s))
    rho = xp.sqrt(scale * s_safe)
    return xp.where(pos, rho, xp.zeros_like(rho)), rho, pos


def _np_dtype(a):
    if B.is_tensor(a):
        return np.float32 if str(a.dtype) == "torch.float32" else np.float64
    return a.dtype
