"""GPyTorch kernels and the BoTorch model.

GradKernel is checked against GPyTorch's own derivative kernels where both
exist, and against torch.func autodiff of independently written value kernels
where GPyTorch has none; GPyTorch's derivative-GP example runs with it swapped
in. GradientGP is checked against a gpgrad posterior computed directly, and
drives BoTorch's acquisition functions and optimize_acqf.
"""

import math

import numpy as np
import pytest
import torch
from torch.func import jacrev

import gpgrad
from gpgrad import kernels as K

gpytorch = pytest.importorskip("gpytorch")
from gpgrad.interop.gpytorch import GradKernel  # noqa: E402

DT = torch.float64


# --------------------------------------------------------------------------
# independent value kernels and their derivative blocks by autodiff


def _r2(x, y, ls):
    return (((x - y) / ls) ** 2).sum()


def ref_rbf(var, ls):
    return lambda x, y: var * torch.exp(-0.5 * _r2(x, y, ls))


def ref_matern32(var, ls):
    def k(x, y):
        a = math.sqrt(3.0) * torch.sqrt(_r2(x, y, ls))
        return var * (1 + a) * torch.exp(-a)

    return k


def ref_matern52(var, ls):
    def k(x, y):
        a = math.sqrt(5.0) * torch.sqrt(_r2(x, y, ls))
        return var * (1 + a + a * a / 3) * torch.exp(-a)

    return k


def ref_rq(var, ls, alpha):
    return lambda x, y: var * (1 + _r2(x, y, ls) / (2 * alpha)) ** (-alpha)


def ref_interleaved(k, X1, X2):
    """(n1 (d+1), n2 (d+1)) value+gradient covariance by torch.func, point by
    point, in GPyTorch's interleaved order."""
    d = X1.shape[-1]
    dk_dy = jacrev(k, argnums=1)
    dk_dx = jacrev(k, argnums=0)
    # reverse over reverse: forward mode in torch takes a slow Python path for
    # constant operands (the same derivative, ~10x the time)
    d2k = jacrev(dk_dy, argnums=0)  # [j (on y), i (on x)]
    rows = []
    for x in X1:
        row = []
        for y in X2:
            blk = torch.empty(d + 1, d + 1, dtype=DT)
            blk[0, 0] = k(x, y)
            blk[0, 1:] = dk_dy(x, y)
            blk[1:, 0] = dk_dx(x, y)
            blk[1:, 1:] = d2k(x, y).T
            row.append(blk)
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def _pts(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=DT) * 2 - 1


LS = [0.6, 0.9, 1.3]


# --------------------------------------------------------------------------
# GradKernel equals GPyTorch's derivative kernels


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (K.RBF, gpytorch.kernels.RBFKernelGrad),
        (K.Matern52, gpytorch.kernels.Matern52KernelGrad),
    ],
    ids=["RBF", "Matern52"],
)
def test_gradkernel_equals_gpytorch(ours, theirs):
    X1, X2 = _pts(5, 3, 0), _pts(4, 3, 1)
    ref = gpytorch.kernels.ScaleKernel(theirs(ard_num_dims=3)).double()
    ref.base_kernel.lengthscale = torch.tensor(LS, dtype=DT)
    ref.outputscale = torch.tensor(1.7, dtype=DT)
    mine = GradKernel(ours(lengthscale=LS, variance=1.7)).double()
    # set after .double(): the softplus inverse in float32 would lose digits
    mine.variance = 1.7
    mine.lengthscale = torch.tensor(LS, dtype=DT)
    assert mine.num_outputs_per_input(X1, X2) == 4
    for A, Bx in [(X1, X2), (X1, X1)]:
        want = ref(A, Bx).to_dense()
        got = mine(A, Bx).to_dense()
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        mine(X1, diag=True), ref(X1, diag=True), rtol=1e-12, atol=1e-12
    )


def test_gradkernel_in_scalekernel_with_fixed_variance():
    X1 = _pts(4, 2, 2)
    ref = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernelGrad(ard_num_dims=2)
    ).double()
    ref.base_kernel.lengthscale = torch.tensor([0.5, 0.8], dtype=DT)
    ref.outputscale = torch.tensor(2.5, dtype=DT)
    mine = gpytorch.kernels.ScaleKernel(
        GradKernel(K.RBF(lengthscale=[0.5, 0.8]), fixed=("variance",))
    ).double()
    mine.base_kernel.lengthscale = torch.tensor([0.5, 0.8], dtype=DT)
    mine.outputscale = torch.tensor(2.5, dtype=DT)
    names = [n for n, _ in mine.named_parameters()]
    assert "base_kernel.raw_variance" not in names
    assert "base_kernel.raw_lengthscale" in names
    torch.testing.assert_close(
        mine(X1).to_dense(), ref(X1).to_dense(), rtol=1e-12, atol=1e-12
    )


