"""Any gpgrad kernel as a GPyTorch derivative kernel.

:class:`GradKernel` wraps a gpgrad kernel as a ``gpytorch.kernels.Kernel`` whose
covariance is over function values *and* derivatives, in GPyTorch's interleaved
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
``outputs="gradgrad"`` adds the ``d`` pure second derivatives per point (the
layout of ``RBFKernelGradGrad``) and ``outputs="hessian"`` the ``d(d+1)/2``
distinct Hessian entries.

The drop-in form ``GradKernel("rbf", ard_num_dims=d)`` (or ``"matern52"``,
...) takes GPyTorch's constructor arguments and defaults: a lengthscale
parameter ``raw_lengthscale`` of shape ``(*batch_shape, 1, ard_num_dims or 1)``
starting at ``softplus(0) ≈ 0.693``, an optional prior and constraint, and no
variance of its own (wrap it in a ``ScaleKernel``), so a ``state_dict`` of
``RBFKernelGrad`` loads into it. Other hyperparameters are GPyTorch parameters
``raw_<name>`` under a positivity constraint; the gpgrad kernel is rebuilt from
the constrained tensors at every forward call, so gradients of the marginal
likelihood flow to them.
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
from .. import kernels as _kernels
from ..covariance import as_blocks, covariance, point_covariance
from ..functionals import gradients, hessians, second_partials, values
from ..kernels.base import DotProductMap, RadialKernel
from ..kernels.base import Kernel as _GPGradKernel
from ..kernels.composite import Constant, _Composite

__all__ = ["GradKernel", "interleave_index"]

#: names accepted by ``GradKernel(name)`` (GPyTorch's defaults)
KERNELS = {
    "rbf": _kernels.RBF,
    "matern52": _kernels.Matern52,
    "matern32": _kernels.Matern32,
    "rq": _kernels.RationalQuadratic,
    "rationalquadratic": _kernels.RationalQuadratic,
    "periodic": _kernels.Periodic,
}

_OUTPUTS = ("gradient", "gradgrad", "hessian")


def _raw_name(name: str) -> str:
    # composite hyperparameters are called "0.lengthscale"; module attribute
    # names cannot contain dots
    return "raw_" + name.replace(".", "_")


def _fixed_name(name: str) -> str:
    return "fixed_" + name.replace(".", "_")


def _is_lengthscale(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "lengthscale"


def _is_stationary(kernel) -> bool:
    if isinstance(kernel, _Composite):
        return all(_is_stationary(c) for c in kernel.children)
    if isinstance(kernel, Constant):
        return True
    if isinstance(kernel, RadialKernel):
        return not isinstance(kernel.input_map, DotProductMap)
    return False


def interleave_index(n: int, d: int, device=None):
    """Permutation from gpgrad's block order to GPyTorch's interleaved order.

    gpgrad lays out ``[f(x_0..x_{n-1}), ∇f(x_0), …, ∇f(x_{n-1})]``; GPyTorch
    wants ``[f(x_0), ∇f(x_0), f(x_1), ∇f(x_1), …]``. Returns a long tensor
    ``perm`` of length ``n (d+1)`` with ``interleaved = blocked[perm]``.
    """
    vals = torch.arange(n, device=device)[:, None]
    grads = n + torch.arange(n * d, device=device).reshape(n, d)
    return torch.cat([vals, grads], dim=1).reshape(-1)


def _point_functionals(X, outputs):
    """The functionals asked at every point, and for each entry of their
    concatenation the index of its point (for the interleaving)."""
    n, d = X.shape[-2:]
    dev = X.device
    fs = [values(X), gradients(X)]
    idx = torch.arange(n, device=dev)
    pts = [idx, idx.repeat_interleave(d)]
    if outputs == "gradgrad":
        for i in range(d):
            fs.append(second_partials(X, i, i))
            pts.append(idx)
    elif outputs == "hessian":
        fs.append(hessians(X))
        pts.append(idx.repeat_interleave(d * (d + 1) // 2))
    perm = torch.argsort(torch.cat(pts), stable=True)
    return fs, perm


class GradKernel(gpytorch.kernels.Kernel):
    """A gpgrad kernel as a GPyTorch value+gradient kernel.

    Parameters
    ----------
    kernel : gpgrad.kernels.Kernel, gpgrad kernel class or str, default "rbf"
        Any gpgrad kernel at least once mean-square differentiable (RBF,
        Matern32, Matern52, RationalQuadratic, Periodic, Linear, Polynomial,
        and sums, products and scalings of them); its current hyperparameter
        values are the initial values. A class (``kernels.RBF``) or a name
        (``"rbf"``, ``"matern52"``, ``"matern32"``, ``"rq"``, ``"periodic"``)
        builds the kernel with GPyTorch's defaults instead: lengthscale
        ``softplus(0)``, and its variance fixed at 1 (as ``RBFKernelGrad``,
        which leaves the scale to a ``ScaleKernel``).
    fixed : sequence of str, optional
        Hyperparameters (names as in ``kernel.parameters()``) to keep constant:
        they are non-persistent buffers ``fixed_<name>``, not parameters. Use
        ``fixed=("variance",)`` when the kernel sits inside a
        ``gpytorch.kernels.ScaleKernel``. Default: ``("variance",)`` for a
        class or name, nothing for a kernel instance.
    ard_num_dims : int, optional
        One lengthscale per input dimension (as in GPyTorch kernels); a
        scalar lengthscale of ``kernel`` is repeated.
    batch_shape : torch.Size, optional
        Independent hyperparameters per batch member: the lengthscale has
        shape ``(*batch_shape, 1, ard_num_dims or 1)``, every other
        hyperparameter ``batch_shape``.
    active_dims : sequence of int, optional
        As in every GPyTorch kernel.
    lengthscale_prior : gpytorch.priors.Prior, optional
    lengthscale_constraint : gpytorch.constraints.Interval, optional
        As in GPyTorch kernels (default ``Positive()``, i.e. softplus). Only
        for kernels with one lengthscale (not composites).
    outputs : {"gradient", "gradgrad", "hessian"}, default "gradient"
        Entries per point: the value and the gradient (``d + 1``), plus the
        ``d`` pure second derivatives ``∂²f/∂x_i²`` (``2d + 1``, the layout of
        ``RBFKernelGradGrad``), or plus the ``d(d+1)/2`` distinct Hessian
        entries ``(i, j), i ≤ j`` row-major.

    Notes
    -----
    The lengthscale of a kernel with one lengthscale is GPyTorch's own
    ``raw_lengthscale`` (so ``k.lengthscale``, ``k.initialize(lengthscale=...)``,
    priors, constraints and ``state_dict`` keys are GPyTorch's). Every other
    hyperparameter ``name`` is the parameter ``raw_<name>`` (dots replaced by
    underscores, e.g. ``raw_0_lengthscale`` for the first factor of a
    product) under a :class:`gpytorch.constraints.Positive` constraint; its
    constrained value is the attribute ``<name>`` (``k.variance``;
    ``k.hyperparameter("0.lengthscale")`` for composites).
    ``forward(x1, x2)`` returns the dense (..., n1 k, n2 k) covariance with
    ``k`` entries per point; ``diag=True`` returns its diagonal (..., n1 k)
    without forming the matrix (``x1`` and ``x2`` must then be equal, as for
    GPyTorch's derivative kernels).

    Examples
    --------
    >>> import torch, gpytorch
    >>> from gpgrad import kernels
    >>> from gpgrad.interop.gpytorch import GradKernel
    >>> k = GradKernel(kernels.Matern32(lengthscale=[0.5, 0.5]))
    >>> x = torch.rand(4, 2, dtype=torch.float64)
    >>> k(x).to_dense().shape
    torch.Size([12, 12])
    >>> GradKernel("rbf", ard_num_dims=2).lengthscale.shape   # RBFKernelGrad's
    torch.Size([1, 2])
    """

    def __init__(
        self,
        kernel="rbf",
        fixed=None,
        ard_num_dims: int | None = None,
        batch_shape: torch.Size | None = None,
        active_dims=None,
        lengthscale_prior=None,
        lengthscale_constraint=None,
        outputs: str = "gradient",
        **kwargs,
    ):
        defaults = False
        if isinstance(kernel, str):
            if kernel.lower() not in KERNELS:
                raise ValueError(
                    f"unknown kernel name {kernel!r}; expected one of "
                    f"{sorted(KERNELS)} or a gpgrad kernel"
                )
            kernel, defaults = KERNELS[kernel.lower()](), True
        elif isinstance(kernel, type) and issubclass(kernel, _GPGradKernel):
            kernel, defaults = kernel(), True
        if not isinstance(kernel, _GPGradKernel):
            raise TypeError(
                "GradKernel wraps a gpgrad kernel (e.g. gpgrad.kernels.RBF()), got "
                f"{type(kernel).__name__}"
            )
        if outputs not in _OUTPUTS:
            raise ValueError(f"outputs must be one of {_OUTPUTS}, got {outputs!r}")
        order = 1 if outputs == "gradient" else 2
        kernel.check_order(order, f"GradKernel(outputs={outputs!r})")
        names = list(kernel.parameters())
        if fixed is None:
            fixed = ("variance",) if defaults and "variance" in names else ()
        if isinstance(fixed, str):
            fixed = (fixed,)
        unknown = [f for f in fixed if f not in names]
        if unknown:
            raise ValueError(
                f"fixed names {unknown[0]!r}, but {kernel!r} has the "
                f"hyperparameters {names}"
            )
        own_ls = "lengthscale" in names and "lengthscale" not in fixed
        if not own_ls and (
            lengthscale_prior is not None or lengthscale_constraint is not None
        ):
            raise ValueError(
                "lengthscale_prior and lengthscale_constraint need a kernel with "
                f"one (learnable) lengthscale; {kernel!r} has {names}"
            )
        if ard_num_dims is not None:
            if not isinstance(ard_num_dims, int) or ard_num_dims < 1:
                raise ValueError(
                    f"ard_num_dims must be a positive integer, got {ard_num_dims!r}"
                )
            for name, value in kernel.parameters().items():
                size = 1 if not hasattr(value, "shape") or not value.shape else None
                size = size or int(value.shape[-1])
                if _is_lengthscale(name) and size not in (1, ard_num_dims):
                    raise ValueError(
                        f"ard_num_dims={ard_num_dims} but the kernel's {name} has "
                        f"{size} entries"
                    )
        batch_shape = torch.Size(() if batch_shape is None else batch_shape)
        # GPyTorch's Kernel registers raw_lengthscale itself when asked
        object.__setattr__(self, "has_lengthscale", own_ls)
        init_ls = kernel.lengthscale if own_ls else None
        if own_ls and ard_num_dims is None and not defaults:
            size = B.to_numpy(init_ls).size
            ard_num_dims = size if size > 1 else None
        super().__init__(
            ard_num_dims=ard_num_dims if own_ls else None,
            batch_shape=batch_shape,
            active_dims=active_dims,
            lengthscale_prior=lengthscale_prior,
            lengthscale_constraint=lengthscale_constraint,
            **kwargs,
        )
        self.base = kernel
        self.outputs = outputs
        self._names = tuple(names)
        self._fixed = tuple(fixed)
        dtype = torch.get_default_dtype()
        for name, value in kernel.parameters().items():
            t = torch.as_tensor(B.to_numpy(value), dtype=dtype).clone()
            if name == "lengthscale" and own_ls:
                if not defaults:
                    self.lengthscale = t.expand(self.raw_lengthscale.shape)
                continue
            if _is_lengthscale(name):
                width = ard_num_dims or (t.shape[-1] if t.ndim else 1)
                t = t.reshape(-1).expand(width) if t.numel() == 1 else t
                shape = batch_shape + (1, width)
            else:
                shape = batch_shape
            t = t.expand(shape).clone()
            if name in self._fixed:
                self.register_buffer(_fixed_name(name), t, persistent=False)
                continue
            constraint = Positive()
            self.register_parameter(
                _raw_name(name),
                torch.nn.Parameter(constraint.inverse_transform(t)),
            )
            self.register_constraint(_raw_name(name), constraint)

    @property
    def is_stationary(self) -> bool:
        """Whether the covariance depends on ``x - x'`` only."""
        return _is_stationary(self.base)

    # -- hyperparameters -----------------------------------------------------
    def _check_name(self, name):
        if name not in self._names:
            raise ValueError(
                f"{self.base!r} has no hyperparameter {name!r}; it has "
                f"{list(self._names)}"
            )

    def hyperparameter(self, name: str):
        """The constrained (positive) value of hyperparameter ``name``: shape
        ``(*batch_shape, 1, ard)`` for a lengthscale, ``batch_shape`` else."""
        self._check_name(name)
        if name == "lengthscale" and self.has_lengthscale:
            return self.lengthscale
        if name in self._fixed:
            return getattr(self, _fixed_name(name))
        raw = getattr(self, _raw_name(name))
        return getattr(self, _raw_name(name) + "_constraint").transform(raw)

    def set_hyperparameter(self, name: str, value):
        """Set hyperparameter ``name`` to a positive ``value`` (constrained
        space), broadcast to the stored parameter's shape."""
        self._check_name(name)
        if name == "lengthscale" and self.has_lengthscale:
            current = self.raw_lengthscale
        else:
            fixed = name in self._fixed
            current = getattr(self, _fixed_name(name) if fixed else _raw_name(name))
        value = torch.as_tensor(value, dtype=current.dtype, device=current.device)
        if not bool((value > 0).all()) or not bool(value.isfinite().all()):
            raise ValueError(
                f"{name} must be positive and finite, got {value.tolist()}"
            )
        if value.shape != current.shape:
            try:
                value = value.expand(current.shape)
            except RuntimeError:
                value = value.reshape(current.shape)
        if name == "lengthscale" and self.has_lengthscale:
            super()._set_lengthscale(value)
        elif name in self._fixed:
            current.data.copy_(value)
        else:
            constraint = getattr(self, _raw_name(name) + "_constraint")
            current.data.copy_(constraint.inverse_transform(value))

    def _set_lengthscale(self, value):
        # GPyTorch's lengthscale setter lands here; say what is wrong in the
        # same words as for every other hyperparameter
        v = torch.as_tensor(value)
        if not bool((v > 0).all()) or not bool(v.isfinite().all()):
            raise ValueError(
                f"lengthscale must be positive and finite, got {v.tolist()}"
            )
        super()._set_lengthscale(value)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            names = self.__dict__.get("_names", ())
            if name in names:
                return self.hyperparameter(name)
            raise

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_names", ()) and not (
            name == "lengthscale" and self.has_lengthscale
        ):
            self.set_hyperparameter(name, value)
            return
        super().__setattr__(name, value)

    def gpgrad_kernel(self):
        """The wrapped gpgrad kernel with the current hyperparameters as
        (autograd-tracked) tensors: lengthscales ``(*batch_shape, ard)``, other
        hyperparameters ``batch_shape``."""
        params = {}
        for name in self._names:
            v = self.hyperparameter(name)
            if _is_lengthscale(name):
                v = v[..., 0, :]
                if v.ndim == 1 and v.shape[0] == 1:
                    v = v[0]
            params[name] = v
        return self.base.replace(**params)

    # -- covariance ------------------------------------------------------------
    def num_outputs_per_input(self, x1, x2):
        d = x1.size(-1)
        return {"gradient": d + 1, "gradgrad": 2 * d + 1}.get(
            self.outputs, 1 + d + d * (d + 1) // 2
        )

    def forward(self, x1, x2, diag=False, last_dim_is_batch=False, **params):
        """Value+derivative covariance in GPyTorch's interleaved layout.

        Parameters
        ----------
        x1 : tensor (..., n1, d)
        x2 : tensor (..., n2, d)
        diag : bool
            Return only the diagonal (..., n1 k); needs ``x1 == x2``.

        Returns
        -------
        tensor (..., n1 k, n2 k), or (..., n1 k) with ``diag``; ``k`` entries
        per point (``d + 1`` for ``outputs="gradient"``).
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
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        fs1, p1 = _point_functionals(x1, self.outputs)
        A = as_blocks(fs1, xp, dtype, device)
        if diag:
            if not same:
                raise RuntimeError(
                    "GradKernel: diag=True needs x1 == x2 (as GPyTorch's "
                    f"derivative kernels); got x1 {tuple(x1.shape)} and x2 "
                    f"{tuple(x2.shape)} that differ"
                )
            parts = [B.diagonal(point_covariance(kernel, b)) for b in A]
            parts = [p.reshape(p.shape[:-2] + (-1,)) for p in parts]
            batch = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
            out = torch.cat([p.expand(batch + p.shape[-1:]) for p in parts], dim=-1)
            return out[..., p1]
        if same:
            K = covariance(kernel, A)
            p2 = p1
        else:
            fs2, p2 = _point_functionals(x2, self.outputs)
            K = covariance(kernel, A, as_blocks(fs2, xp, dtype, device))
        return K[..., p1, :][..., :, p2]

    def __repr__(self):
        fixed = f", fixed={self._fixed}" if self._fixed else ""
        out = f", outputs={self.outputs!r}" if self.outputs != "gradient" else ""
        return f"GradKernel({self.gpgrad_kernel()!r}{fixed}{out})"
