"""The state-space (Kalman) solver against dense Cholesky: means, variances,
per-point blocks, joint covariances, the log marginal likelihood and its
gradient, on irregular, unsorted series with repeated times."""

import numpy as np
import pytest
import torch

import gpgrad
from gpgrad import kernels as K
from gpgrad.solvers import statespace

RTOL = 1e-8


def _kernels():
    return {
        "Matern12": K.Matern12(lengthscale=0.7, variance=1.3),
        "Matern32": K.Matern32(lengthscale=0.6, variance=0.8),
        "Matern52": K.Matern52(lengthscale=0.9, variance=2.1),
        "Matern72": K.Matern72(lengthscale=1.1, variance=1.6),
        "Scaled72": 2.5 * K.Matern72(lengthscale=0.8),
        "Sum": K.Matern52(lengthscale=0.5)
        + K.Scale(K.Matern32(lengthscale=2.0), 0.7)
        + K.Constant(0.4),
    }


NAMES = list(_kernels())


def _series(n, rng):
    """Unsorted irregular times with repeats, tiny and large gaps."""
    t = np.concatenate([rng.uniform(0.0, 6.0, n - 6), [9.0, 9.0 + 1e-9, 25.0]])
    t = np.concatenate([t, t[:3]])  # repeated times
    return rng.permutation(t)


def _observations(kernel, n, rng, torch_noise=None):
    t = _series(n, rng)
    y = np.sin(2 * t) + 0.1 * rng.normal(size=t.size)
    noise = rng.uniform(0.005, 0.02, t.size)
    if torch_noise is not None:
        noise = torch_noise * torch.as_tensor(noise)
    obs = [gpgrad.values(t[:, None], y, noise=noise)]
    m = n // 4
    if kernel.order >= 1:
        tg = np.concatenate([t[:m], rng.uniform(-1, 7, 3)])
        obs.append(gpgrad.gradients(tg[:, None], np.cos(tg)[:, None], noise=0.03))
        obs.append(
            gpgrad.directional(
                t[m : 2 * m, None],
                rng.normal(size=(m, 1)),
                np.cos(t[m : 2 * m]),
                noise=0.02,
            )
        )
    if kernel.order >= 2:
        obs.append(
            gpgrad.hessians(t[:m, None], -np.sin(t[:m])[:, None, None], noise=0.05)
        )
    return obs


def _queries(rng):
    # inside, between, outside the data, and at observed times
    return np.concatenate([np.linspace(-2, 27, 23), [9.0, 9.0 + 5e-10]])[:, None]


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _pair(kernel, obs, **kw):
    dense = gpgrad.GP(kernel, method="cholesky", **kw).condition(*obs)
    ss = gpgrad.GP(kernel, method="statespace", **kw).condition(*obs)
    assert ss.method == "statespace"
    return dense, ss


@pytest.mark.parametrize("name", NAMES)
def test_posterior_matches_dense(name):
    kernel = _kernels()[name]
    rng = np.random.default_rng(NAMES.index(name))
    obs = _observations(kernel, 100, rng)
    dense, ss = _pair(kernel, obs, mean=0.3, noise=0.01)
    Xq = _queries(rng)
    kinds = ["value", "gradient", "hessian"][: int(min(kernel.order, 2)) + 1]
    for kind in kinds:
        a, b = getattr(dense, kind)(Xq), getattr(ss, kind)(Xq)
        assert _rel(b.mean, a.mean) <= RTOL, kind
        assert _rel(b.var, a.var) <= RTOL, kind
        if a.cov is not None:  # per-point blocks
            assert b.cov.shape == a.cov.shape
            assert _rel(b.cov, a.cov) <= RTOL, kind
    a = dense.log_marginal_likelihood()
    b = ss.log_marginal_likelihood()
    assert abs(a - b) <= RTOL * abs(a)
    q = [gpgrad.values(Xq[:6])] + ([gpgrad.gradients(Xq[3:8])] if kernel.order else [])
    a, b = dense.predict(*q, full_cov=True), ss.predict(*q, full_cov=True)
    assert _rel(b.cov, a.cov) <= RTOL
    assert _rel(ss.mean(*q), dense.mean(*q)) <= RTOL


