"""Independent reference implementations for the tests.

Kernels are written directly as functions of two points (no profiles, no chain
rule), once, against an ``ops`` object, so the same formula runs under
``torch.func`` autodiff (float64) and under ``mpmath`` (high-precision finite
differences, for coincident points where autodiff of ``|x − x'|`` is NaN).
"""

from __future__ import annotations

import functools
import math
from itertools import product

import mpmath as mp
import numpy as np
import torch
from torch.func import jacrev, vmap

import gpgrad
from gpgrad import kernels as K


class TorchOps:
    exp = staticmethod(torch.exp)
    sqrt = staticmethod(torch.sqrt)
    sin = staticmethod(torch.sin)
    pi = math.pi


class MpOps:
    exp = staticmethod(mp.exp)
    sqrt = staticmethod(mp.sqrt)
    sin = staticmethod(mp.sin)
    pi = mp.pi


# Each sum over the inputs is one tensor expression under torch (one op per
# step instead of one per input: autodiff's cost is per op) and a loop over
# the coordinates under mpmath; the same formula either way.


def _sq(x, y, ls):
    if isinstance(x, torch.Tensor):
        return (((x - y) / torch.tensor(ls, dtype=x.dtype)) ** 2).sum()
    return sum(((x[i] - y[i]) / ls[i]) ** 2 for i in range(len(ls)))


def _dot(x, y, ls):
    if isinstance(x, torch.Tensor):
        return (x * y / torch.tensor(ls, dtype=x.dtype) ** 2).sum()
    return sum(x[i] * y[i] / ls[i] ** 2 for i in range(len(ls)))


def rbf(var, ls):
    return lambda x, y, o: var * o.exp(-0.5 * _sq(x, y, ls))


def matern(nu, var, ls):
    def f(x, y, o):
        r = o.sqrt(_sq(x, y, ls))
        if nu == 0.5:
            return var * o.exp(-r)
        if nu == 1.5:
            a = math.sqrt(3.0) * r
            return var * (1 + a) * o.exp(-a)
        if nu == 2.5:
            a = math.sqrt(5.0) * r
            return var * (1 + a + a * a / 3) * o.exp(-a)
        a = math.sqrt(7.0) * r
        return var * (1 + a + 2 * a * a / 5 + a * a * a / 15) * o.exp(-a)

    return f


def rq(var, ls, alpha):
    return lambda x, y, o: var * (1 + _sq(x, y, ls) / (2 * alpha)) ** (-alpha)


def periodic(var, ls, period):
    def f(x, y, o):
        if isinstance(x, torch.Tensor):
            lt = torch.tensor(ls, dtype=x.dtype)
            s = (2 * torch.sin(math.pi * (x - y) / period) ** 2 / lt**2).sum()
        else:
            s = sum(
                2 * o.sin(o.pi * (x[i] - y[i]) / period) ** 2 / ls[i] ** 2
                for i in range(len(ls))
            )
        return var * o.exp(-s)

    return f


def linear(var, ls):
    return lambda x, y, o: var * _dot(x, y, ls)


def poly(var, ls, degree, offset):
    return lambda x, y, o: var * (_dot(x, y, ls) + offset) ** degree


def const(var):
    return lambda x, y, o: var + 0 * x[0] * y[0]


def ref_sum(f, g):
    return lambda x, y, o: f(x, y, o) + g(x, y, o)


def ref_prod(f, g):
    return lambda x, y, o: f(x, y, o) * g(x, y, o)


def ref_scale(c, f):
    return lambda x, y, o: c * f(x, y, o)


