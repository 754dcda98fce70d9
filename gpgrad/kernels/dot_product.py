"""Dot-product kernels: a profile ``φ(t)`` of ``t = xᵀ P x'``, ``P = diag(ℓ⁻²)``.

The chain rule is the one of :mod:`gpgrad.kernels.base` with the dot-product
input map: ``∂t/∂x = P x'``, ``∂t/∂x' = P x``, ``∂²t/∂x∂x' = P``.
"""

from __future__ import annotations

import math
import numbers

from .._typing import Array, Namespace, Param
from .base import DotProductMap, RadialKernel, positive_param

__all__ = ["Linear", "Polynomial"]


class Linear(RadialKernel):
    r"""Linear kernel (Bayesian linear regression through the origin).

    .. math:: k(x, x') = σ^2\, x^\top P x',\qquad P = \operatorname{diag}(ℓ^{-2})

    Its sample paths are linear functions: gradients are constant and second
    derivatives are zero.
    """

    input_map = DotProductMap()
    order = math.inf

    def profile(self, xp: Namespace, s: Array, m: int) -> list[Array | None]:
        out = [s, xp.ones_like(s)] + [None] * max(0, m - 1)
        return out[: m + 1]


class Polynomial(RadialKernel):
    r"""Polynomial kernel of integer ``degree`` p with ``offset`` c ≥ 0.

    .. math::

        k(x, x') = σ^2 (x^\top P x' + c)^p,\qquad
        φ^{(m)}(t) = σ^2 \frac{p!}{(p-m)!} (t + c)^{p-m}
    """

    input_map = DotProductMap()
    order = math.inf
    _param_names = ("variance", "lengthscale", "offset")
    _settings = ("degree",)

    def __init__(
        self,
        degree: int = 2,
        lengthscale: Param = 1.0,
        variance: Param = 1.0,
        offset: Param = 1.0,
    ) -> None:
        if isinstance(degree, bool) or not isinstance(degree, numbers.Integral):
            raise TypeError(
                f"Polynomial degree must be a positive integer, got {degree!r}"
            )
        if degree < 1:
            raise ValueError(f"Polynomial degree must be at least 1, got {degree}")
        self.degree = int(degree)
        self.offset = offset
        super().__init__(lengthscale=lengthscale, variance=variance)

    def _validate(self):
        super()._validate()
        self.offset = positive_param(
            "offset", self.offset, kernel="Polynomial", allow_zero=True
        )

    def __repr__(self) -> str:
        return super().__repr__().replace("(", f"(degree={self.degree}, ", 1)

    def profile(self, xp: Namespace, s: Array, m: int) -> list[Array | None]:
        p = self.degree
        base = s + self.offset
        out = []
        coef = 1.0
        for j in range(m + 1):
            if j > p:
                out.append(None)
                continue
            out.append(coef * base ** (p - j) if p - j > 0 else coef * xp.ones_like(s))
            coef *= p - j
        return out
