"""The closed-form likelihood gradient of gpgrad.likelihood against autograd
through the Cholesky factorization and against central differences, for every
kernel and observation kind (ARD lengthscales); warm starts of fit."""

import numpy as np
import pytest
import torch

import gpgrad
from gpgrad import kernels as K
from gpgrad import likelihood
from gpgrad.fit import _evaluation_failed

D = 2
RNG = np.random.default_rng(11)
X = RNG.uniform(-1, 1, (5, D))
X[1] = X[0]  # coincident points: the guarded limits of the profiles
U = RNG.normal(size=(5, D))


def _symmetric(rng, shape):
    H = rng.normal(size=shape)
    return H + H.swapaxes(-1, -2)


#: observation kinds by the derivative order they need
KINDS = {
    "values": (0, lambda: gpgrad.values(X, RNG.normal(size=5))),
    "gradients": (1, lambda: gpgrad.gradients(X, RNG.normal(size=(5, D)))),
    "partials": (1, lambda: gpgrad.partials(X, [0, 1, 1, 0, 1], RNG.normal(size=5))),
    "directional": (1, lambda: gpgrad.directional(X, U, RNG.normal(size=5))),
    "second": (2, lambda: gpgrad.second_partials(X, 0, 1, RNG.normal(size=5))),
    "hessians": (2, lambda: gpgrad.hessians(X[:3], _symmetric(RNG, (3, D, D)))),
}

KERNELS = {
    "RBF": lambda: K.RBF(lengthscale=[0.7, 1.3], variance=1.5),
    "Matern12": lambda: K.Matern12(lengthscale=[0.7, 1.3]),
    "Matern32": lambda: K.Matern32(lengthscale=[0.7, 1.3], variance=0.8),
    "Matern52": lambda: K.Matern52(lengthscale=[0.7, 1.3], variance=1.2),
    "RationalQuadratic": lambda: K.RationalQuadratic(lengthscale=[0.9, 0.6], alpha=1.7),
    "Periodic": lambda: K.Periodic(lengthscale=[0.9, 1.1], period=1.7),
    "Linear": lambda: K.Linear(lengthscale=[0.9, 1.4], variance=0.7),
    "Polynomial": lambda: K.Polynomial(degree=3, lengthscale=1.1, offset=0.8),
    "Constant": lambda: K.Constant(variance=0.9) + K.RBF(lengthscale=0.8),
    "Sum": lambda: K.RBF(lengthscale=[0.7, 1.3]) + K.Matern52(lengthscale=0.9),
    "Product": lambda: K.RBF(lengthscale=[0.7, 1.3]) * K.Periodic(period=2.1),
    "Scale": lambda: 1.7 * K.Matern52(lengthscale=[0.8, 1.2]),
}


def _observations(kernel):
    """Values and every derivative kind the kernel's order allows."""
    obs = [gpgrad.values(X, np.sin(X[:, 0]))]
    for need, make in KINDS.values():
        if 0 < need <= kernel.order:
            obs.append(make())
    return obs


def _model(kernel, theta, kinds, method="cholesky", normalize_y=False):
    """A float64 torch GP with every hyperparameter ``exp`` of a slice of
    ``theta`` (the mean is ``theta[-1]`` itself)."""
    params, i = {}, 0
    for name, value in kernel.parameters().items():
        size = int(np.size(value))
        params[name] = torch.exp(theta[i : i + size]).reshape(np.shape(value))
        i += size
    noise = {k: torch.exp(theta[i + j]) for j, k in enumerate(kinds)}
    return gpgrad.GP(
        kernel.replace(**params),
        noise=noise,
        mean=theta[-1],
        backend="torch",
        method=method,
        normalize_y=normalize_y,
    )


def _theta0(kernel, kinds, seed=0):
    rng = np.random.default_rng(seed)
    vals = []
    for value in kernel.parameters().values():
        vals.extend(np.log(np.ravel(value)) + 0.1 * rng.normal(size=np.size(value)))
    vals.extend(np.log(0.05) + 0.3 * rng.normal(size=len(kinds)))
    vals.append(0.3)
    return torch.tensor(vals, dtype=torch.float64)


