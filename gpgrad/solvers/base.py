"""The solver protocol: what a conditioned GP asks of its linear algebra.

A solver owns ``A = K + Σ``, the covariance of the observation entries (the
kernel's closed-form blocks plus the noise), in the standardized units of
:class:`~gpgrad.GP` (``normalize_y``). :class:`~gpgrad.Posterior` and
:mod:`gpgrad.acquisition` use solvers through these methods only:

``solve(R)``
    ``A⁻¹ R`` for R (..., N, k).
``logdet()``
    ``log |A|`` (...,), exact or an estimate.
``quad_factors(Ks)``
    ``(P, Q)`` with ``Ksᵀ A⁻¹ Ks = Pᵀ Q`` for a cross-covariance Ks (..., N, M).
``cross(qblocks, alpha, joint=False)``
    Posterior mean ``K_{QX} α`` (..., M) of the query blocks and the factors
    ``(P, Q)`` of their data term; ``joint`` asks for factors valid across
    query points (a joint covariance), not only within each point.
``mean(qblocks, alpha)``
    The posterior mean alone, never paying for variances.
``moments(qblocks, alpha, mode)``
    Flat mean (..., M), marginal variance (..., M) and, by ``mode``, the
    joint covariance (..., M, M) (``"full"``), the per-point blocks
    (..., m, k, k) (``"point"``) or nothing (``"var"``).
``condition_estimate()``
    A cheap lower bound on the condition number of ``A``, or None.
``method``, ``jitter``
    Its name as shown by ``Posterior.method`` and the absolute jitter that was
    added to the diagonal (0.0 if none).

A new solver subclasses :class:`Solver`, implements ``solve`` and ``logdet``
and overrides what its structure makes cheaper (a Kalman smoother answers
``moments`` itself; matrix-free solvers override ``cross_mean``); one line in
:func:`gpgrad.solvers.select.make_solver` makes it reachable.
"""

from __future__ import annotations

from .. import backend as B
from ..covariance import covariance, point_covariance

__all__ = ["Solver", "QUERY_CHUNK_ELEMENTS"]

#: query entries × observation entries handled at once when only marginals
#: (or means) are asked for: bounds the cross-covariance's memory
QUERY_CHUNK_ELEMENTS = 1 << 24


