"""Warnings and errors that gpgrad raises on numerical trouble."""

__all__ = ["JitterWarning", "NotPositiveDefiniteError", "GPGradWarning"]


class GPGradWarning(UserWarning):
    """Base class of gpgrad's warnings."""


class JitterWarning(GPGradWarning):
    """Jitter had to be added to a covariance matrix to factor it."""


class NotPositiveDefiniteError(ValueError):
    """A covariance matrix could not be factored even with the largest jitter.

    Its message names what to change: more observation noise, fewer duplicated
    points, a longer lengthscale, or float64 instead of float32.
    """
