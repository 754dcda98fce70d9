"""Large-problem solvers against the dense Cholesky posterior.

The matrix-free Gram product is checked entry by entry against the closed-form
covariance matrices (themselves checked against autodiff in test_kernels.py);
the iterative and Woodbury solvers against the dense Cholesky posterior, in
numpy and torch, batched, and through autograd; the memory guard by its
message.
"""

import numpy as np
import pytest
import torch

import gpgrad
from gpgrad import kernels as K
from gpgrad.covariance import as_blocks, covariance
from gpgrad.solvers import select
from gpgrad.solvers.iterative import CG, ConvergenceWarning
from gpgrad.solvers.matfree import GramOperator, posterior_mean
from gpgrad.solvers.woodbury import WoodburySolver

NP = gpgrad.GP(K.RBF()).xp


def _rel(a, b):
    a = a.detach().numpy() if torch.is_tensor(a) else np.asarray(a)
    b = b.detach().numpy() if torch.is_tensor(b) else np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _rel_norm(a, b):
    a = a.detach().numpy() if torch.is_tensor(a) else np.asarray(a)
    b = b.detach().numpy() if torch.is_tensor(b) else np.asarray(b)
    return float(np.linalg.norm(a) / np.linalg.norm(b))


def _f(X):
    return np.sin(X).sum(-1)


def _g(X):
    return np.cos(X)


KERNELS = [
    ("rbf_ard", K.RBF(lengthscale=[0.5, 0.7, 0.9], variance=1.3)),
    ("matern52", K.Matern52(lengthscale=0.8)),
    ("matern32", K.Matern32(lengthscale=0.8, variance=0.7)),
    ("rq", K.RationalQuadratic(lengthscale=0.6, alpha=2.0)),
    ("linear", K.Linear(lengthscale=[1.0, 2.0, 0.5])),
    ("poly", K.Polynomial(degree=3, lengthscale=1.5)),
]


@pytest.mark.parametrize("name,kernel", KERNELS, ids=[k[0] for k in KERNELS])
def test_matfree_product_matches_dense_covariance(name, kernel):
    rng = np.random.default_rng(0)
    d = 3
    X = rng.uniform(-1, 1, (6, d))
    X2 = rng.uniform(-1, 1, (4, d))
    Xq = np.vstack([rng.uniform(-1, 1, (2, d)), X[:1]])  # includes a training point
    obs = [
        gpgrad.values(X),
        gpgrad.gradients(X),
        gpgrad.partials(X2, [0, 2, 1, 1]),
        gpgrad.directional(X2, rng.normal(size=(4, d))),
        gpgrad.values(X2[:2]),
    ]
    bl = as_blocks(obs, NP, np.float64, None)
    noise = rng.uniform(0.1, 0.2, sum(b.size for b in bl))
    Kd = covariance(kernel, bl) + np.diag(noise)
    op = GramOperator(kernel, bl, noise)
    V = rng.normal(size=(Kd.shape[0], 3))
    assert _rel(op.matmul(V), Kd @ V) < 1e-13
    assert _rel(op.diagonal(), np.diag(Kd)) < 1e-14
    qobs = [
        gpgrad.gradients(Xq),
        gpgrad.values(Xq),
        gpgrad.directional(X[:2], rng.normal(size=(2, d))),
    ]
    qb = as_blocks(qobs, NP, np.float64, None)
    Ks = covariance(kernel, qb, bl)
    assert _rel(op.cross_matmul(qb, V), Ks @ V) < 1e-13


def test_matfree_product_batched_torch_matches_looped():
    rng = np.random.default_rng(1)
    X = torch.tensor(rng.uniform(-1, 1, (2, 5, 3)))
    ls = torch.tensor([[0.5, 0.8, 1.0], [0.9, 0.6, 1.2]])
    kernel = K.Matern52(lengthscale=ls)
    gp = gpgrad.GP(kernel, backend="torch")
    bl = as_blocks([gpgrad.values(X), gpgrad.gradients(X)], gp.xp, torch.float64, None)
    op = GramOperator(kernel, bl, None)
    V = torch.tensor(rng.normal(size=(2, 20, 2)))
    got = op.matmul(V)
    for i in range(2):
        ki = K.Matern52(lengthscale=ls[i])
        bi = as_blocks(
            [gpgrad.values(X[i]), gpgrad.gradients(X[i])], gp.xp, torch.float64, None
        )
        assert _rel(got[i], covariance(ki, bi) @ V[i]) < 1e-13


def _problem(N=25, d=3, seed=0, batch=()):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, batch + (N, d))
    Xs = rng.uniform(-1, 1, batch + (4, d))
    return X, Xs


CG_CASES = [
    ("numpy", "cg"),
    ("numpy", CG(tol=1e-12, preconditioner="jacobi")),
    ("numpy", CG(tol=1e-12, preconditioner="pivchol", rank=15)),
    ("numpy", CG(tol=1e-12, preconditioner=None)),
    ("numpy", CG(tol=1e-12, preconditioner="kronecker")),
    ("torch", CG(tol=1e-12, preconditioner="pivchol", rank=60)),
    ("torch", CG(tol=1e-12, preconditioner="kronecker")),
]


@pytest.mark.parametrize(
    "backend,method",
    CG_CASES,
    ids=[
        "default",
        "jacobi",
        "pivchol",
        "none",
        "kronecker",
        "torch-pivchol",
        "torch-kronecker",
    ],
)
def test_cg_posterior_matches_dense(backend, method):
    # torch runs fewer, smaller cases: many small multi-threaded products are
    # slow on a busy machine, and the code path is the same
    X, Xs = _problem(N=25 if backend == "numpy" else 12)
    kernel = K.Matern52(lengthscale=[0.7, 0.9, 1.1])
    obs = [gpgrad.values(X, _f(X)), gpgrad.gradients(X, _g(X))]
    ref = gpgrad.GP(kernel, noise=1e-4, backend=backend, method="cholesky")
    post = gpgrad.GP(kernel, noise=1e-4, backend=backend, method=method)
    ref, post = ref.condition(*obs), post.condition(*obs)
    assert post.method == "cg" and ref.method == "cholesky"
    tol = 1e-6 if method == "cg" else 1e-9
    g, gr = post.gradient(Xs), ref.gradient(Xs)
    assert _rel(g.mean, gr.mean) < tol
    assert _rel(g.var, gr.var) < tol
    assert _rel(g.cov, gr.cov) < tol
    v, vr = post.value(Xs, full_cov=True), ref.value(Xs, full_cov=True)
    assert _rel(v.mean, vr.mean) < tol
    assert _rel(v.cov, vr.cov) < tol
    assert _rel(posterior_mean(post, gpgrad.gradients(Xs)), gr.mean.reshape(-1)) < tol


