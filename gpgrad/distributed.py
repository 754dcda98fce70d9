"""Running the matrix-free solver on several processes or devices.

The value+gradient Gram product ``(K + Σ)V`` splits by rows: every block row
needs all the inputs (N × D, small) and the current vector, and yields its own
slice. With a partition in force, the conjugate-gradient solver
(``GP(method="cg")``, or ``"auto"`` above the dense size) computes its own slice
of every product on each rank (or device) and all-gathers the slices; the
preconditioner, the CG recurrences, the log-determinant probes and the
posterior means run unchanged on top, identically on every rank.

Several processes (one node or many), launched with ``torchrun``::

    # torchrun --nproc-per-node 4 fit_big.py
    import gpgrad, gpgrad.distributed
    part = gpgrad.distributed.init()   # reads RANK, WORLD_SIZE, MASTER_ADDR, ...
    post = gpgrad.GP(kernel, method="cg", backend="torch").condition(...)
    post.gradient(Xs).mean             # the same answer on every rank

Several devices in one process::

    gpgrad.distributed.init(devices=["cuda:0", "cuda:1"])

On one process without devices, :func:`init` does nothing and returns None.
A batch of independent problems (leading batch axis of ``X``, one member per
problem) with at least as many members as processes is spread instead: each
rank solves whole batch members with any solver (no communication while it
solves), and the answers are all-gathered so that every rank holds the full
batch (``init(split=...)`` chooses).

A rank that dies or stops answering ends the others' collectives with a
:class:`DistributedError` within ``timeout`` seconds (no hang).
"""

from __future__ import annotations

import contextlib
import datetime
import os

from .exceptions import GPGradWarning

__all__ = [
    "Partition",
    "DistributedError",
    "init",
    "current",
    "shutdown",
]


class DistributedError(RuntimeError):
    """A collective failed: another rank died, timed out or disagreed."""


class DistributedWarning(GPGradWarning):
    """Something about the partition that the user should know."""


class Partition:
    """Where the rows of a Gram product are computed.

    Attributes
    ----------
    rank, world_size : int
        This process and the number of processes (1 without a process group).
    devices : list of str or None
        Devices that share this process's rows (several GPUs in one process).
    timeout : float
        Seconds a collective may wait before it fails.
    group : the torch.distributed process group, or None
    split : {"auto", "rows", "batch"}
        How a batch of independent problems is shared by the processes (see
        :func:`init`).
    """

    def __init__(
        self,
        rank=0,
        world_size=1,
        devices=None,
        timeout=60.0,
        group=None,
        split="auto",
    ):
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.devices = list(devices) if devices else None
        self.timeout = float(timeout)
        self.group = group
        self.split = _check_split(split)

    @property
    def workers(self) -> int:
        """Row slices in all: processes × devices per process."""
        return self.world_size * (len(self.devices) if self.devices else 1)

    def __repr__(self):
        dev = f", devices={self.devices}" if self.devices else ""
        split = "" if self.split == "auto" else f", split={self.split!r}"
        return f"Partition(rank={self.rank}, world_size={self.world_size}{dev}{split})"


_SPLITS = ("auto", "rows", "batch")


def _check_split(split):
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return split


_CURRENT: Partition | None = None


def current() -> Partition | None:
    """The partition in force in this process, or None."""
    return _CURRENT


def init(
    *,
    devices=None,
    backend: str | None = None,
    timeout: float = 60.0,
    split: str = "auto",
) -> Partition | None:
    """Set up the partition from the environment (``torchrun``'s variables).

    Parameters
    ----------
    devices : list of str, optional
        Devices of this process that share its rows (e.g. ``["cuda:0",
        "cuda:1"]``); results come back to the GP's device.
    backend : {"gloo", "nccl"}, optional
        The ``torch.distributed`` backend; default NCCL when CUDA is available,
        else gloo. Products are gathered through it.
    timeout : float, default 60
        Seconds any collective may wait; past it every rank raises
        :class:`DistributedError`.
    split : {"auto", "rows", "batch"}, default "auto"
        How a batch of independent problems (the leading batch axis of the
        inputs, ``b`` members) is shared by the ``P`` processes. ``"rows"``:
        every process computes a row slice of every member's Gram products
        (CG only; one all-gather per product). ``"batch"``: every process
        owns whole members (contiguous, as even as possible; any solver) and
        solves them alone; solves, means, variances and log marginal
        likelihoods are all-gathered at the end, so every process holds the
        full batch's answers; needs ``b ≥ P``. ``"auto"``: ``"batch"`` when
        ``b ≥ P``, else ``"rows"``. Devices of one process always share rows.

    Returns
    -------
    Partition or None
        None on one process without ``devices`` (nothing to partition).
    """
    global _CURRENT
    if isinstance(devices, str) or (
        devices is not None and not all(isinstance(d, str) for d in devices)
    ):
        raise TypeError(
            f"devices must be a list of device names such as ['cuda:0', 'cuda:1'], "
            f"got {devices!r}"
        )
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(
            f"timeout must be a positive number of seconds, got {timeout!r}"
        )
    _check_split(split)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1 and not devices:
        _CURRENT = None
        return None
    group = None
    if world > 1:
        import torch
        import torch.distributed as dist

        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(
                    f"WORLD_SIZE is {world} but {var} is not set; launch with "
                    "torchrun, or set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE"
                )
        if not dist.is_initialized():
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout),
            )
        group = dist.group.WORLD
    _CURRENT = Partition(rank, world, devices, timeout, group, split)
    return _CURRENT


def shutdown():
    """Leave the partition (and destroy the process group this module made)."""
    global _CURRENT
    part, _CURRENT = _CURRENT, None
    if part is not None and part.group is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _use(partition):
    """Put ``partition`` in force (for tests and for in-process use)."""
    global _CURRENT
    _CURRENT = partition


@contextlib.contextmanager
def _using(partition):
    """``partition`` in force inside the block (a rank's own batch members
    are solved with its devices only, never across processes)."""
    global _CURRENT
    saved, _CURRENT = _CURRENT, partition
    try:
        yield
    finally:
        _CURRENT = saved