# --------------------------------------------------------------------------
# kernels GPyTorch has no derivative version of, and products


CASES = [
    ("Matern32", K.Matern32(lengthscale=LS, variance=1.3)),
    ("RationalQuadratic", K.RationalQuadratic(lengthscale=LS, variance=0.8, alpha=1.7)),
    (
        "RBF*Matern52",
        K.RBF(lengthscale=LS, variance=1.5) * K.Matern52(lengthscale=[1.1, 0.7, 2.0]),
    ),
    ("Matern32+RBF", K.Matern32(lengthscale=LS) + K.RBF(lengthscale=0.4, variance=0.5)),
]


def _ref_for(name):
    ls = torch.tensor(LS, dtype=DT)
    if name == "Matern32":
        return ref_matern32(1.3, ls)
    if name == "RationalQuadratic":
        return ref_rq(0.8, ls, 1.7)
    if name == "RBF*Matern52":
        k1 = ref_rbf(1.5, ls)
        k2 = ref_matern52(1.0, torch.tensor([1.1, 0.7, 2.0], dtype=DT))
        return lambda x, y: k1(x, y) * k2(x, y)
    k1 = ref_matern32(1.0, ls)
    k2 = ref_rbf(0.5, torch.tensor([0.4] * 3, dtype=DT))
    return lambda x, y: k1(x, y) + k2(x, y)


