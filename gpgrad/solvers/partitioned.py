"""The matrix-free Gram product computed by row slices across ranks or devices.

Every worker (a process of a ``torch.distributed`` group, or a device of a
process) owns a contiguous range of points of every observation block, so it
owns whole points' entries (a value and its gradient stay together). For a
product ``(K + Σ)V`` it computes ``K[rows, :] V`` — its rows against all the
observations, with its own cached N_rows × N profile matrices — adds its rows'
noise, and the slices are all-gathered and put back in entry order. Query
products (posterior means) are split the same way over the query points.

Communication per product: each worker receives ``N·k`` numbers (the whole
result), whatever the number of workers; computation per worker falls as
``1/workers``.

A batch of independent problems can instead be spread by whole members
(:class:`BatchSpreadSolver`): each process builds the solver ``"auto"`` or the
GP's method picks for its own members and solves them alone; only the answers
(weights, means, variances, log-determinants) are all-gathered, once per call.
"""

from __future__ import annotations

import copy
import zlib

import numpy as np

from .. import backend as B
from ..covariance import _kernel_batch_shape, batch_shape
from ..distributed import DistributedError, Partition, _using
from .base import Solver
from .matfree import RHS_CHUNK_ELEMENTS, GramOperator, _groups

__all__ = [
    "PartitionedOperator",
    "BatchSpreadSolver",
    "partition_rows",
    "partition_batch",
    "per_worker_memory",
    "spreads_batch",
]


def partition_rows(sizes_n, workers):
    """Point ranges of every block for each worker.

    Parameters
    ----------
    sizes_n : list of int
        Points per block.
    workers : int

    Returns
    -------
    list (per worker) of list (per block) of (p0, p1)
        Near-equal contiguous ranges; a worker may own none of a small block.
    """
    out = [[] for _ in range(workers)]
    for n in sizes_n:
        edges = np.linspace(0, n, workers + 1).round().astype(int)
        for w in range(workers):
            out[w].append((int(edges[w]), int(edges[w + 1])))
    return out


def per_worker_memory(n_points, n_all, itemsize, batch=1):
    """Bytes of one worker's cached profiles plus a pass's temporaries.

    Parameters
    ----------
    n_points : int
        Distinct points of the worker's rows (a point observed as a value and
        a gradient counts once).
    n_all : int
        Distinct points of all observations.
    itemsize : int
    batch : int

    Returns
    -------
    int
        ``batch · (3 n_points n_all + RHS_CHUNK_ELEMENTS) · itemsize``: the
        three profile matrices Φ₀, Φ₁, Φ₂ of its points against all points.
    """
    return int(batch * (3 * n_points * n_all + RHS_CHUNK_ELEMENTS) * itemsize)


