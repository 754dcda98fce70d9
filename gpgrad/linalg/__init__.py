"""Backend helpers (numpy | torch, the only branches) and solvers."""

from . import backend, dense

__all__ = ["backend", "dense"]
