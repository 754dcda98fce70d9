"""A BoTorch model trained on function values and gradients.

:class:`GradientGP` is a ``botorch.models.gpytorch.GPyTorchModel`` over one
output ``f`` whose posterior conditions on values and, optionally, gradients,

.. math::

    f \\mid y, G \\sim \\mathcal{GP}\\bigl(μ(x), c(x, x')\\bigr),\\qquad
    μ = m + k_x^\\top (K + Σ)^{-1} (y - m),\\quad
    c = k(x, x') - k_x^\\top (K + Σ)^{-1} k_{x'},

with ``K`` the closed-form value+gradient covariance of the observations
(:mod:`gpgrad.covariance`), ``y`` the stacked values and gradients, and ``m``
the constant mean (zero for the gradient entries). ``posterior(X)`` returns a
``GPyTorchPosterior`` over function values whose covariance is a
``linear_operator`` (so BoTorch's samplers factor it with its jitter policy),
and BoTorch's analytic and Monte Carlo acquisition functions, ``optimize_acqf``,
fantasies and ``fit_gpytorch_mll`` use it as they use ``SingleTaskGP``.

Data live in two spaces. The *data* space is the user's: inputs ``x``,
values ``y``, gradients ``∂y/∂x``. The *model* space is where the GP runs:
inputs ``u = T(x)`` (the ``input_transform``, e.g. ``Normalize``) and values
``y' = S(y)`` (the ``outcome_transform``, default ``Standardize``). Gradient
observations follow the chain rule,

.. math::

    \\frac{\\partial y'}{\\partial u} = S'(y)\\, J(x)^{-\\top}
        \\frac{\\partial y}{\\partial x},\\qquad J = \\frac{\\partial u}{\\partial x},

(for ``Normalize`` and ``Standardize``: ``∂y'/∂u_i = (hi_i − lo_i) ∂y/∂x_i /
σ_y``), and their noise variances scale by the square of the same factors.
"""

from __future__ import annotations

try:
    import gpytorch
    import torch
    from botorch.models.gpytorch import GPyTorchModel
    from botorch.models.model import FantasizeMixin
    from botorch.models.transforms.outcome import Standardize
    from botorch.models.utils.assorted import fantasize as fantasize_flag
    from botorch.posteriors.gpytorch import GPyTorchPosterior
    from botorch.utils.datasets import SupervisedDataset
    from botorch.utils.types import DEFAULT
    from gpytorch.constraints import GreaterThan
    from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
    from gpytorch.likelihoods.gaussian_likelihood import _GaussianLikelihoodBase
    from gpytorch.likelihoods.noise_models import Noise
    from linear_operator.operators import DenseLinearOperator, DiagLinearOperator
except ImportError as exc:  # pragma: no cover - exercised without botorch
    raise ImportError(
        "gpgrad.interop.botorch needs botorch; install it with "
        "`pip install gpgrad[botorch]`"
    ) from exc

import collections
import copy
import math

from .. import backend as B
from .. import kernels as _kernels
from ..covariance import as_blocks, covariance
from ..functionals import gradients, values
from ..gp import GP
from ..kernels.base import Kernel as _GPGradKernel
from .gpytorch import GradKernel, interleave_index

__all__ = ["GradientGP", "GradientGaussianLikelihood", "GradientNoise"]

#: smallest fitted noise variance (model units); gpgrad's solver adds jitter
#: on top of it where a system still needs it
MIN_NOISE = 1e-10


def _check_tensor(value, what, shape_doc):
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{what} must be a torch tensor {shape_doc}, got {type(value).__name__}"
        )
    if not value.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {value.dtype}")
    return value


def _check_shape(value, what, want, like_name, like):
    if value is not None and tuple(value.shape) != tuple(want):
        raise ValueError(
            f"{what} must have shape {tuple(want)} for {like_name} of shape "
            f"{tuple(like.shape)}, got {tuple(value.shape)}"
        )


# --------------------------------------------------------------------------
# the likelihood: value and gradient noise