def test_cg_values_at_some_points_gradients_at_others_batched():
    X, Xs = _problem(N=12, batch=(2,))
    Xg = X[..., :7, :] + 0.05
    kernel = K.RBF(lengthscale=0.8)
    obs = [gpgrad.values(X, _f(X)), gpgrad.gradients(Xg, _g(Xg))]
    ref = gpgrad.GP(kernel, noise=1e-3, method="cholesky").condition(*obs)
    post = gpgrad.GP(kernel, noise=1e-3, method=CG(tol=1e-12)).condition(*obs)
    assert _rel(post.gradient(Xs).mean, ref.gradient(Xs).mean) < 1e-9
    assert _rel(post.value(Xs).var, ref.value(Xs).var) < 1e-9


def test_cg_is_differentiable_in_torch():
    X, Xs = _problem(N=6, d=2)
    Xt, Xst = torch.tensor(X), torch.tensor(Xs)
    obs = [gpgrad.values(Xt, _f(X)), gpgrad.gradients(Xt, _g(X))]
    grads = {}
    for method in ["cholesky", CG(tol=1e-12, probes=500)]:
        ls = torch.tensor([0.7, 0.9], dtype=torch.float64, requires_grad=True)
        gp = gpgrad.GP(
            K.RBF(lengthscale=ls), noise=1e-3, backend="torch", method=method
        )
        post = gp.condition(*obs)
        mean = post.gradient(Xst).mean.sum()
        lml = post.log_marginal_likelihood()
        grads[str(method)] = [
            torch.autograd.grad(out, ls, retain_graph=True)[0] for out in (mean, lml)
        ]
    (gm_dense, gl_dense), (gm_cg, gl_cg) = grads.values()
    # implicit differentiation of the solve: exact to the tolerance
    assert _rel(gm_cg, gm_dense) < 1e-7
    # the log-determinant's gradient is a Hutchinson estimate: unbiased, with a
    # standard error of ~10% at 500 probes (3% at 3000); the probes are seeded
    assert _rel(gl_cg, gl_dense) < 0.2


def test_slq_log_marginal_likelihood():
    X, _ = _problem(N=12)
    kernel = K.Matern52(lengthscale=0.9)
    obs = [gpgrad.values(X, _f(X)), gpgrad.gradients(X, _g(X))]
    ref = gpgrad.GP(kernel, noise=1e-3, method="cholesky").condition(*obs)
    want = float(ref.log_marginal_likelihood())
    # exact preconditioner: the estimator is exact
    exact = gpgrad.GP(
        kernel, noise=1e-3, method=CG(tol=1e-12, preconditioner="pivchol", rank=48)
    )
    assert abs(float(exact.condition(*obs).log_marginal_likelihood()) - want) < 1e-6
    # Jacobi: unbiased up to quadrature; 400 probes give a standard error ≲ 1
    est = gpgrad.GP(
        kernel,
        noise=1e-3,
        method=CG(tol=1e-12, preconditioner="jacobi", probes=400, lanczos_steps=48),
    )
    got = float(est.condition(*obs).log_marginal_likelihood())
    assert abs(got - want) < 0.05 * abs(want) + 3.0
    assert got != pytest.approx(want, abs=1e-6)  # it is an estimate


def test_cg_warns_when_not_converged():
    X, _ = _problem(N=15)
    obs = [gpgrad.values(X, _f(X)), gpgrad.gradients(X, _g(X))]
    gp = gpgrad.GP(
        K.RBF(lengthscale=1.0),
        noise=1e-8,
        method=CG(max_iter=3, preconditioner=None),
    )
    with pytest.warns(ConvergenceWarning, match="raise max_iter"):
        gp.condition(*obs)


def test_cg_options_are_validated():
    with pytest.raises(ValueError, match=r"CG tol must be a number in \(0, 1\)"):
        CG(tol=2.0)
    with pytest.raises(ValueError, match="CG rank must be a positive integer"):
        CG(rank=0)
    with pytest.raises(ValueError, match="CG preconditioner must be one of"):
        CG(preconditioner="ilu")
    with pytest.raises(ValueError, match="method must be one of"):
        gpgrad.GP(K.RBF(), method="lu")


def test_cg_refuses_unsupported_problems():
    X, _ = _problem(N=4)
    with pytest.raises(ValueError, match="second derivatives.*use method='cholesky'"):
        gpgrad.GP(K.RBF(), method="cg").condition(
            gpgrad.hessians(X, np.zeros((4, 3, 3)))
        )
    with pytest.raises(ValueError, match="single radial kernels.*got Sum"):
        gpgrad.GP(K.RBF() + K.Linear(), method="cg").condition(X, _f(X))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(
    "kernel",
    [K.RBF(lengthscale=np.linspace(1.0, 2.0, 12)), K.Matern52(lengthscale=1.5)],
    ids=["rbf_ard", "matern52"],
)
def test_woodbury_matches_dense(backend, kernel):
    rng = np.random.default_rng(3)
    N, d = 5, 12
    X = rng.uniform(-1, 1, (N, d))
    Xs = np.vstack([rng.uniform(-1, 1, (2, d)), X[:1]])
    obs = [gpgrad.gradients(X, _g(X))]
    ref = gpgrad.GP(kernel, noise=1e-4, backend=backend, method="cholesky")
    post = gpgrad.GP(kernel, noise=1e-4, backend=backend)  # auto: N < D
    ref, post = ref.condition(*obs), post.condition(*obs)
    assert post.method == "woodbury"
    # ARD lengthscales: the Woodbury form; one lengthscale: the rotated form
    want = "WoodburySolver" if np.ndim(kernel.lengthscale) else "RotatedGradientSolver"
    assert type(post._solver).__name__ == want
    g, gr = post.gradient(Xs), ref.gradient(Xs)
    assert _rel(g.mean, gr.mean) < 1e-8
    assert _rel(g.cov, gr.cov) < 1e-8
    gf, gfr = post.gradient(Xs, full_cov=True), ref.gradient(Xs, full_cov=True)
    assert _rel(gf.cov, gfr.cov) < 1e-8
    assert _rel(post.value(Xs).var, ref.value(Xs).var) < 1e-8
    lml, lml_ref = post.log_marginal_likelihood(), ref.log_marginal_likelihood()
    assert abs(float(lml) - float(lml_ref)) < 1e-8 * abs(float(lml_ref))


