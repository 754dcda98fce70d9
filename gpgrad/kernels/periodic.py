"""The periodic kernel (MacKay 1998), with per-dimension lengthscales.

Its input map is separable rather than quadratic,

.. math::

    s(x, x') = \\sum_i \\frac{2 \\sin^2(π (x_i - x'_i)/p)}{ℓ_i^2},\\qquad
    k = σ^2 e^{-s},

so derivatives of ``s`` of every order appear in Faà di Bruno's formula:
``∂^m s/∂x_i^m = ω^m g_m(ω δ_i)/ℓ_i²`` with ``ω = 2π/p`` and
``g_1 = sin``, ``g_2 = cos``, ``g_3 = −sin``, ``g_4 = −cos``; each derivative
on ``x'`` flips the sign.
"""

from __future__ import annotations

import math

from .._typing import Array, Namespace, Param
from .base import (
    InputMap,
    RadialKernel,
    _dir_on_cols,
    _dir_on_rows,
    batch_scalar,
    positive_param,
)

__all__ = ["Periodic"]


class _SeparableMap(InputMap):
    max_block = 4

    def prepare(self, xp, XA, XB, kernel):
        ls = kernel._ls(xp, XA, 1)  # (*b, 1, d)
        period = batch_scalar(xp, kernel.period, XA, 3)  # (*b, 1, 1, 1)
        omega = 2.0 * math.pi / period
        theta = omega * (XA[..., :, None, :] - XB[..., None, :, :])  # (..., n, m, d)
        inv = 1.0 / (ls * ls)[..., None, :, :]  # (*b, 1, 1, d)
        s = xp.sum((1.0 - xp.cos(theta)) * inv, axis=-1)
        state = {"theta": theta, "inv": inv, "omega": omega}
        return s[..., :, None, :, None], state

    def derivative(self, xp, state, dirs):
        m = len(dirs)
        key = ("G", m)
        if key not in state:
            theta, inv, omega = state["theta"], state["inv"], state["omega"]
            base = xp.sin(theta) if m % 2 == 1 else xp.cos(theta)
            sign = -1.0 if m in (3, 4) else 1.0
            state[key] = sign * omega**m * base * inv  # (..., n, m, d)
        G = state[key]
        A = [a for a, side in dirs if side == "A"]
        Bd = [b for b, side in dirs if side == "B"]
        sign = -1.0 if len(Bd) % 2 else 1.0
        pa = _prod(A)
        pb = _prod(Bd)
        if pb is None:
            return sign * _dir_on_rows(xp, pa, G)
        if pa is None:
            return sign * _dir_on_cols(xp, pb, G)
        # (..., n, 1, m, 1, d) * (..., nA, c, 1, 1, d) * (..., 1, 1, nB, k, d)
        Gx = G[..., :, None, :, None, :]
        prod = Gx * pa[..., :, :, None, None, :] * pb[..., None, None, :, :, :]
        return sign * xp.sum(prod, axis=-1)


def _prod(arrays):
    out = None
    for a in arrays:
        out = a if out is None else out * a
    return out


class Periodic(RadialKernel):
    r"""Periodic kernel with ``period`` p, infinitely differentiable.

    .. math::

        k(x, x') = σ^2 \exp\Bigl(-\sum_i \frac{2\sin^2(π(x_i - x'_i)/p)}{ℓ_i^2}
        \Bigr)
    """

    input_map = _SeparableMap()
    order = math.inf
    _param_names = ("variance", "lengthscale", "period")

    def __init__(
        self, lengthscale: Param = 1.0, variance: Param = 1.0, period: Param = 1.0
    ) -> None:
        self.period = period
        super().__init__(lengthscale=lengthscale, variance=variance)

    def _validate(self):
        super()._validate()
        self.period = positive_param("period", self.period, kernel="Periodic")

    def profile(self, xp: Namespace, s: Array, m: int) -> list[Array | None]:
        e = xp.exp(-s)
        return [e if j % 2 == 0 else -e for j in range(m + 1)]
