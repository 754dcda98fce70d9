"""Predictions from a conditioned GP: values, gradients, Hessians, directional
derivatives and joint sets; samples; the log marginal likelihood."""

from __future__ import annotations

import math
import warnings

import numpy as np

from . import backend as B
from .covariance import Block
from .exceptions import GPGradWarning
from .functionals import (
    Functional,
    directional,
    gradients,
    hessian_index,
    hessians,
    partials,
    second_partials,
    values,
)

__all__ = ["Posterior", "Prediction"]

#: query kinds whose per-point entries form a vector or matrix
_VECTOR = ("gradient", "hessian")


class Prediction:
    """Posterior moments of a query, computed when first read.

    Reading ``mean`` computes the mean alone; reading ``var``, ``std`` or
    ``cov`` computes the variances (and the mean with them, when it was not
    read before). For the iterative and Woodbury solvers a mean costs
    O(N M D) while variances cost a linear solve per queried entry, so code
    that reads only ``mean`` never pays for them.

    Attributes
    ----------
    mean : array
        Shape of the query: (..., m) values, (..., m, d) gradients,
        (..., m, d, d) Hessians, (..., M) for :meth:`Posterior.predict`.
    var : array
        Marginal variances, the shape of ``mean``.
    cov : array or None
        With ``full_cov=True``, the joint covariance of shape
        ``mean.shape[batch:] + mean.shape[batch:]`` after the batch axes. For
        gradients and Hessians without ``full_cov``, the per-point blocks
        (..., m, d, d) and (..., m, d, d, d, d). Otherwise None.
    """

    __slots__ = ("_mean", "_var", "_cov", "_source")

    def __init__(self, mean=None, var=None, cov=None, *, source=None):
        if source is None and (mean is None or var is None):
            raise ValueError("a Prediction needs mean and var, or a source")
        self._mean, self._var, self._cov = mean, var, cov
        self._source = source

    @property
    def mean(self):
        if self._mean is None:
            self._mean = self._source.mean()
        return self._mean

    @property
    def var(self):
        self._fill()
        return self._var

    @property
    def cov(self):
        self._fill()
        return self._cov

    @property
    def std(self):
        xp = B.namespace(self.var)
        return xp.sqrt(self.var)

    def _fill(self):
        if self._var is None:
            mean, self._var, self._cov = self._source.moments()
            if self._mean is None:
                self._mean = mean
            self._source = None

    def __repr__(self):
        shape = tuple(self.mean.shape)
        cov = None if self.cov is None else tuple(self.cov.shape)
        return f"Prediction(mean shape {shape}, cov shape {cov})"

    def __iter__(self):
        # allows ``mean, var = post.value(X)``
        yield self.mean
        yield self.var


class _Pending:
    """What a :class:`Prediction` computes on demand: a posterior, its query
    blocks and the covariance mode."""

    __slots__ = ("post", "queries", "mode", "shaped")

    def __init__(self, post, queries, mode, shaped):
        self.post, self.queries, self.mode = post, queries, mode
        self.shaped = shaped  # reshape per query kind (single queries) or not

    def mean(self):
        flat = self.post._mean_flat(self.queries)
        if not self.shaped:
            return flat
        return self.post._shape_mean(self.queries[0], flat)

    def moments(self):
        mean, var, cov = self.post._moments(self.queries, self.mode)
        if not self.shaped:
            return mean, var, cov
        return self.post._shape_moments(self.queries[0], mean, var, cov, self.mode)