def _central_differences(kernel, obs, kinds, theta, h=1e-5):
    """∂ log p(y)/∂θ by central differences of the dense likelihood."""

    def lml(t):
        gp = _model(kernel, t, kinds)
        return float(likelihood.dense_log_marginal_likelihood(gp, gp._parse(obs)))

    return [
        (lml(theta + h * e) - lml(theta - h * e)) / (2 * h)
        for e in torch.eye(theta.numel(), dtype=torch.float64)
    ]


def _both(kernel, obs, theta, **kw):
    kinds = sorted({f.kind for f in obs}, key=gpgrad.gp._KINDS.index)
    out = []
    for fast in (True, False):
        t = theta.clone().requires_grad_(True)
        gp = _model(kernel, t, kinds, **kw)
        parsed = gp._parse(obs)
        if fast:
            lml = likelihood.dense_log_marginal_likelihood(gp, parsed)
        else:  # autograd through the Cholesky factorization of the posterior
            lml = gp.condition(*parsed).log_marginal_likelihood()
        (g,) = torch.autograd.grad(lml.sum(), t)
        out.append((lml.detach(), g))
    return out


@pytest.mark.parametrize("kname", list(KERNELS))
def test_closed_form_gradient_matches_autograd(kname):
    # every observation kind the kernel allows, in one system
    kernel = KERNELS[kname]()
    obs = _observations(kernel)
    kinds = sorted({f.kind for f in obs}, key=gpgrad.gp._KINDS.index)
    theta = _theta0(kernel, kinds)
    (lf, gf), (lr, gr) = _both(kernel, obs, theta)
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gf, gr, rtol=1e-7, atol=1e-8)
    assert gf.abs().max() > 1e-3  # the comparison has something to compare


@pytest.mark.parametrize(
    "kname",
    [
        "RBF",
        "Polynomial",
        pytest.param("Matern52", marks=pytest.mark.slow),
        pytest.param("Product", marks=pytest.mark.slow),
    ],
)
def test_closed_form_gradient_matches_central_differences(kname):
    kernel = KERNELS[kname]()
    obs = [gpgrad.values(X, np.cos(X[:, 1])), KINDS["hessians"][1]()]
    obs.append(KINDS["directional"][1]())
    kinds = sorted({f.kind for f in obs}, key=gpgrad.gp._KINDS.index)
    theta = _theta0(kernel, kinds, seed=1)
    (_, g), _ = _both(kernel, obs, theta)
    np.testing.assert_allclose(
        g.numpy(), _central_differences(kernel, obs, kinds, theta), rtol=1e-5, atol=1e-6
    )


def test_chunked_backward_and_batches_match_autograd(monkeypatch):
    # the backward pass that rebuilds the Gram matrix in several chunks, on a
    # batch of two problems with normalize_y
    monkeypatch.setattr(likelihood, "GRAPH_ELEMENTS", 0)
    monkeypatch.setattr(likelihood, "CHUNK_ELEMENTS", 40)
    Xb = torch.as_tensor(np.stack([X, X[::-1] * 0.7]))
    Yb = torch.as_tensor(RNG.normal(size=(2, 5)))
    Gb = torch.as_tensor(RNG.normal(size=(2, 5, D)))
    obs = [gpgrad.values(Xb, Yb), gpgrad.gradients(Xb, Gb)]
    kernel = KERNELS["Sum"]()
    theta = _theta0(kernel, ["value", "gradient"], seed=2)
    (lf, gf), (lr, gr) = _both(kernel, obs, theta, normalize_y=True)
    assert lf.shape == (2,)
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gf, gr, rtol=1e-7, atol=1e-8)


def test_gp_likelihood_uses_the_closed_form_only_with_gradients(monkeypatch):
    calls = []
    real = likelihood.dense_log_marginal_likelihood
    monkeypatch.setattr(
        likelihood,
        "dense_log_marginal_likelihood",
        lambda gp, obs: calls.append(1) or real(gp, obs),
    )
    gp = gpgrad.GP(K.RBF(lengthscale=0.8), noise=1e-2, backend="torch")
    y = np.sin(X[:, 0])
    with torch.no_grad():
        a = gp.log_marginal_likelihood(X, y)
    b = gp.log_marginal_likelihood(X, y)
    assert calls == [1]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dense_applies_follows_the_method():
    obs = [gpgrad.values(X, np.sin(X[:, 0]))]
    assert likelihood.dense_applies(gpgrad.GP(K.RBF(), backend="torch"), obs)
    assert likelihood.dense_applies(gpgrad.GP(K.RBF(), method="cholesky"), obs)
    assert not likelihood.dense_applies(gpgrad.GP(K.RBF(), method="cg"), obs)


