"""The Gaussian process: kernel, mean and noise; conditioning on observations.

.. math::

    E[Mf \\mid y] = m_M + M k L^\\top (L k L^\\top + Σ)^{-1} (y - m_L),\\qquad
    \\operatorname{Cov}[Mf \\mid y] = M k M^\\top
        - M k L^\\top (L k L^\\top + Σ)^{-1} L k M^\\top

for observation functionals ``L`` with noise covariance ``Σ`` and query
functionals ``M`` (Rasmussen & Williams §9.4; Solak et al. 2003). A constant
mean has zero derivatives.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np

from . import backend as B
from .covariance import _kernel_batch_shape, as_blocks, batch_shape
from .exceptions import GPGradWarning
from .functionals import KINDS, Functional, values
from .kernels.base import Kernel
from .solvers.select import METHODS, make_solver

__all__ = ["GP"]

_KINDS = tuple(KINDS)
_BACKENDS = ("numpy", "torch")


def _check_noise_value(v, what):
    if B.is_tensor(v):
        if not bool((v.detach() >= 0).all()) or not bool(v.detach().isfinite().all()):
            raise ValueError(f"{what} must be a finite, non-negative variance")
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{what} must be a number (a variance), got {type(v).__name__}")
    v = float(v)
    if not (np.isfinite(v) and v >= 0):
        raise ValueError(f"{what} must be a finite, non-negative variance, got {v}")
    return v


class GP:
    """A Gaussian process prior over functions and all their derivatives.

    Parameters
    ----------
    kernel : gpgrad.kernels.Kernel
    noise : float, tensor or dict, default 1e-8
        Observation noise variance for observations that do not set their own:
        one value for every kind, or a dict by kind (``"value"``, ``"gradient"``,
        ``"partial"``, ``"directional"``, ``"second"``, ``"hessian"``; kinds left
        out use ``"value"``'s).
    mean : float or tensor, default 0.0
        Constant prior mean of ``f`` (its derivatives have mean zero).
    normalize_y : bool, default False
        Standardize the value observations (subtract their mean, divide by their
        standard deviation); derivative observations are divided by the same
        standard deviation and never shifted. Predictions are returned in the
        original units. The kernel's variance then refers to the standardized
        scale, while ``noise`` stays in data units (it is divided by the same
        squared standard deviation internally): the same ``noise`` means the
        same measurement error with or without ``normalize_y``.
    backend : {"numpy", "torch"}
    device, dtype
        Torch device and dtype (default float64 on CPU); numpy dtype for numpy.
    method : str or gpgrad.solvers.iterative.CG, default "auto"
        How to solve the observations' linear system: ``"cholesky"`` (dense),
        ``"cg"`` (matrix-free preconditioned conjugate gradients, values and
        first derivatives of a single stationary or dot-product kernel; pass
        ``CG(tol=..., max_iter=..., preconditioner=...)`` for options),
        ``"woodbury"`` (gradient observations at N ≤ D points of a stationary
        kernel) or ``"auto"`` (Woodbury where it applies with N < D, dense
        Cholesky where the matrix fits in memory and has at most
        ``gpgrad.solvers.select.AUTO_DENSE_MAX_ROWS`` rows, otherwise CG). A
        dense system that would not fit in memory is refused before it is
        allocated. The choice is shown by ``Posterior.method``.

    Examples
    --------
    >>> import numpy as np, gpgrad
    >>> X = np.linspace(0, 1, 8)[:, None]
    >>> gp = gpgrad.GP(gpgrad.kernels.RBF(lengthscale=0.3), noise=1e-6)
    >>> post = gp.condition(X, np.sin(6 * X[:, 0]))
    >>> post.gradient(np.array([[0.5]])).mean.shape
    (1, 1)
    """

    def __init__(
        self,
        kernel,
        noise=1e-8,
        mean=0.0,
        normalize_y=False,
        backend="numpy",
        device=None,
        dtype=None,
        method="auto",
    ):
        if not isinstance(kernel, Kernel):
            raise TypeError(
                f"GP expects a gpgrad kernel (e.g. gpgrad.kernels.RBF()), got "
                f"{type(kernel).__name__}"
            )
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
        self.kernel = kernel
        if isinstance(noise, dict):
            unknown = set(noise) - set(_KINDS)
            if unknown:
                raise ValueError(
                    f"noise keys must be observation kinds {_KINDS}, got "
                    f"{sorted(unknown)}"
                )
            self.noise = {
                k: _check_noise_value(v, f"noise[{k!r}]") for k, v in noise.items()
            }
        else:
            self.noise = _check_noise_value(noise, "noise")
        if B.is_tensor(mean):
            self.mean = mean
        elif isinstance(mean, numbers.Real) and not isinstance(mean, bool):
            self.mean = float(mean)
        else:
            raise TypeError(
                f"mean must be a constant number, got {type(mean).__name__}"
            )
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        if not isinstance(normalize_y, (bool, np.bool_)):
            raise TypeError(f"normalize_y must be True or False, got {normalize_y!r}")
        self.normalize_y = bool(normalize_y)
        self.backend = backend
        if backend == "torch":
            import torch

            self.xp = B.namespace(torch.zeros(0))
            self.dtype = torch.float64 if dtype is None else dtype
            if self.dtype not in (torch.float64, torch.float32):
                raise TypeError(
                    f"dtype must be torch.float64 or torch.float32, got {dtype}"
                )
            self.device = torch.device(device if device is not None else "cpu")
        else:
            if device not in (None, "cpu"):
                raise ValueError(
                    f"the numpy backend runs on the CPU; got device={device!r} "
                    "(use backend='torch' for GPUs)"
                )
            self.xp = B.namespace(np.zeros(0))
            self.dtype = np.dtype(np.float64 if dtype is None else dtype)
            if self.dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
                raise TypeError(f"dtype must be float64 or float32, got {dtype}")
            self.device = None

    def __repr__(self):
        return (
            f"GP({self.kernel!r}, noise={self.noise}, mean={self.mean}, "
            f"backend={self.backend!r})"
        )

    # ------------------------------------------------------------------
    def noise_for(self, kind):
        if isinstance(self.noise, dict):
            return self.noise.get(kind, self.noise.get("value", 1e-8))
        return self.noise

    def _asarray(self, x):
        return B.to_namespace(x, self.xp, dtype=self.dtype, device=self.device)

    def _parse(self, args, what="observations", need_targets=True):
        if len(args) == 2 and not isinstance(args[0], Functional):
            args = (values(args[0], args[1]),)
        if not args:
            raise ValueError(f"no {what} given: pass gpgrad.values(X, y), ...")
        out = []
        for a in args:
            if isinstance(a, (list, tuple)) and all(
                isinstance(f, Functional) for f in a
            ):
                out.extend(a)
            elif isinstance(a, Functional):
                out.append(a)
            else:
                raise TypeError(
                    f"{what} must be gpgrad functionals (gpgrad.values(X, y), "
                    f"gpgrad.gradients(X, G), ...) or (X, y), got {type(a).__name__}"
                )
        d = out[0].d
        for f in out:
            if f.d != d:
                raise ValueError(
                    f"all {what} must have the same input dimension: got {d} and {f.d}"
                )
            if need_targets and f.y is None:
                raise ValueError(
                    f"{f.kind} observations have no targets; pass them as the "
                    "constructor's target argument"
                )
            self.kernel.check_order(f.order, f"{f.kind} {what}")
        self.kernel.check_input_dim(d)
        _check_batch_shapes(self.kernel, out, what)
        for f in out:
            self._check_backend(f)
        return out

    def _check_backend(self, f):
        arrays = [f.X, f.y, f.noise]
        for a in arrays:
            if a is None or isinstance(a, float):
                continue
            if self.backend == "numpy" and B.is_tensor(a):
                raise TypeError(
                    "got torch tensors but the GP uses backend='numpy'; use "
                    "GP(..., backend='torch') or pass numpy arrays"
                )
            if self.backend == "torch" and B.is_tensor(a):
                if a.device.type != self.device.type:
                    raise ValueError(
                        f"inputs are on device {a.device} but the GP is on "
                        f"{self.device}; move them with .to({str(self.device)!r})"
                    )

    def _prepare(self, obs):
        xp = self.xp
        blocks = as_blocks(obs, xp, self.dtype, self.device)
        batch = batch_shape(self.kernel, blocks)
        ys = [self._asarray(f.flat_targets(f.y)) for f in obs]
        ys = [xp.broadcast_to(y, batch + (y.shape[-1],)) for y in ys]
        # constant mean and normalization (values only are shifted)
        mean = self._asarray(self.mean)
        is_val = [f.kind == "value" for f in obs]
        shift = xp.zeros(batch, dtype=self.dtype, device=self.device)
        scale = xp.ones(batch, dtype=self.dtype, device=self.device)
        if self.normalize_y and any(is_val):
            vals = xp.concat([y for y, v in zip(ys, is_val) if v], axis=-1)
            shift = xp.mean(vals, axis=-1)
            if vals.shape[-1] > 1:
                sd = xp.std(vals, axis=-1)
                scale = xp.where(sd > 0, sd, xp.ones_like(sd))
        res = []
        for y, v in zip(ys, is_val):
            if v:
                y = y - (mean + shift)[..., None]
            res.append(y / scale[..., None])
        r = xp.concat(res, axis=-1)
        noise = []
        for f, y in zip(obs, ys):
            nz = f.noise if f.noise is not None else self.noise_for(f.kind)
            nv = f.flat_noise(nz, xp, y)
            noise.append(xp.broadcast_to(nv, batch + (y.shape[-1],)))
        noise = xp.concat(noise, axis=-1) / (scale * scale)[..., None]
        return blocks, r, noise, shift, scale

    def condition(self, *observations):
        """Condition on observations; returns a :class:`~gpgrad.Posterior`.

        ``gp.condition(X, y)`` is short for ``gp.condition(gpgrad.values(X, y))``.
        """
        from .posterior import Posterior

        obs = self._parse(observations)
        blocks, r, noise, shift, scale = self._prepare(obs)
        solver = make_solver(self, blocks, noise)
        _warn_float32_derivatives(self, obs, solver)
        return Posterior(self, obs, blocks, solver, r, shift, scale)

    def log_marginal_likelihood(self, *observations):
        """``log p(y)`` of the observations under this prior (a scalar, or one
        per batch member)."""
        return self.condition(*observations).log_marginal_likelihood()


# --------------------------------------------------------------------------
# checks on the conditioning path


def _check_batch_shapes(kernel, functionals, what):
    """Raise unless the batch dims of every functional's points (and of the
    kernel's hyperparameters) broadcast together."""
    shapes = [("the kernel's hyperparameters", _kernel_batch_shape(kernel))]
    shapes += [(f"{f.kind} {what}", tuple(f.X.shape[:-2])) for f in functionals]
    acc = ()
    for name, shape in shapes:
        try:
            acc = tuple(np.broadcast_shapes(acc, shape))
        except ValueError:
            raise ValueError(
                f"batch dimensions do not broadcast: {name} have batch shape "
                f"{shape}, the others {acc}; give every X (..., n, d) the same "
                "leading dimensions (or ones of size 1)"
            ) from None


#: float32 derivative systems with an estimated condition number above this
#: lose about three or more significant digits against float64 (measured on
#: random value/gradient/Hessian problems; see the numerical notes)
FLOAT32_COND_LIMIT = 1e4


def _warn_float32_derivatives(gp, obs, solver):
    r"""Warn when a float32 system with derivative observations is too
    ill-conditioned for single precision.

    The solver's estimate (for a Cholesky factor ``L``,
    :math:`\hat κ = (\max_i L_{ii} / \min_i L_{ii})^2`) is a cheap lower bound
    on the condition number of
    ``K + Σ``; results lose about :math:`\hat κ \cdot 10^{-7}` relative
    accuracy. Derivative blocks scale as ``σ²/ℓ²`` (gradients) and ``σ²/ℓ⁴``
    (Hessians) beside ``σ²`` for values, so such systems reach this limit at
    far larger noise than value-only ones. Jitter in float32 already moves
    results by ~1e-5 of the prior scale or more, so it triggers the warning too.
    """
    if "float32" not in str(gp.dtype) or all(f.order == 0 for f in obs):
        return
    cond = solver.condition_estimate()
    if cond is None:
        return
    jitter = float(solver.jitter)
    if jitter > 0 or not cond <= FLOAT32_COND_LIMIT:
        warnings.warn(
            "float32 is too coarse for this derivative system: its estimated "
            f"condition number is {cond:.1e}"
            + (f" and jitter {jitter:.2g} was added" if jitter > 0 else "")
            + f", so predictions may be off by about {min(cond * 1.2e-7, 1):.0e} of "
            "the prior scale or more. Use dtype=float64 (e.g. GP(..., "
            "dtype=torch.float64)), or raise the observation noise.",
            GPGradWarning,
            stacklevel=3,
        )