class Solver:
    """Base class of the solvers; see the module docstring for the contract.

    Parameters
    ----------
    kernel : gpgrad.kernels.Kernel
    blocks : list of gpgrad.covariance.Block
        The observation entries, in order.
    noise : array (..., N) or None
        The noise variance of each entry (standardized units).
    """

    #: the name shown by ``Posterior.method``
    method: str = ""
    #: absolute jitter added to the diagonal of ``A``
    jitter: float = 0.0

    def __init__(self, kernel, blocks, noise):
        self.kernel = kernel
        self.blocks = list(blocks)
        self.noise = noise
        self.xp = B.namespace(blocks[0].X)

    @property
    def num_rows(self) -> int:
        """N, the number of observation entries."""
        return sum(b.size for b in self.blocks)

    # -- required ------------------------------------------------------------
    def solve(self, R):
        """``A⁻¹ R`` for R (..., N, k)."""
        raise NotImplementedError

    def logdet(self):
        """``log |A|``, (...,)."""
        raise NotImplementedError

    def log_marginal_likelihood(self, residual):
        """``log p(r)`` (...,) computed by the solver itself, differentiable
        on torch (the state-space solver's linear-time adjoint), or None for
        the default ``−½ rᵀA⁻¹r − ½ log|A| − ½ N log 2π``."""
        return None

    def condition_estimate(self) -> float | None:
        """A cheap lower bound on the condition number of ``A`` (the largest
        over the batch), or None where the solver has none."""
        return None

    # -- defaults through cross-covariances ---------------------------------
    def quad_factors(self, Ks):
        """``(P, Q)`` with ``Ksᵀ A⁻¹ Ks = Pᵀ Q``."""
        return Ks, self.solve(Ks)

    def cross_mean(self, qblocks, alpha):
        """``K_{QX} α`` (..., M), chunked over query points."""
        xp = self.xp
        parts = []
        for sub in _chunks(qblocks, self.num_rows):
            Ks = covariance(self.kernel, self.blocks, sub)
            parts.append((B.matrix_transpose(Ks) @ alpha[..., None])[..., 0])
        return _join(xp, parts)

    def cross(self, qblocks, alpha, joint=False):
        """Mean (..., M) and the factors ``(P, Q)`` of ``K_{QX} A⁻¹ K_{XQ}``."""
        Ks = covariance(self.kernel, self.blocks, qblocks)  # (..., N, M)
        mean = (B.matrix_transpose(Ks) @ alpha[..., None])[..., 0]
        P, Q = self.quad_factors(Ks)
        return mean, P, Q

    def mean(self, qblocks, alpha):
        """The posterior mean (..., M) of the query blocks, no variances."""
        return self.cross_mean(qblocks, alpha)

    def moments(self, qblocks, alpha, mode):
        """Flat mean, marginal variance and, by ``mode``, covariance.

        Parameters
        ----------
        qblocks : list of Block
        alpha : array (..., N)
            ``A⁻¹ r`` for the residual r of the observations.
        mode : {"var", "point", "full"}

        Returns
        -------
        mean, var : arrays (..., M)
        cov : (..., M, M) for "full", (..., m, k, k) for "point" (one query
            block), None for "var"
        """
        xp = self.xp
        if mode == "full":
            mean, P, Q = self.cross(qblocks, alpha, joint=True)
            prior = covariance(self.kernel, qblocks)
            cov = prior - B.matrix_transpose(P) @ Q
            cov = 0.5 * (cov + B.matrix_transpose(cov))
            return mean, B.diagonal(cov), cov
        means, vars_, blocks = [], [], []
        for (sub,) in _chunks(qblocks, self.num_rows, single=True):
            mean, P, Q = self.cross([sub], alpha)
            prior = point_covariance(self.kernel, sub)  # (..., m, k, k)
            batch = tuple(mean.shape[:-1])
            m, k = sub.n, sub.k
            Pm = xp.reshape(P, tuple(P.shape[:-1]) + (m, k))
            Qm = xp.reshape(Q, tuple(Q.shape[:-1]) + (m, k))
            if mode == "point":
                Pt = xp.moveaxis(Pm, -3, -2)  # (..., m, N, k)
                Qt = xp.moveaxis(Qm, -3, -2)
                blk = prior - B.matrix_transpose(Pt) @ Qt
                blk = 0.5 * (blk + B.matrix_transpose(blk))
                blocks.append(xp.broadcast_to(blk, batch + (m, k, k)))
                v = B.diagonal(blk)
            else:
                v = B.diagonal(prior) - xp.sum(Pm * Qm, axis=-3)
            vars_.append(
                xp.reshape(xp.broadcast_to(v, batch + (m, k)), batch + (m * k,))
            )
            means.append(mean)
        cov = xp.concat(blocks, axis=-3) if mode == "point" else None
        return _join(xp, means), _join(xp, vars_), cov


def _chunks(qblocks, n_rows, single=False):
    """Lists of query sub-blocks of bounded size ``n_rows × entries``.

    With ``single`` each list holds one sub-block (of one query block), so
    per-point results stay aligned with a single block's layout.
    """
    out, pending, used = [], [], 0
    for qb in qblocks:
        step = max(1, QUERY_CHUNK_ELEMENTS // max(1, n_rows * qb.k))
        for i0 in range(0, qb.n, step):
            sub = qb.sub(i0, min(qb.n, i0 + step)) if qb.n > step else qb
            size = sub.n * sub.k
            if single:
                out.append([sub])
                continue
            if pending and (used + size) * n_rows > QUERY_CHUNK_ELEMENTS:
                out.append(pending)
                pending, used = [], 0
            pending.append(sub)
            used += size
    if pending:
        out.append(pending)
    return out


def _join(xp, parts):
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=-1)