class _Rows:
    """One worker's rows: sub-blocks of the observations and their product."""

    def __init__(self, op: GramOperator, ranges, entry_index):
        self.op = op
        self.blocks = []
        self.index = entry_index  # global entry indices of these rows, in order
        for b, (p0, p1) in zip(op.blocks, ranges):
            if p1 > p0:
                self.blocks.append(b.sub(p0, p1))
        self.groups = _groups(op.xp, self.blocks) if self.blocks else []
        for g in self.groups:
            g.Z = op._scaled(g.X)
        self.udirs = [op._dirs(b) for b in self.blocks]
        self.n_rows = len(entry_index)

    def matmul(self, V, with_noise):
        """``(K + Σ)[rows, :] V`` for V (…, N, k) → (…, n_rows, k)."""
        op = self.op
        xp = op.xp
        if not self.blocks:
            return xp.zeros(
                tuple(V.shape[:-2]) + (0, V.shape[-1]),
                dtype=V.dtype,
                device=B.device_of(V),
            )
        Vt = B.matrix_transpose(V)
        k = Vt.shape[-2]
        step = max(1, RHS_CHUNK_ELEMENTS // max(1, 3 * self.n_rows * op.N))
        outs = []
        for c0 in range(0, k, step):
            pieces = op._split(Vt[..., c0 : c0 + step, :], op.sizes)
            coef = op._coefficients(op.groups, op.blocks, op._udirs, pieces)
            # ``same=True`` keeps this worker's profiles cached (its groups are
            # never the full ones, so no diagonal is assumed)
            res = op._apply(self.groups, op.groups, coef, True)
            parts = op._outputs(self.groups, self.blocks, self.udirs, res)
            outs.append(xp.concat(parts, axis=-1))
        out = B.matrix_transpose(outs[0] if len(outs) == 1 else xp.concat(outs, -2))
        if with_noise and op.noise is not None:
            idx = B.as_index(self.index, V)
            out = out + xp.take(op.noise, idx, axis=-1)[..., None] * xp.take(
                V, idx, axis=-2
            )
        return out


class PartitionedOperator:
    """A :class:`GramOperator` whose products are computed by row slices.

    Attributes other than the products are the wrapped operator's, so the
    iterative solver and its preconditioners use it unchanged.

    Parameters
    ----------
    op : GramOperator
    partition : gpgrad.distributed.Partition
    """

    def __init__(self, op: GramOperator, partition: Partition):
        self.op = op
        self.part = partition
        W = partition.workers
        devices = partition.devices or [None]
        ranges = partition_rows([b.n for b in op.blocks], W)
        offsets = np.cumsum([0] + [b.size for b in op.blocks])
        self.index = []  # per worker: global entry indices, in its order
        for w in range(W):
            idx = [
                np.arange(offsets[i] + p0 * b.k, offsets[i] + p1 * b.k)
                for i, (b, (p0, p1)) in enumerate(zip(op.blocks, ranges[w]))
            ]
            self.index.append(np.concatenate(idx).astype(np.int64))
        self.order = np.argsort(np.concatenate(self.index), kind="stable")
        self.max_rows = max(len(i) for i in self.index)
        # this process's workers: one per device (or one on the GP's device)
        first = partition.rank * len(devices)
        self.local = []
        for j, dev in enumerate(devices):
            w = first + j
            local_op = op if dev is None else _on_device(op, dev)
            self.local.append(_Rows(local_op, ranges[w], self.index[w]))
        self._check_memory()

    def __getattr__(self, name):
        return getattr(self.op, name)

    def _check_memory(self):
        from .select import InsufficientMemoryError, _fmt, _itemsize, available_memory

        like = self.op.like
        itemsize = _itemsize(like)
        batch = int(np.prod(batch_shape(self.op.kernel, self.op.blocks)))
        n_all = sum(int(g.X.shape[-2]) for g in self.op.groups)
        # each device holds its workers' profiles (the host all of a CPU
        # process's workers): compare every device's share with its memory
        per_device = {}
        for rows in self.local:
            n_pts = sum(int(g.X.shape[-2]) for g in rows.groups)
            need = per_worker_memory(n_pts, n_all, itemsize, batch)
            dev = str(B.device_of(rows.op.like)) if B.is_tensor(like) else "cpu"
            total, _, most = per_device.get(dev, (0, rows.op.like, 0))
            per_device[dev] = (total + need, rows.op.like, max(most, need))
        for dev, (need, dev_like, most) in per_device.items():
            avail = available_memory(dev_like)
            if need > avail:
                raise InsufficientMemoryError(
                    f"each of the {self.part.workers} workers' row slice of the "
                    f"{self.op.N}-row Gram operator needs up to {_fmt(most)} "
                    f"({_fmt(need)} on {dev} for this process) but only "
                    f"{_fmt(avail)} is available there; use more processes or "
                    "devices"
                )

    # -- products ------------------------------------------------------------
    def matmul(self, V, *, with_noise=True):
        """``(K + diag(noise)) V`` for V (…, N, k), gathered from all workers."""
        slices = []
        for rows in self.local:
            Vd = V if rows.op is self.op else V.to(rows.op.like.device)
            out = rows.matmul(Vd, with_noise)
            slices.append(out if rows.op is self.op else out.to(V.device))
        return self._assemble(slices, V, self.index, self.order, self.max_rows)

    def cross_matmul(self, qblocks, V):
        """``K_{QX} V`` (…, M, k), the query points split across workers."""
        W = self.part.workers
        ranges = partition_rows([b.n for b in qblocks], W)
        offsets = np.cumsum([0] + [b.size for b in qblocks])
        index = [
            np.concatenate(
                [
                    np.arange(offsets[i] + p0 * b.k, offsets[i] + p1 * b.k)
                    for i, (b, (p0, p1)) in enumerate(zip(qblocks, ranges[w]))
                ]
            ).astype(np.int64)
            for w in range(W)
        ]
        order = np.argsort(np.concatenate(index), kind="stable")
        first = self.part.rank * len(self.local)
        slices = []
        for j, rows in enumerate(self.local):
            mine = [
                b.sub(p0, p1)
                for b, (p0, p1) in zip(qblocks, ranges[first + j])
                if p1 > p0
            ]
            if not mine:
                slices.append(None)
                continue
            if rows.op is not self.op:
                dev = rows.op.like.device
                out = rows.op.cross_matmul([b.to(dev) for b in mine], V.to(dev))
                slices.append(out.to(V.device))
            else:
                slices.append(rows.op.cross_matmul(mine, V))
        xp = self.op.xp
        k = V.shape[-1]
        batch = tuple(V.shape[:-2])
        slices = [
            s
            if s is not None
            else xp.zeros(batch + (0, k), dtype=V.dtype, device=B.device_of(V))
            for s in slices
        ]
        return self._assemble(slices, V, index, order, max(len(i) for i in index))

    def _assemble(self, slices, like, index, order, max_rows):
        """All workers' slices, gathered and put in entry order."""
        xp = self.op.xp
        if self.part.world_size > 1:
            local = xp.concat(slices, axis=-2) if len(slices) > 1 else slices[0]
            per_proc = len(self.local)
            first = self.part.rank * per_proc
            rows = [len(index[first + j]) for j in range(per_proc)]
            gathered = _all_gather(self.part, local, sum(rows), max_rows * per_proc)
            # each process contributes its workers' slices in worker order
            slices = []
            for p, g in enumerate(gathered):
                n = sum(len(index[p * per_proc + j]) for j in range(per_proc))
                slices.append(g[..., :n, :])
        full = xp.concat(slices, axis=-2) if len(slices) > 1 else slices[0]
        return xp.take(full, B.as_index(order, full), axis=-2)


def _on_device(op: GramOperator, device):
    """The same operator with its points (and noise) on ``device``."""
    blocks = [b.to(device) for b in op.blocks]
    noise = None if op.noise is None else op.noise.to(device)
    return GramOperator(op.kernel, blocks, noise)


def _all_gather(part: Partition, local, n_local, pad_to):
    """Every process's (…, n_p, k) slice (padded to ``pad_to`` rows for the
    collective), in rank order; raises DistributedError on a failed rank."""
    t = _pad(_to_torch(local), -2, pad_to)
    parts = _gather_rows(part, t, "the Gram product's row slices")
    if not B.is_tensor(local):
        return [p.numpy() for p in parts]
    return parts


def _gather_rows(part: Partition, t, what):
    """Every process's tensor ``t`` (the same shape on all), in rank order.

    Raises
    ------
    ValueError
        ``t`` needs a gradient: each process holds the graph of its own rows
        or batch members only, so a parameter's gradient would need an
        all-reduce over processes that autograd cannot place.
    DistributedError
        The collective failed or timed out (another process died).
    """
    import torch
    import torch.distributed as dist

    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "gradients through results partitioned across processes are not "
            "supported: fit hyperparameters on one process (or on several "
            "devices of one process, gpgrad.distributed.init(devices=[...])) and "
            "condition the partitioned GP on the fitted values"
        )
    t = t.contiguous()
    try:
        parts = [torch.empty_like(t) for _ in range(part.world_size)]
        dist.all_gather(parts, t, group=part.group)
    except Exception as exc:  # gloo/NCCL raise RuntimeError or DistBackendError
        raise DistributedError(
            f"rank {part.rank} of {part.world_size}: gathering {what} failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); another rank "
            f"has died or did not answer within {part.timeout:g} s"
        ) from exc
    return parts


