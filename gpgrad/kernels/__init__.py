"""Kernels with closed-form derivative cross-covariances up to second order on
each argument.

=====================  ==========================  ==========================
kernel                 form                        mean-square differentiable
=====================  ==========================  ==========================
``RBF``                ``σ² exp(−s)``              any order
``Matern72``           Matérn ν = 7/2              three times
``Matern52``           Matérn ν = 5/2              twice (Hessians)
``Matern32``           Matérn ν = 3/2              once (gradients)
``Matern12``           ``σ² exp(−√(2s))``          never (values only)
``RationalQuadratic``  ``σ² (1 + s/α)^(−α)``       any order
``Periodic``           ``σ² exp(−2Σsin²(…)/ℓ²)``   any order
``Linear``             ``σ² xᵀPx'``                any order
``Polynomial``         ``σ² (xᵀPx' + c)^p``        any order
``Constant``           ``σ²``                      any order
``Warped``             ``k(u(x), u(x'))``          as ``k``, at most twice
=====================  ==========================  ==========================

with ``s = ½ (x − x')ᵀ P (x − x')`` and ``P = diag(ℓ⁻²)``. Kernels combine with
``+``, ``*`` (Leibniz rule for derivatives) and scalar ``c * k``.
"""

from .base import Kernel, RadialKernel
from .composite import Constant, Product, Scale, Sum
from .dot_product import Linear, Polynomial
from .periodic import Periodic
from .stationary import (
    RBF,
    Matern12,
    Matern32,
    Matern52,
    Matern72,
    RationalQuadratic,
)
from .warping import Warped

__all__ = [
    "Kernel",
    "RadialKernel",
    "RBF",
    "Matern12",
    "Matern32",
    "Matern52",
    "Matern72",
    "RationalQuadratic",
    "Periodic",
    "Linear",
    "Polynomial",
    "Constant",
    "Scale",
    "Sum",
    "Product",
    "Warped",
]