def _torch_lml(name, method, theta, obs_rng_seed, n=40):
    """LML with every hyperparameter, the noise and the mean in ``theta``."""
    rng = np.random.default_rng(obs_rng_seed)
    ls, var, ls2, var2, c, nz, mean = theta
    kernel = {
        "Matern12": K.Matern12(ls, var),
        "Matern32": K.Matern32(ls, var),
        "Matern52": K.Matern52(ls, var),
        "Matern72": K.Matern72(ls, var),
        "Scaled72": K.Scale(K.Matern72(ls), var),
        "Sum": K.Matern52(ls, var) + K.Scale(K.Matern32(ls2), var2) + K.Constant(c),
    }[name]
    obs = _observations(kernel, n, rng, torch_noise=nz)
    gp = gpgrad.GP(kernel, noise=nz, mean=mean, method=method, backend="torch")
    return gp.log_marginal_likelihood(*obs)


@pytest.mark.parametrize("name", NAMES)
def test_likelihood_gradient_matches_dense_autograd(name):
    out = []
    for method in ("cholesky", "statespace"):
        theta = torch.tensor(
            [0.7, 1.3, 1.5, 0.4, 0.3, 1.0, 0.2], dtype=torch.float64, requires_grad=True
        )
        lml = _torch_lml(name, method, theta, 5)
        (g,) = torch.autograd.grad(lml, theta)
        out.append((float(lml.detach()), g.numpy()))
    (l1, g1), (l2, g2) = out
    assert abs(l1 - l2) <= RTOL * abs(l1)
    assert _rel(g2, g1) <= RTOL
    # the parameters the kernel uses have a nonzero gradient
    assert abs(g2[0]) > 0 and abs(g2[5]) > 0 and abs(g2[6]) > 0


def test_likelihood_gradient_matches_central_differences():
    theta0 = np.array([0.7, 1.3, 1.5, 0.4, 0.3, 1.0, 0.2])
    t = torch.tensor(theta0, requires_grad=True)
    (g,) = torch.autograd.grad(_torch_lml("Sum", "statespace", t, 9), t)
    for i in range(len(theta0)):
        h = 1e-6 * theta0[i]
        up, dn = theta0.copy(), theta0.copy()
        up[i] += h
        dn[i] -= h
        fd = (
            float(_torch_lml("Sum", "statespace", torch.tensor(up), 9))
            - float(_torch_lml("Sum", "statespace", torch.tensor(dn), 9))
        ) / (2 * h)
        assert abs(fd - float(g[i])) <= 1e-5 * max(1.0, abs(fd))


@pytest.mark.parametrize("name", ["Matern32", "Matern72", "Sum"])
def test_regular_grid_steady_state_path_matches_dense(name, monkeypatch):
    # one step, one kind of observation, one noise: the steady-state path
    from gpgrad.solvers import kalman

    def refuse(*a, **k):
        raise AssertionError("the scan path ran on a regular series")

    kernel = _kernels()[name]
    t = 0.3 + 0.02 * np.arange(300)
    y = np.sin(3 * t) + 0.1 * np.random.default_rng(1).normal(size=t.size)
    dense = gpgrad.GP(kernel, noise=0.01, method="cholesky").condition(t[:, None], y)
    monkeypatch.setattr(kalman, "kalman", refuse)
    ss = gpgrad.GP(kernel, noise=0.01, method="statespace").condition(t[:, None], y)
    assert ss.solver.series[()].res.regular
    Xq = np.array([[0.0], [0.31], [3.333], [6.28], [7.5]])
    for kind in ("value", "gradient"):
        a, b = getattr(dense, kind)(Xq), getattr(ss, kind)(Xq)
        assert _rel(b.mean, a.mean) <= RTOL
        assert _rel(b.var, a.var) <= RTOL
    out = []
    for method in ("cholesky", "statespace"):
        th = torch.tensor([0.6, 1.3, 0.01], dtype=torch.float64, requires_grad=True)
        k = {
            "Matern32": K.Matern32(th[0], th[1]),
            "Matern72": K.Matern72(th[0], th[1]),
            "Sum": K.Matern52(th[0], th[1]) + K.Constant(0.3),
        }[name]
        gp = gpgrad.GP(k, noise=th[2], method=method, backend="torch")
        lml = gp.log_marginal_likelihood(t[:, None], y)
        out.append((float(lml.detach()), torch.autograd.grad(lml, th)[0].numpy()))
    assert abs(out[0][0] - out[1][0]) <= RTOL * abs(out[0][0])
    assert _rel(out[1][1], out[0][1]) <= RTOL