class GradientNoise(Noise):
    """Observation noise of stacked value and gradient observations.

    The covariance of ``n`` values followed by ``n d`` gradient entries
    (gpgrad's block order) is ``diag(σ²_v 1_n, σ²_g 1_{nd})``, or the given
    per-entry variances when the noise is known.

    Parameters
    ----------
    d : int
        Input dimension.
    with_gradients : bool
        Whether the training data include gradients.
    batch_shape : torch.Size
    Yvar : tensor (*batch_shape, n), optional
        Known value-noise variances (model units).
    dYvar : tensor (*batch_shape, n, d), optional
        Known gradient-noise variances (model units).
    """

    def __init__(self, d, with_gradients, batch_shape, Yvar=None, dYvar=None):
        super().__init__()
        self.d = int(d)
        self.with_gradients = bool(with_gradients)
        self.known = Yvar is not None
        if self.known:
            self.register_buffer("Yvar", Yvar)
            self.register_buffer("dYvar", dYvar)
            return
        for name in ("raw_noise", "raw_gradient_noise"):
            self.register_parameter(
                name, torch.nn.Parameter(torch.zeros(*batch_shape, 1))
            )
            self.register_constraint(name, GreaterThan(MIN_NOISE))

    def _get(self, name):
        raw = getattr(self, "raw_" + name)
        return getattr(self, "raw_" + name + "_constraint").transform(raw)

    def _set(self, name, value):
        raw = getattr(self, "raw_" + name)
        value = torch.as_tensor(value, dtype=raw.dtype, device=raw.device)
        value = value.clamp_min(2 * MIN_NOISE)
        if value.shape != raw.shape:
            value = value.reshape(value.shape + (1,) * (raw.ndim - value.ndim))
        constraint = getattr(self, "raw_" + name + "_constraint")
        raw.data.copy_(constraint.inverse_transform(value).expand(raw.shape))

    @property
    def noise(self):
        """Value-noise variance (*batch_shape, 1) (the mean of the known ones)."""
        if self.known:
            return self.Yvar.mean(-1, keepdim=True)
        return self._get("noise")

    @noise.setter
    def noise(self, value):
        self._set("noise", value)

    @property
    def gradient_noise(self):
        """Gradient-noise variance (*batch_shape, 1) (the mean of the known
        ones)."""
        if self.known:
            if self.dYvar is None:
                return self.noise
            return self.dYvar.flatten(-2).mean(-1, keepdim=True)
        return self._get("gradient_noise")

    @gradient_noise.setter
    def gradient_noise(self, value):
        self._set("gradient_noise", value)

    def vector(self, n, shape=None):
        """The noise variances of ``n`` training points' entries (..., N)."""
        if self.known:
            parts = [self.Yvar]
            if self.with_gradients:
                parts.append(self.dYvar.flatten(-2))
        else:
            parts = [self.noise.expand(self.noise.shape[:-1] + (n,))]
            if self.with_gradients:
                g = self.gradient_noise
                parts.append(g.expand(g.shape[:-1] + (n * self.d,)))
        out = torch.cat(parts, dim=-1)
        if shape is not None:
            out = out.expand(torch.broadcast_shapes(out.shape, shape))
        return out

    def forward(self, *params, shape=None, **kwargs):
        if shape is None:
            raise ValueError("GradientNoise needs the shape of the observations")
        N = shape[-1]
        n = N // (1 + self.d) if self.with_gradients else N
        return DiagLinearOperator(self.vector(n, shape))


class GradientGaussianLikelihood(_GaussianLikelihoodBase):
    """Gaussian likelihood of stacked value and gradient observations (see
    :class:`GradientNoise`); ``noise`` is the value noise, ``gradient_noise``
    the gradient noise."""

    def __init__(self, noise_covar: GradientNoise):
        super().__init__(noise_covar=noise_covar)

    @property
    def noise(self):
        return self.noise_covar.noise

    @noise.setter
    def noise(self, value):
        self.noise_covar.noise = value

    @property
    def gradient_noise(self):
        return self.noise_covar.gradient_noise

    @gradient_noise.setter
    def gradient_noise(self, value):
        self.noise_covar.gradient_noise = value


# --------------------------------------------------------------------------
# transforms and the chain rule


def _input_jacobian(tf, X):
    """``J = ∂u/∂x`` (*b, n, d, d) of a row-wise input transform at ``X``."""
    d = X.shape[-1]
    with torch.enable_grad():
        Xg = X.detach().clone().requires_grad_(True)
        U = tf(Xg)
        if U.shape != X.shape:
            raise TypeError(
                f"input_transform {type(tf).__name__} changes the inputs' shape "
                f"from {tuple(X.shape)} to {tuple(U.shape)}; gradient observations "
                "need a transform from R^d to R^d"
            )
        rows = []
        for i in range(d):
            (g,) = torch.autograd.grad(U[..., i].sum(), Xg, retain_graph=i < d - 1)
            rows.append(g)
    return torch.stack(rows, dim=-2).detach()


def _outcome_slope(tf, Y, Xm):
    """``S'(y)`` (*b, n) of a one-output outcome transform at ``Y`` (*b, n, 1)."""
    with torch.enable_grad():
        Yg = Y.detach().clone().requires_grad_(True)
        Ym, _ = tf(Yg, X=Xm)
        (g,) = torch.autograd.grad(Ym.sum(), Yg)
    return g[..., 0].detach()


def _check_input_transform(tf):
    if tf is None:
        return
    learnable = [n for n, p in tf.named_parameters() if p.requires_grad]
    if learnable:
        raise TypeError(
            f"input_transform {type(tf).__name__} has learnable parameters "
            f"{learnable}; GradientGP transforms its training data once, so use a "
            "fixed transform (Normalize, InputStandardize, ...) or freeze them"
        )
    if not getattr(tf, "transform_on_train", True):
        raise TypeError(
            f"input_transform {type(tf).__name__} does not transform training "
            "inputs (transform_on_train=False); GradientGP needs one that does"
        )


# --------------------------------------------------------------------------
# the model