def _data(n=30, seed=0):
    rng = np.random.default_rng(seed)
    Xd = rng.uniform(0, 4, (n, 2))
    y = np.sin(Xd[:, 0]) * np.cos(0.5 * Xd[:, 1]) + 0.01 * rng.normal(size=n)
    return Xd, y


def test_warm_start_reaches_the_optimum_from_one_start():
    Xd, y = _data()
    cold = gpgrad.fit(gpgrad.GP(K.RBF()), Xd, y, ard=True, restarts=1)
    assert cold.gradient == "autograd"
    Xn, yn = _data(n=32, seed=0)  # two more points: the next BO iteration
    ref = gpgrad.fit(gpgrad.GP(K.RBF()), Xn, yn, ard=True)  # three starts
    warm = gpgrad.fit(gpgrad.GP(K.RBF()), Xn, yn, ard=True, start=cold)
    assert len(ref.restarts) == 3 and len(warm.restarts) == 1
    assert warm.n_evaluations < ref.n_evaluations
    # the first evaluation is at the previous optimum, not the data-driven start
    seen = []
    gpgrad.fit(
        gpgrad.GP(K.RBF()),
        Xn,
        yn,
        ard=True,
        start=cold,
        progress=lambda s, e, lml: seen.append(lml),
    )
    gp = gpgrad.GP(
        K.RBF(lengthscale=cold.params["lengthscale"], variance=cold.params["variance"]),
        noise=cold.params["noise.value"],
        mean=cold.params["mean"],
    )
    assert seen[0] == pytest.approx(gp.log_marginal_likelihood(Xn, yn), rel=1e-9)
    assert warm.log_marginal_likelihood == pytest.approx(
        ref.log_marginal_likelihood, abs=1e-3
    )
    # a dict works too, and names it lacks keep the data-driven start
    again = gpgrad.fit(
        gpgrad.GP(K.RBF()), Xn, yn, ard=True, start={"lengthscale": [1.0, 2.0]}
    )
    assert again.log_marginal_likelihood == pytest.approx(
        ref.log_marginal_likelihood, abs=1e-3
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"start": 3.0}, TypeError, "start must be a FitResult or a dict"),
        ({"tol": -1.0}, ValueError, "tol must be positive and finite"),
        ({"tol": "small"}, TypeError, "tol must be a number"),
    ],
)
def test_bad_warm_start_and_tol(kwargs, exc, match):
    Xd, y = _data(n=8)
    with pytest.raises(exc, match=match):
        gpgrad.fit(gpgrad.GP(K.RBF()), Xd, y, **kwargs)


