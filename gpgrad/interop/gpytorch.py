"""Any gpgrad kernel as a GPyTorch derivative kernel.

:class:`GradKernel` wraps a gpgrad kernel as a ``gpytorch.kernels.Kernel`` whose
covariance is over function values *and* gradients, in GPyTorch's interleaved
layout: for each point its value, then its ``d`` partial derivatives
(``num_outputs_per_input = d + 1``), exactly as ``RBFKernelGrad`` and
``Matern52KernelGrad`` lay it out. For points ``x_p`` (rows) and ``x'_q``
(columns) the ``(d+1) × (d+1)`` block is

.. math::

    \\begin{pmatrix}
        k(x_p, x'_q) & \\partial'_j k(x_p, x'_q) \\\\
        \\partial_i k(x_p, x'_q) & \\partial_i \\partial'_j k(x_p, x'_q)
    \\end{pmatrix},

computed in closed form by :func:`gpgrad.covariance.covariance` (the chain rule
of :mod:`gpgrad.kernels.base`), so products, sums and kernels GPyTorch has no
gradient version of (Matérn 3/2, rational quadratic, periodic, ...) work too.

The hyperparameters become GPyTorch parameters ``raw_<name>`` under a
positivity constraint (``softplus`` by default); the gpgrad kernel is rebuilt
from the constrained tensors at every forward call, so gradients of the
marginal likelihood flow to them.
"""

from __future__ import annotations

try:
    import gpytorch
    import torch
    from gpytorch.constraints import Positive
except ImportError as exc:  # pragma: no cover - exercised without gpytorch
    raise ImportError(
        "gpgrad.interop.gpytorch needs gpytorch; install it with "
        "`pip install gpgrad[gpytorch]`"
    ) from exc

from .. import backend as B
from ..covariance import as_blocks, covariance, point_covariance
from ..functionals import gradients, values
from ..kernels.base import Kernel as _GPGradKernel

__all__ = ["GradKernel"]


def _raw_name(name: str) -> str:
    # composite hyperparameters are called "0.lengthscale"; module attribute
    # names cannot contain dots
    return "raw_" + name.replace(".", "_")


def _fixed_name(name: str) -> str:
    return "fixed_" + name.replace(".", "_")


def interleave_index(n: int, d: int, device=None):
    """Permutation from gpgrad's block order to GPyTorch's interleaved order.

    gpgrad lays out ``[f(x_0..x_{n-1}), ∇f(x_0), …, ∇f(x_{n-1})]``; GPyTorch
    wants ``[f(x_0), ∇f(x_0), f(x_1), ∇f(x_1), …]``. Returns a long tensor
    ``perm`` of length ``n (d+1)`` with ``interleaved = blocked[perm]``.
    """
    vals = torch.arange(n, device=device)[:, None]
    grads = n + torch.arange(n * d, device=device).reshape(n, d)
    return torch.cat([vals, grads], dim=1).reshape(-1)


