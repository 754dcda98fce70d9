"""Solvers: how a conditioned GP answers ``K⁻¹ v``, ``log det K`` and variances.

Dense Cholesky, Woodbury for few points in many dimensions, preconditioned
conjugate gradients over a matrix-free operator, and the automatic choice
between them (:mod:`gpgrad.solvers.select`).
"""
