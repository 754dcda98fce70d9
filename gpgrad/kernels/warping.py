"""Input warping: a stationary kernel on monotonically warped inputs.

``Warped(k)`` is ``k(u(x), u(x'))`` where each input is rescaled from its box
``[lower, upper]`` to ``t ∈ [m, 1 − m]`` (``m`` the ``margin``) and warped by
the Kumaraswamy CDF, as BoTorch's ``Warp`` input transform does,

.. math::

    t_i = m + (1 - 2m)\\frac{x_i - l_i}{h_i - l_i},\\qquad
    u_i = λ t_i + (1 - λ) W(t_i),\\qquad W(t) = 1 - (1 - t^{a})^{b},

continued as a straight line outside the box. Where ``u'`` is large the
process varies faster: the warping's Jacobian acts like a local inverse
lengthscale, which lets one kernel fit a sharp feature and flat stretches.

With ``s = ½ Σ_i (u_i − u'_i)² / ℓ_i²`` the chain rule of
:mod:`gpgrad.kernels.base` needs the derivatives of ``s`` along blocks of
directions. They are separable over dimensions; with ``D_i = u_i(x) − u_i(x')``
and ``p`` directions on ``x``, ``q`` on ``x'`` (every product taken per
coordinate ``i``):

.. math::

    ∂_a s &= \\textstyle\\sum_i a_i\\, u'_i(x) D_i / ℓ_i^2, \\\\
    ∂_{a}∂_{b} s &= \\textstyle\\sum_i a_i b_i\\,
        [u''_i(x) D_i + u'_i(x)^2] / ℓ_i^2, \\\\
    ∂_{b'} s &= -\\textstyle\\sum_i b_i\\, u'_i(x') D_i / ℓ_i^2, \\qquad
    ∂_{a'}∂_{b'} s = \\textstyle\\sum_i a_i b_i\\,
        [u'_i(x')^2 - u''_i(x') D_i] / ℓ_i^2, \\\\
    ∂_{a_1 \\cdots a_p}∂_{b'_1 \\cdots b'_q} s &=
        -\\textstyle\\sum_i a_{1i}\\cdots a_{pi}\\, b_{1i}\\cdots b_{qi}\\,
        u^{(p)}_i(x)\\, u^{(q)}_i(x') / ℓ_i^2 \\quad (p, q ≥ 1),

so up to two derivatives on each side need ``u'`` and ``u''`` only:
``u' = c [λ + (1 − λ) W'(t)]``, ``u'' = c² (1 − λ) W''(t)`` with
``c = (1 − 2m)/(h − l)`` (``λ``, the ``floor``, bounds the slope below) and

.. math::

    W'(t) = a b\\, t^{a-1} (1 - t^a)^{b-1},\\qquad
    W''(t) = W'(t)\\Bigl[\\frac{a-1}{t} - \\frac{a (b-1) t^{a-1}}{1 - t^a}\\Bigr].
"""

from __future__ import annotations

import copy

import numpy as np

from .. import backend as B
from .base import (
    InputMap,
    RadialKernel,
    StationaryMap,
    _as,
    _dir_on_cols,
    _dir_on_rows,
    _dir_pair,
    batch_scalar,
    positive_param,
    vector_size,
)

__all__ = ["Warped"]


def _box(value, name):
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim > 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(
            f"Warped {name} must be a finite scalar or 1-D array, got {value!r}"
        )
    return arr


