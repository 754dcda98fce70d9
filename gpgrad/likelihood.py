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
    closed = bool(names) and _radial_applies(gp.kernel, blocks)
    if not names or (not closed and _graph_size(gp.kernel, blocks) <= GRAPH_ELEMENTS):
        # one assembly, its graph kept for the backward pass
        K = covariance(gp.kernel, blocks, upper_only=True)
    else:
        gram = _Gram(gp.kernel, blocks, names, closed)
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
    """The kernel and observation blocks of a Gram matrix, the names of the
    kernel hyperparameters that need gradients, and whether the closed form
    of :func:`_radial_vjp` applies."""

    __slots__ = ("kernel", "blocks", "names", "closed")

    def __init__(self, kernel, blocks, names, closed=False):
        self.kernel, self.blocks, self.names = kernel, blocks, names
        self.closed = closed

    def vjp(self, G, params):
        """``Σ_ij G_ij ∂K_ij/∂p`` for each tensor ``p`` in ``params``, with ``G``
        (…, N, N) weighting the upper triangle (K's lower one is not read).

        In closed form (:func:`_radial_vjp`) where it applies; otherwise the
        Gram matrix is rebuilt chunk by chunk as in
        :func:`gpgrad.covariance.covariance`, and each chunk's vector-Jacobian
        product is taken at once, so autograd never holds more than one chunk.
        """
        import torch

        if self.closed:
            grads = _radial_vjp(self.kernel, self.blocks, G)
            return [grads[name].reshape(p.shape) for name, p in zip(self.names, params)]

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


def _radial_applies(kernel, blocks) -> bool:
    """Whether :func:`_radial_vjp` covers this Gram matrix: a stationary
    radial kernel of infinite smoothness whose only hyperparameters are the
    variance and the lengthscale (RBF), values and full gradients, no batch
    axes."""
    from .kernels.base import RadialKernel, StationaryMap

    if not isinstance(kernel, RadialKernel):
        return False
    if not isinstance(kernel.input_map, StationaryMap) or kernel.order != math.inf:
        return False
    params = kernel.parameters()
    if set(params) != {"variance", "lengthscale"}:
        return False
    if batch_shape(kernel, blocks) or np.ndim(_plain(params["variance"])) != 0:
        return False
    if np.ndim(_plain(params["lengthscale"])) > 1:
        return False
    return all(b.f.kind in ("value", "gradient") for b in blocks)


def _plain(v):
    return v.detach() if hasattr(v, "detach") else np.asarray(v)