# -- whole batch members per process ------------------------------------------
def partition_batch(members, world_size):
    """The batch members ``[lo, hi)`` of every process.

    Parameters
    ----------
    members : int
        Length of the leading batch axis.
    world_size : int

    Returns
    -------
    list of (lo, hi)
        Contiguous, near-equal ranges in rank order.
    """
    edges = np.linspace(0, members, world_size + 1).round().astype(int)
    return [(int(edges[r]), int(edges[r + 1])) for r in range(world_size)]


def spreads_batch(part: Partition | None, kernel, blocks) -> bool:
    """Whether ``part`` spreads this problem's batch members over processes.

    ``split="batch"`` always (a ValueError when there are fewer members than
    processes), ``"rows"`` never, ``"auto"`` when the leading batch axis has at
    least as many members as there are processes.
    """
    if part is None or part.world_size <= 1 or part.split == "rows":
        return False
    shape = batch_shape(kernel, blocks)
    members = shape[0] if shape else 1
    if members >= part.world_size:
        return True
    if part.split == "batch":
        raise ValueError(
            f"split='batch' needs at least one batch member per process: the "
            f"leading batch axis has {members} member(s) for {part.world_size} "
            "processes; use split='rows' or 'auto' (rows of every member's "
            "products are then shared), or fewer processes"
        )
    return False