class GradientGP(GPyTorchModel, gpytorch.models.GP, FantasizeMixin):
    """A BoTorch model on a gpgrad GP trained on values and gradients.

    Parameters
    ----------
    train_X : tensor (*b, n, d)
        Inputs; leading axes ``b`` make a batch of independent models (each
        with its own hyperparameters).
    train_Y : tensor (*b, n, 1)
        Observed values.
    train_dY : tensor (*b, n, d), optional
        Observed gradients ``∂y/∂x`` at ``train_X`` (data units); without them
        the model is an ordinary value-only GP (the baseline for
        comparisons).
    train_Yvar : tensor (*b, n, 1), optional
        Known value-noise variances (data units); then no noise is fitted.
    train_dYvar : tensor (*b, n, d), optional
        Known gradient-noise variances, one per gradient entry (data units).
        Needs ``train_Yvar``; without it, with ``train_Yvar``, the gradients are
        taken as noise-free up to jitter.
    kernel : gpgrad.kernels.Kernel or GradKernel, optional
        Prior kernel (in model units), at least once mean-square
        differentiable when gradients are given. Default: ``Matern52`` with
        one lengthscale per dimension. A :class:`GradKernel` is used as it is
        (its priors and constraints included).
    noise : float or dict, optional
        Fixed noise variances in model units (a float, or ``{"value": ...,
        "gradient": ...}``): they are kept out of fitting. Default: fitted.
    mean : float, default 0.0
        Constant prior mean in model units (fitted with the rest).
    fit : bool, default True
        Fit the hyperparameters on construction with :func:`gpgrad.fit` (see
        :meth:`fit_hyperparameters`). ``fit=False`` keeps the given values:
        fit later with this method or with BoTorch's ``fit_gpytorch_mll(
        ExactMarginalLogLikelihood(model.likelihood, model))``.
    fit_kwargs : dict, optional
        Passed to :func:`gpgrad.fit`. Default: one start, 200 iterations.
    outcome_transform : OutcomeTransform or None, default ``Standardize(m=1)``
        As for ``SingleTaskGP``; pass ``None`` for none. Its derivative carries
        the gradients over (``Standardize``: divided by the values' standard
        deviation).
    input_transform : InputTransform, optional
        A fixed transform from R^d to R^d (``Normalize``, ``InputStandardize``,
        ``AffineInputTransform``, ...); its Jacobian carries the gradients over.
    fantasize_gradients : bool, default False
        Whether :meth:`fantasize` draws gradient observations too (as the
        gradient-enhanced knowledge gradient, d-KG, assumes: each evaluation
        returns the gradient); needs training gradients.

    Attributes
    ----------
    covar_module : GradKernel
        The kernel's hyperparameters as GPyTorch parameters.
    likelihood : GradientGaussianLikelihood
        Value and gradient noise (``likelihood.noise``,
        ``likelihood.gradient_noise``).
    mean_module : gpytorch.means.ConstantMean
    gp : gpgrad.GP
        The GP with the current hyperparameters (model units, torch backend).
    posterior_gp : gpgrad.Posterior
        It conditioned on the training data (and fantasies), model units.
    y_mean, y_std : float or tensor
        ``Standardize``'s constants (0 and 1 for other transforms):
        ``y = y_mean + y_std · y'``.
    fit_result : gpgrad.FitResult or None

    Notes
    -----
    ``num_outputs`` is 1; ``posterior`` accepts ``X`` of shape ``(*b, q, d)``
    and returns a posterior over ``(*b, q, 1)``. In ``train()`` mode the model
    called on its training inputs returns the prior over the stacked values
    and gradients, so ``ExactMarginalLogLikelihood`` and ``fit_gpytorch_mll``
    fit it. Conditioning (``condition_on_observations`` with values and
    optionally gradients, and ``fantasize``) is exact, without refitting.
    """

    _num_outputs = 1

    def __init__(
        self,
        train_X,
        train_Y,
        train_dY=None,
        train_Yvar=None,
        train_dYvar=None,
        kernel=None,
        noise=None,
        mean=0.0,
        fit=True,
        fit_kwargs=None,
        outcome_transform=DEFAULT,
        input_transform=None,
        fantasize_gradients=False,
    ):
        super().__init__()
        train_X = _check_tensor(train_X, "train_X", "of shape (*b, n, d)")
        train_Y = _check_tensor(train_Y, "train_Y", "of shape (*b, n, 1)")
        if train_X.ndim < 2:
            raise ValueError(
                f"train_X must have shape (*b, n, d), got {tuple(train_X.shape)}"
            )
        *batch, n, d = train_X.shape
        batch = torch.Size(batch)
        dtype, device = train_X.dtype, train_X.device
        _check_shape(train_Y, "train_Y", batch + (n, 1), "train_X", train_X)
        for name, v, want in (
            ("train_dY", train_dY, batch + (n, d)),
            ("train_Yvar", train_Yvar, batch + (n, 1)),
            ("train_dYvar", train_dYvar, batch + (n, d)),
        ):
            if v is not None:
                _check_tensor(v, name, f"of shape {tuple(want)}")
                _check_shape(v, name, want, "train_X", train_X)
        if train_dYvar is not None and train_Yvar is None:
            raise ValueError(
                "train_dYvar (known gradient noise) needs train_Yvar (known value "
                "noise) too; got train_dYvar alone"
            )
        if train_dYvar is not None and train_dY is None:
            raise ValueError("train_dYvar was given without train_dY (gradients)")
        if train_Yvar is not None and noise is not None:
            raise ValueError(
                "give either train_Yvar (known noise per observation) or noise "
                "(one fixed variance per kind), not both"
            )
        if fantasize_gradients and train_dY is None:
            raise ValueError(
                "fantasize_gradients=True needs a model trained on gradients (train_dY)"
            )
        if kernel is None:
            kernel = _kernels.Matern52(lengthscale=[1.0] * d)
        if not isinstance(kernel, (_GPGradKernel, GradKernel)):
            raise TypeError(
                "kernel must be a gpgrad kernel (e.g. gpgrad.kernels.Matern52()) or "
                f"a GradKernel, got {type(kernel).__name__}"
            )
        if train_dY is not None:
            base = kernel.base if isinstance(kernel, GradKernel) else kernel
            base.check_order(1, "gradient observations")
        _check_input_transform(input_transform)
        cast = dict(dtype=dtype, device=device)
        train_Y = train_Y.detach().to(**cast)
        train_dY = None if train_dY is None else train_dY.detach().to(**cast)
        train_Yvar = None if train_Yvar is None else train_Yvar.detach().to(**cast)
        train_dYvar = None if train_dYvar is None else train_dYvar.detach().to(**cast)
        self.register_buffer("train_X", train_X.detach())
        self.register_buffer("train_Y", train_Y)
        self.register_buffer("train_dY", train_dY)
        self.register_buffer("train_Yvar", train_Yvar)
        self.register_buffer("train_dYvar", train_dYvar)
        self.fantasize_gradients = bool(fantasize_gradients)

        # -- into model space -------------------------------------------------
        if outcome_transform is DEFAULT:
            outcome_transform = Standardize(m=1, batch_shape=batch)
        with torch.no_grad():
            Xm = self.transform_inputs(train_X, input_transform=input_transform)
        if input_transform is not None:
            input_transform.eval()
        Ym, Yvar_m = train_Y, train_Yvar
        if outcome_transform is not None:
            outcome_transform.train()
            with torch.no_grad():
                Ym, Yvar_m = outcome_transform(train_Y, train_Yvar, X=Xm)
            outcome_transform.eval()
        gm = dYvar_m = None
        if train_dY is not None:
            gm, gscale = _gradients_to_model(
                train_X, train_Y, train_dY, Xm, input_transform, outcome_transform
            )
            if train_dYvar is not None:
                dYvar_m = train_dYvar * _diag_scale(gscale, "train_dYvar") ** 2
            elif train_Yvar is not None:
                dYvar_m = torch.zeros_like(gm)
        self.register_buffer("_Xm", Xm.detach())
        self.register_buffer("_ym", Ym[..., 0].detach())
        self.register_buffer("_gm", None if gm is None else gm.detach())
        if outcome_transform is not None:
            self.outcome_transform = outcome_transform
        if input_transform is not None:
            self.input_transform = input_transform

        # -- modules -----------------------------------------------------------
        if isinstance(kernel, GradKernel):
            self.covar_module = kernel
        else:
            self.covar_module = GradKernel(kernel, batch_shape=batch)
        self.likelihood = GradientGaussianLikelihood(
            GradientNoise(
                d,
                train_dY is not None,
                batch,
                Yvar=None if Yvar_m is None else Yvar_m[..., 0].detach(),
                dYvar=dYvar_m,
            )
        )
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)
        self.to(**cast)
        if not isinstance(kernel, GradKernel):
            # again in the data's dtype: float32 would have rounded them
            for name, value in kernel.parameters().items():
                if name not in self.covar_module._fixed:
                    v = value.detach() if torch.is_tensor(value) else value
                    self.covar_module.set_hyperparameter(name, B.to_numpy(v))
        self._fixed_noise = noise is not None
        if train_Yvar is None:
            nz = 1e-6 if noise is None else noise
            if not isinstance(nz, dict):
                nz = {"value": nz, "gradient": nz}
            self.likelihood.noise = _as_float(nz.get("value", 1e-6))
            self.likelihood.gradient_noise = _as_float(
                nz.get("gradient", nz.get("value", 1e-6))
            )
            if self._fixed_noise:
                for p in self.likelihood.parameters():
                    p.requires_grad_(False)
        self.mean_module.constant.data.fill_(_as_float(mean))
        self.train_inputs = (train_X.detach(),)
        self.train_targets = self._targets()
        self._extra = []  # observations added by conditioning (model units)
        self._fantasy_batch = torch.Size()
        self._cache = None
        self.fit_result = None
        if fit:
            self.fit_hyperparameters(**(fit_kwargs or {}))
        self.eval()

    # -- data in model space -----------------------------------------------------
    def _targets(self):
        parts = [self._ym]
        if self._gm is not None:
            parts.append(self._gm.flatten(-2))
        return torch.cat(parts, dim=-1)

    @property
    def with_gradients(self) -> bool:
        return self._gm is not None

    @property
    def num_outputs(self) -> int:
        return 1

    def _observations(self, detach=True, with_noise=True):
        """The training data as gpgrad functionals in model units."""
        lik = self.likelihood.noise_covar

        def nz(v):
            return v.detach() if detach else v

        if lik.known:
            nv = nz(lik.Yvar)
            ng = None if lik.dYvar is None else nz(lik.dYvar)
        else:
            nv = nz(lik.noise)  # (*b, 1)
            ng = nz(lik.gradient_noise)[..., None]  # (*b, 1, 1)
        if not with_noise and not lik.known:
            nv = ng = None
        obs = [values(self._Xm, self._ym, noise=nv)]
        if self._gm is not None:
            obs.append(gradients(self._Xm, self._gm, noise=ng))
        return obs

    @property
    def gp(self) -> GP:
        """The gpgrad GP with the current hyperparameters (model units)."""
        kernel = self.covar_module.gpgrad_kernel()
        kernel = kernel.replace(
            **{k: v.detach() for k, v in kernel.parameters().items()}
        )
        lik = self.likelihood.noise_covar
        noise = {"value": _scalar(lik.noise.detach()[..., 0])}
        if self.with_gradients:
            noise["gradient"] = _scalar(lik.gradient_noise.detach()[..., 0])
        return GP(
            kernel,
            noise=noise,
            mean=_scalar(self.mean_module.constant.detach()),
            backend="torch",
            dtype=self._Xm.dtype,
            device=self._Xm.device,
        )

    def _fingerprint(self):
        ts = [p.detach().reshape(-1) for p in self.parameters()]
        ts += [
            b.detach().reshape(-1)
            for b in self.buffers()
            if b is not None and b.is_floating_point()
        ]
        return torch.cat(ts) if ts else None

    @property
    def posterior_gp(self):
        """The gpgrad posterior on the training data and any conditioned
        observations (model units); rebuilt when a hyperparameter changes."""
        fp = self._fingerprint()
        if self._cache is not None:
            old_fp, post = self._cache
            if old_fp.shape == fp.shape and torch.equal(old_fp, fp):
                return post
        post = self.gp.condition(*self._observations(), *self._extra)
        self._cache = (fp, post)
        return post

    # -- fitting -----------------------------------------------------------------
    def fit_hyperparameters(self, **fit_kwargs):
        """(Re)fit the hyperparameters by maximizing the log marginal
        likelihood of the training data with :func:`gpgrad.fit`; returns self.

        Keyword arguments go to :func:`gpgrad.fit` (defaults here: one start,
        200 L-BFGS-B iterations, a per-dimension lengthscale; fixed or known
        noises stay as they are). The result is loaded into the GPyTorch
        parameters (``covar_module``, ``likelihood``, ``mean_module``) and
        kept in ``fit_result``. BoTorch's ``fit_gpytorch_mll`` is the other
        way to fit.
        """
        from ..fit import fit

        lik = self.likelihood.noise_covar
        kw = {"restarts": 1, "maxiter": 200, "ard": True}
        if self._fixed_noise:
            kw["fixed"] = ["noise.value"] + (
                ["noise.gradient"] if self.with_gradients else []
            )
        fixed_kernel = [n for n in self.covar_module._fixed]
        if fixed_kernel:
            kw["fixed"] = list(kw.get("fixed", [])) + fixed_kernel
        kw.update(fit_kwargs)
        obs = self._observations(with_noise=lik.known)
        self.fit_result = fit(self.gp, *obs, **kw)
        self._load_gp(self.fit_result.gp)
        return self

    def _load_gp(self, gp):
        with torch.no_grad():
            for name, value in gp.kernel.parameters().items():
                if name in self.covar_module._fixed:
                    continue
                self.covar_module.set_hyperparameter(name, value)
            lik = self.likelihood.noise_covar
            if not lik.known and not self._fixed_noise:
                lik.noise = gp.noise_for("value")
                if self.with_gradients:
                    lik.gradient_noise = gp.noise_for("gradient")
            m = torch.as_tensor(gp.mean, dtype=self._Xm.dtype, device=self._Xm.device)
            c = self.mean_module.raw_constant
            c.data.copy_(m.expand(c.shape))
        self._cache = None

    def forward(self, x):
        """The prior over the stacked values and gradients at ``x``
        (*b, n, d) (train mode: the distribution ``ExactMarginalLogLikelihood``
        compares with ``train_targets``)."""
        if self.training:
            x = self.transform_inputs(x)
        kernel = self.covar_module.gpgrad_kernel()
        fs = [values(x)] + ([gradients(x)] if self.with_gradients else [])
        blocks = as_blocks(fs, B.namespace(x), x.dtype, x.device)
        K = covariance(kernel, blocks)
        n = x.shape[-2]
        c = self.mean_module.constant[..., None]
        mean = [c.expand(c.shape[:-1] + (n,))]
        if self.with_gradients:
            mean.append(torch.zeros(n * x.shape[-1], dtype=x.dtype, device=x.device))
        batch = torch.broadcast_shapes(K.shape[:-2], mean[0].shape[:-1])
        mean = torch.cat([m.expand(batch + m.shape[-1:]) for m in mean], dim=-1)
        return MultivariateNormal(
            mean, DenseLinearOperator(K.expand(batch + K.shape[-2:]))
        )

    def set_train_data(self, inputs=None, targets=None, strict=True):
        """Set ``train_inputs`` (BoTorch swaps transformed and original inputs
        there between eval and train mode); the model's data stay as built."""
        if inputs is not None:
            if torch.is_tensor(inputs):
                inputs = (inputs,)
            self.train_inputs = tuple(inputs)
        if targets is not None:
            self.train_targets = targets

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if "_extra" in self.__dict__:  # not while __init__ moves the modules
            self._cache = None
            self.train_inputs = tuple(fn(t) for t in self.train_inputs)
            self.train_targets = fn(self.train_targets)
            self._extra = [_map_functional(f, fn) for f in self._extra]
        return out

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else None
        state = dict(self.__dict__ if state is None else state)
        state["_cache"] = None
        res = state.get("fit_result")
        if res is not None and getattr(res, "posterior", None) is not None:
            # a solver holds its array namespace (a module): keep the fitted
            # numbers and the GP, and leave the posterior to posterior_gp
            res = copy.copy(res)
            res.posterior = None
            state["fit_result"] = res
        return state

    def load_state_dict(self, state_dict, strict=True, keep_transforms=True, **kw):
        """Load parameters as :meth:`torch.nn.Module.load_state_dict` does; the
        transforms' constants are part of the data here and are kept."""
        self._cache = None
        return torch.nn.Module.load_state_dict(self, state_dict, strict=strict, **kw)

    # -- BoTorch model API ------------------------------------------------------
    @property
    def batch_shape(self) -> torch.Size:
        """Batch shape of the model: the training data's, and that of any
        (fantasy) observations conditioned on."""
        shapes = [tuple(self._Xm.shape[:-2]), tuple(self._fantasy_batch)]
        shapes += [tuple(f.X.shape[:-2]) for f in self._extra]
        return torch.Size(torch.broadcast_shapes(*shapes))

    def subset_output(self, idcs):
        if list(idcs) != [0]:
            raise ValueError(f"GradientGP has one output (index 0), got {idcs}")
        return self

    def _check_X(self, X, what="X", shape_doc="(*b, q, {d})"):
        X = _check_tensor(X, what, "of shape (*b, q, d)")
        d = self.train_X.shape[-1]
        if X.ndim < 2 or X.shape[-1] != d:
            raise ValueError(
                f"{what} must have shape {shape_doc.format(d=d)} for a model on {d} "
                f"inputs, got {tuple(X.shape)}"
            )
        return X.to(self._Xm.dtype)

    def posterior(
        self,
        X,
        output_indices=None,
        observation_noise=False,
        posterior_transform=None,
        **kwargs,
    ):
        """The joint posterior of ``f`` at ``X`` (*b, q, d): a
        ``GPyTorchPosterior`` with mean (*b, q, 1) and a ``linear_operator``
        covariance.

        ``observation_noise=True`` adds the value noise variance to the
        diagonal; a tensor (broadcasting to (*b, q, 1), model units) adds that
        instead. Gradients flow to ``X``.
        """
        if output_indices is not None and list(output_indices) != [0]:
            raise ValueError(
                f"GradientGP has one output (index 0), got output_indices "
                f"{output_indices}"
            )
        X = self._check_X(X)
        self.eval()
        Xm = self.transform_inputs(X)
        mean, cov = self._joint(Xm)
        if observation_noise is not False:
            cov = cov + torch.diag_embed(self._value_noise(observation_noise, mean))
        mvn = MultivariateNormal(mean, DenseLinearOperator(cov))
        post = GPyTorchPosterior(distribution=mvn)
        if hasattr(self, "outcome_transform"):
            post = self.outcome_transform.untransform_posterior(post, X=Xm)
        if posterior_transform is not None:
            return posterior_transform(post)
        return post

    def _value_noise(self, observation_noise, like):
        if isinstance(observation_noise, torch.Tensor):
            nz = observation_noise.to(like)[..., 0]
        else:
            nz = self.likelihood.noise_covar.noise.detach()  # (*mb, 1)
        return nz.expand(torch.broadcast_shapes(nz.shape, like.shape))

    def posterior_with_gradients(self, X, observation_noise=False):
        """The joint posterior of ``f`` and ``∇f`` at ``X`` (*b, q, d) in
        *model* units (transformed inputs, outcomes): a ``GPyTorchPosterior``
        over a ``MultitaskMultivariateNormal`` with mean (*b, q, 1 + d) (per
        point the value, then the gradient, as GPyTorch's derivative models).

        ``observation_noise=True`` adds the value noise to the values and the
        gradient noise to the gradients; a tensor (*b, q, 1 + d) adds that.
        """
        X = self._check_X(X)
        self.eval()
        Xm = self.transform_inputs(X)
        return self._posterior_with_gradients_model(Xm, observation_noise)

    def _posterior_with_gradients_model(self, Xm, observation_noise=False):
        q, d = Xm.shape[-2:]
        mean, cov = self._joint(Xm, with_gradients=True)  # block order
        perm = interleave_index(q, d, Xm.device)
        mean = mean[..., perm]
        cov = cov[..., perm, :][..., :, perm]
        if observation_noise is not False:
            if isinstance(observation_noise, torch.Tensor):
                on = observation_noise.to(mean)
                nz = on.expand(on.shape[:-2] + (q, d + 1)).flatten(-2)
            else:
                lik = self.likelihood.noise_covar
                v = lik.noise.detach()
                g = lik.gradient_noise.detach()
                per = torch.cat([v, g.expand(g.shape[:-1] + (d,))], dim=-1)
                nz = per.repeat(*([1] * (per.ndim - 1)), q)  # interleaved
            nz = nz.expand(torch.broadcast_shapes(nz.shape, mean.shape))
            cov = cov + torch.diag_embed(nz)
        mean = mean.reshape(mean.shape[:-1] + (q, d + 1))
        mvn = MultitaskMultivariateNormal(
            mean, DenseLinearOperator(cov), interleaved=True
        )
        return GPyTorchPosterior(distribution=mvn)

    def _joint(self, Xm, with_gradients=False):
        """Model-units mean (*b, k) and covariance (*b, k, k) at ``Xm``
        (*b, q, d): k = q values, or q values then q·d gradient entries."""
        post = self.posterior_gp
        mb = self.batch_shape
        xb = Xm.shape[:-2]
        q, d = Xm.shape[-2:]

        def ask(X):
            if with_gradients:
                p = post.predict(values(X), gradients(X), full_cov=True)
            else:
                p = post.value(X, full_cov=True)
            return p.mean, p.cov

        extra = len(xb) - len(mb)
        if extra <= 0:
            Xe = Xm.expand(torch.broadcast_shapes(xb, mb) + (q, d))
            return ask(Xe)
        # queries with more batch axes than a batched (fantasy) model: fold
        # the extra axes into the point axis, then keep the diagonal blocks
        E = xb[:extra]
        rest = torch.broadcast_shapes(xb[extra:], mb)
        Xb = Xm.expand(E + rest + (q, d))
        e = math.prod(E)
        Xf = Xb.reshape((e,) + rest + (q, d)).movedim(0, -3).reshape(rest + (e * q, d))
        mean, cov = ask(Xf)
        k = cov.shape[-1] // e  # entries per fold
        if with_gradients:
            # block order over all e q points: regroup to per-fold blocks
            idx = torch.arange(e * q, device=Xm.device).reshape(e, q)
            t = torch.arange(d, device=Xm.device)
            gidx = (e * q + idx[..., None] * d + t).reshape(e, q * d)
            order = torch.cat([idx, gidx], dim=-1).reshape(-1)
            mean, cov = mean[..., order], cov[..., order, :][..., :, order]
        mean = mean.reshape(rest + (e, k)).movedim(-2, 0).reshape(E + rest + (k,))
        cov = cov.reshape(rest + (e, k, e, k))
        i = torch.arange(e, device=Xm.device)
        cov = cov[..., i, :, i, :]  # (e, *rest, k, k)
        return mean, cov.reshape(E + rest + (k, k))

    # -- conditioning ------------------------------------------------------------
    def _with_extra(self, extra, batch=None):
        new = copy.copy(self)
        for name in ("_parameters", "_buffers", "_modules"):
            setattr(new, name, collections.OrderedDict(getattr(self, name)))
        new._extra = [*self._extra, *extra]
        new._cache = None
        if batch is not None:
            new._fantasy_batch = torch.Size(
                torch.broadcast_shapes(self._fantasy_batch, batch)
            )
        return new

    def condition_on_observations(self, X, Y, noise=None, dY=None, **kwargs):
        """A new model conditioned also on observations ``Y`` (and optionally
        gradients ``dY``) at ``X``, all in data units.

        Exact: the same prior and hyperparameters (no refit). ``X`` is
        (*b, n', d) and ``Y`` (*b', n', 1) with ``b'`` broadcasting to
        ``b``; batch axes make a batched model (as BoTorch's fantasies do).
        ``noise`` (*b, n', 1), in data units, replaces the value noise for
        these points. ``dY`` (*b, n', d) adds gradient observations at ``X``
        (with the model's gradient noise, or ``dY_noise`` (*b, n', d) in data
        units).
        """
        d = self.train_X.shape[-1]
        X = _check_tensor(X, "X", "of shape (*b, n', d)")
        Y = _check_tensor(Y, "Y", "of shape (*b, n', 1)")
        if Y.shape[-1] != 1 or X.shape[-1] != d or X.ndim < 2 or Y.ndim < 2:
            raise ValueError(
                f"condition_on_observations takes X (*b, n', {d}) and Y "
                f"(*b, n', 1), got X {tuple(X.shape)} and Y {tuple(Y.shape)}"
            )
        dt = self._Xm.dtype
        X, Y = X.to(dt), Y.to(dt)
        if dY is not None:
            dY = _check_tensor(dY, "dY", "of shape (*b, n', d)").to(dt)
            if dY.shape[-2:] != X.shape[-2:]:
                raise ValueError(
                    f"dY must have shape (*b, {X.shape[-2]}, {d}) for X of shape "
                    f"{tuple(X.shape)}, got {tuple(dY.shape)}"
                )
        self.eval()
        batch = torch.broadcast_shapes(X.shape[:-2], Y.shape[:-2])
        X = X.expand(batch + X.shape[-2:])
        Y = Y.expand(batch + Y.shape[-2:])
        Xm = self.transform_inputs(X)
        ot = getattr(self, "outcome_transform", None)
        nv = noise
        if nv is not None:
            nv = nv.to(dt).expand(batch + Y.shape[-2:])
        if ot is not None:
            Ym, nv = ot(Y, nv, X=Xm)
        else:
            Ym = Y
        g = gv = None
        if dY is not None:
            gb = torch.broadcast_shapes(batch, dY.shape[:-2])
            dY = dY.expand(gb + dY.shape[-2:])
            Xg, Yg = X.expand(gb + X.shape[-2:]), Y.expand(gb + Y.shape[-2:])
            g, scale = _gradients_to_model(
                Xg,
                Yg,
                dY,
                Xm.expand(gb + Xm.shape[-2:]),
                getattr(self, "input_transform", None),
                ot,
            )
            dY_noise = kwargs.get("dY_noise")
            if dY_noise is not None:
                gv = dY_noise.to(dt) * _diag_scale(scale, "dY_noise") ** 2
        return self._condition_model(
            Xm, Ym[..., 0], None if nv is None else nv[..., 0], g, gv
        )

    def _condition_model(self, Xm, ym, nv=None, g=None, gv=None):
        """Condition on model-units values ``ym`` (*b, n') and gradients ``g``
        (*b, n', d) at ``Xm``; noises default to the model's."""
        lik = self.likelihood.noise_covar
        if nv is None:
            nv = lik.noise.detach()  # (*mb, 1) or the mean of the known ones
        extra = [values(Xm.expand(ym.shape + Xm.shape[-1:]), ym, noise=nv)]
        if g is not None:
            if gv is None:
                gv = lik.gradient_noise.detach()[..., None]
            Xg = Xm.expand(g.shape)
            extra.append(gradients(Xg, g, noise=gv))
        return self._with_extra(extra)

    def fantasize(self, X, sampler, observation_noise=None, gradients=None, **kwargs):
        """A fantasy model: the model conditioned on samples of the posterior
        at ``X`` (*b, q, d).

        Draws values, or values and gradients (``gradients=True``, default
        the model's ``fantasize_gradients``: the d-KG fantasies), from the
        joint posterior with observation noise (``observation_noise``: a
        model-units tensor (*b, 1, 1) or (*b, 1, 1 + d); default the model's
        noise), in model units, and conditions on them. The result has batch
        shape ``sampler.sample_shape + X.shape[:-2]`` (broadcast with the
        model's); ``X`` with no points gives that batch shape and no new data.
        """
        if observation_noise is not None and not isinstance(
            observation_noise, torch.Tensor
        ):
            raise TypeError(
                "observation_noise must be a tensor or None, got "
                f"{type(observation_noise).__name__}"
            )
        grads = self.fantasize_gradients if gradients is None else bool(gradients)
        if grads and not self.with_gradients:
            raise ValueError("gradient fantasies need a model trained on gradients")
        X = self._check_X(X)
        self.eval()
        if X.shape[-2] == 0:
            shape = sampler.sample_shape + torch.broadcast_shapes(
                X.shape[:-2], self.batch_shape
            )
            return self._with_extra([], batch=shape)
        Xm = self.transform_inputs(X)
        obs_noise = True if observation_noise is None else observation_noise
        with fantasize_flag():
            if grads:
                post = self._posterior_with_gradients_model(Xm, obs_noise)
            else:
                mean, cov = self._joint(Xm)
                cov = cov + torch.diag_embed(self._value_noise(obs_noise, mean))
                post = GPyTorchPosterior(
                    MultivariateNormal(mean, DenseLinearOperator(cov))
                )
            samples = sampler(post)  # (*s, *b, q, 1) or (*s, *b, q, 1 + d)
        nv = gv = None
        if observation_noise is not None:
            full = observation_noise.to(samples).expand(samples.shape[1:-2] + (1, -1))
            nv = full[..., 0].expand(samples.shape[1:-1])
            if grads:
                gv = full[..., 1:] if full.shape[-1] > 1 else full[..., :1]
                gv = gv.expand(samples.shape[1:-1] + (Xm.shape[-1],))
        return self._condition_model(
            Xm,
            samples[..., 0],
            nv,
            samples[..., 1:] if grads else None,
            gv,
        )

    @classmethod
    def construct_inputs(
        cls, training_data, *, train_dY=None, train_dYvar=None, **kwargs
    ):
        """Keyword arguments for ``GradientGP`` from a ``SupervisedDataset``
        (``train_X``, ``train_Y`` and, when the dataset has it,
        ``train_Yvar``), plus gradients ``train_dY`` (n, d) and their known
        noise ``train_dYvar`` when given, and any other keyword (``kernel``,
        ``input_transform``, ...) passed through."""
        if not isinstance(training_data, SupervisedDataset):
            raise TypeError(
                "construct_inputs expects a botorch SupervisedDataset, got "
                f"{type(training_data).__name__}"
            )
        out = dict(super().construct_inputs(training_data))
        if train_dY is not None:
            out["train_dY"] = train_dY
        if train_dYvar is not None:
            out["train_dYvar"] = train_dYvar
        out.update(kwargs)
        return out

    @property
    def y_mean(self):
        ot = getattr(self, "outcome_transform", None)
        if isinstance(ot, Standardize):
            return _scalar(ot.means.detach()[..., 0, 0])
        return 0.0

    @property
    def y_std(self):
        ot = getattr(self, "outcome_transform", None)
        if isinstance(ot, Standardize):
            return _scalar(ot.stdvs.detach()[..., 0, 0])
        return 1.0

    def __repr__(self):
        grads = "values and gradients" if self.with_gradients else "values"
        return (
            f"GradientGP({self.covar_module.base!r}; {self.train_X.shape[-2]} "
            f"points, {grads})"
        )


