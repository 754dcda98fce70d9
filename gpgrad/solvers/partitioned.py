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
"""

from __future__ import annotations

import numpy as np

from .. import backend as B
from ..distributed import DistributedError, Partition
from .matfree import RHS_CHUNK_ELEMENTS, GramOperator, _groups

__all__ = ["PartitionedOperator", "partition_rows", "per_worker_memory"]


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


def per_worker_memory(n_rows, n_cols, itemsize, batch=1):
    """Bytes of one worker's cached profiles (three n_rows × n_cols matrices)
    plus a pass's temporaries."""
    return int(batch * (3 * n_rows * n_cols + RHS_CHUNK_ELEMENTS) * itemsize)


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
        from .select import InsufficientMemoryError, _fmt, available_memory

        like = self.op.like
        itemsize = like.element_size() if B.is_tensor(like) else like.dtype.itemsize
        batch = int(np.prod(like.shape[:-2])) if like.ndim > 2 else 1
        need = per_worker_memory(self.max_rows, self.op.N, itemsize, batch)
        need *= len(self.local)
        avail = available_memory(like)
        if need > avail:
            raise InsufficientMemoryError(
                f"each of the {self.part.workers} workers' row slice of the "
                f"{self.op.N}-row Gram operator needs {_fmt(need // len(self.local))}"
                f" ({_fmt(need)} for this process) but only {_fmt(avail)} is "
                "available; use more processes or devices"
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
    import torch
    import torch.distributed as dist

    is_np = not B.is_tensor(local)
    t = torch.from_numpy(np.ascontiguousarray(local)) if is_np else local
    if t.shape[-2] < pad_to:
        pad = torch.zeros(
            tuple(t.shape[:-2]) + (pad_to - t.shape[-2], t.shape[-1]),
            dtype=t.dtype,
            device=t.device,
        )
        t = torch.cat([t, pad], dim=-2)
    t = t.contiguous()
    if t.requires_grad and torch.is_grad_enabled():
        # each rank holds the graph of its own rows only, so a parameter's
        # gradient would need an all-reduce over ranks that autograd cannot
        # place; refuse rather than return a partial gradient
        raise ValueError(
            "gradients through a Gram product partitioned across processes are "
            "not supported: fit hyperparameters on one process (or on several "
            "devices of one process, gpgrad.distributed.init(devices=[...])) and "
            "condition the partitioned GP on the fitted values"
        )
    try:
        parts = [torch.empty_like(t) for _ in range(part.world_size)]
        dist.all_gather(parts, t, group=part.group)
    except Exception as exc:  # gloo/NCCL raise RuntimeError or DistBackendError
        raise DistributedError(
            f"rank {part.rank} of {part.world_size}: gathering the Gram product's "
            f"row slices failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"another rank has died or did not answer within {part.timeout:g} s"
        ) from exc
    if is_np:
        return [p.numpy() for p in parts]
    return parts