def test_woodbury_solve_and_logdet_batched_and_differentiable():
    rng = np.random.default_rng(4)
    N, d = 4, 9
    X = torch.tensor(rng.uniform(-1, 1, (2, N, d)))
    G = torch.tensor(_g(X.numpy()))
    grads = []
    for method in ["woodbury", "cholesky"]:
        ls = torch.tensor([[1.2], [0.9]], dtype=torch.float64, requires_grad=True)
        gp = gpgrad.GP(
            K.RBF(lengthscale=ls), noise=1e-3, backend="torch", method=method
        )
        lml = gp.log_marginal_likelihood(gpgrad.gradients(X, G))
        assert lml.shape == (2,)
        grads.append((lml, torch.autograd.grad(lml.sum(), ls)[0]))
    (l1, g1), (l2, g2) = grads
    assert _rel(l1, l2) < 1e-10
    assert _rel(g1, g2) < 1e-8


def test_woodbury_solver_directly():
    rng = np.random.default_rng(5)
    N, d = 6, 10
    X = rng.uniform(-1, 1, (N, d))
    kernel = K.RationalQuadratic(lengthscale=np.linspace(0.8, 1.6, d), alpha=1.5)
    bl = as_blocks([gpgrad.gradients(X)], NP, np.float64, None)
    noise = np.full(N * d, 1e-3)
    A = covariance(kernel, bl) + 1e-3 * np.eye(N * d)
    W = WoodburySolver(kernel, bl, noise)
    R = rng.normal(size=(N * d, 3))
    assert _rel(W.solve(R), np.linalg.solve(A, R)) < 1e-10
    assert abs(W.logdet() - np.linalg.slogdet(A)[1]) < 1e-9


def test_woodbury_refusals():
    X, _ = _problem(N=4, d=6)
    gp = gpgrad.GP(K.RBF(), method="woodbury")
    with pytest.raises(ValueError, match="gradient observations only"):
        gp.condition(gpgrad.values(X, _f(X)), gpgrad.gradients(X, _g(X)))
    with pytest.raises(ValueError, match="one noise variance for all gradient"):
        gp.condition(gpgrad.gradients(X, _g(X), noise=np.linspace(0.1, 0.2, 6)))
    Xb, _ = _problem(N=101, d=2)
    with pytest.raises(ValueError, match="N = 101 points is above its limit of 100"):
        gp.condition(gpgrad.gradients(Xb, _g(Xb)))
    with pytest.raises(ValueError, match="single stationary kernel"):
        gpgrad.GP(K.Linear(), method="woodbury").condition(gpgrad.gradients(X, _g(X)))


def test_auto_choice_and_fallback(monkeypatch):
    X, _ = _problem(N=8)
    obs = [gpgrad.values(X, _f(X)), gpgrad.gradients(X, _g(X))]
    assert gpgrad.GP(K.RBF(), noise=1e-3).condition(*obs).method == "cholesky"
    # too many rows for dense under "auto": the matrix-free solver takes over
    monkeypatch.setattr(select, "AUTO_DENSE_MAX_ROWS", 10)
    post = gpgrad.GP(K.RBF(), noise=1e-3).condition(*obs)
    assert post.method == "cg"
    assert "cg" in repr(post)


def test_memory_guard_refuses_dense_before_allocating(monkeypatch):
    X, _ = _problem(N=8)
    obs = [gpgrad.values(X, _f(X)), gpgrad.gradients(X, _g(X))]
    monkeypatch.setattr(select, "available_memory", lambda like=None: 1000)
    with pytest.raises(
        select.InsufficientMemoryError,
        match=r"the dense covariance matrix of the 32 observations needs 8\.8 KiB "
        r"but only 1\.0 KiB is available; use method='cg'",
    ):
        gpgrad.GP(K.RBF(), method="cholesky").condition(*obs)
    # with gradients only and few points the message offers Woodbury too
    Xw, _ = _problem(N=3, d=6)
    with pytest.raises(MemoryError, match="use method='woodbury'"):
        gpgrad.GP(K.RBF(), method="cholesky").condition(gpgrad.gradients(Xw, _g(Xw)))
    # "auto" does not try dense when it cannot fit
    assert gpgrad.GP(K.RBF(), noise=1e-3).condition(*obs).method == "cg"
    # and refuses clearly when no alternative applies
    with pytest.raises(MemoryError, match="fewer observations"):
        gpgrad.GP(K.RBF()).condition(gpgrad.hessians(X, np.zeros((8, 3, 3))))


def test_dense_memory_estimate():
    assert select.dense_memory(1000, 8) == int(1.1 * 8e6)
    assert select.available_memory() > 0


def test_posterior_mean_method_matches_predict_for_every_solver():
    import gpgrad as gg

    rng = np.random.default_rng(21)
    X = rng.uniform(-1, 1, (25, 3))
    obs = [gg.values(X, np.sin(X).sum(1)), gg.gradients(X, np.cos(X))]
    Xs = rng.uniform(-1, 1, (4, 3))
    dense = gg.GP(gg.kernels.Matern52(1.0), noise=1e-4, method="cholesky")
    want = dense.condition(*obs).predict(gg.gradients(Xs)).mean
    for method in ("cholesky", gg.CG(tol=1e-11)):
        post = gg.GP(gg.kernels.Matern52(1.0), noise=1e-4, method=method).condition(
            *obs
        )
        np.testing.assert_allclose(
            post.mean(gg.gradients(Xs)), want, rtol=1e-8, atol=1e-10
        )


# -- large-problem defaults: preconditioner choice, convergence, variances -----


def _smooth_problem(N=30, D=8, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (N, D))
    obs = [gpgrad.values(X, _f(X) / D), gpgrad.gradients(X, _g(X) / D)]
    return obs, rng.uniform(0, 1, (5, D))