def cases(d=2):
    """(name, gpgrad kernel, reference function, smooth at x = x')."""
    ls = [0.7, 1.3, 0.9][:d]
    ls1 = [0.8] * d
    out = [
        ("RBF-ARD", K.RBF(lengthscale=ls, variance=1.7), rbf(1.7, ls), True),
        ("RBF-iso", K.RBF(lengthscale=0.8), rbf(1.0, ls1), True),
        (
            "Matern12",
            K.Matern12(lengthscale=ls, variance=1.3),
            matern(0.5, 1.3, ls),
            False,
        ),
        (
            "Matern32",
            K.Matern32(lengthscale=ls, variance=0.8),
            matern(1.5, 0.8, ls),
            False,
        ),
        (
            "Matern52",
            K.Matern52(lengthscale=ls, variance=2.1),
            matern(2.5, 2.1, ls),
            False,
        ),
        (
            "Matern72",
            K.Matern72(lengthscale=ls, variance=1.6),
            matern(3.5, 1.6, ls),
            False,
        ),
        (
            "RQ",
            K.RationalQuadratic(lengthscale=ls, variance=1.1, alpha=1.7),
            rq(1.1, ls, 1.7),
            True,
        ),
        (
            "Periodic",
            K.Periodic(lengthscale=ls, variance=0.9, period=2.3),
            periodic(0.9, ls, 2.3),
            True,
        ),
        ("Linear", K.Linear(lengthscale=ls, variance=0.6), linear(0.6, ls), True),
        (
            "Poly3",
            K.Polynomial(degree=3, lengthscale=ls, variance=0.5, offset=0.7),
            poly(0.5, ls, 3, 0.7),
            True,
        ),
        ("Constant", K.Constant(variance=1.4), const(1.4), True),
        (
            "Sum",
            K.RBF(lengthscale=ls) + K.Linear(variance=0.3),
            ref_sum(rbf(1.0, ls), linear(0.3, [1.0] * d)),
            True,
        ),
        (
            "Product",
            K.Matern52(lengthscale=ls, variance=1.5)
            * K.Periodic(lengthscale=1.1, period=1.7),
            ref_prod(matern(2.5, 1.5, ls), periodic(1.0, [1.1] * d, 1.7)),
            False,
        ),
        (
            "ScaledProduct",
            2.5 * (K.RBF(lengthscale=ls) * K.Polynomial(degree=2, offset=0.5)),
            ref_scale(2.5, ref_prod(rbf(1.0, ls), poly(1.0, [1.0] * d, 2, 0.5))),
            True,
        ),
    ]
    # stationary references (a function of x − x'): their coincident-point
    # tensors are shared across points (see derivative_tensors_mp)
    stationary = {"RBF-ARD", "RBF-iso", "Matern12", "Matern32", "Matern52"}
    stationary |= {"Matern72", "RQ", "Periodic", "Constant", "Product"}
    for name, _kernel, fref, _smooth in out:
        fref.key = name
        fref.stationary = name in stationary
    return out


def _one_order_more(g, argnum):
    """``g`` returns the tuple of derivative tensors of orders 0..m on input
    ``argnum``; the returned function returns orders 0..m + 1 (``has_aux``
    hands the lower orders through, so they are computed once)."""

    def h(a, b):
        def top(a, b):
            lower = g(a, b)
            return lower[-1], lower

        new, lower = jacrev(top, argnums=argnum, has_aux=True)(a, b)
        return (*lower, new)

    return h


@functools.cache
def _derivative_function(f, max_p=2, max_q=2):
    """One function (x, y) -> {(p, q): T[(p, q)]} for reference ``f``, built
    once per reference function.

    Every derivative is reverse mode (``jacrev`` of ``jacrev``): forward mode
    in torch meets constants as "efficient zero" tangents, whose shapes it
    infers by Python meta kernels, ~20x slower here for the same values (to
    rounding). One evaluation gives every (p, q): the (max_p, max_q) tensor
    computes the lower orders on the way.
    """

    def by_p(a, b):  # orders 0..max_p on x
        g = lambda a, b: (f(a, b, TorchOps),)  # noqa: E731
        for _ in range(max_p):
            g = _one_order_more(g, 0)
        return g(a, b)

    g = lambda a, b: (by_p(a, b),)  # noqa: E731
    for _ in range(max_q):  # then orders 0..max_q on y of every one of them
        g = _one_order_more(g, 1)

    def all_orders(a, b):
        by_q = g(a, b)
        return {(p, q): by_q[q][p] for p in range(max_p + 1) for q in range(max_q + 1)}

    return all_orders


def derivative_tensors(f, x, y, max_p=2, max_q=2):
    """T[(p, q)]: the tensor of p derivatives on x then q on y of f(x, y)."""
    T = _derivative_function(f, max_p, max_q)(x, y)
    return {key: t.numpy(force=True) for key, t in T.items()}


def derivative_tensors_batch(f, XA, XB, max_p=2, max_q=2):
    """T[(p, q)] of shape (npairs, d, ..., d) for the point pairs (XA[i], XB[i]):
    the same derivatives as :func:`derivative_tensors`, vectorized over the
    pairs with ``torch.func.vmap``."""
    T = vmap(_derivative_function(f, max_p, max_q))(XA, XB)
    return {key: t.numpy(force=True) for key, t in T.items()}


#: mpmath tensors at coincident points of stationary references, by case key:
#: for k(x, x') = κ(x − x') they are the same at every x = x', so each case
#: pays for its high-precision differences once per test session
_MP_COINCIDENT = {}


def derivative_tensors_mp(f, x, y, max_p=2, max_q=2, dps=100, h="1e-20"):
    """The same tensors by mpmath's high-precision finite differences.

    For a reference marked ``stationary`` (its ``key`` names the case), the
    tensors at a coincident pair are computed once and reused at every other
    coincident pair: a stationary kernel's derivatives at x = x' do not
    depend on x.
    """
    key = getattr(f, "key", None)
    if getattr(f, "stationary", False) and key is not None and np.array_equal(x, y):
        ck = (key, len(x), max_p, max_q, dps, h)
        if ck not in _MP_COINCIDENT:
            _MP_COINCIDENT[ck] = _tensors_mp(f, x, y, max_p, max_q, dps, h)
        return _MP_COINCIDENT[ck]
    return _tensors_mp(f, x, y, max_p, max_q, dps, h)


