"""The solver protocol, lazy predictions and the registries."""

import numpy as np
import pytest
import torch

import gpgrad
from gpgrad import kernels as K
from gpgrad.functionals import KINDS, Functional
from gpgrad.kernels.base import REGISTRY
from gpgrad.solvers.base import Solver


def _data(n=12, d=2, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, d))
    y = np.sin(X).sum(-1)
    G = np.cos(X)
    return X, y, G


@pytest.mark.parametrize("method", ["cholesky", "cg", "woodbury"])
def test_every_solver_follows_the_protocol(method):
    X, y, G = _data(
        n=4 if method == "woodbury" else 12, d=6 if method == "woodbury" else 2
    )
    gp = gpgrad.GP(K.RBF(0.9), noise=1e-3, method=method)
    obs = [gpgrad.gradients(X, G)] if method == "woodbury" else [gpgrad.values(X, y)]
    post = gp.condition(*obs)
    assert isinstance(post.solver, Solver)
    assert post.solver.method == post.method
    assert isinstance(post.solver.jitter, float)
    qb = post.query_blocks(gpgrad.gradients(X[:3] + 0.1))
    mean, P, Q = post.solver.cross(qb, post.weights)
    assert mean.shape == (3 * X.shape[1],)
    ref = gpgrad.GP(K.RBF(0.9), noise=1e-3, method="cholesky").condition(*obs)
    want = ref.gradient(X[:3] + 0.1)
    got = post.gradient(X[:3] + 0.1)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got.var, want.var, rtol=1e-5, atol=1e-8)


class _Counting(Solver):
    """A dense solver that counts its solves, to see what a read costs."""

    method = "counting"

    def __init__(self, inner):
        super().__init__(inner.kernel, inner.blocks, inner.noise)
        self.inner = inner
        self.solves = 0

    def solve(self, R):
        self.solves += 1
        return self.inner.solve(R)

    def logdet(self):
        return self.inner.logdet()


def test_mean_never_pays_for_variances():
    X, y, _ = _data()
    post = gpgrad.GP(K.Matern52(0.7), noise=1e-3).condition(X, y)
    counting = _Counting(post.solver)
    post._solver = counting
    pred = post.gradient(X[:5] + 0.05)
    m = pred.mean
    assert counting.solves == 0  # the mean is K_{*X} α with α already solved
    v = pred.var
    assert counting.solves == 1
    assert pred.cov.shape == (5, 2, 2)
    assert counting.solves == 1  # computed once, kept
    ref = gpgrad.GP(K.Matern52(0.7), noise=1e-3).condition(X, y).gradient(X[:5] + 0.05)
    np.testing.assert_allclose(m, ref.mean, rtol=1e-13)
    np.testing.assert_allclose(v, ref.var, rtol=1e-12)


def test_reading_var_first_fills_the_mean_too():
    X, y, _ = _data()
    post = gpgrad.GP(K.RBF(0.7), noise=1e-3).condition(X, y)
    pred = post.predict(gpgrad.values(X[:4]), gpgrad.gradients(X[:2]), full_cov=True)
    cov = pred.cov
    assert cov.shape == (8, 8)
    mean_after = pred.mean
    fresh = post.mean(gpgrad.values(X[:4]), gpgrad.gradients(X[:2]))
    np.testing.assert_allclose(mean_after, fresh, rtol=1e-13)
    np.testing.assert_allclose(pred.var, np.diag(cov), rtol=1e-13)


def test_prediction_needs_moments_or_a_source():
    with pytest.raises(ValueError, match="needs mean and var, or a source"):
        gpgrad.Prediction(mean=np.zeros(2))


def test_kernel_registry_lists_every_public_kernel():
    for name in K.__all__:
        cls = getattr(K, name)
        if isinstance(cls, type) and issubclass(cls, K.Kernel):
            if cls in (K.Kernel, K.RadialKernel):
                assert name not in REGISTRY
            else:
                assert REGISTRY[name] is cls


def test_functional_registry_round_trips_every_kind():
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(3, 2))
    made = [
        gpgrad.values(X, np.ones(3)),
        gpgrad.gradients(X, np.ones((3, 2))),
        gpgrad.partials(X, [0, 1, 0], np.ones(3)),
        gpgrad.directional(X, [1.0, 2.0], np.ones(3)),
        gpgrad.second_partials(X, 0, 1, np.ones(3)),
        gpgrad.hessians(X, np.ones((3, 2, 2))),
    ]
    assert [f.kind for f in made] == list(KINDS)
    for f in made:
        fields = {name: getattr(f, name) for name in f.fields}
        g = Functional.build(f.kind, f.X, f.y, f.noise, **fields)
        assert type(g) is type(f)
        np.testing.assert_array_equal(g.directions(), f.directions())
        q = f.query()
        assert q.y is None and q.noise is None and f.y is not None
        assert type(q) is type(f)
    with pytest.raises(ValueError, match="unknown functional kind 'curl'"):
        Functional.build("curl", X)


def test_with_targets_checks_the_new_targets():
    X = np.zeros((3, 2))
    g = gpgrad.gradients(X)
    with pytest.raises(ValueError, match=r"gradient targets must have shape \(3, 2\)"):
        g.with_targets(np.ones(3))
    assert g.with_targets(np.ones((3, 2)), noise=0.1).noise == 0.1


def test_one_check_for_positive_parameters_refuses_negative_tensor_offsets():
    with pytest.raises(ValueError, match="Polynomial offset must be finite and non"):
        K.Polynomial(offset=torch.tensor(-0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="Polynomial offset must be finite and non"):
        K.Polynomial(offset=[-0.5])
    K.Polynomial(offset=torch.tensor(0.0, dtype=torch.float64))  # zero is allowed
