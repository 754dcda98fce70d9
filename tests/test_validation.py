"""Bad input at every public entry meets a ValueError or TypeError that says
what was expected and what arrived (never an IndexError, a LinAlgError or a
NaN result from deep inside)."""

import numpy as np
import pytest
import torch

import gpgrad
from gpgrad import kernels as K

RNG = np.random.default_rng(0)
X = RNG.uniform(size=(5, 2))
Y = np.sin(X[:, 0])
NAN_X = np.array([[np.nan, 0.0], [0.0, 1.0]])


def _post():
    return gpgrad.GP(K.RBF(lengthscale=[0.5, 0.6]), noise=1e-4).condition(X, Y)


def _tpost():
    return gpgrad.GP(K.RBF(lengthscale=0.5), noise=1e-4, backend="torch").condition(
        torch.tensor(X), torch.tensor(Y)
    )


# (id, callable, exception, message pattern)
CASES = [
    # -- ranks and shapes -------------------------------------------------
    (
        "X-scalar",
        lambda: gpgrad.values(1.0, 1.0),
        ValueError,
        r"X must have shape \(n, d\), got a scalar",
    ),
    (
        "X-no-points",
        lambda: gpgrad.values(np.zeros((0, 2)), np.zeros(0)),
        ValueError,
        r"X has no points \(shape \(0, 2\)\)",
    ),
    (
        "X-no-columns",
        lambda: gpgrad.values(np.zeros((3, 0)), np.zeros(3)),
        ValueError,
        r"X has zero columns \(shape \(3, 0\)\)",
    ),
    (
        "X-string",
        lambda: gpgrad.values("abc", [1.0]),
        TypeError,
        "X must be an array of numbers, got a string",
    ),
    (
        "X-ragged",
        lambda: gpgrad.values([[0.0, 1.0], [1.0]], [1.0, 2.0]),
        TypeError,
        "X must be an array of numbers, got list",
    ),
    (
        "X-complex",
        lambda: gpgrad.values(np.array([[1j]]), [1.0]),
        TypeError,
        "X must be real, got complex values",
    ),
    (
        "X-complex-tensor",
        lambda: gpgrad.values(torch.ones(2, 1, dtype=torch.complex64), [1.0, 2.0]),
        TypeError,
        "X must be real, got a complex tensor",
    ),
    (
        "value-targets-rank",
        lambda: gpgrad.values(X, Y[:, None]),
        ValueError,
        r"value targets must have shape \(5,\) for X of shape \(5, 2\), got \(5, 1\)",
    ),
    (
        "value-targets-length",
        lambda: gpgrad.GP(K.RBF()).condition(X, Y[:3]),
        ValueError,
        r"value targets must have shape \(5,\) for X of shape \(5, 2\), got \(3,\)",
    ),
    (
        "gradient-targets-columns",
        lambda: gpgrad.gradients(X, np.ones((5, 3))),
        ValueError,
        r"gradient targets must have shape \(5, 2\) for X of shape \(5, 2\), got \(5, 3\)",
    ),
    (
        "hessian-targets-rank",
        lambda: gpgrad.hessians(X, np.ones((5, 2))),
        ValueError,
        r"hessian targets must have shape \(5, 2, 2\) .* got \(5, 2\)",
    ),
    (
        "hessian-targets-asymmetric",
        lambda: gpgrad.hessians(X[:1], np.array([[[1.0, 2.0], [0.0, 1.0]]])),
        ValueError,
        r"hessian targets must be symmetric.*differ by up to 2",
    ),
    (
        "directions-columns",
        lambda: _post().directional(X, np.ones((5, 3))),
        ValueError,
        r"directions U must have shape \(5, 2\) or \(2,\) for X of shape \(5, 2\), "
        r"got \(5, 3\)",
    ),
    (
        "directions-rank",
        lambda: gpgrad.directional(X, np.ones((5, 2, 1)), Y),
        ValueError,
        r"directions U must have shape .* got \(5, 2, 1\)",
    ),
    (
        "directions-count",
        lambda: gpgrad.directional(X, np.ones((3, 2)), Y),
        ValueError,
        r"directions U must have shape \(5, 2\) or \(2,\) .* got \(3, 2\)",
    ),
    (
        "noise-shape",
        lambda: gpgrad.values(X, Y, noise=np.ones(3)),
        ValueError,
        r"value noise of shape \(3,\) does not broadcast to the targets' shape \(5,\)",
    ),
    (
        "batch-mismatch",
        lambda: gpgrad.GP(K.RBF(), backend="torch").condition(
            gpgrad.values(torch.rand(2, 3, 1), torch.zeros(2, 3)),
            gpgrad.values(torch.rand(3, 3, 1), torch.zeros(3, 3)),
        ),
        ValueError,
        r"batch dimensions do not broadcast: value observations have batch shape "
        r"\(3,\), the others \(2,\)",
    ),
    (
        "batch-kernel-mismatch",
        lambda: gpgrad.GP(
            K.RBF(lengthscale=torch.ones(4, 1)), backend="torch"
        ).condition(torch.rand(3, 5, 1), torch.zeros(3, 5)),
        ValueError,
        r"batch dimensions do not broadcast: value observations have batch shape "
        r"\(3,\), the others \(4,\)",
    ),
    (
        "sample-count",
        lambda: _post().sample(X, n_samples=0),
        ValueError,
        "n_samples must be a positive integer, got 0",
    ),
    # -- mismatched dimensions ------------------------------------------------
    (
        "lengthscale-vs-X",
        lambda: gpgrad.GP(K.RBF(lengthscale=[1.0, 1.0, 1.0])).condition(X, Y),
        ValueError,
        "X has 2 columns but the kernel's lengthscale has 3 entries",
    ),
    (
        "lengthscale-in-sum",
        lambda: gpgrad.GP(
            K.RBF(lengthscale=[1.0, 1.0]) + K.Matern52(lengthscale=[1, 1, 1])
        ).condition(X, Y),
        ValueError,
        "X has 2 columns but the kernel's 1.lengthscale has 3 entries",
    ),
    (
        "lengthscale-kernel-call",
        lambda: K.RBF(lengthscale=[1.0, 1.0])(np.zeros((2, 3))),
        ValueError,
        "X has 3 columns but the kernel's lengthscale has 2 entries",
    ),
    (
        "query-columns",
        lambda: _post().gradient(np.zeros((3, 3))),
        ValueError,
        "query points have 3 columns but the observations have 2",
    ),
    (
        "observation-columns",
        lambda: gpgrad.GP(K.RBF()).condition(
            gpgrad.values(X, Y), gpgrad.gradients(X[:, :1], np.ones((5, 1)))
        ),
        ValueError,
        "all observations must have the same input dimension: got 2 and 1",
    ),
    # -- NaN and infinity ---------------------------------------------------
    (
        "X-nan",
        lambda: gpgrad.values(NAN_X, [1.0, 2.0]),
        ValueError,
        "X contains NaN or infinite values",
    ),
    (
        "X-nan-tensor",
        lambda: gpgrad.gradients(torch.tensor(NAN_X)),
        ValueError,
        "X contains NaN or infinite values",
    ),
    (
        "query-inf",
        lambda: _post().value(np.array([[np.inf, 0.0]])),
        ValueError,
        "X contains NaN or infinite values",
    ),
    (
        "targets-inf",
        lambda: gpgrad.values(X, np.full(5, np.inf)),
        ValueError,
        "value targets contains NaN or infinite values",
    ),
    (
        "gradient-targets-nan",
        lambda: gpgrad.gradients(X, np.full((5, 2), np.nan)),
        ValueError,
        "gradient targets contains NaN or infinite values",
    ),
    (
        "directions-nan",
        lambda: _post().directional(X, np.full(2, np.nan)),
        ValueError,
        "directions U contains NaN or infinite values",
    ),
    (
        "noise-nan",
        lambda: gpgrad.GP(K.RBF(), noise=float("nan")),
        ValueError,
        "noise must be a finite, non-negative variance, got nan",
    ),
    (
        "observation-noise-inf",
        lambda: gpgrad.values(X, Y, noise=np.inf),
        ValueError,
        "value noise must be finite, got inf",
    ),
    (
        "lengthscale-nan",
        lambda: K.RBF(lengthscale=float("nan")),
        ValueError,
        "RBF lengthscale must be positive and finite, got nan",
    ),
    # -- negative noise and hyperparameters --------------------------------------
    (
        "noise-negative",
        lambda: gpgrad.GP(K.RBF(), noise=-1),
        ValueError,
        "noise must be a finite, non-negative variance, got -1.0",
    ),
    (
        "noise-dict-negative",
        lambda: gpgrad.GP(K.RBF(), noise={"gradient": -1e-3}),
        ValueError,
        r"noise\['gradient'\] must be a finite, non-negative variance",
    ),
    (
        "noise-tensor-negative",
        lambda: gpgrad.GP(K.RBF(), backend="torch", noise=torch.tensor(-1.0)),
        ValueError,
        "noise must be a finite, non-negative variance",
    ),
    (
        "observation-noise-negative",
        lambda: gpgrad.gradients(X, np.ones((5, 2)), noise=-np.ones((5, 2))),
        ValueError,
        "gradient noise is a variance and must be non-negative",
    ),
    (
        "lengthscale-negative",
        lambda: K.Matern52(lengthscale=[1.0, -1.0]),
        ValueError,
        r"Matern52 lengthscale must be positive and finite, got \[1.0, -1.0\]",
    ),
    (
        "lengthscale-zero-tensor",
        lambda: K.RBF(lengthscale=torch.tensor([0.0])),
        ValueError,
        "RBF lengthscale must be positive and finite",
    ),
    (
        "lengthscale-replace",
        lambda: K.RBF().replace(lengthscale=-2),
        ValueError,
        "RBF lengthscale must be positive and finite, got -2.0",
    ),
    (
        "variance-zero",
        lambda: K.RBF(variance=0),
        ValueError,
        "RBF variance must be positive and finite, got 0.0",
    ),
    (
        "alpha-negative",
        lambda: K.RationalQuadratic(alpha=-1),
        ValueError,
        "RationalQuadratic alpha must be positive and finite, got -1.0",
    ),
    (
        "period-zero",
        lambda: K.Periodic(period=0),
        ValueError,
        "Periodic period must be positive and finite, got 0.0",
    ),
    (
        "offset-negative",
        lambda: K.Polynomial(offset=-1),
        ValueError,
        "Polynomial offset must be finite and non-negative, got -1.0",
    ),
    (
        "degree-zero",
        lambda: K.Polynomial(degree=0),
        ValueError,
        "Polynomial degree must be at least 1, got 0",
    ),
    (
        "degree-float",
        lambda: K.Polynomial(degree=1.5),
        TypeError,
        "Polynomial degree must be a positive integer, got 1.5",
    ),
    (
        "scale-negative",
        lambda: -1.0 * K.RBF(),
        ValueError,
        "Scale scale must be positive and finite, got -1.0",
    ),
    (
        "lengthscale-empty",
        lambda: K.RBF(lengthscale=[]),
        ValueError,
        "RBF lengthscale must not be empty",
    ),
    (
        "lengthscale-string",
        lambda: K.RBF(lengthscale="a"),
        TypeError,
        "RBF lengthscale must be a positive number or array, got str",
    ),
    # -- derivative indices out of range ------------------------------------
    (
        "partial-dims-high",
        lambda: gpgrad.partials(X, 2, Y),
        ValueError,
        r"partials dims has index 2 but the inputs have 2 dimensions \(valid: 0..1\)",
    ),
    (
        "partial-query-dims",
        lambda: _post().partial(X, 5),
        ValueError,
        r"partials dims has index 5 but the inputs have 2 dimensions",
    ),
    (
        "second-j-negative",
        lambda: gpgrad.second_partials(X, 0, -1, Y),
        ValueError,
        r"second_partials j has index -1 but the inputs have 2 dimensions",
    ),
    (
        "second-query-i",
        lambda: _post().second_partial(X, np.array([0, 1, 2, 0, 0]), 0),
        ValueError,
        r"second_partials i has index 2 but the inputs have 2 dimensions",
    ),
    (
        "dims-float",
        lambda: gpgrad.partials(X, 0.5, Y),
        TypeError,
        r"partials dims must be integers, got 0.5",
    ),
    (
        "dims-shape",
        lambda: gpgrad.partials(X, [0, 1], Y),
        ValueError,
        r"partials dims must be an int or have shape \(5,\), got \(2,\)",
    ),
    # -- order beyond the kernel's differentiability --------------------------
    (
        "matern12-gradients",
        lambda: gpgrad.GP(K.Matern12()).condition(gpgrad.gradients(X, X)),
        ValueError,
        r"Matern12\(.*\) is never mean-square differentiable, but gradient "
        "observations needs derivatives of order 1",
    ),
    (
        "matern12-directional-query",
        lambda: gpgrad.GP(K.Matern12()).condition(X, Y).directional(X, [1, 0]),
        ValueError,
        r"never mean-square differentiable, but a directional query needs "
        "derivatives of order 1",
    ),
    (
        "matern32-hessian-query",
        lambda: gpgrad.GP(K.Matern32()).condition(X, Y).hessian(X),
        ValueError,
        r"Matern32\(.*\) is once mean-square differentiable, but a hessian query "
        "needs derivatives of order 2.*use a smoother kernel",
    ),
    (
        "matern32-second-observations",
        lambda: gpgrad.GP(K.Matern32()).condition(gpgrad.second_partials(X, 0, 0, Y)),
        ValueError,
        "once mean-square differentiable, but second observations needs",
    ),
    (
        "product-order",
        lambda: gpgrad.GP(K.Matern52() * K.Matern12()).condition(
            gpgrad.gradients(X, X)
        ),
        ValueError,
        r"Product\(.*\) is never mean-square differentiable",
    ),
    # -- empty observation sets and misuse ----------------------------------
    (
        "no-observations",
        lambda: gpgrad.GP(K.RBF()).condition(),
        ValueError,
        r"no observations given: pass gpgrad.values\(X, y\)",
    ),
    (
        "lml-no-observations",
        lambda: gpgrad.GP(K.RBF()).log_marginal_likelihood(),
        ValueError,
        "no observations given",
    ),
    (
        "no-queries",
        lambda: _post().predict(),
        ValueError,
        r"no queries given: pass gpgrad.values\(Xs\)",
    ),
    (
        "observation-without-targets",
        lambda: gpgrad.GP(K.RBF()).condition(gpgrad.values(X)),
        ValueError,
        "value observations have no targets",
    ),
    (
        "three-arrays",
        lambda: gpgrad.GP(K.RBF()).condition(X, Y, Y),
        TypeError,
        r"observations must be gpgrad functionals .* got ndarray",
    ),
    (
        "query-not-functional",
        lambda: _post().predict(X),
        TypeError,
        "queries must be gpgrad functionals .* got ndarray",
    ),
    # -- GP construction --------------------------------------------------------
    (
        "kernel-not-kernel",
        lambda: gpgrad.GP("rbf"),
        TypeError,
        r"GP expects a gpgrad kernel \(e.g. gpgrad.kernels.RBF\(\)\), got str",
    ),
    (
        "backend-unknown",
        lambda: gpgrad.GP(K.RBF(), backend="jax"),
        ValueError,
        "backend must be 'numpy' or 'torch', got 'jax'",
    ),
    (
        "dtype-float16",
        lambda: gpgrad.GP(K.RBF(), dtype=np.float16),
        TypeError,
        "dtype must be float64 or float32",
    ),
    (
        "torch-dtype-float16",
        lambda: gpgrad.GP(K.RBF(), backend="torch", dtype=torch.float16),
        TypeError,
        "dtype must be torch.float64 or torch.float32, got torch.float16",
    ),
    (
        "noise-bool",
        lambda: gpgrad.GP(K.RBF(), noise=True),
        TypeError,
        "noise must be a number \\(a variance\\), got bool",
    ),
    (
        "noise-dict-key",
        lambda: gpgrad.GP(K.RBF(), noise={"grad": 1.0}),
        ValueError,
        r"noise keys must be observation kinds .* got \['grad'\]",
    ),
    (
        "observation-noise-string",
        lambda: gpgrad.values(X, Y, noise="a"),
        TypeError,
        "value noise must be a number or an array, got str",
    ),
    (
        "mean-string",
        lambda: gpgrad.GP(K.RBF(), mean="0"),
        TypeError,
        "mean must be a constant number, got str",
    ),
    (
        "normalize-string",
        lambda: gpgrad.GP(K.RBF(), normalize_y="no"),
        TypeError,
        "normalize_y must be True or False, got 'no'",
    ),
    (
        "method-unknown",
        lambda: gpgrad.GP(K.RBF(), method="magic"),
        ValueError,
        r"method must be one of \(.*\), got 'magic'",
    ),
    (
        "sum-one-kernel",
        lambda: K.Sum(K.RBF()),
        TypeError,
        "Sum takes two or more gpgrad kernels",
    ),
    (
        "replace-unknown",
        lambda: K.RBF().replace(foo=1),
        ValueError,
        r"RBF has no hyperparameter 'foo'; it has \['variance', 'lengthscale'\]",
    ),
    # -- mixing backends and devices ------------------------------------------
    (
        "tensors-to-numpy-gp",
        lambda: gpgrad.GP(K.RBF()).condition(torch.tensor(X), torch.tensor(Y)),
        TypeError,
        "got torch tensors but the GP uses backend='numpy'; use "
        r"GP\(..., backend='torch'\)",
    ),
    (
        "tensor-query-to-numpy-posterior",
        lambda: _post().value(torch.tensor(X)),
        TypeError,
        "got torch tensors but the GP uses backend='numpy'",
    ),
    (
        "tensor-hyperparameter-numpy-gp",
        lambda: gpgrad.GP(K.RBF(lengthscale=torch.tensor(0.5))).condition(X, Y),
        TypeError,
        "expected a numpy array for the numpy backend, got a torch tensor",
    ),
    (
        "numpy-gp-on-gpu",
        lambda: gpgrad.GP(K.RBF(), device="cuda"),
        ValueError,
        r"the numpy backend runs on the CPU; got device='cuda' \(use backend='torch'",
    ),
    (
        # a GP placed on another device than its inputs (the meta device stands
        # in for an accelerator on machines without one)
        "device-mismatch",
        lambda: gpgrad.GP(K.RBF(), backend="torch", device="meta").condition(
            torch.tensor(X), torch.tensor(Y)
        ),
        ValueError,
        r"inputs are on device cpu but the GP is on meta; move them with "
        r"\.to\('meta'\)",
    ),
]