class GradKernel(gpytorch.kernels.Kernel):
    """A gpgrad kernel as a GPyTorch value+gradient kernel.

    Parameters
    ----------
    kernel : gpgrad.kernels.Kernel
        Any gpgrad kernel that is at least once mean-square differentiable
        (RBF, Matern32, Matern52, RationalQuadratic, Periodic, Linear,
        Polynomial, and sums, products and scalings of them). Its current
        hyperparameter values are the initial values; a per-dimension
        lengthscale stays per-dimension (ARD).
    fixed : sequence of str, optional
        Hyperparameters (names as in ``kernel.parameters()``) to keep constant:
        they are stored as buffers, not parameters. Use ``fixed=("variance",)``
        when the kernel sits inside a ``gpytorch.kernels.ScaleKernel``, whose
        outputscale then plays the variance.
    batch_shape : torch.Size, optional
        Independent hyperparameters per batch member (as in GPyTorch kernels):
        every learnable hyperparameter gets these leading dimensions.
    active_dims : sequence of int, optional
        As in every GPyTorch kernel.

    Notes
    -----
    The hyperparameter ``name`` is the GPyTorch parameter ``raw_<name>``
    (dots replaced by underscores, e.g. ``raw_0_lengthscale`` for the first
    factor of a product) under a :class:`gpytorch.constraints.Positive`
    constraint (a fixed one is the buffer ``fixed_<name>``, holding the value
    itself), and its constrained value is the attribute ``<name>`` (e.g.
    ``k.lengthscale``; ``k.hyperparameter("0.lengthscale")`` for composites).
    ``forward(x1, x2)`` returns the dense (..., n1 (d+1), n2 (d+1)) covariance;
    ``diag=True`` returns its diagonal (..., n (d+1)) without forming the
    matrix (``x1`` and ``x2`` must then be equal, as for GPyTorch's
    derivative kernels).

    Examples
    --------
    >>> import torch, gpytorch
    >>> from gpgrad import kernels
    >>> from gpgrad.interop.gpytorch import GradKernel
    >>> k = GradKernel(kernels.Matern32(lengthscale=[0.5, 0.5]))
    >>> x = torch.rand(4, 2, dtype=torch.float64)
    >>> k(x).to_dense().shape
    torch.Size([12, 12])
    """

    is_stationary = False

    def __init__(self, kernel, fixed=(), batch_shape=None, active_dims=None):
        if not isinstance(kernel, _GPGradKernel):
            raise TypeError(
                "GradKernel wraps a gpgrad kernel (e.g. gpgrad.kernels.RBF()), got "
                f"{type(kernel).__name__}"
            )
        kernel.check_order(1, "GradKernel (a value and gradient covariance)")
        if isinstance(fixed, str):
            fixed = (fixed,)
        names = list(kernel.parameters())
        unknown = [f for f in fixed if f not in names]
        if unknown:
            raise ValueError(
                f"fixed names {unknown[0]!r}, but {kernel!r} has the "
                f"hyperparameters {names}"
            )
        batch_shape = torch.Size(() if batch_shape is None else batch_shape)
        super().__init__(batch_shape=batch_shape, active_dims=active_dims)
        self.base = kernel
        self._names = tuple(names)
        self._fixed = tuple(fixed)
        for name, value in kernel.parameters().items():
            t = torch.as_tensor(
                B.to_numpy(value) if B.is_tensor(value) else value,
                dtype=torch.get_default_dtype(),
            ).clone()
            if name in self._fixed:
                self.register_buffer(_fixed_name(name), t)
                continue
            if len(batch_shape) == 0:
                shape = t.shape
            elif name.rsplit(".", 1)[-1] == "lengthscale":
                # gpgrad reads the last axis of a lengthscale as dimensions
                shape = batch_shape + (t.shape[-1] if t.ndim else 1,)
            else:
                shape = batch_shape
            t = t.expand(shape).clone()
            constraint = Positive()
            self.register_parameter(
                _raw_name(name),
                torch.nn.Parameter(constraint.inverse_transform(t)),
            )
            self.register_constraint(_raw_name(name), constraint)

    # -- hyperparameters -----------------------------------------------------
    def _check_name(self, name):
        if name not in self._names:
            raise ValueError(
                f"{self.base!r} has no hyperparameter {name!r}; it has "
                f"{list(self._names)}"
            )

    def hyperparameter(self, name: str):
        """The constrained (positive) value of hyperparameter ``name``."""
        self._check_name(name)
        if name in self._fixed:
            return getattr(self, _fixed_name(name))
        raw = getattr(self, _raw_name(name))
        return getattr(self, _raw_name(name) + "_constraint").transform(raw)

    def set_hyperparameter(self, name: str, value):
        """Set hyperparameter ``name`` to a positive ``value`` (constrained
        space), broadcast to the stored parameter's shape."""
        self._check_name(name)
        fixed = name in self._fixed
        current = getattr(self, _fixed_name(name) if fixed else _raw_name(name))
        value = torch.as_tensor(value, dtype=current.dtype, device=current.device)
        if not bool((value > 0).all()) or not bool(value.isfinite().all()):
            raise ValueError(
                f"{name} must be positive and finite, got {value.tolist()}"
            )
        value = value.expand(current.shape)
        if fixed:
            current.data.copy_(value)
            return
        constraint = getattr(self, _raw_name(name) + "_constraint")
        current.data.copy_(constraint.inverse_transform(value))

    @property
    def lengthscale(self):
        """The constrained lengthscale (None if the kernel has none)."""
        if "lengthscale" in self._names:
            return self.hyperparameter("lengthscale")
        return None

    @lengthscale.setter
    def lengthscale(self, value):
        self.set_hyperparameter("lengthscale", value)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            names = self.__dict__.get("_names", ())
            if name in names:
                return self.hyperparameter(name)
            raise

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_names", ()):
            self.set_hyperparameter(name, value)
            return
        super().__setattr__(name, value)

    def gpgrad_kernel(self):
        """The wrapped gpgrad kernel with the current hyperparameters as
        (autograd-tracked) tensors."""
        return self.base.replace(
            **{name: self.hyperparameter(name) for name in self._names}
        )

    # -- covariance ------------------------------------------------------------
    def num_outputs_per_input(self, x1, x2):
        return x1.size(-1) + 1

    def forward(self, x1, x2, diag=False, last_dim_is_batch=False, **params):
        """Value+gradient covariance in GPyTorch's interleaved layout.

        Parameters
        ----------
        x1 : tensor (..., n1, d)
        x2 : tensor (..., n2, d)
        diag : bool
            Return only the diagonal (..., n1 (d+1)); needs ``x1 == x2``.

        Returns
        -------
        tensor (..., n1 (d+1), n2 (d+1)), or (..., n1 (d+1)) with ``diag``.
        """
        if last_dim_is_batch:
            raise ValueError(
                "GradKernel does not support last_dim_is_batch=True (deprecated in "
                "GPyTorch): a value+gradient covariance couples all input "
                "dimensions; got last_dim_is_batch=True"
            )
        kernel = self.gpgrad_kernel()
        xp = B.namespace(x1)
        dtype, device = x1.dtype, x1.device
        n1, d = x1.shape[-2:]
        n2 = x2.shape[-2]
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        if diag:
            if not same:
                raise RuntimeError(
                    "GradKernel: diag=True needs x1 == x2 (as GPyTorch's "
                    f"derivative kernels); got x1 {tuple(x1.shape)} and x2 "
                    f"{tuple(x2.shape)} that differ"
                )
            vb, gb = as_blocks([values(x1), gradients(x1)], xp, dtype, device)
            var_f = point_covariance(kernel, vb)[..., 0, 0]  # (..., n)
            var_g = B.diagonal(point_covariance(kernel, gb))  # (..., n, d)
            batch = torch.broadcast_shapes(var_f.shape[:-1], var_g.shape[:-2])
            out = torch.cat(
                [var_f.expand(batch + (n1,))[..., None], var_g.expand(batch + (n1, d))],
                dim=-1,
            )
            return out.reshape(batch + (n1 * (d + 1),))
        A = as_blocks([values(x1), gradients(x1)], xp, dtype, device)
        if same:
            K = covariance(kernel, A)
        else:
            Bl = as_blocks([values(x2), gradients(x2)], xp, dtype, device)
            K = covariance(kernel, A, Bl)
        p1 = interleave_index(n1, d, device)
        p2 = p1 if same else interleave_index(n2, d, device)
        return K[..., p1, :][..., :, p2]

    def __repr__(self):
        fixed = f", fixed={self._fixed}" if self._fixed else ""
        return f"GradKernel({self.gpgrad_kernel()!r}{fixed})"
