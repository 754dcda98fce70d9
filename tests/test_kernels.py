"""Every kernel's every derivative block against torch.func autodiff (float64)
and, at coincident points, against high-precision finite differences."""

import math
import zlib

import numpy as np
import pytest
import torch
from reference import cases, functional_mix, reference_covariance

from gpgrad import kernels as K
from gpgrad.covariance import as_blocks, covariance, point_covariance

CASES = cases(2)
IDS = [c[0] for c in CASES]


def _seed(name):
    # a fixed seed per case (hash() of a str changes from run to run)
    return zlib.crc32(name.encode())


def _order(kernel):
    return int(min(kernel.order, 2))


def _gp_cov(kernel, FA, FB=None):
    A = as_blocks(
        FA, np.__name__ and __import__("gpgrad").GP(kernel).xp, np.float64, None
    )
    Bl = (
        None
        if FB is None
        else as_blocks(FB, __import__("gpgrad").GP(kernel).xp, np.float64, None)
    )
    return covariance(kernel, A, Bl)


def _rel_err(a, b):
    scale = max(1.0, float(np.max(np.abs(b))))
    return float(np.max(np.abs(a - b))) / scale


@pytest.mark.parametrize("name,kernel,fref,smooth", CASES, ids=IDS)
def test_cross_blocks_match_autodiff(name, kernel, fref, smooth):
    rng = np.random.default_rng(_seed(name))
    XA = rng.uniform(-1, 1, (3, 2))
    XB = rng.uniform(-1, 1, (2, 2))
    FA = functional_mix(XA, _order(kernel), rng)
    FB = functional_mix(XB, _order(kernel), rng)
    got = _gp_cov(kernel, FA, FB)
    want = reference_covariance(fref, FA, FB)
    assert got.shape == want.shape
    assert _rel_err(got, want) <= 1e-9


@pytest.mark.parametrize("name,kernel,fref,smooth", CASES, ids=IDS)
def test_gram_matches_autodiff_and_is_symmetric(name, kernel, fref, smooth):
    rng = np.random.default_rng(1 + _seed(name))
    X = rng.uniform(-1, 1, (3, 2))
    F = functional_mix(X, _order(kernel), rng)
    got = _gp_cov(kernel, F)
    assert np.array_equal(got, got.T)
    ev = np.linalg.eigvalsh(got)
    assert ev.min() >= -1e-9 * max(1.0, ev.max())
    if smooth:
        want = reference_covariance(fref, F, F)
    else:
        # the Gram matrix contains coincident pairs: reference by mpmath
        want = reference_covariance(fref, F, F, mp_mode=True)
    assert _rel_err(got, want) <= 1e-9


@pytest.mark.parametrize("name,kernel,fref,smooth", CASES, ids=IDS)
def test_coincident_points_exact_and_finite(name, kernel, fref, smooth):
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (1, 2))
    F = functional_mix(x, _order(kernel), rng)
    got = _gp_cov(kernel, F, F)
    assert np.all(np.isfinite(got))
    want = reference_covariance(fref, F, F, mp_mode=True)
    assert _rel_err(got, want) <= 1e-9


@pytest.mark.parametrize("name,kernel,fref,smooth", CASES, ids=IDS)
def test_point_covariance_is_diagonal_of_gram(name, kernel, fref, smooth):
    rng = np.random.default_rng(3)
    X = rng.uniform(-1, 1, (4, 2))
    for F in functional_mix(X, _order(kernel), rng):
        full = _gp_cov(kernel, [F])
        (blk,) = as_blocks([F], __import__("gpgrad").GP(kernel).xp, np.float64, None)
        pc = point_covariance(kernel, blk)
        k = F.k
        for p in range(F.n):
            np.testing.assert_allclose(
                pc[p],
                full[p * k : (p + 1) * k, p * k : (p + 1) * k],
                rtol=1e-12,
                atol=1e-12,
            )


