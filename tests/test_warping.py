"""The Kumaraswamy-warped kernel's derivative blocks against torch.func
autodiff (float64), at distinct and coincident points, and its fitting."""

import math

import numpy as np
import pytest
import torch
from reference import functional_mix, reference_covariance

import gpgrad
from gpgrad import kernels as K
from gpgrad.covariance import as_blocks, covariance

LO = np.array([-1.0, 0.0])
HI = np.array([1.0, 2.0])
A = 2.5
BB = 0.6
LS = np.array([0.4, 0.7])
M = 0.05
FLOOR = 0.1


def _warp_ref(x, floor=0.0):
    t = M + (1 - 2 * M) * (x - torch.tensor(LO)) / torch.tensor(HI - LO)
    return floor * t + (1 - floor) * (1 - (1 - t**A) ** BB)


def _base_ref(name):
    ls = torch.tensor(LS)

    def s(u, v):
        return 0.5 * torch.sum(((u - v) / ls) ** 2)

    if name == "rbf":
        return lambda u, v: 1.3 * torch.exp(-s(u, v))
    if name == "rq":
        return lambda u, v: 1.3 * (1 + s(u, v) / 0.7) ** -0.7

    # Matern 5/2 with rho = sqrt(10 s): autodiff is finite only off the diagonal
    def m52(u, v):
        r = torch.sqrt(10 * s(u, v))
        return 1.3 * (1 + r + r * r / 3) * torch.exp(-r)

    return m52


def _kernel(name, floor=0.0):
    base = {
        "rbf": K.RBF(LS, 1.3),
        "rq": K.RationalQuadratic(LS, 1.3, alpha=0.7),
        "m52": K.Matern52(LS, 1.3),
    }[name]
    return K.Warped(base, A, BB, lower=LO, upper=HI, margin=M, floor=floor)


def _reference(name, FA, FB, floor=0.0):
    base = _base_ref(name)

    def fref(x, y, o):
        return base(_warp_ref(x, floor), _warp_ref(y, floor))

    return reference_covariance(fref, FA, FB)


def _cov(kernel, FA, FB=None):
    xp = gpgrad.GP(kernel).xp
    A_ = as_blocks(FA, xp, np.float64, None)
    B_ = None if FB is None else as_blocks(FB, xp, np.float64, None)
    return covariance(kernel, A_, B_)


def _rel(a, b):
    return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


@pytest.mark.parametrize(
    "name, floor",
    [
        ("rbf", 0.0),
        ("rbf", FLOOR),
        pytest.param("rq", 0.0, marks=pytest.mark.slow),
        pytest.param("m52", FLOOR, marks=pytest.mark.slow),
    ],
)
def test_warped_cross_blocks_match_autodiff(name, floor):
    # nested torch.func derivatives up to (2, 2) are slow: one pair of points
    rng = np.random.default_rng(3)
    XA = rng.uniform(LO, HI, (1, 2))
    XB = rng.uniform(LO, HI, (1, 2))
    FA = functional_mix(XA, 2, rng)
    FB = functional_mix(XB, 2, rng)
    got = _cov(_kernel(name, floor), FA, FB)
    want = _reference(name, FA, FB, floor)
    assert got.shape == want.shape
    assert _rel(got, want) <= 1e-9


@pytest.mark.parametrize("name", ["rbf", pytest.param("rq", marks=pytest.mark.slow)])
def test_warped_gram_at_coincident_points_matches_autodiff(name):
    rng = np.random.default_rng(4)
    X = rng.uniform(LO, HI, (1, 2))
    X = np.vstack([X, X])  # a repeated point
    F = functional_mix(X, 2, rng)
    got = _cov(_kernel(name), F)
    want = _reference(name, F, F)
    assert _rel(got, want) <= 1e-9
    assert np.array_equal(got, got.T)
    ev = np.linalg.eigvalsh(got)
    assert ev.min() >= -1e-8 * ev.max()


def test_warped_matern_gradient_variance_at_coincident_point_is_finite():
    # value/gradient/Hessian self-covariance: the m52 limits at rho = 0
    k = _kernel("m52")
    X = np.array([[0.2, 1.1]])
    F = [gpgrad.values(X), gpgrad.gradients(X), gpgrad.hessians(X)]
    got = _cov(k, F)
    assert np.all(np.isfinite(got))
    # the gradient variance of k(u(x), u(x')) is u'(x)² · 5σ²/(3ℓ²) per axis
    t = M + (1 - 2 * M) * (X[0] - LO) / (HI - LO)
    W1 = A * BB * t ** (A - 1) * (1 - t**A) ** (BB - 1)
    u1 = (1 - 2 * M) / (HI - LO) * W1
    gvar = np.diag(got)[1:3]
    np.testing.assert_allclose(gvar, 1.3 * 5.0 / 3.0 * u1**2 / LS**2, rtol=1e-12)


def test_no_warping_is_the_base_kernel_on_rescaled_inputs():
    # a = b = 1: u = t, an affine map, so the kernel is the base kernel with
    # lengthscale ℓ (h − l) / (1 − 2m)
    base = K.RBF(0.3, 1.0)
    k = K.Warped(base, lower=0.0, upper=2.0)
    X = np.random.default_rng(0).uniform(0, 2, (4, 1))
    F = [gpgrad.values(X), gpgrad.gradients(X), gpgrad.hessians(X)]
    ref = K.RBF(0.3 * 2.0 / 0.9, 1.0)
    np.testing.assert_allclose(_cov(k, F), _cov(ref, F), rtol=1e-12, atol=1e-12)