def test_torch_backend_and_batched_equals_looped():
    rng = np.random.default_rng(3)
    t = np.stack([_series(50, rng) for _ in range(3)])
    y = np.sin(t) + 0.05 * rng.normal(size=t.shape)
    ls = np.array([[0.5], [0.9], [1.4]])
    var = np.array([1.0, 2.0, 0.5])
    Xq = _queries(rng)
    for backend in ("numpy", "torch"):
        gp = gpgrad.GP(K.Matern52(ls, var), noise=0.01, method="statespace")
        gp = gpgrad.GP(gp.kernel, noise=0.01, method="statespace", backend=backend)
        post = gp.condition(gpgrad.values(t[..., None], y))
        g = post.gradient(Xq)
        lml = post.log_marginal_likelihood()
        assert tuple(g.mean.shape) == (3, Xq.shape[0], 1)
        for b in range(3):
            k1 = K.Matern52(float(ls[b, 0]), float(var[b]))
            one = gpgrad.GP(k1, noise=0.01, method="cholesky").condition(
                t[b, :, None], y[b]
            )
            ref = one.gradient(Xq)
            assert _rel(np.asarray(g.mean[b]), ref.mean) <= RTOL
            assert _rel(np.asarray(g.var[b]), ref.var) <= RTOL
            assert abs(float(lml[b]) - one.log_marginal_likelihood()) <= RTOL * abs(
                one.log_marginal_likelihood()
            )
        if backend == "torch":
            assert isinstance(g.mean, torch.Tensor)


def test_samples_follow_the_joint_posterior():
    rng = np.random.default_rng(4)
    k = K.Matern72(lengthscale=0.8)
    obs = _observations(k, 40, rng)
    post = gpgrad.GP(k, noise=0.01, method="statespace").condition(*obs)
    Xq = np.linspace(0, 5, 4)[:, None]
    draws = post.sample(gpgrad.gradients(Xq), n_samples=4000, seed=1)
    assert draws.shape == (4000, 4, 1)
    g = post.gradient(Xq)
    se = np.sqrt(g.var / 4000)
    assert np.all(np.abs(draws.mean(0) - g.mean) <= 5 * se + 1e-12)


def test_repeated_times_tiny_and_huge_steps_are_exact():
    # Δt = 0, 1e-12 and 1e6 steps: transitions stay exact (I and 0 at Δt = 0)
    t = np.array([0.0, 0.0, 1e-12, 0.5, 0.5, 1e6, 1e6 + 1.0])
    y = np.array([0.1, 0.2, 0.15, -0.3, -0.2, 0.7, 0.6])
    k = K.Matern72(lengthscale=0.3)
    dense, ss = _pair(k, [gpgrad.values(t[:, None], y)], noise=1e-4)
    Xq = np.array([[0.0], [1e-13], [3.0], [1e6 + 0.5]])
    for kind in ("value", "gradient", "hessian"):
        a, b = getattr(dense, kind)(Xq), getattr(ss, kind)(Xq)
        assert _rel(b.mean, a.mean) <= 1e-7
        assert _rel(b.var, a.var) <= 1e-7
    A, Q, _ = statespace._Model(statespace._parts(k)).transitions(np.zeros(2))
    assert np.array_equal(A[0], np.eye(4)) and np.all(Q == 0.0)


def test_auto_picks_statespace_for_long_1d_series(monkeypatch):
    from gpgrad.solvers import select

    n = 200
    monkeypatch.setattr(select, "AUTO_STATESPACE_MIN_ROWS", n)
    t = np.linspace(0, 10, n)
    post = gpgrad.GP(K.Matern32(0.5), noise=0.01).condition(t[:, None], np.sin(t))
    assert post.method == "statespace"
    small = gpgrad.GP(K.Matern32(0.5), noise=0.01).condition(
        t[:50, None], np.sin(t[:50])
    )
    assert small.method == "cholesky"
    rbf = gpgrad.GP(K.RBF(0.5), noise=0.01).condition(t[:, None], np.sin(t))
    assert rbf.method != "statespace"


def test_unsupported_problems_say_why():
    t = np.linspace(0, 1, 5)
    with pytest.raises(ValueError, match="RBF has no exact state-space form"):
        gpgrad.GP(K.RBF(), method="statespace").condition(t[:, None], t)
    with pytest.raises(ValueError, match="needs 1-D inputs, got 2 columns"):
        gpgrad.GP(K.Matern32(), method="statespace").condition(
            np.ones((5, 2)) * t[:, None], t
        )
    with pytest.raises(ValueError, match="Product has no exact state-space form"):
        gpgrad.GP(K.Matern32() * K.Matern52(), method="statespace").condition(
            t[:, None], t
        )
    with pytest.raises(ValueError, match="at least one Matérn part"):
        gpgrad.GP(K.Constant(), method="statespace").condition(t[:, None], t)


