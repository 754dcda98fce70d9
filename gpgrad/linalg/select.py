"""Choosing how to solve the observations' linear system."""

from __future__ import annotations

from ..covariance import covariance
from . import backend as B
from .dense import DenseCholeskySolver, cholesky

__all__ = ["METHODS", "make_solver"]

#: solver names accepted by ``GP(method=...)``
METHODS = ("auto", "cholesky")


def make_solver(gp, blocks, noise):
    """A solver for ``K + diag(noise)`` of the observation blocks.

    ``gp.method`` names the solver; ``"auto"`` picks one from the problem's size.
    """
    n_obs = int(noise.shape[-1])
    K = covariance(gp.kernel, blocks)
    K = _add_diag(K, noise)
    L, jitter = cholesky(
        K,
        what=f"the covariance matrix of the {n_obs} observations",
        hint=" (identical points observed twice need noise > 0)",
    )
    return DenseCholeskySolver(L, jitter)


def _add_diag(K, noise):
    if B.is_tensor(K) and (K.requires_grad or noise.requires_grad):
        import torch

        return K + torch.diag_embed(noise)
    return B.add_to_diagonal_(K, noise)