@pytest.mark.parametrize("name,kernel", CASES, ids=[c[0] for c in CASES])
def test_gradkernel_matches_autodiff(name, kernel):
    X1, X2 = _pts(4, 3, 3), _pts(3, 3, 4)
    mine = GradKernel(kernel).double()
    # re-set every hyperparameter in float64
    for pname, value in kernel.parameters().items():
        mine.set_hyperparameter(pname, torch.as_tensor(np.asarray(value), dtype=DT))
    got = mine(X1, X2).to_dense()
    want = ref_interleaved(_ref_for(name), X1, X2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the Gram matrix (coincident points on its diagonal) and its diagonal
    gram = mine(X1).to_dense()
    assert torch.equal(gram, gram.T)
    assert torch.linalg.eigvalsh(gram).min() > -1e-10
    torch.testing.assert_close(
        mine(X1, diag=True), torch.diagonal(gram), rtol=1e-12, atol=1e-12
    )


def test_gradkernel_coincident_block_closed_form():
    # Matérn 3/2 at x = x': cov(f, f) = σ², cov(∂_i f, ∂_j f) = 3σ²/ℓ_i² δ_ij,
    # cov(f, ∂f) = 0
    mine = GradKernel(K.Matern32(lengthscale=[0.5, 2.0], variance=2.0)).double()
    mine.variance = 2.0
    mine.lengthscale = torch.tensor([0.5, 2.0], dtype=DT)
    x = torch.tensor([[0.3, -0.2]], dtype=DT)
    want = torch.diag(torch.tensor([2.0, 6.0 / 0.25, 6.0 / 4.0], dtype=DT))
    torch.testing.assert_close(mine(x).to_dense(), want, rtol=1e-13, atol=1e-13)


def test_gradkernel_batch_shape_and_batched_inputs():
    mine = GradKernel(K.RBF(lengthscale=0.5), batch_shape=torch.Size([2])).double()
    mine.lengthscale = torch.tensor([[0.5], [0.9]], dtype=DT)
    mine.variance = torch.ones(2, dtype=DT)
    X = torch.stack([_pts(3, 2, 5), _pts(3, 2, 6)])
    got = mine(X).to_dense()
    assert got.shape == (2, 9, 9)
    for b, ls in enumerate([0.5, 0.9]):
        want = ref_interleaved(
            ref_rbf(1.0, torch.tensor([ls, ls], dtype=DT)), X[b], X[b]
        )
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


def test_gradkernel_hyperparameter_gradients_match_finite_differences():
    X1, X2 = _pts(3, 2, 7), _pts(2, 2, 8)
    mine = GradKernel(K.Matern52(lengthscale=[0.7, 1.2], variance=1.1)).double()
    w = _pts(9, 6, 9)

    def loss():
        return (mine(X1, X2).to_dense() * w).sum()

    loss().backward()
    raw = mine.raw_lengthscale
    grad = raw.grad.clone()
    h = 1e-6
    assert raw.shape == (1, 2)  # GPyTorch's (*batch, 1, ard) shape
    for i in range(2):
        with torch.no_grad():
            raw[0, i] += h
            up = loss().item()
            raw[0, i] -= 2 * h
            down = loss().item()
            raw[0, i] += h
        assert abs((up - down) / (2 * h) - grad[0, i].item()) < 1e-7


# --------------------------------------------------------------------------
# GPyTorch's derivative-GP example, with GradKernel swapped in


def _franke_like(X):
    x, y = X[:, 0], X[:, 1]
    f = torch.sin(3 * x) * torch.cos(2 * y) + 0.5 * x * y
    g = torch.stack(
        [
            3 * torch.cos(3 * x) * torch.cos(2 * y) + 0.5 * y,
            -2 * torch.sin(3 * x) * torch.sin(2 * y) + 0.5 * x,
        ],
        dim=-1,
    )
    return f, g


class _DerivGP(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood, base_kernel):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMeanGrad()
        self.covar_module = gpytorch.kernels.ScaleKernel(base_kernel)

    def forward(self, x):
        mean_x = self.mean_module(x)
        covar_x = self.covar_module(x)
        return gpytorch.distributions.MultitaskMultivariateNormal(mean_x, covar_x)


def _train(base_kernel, steps=8):
    torch.manual_seed(0)
    X = _pts(12, 2, 10)
    f, g = _franke_like(X)
    Y = torch.cat([f[:, None], g], dim=-1)  # (n, d+1), GPyTorch's example layout
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=3).double()
    model = _DerivGP(X, Y, lik, base_kernel).double()
    if isinstance(base_kernel, GradKernel):
        base_kernel.lengthscale = torch.tensor([0.5, 0.5], dtype=DT)
    else:
        base_kernel.lengthscale = torch.full((1, 2), 0.5, dtype=DT)
    model.train()
    lik.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = -mll(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    lik.eval()
    Xs = _pts(5, 2, 11)
    with torch.no_grad(), gpytorch.settings.fast_computations(log_prob=False):
        pred = model(Xs)
    return model, X, Y, losses, pred.mean, pred.variance, Xs


def test_gpytorch_derivative_example_with_gradkernel():
    *_, ref_losses, ref_mean, ref_var, _ = _train(
        gpytorch.kernels.RBFKernelGrad(ard_num_dims=2)
    )
    mine = GradKernel(K.RBF(lengthscale=[0.5, 0.5]), fixed=("variance",))
    *_, losses, mean, var, _ = _train(mine)
    # the same model, parameter for parameter: the same training trajectory
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-9)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(mean, ref_mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var, ref_var, rtol=1e-8, atol=1e-10)