def test_joint_covariance_limit_is_named(monkeypatch):
    t = np.linspace(0, 1, 30)
    post = gpgrad.GP(K.Matern32(0.3), noise=0.01, method="statespace").condition(
        t[:, None], np.sin(t)
    )
    monkeypatch.setattr(statespace, "FULL_COV_MAX_ELEMENTS", 100)
    with pytest.raises(ValueError, match="FULL_COV_MAX_ELEMENTS"):
        _ = post.value(np.linspace(0, 1, 10)[:, None], full_cov=True).cov
    assert post.value(np.linspace(0, 1, 10)[:, None]).var.shape == (10,)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_thousand_samples_match_dense(name):
    kernel = _kernels()[name]
    rng = np.random.default_rng(20 + NAMES.index(name))
    obs = _observations(kernel, 2000, rng)
    dense, ss = _pair(kernel, obs, noise=0.01)
    Xq = _queries(rng)
    for kind in ["value", "gradient", "hessian"][: int(min(kernel.order, 2)) + 1]:
        a, b = getattr(dense, kind)(Xq), getattr(ss, kind)(Xq)
        assert _rel(b.mean, a.mean) <= RTOL
        assert _rel(b.var, a.var) <= RTOL
    a = dense.log_marginal_likelihood()
    assert abs(ss.log_marginal_likelihood() - a) <= RTOL * abs(a)
    out = []
    for method in ("cholesky", "statespace"):
        theta = torch.tensor(
            [0.7, 1.3, 1.5, 0.4, 0.3, 1.0, 0.2], dtype=torch.float64, requires_grad=True
        )
        lml = _torch_lml(name, method, theta, 2000 + NAMES.index(name), n=2000)
        out.append(torch.autograd.grad(lml, theta)[0].numpy())
    assert _rel(out[1], out[0]) <= RTOL


# --------------------------------------------------------------------------
# regular series, the numpy likelihood gradient of fit, long-series defaults


def test_blocked_recurrences_match_the_loop():
    from gpgrad.solvers import kalman

    rng = np.random.default_rng(5)
    M = 0.3 * rng.normal(size=(3, 3))
    z0, u = rng.normal(size=3), rng.normal(size=3)
    s = rng.normal(size=1001)
    ref, z = [], z0
    for j in range(len(s)):
        z = M @ z + u * s[j]
        ref.append(z)
    out = kalman.const_recurrence_rank1(M, z0, u, s)
    assert np.max(np.abs(out - np.array(ref))) <= 1e-12
    out = kalman.const_recurrence(M, z0, s[:, None] * u)
    assert np.max(np.abs(out - np.array(ref))) <= 1e-12


@pytest.mark.parametrize(
    "T, ls, noise", [(2, 1.0, 0.01), (3, 1.0, 0.01), (600, 0.4, 0.1)]
)
def test_steady_state_pass_matches_the_scans_on_every_array(T, ls, noise):
    from gpgrad.solvers import kalman

    model = statespace._Model([statespace._Part(2, 1.3, ls)])
    dt = np.full(T, 0.05)
    dt[0] = 0.0
    A, Q, P0 = model.transitions(dt)
    h = np.zeros((T, 3))
    h[:, 0] = 1.0
    y = np.sin(0.05 * np.arange(T)) + 0.1 * np.random.default_rng(T).normal(size=T)
    R = np.full(T, noise)
    g = kalman.kalman(A, Q, P0, h, y, R)
    r = kalman.kalman_regular(A, Q, P0, h, y, R)
    assert r.regular and r.P_pw.nh < T or T < 10
    assert abs(r.loglik - g.loglik) <= 1e-12 * abs(g.loglik)
    for name in ("alpha", "Sinv_diag", "lam", "Lam", "m", "P", "Pp", "S", "K", "B"):
        assert _rel(getattr(r, name), getattr(g, name)) <= 1e-10, name
    sums = kalman.gradient_sums(r, P0)
    full = kalman.gradients(g, P0)
    assert _rel(sums[0], full[0][1:].sum(0)) <= 1e-10
    assert _rel(sums[1], full[1][1:].sum(0)) <= 1e-10
    for a, b in zip(sums[2:], full[2:]):
        assert _rel(a, b) <= 1e-10


def test_grid_queried_at_its_own_times_matches_dense():
    # more than 64 queries on the grid: transitions grouped by step
    t = 0.1 + 0.05 * np.arange(400)
    y = np.cos(t) + 0.05 * np.random.default_rng(2).normal(size=t.size)
    k = K.Matern52(lengthscale=0.8, variance=1.2)
    dense = gpgrad.GP(k, noise=0.01, method="cholesky").condition(t[:, None], y)
    ss = gpgrad.GP(k, noise=0.01, method="statespace").condition(t[:, None], y)
    assert ss.solver.series[()].res.regular
    Xq = np.concatenate([t, t[:50] + 0.025])[:, None]
    for kind in ("value", "gradient", "hessian"):
        a, b = getattr(dense, kind)(Xq), getattr(ss, kind)(Xq)
        assert _rel(b.mean, a.mean) <= RTOL
        assert _rel(b.var, a.var) <= RTOL