class _KumaraswamyMap(InputMap):
    """``s = ½ Σ_i (u_i(x) − u_i(x'))² / ℓ_i²`` with warped inputs ``u``."""

    max_block = 4

    def prepare(self, xp, XA, XB, kernel):
        uA, dA1, dA2 = kernel._warp(xp, XA)
        uB, dB1, dB2 = kernel._warp(xp, XB)
        ls = kernel._ls(xp, XA, 2)  # (*b, 1, 1, d)
        inv = 1.0 / (ls * ls)
        D = uA[..., :, None, :] - uB[..., None, :, :]  # (..., n, m, d)
        s = 0.5 * xp.sum(D * D * inv, axis=-1)
        state = {
            "D": D,
            "inv": inv,
            "A": (dA1[..., :, None, :], dA2[..., :, None, :]),  # (..., n, 1, d)
            "B": (dB1[..., :, None, :], dB2[..., :, None, :]),
        }
        return s[..., :, None, :, None], state

    def derivative(self, xp, state, dirs):
        A = [a for a, side in dirs if side == "A"]
        Bd = [b for b, side in dirs if side == "B"]
        p, q = len(A), len(Bd)
        if p > 2 or q > 2:
            raise ValueError(
                "Warped kernels give derivative covariances up to second order "
                f"on each argument, got orders {p} and {q}"
            )
        D, inv = state["D"], state["inv"]
        pa = _prod(A)
        pb = _prod(Bd)
        if p and q:
            ua = state["A"][p - 1]
            ub = state["B"][q - 1]
            return -_dir_pair(xp, pa * ua * inv, pb * ub)
        if q == 0:
            u1, u2 = state["A"]
            if p == 1:
                return _dir_on_rows(xp, pa * u1 * inv, D)
            out = _dir_on_rows(xp, pa * u2 * inv, D)
            return out + xp.sum(pa * u1 * u1 * inv, axis=-1)[..., :, :, None, None]
        u1, u2 = state["B"]
        if q == 1:
            return -_dir_on_cols(xp, pb * u1 * inv, D)
        out = -_dir_on_cols(xp, pb * u2 * inv, D)
        return out + xp.sum(pb * u1 * u1 * inv, axis=-1)[..., None, None, :, :]


def _prod(arrays):
    out = None
    for a in arrays:
        out = a if out is None else out * a
    return out


