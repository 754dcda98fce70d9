"""Composite kernels: ``Scale`` (c·k), ``Sum`` (k₁ + k₂), ``Product`` (k₁·k₂),
and the ``Constant`` kernel.

Derivatives of a product follow the Leibniz rule over every split of the set of
differentiated directions between the two factors,

.. math::

    \\partial_T (k_1 k_2) = \\sum_{S \\subseteq T} (\\partial_S k_1)
    (\\partial_{T \\setminus S} k_2),

which is not the product of the factors' gradient kernels.
"""

from __future__ import annotations

import itertools
import math

from .. import backend as B
from .._typing import Param
from .base import Kernel, _Ctx, batch_scalar, positive_param

__all__ = ["Scale", "Sum", "Product", "Constant"]


class _Composite(Kernel):
    """A kernel made of child kernels; hyperparameters are prefixed ``i.``."""

    children: tuple = ()

    def parameters(self) -> dict[str, Param]:
        out = {name: getattr(self, name) for name in self._param_names}
        for i, child in enumerate(self.children):
            for name, value in child.parameters().items():
                out[f"{i}.{name}"] = value
        return out

    def replace(self, **params: Param) -> Kernel:
        own = {k: v for k, v in params.items() if "." not in k}
        new = super().replace(**own)
        children = list(self.children)
        for key, value in params.items():
            if "." not in key:
                continue
            head, rest = key.split(".", 1)
            if not head.isdigit() or int(head) >= len(children):
                raise ValueError(
                    f"{type(self).__name__} has no hyperparameter {key!r}; "
                    f"it has {list(self.parameters())}"
                )
            children[int(head)] = children[int(head)].replace(**{rest: value})
        new.children = tuple(children)
        return new

    @property
    def order(self):
        return min(child.order for child in self.children)

    @property
    def input_dim(self):
        dims = {c.input_dim for c in self.children} - {None}
        if len(dims) > 1:
            raise ValueError(
                f"the parts of {self!r} have lengthscales of different lengths "
                f"{sorted(dims)}"
            )
        return dims.pop() if dims else None

    def _prepare(self, xp, XA, XB, max_order):
        return tuple(c._prepare(xp, XA, XB, max_order) for c in self.children)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"


class Sum(_Composite):
    """``k₁ + k₂``: derivatives term by term."""

    def __init__(self, *kernels: Kernel) -> None:
        if len(kernels) < 2 or not all(isinstance(k, Kernel) for k in kernels):
            raise TypeError("Sum takes two or more gpgrad kernels")
        self.children = tuple(kernels)

    def _contract(self, ctx, dA, dB):
        total = None
        for child, c in zip(self.children, ctx):
            t = child._contract(c, dA, dB)
            total = t if total is None else total + t
        return total


class Product(_Composite):
    """``k₁ · k₂``: derivatives by the Leibniz rule."""

    def __init__(self, *kernels: Kernel) -> None:
        if len(kernels) < 2 or not all(isinstance(k, Kernel) for k in kernels):
            raise TypeError("Product takes two or more gpgrad kernels")
        if len(kernels) > 2:
            kernels = (kernels[0], Product(*kernels[1:]))
        self.children = tuple(kernels)

    def _contract(self, ctx, dA, dB):
        (k1, k2), (c1, c2) = self.children, ctx
        total = None
        for sa in _subsets(len(dA)):
            for sb in _subsets(len(dB)):
                t1 = k1._contract(c1, [dA[i] for i in sa], [dB[j] for j in sb])
                t2 = k2._contract(
                    c2,
                    [dA[i] for i in range(len(dA)) if i not in sa],
                    [dB[j] for j in range(len(dB)) if j not in sb],
                )
                t = t1 * t2
                total = t if total is None else total + t
        return total


def _subsets(n):
    for r in range(n + 1):
        yield from itertools.combinations(range(n), r)


class Scale(_Composite):
    """``c · k`` for a positive constant (or tensor) ``scale``."""

    _param_names = ("scale",)

    def __init__(self, kernel: Kernel, scale: Param = 1.0) -> None:
        if not isinstance(kernel, Kernel):
            raise TypeError(f"Scale wraps a gpgrad kernel, got {type(kernel).__name__}")
        self.children = (kernel,)
        self.scale = scale
        self._validate()

    def _validate(self):
        self.scale = positive_param("scale", self.scale, kernel="Scale")

    def _prepare(self, xp, XA, XB, max_order):
        return (
            self.children[0]._prepare(xp, XA, XB, max_order),
            batch_scalar(xp, self.scale, XA, 4),
        )

    def _contract(self, ctx, dA, dB):
        inner, scale = ctx
        return scale * self.children[0]._contract(inner, dA, dB)

    def __repr__(self) -> str:
        return f"Scale({self.children[0]!r}, scale={self.scale})"


class Constant(Kernel):
    """``k(x, x') = σ²``: a random constant offset; every derivative is zero."""

    order = math.inf
    _param_names = ("variance",)

    def __init__(self, variance: Param = 1.0) -> None:
        self.variance = variance
        self._validate()

    def _validate(self):
        self.variance = positive_param(
            "variance", self.variance, allow_vector=True, kernel="Constant"
        )

    def _prepare(self, xp, XA, XB, max_order):
        ctx = _Ctx(xp, XA)
        ctx.phi = batch_scalar(xp, self.variance, XA, 4)
        return ctx

    def _contract(self, ctx, dA, dB):
        if dA or dB:
            like = ctx.like
            return ctx.xp.zeros((), dtype=like.dtype, device=B.device_of(like))
        return ctx.phi