def test_cg_default_path_converges_on_a_smooth_kernel():
    import warnings

    obs, Xs = _smooth_problem(N=20, D=6)
    D = Xs.shape[1]
    kernel = K.RBF(lengthscale=0.5 * np.sqrt(D))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        post = gpgrad.GP(kernel, noise=1e-4, method="cg").condition(*obs)
    solver = post._solver
    # strongly correlated points: plain CG (Jacobi needs more iterations here)
    assert solver.preconditioner is None
    r = post._r[:, None]
    res = np.linalg.norm(r - solver.op.matmul(post._alpha[:, None]))
    assert res / np.linalg.norm(r) <= solver.tol == 1e-8
    ref = gpgrad.GP(kernel, noise=1e-4, method="cholesky").condition(*obs)
    assert _rel(post.gradient(Xs).mean, ref.gradient(Xs).mean) < 1e-6


def test_auto_preconditioner_follows_the_correlation():
    from gpgrad.solvers.iterative import auto_preconditioner

    obs, _ = _smooth_problem(N=40, D=5)
    blocks = as_blocks(obs, NP, np.float64, None)
    smooth = GramOperator(K.Matern52(lengthscale=0.5 * np.sqrt(5)), blocks, None)
    rough = GramOperator(K.Matern52(lengthscale=0.05), blocks, None)
    assert auto_preconditioner(smooth) is None
    assert auto_preconditioner(rough) == "jacobi"
    assert auto_preconditioner(GramOperator(K.Linear(), blocks, None)) == "jacobi"


def test_cg_mean_does_no_variance_solves():
    obs, Xs = _smooth_problem(N=20, D=4)
    post = gpgrad.GP(K.Matern52(lengthscale=1.0), noise=1e-4, method="cg")
    post = post.condition(*obs)
    stats = post._solver.stats
    assert stats["solves"] == 1 and stats["columns"] == 1  # the weights only
    pred = post.gradient(Xs)
    mean = pred.mean
    assert stats["solves"] == 1 and stats["columns"] == 1
    assert "block_steps" not in stats
    ref = gpgrad.GP(K.Matern52(lengthscale=1.0), noise=1e-4, method="cholesky")
    ref = ref.condition(*obs).gradient(Xs)
    assert _rel(mean, ref.mean) < 1e-6
    # reading the variances now pays for them: one shared block Krylov space
    assert _rel(pred.var, ref.var) < 1e-6
    assert stats["block_steps"] >= 1 and stats["columns"] > 1


def test_block_galerkin_converges_and_bounds_from_below():
    from gpgrad.solvers.iterative import block_galerkin

    rng = np.random.default_rng(3)
    G = rng.normal(size=(60, 60))
    A = G @ G.T / 60 + 1e-2 * np.eye(60)
    Ks = rng.normal(size=(60, 7))
    exact = np.sum(Ks * np.linalg.solve(A, Ks), axis=0)
    F, info = block_galerkin(lambda V: A @ V, Ks, tol=1e-10)
    assert info["relative_residual"] <= 1e-10
    np.testing.assert_allclose(np.sum(F * F, axis=0), exact, rtol=1e-8)
    # a basis cut short: a lower bound, strictly below somewhere
    F2, info2 = block_galerkin(lambda V: A @ V, Ks, tol=1e-10, max_dim=14)
    approx = np.sum(F2 * F2, axis=0)
    assert info2["steps"] == 2
    assert np.all(approx <= exact * (1 + 1e-12)) and np.any(approx < 0.999 * exact)


def test_lanczos_variances_are_bounded_and_conservative():
    obs, Xs = _smooth_problem(N=30, D=5, seed=2)
    kernel = K.Matern52(lengthscale=0.8)
    gp = gpgrad.GP(kernel, noise=1e-3, method=CG(variance="lanczos", variance_rank=30))
    post = gp.condition(*obs)
    ref = gpgrad.GP(kernel, noise=1e-3, method="cholesky").condition(*obs)
    g, gr = post.gradient(Xs), ref.gradient(Xs)
    # never below the exact variance, and within the certified error bound
    assert np.all(g.var >= gr.var * (1 - 1e-9))
    blocks = as_blocks([gpgrad.gradients(Xs)], NP, np.float64, None)
    Ks = covariance(kernel, post._solver.blocks, blocks)
    q, bound = post._solver.variance_bounds(Ks)
    exact_q = np.sum(Ks * ref._solver.solve(Ks), axis=0)
    assert np.all(q <= exact_q * (1 + 1e-9) + 1e-12)
    assert np.all(exact_q <= q + bound * (1 + 1e-9) + 1e-12)
    assert np.any(q < 0.99 * exact_q)  # rank 30 of 180: an approximation
    # a full-rank cache is exact
    full = gpgrad.GP(
        kernel, noise=1e-3, method=CG(variance="lanczos", variance_rank=280)
    )
    assert _rel(full.condition(*obs).gradient(Xs).var, gr.var) < 1e-6


def test_point_pivoted_cholesky_reproduces_its_columns():
    from gpgrad.solvers.precondition import point_pivoted_cholesky

    obs, _ = _smooth_problem(N=12, D=3)
    blocks = as_blocks(obs, NP, np.float64, None)
    kernel = K.RBF(lengthscale=0.9)
    op = GramOperator(kernel, blocks, None)
    Kd = covariance(kernel, blocks)
    L = point_pivoted_cholesky(kernel, op.groups, op.blocks, op.diagonal(), max_rank=16)
    assert L.shape == (48, 16)
    E = Kd - L @ L.T
    # the chosen points' entries (4 per point) are reproduced exactly
    done = np.abs(np.diag(E)) < 1e-10 * np.max(np.diag(Kd))
    assert done.sum() == 16
    assert np.max(np.abs(E[done])) < 1e-10
    full = point_pivoted_cholesky(
        kernel, op.groups, op.blocks, op.diagonal(), max_rank=48
    )
    assert np.max(np.abs(Kd - full @ full.T)) < 1e-8 * np.max(np.diag(Kd))


def test_cg_variance_options_are_validated():
    with pytest.raises(ValueError, match="CG variance must be one of"):
        CG(variance="sampled")
    with pytest.raises(ValueError, match="CG variance_rank must be a positive integer"):
        CG(variance_rank=0)


