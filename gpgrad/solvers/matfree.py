"""Matrix-free products with derivative Gram matrices: O(N²D), no N(D+1)-square array.

For observations of order at most one (values, gradients, partials, directional
derivatives) of a radial kernel ``k = σ² φ(s)`` the product of the Gram matrix
with a coefficient vector needs only the N×N matrices ``Φ_m = σ² φ⁽ᵐ⁾(S)``,
m = 0, 1, 2, and a few N×N×D matrix products. Work in scaled coordinates
``z = x/ℓ``: a derivative along ``u`` in x is a derivative along ``u/ℓ`` in z,
so every entry's coefficient ``c`` becomes a z-space vector ``w = c·u/ℓ`` at its
point, and every output entry is read off as ``(u/ℓ)·g`` from the z-space
gradient row ``g``.

Stationary map (``s = ½|z − z'|²``), coefficients ``v`` (values) and ``W``
(gradient rows) at points ``Z_B``, outputs at points ``Z_A``, with
``C_ab = (z_a − z_b)·w_b``:

.. math::

    y = Φ_0 v − \\operatorname{rowsum}(Z_A ⊙ Φ_1 W) + Φ_1 q,\\quad q_b = z_b·w_b

    G = Z_A ⊙ (Φ_1 v) − Φ_1 (v ⊙ Z_B) − [Z_A ⊙ (M 1) − M Z_B] − Φ_1 W,
    \\quad M = Φ_2 ⊙ C

Dot-product map (``s = z·z'``):

.. math::

    y = Φ_0 v + \\operatorname{rowsum}(Z_A ⊙ Φ_1 W),\\qquad
    G = Φ_1 (v ⊙ Z_B) + (Φ_2 ⊙ Z_A W^\\top) Z_B + Φ_1 W

(``X ⊙ a`` scales row i of X by ``a_i``.) Points observed both as values and as
gradients are merged, so the usual value+gradient problem costs one N×N set.
"""

from __future__ import annotations

import numpy as np

from .. import backend as B
from ..kernels.base import (
    DotProductMap,
    RadialKernel,
    StationaryMap,
    batch_scalar,
)

__all__ = ["GramOperator", "unsupported_reason", "posterior_mean"]

#: elements of the largest temporary when forming S from differences (~32 MB)
DIFF_CHUNK_ELEMENTS = 1 << 22
#: elements of the row blocks over which the profiles Φ₀, Φ₁, Φ₂ are evaluated
#: (~2 MB: the kernel's element-wise temporaries stay in cache)
PROFILE_CHUNK_ELEMENTS = 1 << 18
#: elements of a row block of the Φ₂ term's ``Φ₂ ⊙ C`` (64 MB: blocks of a
#: few hundred rows keep the two GEMMs at full speed, measured at N = 5,000,
#: D = 100 on 2 cores: 105-row blocks 0.38 s, 1,678-row 0.26 s, unblocked 0.26 s)
PHI2_BLOCK_ELEMENTS = 1 << 23
#: elements of the k·n_A·n_B coefficient-dependent temporaries per pass (~128 MB)
RHS_CHUNK_ELEMENTS = 1 << 24
#: values and gradients at the same points share one Φ₁ GEMM through a cached
#: ``Φ₀ + Φ₁ ⊙ ZZᵀ`` (6 instead of 8 N²D flops per column, one more N×N
#: matrix); False restores the separate products
MERGE_VALUE_GRADIENT = True


def unsupported_reason(kernel, blocks):
    """Why the matrix-free product cannot handle this problem, or None."""
    if not isinstance(kernel, RadialKernel):
        return (
            f"the matrix-free product supports single radial kernels (RBF, "
            f"Matern32/52, RationalQuadratic, Linear, Polynomial), got "
            f"{type(kernel).__name__}"
        )
    if not isinstance(kernel.input_map, (StationaryMap, DotProductMap)):
        return (
            f"{type(kernel).__name__} has an input map the matrix-free product "
            "does not know"
        )
    for b in blocks:
        if b.order > 1:
            return (
                f"{b.f.kind} functionals (second derivatives) are not supported by "
                "the matrix-free product; only values and first derivatives are"
            )
    return None