class Posterior:
    """A GP conditioned on observations.

    Create it with :meth:`gpgrad.GP.condition`. Every query method takes points
    ``X`` (..., m, d) and returns a :class:`Prediction`; ``full_cov=True`` adds
    the joint covariance over all requested entries.
    """

    def __init__(self, gp, observations, blocks, solver, residual, shift, scale):
        self.gp = gp
        self.kernel = gp.kernel
        self.observations = list(observations)
        self._blocks = blocks
        self._solver = solver
        self._r = residual
        self._alpha = solver.solve(residual[..., None])[..., 0]
        self._shift = shift
        self._scale = scale
        self.xp = gp.xp

    @property
    def solver(self):
        """The :class:`~gpgrad.solvers.base.Solver` of the observations."""
        return self._solver

    @property
    def weights(self):
        """``α = (K + Σ)⁻¹ r`` (..., N) in standardized units: the posterior
        mean at a query is its cross-covariance with the observations times α."""
        return self._alpha

    @property
    def jitter(self) -> float:
        """Absolute jitter added to the observations' covariance (0.0 if none)."""
        return self._solver.jitter

    @property
    def method(self) -> str:
        """How the linear system was solved (``"cholesky"``, ...)."""
        return self._solver.method

    def condition(self, *observations) -> Posterior:
        """This posterior conditioned on more observations.

        Exact: the result equals ``gp.condition(*old, *new)`` (it is computed
        that way, refactoring the whole system).
        """
        more = self.gp._parse(observations)
        return self.gp.condition(*self.observations, *more)

    @property
    def num_observations(self) -> int:
        return int(self._r.shape[-1])

    # ------------------------------------------------------------------
    # queries
    def value(self, X, full_cov=False) -> Prediction:
        """Posterior of ``f`` at ``X``: mean and var (..., m)."""
        return self._query(values(X), full_cov)

    def gradient(self, X, full_cov=False) -> Prediction:
        """Posterior of ``∇f`` at ``X``: mean and var (..., m, d); ``cov`` is
        the per-point (..., m, d, d) blocks, or with ``full_cov`` the joint
        (..., m, d, m, d)."""
        return self._query(gradients(X), full_cov)

    def hessian(self, X, full_cov=False) -> Prediction:
        """Posterior of the Hessian at ``X``: mean and var (..., m, d, d);
        ``cov`` per point (..., m, d, d, d, d) or joint (..., m, d, d, m, d, d)."""
        return self._query(hessians(X), full_cov)

    def directional(self, X, U, full_cov=False) -> Prediction:
        """Posterior of ``u_pᵀ∇f(x_p)``: mean and var (..., m)."""
        return self._query(directional(X, U), full_cov)

    def partial(self, X, dims, full_cov=False) -> Prediction:
        """Posterior of ``∂f/∂x_{dims[p]}`` at each point: mean and var (..., m)."""
        return self._query(partials(X, dims), full_cov)

    def second_partial(self, X, i, j, full_cov=False) -> Prediction:
        """Posterior of ``∂²f/∂x_i∂x_j`` at each point: mean and var (..., m)."""
        return self._query(second_partials(X, i, j), full_cov)

    def predict(self, *queries, full_cov=False) -> Prediction:
        """Joint posterior over several functional sets.

        ``mean`` and ``var`` are (..., M) over the concatenated entries of the
        queries (each point-major; Hessians as their distinct (i ≤ j) entries);
        with ``full_cov=True``, ``cov`` is (..., M, M). Moments are computed
        when first read (see :class:`Prediction`).
        """
        _check_flag(full_cov)
        qs = self._queries(queries)
        mode = "full" if full_cov else "var"
        return Prediction(source=_Pending(self, qs, mode, shaped=False))

    def mean(self, *queries):
        """Posterior mean of ``queries`` without their variances, (..., M) over
        the concatenated entries as in :meth:`predict`.

        With the iterative and Woodbury solvers this skips the one-solve-per-
        entry cost of variances and never forms the cross-covariance matrix.
        """
        return self._mean_flat(self._queries(queries))

    # ------------------------------------------------------------------
    # the pieces that acquisition functions build on
    def check_queries(self, *queries) -> list:
        """The queries, validated against the observations (dimension,
        differentiability, backend); raises ValueError/TypeError otherwise."""
        return self._queries(queries)

    def query_blocks(self, *queries) -> list:
        """Validated queries as :class:`~gpgrad.covariance.Block` objects on the
        GP's backend, dtype and device, as the solver's methods take them."""
        return self._qblocks(self._queries(queries))

    def mean_to_data_units(self, mean, queries):
        """A flat mean (..., M) over ``queries`` from the solver's standardized
        units to data units (values shifted and scaled, derivatives scaled)."""
        return self._unscale_mean(mean, queries)

    def var_to_data_units(self, var, entry_axes=1):
        """A (co)variance from standardized units to data units (multiplied
        by the squared output scale); its last ``entry_axes`` axes are entries,
        the ones before them batch axes."""
        s2 = self._scale * self._scale
        return var * self.xp.reshape(s2, tuple(s2.shape) + (1,) * entry_axes)

    # ------------------------------------------------------------------
    def _queries(self, queries):
        if not queries:
            raise ValueError("no queries given: pass gpgrad.values(Xs), ...")
        out = []
        for q in queries:
            if not isinstance(q, Functional):
                raise TypeError(
                    "queries must be gpgrad functionals such as gpgrad.values(Xs) "
                    f"or gpgrad.gradients(Xs), got {type(q).__name__}"
                )
            if q.y is not None:
                raise ValueError(
                    f"a {q.kind} query has targets: queries describe what to "
                    f"predict, so build it without them (gpgrad.{q.kind}s(X) ...); "
                    "to add observations, condition the GP on them"
                )
            d = self._blocks[0].d
            if q.d != d:
                raise ValueError(
                    f"query points have {q.d} columns but the observations have {d}"
                )
            self.kernel.check_order(q.order, f"a {q.kind} query")
            self.gp._check_backend(q)
            out.append(q)
        return out

    def _query(self, q, full_cov):
        _check_flag(full_cov)
        (q,) = self._queries([q])
        mode = "full" if full_cov else ("point" if q.kind in _VECTOR else "var")
        return Prediction(source=_Pending(self, [q], mode, shaped=True))

    def _qblocks(self, queries):
        gp = self.gp
        return [Block(q, self.xp, gp.dtype, gp.device) for q in queries]

    def _mean_flat(self, queries):
        mean = self._solver.mean(self._qblocks(queries), self._alpha)
        return self._unscale_mean(mean, queries)

    def _moments(self, queries, mode):
        """Flat mean (..., M), var (..., M) and, by ``mode``, the joint cov
        (..., M, M) ("full") or per-point blocks (..., m, k, k) ("point"), in
        data units."""
        mean, var, cov = self._solver.moments(self._qblocks(queries), self._alpha, mode)
        var, cov = self._unscale_cov(var, cov)
        return self._unscale_mean(mean, queries), var, cov

    def _hessian_index(self, d):
        return B.as_index(hessian_index(d).reshape(-1), self._alpha)

    def _shape_mean(self, q, mean):
        """A flat (..., n·k) mean in the query's shape."""
        xp = self.xp
        batch = tuple(mean.shape[:-1])
        mean = xp.reshape(mean, batch + (q.n, q.k))
        if q.kind == "hessian":
            idx = self._hessian_index(q.d)
            return xp.reshape(xp.take(mean, idx, axis=-1), batch + (q.n, q.d, q.d))
        return mean if q.kind in _VECTOR else mean[..., 0]

    def _shape_moments(self, q, mean, var, cov, mode):
        xp = self.xp
        batch = tuple(mean.shape[:-1])
        n, k, d = q.n, q.k, q.d
        mean, var = self._shape_mean(q, mean), self._shape_mean(q, var)
        if mode == "full":
            cov = xp.reshape(cov, batch + (n, k, n, k))
        if q.kind == "hessian":
            idx = self._hessian_index(d)
            if mode == "point":
                cov = xp.take(xp.take(cov, idx, axis=-1), idx, axis=-2)
                cov = xp.reshape(cov, batch + (n, d, d, d, d))
            elif mode == "full":
                cov = xp.take(xp.take(cov, idx, axis=-1), idx, axis=-3)
                cov = xp.reshape(cov, batch + (n, d, d, n, d, d))
        elif q.kind not in _VECTOR and mode == "full":
            cov = cov[..., :, 0, :, 0]
        return mean, var, cov

    def _unscale_mean(self, mean, queries):
        xp = self.xp
        scale = self._scale[..., None]
        mean = mean * scale
        offset = self.gp._asarray(self.gp.mean) + self._shift
        parts, start = [], 0
        for q in queries:
            seg = mean[..., start : start + q.size]
            if q.kind == "value":
                seg = seg + offset[..., None]
            parts.append(seg)
            start += q.size
        return xp.concat(parts, axis=-1) if len(parts) > 1 else parts[0]

    def _unscale_cov(self, var, cov):
        xp = self.xp
        neg = var < 0
        if bool(xp.any(neg)):
            worst = B.to_float(xp.min(var))
            ref = B.to_float(xp.max(xp.abs(var)))
            if worst < -1e-6 * max(ref, 1e-300) and worst < -1e-12:
                warnings.warn(
                    f"posterior variances down to {worst:.3g} were negative (round-off "
                    "in an ill-conditioned system) and were set to 0; more noise "
                    "or fewer near-duplicate points make them reliable",
                    GPGradWarning,
                    stacklevel=6,  # the user's read of .var/.cov
                )
            var = xp.where(neg, xp.zeros_like(var), var)
        if cov is not None:
            # cov has var's batch axes and its own trailing entry axes
            cov = self.var_to_data_units(cov, cov.ndim - (var.ndim - 1))
        return self.var_to_data_units(var), cov

    # ------------------------------------------------------------------
    def sample(self, *queries, n_samples=1, seed=None):
        """Joint samples of the queried functionals.

        ``post.sample(Xs)`` samples values at ``Xs``; otherwise pass functionals
        (``gpgrad.gradients(Xs)``, ...). With one query the samples have shape
        ``(n_samples, *mean.shape)`` (Hessians as full symmetric matrices);
        with several, ``(n_samples, ..., M)`` over the concatenated entries.
        ``seed`` is an int, a numpy Generator/torch Generator, or None.
        """
        if len(queries) == 1 and not isinstance(queries[0], Functional):
            queries = (values(queries[0]),)
        qs = self._queries(queries)
        if (
            isinstance(n_samples, bool)
            or not isinstance(n_samples, int)
            or n_samples < 1
        ):
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        if not (
            seed is None
            or isinstance(seed, (int, np.integer, np.random.Generator))
            or type(seed).__name__ == "Generator"
        ) or isinstance(seed, bool):
            raise TypeError(
                "seed must be an int, a numpy or torch Generator, or None, got "
                f"{type(seed).__name__}"
            )
        xp = self.xp
        mean, _, cov = self._moments(qs, "full")
        w, V = B.eigh(cov)
        top = xp.max(xp.abs(w), axis=-1, keepdims=True)
        bad = w < -1e-6 * top
        if bool(xp.any(bad)):
            warnings.warn(
                "the posterior covariance has clearly negative eigenvalues "
                f"(down to {B.to_float(xp.min(w)):.3g}); samples use its nearest "
                "positive semi-definite matrix",
                GPGradWarning,
                stacklevel=2,
            )
        w = xp.where(w > 0, w, xp.zeros_like(w))
        A = V * xp.sqrt(w)[..., None, :]
        z = B.random_normal(
            xp, (n_samples,) + tuple(mean.shape), self.gp.dtype, self.gp.device, seed
        )
        draws = mean + (A @ z[..., None])[..., 0]
        if len(qs) > 1:
            return draws
        q = qs[0]
        batch = tuple(mean.shape[:-1])
        lead = (n_samples,) + batch
        if q.kind == "hessian":
            idx = self._hessian_index(q.d)
            draws = xp.reshape(draws, lead + (q.n, q.k))
            return xp.reshape(xp.take(draws, idx, axis=-1), lead + (q.n, q.d, q.d))
        if q.kind in _VECTOR:
            return xp.reshape(draws, lead + (q.n, q.k))
        return draws

    # ------------------------------------------------------------------
    def log_marginal_likelihood(self):
        """``log p(y) = −½ rᵀ(K+Σ)⁻¹r − ½ log|K+Σ| − ½ N log 2π`` in data units.

        With ``normalize_y`` the Jacobian of the standardization is included,
        so the value does not depend on that choice beyond its effect on the
        fitted scale.
        """
        xp = self.xp
        N = self.num_observations
        own = self._solver.log_marginal_likelihood(self._r)
        if own is not None:
            return own - N * xp.log(self._scale)
        quad = xp.sum(self._r * self._alpha, axis=-1)
        lml = (
            -0.5 * quad - 0.5 * self._solver.logdet() - 0.5 * N * math.log(2 * math.pi)
        )
        return lml - N * xp.log(self._scale)

    def __repr__(self):
        kinds = ", ".join(f"{f.kind}s×{f.n}" for f in self.observations)
        return f"Posterior({kinds}; {self.num_observations} entries, {self.method})"


def _check_flag(full_cov):
    if not isinstance(full_cov, (bool, np.bool_)):
        raise TypeError(f"full_cov must be True or False, got {full_cov!r}")
