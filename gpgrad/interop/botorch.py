"""A BoTorch model trained on function values and gradients.

:class:`GradientGP` is a ``botorch.models.model.Model`` over one output ``f``
whose posterior conditions on values and, optionally, gradients,

.. math::

    f \\mid y, G \\sim \\mathcal{GP}\\bigl(μ(x), c(x, x')\\bigr),\\qquad
    μ = m + k_x^\\top (K + Σ)^{-1} (y - m),\\quad
    c = k(x, x') - k_x^\\top (K + Σ)^{-1} k_{x'},

with ``K`` the closed-form value+gradient covariance of the observations
(:mod:`gpgrad.covariance`), ``y`` the stacked values and gradients, and ``m``
the constant mean (zero for the gradient entries). ``posterior(X)`` returns a
``GPyTorchPosterior`` over function values (a ``MultivariateNormal``), so
BoTorch's analytic and Monte Carlo acquisition functions
(``LogExpectedImprovement``, ``qLogNoisyExpectedImprovement``,
``UpperConfidenceBound``, ...) use it unchanged, and autograd carries
gradients to ``X`` for ``optimize_acqf``.

Targets are standardized with constants fixed at construction (values by
their mean and standard deviation, gradients by the same standard deviation),
so :meth:`GradientGP.condition_on_observations` (and BoTorch's ``fantasize``)
condition the *same* prior on more data: the result is exact.
"""

from __future__ import annotations

try:
    import torch
    from botorch.models.model import FantasizeMixin, Model
    from botorch.posteriors.gpytorch import GPyTorchPosterior
    from gpytorch.distributions import MultivariateNormal
except ImportError as exc:  # pragma: no cover - exercised without botorch
    raise ImportError(
        "gpgrad.interop.botorch needs botorch; install it with "
        "`pip install gpgrad[botorch]`"
    ) from exc

import math

from .. import kernels as _kernels
from ..functionals import gradients, values
from ..gp import GP
from ..kernels.base import Kernel as _GPGradKernel

__all__ = ["GradientGP"]

DTYPE = torch.float64


def _check_tensor(value, what, shape_doc):
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{what} must be a torch tensor {shape_doc}, got {type(value).__name__}"
        )
    if not value.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {value.dtype}")
    return value