@pytest.mark.slow
def test_cg_variances_at_n300_d20_match_dense():
    rng = np.random.default_rng(0)
    N, D = 300, 20
    X, Xs = rng.uniform(0, 1, (N, D)), rng.uniform(0, 1, (10, D))
    obs = [gpgrad.values(X, _f(X) / D), gpgrad.gradients(X, _g(X) / D)]
    kernel = K.Matern52(lengthscale=0.5 * np.sqrt(D))
    post = gpgrad.GP(kernel, noise=1e-4, method="cg").condition(*obs)
    ref = gpgrad.GP(kernel, noise=1e-4, method="cholesky").condition(*obs)
    g, gr = post.gradient(Xs), ref.gradient(Xs)
    assert _rel(g.mean, gr.mean) < 1e-6
    assert np.max(np.abs(g.var - gr.var) / gr.var) < 1e-2


def test_memory_guard_refuses_matrix_free_before_allocating(monkeypatch):
    X, _ = _problem(N=10)
    obs = [gpgrad.values(X, _f(X)), gpgrad.gradients(X, _g(X))]
    monkeypatch.setattr(select, "available_memory", lambda like=None: 1000)
    monkeypatch.setattr(select, "MATFREE_GUARD_MIN_BYTES", 0)
    # values and gradients at the same 10 points: one 10×10 set of profiles
    assert select.matfree_memory(10, 8) == 4320 > 1000
    with pytest.raises(
        select.InsufficientMemoryError, match="profile matrices for 10 points need"
    ):
        gpgrad.GP(K.RBF(), noise=1e-3, method="cg").condition(*obs)


def test_auto_follows_the_measured_crossover():
    # measured (RBF, ℓ = 0.5√D, values eliminated): CG takes 0.24 of the dense
    # time at 4,080 rows in 50-D, 0.46 at 4,400 rows in 10-D (not the quarter
    # the model asks for); small systems stay dense (exact)
    assert select.cg_cheaper(80 * 51, 80, 50)
    assert not select.cg_cheaper(400 * 11, 400, 10)
    assert not select.cg_cheaper(30 * 51, 30, 50)
    assert select.cg_cheaper(400 * 21, 400, 20)
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (80, 50))
    obs = [gpgrad.values(X), gpgrad.gradients(X)]
    blocks = as_blocks(obs, NP, np.float64, None)
    assert select._distinct_points(blocks) == 80


def test_cg_float32_torch_uses_a_reachable_tolerance():
    obs, Xs = _smooth_problem(N=15, D=4)
    kernel = K.Matern52(lengthscale=1.0)
    ref = gpgrad.GP(kernel, noise=1e-3, method="cholesky").condition(*obs)
    gp = gpgrad.GP(
        kernel, noise=1e-3, backend="torch", dtype=torch.float32, method="cg"
    )
    post = gp.condition(*obs)
    assert post._solver.tol == 1e-5
    assert post._solver.info["relative_residual"] <= 1e-5
    mean = post.gradient(Xs).mean
    assert mean.dtype == torch.float32
    assert _rel(mean, ref.gradient(Xs).mean) < 1e-3


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_merged_value_gradient_product_matches_dense(backend, monkeypatch):
    # values and gradients at the same points take the merged Φ₁ GEMM; the
    # separate products (MERGE_VALUE_GRADIENT = False) must agree with it
    from gpgrad.solvers import matfree

    rng = np.random.default_rng(3)
    X = rng.uniform(-1, 1, (30, 4))
    xp = gpgrad.GP(K.RBF(), backend=backend).xp
    dtype = np.float64 if backend == "numpy" else torch.float64
    for kernel in (K.RBF(lengthscale=[0.6, 0.8, 1.0, 1.2]), K.Matern52(0.9)):
        bl = as_blocks([gpgrad.values(X), gpgrad.gradients(X)], xp, dtype, None)
        Kd = covariance(kernel, bl)
        V = rng.normal(size=(Kd.shape[0], 2))
        if backend == "torch":
            V = torch.as_tensor(V)
        op = GramOperator(kernel, bl, None)
        merged = op.matmul(V)
        assert any(key[0] == "p0z" for key in op._phi)
        monkeypatch.setattr(matfree, "MERGE_VALUE_GRADIENT", False)
        separate = GramOperator(kernel, bl, None).matmul(V)
        monkeypatch.setattr(matfree, "MERGE_VALUE_GRADIENT", True)
        assert _rel(merged, Kd @ V) < 1e-13
        assert _rel(separate, Kd @ V) < 1e-13