def test_memory_errors_propagate_instead_of_counting_as_bad_parameters(monkeypatch):
    assert _evaluation_failed(gpgrad.NotPositiveDefiniteError("x"))
    assert _evaluation_failed(RuntimeError("cholesky: the leading minor ..."))
    assert not _evaluation_failed(MemoryError())
    with pytest.raises(MemoryError, match="out of memory"):
        _evaluation_failed(RuntimeError("CUDA out of memory."))

    def boom(gp, *obs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(gpgrad.GP, "log_marginal_likelihood", boom)
    Xd, y = _data(n=8)
    with pytest.raises(MemoryError, match="can't allocate memory"):
        gpgrad.fit(gpgrad.GP(K.RBF()), Xd, y, restarts=1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::gpgrad.fit.FitWarning")  # noise-free data
def test_batched_starts_match_sequential_starts():
    Xd, y = _data(n=12, seed=4)
    gp = gpgrad.GP(K.Matern52(), backend="torch")
    seq = gpgrad.fit(gp, Xd, y, ard=True, restarts=2)
    bat = gpgrad.fit(gp, Xd, y, ard=True, restarts=2, batch_starts=True)
    assert len(bat.restarts) == 2
    assert bat.params["lengthscale"].shape == (2,)
    # each start is its own search, as when run alone
    np.testing.assert_allclose(bat.restarts, seq.restarts, atol=1e-4)
    assert float(bat.log_marginal_likelihood) == pytest.approx(
        float(seq.log_marginal_likelihood), abs=1e-4
    )
    assert float(bat.log_marginal_likelihood) == pytest.approx(max(bat.restarts))
    with pytest.raises(ValueError, match="batch_starts=True needs GP"):
        gpgrad.fit(gpgrad.GP(K.RBF()), Xd, y, restarts=2, batch_starts=True)


@pytest.mark.parametrize("kname", ["RBF", "Sum"])
def test_fit_objective_matches_autograd_through_the_posterior(kname):
    # the fit's objective (tensors converted once) against autograd through
    # condition(), every observation kind
    from gpgrad import fit as fit_module

    kernel = KERNELS[kname]()
    gp = gpgrad.GP(kernel)
    obs = gp._parse(_observations(kernel))
    specs, fixed = fit_module._specs(gp, obs, (), None, None, True, True)
    objective = fit_module._Objective(gp, obs, specs, fixed, (), "autograd", False)
    theta = objective.space.start() + 0.1 * np.random.default_rng(3).normal(
        size=objective.space.lo.shape
    )
    f, g = objective(theta)

    t = torch.tensor(theta, requires_grad=True)
    model = objective.space.model(gp, t, "torch", torch.float64, None)
    lml = model.condition(*obs).log_marginal_likelihood()
    (g_ref,) = torch.autograd.grad(-lml / objective.n_obs, t)
    assert f == pytest.approx(-float(lml.detach()) / objective.n_obs, rel=1e-10)
    np.testing.assert_allclose(g, g_ref.numpy(), rtol=1e-7, atol=1e-10)


def _radial_observations():
    """Values at X (with a coincident pair) and gradients at X and at other
    points: every block pair of the closed form, two point sets."""
    X2 = RNG.uniform(-1, 1, (3, D))
    return [
        gpgrad.values(X, np.sin(X[:, 0])),
        gpgrad.gradients(X, RNG.normal(size=(5, D))),
        gpgrad.gradients(X2, RNG.normal(size=(3, D))),
    ]


@pytest.mark.parametrize(
    "kernel",
    [K.RBF(lengthscale=[0.7, 1.3], variance=1.5), K.RBF(lengthscale=0.8)],
    ids=["ARD", "scalar"],
)
@pytest.mark.parametrize("chunk", [None, 7])
def test_radial_closed_form_matches_autograd(kernel, chunk, monkeypatch):
    # ∂K/∂θ of values and gradients in closed form from the profile, against
    # autograd through the Cholesky factorization (chunk: several row chunks)
    if chunk is not None:
        monkeypatch.setattr(likelihood, "CHUNK_ELEMENTS", chunk)
    calls = []
    real = likelihood._radial_vjp
    monkeypatch.setattr(
        likelihood, "_radial_vjp", lambda *a: calls.append(1) or real(*a)
    )
    obs = _radial_observations()
    theta = _theta0(kernel, ["value", "gradient"], seed=4)
    (lf, gf), (lr, gr) = _both(kernel, obs, theta)
    assert calls, "the closed form was not used"
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gf, gr, rtol=1e-7, atol=1e-8)
    assert gf[:-3].abs().min() > 1e-4  # every kernel gradient is compared


def test_radial_closed_form_matches_central_differences():
    kernel = K.RBF(lengthscale=[0.9, 0.6], variance=0.8)
    obs = _radial_observations()
    kinds = ["value", "gradient"]
    theta = _theta0(kernel, kinds, seed=5)
    (_, g), _ = _both(kernel, obs, theta)
    np.testing.assert_allclose(
        g.numpy(), _central_differences(kernel, obs, kinds, theta), rtol=1e-5, atol=1e-6
    )


def test_radial_closed_form_applies_only_where_it_is_exact():
    gp = gpgrad.GP(K.RBF(lengthscale=[0.7, 1.3]), backend="torch")
    blocks = gp._prepare(gp._parse(_radial_observations()))[0]
    assert likelihood._radial_applies(gp.kernel, blocks)
    # other kernels, other observation kinds and batches take the generic path
    assert not likelihood._radial_applies(K.Matern52(), blocks)
    assert not likelihood._radial_applies(K.RationalQuadratic(), blocks)
    assert not likelihood._radial_applies(2.0 * K.RBF(), blocks)
    hess = gp._prepare(gp._parse([KINDS["hessians"][1]()]))[0]
    assert not likelihood._radial_applies(gp.kernel, hess)
    batched = gp._prepare(gp._parse([gpgrad.values(np.stack([X, X]), np.ones((2, 5)))]))
    assert not likelihood._radial_applies(gp.kernel, batched[0])
