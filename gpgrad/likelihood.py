"""The log marginal likelihood and its hyperparameter gradient at the cost of a
factorization.

For ``C = K_θ + Σ_θ`` (N × N) and residuals ``r = y − L m_θ``,

.. math::

    \\ell = -\\tfrac12 r^\\top C^{-1} r - \\tfrac12 \\log|C| - \\tfrac N2 \\log 2π,
    \\qquad
    \\frac{\\partial \\ell}{\\partial C} = W = \\tfrac12 (α α^\\top - C^{-1}),
    \\quad α = C^{-1} r,
    \\qquad
    \\frac{\\partial \\ell}{\\partial r} = -α .

So every hyperparameter's gradient is one contraction ``Σ_ij W_ij ∂C_ij/∂θ``:
:func:`dense_log_marginal_likelihood` factors ``C`` once (no autograd graph
through the Cholesky factorization), forms ``W`` from the factor, and obtains
``Σ_ij W_ij ∂K_ij/∂θ`` for all kernel hyperparameters at once as one
vector-Jacobian product of the Gram assembly, chunk by chunk (only each
chunk's graph is alive at a time). The noise variances and the mean reach
``ℓ`` through ``diag W`` and ``−α`` (ordinary autograd on O(N) tensors).
Where the assembly's autograd graph is small (:data:`GRAPH_ELEMENTS`), the
Gram matrix is assembled once with its graph kept and the product is one
backward pass; otherwise each chunk is rebuilt in the backward pass.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend as B
from .covariance import CHUNK_ELEMENTS, _contract_chunk, batch_shape, covariance
from .solvers.dense import cholesky

__all__ = ["dense_log_marginal_likelihood", "dense_applies", "GRAPH_ELEMENTS"]

#: largest ``Σ n_A·k_A·n_B·k_B·(d + 1)`` (entries × input dimension) for which
#: the Gram assembly keeps its autograd graph between the forward and the
#: backward pass (about 1 GB of float64 temporaries); beyond it the backward
#: pass rebuilds the matrix chunk by chunk
GRAPH_ELEMENTS = 1 << 24


def dense_log_marginal_likelihood(gp, observations):
    """``log p(y)`` of a torch GP by one dense Cholesky factorization, with a
    closed-form backward pass.

    The result is differentiable (first order) with respect to every tensor
    hyperparameter of ``gp`` that requires grad: the kernel's, the noise and
    the mean. Values agree with ``gp.log_marginal_likelihood(*observations)``
    for the dense solver.

    Parameters
    ----------
    gp : GP
        With ``backend="torch"``.
    observations : list of Functional
        Already parsed (:meth:`GP._parse`).

    Returns
    -------
    tensor (*batch)
    """
    import torch

    blocks, r, noise, _shift, scale = gp._prepare(observations)
    kparams = gp.kernel.parameters()
    names = [k for k, v in kparams.items() if torch.is_tensor(v) and v.requires_grad]
    if not names or _graph_size(gp.kernel, blocks) <= GRAPH_ELEMENTS:
        # one assembly, its graph kept for the backward pass
        K = covariance(gp.kernel, blocks, upper_only=True)
    else:
        gram = _Gram(gp.kernel, blocks, names)
        K = _functions()[0].apply(gram, *[kparams[k] for k in names])
    lml = _functions()[1].apply(K, r, noise)
    N = r.shape[-1]
    return lml - N * torch.log(scale)


def dense_applies(gp, observations) -> bool:
    """Whether ``gp`` solves ``observations`` densely (``method="cholesky"``,
    or ``"auto"`` within its dense size) with room for the three N × N
    buffers of :func:`dense_log_marginal_likelihood`."""
    from .solvers import select

    if gp.method == "cholesky":
        return True
    if gp.method != "auto":
        return False
    shapes = [tuple(f.X.shape[:-2]) for f in observations]
    nbatch = max(1, math.prod(np.broadcast_shapes(*shapes)))
    rows = sum(f.size for f in observations)
    need = 3 * select.dense_memory(rows, 8, nbatch)
    return rows <= select.AUTO_DENSE_MAX_ROWS and need <= select.available_memory()


def _graph_size(kernel, blocks):
    n = max(1, math.prod(batch_shape(kernel, blocks)))
    rows = sum(b.size for b in blocks)
    return n * rows * rows * (blocks[0].d + 1)


class _Gram:
    """The kernel and observation blocks of a Gram matrix, and the names of
    the kernel hyperparameters that need gradients."""

    __slots__ = ("kernel", "blocks", "names")

    def __init__(self, kernel, blocks, names):
        self.kernel, self.blocks, self.names = kernel, blocks, names

    def vjp(self, G, params):
        """``Σ_ij G_ij ∂K_ij/∂p`` for each tensor ``p`` in ``params``, with ``G``
        (…, N, N) weighting the upper triangle (K's lower one is not read).

        The Gram matrix is rebuilt chunk by chunk as in
        :func:`gpgrad.covariance.covariance`, and each chunk's vector-Jacobian
        product is taken at once, so autograd never holds more than one chunk.
        """
        import torch

        leaves = [p.detach().requires_grad_(True) for p in params]
        kernel = self.kernel.replace(**dict(zip(self.names, leaves)))
        blocks = self.blocks
        xp = B.namespace(G)
        nbatch = max(1, math.prod(batch_shape(kernel, blocks)))
        off = np.cumsum([0] + [b.size for b in blocks])
        grads = [torch.zeros_like(p) for p in leaves]
        with torch.enable_grad():
            for ia, ba in enumerate(blocks):
                for ib in range(ia, len(blocks)):
                    bb = blocks[ib]
                    Gab = G[..., off[ia] : off[ia + 1], off[ib] : off[ib + 1]]
                    Gab = Gab.reshape(tuple(G.shape[:-2]) + (ba.n, ba.k, bb.n, bb.k))
                    per_point = max(1, ba.k * bb.n * bb.k * nbatch)
                    step = max(1, CHUNK_ELEMENTS // per_point)
                    for i0 in range(0, ba.n, step):
                        i1 = min(ba.n, i0 + step)
                        j0 = i0 if ia == ib else 0
                        XA, UA = ba.points(i0, i1)
                        XB, UB = bb.points(j0, bb.n)
                        res = _contract_chunk(
                            kernel, xp, XA, UA, XB, UB, ba.order, bb.order
                        )
                        if not res.requires_grad:
                            continue
                        w = Gab[..., i0:i1, :, j0:, :]
                        out = torch.autograd.grad(
                            (res * w).sum(), leaves, allow_unused=True
                        )
                        for acc, g in zip(grads, out):
                            if g is not None:
                                acc += g
        return grads


_FUNCTIONS = []


def _functions():
    """The two autograd functions, built on first use (torch is optional)."""
    if not _FUNCTIONS:
        _FUNCTIONS.extend(_make_functions())
    return _FUNCTIONS


def _make_functions():
    import torch

    class ChunkedGram(torch.autograd.Function):
        """``K(θ)``'s upper triangle without a graph; the backward pass rebuilds
        it chunk by chunk."""

        @staticmethod
        def forward(ctx, gram, *params):
            ctx.gram = gram
            ctx.save_for_backward(*params)
            return covariance(gram.kernel, gram.blocks, upper_only=True)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, G):
            return (None, *ctx.gram.vjp(G, ctx.saved_tensors))

    class FactorLML(torch.autograd.Function):
        """``ℓ(K, r, noise)`` for ``C = K + diag(noise)`` given by its upper
        triangle: forward by Cholesky, backward through ``W``."""

        @staticmethod
        def forward(ctx, K, r, noise):
            N = r.shape[-1]

            def build():
                return B.add_to_diagonal_(K.clone(), noise)

            L, _ = cholesky(
                build(),
                what=f"the covariance matrix of the {N} observations",
                hint=" (identical points observed twice need noise > 0)",
                rebuild=build,
            )
            alpha = torch.cholesky_solve(r[..., None], L)[..., 0]
            logdet = 2.0 * torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)
            quad = (r * alpha).sum(-1)
            ctx.save_for_backward(L, alpha)
            return -0.5 * quad - 0.5 * logdet - 0.5 * N * math.log(2 * math.pi)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            L, alpha = ctx.saved_tensors
            N = alpha.shape[-1]
            # W = ½ (α αᵀ − C⁻¹), times the incoming gradient, in one buffer
            W = torch.cholesky_inverse(L)
            flat = W.reshape(-1, N, N)
            a = alpha.reshape(-1, N, 1)
            flat.baddbmm_(a, a.transpose(-1, -2), beta=-0.5, alpha=0.5)
            W = flat.reshape(W.shape)
            W.mul_(g[..., None, None])
            grad_r = -g[..., None] * alpha if ctx.needs_input_grad[1] else None
            diag = W.diagonal(dim1=-2, dim2=-1)
            grad_noise = diag.clone() if ctx.needs_input_grad[2] else None
            grad_K = None
            if ctx.needs_input_grad[0]:
                # K is symmetric and given by its upper triangle:
                # Σ_ij W_ij dK_ij = Σ_{i<j} 2 W_ij dK_ij + Σ_i W_ii dK_ii
                W.mul_(2.0)
                diag.mul_(0.5)
                grad_K = W.triu_()
            return grad_K, grad_r, grad_noise

    return ChunkedGram, FactorLML