def test_merged_product_keeps_the_variance_gradient():
    # a product made under no_grad (inside CG) must not lend its cached
    # matrices to a later product that autograd records (implicit solve step)
    rng = np.random.default_rng(4)
    X = torch.tensor(rng.uniform(-1, 1, (12, 3)))
    V = torch.tensor(rng.normal(size=(48, 1)))
    W = torch.tensor(rng.normal(size=(48, 1)))
    var = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    kernel = K.RBF(lengthscale=0.8, variance=var)
    bl = as_blocks([gpgrad.values(X), gpgrad.gradients(X)], torch, torch.float64, None)
    op = GramOperator(kernel, bl, None)
    with torch.no_grad():
        op.matmul(V)
    got = torch.autograd.grad((W * op.matmul(V)).sum(), var)[0]
    want = torch.autograd.grad((W * (covariance(kernel, bl) @ V)).sum(), var)[0]
    assert _rel(got, want) < 1e-12


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_value_elimination_matches_dense_in_fewer_iterations(backend):
    import warnings

    # torch's small products are slow on a loaded CPU: a smaller problem
    obs, Xs = (
        _smooth_problem(N=40, D=8) if backend == "numpy" else _smooth_problem(N=15, D=4)
    )
    D = Xs.shape[1]
    kernel = K.RBF(lengthscale=0.5 * np.sqrt(D))
    ref = gpgrad.GP(kernel, noise=1e-4, method="cholesky").condition(*obs)
    iters = {}
    for elim in (False, "auto"):
        gp = gpgrad.GP(
            kernel, noise=1e-4, backend=backend, method=CG(eliminate_values=elim)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            post = gp.condition(*obs)
        solver = post._solver
        assert (solver._schur is not None) == (elim == "auto")
        iters[elim] = solver.stats["iterations"]
        # the tolerance holds for the full system, recomputed independently
        r, a = post._r[..., None], post._alpha[..., None]
        res = r - solver.op.matmul(a)
        assert _rel_norm(res, r) <= solver.tol
        assert _rel(post.gradient(Xs).mean, ref.gradient(Xs).mean) < 1e-6
    # the Schur complement is far better conditioned on this smooth problem
    assert iters["auto"] < 0.7 * iters[False]


def test_value_elimination_keeps_the_solve_differentiable():
    X, Xs = _problem(N=8, d=2)
    Xt, Xst = torch.tensor(X), torch.tensor(Xs)
    obs = [gpgrad.values(Xt, _f(X)), gpgrad.gradients(Xt, _g(X))]
    grads = []
    for method in ["cholesky", CG(tol=1e-12, eliminate_values=True)]:
        ls = torch.tensor([0.7, 0.9], dtype=torch.float64, requires_grad=True)
        gp = gpgrad.GP(
            K.RBF(lengthscale=ls), noise=1e-3, backend="torch", method=method
        )
        post = gp.condition(*obs)
        if not isinstance(method, str):
            assert post._solver._schur is not None
        grads.append(torch.autograd.grad(post.gradient(Xst).mean.sum(), ls)[0])
    assert _rel(grads[1], grads[0]) < 1e-7


def test_value_elimination_option_is_validated():
    with pytest.raises(ValueError, match="eliminate_values must be 'auto', True"):
        CG(eliminate_values="yes")
    op_obs = [gpgrad.values(np.zeros((2, 2)))]
    bl = as_blocks(op_obs, NP, np.float64, None)
    op = GramOperator(K.RBF(), bl, None)
    with pytest.raises(ValueError, match="inputs must be None, 'values'"):
        op.matmul(np.ones((2, 1)), inputs="gradients")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("inputs", [None, "values", "derivatives"])
def test_product_computes_only_the_requested_rows(backend, inputs):
    # outputs= keeps the requested rows of the dense product and zeros the
    # others; inputs= drops the other kind of coefficient
    X, _ = _problem(N=9, d=3)
    if backend == "torch":
        X = torch.tensor(X)
    obs = [gpgrad.values(X), gpgrad.gradients(X)]
    xp = gpgrad.GP(K.Matern52(), backend=backend).xp
    bl = as_blocks(obs, xp, X.dtype, None)
    kernel = K.Matern52(lengthscale=[0.8, 1.1, 0.9])
    op = GramOperator(kernel, bl, None)
    n = X.shape[0]
    V = np.random.default_rng(3).normal(size=(n * 4, 2))
    Kd = np.asarray(covariance(kernel, bl))
    mask = np.ones((n * 4, 1))
    if inputs == "values":
        mask[n:] = 0.0
    elif inputs == "derivatives":
        mask[:n] = 0.0
    want = Kd @ (V * mask)
    Vx = torch.tensor(V) if backend == "torch" else V
    for outputs, rows in (
        (None, slice(0, 4 * n)),
        ("values", slice(0, n)),
        ("derivatives", slice(n, 4 * n)),
    ):
        for _ in range(2):  # the second product reuses the Φ₂ workspace
            got = np.asarray(op.matmul(Vx, inputs=inputs, outputs=outputs))
            assert _rel(got[rows], want[rows]) < 1e-13
            other = np.ones(4 * n, bool)
            other[rows] = False
            assert np.all(got[other] == 0.0)
    with pytest.raises(ValueError, match="outputs must be None, 'values'"):
        op.matmul(Vx, outputs="gradients")


@pytest.mark.parametrize(
    "kernel",
    [K.RBF(lengthscale=[0.8, 1.1, 0.9]), K.Matern32(lengthscale=0.9), K.Linear()],
    ids=["rbf", "matern32", "linear"],
)
def test_profiles_evaluated_in_row_blocks_match_the_dense_gram(kernel, monkeypatch):
    # profiles and the Φ₂ term in blocks of 7 rows (a remainder of 4 at 25
    # points): the product is the dense Gram matrix's, and equal to the
    # unblocked one
    from gpgrad.solvers import matfree

    X, _ = _problem(N=25, d=3)
    obs = [gpgrad.values(X), gpgrad.gradients(X)]
    bl = as_blocks(obs, NP, X.dtype, None)
    V = np.random.default_rng(4).normal(size=(25 * 4, 3))
    want = np.asarray(covariance(kernel, bl)) @ V
    whole = GramOperator(kernel, bl, None).matmul(V)
    monkeypatch.setattr(matfree, "PROFILE_CHUNK_ELEMENTS", 7 * 25)
    monkeypatch.setattr(matfree, "PHI2_BLOCK_ELEMENTS", 7 * 25)  # the Φ₂ term too
    op = GramOperator(kernel, bl, None)
    for _ in range(2):  # the second product reuses the block buffer
        got = op.matmul(V)
        assert _rel(got, want) < 1e-13
        assert _rel(got, whole) < 1e-14


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_mixed_precision_refinement_reaches_the_float64_tolerance(backend):
    import warnings

    obs, Xs = _smooth_problem(N=40, D=6)
    D = Xs.shape[1]
    kernel = K.Matern52(lengthscale=0.5 * np.sqrt(D))
    ref = gpgrad.GP(kernel, noise=1e-4, method="cholesky").condition(*obs)
    gp = gpgrad.GP(kernel, noise=1e-4, backend=backend, method=CG(mixed_precision=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        post = gp.condition(*obs)
    info = post._solver.info
    assert info["refinements"] >= 1 and info["float32_iterations"] > 0
    r, a = post._r[..., None], post._alpha[..., None]
    assert _rel_norm(r - post._solver.op.matmul(a), r) <= post._solver.tol
    assert _rel(np.asarray(post.gradient(Xs).mean), ref.gradient(Xs).mean) < 1e-6
    # "auto" keeps float64 below MIXED_MIN_POINTS points
    auto = gpgrad.GP(kernel, noise=1e-4, method="cg").condition(*obs)
    assert "refinements" not in auto._solver.info


def test_mixed_precision_falls_back_to_float64_when_refinement_stalls(monkeypatch):
    # a float32 operator that is off by a factor of two: each refinement only
    # halves the residual, so the rounds stop and float64 CG finishes
    from gpgrad.solvers import iterative

    real = iterative.IterativeSolver._float32_schur

    def off_by_two(self, *args):
        S32 = real(self, *args)
        return lambda w: 2.0 * S32(w)

    monkeypatch.setattr(iterative.IterativeSolver, "_float32_schur", off_by_two)
    obs, Xs = _smooth_problem(N=30, D=5)
    kernel = K.Matern52(lengthscale=0.5 * np.sqrt(5))
    ref = gpgrad.GP(kernel, noise=1e-4, method="cholesky").condition(*obs)
    post = gpgrad.GP(kernel, noise=1e-4, method=CG(mixed_precision=True)).condition(
        *obs
    )
    info = post._solver.info
    assert info["refinements"] == 1
    assert info["iterations"] > info["float32_iterations"]  # float64 CG ran
    assert info["relative_residual"] <= post._solver.tol
    assert _rel(post.gradient(Xs).mean, ref.gradient(Xs).mean) < 1e-6


def test_operator_in_float32_matches_float64_to_single_precision():
    X, _ = _problem(N=30, d=4)
    obs = [gpgrad.values(X), gpgrad.gradients(X)]
    bl = as_blocks(obs, NP, X.dtype, None)
    op = GramOperator(K.RBF(lengthscale=[0.8, 1.1, 0.9, 1.3]), bl, np.full(150, 0.1))
    op32 = op.astype(np.float32)
    V = np.random.default_rng(2).normal(size=(150, 2))
    got = op32.matmul(V.astype(np.float32))
    assert got.dtype == np.float32
    assert _rel(got, op.matmul(V)) < 1e-5
    with pytest.raises(ValueError, match="mixed_precision must be 'auto', True"):
        CG(mixed_precision="yes")


def test_auto_cg_computes_variances_and_likelihood_densely_where_dense_fits():
    # 20 points in 100-D (2,020 rows): "auto" solves by CG, and the variances
    # and log-determinant come from a dense factorization built on request
    obs, Xs = _smooth_problem(N=20, D=100)
    kernel = K.RBF(lengthscale=0.5 * np.sqrt(100))
    post = gpgrad.GP(kernel, noise=1e-4).condition(*obs)
    ref = gpgrad.GP(kernel, noise=1e-4, method="cholesky").condition(*obs)
    solver = post._solver
    assert post.method == "cg" and solver.dense_fallback
    g = post.gradient(Xs[:3])
    assert solver._dense is None  # the mean alone builds nothing dense
    assert _rel(g.mean, ref.gradient(Xs[:3]).mean) < 1e-6
    assert _rel(g.var, ref.gradient(Xs[:3]).var) < 1e-9
    assert solver._dense is not None and "block_steps" not in solver.stats
    lml, want = post.log_marginal_likelihood(), ref.log_marginal_likelihood()
    assert abs(float(lml) - float(want)) < 1e-6 * abs(float(want))
    # an explicit CG keeps its own variances
    forced = gpgrad.GP(kernel, noise=1e-4, method="cg").condition(*obs)
    assert not forced._solver.dense_fallback


def test_value_elimination_with_values_at_several_point_sets():
    # value blocks in different point groups: the eliminated block is
    # assembled from the profiles between the groups
    rng = np.random.default_rng(5)
    X1, X2 = rng.uniform(-1, 1, (10, 3)), rng.uniform(-1, 1, (7, 3))
    obs = [
        gpgrad.values(X1, _f(X1)),
        gpgrad.gradients(X2, _g(X2)),
        gpgrad.values(X2, _f(X2)),
        gpgrad.partials(X1[:4], [0, 1, 2, 0], _g(X1[:4])[np.arange(4), [0, 1, 2, 0]]),
    ]
    Xs = rng.uniform(-1, 1, (3, 3))
    kernel = K.Matern52(lengthscale=1.5)
    post = gpgrad.GP(
        kernel, noise=1e-3, method=CG(tol=1e-10, eliminate_values=True)
    ).condition(*obs)
    assert post._solver._schur is not None
    assert post._solver.info["eliminated_values"] == 17
    ref = gpgrad.GP(kernel, noise=1e-3, method="cholesky").condition(*obs)
    assert _rel(post.gradient(Xs).mean, ref.gradient(Xs).mean) < 1e-8


def test_exact_variances_refuse_a_query_that_cannot_fit_and_cap_their_basis(
    monkeypatch,
):
    X, Xs = _problem(N=25)
    kernel = K.Matern52(lengthscale=[0.7, 0.9, 1.1])
    obs = [gpgrad.values(X, _f(X)), gpgrad.gradients(X, _g(X))]
    ref = gpgrad.GP(kernel, noise=1e-4, method="cholesky").condition(*obs)
    post = gpgrad.GP(kernel, noise=1e-4, method=CG(tol=1e-12)).condition(*obs)
    g = post.gradient(Xs)
    mean = g.mean  # the mean needs no variance memory
    assert _rel(mean, ref.gradient(Xs).mean) < 1e-9
    rows, entries = 100, 12  # 25 points × (1 + 3); 4 points × 3 gradient entries
    monkeypatch.setattr(select, "available_memory", lambda like=None: 4 * rows * 8)
    with pytest.raises(select.InsufficientMemoryError, match="12 queried entries"):
        _ = g.var
    # room for a 30-column basis: it stops there, short of tol, loudly
    room = int((30 + 5 * entries) * rows * 8 / 0.8) + 8
    monkeypatch.setattr(select, "available_memory", lambda like=None: room)
    with pytest.warns(ConvergenceWarning, match="fit in memory"):
        _ = post.gradient(Xs).var


@pytest.mark.parametrize("jacobi", [False, True])
def test_cg_quadrature_is_exact_with_a_complete_basis(jacobi):
    # probes e_1 … e_n (scaled by P^{1/2}) and CG run to convergence: each
    # column's Gauss quadrature is exact, so the estimate is log|A| itself
    from gpgrad.solvers.iterative import cg_quadrature, pcg

    rng = np.random.default_rng(3)
    n = 30
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = rng.uniform(0.5, 3.0, n)
    A = (Q * np.logspace(-3, 2, n)) @ Q.T
    A = d[:, None] ** 0.5 * A * d[None, :] ** 0.5
    P = d if jacobi else np.ones(n)
    Z = np.diag(np.sqrt(P))
    rec = []
    X, info = pcg(
        lambda V: A @ V,
        Z,
        (lambda R: R / P[:, None]) if jacobi else None,
        tol=1e-13,
        max_iter=200,
        record=rec,
    )
    assert info["relative_residual"] < 1e-12
    s2 = np.sum(Z * (Z / P[:, None]), axis=0)
    got = n * cg_quadrature(rec, s2) + np.sum(np.log(P))
    assert got == pytest.approx(np.linalg.slogdet(A)[1], abs=1e-8)


def _schur_problem(N=25, D=3, seed=2):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (N, D))
    obs = [gpgrad.values(X, _f(X) / D), gpgrad.gradients(X, _g(X) / D)]
    return X, obs


def test_lifted_probes_give_the_schur_complement_gradient():
    # aᵀ ∂S b (S the Schur complement of the value block, differentiated as a
    # dense matrix) equals lift(a)ᵀ ∂K lift(b) with the lifts held fixed
    X, obs = _schur_problem(N=10, D=3)
    ls = torch.tensor([0.6, 0.8, 1.1], dtype=torch.float64, requires_grad=True)
    noise = torch.tensor(1e-3, dtype=torch.float64, requires_grad=True)
    gp = gpgrad.GP(
        K.Matern52(lengthscale=ls, variance=1.4),
        noise=noise,
        backend="torch",
        method=CG(eliminate_values=True),
    )
    post = gp.condition(*obs)
    solver = post._solver
    sc = solver._schur
    assert sc is not None
    rng = np.random.default_rng(0)
    ng = int(sc["ig"].shape[0])
    a = torch.tensor(rng.standard_normal((ng, 2)))
    b = torch.tensor(rng.standard_normal((ng, 2)))
    with torch.no_grad():
        la, lb = solver._lift(a), solver._lift(b)
    Kd = covariance(gp.kernel, solver.blocks) + noise * torch.eye(solver.N)
    iv, ig = sc["iv"], sc["ig"]
    S = Kd[ig][:, ig] - Kd[ig][:, iv] @ torch.linalg.solve(Kd[iv][:, iv], Kd[iv][:, ig])
    want = torch.autograd.grad((a * (S @ b)).sum(), (ls, noise))
    got = torch.autograd.grad((la * solver.op.matmul(lb)).sum(), (ls, noise))
    for g, w in zip(got, want):
        # round-off of A⁻¹ (noise 1e-3) on both sides
        assert _rel(g, w) < 1e-7


def _likelihood(method, obs, D):
    ls = torch.tensor(0.5 * np.sqrt(D), dtype=torch.float64, requires_grad=True)
    var = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    noise = torch.tensor(1e-3, dtype=torch.float64, requires_grad=True)
    gp = gpgrad.GP(
        K.Matern52(lengthscale=ls, variance=var),
        noise=noise,
        backend="torch",
        method=method,
    )
    obs_t = [
        gpgrad.values(torch.tensor(obs[0].X), torch.tensor(obs[0].y)),
        gpgrad.gradients(torch.tensor(obs[1].X), torch.tensor(obs[1].y)),
    ]
    post = gp.condition(*obs_t)
    lml = post.log_marginal_likelihood()
    grads = torch.autograd.grad(lml, (ls, var, noise))
    return lml.item(), np.array([g.item() for g in grads]), post


def _probe_basis(monkeypatch):
    # probes √n·e_j (E[zzᵀ] = I) over all n derivative entries: with the
    # solves converged, the quadrature and the trace estimate are exact
    from gpgrad.solvers import iterative

    def basis(self, rng, shape):
        n = shape[-2]
        assert shape[-1] == n
        return torch.eye(n, dtype=torch.float64) * np.sqrt(n)

    monkeypatch.setattr(iterative.IterativeSolver, "_draw", basis)


def test_eliminated_values_likelihood_is_exact_with_a_complete_probe_basis(
    monkeypatch,
):
    from gpgrad.solvers import iterative

    _probe_basis(monkeypatch)
    monkeypatch.setattr(iterative, "PROBE_TOL", 1e-13)
    X, obs = _schur_problem(N=12, D=3)
    want, gwant, _ = _likelihood("cholesky", obs, 3)
    got, ggot, post = _likelihood(CG(probes=36, tol=1e-12), obs, 3)
    assert post._solver._schur is not None  # the Schur path's own likelihood
    assert "op32" not in post._solver._schur
    assert got == pytest.approx(want, rel=1e-8)
    assert np.max(np.abs(ggot - gwant) / np.abs(gwant)) < 1e-7


def test_eliminated_values_likelihood_in_mixed_precision(monkeypatch):
    # float32 probe solves to the default PROBE_TOL: the quadrature and the
    # trace carry the solves' error only
    from gpgrad.solvers import iterative

    _probe_basis(monkeypatch)
    monkeypatch.setattr(iterative, "MIXED_MIN_POINTS", 10)
    X, obs = _schur_problem(N=12, D=3)
    want, gwant, _ = _likelihood("cholesky", obs, 3)
    got, ggot, post = _likelihood(CG(probes=36), obs, 3)
    assert "op32" in post._solver._schur  # the probes ran in float32
    assert got == pytest.approx(want, rel=1e-4)
    assert np.max(np.abs(ggot - gwant) / np.abs(gwant)) < 1e-3


def test_eliminated_values_likelihood_estimates_the_dense_one():
    X, obs = _schur_problem(N=20, D=3)
    want, gwant, _ = _likelihood("cholesky", obs, 3)
    got, ggot, post = _likelihood(CG(probes=32, seed=1), obs, 3)
    solver = post._solver
    assert solver._schur is not None
    assert solver.stats["probe_iterations"] > 0
    # log|A| exact, log|S| a 32-probe estimate over 60 entries; measured over
    # 12 seeds at 256 probes and 90 entries: unbiased, standard deviation
    # 1.0 nat in the value and 0.7 / 0.7 / 2.5 % in the three gradients
    # (about three times that here)
    assert abs(got - want) < 10.0
    assert np.max(np.abs(ggot - gwant) / np.abs(gwant)) < 0.3
    assert got != pytest.approx(want, abs=1e-6)  # an estimate, not a copy
    # seeded probes: a deterministic function of the hyperparameters, the
    # same with and without autograd
    again, gagain, _ = _likelihood(CG(probes=32, seed=1), obs, 3)
    assert again == got and np.array_equal(gagain, ggot)
    with torch.no_grad():
        assert float(post.log_marginal_likelihood()) == pytest.approx(got, rel=1e-12)
