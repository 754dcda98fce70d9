"""Stationary kernels: a radial profile ``φ(s)`` of ``s = ½ (x − x')ᵀP(x − x')``.

Each class writes only its profile, the profile's derivatives in ``s`` and its
mean-square differentiability; :mod:`gpgrad.kernels.base` applies the chain rule.
"""

from __future__ import annotations

import math

from .._typing import Array, Namespace, Param
from .base import RadialKernel, StationaryMap, positive_param, safe_radius

__all__ = [
    "RBF",
    "Matern12",
    "Matern32",
    "Matern52",
    "Matern72",
    "RationalQuadratic",
]


class RBF(RadialKernel):
    r"""Squared-exponential kernel, infinitely mean-square differentiable.

    .. math:: k(x, x') = σ^2 \exp(-s),\qquad φ^{(m)}(s) = (-1)^m σ^2 e^{-s}
    """

    input_map = StationaryMap()
    order = math.inf

    def profile(self, xp: Namespace, s: Array, m: int) -> list[Array | None]:
        e = xp.exp(-s)
        return [e if j % 2 == 0 else -e for j in range(m + 1)]


class RationalQuadratic(RadialKernel):
    r"""Rational quadratic kernel (a scale mixture of RBFs), any order.

    .. math::

        φ(s) = σ^2 (1 + s/α)^{-α},\qquad
        φ^{(m)}(s) = σ^2 (-1)^m \frac{(α)_m}{α^m} (1 + s/α)^{-α-m}
    """

    input_map = StationaryMap()
    order = math.inf
    _param_names = ("variance", "lengthscale", "alpha")

    def __init__(
        self, lengthscale: Param = 1.0, variance: Param = 1.0, alpha: Param = 1.0
    ) -> None:
        self.alpha = alpha
        super().__init__(lengthscale=lengthscale, variance=variance)

    def _validate(self):
        super()._validate()
        self.alpha = positive_param("alpha", self.alpha, kernel="RationalQuadratic")

    def profile(self, xp: Namespace, s: Array, m: int) -> list[Array | None]:
        alpha = self.alpha
        base = 1.0 + s / alpha
        out = []
        coef = 1.0
        for j in range(m + 1):
            out.append(coef * base ** (-alpha - j))
            coef = coef * -(alpha + j) / alpha
        return out


class Matern12(RadialKernel):
    r"""Matérn ν = 1/2 (exponential) kernel: continuous, never differentiable.

    .. math:: φ(s) = σ^2 e^{-ρ},\quad ρ = \sqrt{2s} = |x - x'|_P
    """

    input_map = StationaryMap()
    order = 0

    def profile(self, xp: Namespace, s: Array, m: int) -> list[Array | None]:
        rho, _, _ = safe_radius(xp, s, 2.0)
        return [xp.exp(-rho)]


class Matern32(RadialKernel):
    r"""Matérn ν = 3/2 kernel: once mean-square differentiable (gradients).

    .. math::

        φ(s) = σ^2 (1 + ρ) e^{-ρ},\quad ρ = \sqrt{6 s};\qquad
        φ' = -3σ^2 e^{-ρ},\quad φ'' = 9σ^2 e^{-ρ}/ρ

    ``φ''`` is singular at ρ = 0, where it multiplies ``r_a r_b = O(ρ²)``: it is
    set to zero there, which is the exact limit.
    """

    input_map = StationaryMap()
    order = 1

    def profile(self, xp: Namespace, s: Array, m: int) -> list[Array | None]:
        rho, rho_safe, pos = safe_radius(xp, s, 6.0)
        e = xp.exp(-rho)
        out = [(1.0 + rho) * e, -3.0 * e, xp.where(pos, 9.0 * e / rho_safe, 0.0 * e)]
        return out[: m + 1]


class Matern52(RadialKernel):
    r"""Matérn ν = 5/2 kernel: twice mean-square differentiable (Hessians).

    .. math::

        φ(s) = σ^2 (1 + ρ + ρ^2/3) e^{-ρ},\quad ρ = \sqrt{10 s};\\
        φ' = -\tfrac53 σ^2 (1+ρ) e^{-ρ},\quad φ'' = \tfrac{25}{3} σ^2 e^{-ρ},\\
        φ''' = -\tfrac{125}{3} σ^2 e^{-ρ}/ρ,\quad
        φ'''' = \tfrac{625}{3} σ^2 e^{-ρ} (1+ρ)/ρ^3

    ``φ'''`` and ``φ''''`` are singular at ρ = 0 but always multiply products of
    ``r`` that vanish faster; they are set to zero there (the exact limit).
    """

    input_map = StationaryMap()
    order = 2

    def profile(self, xp: Namespace, s: Array, m: int) -> list[Array | None]:
        rho, rho_safe, pos = safe_radius(xp, s, 10.0)
        e = xp.exp(-rho)
        zero = 0.0 * e
        out = [
            (1.0 + rho + rho * rho / 3.0) * e,
            (-5.0 / 3.0) * (1.0 + rho) * e,
            (25.0 / 3.0) * e,
        ]
        if m >= 3:
            out.append(xp.where(pos, (-125.0 / 3.0) * e / rho_safe, zero))
        if m >= 4:
            out.append(
                xp.where(pos, (625.0 / 3.0) * e * (1.0 + rho) / rho_safe**3, zero)
            )
        return out[: m + 1]


class Matern72(RadialKernel):
    r"""Matérn ν = 7/2 kernel: three times mean-square differentiable.

    Smooth derivatives close to an RBF's, with an exact state-space form.

    .. math::

        φ(s) = σ^2 \bigl(1 + ρ + \tfrac25 ρ^2 + \tfrac1{15} ρ^3\bigr) e^{-ρ},
        \quad ρ = \sqrt{14 s};\\
        φ' = -\tfrac{7}{15} σ^2 (3 + 3ρ + ρ^2) e^{-ρ},\quad
        φ'' = \tfrac{49}{15} σ^2 (1 + ρ) e^{-ρ},\\
        φ''' = -\tfrac{343}{15} σ^2 e^{-ρ},\quad
        φ'''' = \tfrac{2401}{15} σ^2 e^{-ρ}/ρ

    ``φ''''`` is singular at ρ = 0 but multiplies ``r_a r_b r_c r_e = O(ρ⁴)``:
    it is set to zero there (the exact limit).
    """

    input_map = StationaryMap()
    order = 3

    def profile(self, xp, s, m):
        rho, rho_safe, pos = safe_radius(xp, s, 14.0)
        e = xp.exp(-rho)
        out = [
            (1.0 + rho * (1.0 + rho * (0.4 + rho / 15.0))) * e,
            (-7.0 / 15.0) * (3.0 + rho * (3.0 + rho)) * e,
            (49.0 / 15.0) * (1.0 + rho) * e,
        ]
        if m >= 3:
            out.append((-343.0 / 15.0) * e)
        if m >= 4:
            out.append(xp.where(pos, (2401.0 / 15.0) * e / rho_safe, 0.0 * e))
        return out[: m + 1]