def _gradients_to_model(X, Y, dY, Xm, input_tf, outcome_tf):
    """Model-units gradients ``S'(y) J⁻ᵀ ∂y/∂x`` (*b, n, d) and, for a
    diagonal ``J``, the per-entry factor (*b, n, d) they were scaled by (None
    for a general ``J``)."""
    g = dY
    scale = torch.ones_like(dY)
    if input_tf is not None:
        J = _input_jacobian(input_tf, X)  # (*b, n, d_u, d_x)
        Jd = torch.diagonal(J, dim1=-2, dim2=-1)
        if torch.equal(J, torch.diag_embed(Jd)):
            if not bool((Jd != 0).all()):
                raise ValueError(
                    "input_transform has a zero derivative at a training point, "
                    "so gradients cannot be carried over"
                )
            g = g / Jd
            scale = 1 / Jd
        else:
            g = torch.linalg.solve(J.mT, g[..., None])[..., 0]
            scale = None
    if outcome_tf is not None:
        s = _outcome_slope(outcome_tf, Y, Xm)[..., None]
        g = g * s
        scale = None if scale is None else scale * s
    return g, scale


def _diag_scale(scale, what):
    if scale is None:
        raise ValueError(
            f"{what} needs an input transform with a diagonal Jacobian "
            "(per-dimension scaling) to carry the variances over"
        )
    return scale


def _as_float(v):
    if torch.is_tensor(v):
        return v.detach()
    return float(v)


def _scalar(t):
    """A Python float from a 0-d tensor; batched tensors stay tensors."""
    if torch.is_tensor(t) and t.ndim == 0:
        return float(t)
    return t


def _map_functional(f, fn):
    new = copy.copy(f)
    for name in ("X", "y", "noise", "U"):
        v = getattr(f, name, None)
        if torch.is_tensor(v):
            setattr(new, name, fn(v))
    return new