@pytest.mark.parametrize(
    "make,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_with_a_clear_message(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_query_on_another_device_is_refused():
    with pytest.raises(
        ValueError, match="inputs are on device cuda:0 but the GP is on cpu"
    ):
        _tpost().value(torch.zeros(2, 2, device="cuda"))


def test_numpy_inputs_are_accepted_by_the_torch_backend():
    # the converse of the backend-mixing errors: numpy data is converted
    post = _tpost()
    got = post.value(X).mean
    assert torch.is_tensor(got)
    np.testing.assert_allclose(got.numpy(), Y, atol=1e-3)


def test_duplicated_points_with_zero_noise_warn_instead_of_failing():
    # identical points, different targets, no noise: the jitter policy must
    # make it finite and say so, never return NaN or raise a LinAlgError
    Xd = np.zeros((3, 1))
    with pytest.warns(gpgrad.JitterWarning, match="identical points observed twice"):
        post = gpgrad.GP(K.RBF(), noise=0.0).condition(Xd, np.array([0.0, 1.0, 2.0]))
    m = post.value(np.array([[0.0], [0.5]])).mean
    assert np.all(np.isfinite(m))
    # the least-squares compromise of the three targets is their mean
    np.testing.assert_allclose(m[0], 1.0, atol=1e-6)