def test_gpytorch_derivative_example_matern32_matches_gpgrad_posterior():
    model, X, Y, losses, mean, var, Xs = _train(
        GradKernel(K.Matern32(lengthscale=[0.5, 0.5]), fixed=("variance",)), steps=10
    )
    assert losses[-1] < losses[0]
    # the trained GPyTorch model against a gpgrad GP with the same numbers
    with torch.no_grad():
        lik = model.likelihood
        task_noise = lik.noise + lik.task_noises  # (d+1,)
        kernel = K.Matern32(
            lengthscale=model.covar_module.base_kernel.lengthscale[0],
            variance=model.covar_module.outputscale,
        )
        c = model.mean_module.constant
        gp = gpgrad.GP(kernel, mean=float(c), backend="torch")
        post = gp.condition(
            gpgrad.values(X, Y[:, 0], noise=task_noise[0]),
            gpgrad.gradients(X, Y[:, 1:], noise=task_noise[1:]),
        )
        pv = post.value(Xs)
        pg = post.gradient(Xs)
    torch.testing.assert_close(mean[:, 0], pv.mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(mean[:, 1:], pg.mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(var[:, 0], pv.var, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(var[:, 1:], pg.var, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------
# validation


def test_gradkernel_rejects_bad_input():
    with pytest.raises(TypeError, match="wraps a gpgrad kernel.*got RBFKernel"):
        GradKernel(gpytorch.kernels.RBFKernel())
    with pytest.raises(ValueError, match="never mean-square differentiable"):
        GradKernel(K.Matern12())
    with pytest.raises(ValueError, match="fixed names 'scale'.*hyperparameters"):
        GradKernel(K.RBF(), fixed=("scale",))
    k = GradKernel(K.RBF()).double()
    with pytest.raises(ValueError, match="has no hyperparameter 'alpha'"):
        k.hyperparameter("alpha")
    with pytest.raises(ValueError, match=r"lengthscale must be positive.*got \[-1.0\]"):
        k.lengthscale = torch.tensor([-1.0], dtype=DT)
    X = _pts(3, 2, 0)
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        k.forward(X, X, last_dim_is_batch=True)
    with pytest.raises(RuntimeError, match="diag=True needs x1 == x2"):
        k.forward(X, X + 1, diag=True)


# --------------------------------------------------------------------------
# the BoTorch model

botorch = pytest.importorskip("botorch")
from botorch.acquisition import (  # noqa: E402
    LogExpectedImprovement,
    UpperConfidenceBound,
    qLogNoisyExpectedImprovement,
)
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402

from gpgrad.acquisition import posterior_moments  # noqa: E402
from gpgrad.interop.botorch import GradientGP  # noqa: E402


def _bowl(X):
    """f = −Σ (x − 0.3)² + 0.2 sin(5 x_0), and its gradient."""
    f = -((X - 0.3) ** 2).sum(-1) + 0.2 * torch.sin(5 * X[..., 0])
    g = -2 * (X - 0.3)
    g[..., 0] = g[..., 0] + torch.cos(5 * X[..., 0])
    return f[..., None], g


def _unit(n, d, seed):
    return (_pts(n, d, seed) + 1) / 2


def _fixed_model(with_grad=True, n=6):
    X = _unit(n, 2, 20)
    Y, dY = _bowl(X)
    kern = K.Matern52(lengthscale=[0.4, 0.5], variance=1.2)
    return GradientGP(
        X, Y, dY if with_grad else None, kernel=kern, noise=1e-6, fit=False
    )


@pytest.mark.parametrize("with_grad", [True, False])
def test_gradientgp_posterior_is_the_gpgrad_posterior(with_grad):
    model = _fixed_model(with_grad)
    X, Y, dY = model.train_X, model.train_Y, model.train_dY
    m, s = Y.mean(), Y.std()
    obs = [gpgrad.values(X, (Y[:, 0] - m) / s)]
    if with_grad:
        obs.append(gpgrad.gradients(X, dY / s))
    gp = gpgrad.GP(
        K.Matern52(lengthscale=[0.4, 0.5], variance=1.2), noise=1e-6, backend="torch"
    )
    ref = gp.condition(*obs).value(_unit(3, 2, 21), full_cov=True)
    post = model.posterior(_unit(3, 2, 21)[None])  # (b=1, q=3, d)
    assert post.mean.shape == (1, 3, 1)
    torch.testing.assert_close(
        post.mean[0, :, 0], m + s * ref.mean, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        post.distribution.covariance_matrix[0], s**2 * ref.cov, rtol=1e-9, atol=1e-12
    )
    noisy = model.posterior(_unit(3, 2, 21), observation_noise=True)
    torch.testing.assert_close(
        noisy.variance[:, 0] - post.variance[0, :, 0],
        torch.full((3,), 1e-6 * float(s) ** 2, dtype=DT),
    )


def test_gradientgp_gradients_flow_to_X_and_match_closed_form():
    model = _fixed_model()
    Xs = _unit(4, 2, 22).requires_grad_(True)
    post = model.posterior(Xs[:, None, :])  # 4 batches of q = 1
    mean, var = post.mean[..., 0, 0], post.variance[..., 0, 0]
    (gm,) = torch.autograd.grad(mean.sum(), Xs, retain_graph=True)
    (gv,) = torch.autograd.grad(var.sum(), Xs)
    # closed form, standardized units, from gpgrad.acquisition
    mom = posterior_moments(model.posterior_gp, Xs.detach())
    torch.testing.assert_close(gm, model.y_std * mom.mean_grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gv, model.y_std**2 * mom.var_grad, rtol=1e-7, atol=1e-10)


def test_gradientgp_with_botorch_acquisitions_and_optimize_acqf():
    model = _fixed_model()
    Y = model.train_Y
    best = Y.max()
    Xs = _unit(5, 2, 23)
    # analytic LogEI against the closed form from the posterior moments
    logei = LogExpectedImprovement(model, best_f=best)
    got = logei(Xs[:, None, :])
    p = model.posterior(Xs[:, None, :])
    mu, sd = p.mean[:, 0, 0], p.variance[:, 0, 0].sqrt()
    z = (mu - best) / sd
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50

    def log_ei(z, s):  # in 50 digits: no cancellation far below the incumbent
        z = mp.mpf(float(z))
        h = z * mp.ncdf(z) + mp.npdf(z)
        return float(mp.log(mp.mpf(float(s)) * h))

    want = torch.tensor([log_ei(a, b) for a, b in zip(z, sd)], dtype=DT)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    ucb = UpperConfidenceBound(model, beta=2.0)
    torch.testing.assert_close(ucb(Xs[:, None, :]), mu + math.sqrt(2.0) * sd)
    # optimize_acqf over the unit square: candidates inside, better than the
    # best raw sample
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)
    opts = {"maxiter": 30}
    for acqf in (logei, ucb):
        cand, val = optimize_acqf(
            acqf, bounds=bounds, q=1, num_restarts=2, raw_samples=32, options=opts
        )
        assert cand.shape == (1, 2) and bool(((cand >= 0) & (cand <= 1)).all())
        grid = _unit(32, 2, 24)
        assert val >= acqf(grid[:, None, :]).max() - 1e-6
    qnei = qLogNoisyExpectedImprovement(
        model, X_baseline=model.train_X, sampler=SobolQMCNormalSampler(torch.Size([32]))
    )
    cand, val = optimize_acqf(
        qnei,
        bounds=bounds,
        q=2,
        num_restarts=2,
        raw_samples=16,
        options={"maxiter": 5},
    )
    assert cand.shape == (2, 2) and torch.isfinite(val)


@pytest.mark.filterwarnings("ignore::gpgrad.fit.FitWarning")  # noise-free data
def test_gradientgp_fits_on_construction():
    X = _unit(8, 2, 25)
    Y, dY = _bowl(X)
    model = GradientGP(X, Y, dY, fit_kwargs={"maxiter": 60})
    res = model.fit_result
    assert set(res.params) >= {
        "lengthscale",
        "variance",
        "noise.value",
        "noise.gradient",
    }
    # the fitted likelihood beats the default start
    start = gpgrad.GP(K.Matern52(lengthscale=[1.0, 1.0]), noise=1e-6, backend="torch")
    lml0 = start.log_marginal_likelihood(*model._observations())
    assert float(res.log_marginal_likelihood) > float(lml0)
    # a value-only model fits too
    vals = GradientGP(X, Y, fit_kwargs={"maxiter": 30})
    assert vals.fit_result.params.keys() >= {"noise.value"}
    assert "noise.gradient" not in vals.fit_result.params


def test_gradientgp_condition_on_observations_is_exact():
    model = _fixed_model()
    Xn = _unit(2, 2, 26)
    Yn, _ = _bowl(Xn)
    new = model.condition_on_observations(
        Xn, Yn, noise=torch.full((2, 1), 1e-4, dtype=DT)
    )
    Xs = _unit(3, 2, 27)
    # Gaussian conditioning of the old joint posterior on the new values
    joint = model.posterior(torch.cat([Xs, Xn]))
    mu = joint.mean[:, 0]
    C = joint.distribution.covariance_matrix
    Css, Csn, Cnn = C[:3, :3], C[:3, 3:], C[3:, 3:] + 1e-4 * torch.eye(2, dtype=DT)
    want_mean = mu[:3] + Csn @ torch.linalg.solve(Cnn, Yn[:, 0] - mu[3:])
    want_cov = Css - Csn @ torch.linalg.solve(Cnn, Csn.T)
    got = new.posterior(Xs)
    torch.testing.assert_close(got.mean[:, 0], want_mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(
        got.distribution.covariance_matrix, want_cov, rtol=1e-6, atol=1e-9
    )


def test_gradientgp_condition_on_gradients_is_exact():
    model = _fixed_model()
    Xn = _unit(2, 2, 32)
    Yn, dYn = _bowl(Xn)
    new = model.condition_on_observations(Xn, Yn, dY=dYn)
    Xs = _unit(3, 2, 33)
    # Gaussian conditioning of the old joint posterior over [f(Xs), f(Xn), ∇f(Xn)]
    s, m = model.y_std, model.y_mean
    joint = model.posterior_gp.predict(
        gpgrad.values(Xs), gpgrad.values(Xn), gpgrad.gradients(Xn), full_cov=True
    )
    mu, C = joint.mean, joint.cov
    obs = torch.cat([(Yn[:, 0] - m) / s, dYn.reshape(-1) / s])
    C_oo = C[3:, 3:] + 1e-6 * torch.eye(6, dtype=DT)  # the model's noise, both kinds
    want_mean = mu[:3] + C[:3, 3:] @ torch.linalg.solve(C_oo, obs - mu[3:])
    want_cov = C[:3, :3] - C[:3, 3:] @ torch.linalg.solve(C_oo, C[3:, :3])
    got = new.posterior(Xs)
    torch.testing.assert_close(got.mean[:, 0], m + s * want_mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(
        got.distribution.covariance_matrix, s**2 * want_cov, rtol=1e-6, atol=1e-9
    )


def test_gradientgp_fantasies_batch_like_a_loop():
    model = _fixed_model()
    Xf = _unit(4, 2, 28)[:, None, :]  # 4 candidate batches, q = 1
    fm = model.fantasize(Xf, SobolQMCNormalSampler(torch.Size([3])))
    assert fm.batch_shape == (3, 4)
    Xs = _unit(2 * 4 * 2, 2, 29).reshape(2, 1, 4, 2, 2)  # extra axis 2, model (3, 4)
    post = fm.posterior(Xs)
    assert post.mean.shape == (2, 3, 4, 2, 1)
    Yf = fm._extra[0].y  # (3, 4, 1), standardized
    for e, i, j in [(0, 0, 0), (1, 2, 3), (1, 1, 0)]:
        one = model.condition_on_observations(
            Xf[j], (model.y_mean + model.y_std * Yf[i, j])[:, None]
        )
        ref = one.posterior(Xs[e, 0, j])
        torch.testing.assert_close(post.mean[e, i, j], ref.mean, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(
            post.distribution.covariance_matrix[e, i, j],
            ref.distribution.covariance_matrix,
            rtol=1e-7,
            atol=1e-10,
        )


def test_gradientgp_rejects_bad_input():
    X = _unit(4, 2, 30)
    Y, dY = _bowl(X)
    with pytest.raises(TypeError, match="train_X must be a torch tensor.*got ndarray"):
        GradientGP(X.numpy(), Y)
    with pytest.raises(
        ValueError, match=r"train_Y must have shape \(4, 1\).*got \(4,\)"
    ):
        GradientGP(X, Y[:, 0])
    with pytest.raises(
        ValueError, match=r"train_dY must have shape \(4, 2\).*got \(4, 3\)"
    ):
        GradientGP(X, Y, torch.zeros(4, 3, dtype=DT))
    with pytest.raises(
        TypeError, match="kernel must be a gpgrad kernel.*got RBFKernel"
    ):
        GradientGP(X, Y, kernel=gpytorch.kernels.RBFKernel())
    model = _fixed_model()
    with pytest.raises(
        ValueError, match=r"X must have shape \(\*b, q, 2\).*got \(3, 5\)"
    ):
        model.posterior(torch.zeros(3, 5, dtype=DT))
    with pytest.raises(ValueError, match="one output"):
        model.posterior(X, output_indices=[1])
    with pytest.raises(
        ValueError, match=r"dY must have shape \(\*b, 4, 2\).*got \(4, 3\)"
    ):
        model.condition_on_observations(X, Y, dY=torch.zeros(4, 3, dtype=DT))
    with pytest.raises(
        ValueError, match=r"takes X \(\*b, n', 2\).*got X \(4, 2\) and Y \(4,\)"
    ):
        model.condition_on_observations(X, Y[:, 0])


def test_gradientgp_knowledge_gradient_evaluates():
    from botorch.acquisition import qKnowledgeGradient

    model = _fixed_model()
    kg = qKnowledgeGradient(model, num_fantasies=3)
    # one candidate plus one point per fantasy, 2 batches
    X = _unit(2 * 4, 2, 31).reshape(2, 4, 2).requires_grad_(True)
    val = kg(X)
    assert val.shape == (2,) and bool(torch.isfinite(val).all())
    (g,) = torch.autograd.grad(val.sum(), X)
    assert bool(torch.isfinite(g).all()) and g.abs().sum() > 0
