"""GradientGP against BoTorch's model-API expectations (as for SingleTaskGP).

Shapes, batches, observation noise, transforms (with the chain rule for the
gradients), known noise, conditioning, fantasies (with and without gradients),
copies, dtype, fitting with ``fit_gpytorch_mll``, and BoTorch's acquisition
functions with ``optimize_acqf`` on q-batches with duplicate and
near-duplicate points.
"""

import copy
import io
import pickle
import warnings

import pytest
import torch

pytest.importorskip("botorch")
from botorch.acquisition import (  # noqa: E402
    qKnowledgeGradient,
    qLogExpectedImprovement,
    qLogNoisyExpectedImprovement,
    qUpperConfidenceBound,
)
from botorch.acquisition.active_learning import (  # noqa: E402
    qNegIntegratedPosteriorVariance,
)
from botorch.acquisition.max_value_entropy_search import (  # noqa: E402
    qMaxValueEntropy,
)
from botorch.fit import fit_gpytorch_mll  # noqa: E402
from botorch.models.transforms import Normalize, Standardize  # noqa: E402
from botorch.models.transforms.input import InputStandardize, Warp  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from botorch.utils.datasets import SupervisedDataset  # noqa: E402
from gpytorch.mlls import ExactMarginalLogLikelihood  # noqa: E402
from linear_operator.operators import LinearOperator  # noqa: E402

import gpgrad  # noqa: E402
from gpgrad import kernels as K  # noqa: E402
from gpgrad.interop.botorch import GradientGP  # noqa: E402

DT = torch.float64
UNIT = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)
LO = torch.tensor([-5.0, 0.0], dtype=DT)
HI = torch.tensor([10.0, 15.0], dtype=DT)


def _bowl(X):
    """f = −Σ (x − 0.3)² + 0.2 sin(5 x_0) on the unit cube, and its gradient."""
    f = -((X - 0.3) ** 2).sum(-1) + 0.2 * torch.sin(5 * X[..., 0])
    g = -2 * (X - 0.3)
    g[..., 0] = g[..., 0] + torch.cos(5 * X[..., 0])
    return f[..., None], g