def test_outside_the_box_the_warping_is_linear():
    k = K.Warped(K.RBF(0.3), 2.0, 3.0, lower=0.0, upper=1.0)
    x = np.array([[-0.5], [-0.2], [1.3]])
    u, u1, u2 = k._warp(np, x)
    _, e1, _ = k._warp(np, np.array([[0.0], [1.0]]))
    np.testing.assert_allclose(u1[:2, 0], e1[0, 0])
    np.testing.assert_allclose(u1[2, 0], e1[1, 0])
    # the value continues with that slope from the edge
    u0, _, _ = k._warp(np, np.array([[0.0]]))
    np.testing.assert_allclose(u[0, 0], u0[0, 0] - 0.5 * e1[0, 0])
    assert np.all(u2 == 0)


def test_warped_torch_backend_matches_numpy_and_has_gradients():
    k = _kernel("rbf")
    X = np.random.default_rng(5).uniform(LO, HI, (4, 2))
    y = np.sin(X.sum(1))
    p_np = gpgrad.GP(k, noise=1e-4).condition(X, y).gradient(X[:2])
    a = torch.tensor(A, requires_grad=True)
    kt = k.replace(concentration1=a)
    gp = gpgrad.GP(kt, noise=1e-4, backend="torch", dtype=torch.float64)
    lml = gp.log_marginal_likelihood(X, y)
    (g,) = torch.autograd.grad(lml, a)
    assert torch.all(torch.isfinite(g))
    p_t = (
        gpgrad.GP(k, noise=1e-4, backend="torch", dtype=torch.float64)
        .condition(X, y)
        .gradient(X[:2])
    )
    np.testing.assert_allclose(p_t.mean.numpy(), p_np.mean, rtol=1e-10, atol=1e-12)


def test_fit_learns_a_warping_for_a_local_feature():
    x = np.linspace(0, 1, 40)
    y = np.tanh(12 * (x - 0.5)) + 0.01 * np.random.default_rng(0).normal(size=40)
    k = K.Warped(K.RBF(), lower=0.0, upper=1.0)
    bounds = {"concentration1": (0.25, 4.0), "concentration0": (0.25, 4.0)}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpgrad.GPGradWarning)
        warped = gpgrad.fit(gpgrad.GP(k), x[:, None], y, bounds=bounds, restarts=1)
        plain = gpgrad.fit(gpgrad.GP(K.RBF()), x[:, None], y, restarts=1)
    assert warped.log_marginal_likelihood > plain.log_marginal_likelihood + 5
    a, b = warped.params["concentration1"], warped.params["concentration0"]
    assert a > 1.2 and b > 1.2  # the middle of the box is stretched


def test_warped_validation():
    with pytest.raises(TypeError, match="Warped wraps a stationary"):
        K.Warped(K.Linear())
    with pytest.raises(ValueError, match="upper > lower"):
        K.Warped(K.RBF(), lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="margin must lie in"):
        K.Warped(K.RBF(), margin=0.6)
    with pytest.raises(ValueError, match="concentration1 must be positive"):
        K.Warped(K.RBF(), concentration1=-1.0)
    with pytest.raises(ValueError, match="has no hyperparameter 'period'"):
        K.Warped(K.RBF()).replace(period=2.0)
    with pytest.raises(ValueError, match=r"floor must lie in \[0, 1\), got 1.0"):
        K.Warped(K.RBF(), floor=1.0)
    with pytest.raises(ValueError, match="concentration0 must be a scalar"):
        K.Warped(K.RBF(), concentration0=[1.0, 2.0])
    k = K.Warped(K.RBF(), lower=[0.0, 0.0], upper=[1.0, 1.0])
    with pytest.raises(ValueError, match="X has 3 columns but the Warped"):
        k(np.zeros((2, 3)))
    assert math.isinf(K.RBF().order) and k.order == 2


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_warped_model_round_trips_through_save_and_load(tmp_path, backend):
    # ARD box, a non-default margin, and a Warped kernel inside a sum
    rng = np.random.default_rng(3)
    X = rng.uniform(LO, HI, (12, 2))
    y = np.sin(3 * X[:, 0]) + X[:, 1] ** 2
    kern = _kernel("rq", FLOOR) + K.Linear(variance=0.2)
    post = gpgrad.GP(kern, noise=1e-3, backend=backend).condition(
        gpgrad.values(X, y), gpgrad.gradients(X[:3], rng.normal(size=(3, 2)))
    )
    gpgrad.save(post, tmp_path / "m.gpgrad")
    back = gpgrad.load(tmp_path / "m.gpgrad")
    w = back.kernel.children[0]
    assert isinstance(w, K.Warped) and w.margin == M and w.floor == FLOOR
    assert np.array_equal(w.lower, LO) and np.array_equal(w.upper, HI)
    assert repr(back.kernel) == repr(post.kernel)
    Xs = rng.uniform(LO, HI, (5, 2))
    a, b = post.gradient(Xs), back.gradient(Xs)
    for u, v in ((a.mean, b.mean), (a.var, b.var)):
        u = u.numpy() if torch.is_tensor(u) else u
        v = v.numpy() if torch.is_tensor(v) else v
        np.testing.assert_array_equal(u, v)


def test_a_damaged_warped_box_is_refused(tmp_path):
    import json
    import zipfile

    post = gpgrad.GP(K.Warped(K.RBF()), noise=1e-4).condition(
        np.array([[0.2], [0.7]]), np.array([1.0, 2.0])
    )
    path = tmp_path / "m.gpgrad"
    gpgrad.save(post, path)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(files["gpgrad.json"])
    del meta["gp"]["kernel"]["box"]["margin"]
    files["gpgrad.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    with pytest.raises(ValueError, match="expected a box with lower, upper, margin"):
        gpgrad.load(path)
