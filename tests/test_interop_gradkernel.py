"""GradKernel as a drop-in for GPyTorch's derivative kernels.

GPyTorch's own kernel test case (``gpytorch.test.base_kernel_test_case``:
active dims, batch shapes, diag, ARD, getitem, pickle, dtype and device) runs on
``GradKernel`` with small data, and the cases of GPyTorch's
``test_rbf_kernel_grad.py`` (reference values, batches, ``initialize``) are
repeated with ``GradKernel`` in place of ``RBFKernelGrad``.
"""

import pickle
import unittest

import pytest
import torch
from torch.func import jacrev

gpytorch = pytest.importorskip("gpytorch")
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase  # noqa: E402

from gpgrad import kernels as K  # noqa: E402
from gpgrad.interop.gpytorch import GradKernel  # noqa: E402

DT = torch.float64


class _SmallData:
    # GPyTorch's shapes with fewer points: every kernel here is
    # (n (d+1))², so the suite stays fast
    def create_data_no_batch(self):
        return torch.randn(6, 10, generator=torch.Generator().manual_seed(0))

    def create_data_single_batch(self):
        return torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(1))

    def create_data_double_batch(self):
        return torch.randn(3, 2, 4, 2, generator=torch.Generator().manual_seed(2))


class TestGradKernelAsRBFKernelGrad(_SmallData, BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        return GradKernel("rbf", **kwargs)

    def create_kernel_ard(self, num_dims, **kwargs):
        return GradKernel("rbf", ard_num_dims=num_dims, **kwargs)


class TestGradKernelMatern32WithVariance(
    _SmallData, BaseKernelTestCase, unittest.TestCase
):
    # a kernel GPyTorch has no gradient version of, with its own variance
    # (a second batched parameter beside the lengthscale)
    def create_kernel_no_ard(self, **kwargs):
        return GradKernel(K.Matern32(variance=1.3), **kwargs)

    def create_kernel_ard(self, num_dims, **kwargs):
        return GradKernel(K.Matern32(variance=1.3), ard_num_dims=num_dims, **kwargs)


# --------------------------------------------------------------------------
# the cases of GPyTorch's test_rbf_kernel_grad.py


def test_reference_values_of_rbf_kernel_grad():
    a = torch.tensor([[[1, 2], [2, 4]]], dtype=torch.float)
    b = torch.tensor([[[1, 3], [0, 4]]], dtype=torch.float)
    actual = torch.tensor(
        [
            [0.35321, 0, -0.73517, 0.0054977, 0.011443, -0.022886],
            [0, 0.73517, 0, -0.011443, -0.012374, 0.047633],
            [0.73517, 0, -0.79499, 0.022886, 0.047633, -0.083824],
            [0.12476, 0.25967, 0.25967, 0.015565, 0.064793, 0],
            [-0.25967, -0.2808, -0.54047, -0.064793, -0.23732, 0],
            [-0.25967, -0.54047, -0.2808, 0, 0, 0.032396],
        ]
    )
    res = GradKernel("rbf")(a, b).to_dense()
    assert torch.norm(res - actual) < 1e-5


def test_batch_equals_loop():
    a = torch.tensor(
        [[[1, 2, 3], [2, 4, 0]], [[-1, 1, 2], [2, 1, 4]]], dtype=torch.float
    )
    b = torch.tensor([[[1, 3, 1]], [[2, -1, 0]]], dtype=torch.float).repeat(1, 2, 1)
    kernel = GradKernel("rbf")
    res = kernel(a, b).to_dense()
    actual = torch.stack([kernel(a[i], b[i]).to_dense() for i in range(2)])
    assert torch.norm(res - actual) < 1e-5


def test_initialize_lengthscale():
    kernel = GradKernel("rbf")
    kernel.initialize(lengthscale=3.14)
    assert torch.norm(kernel.lengthscale - torch.tensor(3.14)) < 1e-5
    kernel = GradKernel("rbf", batch_shape=torch.Size([2]))
    ls_init = torch.tensor([3.14, 4.13])
    kernel.initialize(lengthscale=ls_init)
    assert kernel.lengthscale.shape == (2, 1, 1)
    assert torch.norm(kernel.lengthscale - ls_init.view_as(kernel.lengthscale)) < 1e-5


# --------------------------------------------------------------------------
# GPyTorch's defaults, shapes and state dicts


@pytest.mark.parametrize(
    "name,theirs",
    [
        ("rbf", gpytorch.kernels.RBFKernelGrad),
        ("matern52", gpytorch.kernels.Matern52KernelGrad),
    ],
)
def test_defaults_shapes_and_state_dict_match_gpytorch(name, theirs):
    for kw in [{}, {"ard_num_dims": 3}, {"batch_shape": torch.Size([2])}]:
        mine, ref = GradKernel(name, **kw), theirs(**kw)
        assert mine.raw_lengthscale.shape == ref.raw_lengthscale.shape
        torch.testing.assert_close(mine.lengthscale, ref.lengthscale)  # 0.693
        assert sorted(mine.state_dict()) == sorted(ref.state_dict())
        assert mine.has_lengthscale and mine.is_stationary
    ref = gpytorch.kernels.ScaleKernel(theirs(ard_num_dims=3)).double()
    ref.base_kernel.lengthscale = torch.tensor([0.3, 0.5, 0.9], dtype=DT)
    ref.outputscale = 1.7
    mine = gpytorch.kernels.ScaleKernel(GradKernel(name, ard_num_dims=3)).double()
    mine.load_state_dict(ref.state_dict())  # strict: the same keys
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(4, 3, generator=g, dtype=DT)
    x2 = torch.randn(3, 3, generator=g, dtype=DT)
    torch.testing.assert_close(
        mine(x1, x2).to_dense(), ref(x1, x2).to_dense(), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(mine(x1, diag=True), ref(x1, diag=True))


def test_prior_and_constraint_are_gpytorchs():
    prior = gpytorch.priors.GammaPrior(3.0, 6.0)
    k = GradKernel(
        "rbf",
        ard_num_dims=2,
        lengthscale_prior=prior,
        lengthscale_constraint=gpytorch.constraints.GreaterThan(0.1),
    )
    names = [n for n, *_ in k.named_priors()]
    assert names == ["lengthscale_prior"]
    assert isinstance(k.raw_lengthscale_constraint, gpytorch.constraints.GreaterThan)
    torch.testing.assert_close(
        k.lengthscale,
        torch.full(
            (1, 2), 0.1 + torch.nn.functional.softplus(torch.tensor(0.0)).item()
        ),
    )
    # the prior sees the lengthscale: its log density at the current value
    ((_, _, p, closure, _),) = k.named_priors()
    torch.testing.assert_close(p.log_prob(closure(k)), prior.log_prob(k.lengthscale))


def test_instance_values_become_initial_values_and_ard():
    k = GradKernel(K.RBF(lengthscale=0.4, variance=2.0), ard_num_dims=3).double()
    assert k.raw_lengthscale.shape == (1, 3)
    k.lengthscale = torch.tensor([0.4, 0.4, 0.4], dtype=DT)
    torch.testing.assert_close(
        k.gpgrad_kernel().lengthscale, torch.full((3,), 0.4, dtype=DT)
    )
    assert "raw_variance" in dict(k.named_parameters())
    k2 = GradKernel(K.RBF(lengthscale=[0.3, 0.6]))
    assert k2.raw_lengthscale.shape == (1, 2)
    torch.testing.assert_close(k2.lengthscale, torch.tensor([[0.3, 0.6]]))
    assert not GradKernel(K.Linear()).is_stationary
    assert GradKernel(K.RBF() * K.Periodic()).is_stationary
    assert not GradKernel(K.RBF() + K.Linear()).has_lengthscale


def test_getitem_with_fixed_variance_and_composite():
    k = GradKernel(K.RBF(variance=1.5), fixed=("variance",), batch_shape=(3, 2))
    k.initialize(lengthscale=torch.rand(3, 2, 1, 1) + 0.5)
    x = torch.randn(3, 2, 4, 2, generator=torch.Generator().manual_seed(4))
    sub = k[1, 0]
    assert sub.batch_shape == () and sub.fixed_variance.shape == ()
    torch.testing.assert_close(sub(x[1, 0]).to_dense(), k(x).to_dense()[1, 0])
    p = GradKernel(K.RBF() * K.Periodic(), batch_shape=(2,))
    assert p.raw_0_lengthscale.shape == (2, 1, 1)
    torch.testing.assert_close(p[1](x[0, 1]).to_dense(), p(x[0]).to_dense()[1])
    pickle.loads(pickle.dumps(p))


def test_gradgrad_equals_rbf_kernel_gradgrad():
    ref = gpytorch.kernels.RBFKernelGradGrad(ard_num_dims=2).double()
    ref.lengthscale = torch.tensor([0.7, 1.3], dtype=DT)
    mine = GradKernel("rbf", ard_num_dims=2, outputs="gradgrad").double()
    mine.lengthscale = torch.tensor([0.7, 1.3], dtype=DT)
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(3, 2, generator=g, dtype=DT)
    x2 = torch.randn(2, 2, generator=g, dtype=DT)
    assert mine.num_outputs_per_input(x1, x2) == 5
    # RBFKernelGradGrad itself fails for x1 and x2 of different sizes: compare
    # the cross block through the joint of both point sets
    xx = torch.cat([x1, x2])
    want = ref(xx, xx).to_dense()
    torch.testing.assert_close(mine(xx, xx).to_dense(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        mine(x1, x2).to_dense(), want[:15, 15:], rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(mine(x1, diag=True), ref(x1, diag=True))


def test_hessian_blocks_match_autodiff():
    ls = torch.tensor([0.7, 1.3], dtype=DT)

    def k(x, y):
        return 1.4 * torch.exp(-0.5 * (((x - y) / ls) ** 2).sum())

    mine = GradKernel(K.RBF(lengthscale=[0.7, 1.3], variance=1.4), outputs="hessian")
    mine = mine.double()
    mine.lengthscale = ls
    mine.variance = 1.4
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(2, 2, generator=g, dtype=DT)
    x2 = torch.randn(3, 2, generator=g, dtype=DT)
    per = 1 + 2 + 3  # value, gradient, Hessian (0,0), (0,1), (1,1)
    assert mine.num_outputs_per_input(x1, x2) == per
    Kfull = mine(x1, x2).to_dense()
    pairs = [(0, 0), (0, 1), (1, 1)]
    # ∂²k/∂x_i∂x_j, reverse over reverse (torch.func.hessian is forward over
    # reverse, whose forward mode takes a slow Python path for constants)
    hess = jacrev(jacrev(k, argnums=0), argnums=0)
    for p in range(2):
        for q in range(3):
            H = hess(x1[p], x2[q])
            for t, (i, j) in enumerate(pairs):
                assert torch.allclose(Kfull[p * per + 3 + t, q * per], H[i, j])
    diag = mine(x1, diag=True)
    torch.testing.assert_close(diag, mine(x1, x1).to_dense().diagonal())


def test_gradkernel_api_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown kernel name 'cosine'"):
        GradKernel("cosine")
    with pytest.raises(ValueError, match="outputs must be one of"):
        GradKernel("rbf", outputs="laplacian")
    with pytest.raises(ValueError, match="never mean-square differentiable|order"):
        GradKernel(K.Matern32(), outputs="hessian")
    with pytest.raises(ValueError, match="ard_num_dims=3 but the kernel's lengthscale"):
        GradKernel(K.RBF(lengthscale=[1.0, 2.0]), ard_num_dims=3)
    with pytest.raises(ValueError, match="ard_num_dims must be a positive integer"):
        GradKernel("rbf", ard_num_dims=0)
    with pytest.raises(ValueError, match="need a kernel with one .*lengthscale"):
        GradKernel(
            K.RBF() * K.RBF(), lengthscale_prior=gpytorch.priors.GammaPrior(1, 1)
        )
    k = GradKernel("rbf")
    with pytest.raises(ValueError, match=r"lengthscale must be positive.*got \[-1.0\]"):
        k.initialize(lengthscale=torch.tensor([-1.0]))