def _objective(gp, obs):
    from gpgrad import fit as F

    obs = gp._parse(obs)
    specs, fixed = F._specs(gp, obs, (), None, None, False, True)
    return F._Objective(gp, obs, specs, fixed, (), "autograd", False)


@pytest.mark.parametrize("name", ["Matern52", "Sum"])
def test_fit_numpy_gradient_matches_autograd(name):
    # unsorted times, own and fitted noise, values and derivatives
    rng = np.random.default_rng(11)
    kernel = {"Matern52": K.Matern52(), "Sum": _kernels()["Sum"]}[name]
    t = rng.permutation(np.concatenate([rng.uniform(0, 6, 1100), [2.0, 2.0]]))
    y = np.sin(t) + 0.1 * rng.normal(size=t.size)
    obs = (
        gpgrad.values(t[:600, None], y[:600]),
        gpgrad.values(t[600:, None], y[600:], noise=0.02),
        gpgrad.gradients(t[:40, None], np.cos(t[:40])[:, None]),
    )
    gp = gpgrad.GP(kernel, method="statespace")
    o = _objective(gp, obs)
    assert o.fast is not None
    from gpgrad import fit as F

    theta = o.space.start() + 0.2 * rng.normal(size=o.space.lo.shape)
    f1, g1 = o(theta)
    o.fast = None  # the same objective through torch autograd
    o.torch, o.device = torch, torch.device("cpu")
    o.obs_t = [F._to_torch(f, torch.float64, o.device) for f in o.obs]
    f2, g2 = o(theta)
    assert abs(f1 - f2) <= 1e-12 * abs(f2)
    assert _rel(g1, g2) <= 1e-9


def test_fit_numpy_gradient_matches_central_differences():
    rng = np.random.default_rng(12)
    t = 0.01 * np.arange(1500)
    y = np.sin(3 * t) + 0.1 * rng.normal(size=t.size)
    o = _objective(gpgrad.GP(K.Matern32(), normalize_y=True), (t[:, None], y))
    assert o.fast is not None and o.fast.series is None
    theta = o.space.start() + 0.1
    _, g = o(theta)
    assert o.fast.series.regular
    h = 1e-5
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        fd = (o(theta + e)[0] - o(theta - e)[0]) / (2 * h)
        assert abs(fd - g[i]) <= 1e-6 * max(1.0, abs(fd))


@pytest.mark.slow
def test_long_series_fit_needs_no_bounds():
    # from the default start (a fifth of the span, 2,000 lengthscales here)
    # L-BFGS-B ends in the all-noise optimum (lengthscale on its upper bound);
    # the window start finds the signal
    rng = np.random.default_rng(13)
    t = 0.01 * np.arange(100_000)
    y = np.sin(t) + 0.5 * np.sin(3.1 * t) + 0.1 * rng.normal(size=t.size)
    res = gpgrad.fit(gpgrad.GP(K.Matern52()), t[:, None], y, restarts=1)
    assert res.posterior.method == "statespace"
    assert 0.5 < res.params["lengthscale"] < 3.0
    assert abs(res.params["noise.value"] / 0.01 - 1) < 0.1
    assert res.n_evaluations < 40
    assert not res.on_bound


@pytest.mark.slow
def test_estimate_command_on_a_million_rows(tmp_path):
    import io

    from gpgrad.cli import main

    n = 1_000_000
    t = 0.01 * np.arange(n)
    y = (
        np.sin(t)
        + 0.5 * np.sin(3.1 * t)
        + 0.1 * np.random.default_rng(0).normal(size=n)
    )
    data = tmp_path / "series.csv"
    np.savetxt(data, np.c_[t, y], delimiter=",", header="t,y", comments="", fmt="%.10g")
    out = tmp_path / "out.csv"
    args = ["estimate", str(data), "--x", "t", "--y", "y", "--out", str(out), "--quiet"]
    text = io.StringIO()
    assert main(args, out=text) == 0, text.getvalue()
    assert f"wrote {n} rows" in text.getvalue()
    res = np.loadtxt(out, delimiter=",", skiprows=1, max_rows=20_000)
    df = np.cos(res[:, 0]) + 1.55 * np.cos(3.1 * res[:, 0])
    assert np.sqrt(np.mean((res[1000:, 3] - df[1000:]) ** 2)) < 0.15