class Warped(RadialKernel):
    r"""A stationary kernel on Kumaraswamy-CDF warped inputs.

    .. math::

        k_W(x, x') = k\bigl(u(x), u(x')\bigr),\qquad
        u_i(x) = λ t_i(x) + (1 - λ)\Bigl[1 - \bigl(1 - t_i(x)^{a}\bigr)^{b}\Bigr]

    Parameters
    ----------
    kernel : RadialKernel
        A stationary kernel (``RBF``, ``Matern32/52``, ``RationalQuadratic``,
        ...); its variance and lengthscale act on the warped inputs ``u``,
        which lie in [0, 1].
    concentration1, concentration0 : float, default 1
        The Kumaraswamy shapes ``a`` and ``b``, shared by the dimensions of the
        rescaled box (``a = b = 1`` is no warping;
        both above 1 stretch the middle of the box, ``a < 1`` its lower end,
        ``b < 1`` its upper end).
    lower, upper : float or array (d,)
        The box the inputs are rescaled from, usually the data's range.
    margin : float, default 0.05
        The box maps to ``[margin, 1 − margin]``, which keeps ``W'`` finite
        for concentrations below 1.
    floor : float, default 0
        A share ``λ`` of the identity mixed into the warping,
        ``u = λ t + (1 − λ) W(t)``, so its slope never falls below ``λ`` (of
        the unwarped slope): concentrations above 1 flatten the Kumaraswamy
        CDF at the box's ends, and without a floor the effective lengthscale
        there grows without bound (the process is taken as constant near the
        edges, with overconfident derivatives). ``gpgrad.fit_auto`` uses 0.1.

    Notes
    -----
    Outside the box the warping continues as a straight line with the slope at
    the box's edge (``u'' = 0`` there), so extrapolation sees the stationary
    kernel with the edge's effective lengthscale. Derivative covariances are
    closed-form up to second order on each argument.
    """

    input_map = _KumaraswamyMap()
    _param_names = ("concentration1", "concentration0")

    def __init__(
        self,
        kernel,
        concentration1=1.0,
        concentration0=1.0,
        lower=0.0,
        upper=1.0,
        margin: float = 0.05,
        floor: float = 0.0,
    ):
        if not isinstance(kernel, RadialKernel) or not isinstance(
            kernel.input_map, StationaryMap
        ):
            raise TypeError(
                "Warped wraps a stationary gpgrad kernel (RBF, Matern32, Matern52, "
                f"RationalQuadratic, ...), got {kernel!r}"
            )
        self.kernel = kernel
        self.concentration1 = concentration1
        self.concentration0 = concentration0
        self.lower = _box(lower, "lower")
        self.upper = _box(upper, "upper")
        if (
            self.lower.shape != self.upper.shape
            and min(self.lower.size, self.upper.size) != 1
        ):
            raise ValueError(
                f"Warped lower has {self.lower.size} entries but upper has "
                f"{self.upper.size}"
            )
        if not np.all(self.upper > self.lower):
            raise ValueError(
                f"Warped needs upper > lower in every dimension, got lower="
                f"{self.lower.tolist()} and upper={self.upper.tolist()}"
            )
        margin = float(margin)
        if not 0.0 < margin < 0.5:
            raise ValueError(f"Warped margin must lie in (0, 0.5), got {margin}")
        self.margin = margin
        floor = float(floor)
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"Warped floor must lie in [0, 1), got {floor}")
        self.floor = floor
        self._validate()

    def _validate(self):
        for name in ("concentration1", "concentration0"):
            setattr(
                self,
                name,
                positive_param(name, getattr(self, name), kernel="Warped"),
            )
            v = getattr(self, name)
            if isinstance(v, np.ndarray) and v.ndim:
                # one warping for every rescaled dimension (tensors may carry
                # batch axes in batched fits)
                raise ValueError(
                    f"Warped {name} must be a scalar shared by every dimension, "
                    f"got shape {v.shape}"
                )

    # the base kernel's hyperparameters, seen through the wrapper
    @property
    def variance(self):
        return self.kernel.variance

    @property
    def lengthscale(self):
        return self.kernel.lengthscale

    @property
    def order(self):
        return min(self.kernel.order, 2)

    def profile(self, xp, s, m):
        return self.kernel.profile(xp, s, m)

    def parameters(self) -> dict:
        out = dict(self.kernel.parameters())
        out["concentration1"] = self.concentration1
        out["concentration0"] = self.concentration0
        return out

    def replace(self, **params):
        own = {k: v for k, v in params.items() if k in self._param_names}
        rest = {k: v for k, v in params.items() if k not in self._param_names}
        new = copy.copy(self)
        if rest:
            known = set(self.kernel.parameters())
            unknown = [k for k in rest if k not in known]
            if unknown:
                raise ValueError(
                    f"Warped has no hyperparameter {unknown[0]!r}; it has "
                    f"{list(self.parameters())}"
                )
            new.kernel = self.kernel.replace(**rest)
        for name, value in own.items():
            setattr(new, name, value)
        new._validate()
        return new

    @property
    def input_dim(self):
        sizes = {vector_size(self.lengthscale), self.lower.size, self.upper.size}
        sizes.discard(1)
        return sizes.pop() if sizes else None

    def check_input_dim(self, d: int):
        super().check_input_dim(d)
        for name in ("lower", "upper"):
            size = getattr(self, name).size
            if size not in (1, d):
                raise ValueError(
                    f"X has {d} columns but the Warped kernel's {name} has {size} "
                    "entries"
                )

    def _warp(self, xp, X):
        """``u``, ``u'`` and ``u''`` at points X (..., n, d), each (..., n, d)."""
        lo = _as(xp, self.lower, X)
        hi = _as(xp, self.upper, X)
        m = self.margin
        c = (1.0 - 2.0 * m) / (hi - lo)
        a = batch_scalar(xp, self.concentration1, X, 2)  # (*b, 1, 1)
        b = batch_scalar(xp, self.concentration0, X, 2)
        t = m + c * (X - lo)
        inside = (t >= m) & (t <= 1.0 - m)
        tc = xp.where(t < m, m + 0.0 * t, xp.where(t > 1.0 - m, 1.0 - m + 0.0 * t, t))
        ta = tc**a
        one_m = 1.0 - ta
        W = 1.0 - one_m**b
        W1 = a * b * ta / tc * one_m ** (b - 1.0)
        W2 = W1 * ((a - 1.0) / tc - a * (b - 1.0) * ta / tc / one_m)
        lam = self.floor
        if lam > 0.0:
            W = lam * tc + (1.0 - lam) * W
            W1 = lam + (1.0 - lam) * W1
            W2 = (1.0 - lam) * W2
        u = W + W1 * (t - tc)
        u1 = c * W1
        u2 = xp.where(inside, c * c * W2, 0.0 * W2)
        return u, u1, u2

    def __repr__(self):
        def show(v):
            if B.is_tensor(v):
                v = v.detach().cpu().numpy()
            v = np.asarray(v, dtype=float)
            return float(f"{float(v):.6g}") if v.ndim == 0 else np.round(v, 6).tolist()

        floor = f", floor={self.floor:g}" if self.floor else ""
        return (
            f"Warped({self.kernel!r}, concentration1={show(self.concentration1)}, "
            f"concentration0={show(self.concentration0)}{floor})"
        )
