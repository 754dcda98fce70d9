"""Bridges to GPyTorch and BoTorch (optional dependencies, imported lazily).

``gpgrad.interop.gpytorch``
    :class:`~gpgrad.interop.gpytorch.GradKernel`: any gpgrad kernel as a
    ``gpytorch.kernels.Kernel`` returning the value+gradient covariance in
    GPyTorch's interleaved layout (needs ``gpytorch``).
``gpgrad.interop.botorch``
    :class:`~gpgrad.interop.botorch.GradientGP`: a BoTorch model trained on
    values and, optionally, gradients (needs ``botorch``).

Importing this package imports neither library; each submodule raises an
``ImportError`` naming the extra to install when its library is missing.
"""

__all__ = ["gpytorch", "botorch"]