def _radial_vjp(kernel, blocks, G):
    """``Σ_ij G_ij ∂K_ij/∂θ`` for the variance and the lengthscale of a radial
    kernel ``k = σ² φ(s)``, ``s = ½|u|²``, ``u = (x − x')/ℓ``, on values and
    gradients, in closed form from the profile's derivatives (no autograd).

    With ``ũ = u/ℓ`` and ``φ_j = σ² φ⁽ʲ⁾(s)``, the blocks are ``φ_0`` (value,
    value), ``−φ_1 ũ_b`` (value, ∂_b), ``φ_1 ũ_a`` (∂_a, value) and
    ``−φ_2 ũ_a ũ_b − φ_1 δ_ab/ℓ_a²`` (∂_a, ∂_b); since ``∂s/∂log ℓ_k =
    −u_k²`` and ``∂ũ_a/∂log ℓ_k = −2 ũ_a δ_ak``,

    .. math::

        \frac{∂K_{vv}}{∂\\log ℓ_k} = -φ_1 u_k^2,\\qquad
        \frac{∂K_{v,b}}{∂\\log ℓ_k} = φ_2 u_k^2 ũ_b + 2 φ_1 ũ_k δ_{bk},

        \frac{∂K_{ab}}{∂\\log ℓ_k} = φ_3 u_k^2 ũ_a ũ_b
            + 2 φ_2 ũ_a ũ_b (δ_{ak} + δ_{bk})
            + φ_2 u_k^2 δ_{ab}/ℓ_a^2 + 2 φ_1 δ_{ab} δ_{ak}/ℓ_a^2,

    and ``∂K/∂σ² = K/σ²``. Each block pair is contracted with its part of
    ``G`` point pair by point pair (O(d²) per pair, as the assembly), chunk
    by chunk.

    Returns
    -------
    dict
        ``{"variance": (), "lengthscale": (d,) or ()}`` tensors, shaped like
        the kernel's hyperparameters.
    """
    import torch

    params = kernel.parameters()
    like = blocks[0].X
    opts = {"dtype": like.dtype, "device": like.device}
    ls_param = torch.as_tensor(_plain(params["lengthscale"]), **opts)
    var = torch.as_tensor(_plain(params["variance"]), **opts)
    d = blocks[0].d
    ls = ls_param.reshape(-1).expand(d)
    il2 = 1.0 / (ls * ls)
    g_log = torch.zeros(d, **opts)
    S = torch.zeros((), **opts)
    off = np.cumsum([0] + [b.size for b in blocks])
    for ia, ba in enumerate(blocks):
        for ib in range(ia, len(blocks)):
            bb = blocks[ib]
            Gab = G[off[ia] : off[ia + 1], off[ib] : off[ib + 1]]
            Gab = Gab.view(ba.n, ba.k, bb.n, bb.k)
            step = max(1, CHUNK_ELEMENTS // max(1, ba.k * bb.n * bb.k))
            ga, gb = ba.f.kind == "gradient", bb.f.kind == "gradient"
            for i0 in range(0, ba.n, step):
                i1 = min(ba.n, i0 + step)
                w = Gab[i0:i1]  # (c, kA, m, kB)
                u = (ba.X[i0:i1, None, :] - bb.X[None, :, :]) / ls  # (c, m, d)
                u2 = u * u
                s = 0.5 * u2.sum(-1)
                phi = [
                    torch.zeros_like(s) if p is None else var * p
                    for p in kernel.profile(torch, s, 3)
                ]
                ut = u / ls
                if not ga and not gb:
                    wv = w[:, 0, :, 0]
                    S = S + (phi[0] * wv).sum()
                    w2 = -phi[1] * wv
                elif not ga:  # value, gradient
                    wb = w[:, 0, :, :]
                    a = (wb * ut).sum(-1)
                    S = S - (phi[1] * a).sum()
                    w2 = phi[2] * a
                    g_log += 2 * torch.einsum("cm,cmk->k", phi[1], wb * ut)
                elif not gb:  # gradient, value
                    wa = w[:, :, :, 0].transpose(1, 2)
                    c = (wa * ut).sum(-1)
                    S = S + (phi[1] * c).sum()
                    w2 = -phi[2] * c
                    g_log -= 2 * torch.einsum("cm,cmk->k", phi[1], wa * ut)
                else:
                    wu = torch.einsum("camb,cmb->cma", w, ut)
                    wtu = torch.einsum("camb,cma->cmb", w, ut)
                    diag = torch.diagonal(w, dim1=1, dim2=3)  # (c, m, d)
                    q = (wu * ut).sum(-1)
                    dg = (diag * il2).sum(-1)
                    S = S - (phi[2] * q + phi[1] * dg).sum()
                    w2 = phi[3] * q + phi[2] * dg
                    g_log += 2 * torch.einsum("cm,cmk->k", phi[2], ut * (wu + wtu))
                    g_log += 2 * torch.einsum("cm,cmk->k", phi[1], diag) * il2
                g_log += torch.einsum("cm,cmk->k", w2, u2)
    g_ls = g_log / ls
    if ls_param.numel() == 1:
        g_ls = g_ls.sum()
    return {"variance": S / var, "lengthscale": g_ls.reshape(ls_param.shape)}


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