def _same_points(xp, X1, X2):
    if X1 is X2:
        return True
    if tuple(X1.shape) != tuple(X2.shape):
        return False
    return bool(xp.all(X1 == X2))


class _Group:
    """Points with their value entries and their first-derivative entries.

    ``parts`` lists ``(block_index, kind)`` with kind ``"value"``, ``"grad"``
    (full gradient, identity directions) or ``"dir"`` (one or more direction
    vectors per point, ``U`` (nU, k, d) already divided by ℓ).
    """

    def __init__(self, X):
        self.X = X
        self.Z = None
        self.parts = []

    @property
    def has_value(self):
        return any(p[1] == "value" for p in self.parts)

    @property
    def has_grad(self):
        return any(p[1] != "value" for p in self.parts)


def _groups(xp, blocks):
    groups = []
    for i, b in enumerate(blocks):
        kind = (
            "value" if b.order == 0 else ("grad" if b.f.kind == "gradient" else "dir")
        )
        for g in groups:
            if _same_points(xp, g.X, b.X) and all(p[1] != kind for p in g.parts):
                g.parts.append((i, kind))
                break
        else:
            g = _Group(b.X)
            g.parts.append((i, kind))
            groups.append(g)
    return groups


class GramOperator:
    """``K + diag(noise)`` of order-≤1 observations, as a linear operator.

    Parameters
    ----------
    kernel : RadialKernel
        Stationary (RBF, Matérn, rational quadratic) or dot-product kernel.
    blocks : list of :class:`gpgrad.covariance.Block`
        The observations (values, gradients, partials, directional).
    noise : array (..., N) or None
        Observation noise variances added to the diagonal.

    Notes
    -----
    Memory: three N×N profile matrices per pair of point groups, and
    k·N×N temporaries per product with k right-hand sides (chunked over k).
    Time: about ten N²D flops per right-hand side. Differentiable in torch.
    """

    def __init__(self, kernel, blocks, noise=None):
        reason = unsupported_reason(kernel, blocks)
        if reason is not None:
            raise ValueError(reason)
        self.kernel = kernel
        self.blocks = list(blocks)
        like = blocks[0].X
        self.xp = xp = B.namespace(like)
        self.like = like
        self.stationary = isinstance(kernel.input_map, StationaryMap)
        self.ls = kernel._ls(xp, like, 1)  # (*b, 1, d)
        self.var = batch_scalar(xp, kernel.variance, like, 2)  # (*b, 1, 1)
        self.groups = _groups(xp, self.blocks)
        if self.stationary:
            # stationary kernels are translation invariant: centering the
            # scaled points shrinks the cancellation in z_a·w_b − z_b·w_b
            allz = xp.concat([g.X / self.ls for g in self.groups], axis=-2)
            self.center = xp.mean(allz, axis=-2, keepdims=True)
        else:
            self.center = None
        for g in self.groups:
            g.Z = self._scaled(g.X)
        self.sizes = [b.size for b in self.blocks]
        self.N = sum(self.sizes)
        self.noise = noise
        self._phi = {}
        #: the Φ₂ term's reusable block buffer (see :func:`_phi2_term`)
        self._work = {}
        self._udirs = [self._dirs(b) for b in self.blocks]

    # -- geometry ----------------------------------------------------------
    def _scaled(self, X):
        Z = X / self.ls
        if self.center is not None:
            Z = Z - self.center
        return Z

    def _dirs(self, b):
        """Direction vectors of an order-1 block in z-space: (nU, k, d)."""
        if b.order == 0 or b.f.kind == "gradient":
            return None
        U = b.U[:, :, 0, :]
        # broadcast ℓ over the batch: (…, nU, k, d)
        return U / self.ls[..., None, :, :]

    def _profiles(self, ZA, ZB, same):
        """``[Φ₀, Φ₁, Φ₂]`` (…, nA, nB) with the variance applied."""
        xp = self.xp
        nA, nB, d = ZA.shape[-2], ZB.shape[-2], ZA.shape[-1]
        if self.stationary and not B.requires_grad(ZA, ZB, self.ls):
            # one GEMM instead of an nA·nB·d difference array
            S = _half_sq_dist(xp, ZA, ZB, same)
        elif self.stationary:
            step = max(1, DIFF_CHUNK_ELEMENTS // max(1, nB * d))
            rows = []
            for i0 in range(0, nA, step):
                diff = ZA[..., i0 : i0 + step, None, :] - ZB[..., None, :, :]
                rows.append(0.5 * xp.sum(diff * diff, axis=-1))
            S = rows[0] if len(rows) == 1 else xp.concat(rows, axis=-2)
            if same:
                # exact zeros on the diagonal keep singular profile
                # derivatives (Matérn 3/2's φ'') at their limit
                eye = xp.eye(nA, dtype=S.dtype, device=B.device_of(S))
                S = S * (1.0 - eye)
        else:
            S = ZA @ B.matrix_transpose(ZB)
        if S.ndim == 2 and self.var.ndim <= 2 and not B.requires_grad(S, self.var):
            return self._profiles_chunked(S)
        prof = self.kernel.profile(self.xp, S, 2)
        out = []
        for p in prof[:3]:
            out.append(None if p is None else self.var * p)
        while len(out) < 3:
            out.append(None)
        return out

    def _profiles_chunked(self, S):
        """:meth:`_profiles` for a 2-D ``S`` that autograd need not follow: the
        profiles of row blocks written into preallocated outputs, so that the
        kernel's element-wise temporaries stay block-sized (cache-resident)
        instead of N×N each."""
        xp = self.xp
        nA, nB = S.shape
        step = max(1, PROFILE_CHUNK_ELEMENTS // max(1, nB))
        out = None
        for i0 in range(0, nA, step):
            prof = self.kernel.profile(xp, S[i0 : i0 + step], 2)[:3]
            if out is None:
                out = [None if p is None else _empty(xp, (nA, nB), S) for p in prof]
            for o, p in zip(out, prof):
                if o is not None:
                    o[i0 : i0 + step] = self.var * p
        out = list(out)
        while len(out) < 3:
            out.append(None)
        return out

    def _group_profiles(self, ga, gb):
        # profiles made under torch.no_grad (inside CG) carry no graph: keep
        # them apart from the differentiable ones
        key = (id(ga), id(gb), B.grad_enabled(self.xp))
        if key not in self._phi:
            self._phi[key] = self._profiles(ga.Z, gb.Z, ga is gb)
        return self._phi[key]

    def _group_p0z(self, ga, gb, phi):
        """``Φ₀ + Φ₁ ⊙ Z_A Z_Bᵀ`` (nA, nB), cached: with it the value rows of a
        product need ``Φ₁`` only once, on ``v ⊙ Z_B + W`` (see :func:`_pair_fast`)."""
        # like the profiles, kept apart by whether autograd records
        key = ("p0z", id(ga), id(gb), B.grad_enabled(self.xp))
        if key not in self._phi:
            p0z = ga.Z @ B.matrix_transpose(gb.Z)
            if B.is_torch(self.xp):
                p0z.mul_(phi[1]).add_(phi[0])
            else:
                np.multiply(p0z, phi[1], out=p0z)
                p0z += phi[0]
            self._phi[key] = p0z
        return self._phi[key]

    def astype(self, dtype):
        """A copy of this operator whose products run in ``dtype`` (e.g.
        float32), with the profile matrices converted from this operator's
        (computed here first if needed); no autograd.

        For mixed-precision solves: its products carry ``dtype``'s round-off
        (a relative error of about 1e-6 in float32), which an outer refinement
        in this operator's precision removes.
        """
        import copy

        xp = self.xp

        def cast(a):
            return None if a is None else B.to_namespace(B.detach(a), xp, dtype=dtype)

        new = copy.copy(self)
        new.like = cast(self.like)
        new.ls = cast(self.ls)
        new.var = cast(self.var)
        new.center = cast(self.center)
        new.noise = cast(self.noise)
        new._udirs = [cast(u) for u in self._udirs]
        new._work = {}
        new._phi = {}
        twins = {}
        for g in self.groups:
            t = copy.copy(g)
            t.X, t.Z = cast(g.X), cast(g.Z)
            twins[id(g)] = t
        new.groups = [twins[id(g)] for g in self.groups]
        with B.no_grad(xp):
            for ga in self.groups:
                for gb in self.groups:
                    phi = self._group_profiles(ga, gb)
                    key = (id(twins[id(ga)]), id(twins[id(gb)]), False)
                    new._phi[key] = [cast(p) for p in phi]
        return new

    # -- scatter / gather between entries and per-group coefficients ---------
    def _split(self, V, sizes):
        """Split (…, k, N) into per-block pieces."""
        out, start = [], 0
        for s in sizes:
            out.append(V[..., start : start + s])
            start += s
        return out

    def _coefficients(self, groups, blocks, udirs, pieces, inputs=None):
        """Per group: v (…, k, n) or None and W (…, k, n, d) or None (z-space).

        ``inputs="values"`` or ``"derivatives"`` leaves out the other kind of
        coefficient (as if it were zero, without its work)."""
        xp = self.xp
        coef = []
        for g in groups:
            v = W = None
            for i, kind in g.parts:
                b, c = blocks[i], pieces[i]
                if kind == "value":
                    if inputs != "derivatives":
                        v = c
                    continue
                if inputs == "values":
                    continue
                k = b.k
                c = xp.reshape(c, tuple(c.shape[:-1]) + (b.n, k))
                if kind == "grad":
                    w = c / self.ls[..., None, :, :]
                else:
                    # Σ_t c_{p,t} ũ_{p,t}: (…, n, 1, k) @ (…, n|1, k, d)
                    w = (c[..., :, None, :] @ udirs[i][..., None, :, :, :])[..., 0, :]
                W = w if W is None else W + w
            coef.append((v, W))
        return coef

    def _outputs(self, groups, blocks, udirs, results):
        """Per block (…, k, size) from per-group (y, G) (G in z-space)."""
        xp = self.xp
        out = [None] * len(blocks)
        for g, (y, G) in zip(groups, results):
            for i, kind in g.parts:
                b = blocks[i]
                if (y if kind == "value" else G) is None:
                    continue  # no coefficients reached it: filled with zeros
                if kind == "value":
                    out[i] = y
                elif kind == "grad":
                    e = G / self.ls[..., None, :, :]
                    out[i] = xp.reshape(e, tuple(e.shape[:-2]) + (b.n * b.k,))
                else:
                    # ũ_{p,t}·g_p: (…, n|1, k, d) @ (…, n, d, 1)
                    e = (udirs[i][..., None, :, :, :] @ G[..., :, :, None])[..., 0]
                    out[i] = xp.reshape(e, tuple(e.shape[:-2]) + (b.n * b.k,))
        return out

    # -- the product for one pair of groups -----------------------------------
    def _pair(self, phi, ZA, ZB, v, W, want_y, want_G):
        """Contributions to (y, G) at A from coefficients (v, W) at B.

        Shapes: ZA (…, nA, d), ZB (…, nB, d), v (…, k, nB), W (…, k, nB, d),
        Φ (…, nA, nB); returns y (…, k, nA) and G (…, k, nA, d) (or None).
        """
        xp = self.xp
        P0, P1, P2 = (None if p is None else p[..., None, :, :] for p in phi)
        ZA_, ZB_ = ZA[..., None, :, :], ZB[..., None, :, :]
        y = G = None

        def add(a, b):
            return b if a is None else a + b

        if v is not None:
            if want_y:
                y = add(y, (P0 @ v[..., None])[..., 0])
            if want_G and P1 is not None:
                P1v = (P1 @ v[..., None])[..., 0]
                if self.stationary:
                    t = ZA_ * P1v[..., None] - P1 @ (v[..., None] * ZB_)
                else:
                    t = P1 @ (v[..., None] * ZB_)
                G = add(G, t)
        if W is not None and P1 is not None:
            P1W = P1 @ W  # (…, k, nA, d)
            if want_y:
                t = xp.sum(ZA_ * P1W, axis=-1)
                if self.stationary:
                    q = xp.sum(ZB_ * W, axis=-1)  # (…, k, nB)
                    t = t - (P1 @ q[..., None])[..., 0]
                    y = add(y, -t)
                else:
                    y = add(y, t)
            if want_G:
                if self.stationary:
                    G = add(G, -P1W)
                    if P2 is not None:
                        q = xp.sum(ZB_ * W, axis=-1)
                        C = ZA_ @ B.matrix_transpose(W) - q[..., None, :]
                        M = P2 * C
                        M1 = xp.sum(M, axis=-1)
                        G = G - (ZA_ * M1[..., None] - M @ ZB_)
                else:
                    G = add(G, P1W)
                    if P2 is not None:
                        M = P2 * (ZA_ @ B.matrix_transpose(W))
                        G = G + M @ ZB_
        return y, G

    def _apply(self, out_groups, in_groups, coef, same, outputs=None):
        """(y, G) for each output group (…, k, n) and (…, k, n, d).

        ``outputs="values"`` (``"derivatives"``) computes only y (only G)."""
        res = []
        for ga in out_groups:
            want_y = ga.has_value and outputs != "derivatives"
            want_G = ga.has_grad and outputs != "values"
            y = G = None
            for gb, (v, W) in zip(in_groups, coef):
                if v is None and W is None:
                    continue
                if same:
                    phi = self._group_profiles(ga, gb)
                else:
                    phi = self._profiles(ga.Z, gb.Z, False)
                pair = self._pair
                if (
                    self.stationary
                    and phi[1] is not None
                    and phi[0].ndim == 2
                    and _fast_ok(self.xp, ga.Z, gb.Z, v, W, self.ls)
                ):
                    pair = _pair_fast
                if pair is _pair_fast:
                    p0z = None
                    if (
                        MERGE_VALUE_GRADIENT
                        and same
                        and v is not None
                        and W is not None
                        and want_y
                    ):
                        p0z = self._group_p0z(ga, gb, phi)
                    yy, GG = _pair_fast(
                        phi,
                        ga.Z,
                        gb.Z,
                        v,
                        W,
                        want_y,
                        want_G,
                        p0z,
                        work=self._work if same else None,
                    )
                else:
                    yy, GG = pair(phi, ga.Z, gb.Z, v, W, want_y, want_G)
                if yy is not None:
                    y = yy if y is None else y + yy
                if GG is not None:
                    G = GG if G is None else G + GG
            res.append((y, G))
        return res

    # -- public products ---------------------------------------------------------
    def _chunks(self, nA):
        per = max(1, 3 * nA * nA)
        return max(1, RHS_CHUNK_ELEMENTS // per)

    def matmul(self, V, *, with_noise=True, inputs=None, outputs=None):
        """``(K + diag(noise)) V`` for V (…, N, k); returns (…, N, k).

        ``inputs="values"`` (``"derivatives"``) treats the derivative (value)
        entries of V as zeros and skips their share of the work;
        ``outputs="values"`` (``"derivatives"``) computes only the value
        (derivative) rows of the product and returns zeros in the others.
        """
        xp = self.xp
        for name, arg in (("inputs", inputs), ("outputs", outputs)):
            if arg not in (None, "values", "derivatives"):
                raise ValueError(
                    f"{name} must be None, 'values' or 'derivatives', got {arg!r}"
                )
        Vt = B.matrix_transpose(V)  # (…, k, N)
        k = Vt.shape[-2]
        nA = sum(g.Z.shape[-2] for g in self.groups)
        step = self._chunks(nA)
        outs = []
        for c0 in range(0, k, step):
            Vc = Vt[..., c0 : c0 + step, :]
            pieces = self._split(Vc, self.sizes)
            coef = self._coefficients(
                self.groups, self.blocks, self._udirs, pieces, inputs
            )
            res = self._apply(self.groups, self.groups, coef, True, outputs)
            parts = self._outputs(self.groups, self.blocks, self._udirs, res)
            parts = [
                xp.zeros_like(pieces[i]) if p is None else p
                for i, p in enumerate(parts)
            ]
            outs.append(xp.concat(parts, axis=-1))
        KV = B.matrix_transpose(outs[0] if len(outs) == 1 else xp.concat(outs, axis=-2))
        if with_noise and self.noise is not None:
            KV = KV + self.noise[..., None] * V
        return KV

    def cross_matmul(self, qblocks, V):
        """``K_{QL} V``: query functionals against the observations.

        Parameters
        ----------
        qblocks : list of Block
            Query functionals of order ≤ 1 (M entries in all).
        V : array (…, N, k)
            Coefficients on the observation entries (e.g. the weights
            ``(K + Σ)⁻¹ r``).

        Returns
        -------
        array (…, M, k)
            Computed in O(N M D) time without the M×N cross-covariance.
        """
        reason = unsupported_reason(self.kernel, qblocks)
        if reason is not None:
            raise ValueError(reason)
        xp = self.xp
        qgroups = _groups(xp, qblocks)
        for g in qgroups:
            g.Z = self._scaled(g.X)
        qdirs = [self._dirs(b) for b in qblocks]
        Vt = B.matrix_transpose(V)
        pieces = self._split(Vt, self.sizes)
        coef = self._coefficients(self.groups, self.blocks, self._udirs, pieces)
        # bound the (…, k, m, N) temporaries by chunking the query points
        N = sum(g.Z.shape[-2] for g in self.groups)
        k = Vt.shape[-2]
        step = max(1, RHS_CHUNK_ELEMENTS // max(1, N * k * 4))
        outs = []
        for qg in qgroups:
            n = qg.Z.shape[-2]
            ys, Gs = [], []
            for i0 in range(0, n, step):
                sub = _Group(qg.X[..., i0 : i0 + step, :])
                sub.Z = qg.Z[..., i0 : i0 + step, :]
                sub.parts = qg.parts
                ((y, G),) = self._apply([sub], self.groups, coef, False)
                ys.append(y)
                Gs.append(G)
            y = None if ys[0] is None else xp.concat(ys, axis=-1)
            G = None if Gs[0] is None else xp.concat(Gs, axis=-2)
            outs.append((y, G))
        parts = self._outputs(qgroups, qblocks, qdirs, outs)
        return B.matrix_transpose(xp.concat(parts, axis=-1))

    def diagonal(self):
        """The diagonal of ``K + diag(noise)``, (…, N)."""
        from ..covariance import point_covariance

        xp = self.xp
        parts = []
        for b in self.blocks:
            pc = point_covariance(self.kernel, b)  # (…, n, k, k)
            dg = B.diagonal(pc)
            parts.append(xp.reshape(dg, tuple(dg.shape[:-2]) + (b.size,)))
        shapes = [tuple(p.shape[:-1]) for p in parts]
        if self.noise is not None:
            shapes.append(tuple(self.noise.shape[:-1]))
        batch = tuple(np.broadcast_shapes(*shapes))
        parts = [xp.broadcast_to(p, batch + (p.shape[-1],)) for p in parts]
        dg = xp.concat(parts, axis=-1)
        if self.noise is not None:
            dg = dg + self.noise
        return dg


def _fast_ok(xp, ZA, ZB, v, W, ls):
    """The GEMM-blocked, in-place product applies: 2-D points (no batch axes)
    and nothing that autograd has to follow."""
    if ZA.ndim != 2 or ZB.ndim != 2:
        return False
    for a in (v, W):
        if a is not None and a.ndim != (2 if a is v else 3):
            return False
    return not B.requires_grad(ZA, ZB, v, W, ls)


def _half_sq_dist(xp, ZA, ZB, same):
    """``S = ½|z_a − z_b|²`` (…, nA, nB) by one GEMM, in place.

    ``½|z_a|² + ½|z_b|² − z_a·z_b`` loses digits to cancellation for close
    pairs: pairs with ``S`` below 1e-6 of ``½(|z_a|² + |z_b|²)`` are recomputed
    from differences (the points are centered, so these are rare), and a
    Gram matrix's diagonal is exactly 0.
    """
    na = 0.5 * xp.sum(ZA * ZA, axis=-1)
    nb = 0.5 * xp.sum(ZB * ZB, axis=-1)
    S = ZA @ B.matrix_transpose(ZB)
    if B.is_torch(xp):
        S.mul_(-1.0).add_(na[..., :, None]).add_(nb[..., None, :]).clamp_(min=0.0)
    else:
        np.multiply(S, -1.0, out=S)
        S += na[..., :, None]
        S += nb[..., None, :]
        np.maximum(S, 0.0, out=S)
    if S.ndim != 2:
        return S
    ref = na[:, None] + nb[None, :]
    close = S < 1e-6 * ref
    ia, ib = xp.nonzero(close)
    if ia.shape[0]:
        diff = ZA[ia] - ZB[ib]
        S[ia, ib] = 0.5 * xp.sum(diff * diff, axis=-1)
    if same:
        n = S.shape[-1]
        ar = xp.arange(n, device=B.device_of(S)) if B.is_torch(xp) else np.arange(n)
        S[ar, ar] = 0.0
    return S


def _pair_fast(phi, ZA, ZB, v, W, want_y, want_G, p0z=None, work=None):
    """:meth:`GramOperator._pair` for a stationary kernel without batch axes,
    with every ``Φ₁`` product of all columns in one GEMM and the ``Φ₂`` term
    through in-place row blocks (:func:`_phi2_term`).

    Shapes: Φ (nA, nB), ZA (nA, d), ZB (nB, d), v (k, nB), W (k, nB, d);
    returns y (k, nA) and G (k, nA, d) (or None). The GEMM flops per column
    are ``8 nA nB d``: ``Φ₁[vZ | W]``, ``ZWᵀ`` and ``(Φ₂ ⊙ C) Z``.

    With ``p0z = Φ₀ + Φ₁ ⊙ Z_A Z_Bᵀ`` (values and gradients at the same points)
    the two Φ₁ products on ``v ⊙ Z_B`` and on ``W`` merge into one on their sum
    ``U``, since ``rowsum(Z_A ⊙ Φ₁(v ⊙ Z_B)) = (Φ₁ ⊙ Z_A Z_Bᵀ) v``:

    .. math:: y = p0z\\,v + Φ_1 q − \\operatorname{rowsum}(Z_A ⊙ Φ_1 U),\\qquad
        G = Z_A ⊙ (Φ_1 v) − Φ_1 U − (Φ_2 \\text{ term})

    and the flops per column drop to ``6 nA nB d``.

    ``work`` (a dict) keeps the Φ₂ term's block buffer between calls.
    """
    if p0z is not None and v is not None and W is not None and want_y:
        return _pair_merged(phi, p0z, ZA, ZB, v, W, want_G, work)
    xp = B.namespace(ZA)
    P0, P1, P2 = phi
    nA, d = ZA.shape
    nB = ZB.shape[0]
    k = (v if v is not None else W).shape[0]
    cols, widths = [], []

    def push(a, w):
        cols.append(a)
        widths.append(w)

    if v is not None:
        push(B.matrix_transpose(v), k)  # P1 v
        if want_G:
            vZ = v[:, :, None] * ZB[None, :, :]  # (k, nB, d)
            push(xp.reshape(xp.moveaxis(vZ, 0, 1), (nB, k * d)), k * d)
    q = None
    if W is not None:
        q = xp.sum(ZB[None, :, :] * W, axis=-1)  # (k, nB)
        if want_y:
            push(B.matrix_transpose(q), k)
        push(xp.reshape(xp.moveaxis(W, 0, 1), (nB, k * d)), k * d)
    R = P1 @ (cols[0] if len(cols) == 1 else xp.concat(cols, axis=-1))
    parts, start = [], 0
    for w in widths:
        parts.append(R[:, start : start + w])
        start += w
    parts = iter(parts)

    def as_kad(a):  # (nA, k·d) -> (k, nA, d)
        return xp.moveaxis(xp.reshape(a, (nA, k, d)), 1, 0)

    y = G = None
    if v is not None:
        P1v = B.matrix_transpose(next(parts))  # (k, nA)
        if want_y:
            y = B.matrix_transpose(P0 @ B.matrix_transpose(v))
        if want_G:
            G = ZA[None, :, :] * P1v[:, :, None] - as_kad(next(parts))
    if W is not None:
        P1q = B.matrix_transpose(next(parts)) if want_y else None
        P1W = as_kad(next(parts))
        if want_y:
            t = P1q - xp.sum(ZA[None, :, :] * P1W, axis=-1)
            y = t if y is None else y + t
        if want_G:
            G = -P1W if G is None else G - P1W
            if P2 is not None:
                G = G - _phi2_term(xp, P2, ZA, ZB, W, q, work)
    return y, G


def posterior_mean(post, *queries):
    """Posterior mean of ``queries`` without their variances: the same as
    :meth:`gpgrad.Posterior.mean` (kept for code that imported it from here)."""
    return post.mean(*queries)


def _empty(xp, shape, like):
    if B.is_torch(xp):
        return xp.empty(shape, dtype=like.dtype, device=like.device)
    return np.empty(shape, dtype=like.dtype)


def _workspace(xp, work, shape, like):
    """An uninitialized array of ``shape`` like ``like``: the one kept in
    ``work`` when it matches (allocated and kept there otherwise; a fresh one
    without ``work``)."""
    if work is None:
        return _empty(xp, shape, like)
    key = (shape, str(like.dtype), str(B.device_of(like)))
    buf = work.get(key)
    if buf is None:
        work.clear()  # at most one: the Gram product's
        buf = _empty(xp, shape, like)
        work[key] = buf
    return buf


def _matmul_into(xp, a, b, out):
    """``a @ b`` written into ``out``."""
    if B.is_torch(xp):
        import torch

        return torch.matmul(a, b, out=out)
    return np.matmul(a, b, out=out)


def _phi2_term(xp, P2, ZA, ZB, W, q, work=None):
    """``Z_A ⊙ (M 1) − M Z_B`` with ``M = Φ₂ ⊙ C``, ``C_ab = z_a·w_b − q_b``,
    (k, nA, d).

    ``M`` is formed and used one block of rows at a time (blocks of about
    :data:`PHI2_BLOCK_ELEMENTS`), so no N×N temporary is allocated (800 MB at
    N = 10,000); ``work`` (a dict) keeps the block buffer between calls.
    """
    nA, nB = ZA.shape[0], ZB.shape[0]
    dev = B.device_of(ZA)
    step = max(1, min(nA, PHI2_BLOCK_ELEMENTS // max(1, nB)))
    buf = _workspace(xp, work, (step, nB), P2)
    ZAa = xp.concat([ZA, -xp.ones((nA, 1), dtype=ZA.dtype, device=dev)], axis=-1)
    # M [Z_B | 1] gives M Z_B and the row sums M 1 in one GEMM
    ZBa = xp.concat([ZB, xp.ones((nB, 1), dtype=ZB.dtype, device=dev)], axis=-1)
    corr = []
    for j in range(W.shape[0]):
        WQt = B.matrix_transpose(xp.concat([W[j], q[j][:, None]], axis=-1))
        MZ = _empty(xp, (nA, ZBa.shape[-1]), ZA)
        for i0 in range(0, nA, step):
            i1 = min(nA, i0 + step)
            C = _matmul_into(xp, ZAa[i0:i1], WQt, buf[: i1 - i0])
            if B.is_torch(xp):
                C.mul_(P2[i0:i1])
            else:
                np.multiply(C, P2[i0:i1], out=C)
            MZ[i0:i1] = C @ ZBa
        corr.append(ZA * MZ[:, -1:] - MZ[:, :-1])
    return xp.stack(corr, axis=0)


def _pair_merged(phi, p0z, ZA, ZB, v, W, want_G, work=None):
    """:func:`_pair_fast` for values and gradients at the same points: one Φ₁
    GEMM on ``[v | q | v ⊙ Z_B + W]`` (``2 + d`` columns per column of v)."""
    xp = B.namespace(ZA)
    _, P1, P2 = phi
    nA, d = ZA.shape
    nB = ZB.shape[0]
    k = v.shape[0]
    q = xp.sum(ZB[None, :, :] * W, axis=-1)  # (k, nB)
    U = v[:, :, None] * ZB[None, :, :] + W  # (k, nB, d)
    cols = xp.concat(
        [
            B.matrix_transpose(v),
            B.matrix_transpose(q),
            xp.reshape(xp.moveaxis(U, 0, 1), (nB, k * d)),
        ],
        axis=-1,
    )
    R = P1 @ cols
    P1v = B.matrix_transpose(R[:, :k])  # (k, nA)
    P1q = B.matrix_transpose(R[:, k : 2 * k])
    P1U = xp.moveaxis(xp.reshape(R[:, 2 * k :], (nA, k, d)), 1, 0)  # (k, nA, d)
    y = B.matrix_transpose(p0z @ B.matrix_transpose(v))
    y = y + P1q - xp.sum(ZA[None, :, :] * P1U, axis=-1)
    G = None
    if want_G:
        G = ZA[None, :, :] * P1v[:, :, None] - P1U
        if P2 is not None:
            G = G - _phi2_term(xp, P2, ZA, ZB, W, q, work)
    return y, G