def _tensors_mp(f, x, y, max_p, max_q, dps, h):
    d = len(x)
    with mp.workdps(dps):
        xs = [mp.mpf(float(v)) for v in x]
        ys = [mp.mpf(float(v)) for v in y]

        def fun(*args):
            return f(list(args[:d]), list(args[d:]), MpOps)

        out, done = {}, {}
        for p in range(max_p + 1):
            for q in range(max_q + 1):
                T = np.zeros((d,) * (p + q))
                for idx in product(range(d), repeat=p + q):
                    counts = [0] * (2 * d)
                    for t, i in enumerate(idx):
                        counts[i + (d if t >= p else 0)] += 1
                    # mixed partials commute: each distinct one is computed once
                    c = tuple(counts)
                    if c not in done:
                        done[c] = float(mp.diff(fun, xs + ys, counts, h=mp.mpf(h)))
                    T[idx] = done[c]
                out[(p, q)] = T
    return out


def entries(f):
    """The entries of functional ``f`` by its documented layout: a list of
    (point index, [direction vectors])."""
    n, d = f.n, f.d
    e = np.eye(d)
    out = []
    for p in range(n):
        if f.kind == "value":
            out.append((p, []))
        elif f.kind == "gradient":
            out.extend((p, [e[i]]) for i in range(d))
        elif f.kind == "hessian":
            out.extend((p, [e[i], e[j]]) for i in range(d) for j in range(i, d))
        elif f.kind == "partial":
            out.append((p, [e[f.dims[p]]]))
        elif f.kind == "directional":
            U = f.U if f.U.shape[0] == n else np.repeat(f.U, n, axis=0)
            out.append((p, [U[p]]))
        elif f.kind == "second":
            out.append((p, [e[f.i[p]], e[f.j[p]]]))
    return out


def contract(T, dirsA, dirsB):
    v = T
    for a in dirsA + dirsB:
        v = np.tensordot(a, v, axes=([0], [0]))
    return float(v)


def reference_covariance(fref, FA, FB, mp_mode=False):
    """The cross-covariance matrix of functional lists FA, FB, entry by entry.

    The derivative tensors are computed once per distinct point pair, by
    autodiff vectorized over all pairs at once; with ``mp_mode`` (for kernels
    not smooth at x = x') the coincident pairs by mpmath's high-precision
    finite differences instead.
    """
    eA = [(fi, e) for fi, F in enumerate(FA) for e in entries(F)]
    eB = [(fi, e) for fi, F in enumerate(FB) for e in entries(F)]

    def point(F, p):
        return np.asarray(F.X[p], dtype=np.float64)

    pairs = {}
    for fa, (pa, _) in eA:
        for fb, (pb, _) in eB:
            xa, xb = point(FA[fa], pa), point(FB[fb], pb)
            pairs.setdefault((xa.tobytes(), xb.tobytes()), (xa, xb))
    # autodiff of |x - x'| is NaN at x = x': those pairs go to mpmath
    at_mp = [key for key in pairs if mp_mode and key[0] == key[1]]
    by_ad = [key for key in pairs if not (mp_mode and key[0] == key[1])]
    cache = {key: derivative_tensors_mp(fref, *pairs[key]) for key in at_mp}
    if by_ad:
        XA = torch.tensor(np.array([pairs[key][0] for key in by_ad]))
        XB = torch.tensor(np.array([pairs[key][1] for key in by_ad]))
        T = derivative_tensors_batch(fref, XA, XB)
        cache.update(
            {key: {pq: t[i] for pq, t in T.items()} for i, key in enumerate(by_ad)}
        )
    out = np.zeros((len(eA), len(eB)))
    for a, (fa, (pa, da)) in enumerate(eA):
        for b, (fb, (pb, db)) in enumerate(eB):
            key = (point(FA[fa], pa).tobytes(), point(FB[fb], pb).tobytes())
            T = cache[key][(len(da), len(db))]
            out[a, b] = contract(T, da, db)
    return out


def functional_mix(X, order, rng):
    """Query functionals of every kind up to ``order`` at points X."""
    n, d = X.shape
    fs = [gpgrad.values(X)]
    if order >= 1:
        fs += [
            gpgrad.gradients(X),
            gpgrad.partials(X, rng.integers(0, d, n)),
            gpgrad.directional(X, rng.normal(size=(n, d))),
        ]
    if order >= 2:
        fs += [
            gpgrad.hessians(X),
            gpgrad.second_partials(X, rng.integers(0, d, n), rng.integers(0, d, n)),
        ]
    return fs