class BatchSpreadSolver(Solver):
    """Independent problems of a batch solved by whole members per process.

    Process ``r`` owns the members ``[lo_r, hi_r)`` of the leading batch axis
    (:func:`partition_batch`). It builds the solver the GP's ``method`` picks
    for those members alone (dense, CG, state-space, Woodbury; its memory
    guard sees only its members) and solves them with no communication; each
    public method then all-gathers its answer along the batch axis, so every
    process returns the full batch. Arrays whose leading batch axis is
    broadcast (size 1 or absent), such as queries shared by all members, go
    to every process whole.

    Parameters
    ----------
    gp : GP
    blocks : list of Block
    noise : array (b, ..., N)
    part : gpgrad.distributed.Partition
    make : callable
        ``make(gp, blocks, noise)`` builds a solver (``make_solver``).

    Attributes
    ----------
    inner : Solver
        This process's solver of its own members.
    members : tuple of int
        ``(lo, hi)`` of this process.
    """

    def __init__(self, gp, blocks, noise, part: Partition, make):
        super().__init__(gp.kernel, blocks, noise)
        shape = batch_shape(gp.kernel, blocks)
        self.part = part
        self.n_batch = len(shape)
        self.b0 = shape[0]
        self.ranges = partition_batch(self.b0, part.world_size)
        self.members = self.ranges[part.rank]
        self.counts = [hi - lo for lo, hi in self.ranges]
        local_gp = copy.copy(gp)
        local_gp.kernel = self._kernel(gp.kernel)
        local_blocks = [self._block(b) for b in blocks]
        X = blocks[0].X
        self._dev = X.device if B.is_tensor(X) else None
        local_noise = self._take(noise, 1)
        self.inner = self._make(make, local_gp, local_blocks, local_noise)
        # one collective at construction: every process must have picked the
        # same method (else their later collectives would not pair up), and
        # CG's automatic preconditioner is the whole batch's: Jacobi when
        # any member's points are weakly correlated (so when any process
        # picked it)
        got = self._gather_info()
        if len({g[0] for g in got}) > 1:
            raise DistributedError(
                f"rank {part.rank}: the processes picked different solvers for "
                f"their batch members (this one {self.method!r}); pass "
                "GP(method=...) explicitly"
            )
        jacobi = _code("jacobi")
        if any(g[1] == jacobi for g in got) and self._auto_unpreconditioned():
            opts = copy.copy(self.inner.opts)
            opts.preconditioner = "jacobi"
            local_gp.method = opts
            self.inner = self._make(make, local_gp, local_blocks, local_noise)
        self.jitter = max(g[2] for g in got)

    def _make(self, make, gp, blocks, noise):
        # this process's devices still share the rows of its members
        part = self.part
        local = Partition(devices=part.devices, timeout=part.timeout)
        with _using(local if part.devices else None):
            inner = make(gp, blocks, noise)
        if hasattr(inner, "batch_members"):
            inner.batch_members = self.members + (self.b0,)
        self.method = inner.method
        return inner

    def _auto_unpreconditioned(self):
        opts = getattr(self.inner, "opts", None)
        return (
            opts is not None
            and opts.preconditioner == "auto"
            and self.inner.preconditioner is None
        )

    def _gather_info(self):
        """(method, preconditioner, jitter) of every process."""
        pre = str(getattr(self.inner, "preconditioner", ""))
        row = [_code(self.method), _code(pre), float(self.inner.jitter)]
        got = _gather_rows(self.part, _to_torch(row, self._dev)[None, :], "solvers")
        return [tuple(float(v) for v in g[0]) for g in got]

    # -- slicing to this process's members --------------------------------
    def _owns(self, a, trailing):
        """Whether ``a``'s leading batch axis is the spread one."""
        nb = a.ndim - trailing
        return nb == self.n_batch and a.shape[0] == self.b0

    def _take(self, a, trailing):
        if a is None or not self._owns(a, trailing):
            return a
        lo, hi = self.members
        return a[lo:hi]

    def _block(self, b):
        if not self._owns(b.X, 2):
            return b
        new = copy.copy(b)
        new.X = self._take(b.X, 2)
        return new

    def _kernel(self, kernel):
        if not _kernel_batch_shape(kernel):
            return kernel
        new = {}
        for name, v in kernel.parameters().items():
            if isinstance(v, (int, float)):
                continue
            trailing = 1 if name.rsplit(".", 1)[-1] == "lengthscale" else 0
            if self._owns(v, trailing):
                new[name] = self._take(v, trailing)
        return kernel.replace(**new)

    def _qblocks(self, qblocks):
        return [self._block(b) for b in qblocks]

    # -- gathering the members' answers -----------------------------------
    def _gather(self, local, what):
        """The full batch (b, ...) from every process's members (c_r, ...)."""
        if local is None:
            return None
        import torch

        t = _pad(_to_torch(local), 0, max(self.counts))
        got = _gather_rows(self.part, t, what)
        res = torch.cat([g[:c] for g, c in zip(got, self.counts)], dim=0)
        return res if B.is_tensor(local) else res.numpy()

    def _gather_factor(self, F, what):
        """Factors (c_r, ..., r_p, M) with ranks r_p differing by process:
        zero rows pad them to the largest (they add nothing to ``PᵀQ``)."""
        import torch

        r = _gather_rows(
            self.part,
            _to_torch([float(F.shape[-2])], self._dev)[None, :],
            f"{what} sizes",
        )
        width = int(max(float(g[0, 0]) for g in r))
        t = _pad(_to_torch(F), F.ndim - 2, width)
        got = _gather_rows(self.part, _pad(t, 0, max(self.counts)), what)
        res = torch.cat([g[:c] for g, c in zip(got, self.counts)], dim=0)
        return res if B.is_tensor(F) else res.numpy()

    # -- the solver protocol ------------------------------------------------
    def solve(self, R):
        return self._gather(self.inner.solve(self._take(R, 2)), "the solves")

    def logdet(self):
        return self._gather(self.inner.logdet(), "the log-determinants")

    def log_marginal_likelihood(self, residual):
        own = self.inner.log_marginal_likelihood(self._take(residual, 1))
        return self._gather(own, "the log marginal likelihoods")

    def condition_estimate(self):
        c = self.inner.condition_estimate()
        got = _gather_rows(
            self.part,
            _to_torch([np.nan if c is None else float(c)], self._dev)[None, :],
            "the condition estimates",
        )
        vals = [float(g[0, 0]) for g in got]
        return None if any(np.isnan(vals)) else max(vals)

    def quad_factors(self, Ks):
        P, Q = self.inner.quad_factors(self._take(Ks, 2))
        return (
            self._gather_factor(P, "the variance factors"),
            self._gather_factor(Q, "the variance factors"),
        )

    def cross(self, qblocks, alpha, joint=False):
        mean, P, Q = self.inner.cross(
            self._qblocks(qblocks), self._take(alpha, 1), joint
        )
        return (
            self._gather(mean, "the posterior means"),
            self._gather_factor(P, "the variance factors"),
            self._gather_factor(Q, "the variance factors"),
        )

    def cross_mean(self, qblocks, alpha):
        return self.mean(qblocks, alpha)

    def mean(self, qblocks, alpha):
        local = self.inner.mean(self._qblocks(qblocks), self._take(alpha, 1))
        return self._gather(local, "the posterior means")

    def moments(self, qblocks, alpha, mode):
        mean, var, cov = self.inner.moments(
            self._qblocks(qblocks), self._take(alpha, 1), mode
        )
        return (
            self._gather(mean, "the posterior means"),
            self._gather(var, "the posterior variances"),
            self._gather(cov, "the posterior covariances"),
        )


def _code(name):
    """A name as a float that survives a float64 all-gather exactly."""
    return float(zlib.crc32(str(name).encode()))


def _to_torch(a, device=None):
    """A tensor of ``a`` (an array, a tensor, or a list of floats put on
    ``device``: NCCL gathers only tensors on the GPU)."""
    import torch

    if B.is_tensor(a):
        return a
    if isinstance(a, np.ndarray):
        # contiguous and writable (a broadcast view is not), in its dtype
        return torch.from_numpy(np.require(a, requirements=["C", "W"]))
    t = torch.tensor(a, dtype=torch.float64)
    return t if device is None else t.to(device)


def _pad(t, axis, size):
    """``t`` with zeros appended along ``axis`` up to ``size``."""
    import torch

    axis = axis % t.ndim
    if t.shape[axis] >= size:
        return t
    shape = list(t.shape)
    shape[axis] = size - t.shape[axis]
    z = torch.zeros(shape, dtype=t.dtype, device=t.device)
    return torch.cat([t, z], dim=axis)