class GradientGP(Model, FantasizeMixin):
    """A BoTorch model on a gpgrad GP trained on values and gradients.

    Parameters
    ----------
    train_X : tensor (n, d)
        Inputs (BoTorch works best with inputs scaled to the unit cube).
    train_Y : tensor (n, 1)
        Observed values.
    train_dY : tensor (n, d), optional
        Observed gradients at ``train_X``; without them the model is an
        ordinary value-only GP (the baseline for comparisons).
    kernel : gpgrad.kernels.Kernel, optional
        Prior kernel, at least once mean-square differentiable when gradients
        are given. Default: ``Matern52`` with one lengthscale per dimension.
    noise : float or dict, optional
        Observation noise variances in *standardized* units (a float, or
        ``{"value": ..., "gradient": ...}``). Given, they are kept fixed;
        otherwise they are fitted.
    mean : float, default 0.0
        Constant prior mean in standardized units (fitted when ``fit``).
    fit : bool, default True
        Fit the hyperparameters by maximizing the log marginal likelihood
        (:func:`gpgrad.fit`) on construction; otherwise ``kernel``, ``noise``
        and ``mean`` are used as they are (call :meth:`fit_hyperparameters`
        later). To reuse a fitted model's hyperparameters on new data, pass
        ``kernel=old.gp.kernel, noise=old.gp.noise, mean=old.gp.mean,
        fit=False``.
    fit_kwargs : dict, optional
        Passed to :func:`gpgrad.fit` (e.g. ``restarts``, ``maxiter``,
        ``bounds``). Default: one start, 200 iterations.

    Attributes
    ----------
    gp : gpgrad.GP
        The (fitted) GP in standardized units, torch backend, float64.
    posterior_gp : gpgrad.Posterior
        It conditioned on the training data.
    y_mean, y_std : float
        The standardization constants: ``f = y_mean + y_std · f_std``.

    Notes
    -----
    ``num_outputs`` is 1; ``posterior`` accepts ``X`` of shape
    ``(*b, q, d)`` and returns a posterior over ``(*b, q, 1)``. Input and
    outcome transforms are not supported: scale inputs before, and use
    ``y_mean``/``y_std`` (the built-in standardization) for outputs.
    Conditioning on new observations (``condition_on_observations``, with
    values and optionally gradients, and ``fantasize``) is exact, without
    refitting; BoTorch's ``fantasize`` draws values only, so fantasies do not
    include gradient data.
    """

    num_outputs = 1
    #: BoTorch's ``fantasize`` looks for a likelihood; the noise lives in ``gp``
    likelihood = None

    def __init__(
        self,
        train_X,
        train_Y,
        train_dY=None,
        kernel=None,
        noise=None,
        mean=0.0,
        fit=True,
        fit_kwargs=None,
    ):
        super().__init__()
        train_X = _check_tensor(train_X, "train_X", "of shape (n, d)")
        train_Y = _check_tensor(train_Y, "train_Y", "of shape (n, 1)")
        if train_X.ndim != 2:
            raise ValueError(
                f"train_X must have shape (n, d), got {tuple(train_X.shape)}"
            )
        n, d = train_X.shape
        if tuple(train_Y.shape) != (n, 1):
            raise ValueError(
                f"train_Y must have shape ({n}, 1) for train_X of shape "
                f"{tuple(train_X.shape)}, got {tuple(train_Y.shape)}"
            )
        if train_dY is not None:
            train_dY = _check_tensor(train_dY, "train_dY", "of shape (n, d)")
            if tuple(train_dY.shape) != (n, d):
                raise ValueError(
                    f"train_dY must have shape ({n}, {d}) for train_X of shape "
                    f"{tuple(train_X.shape)}, got {tuple(train_dY.shape)}"
                )
        if kernel is None:
            kernel = _kernels.Matern52(lengthscale=[1.0] * d)
        if not isinstance(kernel, _GPGradKernel):
            raise TypeError(
                "kernel must be a gpgrad kernel (e.g. gpgrad.kernels.Matern52()), "
                f"got {type(kernel).__name__}"
            )
        self.train_X = train_X.detach().to(DTYPE)
        self.train_Y = train_Y.detach().to(DTYPE)
        self.train_dY = None if train_dY is None else train_dY.detach().to(DTYPE)
        y = self.train_Y[:, 0]
        self.y_mean = float(y.mean())
        sd = float(y.std()) if n > 1 else 0.0
        self.y_std = sd if sd > 0 else 1.0
        self._fixed_noise = noise is not None
        self.gp = GP(
            kernel, noise=1e-6 if noise is None else noise, mean=mean, backend="torch"
        )
        self._extra = []  # value observations added by condition_on_observations
        self.fit_result = None
        if fit:
            self.fit_hyperparameters(**(fit_kwargs or {}))
        else:
            self._condition()

    # ------------------------------------------------------------------
    def _observations(self):
        obs = [values(self.train_X, (self.train_Y[:, 0] - self.y_mean) / self.y_std)]
        if self.train_dY is not None:
            obs.append(gradients(self.train_X, self.train_dY / self.y_std))
        return obs

    def _condition(self):
        self.posterior_gp = self.gp.condition(*self._observations(), *self._extra)

    def fit_hyperparameters(self, **fit_kwargs):
        """(Re)fit the hyperparameters by maximizing the log marginal
        likelihood of the training data with :func:`gpgrad.fit`; returns self.

        Keyword arguments go to :func:`gpgrad.fit` (defaults here: one start,
        200 L-BFGS-B iterations, a per-dimension lengthscale; noises given at
        construction stay fixed).
        """
        from ..fit import fit

        kw = {"restarts": 1, "maxiter": 200, "ard": True}
        if self._fixed_noise:
            kinds = ["noise.value"] + (
                ["noise.gradient"] if self.train_dY is not None else []
            )
            kw["fixed"] = kinds
        kw.update(fit_kwargs)
        self.fit_result = fit(self.gp, *self._observations(), **kw)
        self.gp = self.fit_result.gp
        self._condition()
        return self

    @property
    def batch_shape(self) -> torch.Size:
        """Batch shape of the model (non-empty after batched conditioning)."""
        shapes = [tuple(f.X.shape[:-2]) for f in self._extra]
        return torch.Size(torch.broadcast_shapes(*shapes) if shapes else ())

    def subset_output(self, idcs):
        if list(idcs) != [0]:
            raise ValueError(f"GradientGP has one output (index 0), got {idcs}")
        return self

    # ------------------------------------------------------------------
    def posterior(
        self,
        X,
        output_indices=None,
        observation_noise=False,
        posterior_transform=None,
        **kwargs,
    ):
        """The joint posterior of ``f`` at ``X`` (*b, q, d): a
        ``GPyTorchPosterior`` with mean (*b, q, 1).

        ``observation_noise=True`` adds the value noise variance to the
        diagonal; a tensor (broadcasting to (*b, q, 1)) adds that instead.
        Gradients flow to ``X``.
        """
        if output_indices is not None and list(output_indices) != [0]:
            raise ValueError(
                f"GradientGP has one output (index 0), got output_indices "
                f"{output_indices}"
            )
        X = _check_tensor(X, "X", "of shape (*b, q, d)")
        d = self.train_X.shape[-1]
        if X.ndim < 2 or X.shape[-1] != d:
            raise ValueError(
                f"X must have shape (*b, q, {d}) for a model on {d} inputs, got "
                f"{tuple(X.shape)}"
            )
        out_dtype = X.dtype
        X = X.to(DTYPE)
        mean, cov = self._joint(X)
        mean = self.y_mean + self.y_std * mean
        cov = cov * self.y_std**2
        q = X.shape[-2]
        if observation_noise is not False:
            if isinstance(observation_noise, torch.Tensor):
                nz = observation_noise.to(DTYPE)[..., 0]
            else:
                nz = self.gp.noise_for("value") * self.y_std**2
                nz = torch.as_tensor(nz, dtype=DTYPE).expand(q)
            cov = cov + torch.diag_embed(torch.as_tensor(nz).expand(cov.shape[:-1]))
        mvn = MultivariateNormal(mean.to(out_dtype), cov.to(out_dtype))
        post = GPyTorchPosterior(distribution=mvn)
        if posterior_transform is not None:
            return posterior_transform(post)
        return post

    def _joint(self, X):
        """Standardized mean (*b, q) and covariance (*b, q, q) at ``X``."""
        mb = self.batch_shape
        extra = X.ndim - 2 - len(mb)
        if len(mb) == 0 or extra <= 0:
            p = self.posterior_gp.value(X, full_cov=True)
            return p.mean, p.cov
        # queries with more batch axes than a batched (fantasy) model: fold
        # the extra axes into the point axis, then keep the diagonal blocks
        E = X.shape[:extra]
        q, d = X.shape[-2:]
        Xb = X.expand(E + mb + (q, d)) if X.shape[extra:-2] != mb else X
        e = math.prod(E)
        Xf = Xb.reshape((e,) + mb + (q, d)).movedim(0, -3).reshape(mb + (e * q, d))
        p = self.posterior_gp.value(Xf, full_cov=True)
        mean = p.mean.reshape(mb + (e, q)).movedim(-2, 0).reshape(E + mb + (q,))
        cov = p.cov.reshape(mb + (e, q, e, q))
        idx = torch.arange(e)
        cov = cov[..., idx, :, idx, :]  # (e, *mb, q, q)
        cov = cov.reshape(E + mb + (q, q))
        return mean, cov

    # ------------------------------------------------------------------
    def condition_on_observations(self, X, Y, noise=None, dY=None, **kwargs):
        """A new model conditioned also on observations ``Y`` (and optionally
        gradients ``dY``) at ``X``.

        Exact: the same prior and hyperparameters (no refit). ``X`` is
        (*b, n', d) and ``Y`` (*b', n', 1) with ``b'`` broadcasting to
        ``b``; batch axes make a batched model (as BoTorch's fantasies do).
        ``noise`` (*b, n', 1), in data units, replaces the value noise for
        these points. ``dY`` (*b, n', d) adds gradient observations at ``X``
        (with the model's gradient noise).
        """
        X = _check_tensor(X, "X", "of shape (*b, n', d)").to(DTYPE)
        Y = _check_tensor(Y, "Y", "of shape (*b, n', 1)").to(DTYPE)
        d = self.train_X.shape[-1]
        if Y.shape[-1] != 1 or X.shape[-1] != d or X.ndim < 2:
            raise ValueError(
                f"condition_on_observations takes X (*b, n', {d}) and Y "
                f"(*b, n', 1), got X {tuple(X.shape)} and Y {tuple(Y.shape)}"
            )
        batch = torch.broadcast_shapes(X.shape[:-2], Y.shape[:-2])
        Xn = X.expand(batch + X.shape[-2:])
        yn = (Y[..., 0].expand(batch + Y.shape[-2:-1]) - self.y_mean) / self.y_std
        nz = None if noise is None else noise.to(DTYPE)[..., 0] / self.y_std**2
        extra = [values(Xn, yn, noise=nz)]
        if dY is not None:
            dY = _check_tensor(dY, "dY", "of shape (*b, n', d)").to(DTYPE)
            if dY.shape[-2:] != X.shape[-2:]:
                raise ValueError(
                    f"dY must have shape (*b, {X.shape[-2]}, {d}) for X of shape "
                    f"{tuple(X.shape)}, got {tuple(dY.shape)}"
                )
            gb = torch.broadcast_shapes(batch, dY.shape[:-2])
            Xg = X.expand(gb + X.shape[-2:])
            extra.append(gradients(Xg, dY.expand(gb + dY.shape[-2:]) / self.y_std))
        new = self.__class__.__new__(self.__class__)
        Model.__init__(new)
        for name in ("train_X", "train_Y", "train_dY", "y_mean", "y_std", "gp"):
            setattr(new, name, getattr(self, name))
        new._fixed_noise = self._fixed_noise
        new.fit_result = self.fit_result
        new._extra = [*self._extra, *extra]
        new._condition()
        return new

    def __repr__(self):
        grads = "values and gradients" if self.train_dY is not None else "values"
        return (
            f"GradientGP({self.gp.kernel!r}; {self.train_X.shape[0]} points, {grads})"
        )
