"""Warnings and errors that gpgrad raises on numerical trouble."""

__all__ = [
    "JitterWarning",
    "NotPositiveDefiniteError",
    "GPGradWarning",
    "OutOfMemoryError",
    "is_out_of_memory",
    "raise_if_out_of_memory",
]


class GPGradWarning(UserWarning):
    """Base class of gpgrad's warnings."""


class JitterWarning(GPGradWarning):
    """Jitter had to be added to a covariance matrix to factor it."""


class NotPositiveDefiniteError(ValueError):
    """A covariance matrix could not be factored even with the largest jitter.

    Its message names what to change: more observation noise, fewer duplicated
    points, a longer lengthscale, or float64 instead of float32.
    """


class OutOfMemoryError(MemoryError):
    """An allocation failed while computing (torch's out-of-memory errors and
    numpy's ``MemoryError`` alike): a memory problem, not a numerical one."""


#: lower-case fragments of allocation-failure messages: torch's CPU allocator
#: ("can't allocate memory"), CUDA and MPS ("out of memory"), the C library
_OUT_OF_MEMORY = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "failed to allocate memory",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports a failed allocation.

    ``MemoryError`` (numpy's included), torch's ``OutOfMemoryError`` and the
    ``RuntimeError`` torch's CPU allocator raises ("DefaultCPUAllocator: can't
    allocate memory: you tried to allocate ... bytes").
    """
    if isinstance(exc, MemoryError):
        return True
    if any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(s in msg for s in _OUT_OF_MEMORY)
    return False


def raise_if_out_of_memory(exc: BaseException) -> None:
    """Re-raise an allocation failure as :class:`OutOfMemoryError`; for a
    ``try``/``except`` that treats other errors as a failed evaluation."""
    if is_out_of_memory(exc) and not isinstance(exc, MemoryError):
        first = (str(exc).strip().splitlines() or [""])[0]
        raise OutOfMemoryError(f"out of memory: {first}") from exc