def _unit(shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _kern():
    return K.Matern52(lengthscale=[0.4, 0.5], variance=1.2)


def _model(n=6, seed=0, **kw):
    X = _unit((n, 2), seed)
    Y, dY = _bowl(X)
    kw.setdefault("noise", 1e-6)
    return GradientGP(X, Y, dY, kernel=_kern(), fit=False, **kw)


# --------------------------------------------------------------------------
# posteriors: linear_operator covariances, duplicates, shapes, noise


def test_posterior_covariance_is_a_linear_operator_and_duplicates_sample():
    model = _model()
    x = _unit((1, 2), 1)
    post = model.posterior(torch.cat([x, x]))
    assert isinstance(post.distribution.lazy_covariance_matrix, LinearOperator)
    assert post.mean.shape == (2, 1)
    s = post.rsample(torch.Size([4]))
    assert s.shape == (4, 2, 1) and bool(torch.isfinite(s).all())
    # the two samples of one point agree up to BoTorch's jitter
    assert (s[:, 0] - s[:, 1]).abs().max() < 1e-3
    ei = qLogExpectedImprovement(model, best_f=model.train_Y.max())
    v = ei(torch.cat([x, x])[None])
    assert v.shape == (1,) and bool(torch.isfinite(v))
    # a training point twice (posterior variance ~ noise): still factored
    xt = model.train_X[:1]
    assert bool(torch.isfinite(model.posterior(torch.cat([xt, xt])).rsample()).all())


def test_posterior_shapes_and_observation_noise():
    model = _model()
    for shape in [(3, 2), (4, 3, 2), (2, 4, 3, 2)]:
        p = model.posterior(_unit(shape, 2))
        assert p.mean.shape == shape[:-1] + (1,)
        assert p.variance.shape == shape[:-1] + (1,)
    X = _unit((3, 2), 3)
    base = model.posterior(X).variance
    s2 = model.y_std**2
    noisy = model.posterior(X, observation_noise=True).variance
    torch.testing.assert_close(noisy - base, torch.full_like(base, 1e-6 * s2))
    given = model.posterior(X, observation_noise=torch.full((3, 1), 0.01, dtype=DT))
    torch.testing.assert_close(given.variance - base, torch.full_like(base, 0.01 * s2))


# --------------------------------------------------------------------------
# transforms: the chain rule carries gradients into model units


def test_normalize_and_standardize_equal_a_model_on_the_unit_cube():
    U = _unit((6, 2), 0)
    Y, dU = _bowl(U)
    X = LO + (HI - LO) * U
    Yd, dX = 100 * Y + 7, 100 * dU / (HI - LO)  # data units: ∂y/∂x
    unit = GradientGP(U, Y, dU, kernel=_kern(), noise=1e-6, fit=False)
    tf = GradientGP(
        X,
        Yd,
        dX,
        kernel=_kern(),
        noise=1e-6,
        fit=False,
        input_transform=Normalize(2, bounds=torch.stack([LO, HI])),
        outcome_transform=Standardize(m=1),
    )
    # the same model-units training targets
    torch.testing.assert_close(tf.train_targets, unit.train_targets)
    Us = _unit((4, 2), 1)
    a, b = tf.posterior(LO + (HI - LO) * Us), unit.posterior(Us)
    torch.testing.assert_close(a.mean, 100 * b.mean + 7, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        a.distribution.covariance_matrix,
        1e4 * b.distribution.covariance_matrix,
        rtol=1e-9,
        atol=1e-10,
    )
    # learned bounds (Normalize without bounds) and InputStandardize are affine
    # too: the model-units gradients are ∂y/∂x times the per-dimension scale
    for it in (Normalize(2), InputStandardize(2)):
        m = GradientGP(X, Yd, dX, noise=1e-6, fit=False, input_transform=it)
        coef = it.coefficient[0]  # u = (x − offset) / coef
        want = dX * coef / m.y_std
        torch.testing.assert_close(m._gm, want, rtol=1e-12, atol=1e-12)


def test_conditioning_through_transforms_equals_a_model_on_all_the_data():
    X = LO + (HI - LO) * _unit((7, 2), 4)
    U = (X - LO) / (HI - LO)
    Y, dU = _bowl(U)
    dX = dU / (HI - LO)
    kw = dict(
        kernel=_kern(),
        noise=1e-6,
        fit=False,
        outcome_transform=None,
        input_transform=Normalize(2, bounds=torch.stack([LO, HI])),
    )
    full = GradientGP(X, Y, dX, **kw)
    part = GradientGP(X[:5], Y[:5], dX[:5], **copy.deepcopy(kw))
    cond = part.condition_on_observations(X[5:], Y[5:], dY=dX[5:])
    Xs = LO + (HI - LO) * _unit((3, 2), 5)
    a, b = cond.posterior(Xs), full.posterior(Xs)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(a.variance, b.variance, rtol=1e-6, atol=1e-10)


# --------------------------------------------------------------------------
# known noise, construct_inputs


def test_train_yvar_is_known_noise_per_value_and_gradient_entry():
    X = _unit((5, 2), 6)
    Y, dY = _bowl(X)
    Yvar = 1e-4 * (1 + _unit((5, 1), 7))
    dYvar = 1e-3 * (1 + _unit((5, 2), 8))
    model = GradientGP(X, Y, dY, train_Yvar=Yvar, train_dYvar=dYvar, kernel=_kern())
    assert not list(model.likelihood.parameters())  # nothing noisy to fit
    s = Y.std()
    gp = gpgrad.GP(model.gp.kernel, mean=model.gp.mean, backend="torch")
    ref = gp.condition(
        gpgrad.values(X, (Y[:, 0] - Y.mean()) / s, noise=Yvar[:, 0] / s**2),
        gpgrad.gradients(X, dY / s, noise=dYvar / s**2),
    )
    Xs = _unit((3, 2), 9)
    torch.testing.assert_close(
        model.posterior(Xs).mean[:, 0], Y.mean() + s * ref.value(Xs).mean
    )
    # new points get the mean known noise (as BoTorch's fixed-noise models)
    extra = model.posterior(Xs, observation_noise=True).variance
    torch.testing.assert_close(
        extra - model.posterior(Xs).variance, Yvar.mean().expand(3, 1)
    )


def test_construct_inputs_is_axs_path():
    X = _unit((5, 2), 10)
    Y, dY = _bowl(X)
    ds = SupervisedDataset(
        X,
        Y,
        Yvar=torch.full_like(Y, 1e-4),
        feature_names=["a", "b"],
        outcome_names=["f"],
    )
    kw = GradientGP.construct_inputs(ds, train_dY=dY, kernel=_kern())
    assert set(kw) == {"train_X", "train_Y", "train_Yvar", "train_dY", "kernel"}
    model = GradientGP(**kw, fit=False)
    assert model.posterior(X).mean.shape == (5, 1)
    with pytest.raises(TypeError, match="SupervisedDataset, got dict"):
        GradientGP.construct_inputs({"X": X})


# --------------------------------------------------------------------------
# copies, dtype, batches


def test_deepcopy_pickle_torch_save_and_dtype():
    model = GradientGP(*_train(), fit_kwargs={"maxiter": 20})
    Xs = _unit((3, 2), 11)
    want = model.posterior(Xs).mean
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(buf, weights_only=False),
    ]
    for m in copies:
        torch.testing.assert_close(m.posterior(Xs).mean, want, rtol=1e-12, atol=0)
    m32 = copy.deepcopy(model).to(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpgrad warns about float32 gradients
        p32 = m32.posterior(Xs.float())
    assert p32.mean.dtype == torch.float32
    # float32 on a fitted value+gradient system: gpgrad warns that results may
    # be off by ~1e-3 of the prior scale or more (its condition estimate); the
    # copy must agree to that envelope, not to float64's
    torch.testing.assert_close(p32.mean.double(), want, rtol=1e-2, atol=5e-3)


def _train(n=6, seed=12):
    X = _unit((n, 2), seed)
    return (X, *_bowl(X))


def test_batched_training_data_equal_a_loop():
    X = _unit((3, 5, 2), 13)
    Y, dY = _bowl(X)
    model = GradientGP(X, Y, dY, kernel=_kern(), noise=1e-6, fit=False)
    assert model.batch_shape == (3,)
    Xs = _unit((3, 4, 2), 14)
    post = model.posterior(Xs)
    assert post.mean.shape == (3, 4, 1)
    for b in range(3):
        one = GradientGP(X[b], Y[b], dY[b], kernel=_kern(), noise=1e-6, fit=False)
        ref = one.posterior(Xs[b])
        torch.testing.assert_close(post.mean[b], ref.mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            post.distribution.covariance_matrix[b],
            ref.distribution.covariance_matrix,
            rtol=1e-8,
            atol=1e-12,
        )


# --------------------------------------------------------------------------
# fitting: ExactMarginalLogLikelihood and fit_gpytorch_mll


def test_exact_mll_is_the_gpgrad_log_marginal_likelihood():
    model = _model(noise=None)
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    mll.train()
    out = model(*model.train_inputs)
    got = mll(out, model.train_targets, *model.train_inputs)
    n_entries = model.train_targets.shape[-1]
    want = model.gp.log_marginal_likelihood(*model._observations()) / n_entries
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fit_gpytorch_mll_runs_and_raises_the_likelihood():
    model = _model(noise=None)
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    with torch.no_grad():
        before = float(mll(model(*model.train_inputs), model.train_targets))
    fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": 10}})
    assert not model.training
    mll.train()
    with torch.no_grad():
        after = float(mll(model(*model.train_inputs), model.train_targets))
    assert after > before
    # the posterior follows the new hyperparameters
    ls = model.covar_module.lengthscale.detach()[0]
    torch.testing.assert_close(model.posterior_gp.gp.kernel.lengthscale, ls)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::gpgrad.fit.FitWarning")
def test_fit_gpytorch_mll_agrees_with_gpgrad_fit():
    X, Y, dY = _train(8, 15)
    a = GradientGP(X, Y, dY, noise=1e-6, fit=False)
    fit_gpytorch_mll(ExactMarginalLogLikelihood(a.likelihood, a))
    assert not a.training
    b = GradientGP(X, Y, dY, noise=1e-6, fit_kwargs={"maxiter": 200})
    for name in ("lengthscale", "variance"):
        torch.testing.assert_close(
            a.covar_module.hyperparameter(name),
            b.covar_module.hyperparameter(name),
            rtol=2e-2,
            atol=0,
        )


# --------------------------------------------------------------------------
# fantasies


def test_empty_fantasies_keep_the_model_and_add_batch_axes():
    model = _model()
    fm = model.fantasize(
        torch.zeros(4, 0, 2, dtype=DT), SobolQMCNormalSampler(torch.Size([3]))
    )
    assert fm.batch_shape == (3, 4)
    Xs = _unit((2, 2), 16)
    p = fm.posterior(Xs)
    assert p.mean.shape == (3, 4, 2, 1)
    torch.testing.assert_close(p.mean[1, 2], model.posterior(Xs).mean)


def test_gradient_fantasies_condition_on_the_drawn_gradients():
    model = _model()
    Xf = _unit((2, 1, 2), 17)  # 2 candidate batches, q = 1
    fm = model.fantasize(
        Xf,
        SobolQMCNormalSampler(torch.Size([3])),
        observation_noise=torch.full((1, 1), 1e-10, dtype=DT),
        gradients=True,
    )
    assert fm.batch_shape == (3, 2)
    vals, grads = fm._extra
    assert vals.y.shape == (3, 2, 1) and grads.y.shape == (3, 2, 1, 2)
    # almost noise-free fantasies: the fantasy model's value and gradient at
    # the fantasy point are the drawn ones
    pg = fm.posterior_with_gradients(Xf)
    assert pg.mean.shape == (3, 2, 1, 3)
    torch.testing.assert_close(pg.mean[..., 0], vals.y, rtol=0, atol=1e-6)
    torch.testing.assert_close(pg.mean[..., 1:], grads.y, rtol=0, atol=1e-5)
    # and the draws follow the joint posterior: their spread is nonzero
    assert float(grads.y.std()) > 1e-3


def test_d_kg_differs_from_value_kg_and_optimizes():
    values_kg = qKnowledgeGradient(_model(), num_fantasies=4)
    d_kg = qKnowledgeGradient(_model(fantasize_gradients=True), num_fantasies=4)
    X = _unit((2, 5, 2), 18).requires_grad_(True)
    a, b = values_kg(X), d_kg(X)
    assert a.shape == b.shape == (2,)
    assert not torch.allclose(a, b)
    (g,) = torch.autograd.grad(b.sum(), X)
    assert bool(torch.isfinite(g).all()) and g.abs().sum() > 0


@pytest.mark.slow
def test_d_kg_optimizes():
    d_kg = qKnowledgeGradient(_model(fantasize_gradients=True), num_fantasies=4)
    cand, val = optimize_acqf(
        d_kg, bounds=UNIT, q=1, num_restarts=2, raw_samples=16, options={"maxiter": 5}
    )
    assert cand.shape == (1, 2) and bool(torch.isfinite(val))


# --------------------------------------------------------------------------
# acquisition functions with optimize_acqf, near-duplicate q-points


def _near_duplicate_model(seed, fit=False):
    X = _unit((5, 2), seed)
    X = torch.cat([X, X[:2] + 1e-9])  # near-duplicate training points
    Y, dY = _bowl(X)
    if fit:
        return GradientGP(X, Y, dY, fit_kwargs={"maxiter": 30})
    return GradientGP(X, Y, dY, kernel=_kern(), noise=1e-8, fit=False)


def _acqfs(model):
    X = model.train_X
    return {
        "qLogNEI": qLogNoisyExpectedImprovement(
            model, X_baseline=X, prune_baseline=True
        ),
        "qLogEI": qLogExpectedImprovement(model, best_f=model.train_Y.max()),
        "qUCB": qUpperConfidenceBound(model, beta=2.0),
        "qMES": qMaxValueEntropy(model, candidate_set=_unit((32, 2), 19)),
        "qNIPV": qNegIntegratedPosteriorVariance(model, mc_points=_unit((16, 2), 20)),
        "qKG": qKnowledgeGradient(model, num_fantasies=2),
    }


_WARN = [
    pytest.mark.filterwarnings("ignore::gpgrad.fit.FitWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def _duplicate_batches(name):
    x = _unit((1, 2), 21)
    if name == "qMES":  # one point at a time
        return [x]
    if name == "qKG":  # the candidate, then one point per fantasy
        return [torch.cat([x, x, x]), torch.cat([x, x + 1e-9, x])]
    return [torch.cat([x, x]), torch.cat([x, x + 1e-9])]


@pytest.mark.parametrize("name", ["qLogNEI", "qLogEI", "qUCB", "qMES", "qNIPV", "qKG"])
def test_acquisitions_on_duplicate_q_points(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _near_duplicate_model(0)
        acqf = _acqfs(model)[name]
        for Xq in _duplicate_batches(name):
            v = acqf(Xq[None])
            assert v.shape == (1,) and bool(torch.isfinite(v).all())


@pytest.mark.parametrize("name", ["qLogNEI", "qLogEI"])
def test_optimize_acqf_q2_near_duplicates(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acqf = _acqfs(_near_duplicate_model(1))[name]
        cand, val = optimize_acqf(
            acqf,
            bounds=UNIT,
            q=2,
            num_restarts=2,
            raw_samples=16,
            options={"maxiter": 5},
        )
    assert cand.shape == (2, 2) and bool(torch.isfinite(val))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qUCB", "qMES", "qNIPV", "qKG"])
def test_optimize_acqf_other_acquisitions(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acqf = _acqfs(_near_duplicate_model(2))[name]
        q = 1 if name == "qMES" else 2
        cand, val = optimize_acqf(
            acqf,
            bounds=UNIT,
            q=q,
            num_restarts=2,
            raw_samples=16,
            options={"maxiter": 5},
        )
    assert cand.shape == (q, 2) and bool(torch.isfinite(val))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::gpgrad.fit.FitWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("seed", range(10))
def test_pruned_qlognei_q2_on_ten_seeds(seed):
    model = _near_duplicate_model(100 + seed, fit=True)
    acqf = qLogNoisyExpectedImprovement(
        model, X_baseline=model.train_X, prune_baseline=True
    )
    cand, val = optimize_acqf(
        acqf, bounds=UNIT, q=2, num_restarts=2, raw_samples=32, options={"maxiter": 20}
    )
    assert cand.shape == (2, 2) and bool(torch.isfinite(val))


# --------------------------------------------------------------------------
# validation


def test_gradientgp_api_rejects_bad_input():
    X, Y, dY = _train(4, 23)
    with pytest.raises(ValueError, match="train_dYvar .* needs train_Yvar"):
        GradientGP(X, Y, dY, train_dYvar=torch.ones_like(dY), fit=False)
    with pytest.raises(ValueError, match="either train_Yvar .* or noise"):
        GradientGP(X, Y, dY, train_Yvar=torch.ones_like(Y), noise=1e-3, fit=False)
    with pytest.raises(ValueError, match="fantasize_gradients=True needs a model"):
        GradientGP(X, Y, fantasize_gradients=True, fit=False)
    with pytest.raises(
        ValueError, match=r"train_Yvar must have shape \(4, 1\).*got \(4,\)"
    ):
        GradientGP(X, Y, train_Yvar=torch.ones(4, dtype=DT), fit=False)
    with pytest.raises(TypeError, match="Warp has learnable parameters"):
        GradientGP(X, Y, dY, input_transform=Warp(2, indices=[0, 1]), fit=False)
    model = GradientGP(X, Y, fit=False)
    with pytest.raises(ValueError, match="gradient fantasies need a model trained"):
        model.fantasize(X[:1], SobolQMCNormalSampler(torch.Size([2])), gradients=True)
    with pytest.raises(TypeError, match="observation_noise must be a tensor or None"):
        model.fantasize(X[:1], SobolQMCNormalSampler(torch.Size([2])), True)