@pytest.mark.slow  # the costliest reference (3-D)
def test_three_dimensional_ard_hessian_blocks():
    rng = np.random.default_rng(11)
    for name, kernel, fref, _smooth in cases(3):
        if name not in ("RBF-ARD", "Matern52", "Matern72", "Periodic", "Product"):
            continue
        XA = rng.uniform(-1, 1, (2, 3))
        XB = rng.uniform(-1, 1, (2, 3))
        FA = functional_mix(XA, 2, rng)
        FB = functional_mix(XB, 2, rng)
        got = _gp_cov(kernel, FA, FB)
        want = reference_covariance(fref, FA, FB)
        assert _rel_err(got, want) <= 1e-9, name


@pytest.mark.parametrize("cls", [K.Matern52, K.Matern72])
def test_near_coincident_points_stay_accurate(cls):
    # points 1e-9 apart (in lengthscale units): singular profile derivatives
    # multiply vanishing products; the result must match the coincident limit
    k = cls(lengthscale=[0.7, 1.3])
    x = np.array([[0.2, -0.1]])
    rng = np.random.default_rng(0)
    for eps in (1e-9, 1e-12, 1e-150):
        F1 = functional_mix(x, 2, rng)
        F2 = functional_mix(x + eps, 2, rng)
        near = _gp_cov(k, F1[:2] + F1[4:5], F2[:2] + F2[4:5])
        at = _gp_cov(k, F1[:2] + F1[4:5], F1[:2] + F1[4:5])
        assert np.all(np.isfinite(near))
        assert _rel_err(near, at) <= 10 * max(eps, 1e-15)


def test_product_is_not_product_of_gradient_kernels():
    # the Leibniz rule: cov(∂f, ∂f') of k1·k2 has cross terms ∂k1·∂'k2
    k1, k2 = K.RBF(lengthscale=0.5), K.Linear()
    X = np.array([[0.3], [0.9]])
    import gpgrad

    G = [gpgrad.gradients(X)]
    prod = _gp_cov(k1 * k2, G)
    naive = _gp_cov(k1, G) * _gp_cov(k2, G)
    assert np.max(np.abs(prod - naive)) > 1e-2


def test_matern72_profile_derivatives_match_autodiff():
    # φ⁽ᵐ⁾(s) for m ≤ 4 against nested torch.func.grad of the closed-form φ
    from torch.func import grad

    def phi(s):
        rho = torch.sqrt(14.0 * s)
        return 1.6 * (1 + rho + 0.4 * rho**2 + rho**3 / 15) * torch.exp(-rho)

    k = K.Matern72(variance=1.6)
    for s0 in (0.02, 0.3, 1.7, 4.0):
        s = torch.tensor(s0, dtype=torch.float64)
        got = [1.6 * v for v in k.profile(torch, s, 4)]
        f = phi
        for m in range(5):
            assert abs(float(got[m] - f(s))) <= 1e-11 * max(1.0, abs(float(f(s))))
            f = grad(f)
    assert K.Matern72.order == 3
    assert K.Matern72().profile(np, np.zeros(1), 4)[4][0] == 0.0


def test_kernel_call_is_value_covariance():
    k = K.Matern32(lengthscale=[0.5, 2.0], variance=1.5)
    rng = np.random.default_rng(2)
    X1, X2 = rng.normal(size=(4, 2)), rng.normal(size=(3, 2))
    r = np.sqrt((((X1[:, None] - X2[None]) / [0.5, 2.0]) ** 2).sum(-1))
    want = 1.5 * (1 + math.sqrt(3) * r) * np.exp(-math.sqrt(3) * r)
    np.testing.assert_allclose(k(X1, X2), want, rtol=1e-13)
    assert k(X1).shape == (4, 4)


def test_hyperparameter_gradients_at_coincident_points_are_finite():
    # autograd through the guarded square root at s = 0
    ls = torch.tensor([0.7, 1.1], dtype=torch.float64, requires_grad=True)
    k = K.Matern52(lengthscale=ls)
    X = torch.tensor([[0.1, 0.2], [0.1, 0.2], [0.5, -0.3]], dtype=torch.float64)
    import gpgrad

    F = [gpgrad.values(X), gpgrad.gradients(X), gpgrad.hessians(X)]
    Kt = covariance(
        k, as_blocks(F, gpgrad.GP(k, backend="torch").xp, torch.float64, None)
    )
    Kt.sum().backward()
    assert torch.isfinite(ls.grad).all()
