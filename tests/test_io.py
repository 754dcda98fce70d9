"""gpgrad.save / gpgrad.load: exact round trips on both backends, a readable
non-executable format, and clear errors for damaged or mismatched files."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch

import gpgrad
from gpgrad import kernels as K


def _kernel():
    # every node type: Sum, Scale, Product, ARD vector, extra constructor args
    return 2.0 * (
        K.RBF(lengthscale=[0.5, 0.7]) * K.Polynomial(degree=2, offset=0.3)
    ) + K.Matern52(lengthscale=0.9, variance=0.4)


def _observations(rng):
    X = rng.uniform(-1, 1, (6, 2))
    return [
        gpgrad.values(X, np.sin(X[:, 0]) + X[:, 1]),
        gpgrad.gradients(X[:3], rng.normal(size=(3, 2)), noise=np.full((3, 2), 1e-2)),
        gpgrad.partials(X[:2], [0, 1], [0.1, 0.2]),
        gpgrad.directional(X[2:4], rng.normal(size=(2, 2)), [1.0, 2.0]),
        gpgrad.second_partials(X[:2], 0, 1, [0.0, 1.0]),
        gpgrad.hessians(X[4:5], np.array([[[1.0, 0.2], [0.2, -0.5]]])),
    ]


def _same(a, b):
    a = a.detach().numpy() if torch.is_tensor(a) else a
    b = b.detach().numpy() if torch.is_tensor(b) else b
    assert a.shape == b.shape
    assert np.array_equal(a, b)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_posterior_round_trip_gives_identical_predictions(tmp_path, backend):
    rng = np.random.default_rng(0)
    gp = gpgrad.GP(
        _kernel(),
        noise={"value": 1e-4, "gradient": 1e-3, "hessian": 1e-2},
        mean=0.3,
        normalize_y=True,
        backend=backend,
    )
    post = gp.condition(*_observations(rng))
    path = tmp_path / "model.npz"
    gpgrad.save(post, path)
    back = gpgrad.load(path)
    assert isinstance(back, gpgrad.Posterior)
    assert back.gp.backend == backend and back.gp.normalize_y
    assert repr(back.kernel) == repr(post.kernel)
    assert [f.kind for f in back.observations] == [f.kind for f in post.observations]
    Xs = rng.uniform(-1, 1, (4, 2))
    for name in ("value", "gradient", "hessian"):
        a = getattr(post, name)(Xs, full_cov=True)
        b = getattr(back, name)(Xs, full_cov=True)
        _same(a.mean, b.mean)
        _same(a.cov, b.cov)
    _same(post.log_marginal_likelihood(), back.log_marginal_likelihood())
    if backend == "torch":
        assert torch.is_tensor(back.value(Xs).mean)


def test_prior_gp_round_trip(tmp_path):
    gp = gpgrad.GP(
        K.Periodic(lengthscale=0.8, period=1.7) + K.RationalQuadratic(alpha=0.6),
        noise=3e-3,
        mean=-1.25,
        method="cholesky",
    )
    gpgrad.save(gp, tmp_path / "gp.npz")
    back = gpgrad.load(tmp_path / "gp.npz")
    assert isinstance(back, gpgrad.GP)
    assert back.noise == 3e-3 and back.mean == -1.25 and back.method == "cholesky"
    X = np.linspace(-1, 1, 5)[:, None]
    a = gp.condition(X, np.cos(3 * X[:, 0])).gradient(X + 0.1)
    b = back.condition(X, np.cos(3 * X[:, 0])).gradient(X + 0.1)
    _same(a.mean, b.mean)
    _same(a.var, b.var)


def test_configured_solver_round_trip(tmp_path):
    from gpgrad.solvers.iterative import CG

    X = np.random.default_rng(5).uniform(size=(6, 2))
    post = gpgrad.GP(
        K.RBF(lengthscale=0.5), noise=1e-3, method=CG(tol=1e-10, rank=5)
    ).condition(gpgrad.values(X, X[:, 0]), gpgrad.gradients(X, np.ones((6, 2))))
    gpgrad.save(post, tmp_path / "cg.npz")
    back = gpgrad.load(tmp_path / "cg.npz")
    assert back.gp.method == post.gp.method and back.method == "cg"
    _same(back.gradient(X).mean, post.gradient(X).mean)


def test_torch_tensors_restored_on_the_gp_dtype_with_batches(tmp_path):
    ls = torch.tensor([[0.4, 0.6], [0.9, 0.3]], dtype=torch.float64, requires_grad=True)
    gp = gpgrad.GP(
        K.RBF(lengthscale=ls, variance=torch.tensor([1.0, 2.0])),
        noise=torch.tensor(1e-3),
        backend="torch",
        dtype=torch.float32,
    )
    X = torch.rand(
        2, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    post = gp.condition(
        gpgrad.values(X, X.sum(-1)), gpgrad.gradients(X[:, :2], X[:, :2])
    )
    gpgrad.save(post, tmp_path / "b.npz")
    back = gpgrad.load(tmp_path / "b.npz")
    assert back.gp.dtype == torch.float32
    assert torch.is_tensor(back.kernel.lengthscale)
    assert back.kernel.lengthscale.dtype == torch.float32
    assert not back.kernel.lengthscale.requires_grad
    Xs = torch.rand(
        2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    a, b = post.gradient(Xs), back.gradient(Xs)
    assert b.mean.shape == (2, 3, 2) and b.mean.dtype == torch.float32
    _same(a.mean, b.mean)
    _same(a.var, b.var)


def test_file_is_a_plain_npz_with_a_json_description(tmp_path):
    post = gpgrad.GP(K.RBF(), noise=1e-3).condition(
        gpgrad.values([[0.0], [1.0]], [0.5, -0.5])
    )
    path = tmp_path / "m.npz"
    gpgrad.save(post, path)
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"gpgrad.json", "obs0.X", "obs0.y"}
        assert np.array_equal(npz["obs0.y"], [0.5, -0.5])
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("gpgrad.json"))
    assert meta["format"] == "gpgrad-model" and meta["object"] == "Posterior"
    assert meta["gp"]["kernel"] == {
        "class": "RBF",
        "params": {"variance": 1.0, "lengthscale": 1.0},
    }
    assert meta["observations"][0]["kind"] == "value"


# --------------------------------------------------------------------------
# damaged and mismatched files


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.uniform(size=(4, 2))
    post = gpgrad.GP(K.RBF(lengthscale=[0.5, 0.6]), noise=1e-3).condition(
        gpgrad.values(X, X[:, 0]), gpgrad.gradients(X, np.ones((4, 2)))
    )
    path = tmp_path / "m.npz"
    gpgrad.save(post, path)
    return path


def _members(path):
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)


def _npy(arr):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=True)
    return buf.getvalue()


def test_truncated_file(saved):
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 30):
        saved.write_bytes(data[:cut])
        with pytest.raises(
            ValueError, match="not a gpgrad model file, or it is truncated"
        ):
            gpgrad.load(saved)


def test_corrupted_bytes_in_every_member(saved):
    data = saved.read_bytes()
    with zipfile.ZipFile(saved) as zf:
        infos = zf.infolist()
    for info in infos:
        # the member's compressed data follows its 30-byte local header
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        pos = start + info.compress_size // 2
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        saved.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="corrupted|not valid JSON|malformed"):
            gpgrad.load(saved)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "x.npz"
    p.write_text("hello")
    with pytest.raises(ValueError, match="not a gpgrad model file"):
        gpgrad.load(p)
    np.savez(p, X=np.zeros(3))
    with pytest.raises(ValueError, match="has no 'gpgrad.json'"):
        gpgrad.load(p)
    with pytest.raises(FileNotFoundError, match="no such model file"):
        gpgrad.load(tmp_path / "missing.npz")


def test_array_swapped_from_another_save(saved):
    m = _members(saved)
    m["obs0.X.npy"] = _npy(np.zeros((4, 2)))
    _write(saved, m)
    with pytest.raises(ValueError, match="array 'obs0.X' does not match the digest"):
        gpgrad.load(saved)


def test_missing_and_unexpected_arrays(saved):
    m = _members(saved)
    del m["obs1.y.npy"]
    m["extra.npy"] = _npy(np.ones(2))
    _write(saved, m)
    with pytest.raises(
        ValueError, match=r"missing \['obs1.y'\], unexpected \['extra'\]"
    ):
        gpgrad.load(saved)


def test_pickled_member_is_refused(saved):
    m = _members(saved)
    m["obs0.X.npy"] = _npy(np.array([{"a": 1}], dtype=object))
    _write(saved, m)
    with pytest.raises(ValueError, match="not a plain array"):
        gpgrad.load(saved)


def _edit_meta(path, edit):
    m = _members(path)
    meta = json.loads(m["gpgrad.json"])
    edit(meta)
    m["gpgrad.json"] = json.dumps(meta).encode()
    _write(path, m)


def test_newer_format_version(saved):
    _edit_meta(saved, lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="format version 99.*upgrade gpgrad"):
        gpgrad.load(saved)


def test_unknown_kernel_class(saved):
    _edit_meta(saved, lambda m: m["gp"]["kernel"].update({"class": "os.system"}))
    with pytest.raises(ValueError, match="unknown kernel class 'os.system'"):
        gpgrad.load(saved)


def test_malformed_description(saved):
    _edit_meta(saved, lambda m: m["gp"].pop("noise"))
    with pytest.raises(ValueError, match="malformed gpgrad model file"):
        gpgrad.load(saved)


def test_changed_targets_warn_through_the_likelihood_check(saved):
    # a consistent file whose stored likelihood disagrees with its data
    _edit_meta(saved, lambda m: m.update(log_marginal_likelihood=123.0))
    with pytest.warns(
        gpgrad.GPGradWarning, match="log marginal likelihood after loading"
    ):
        gpgrad.load(saved)


def test_save_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(
        TypeError, match="expects a gpgrad.GP or a gpgrad.Posterior, got dict"
    ):
        gpgrad.save({}, tmp_path / "a.npz")

    class MyRBF(K.RBF):
        pass

    with pytest.raises(TypeError, match="cannot save a kernel of class .*MyRBF"):
        gpgrad.save(gpgrad.GP(MyRBF()), tmp_path / "a.npz")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        gpgrad.save(gpgrad.GP(K.RBF()), 3)
    assert not list(tmp_path.iterdir())
