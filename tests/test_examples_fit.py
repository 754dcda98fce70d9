"""Smoke tests: each fitting example and the accuracy benchmark run in quick
mode, write their figure, and reach the accuracy they report."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"

# every test here runs a whole example or benchmark
pytestmark = pytest.mark.slow


def _load(rel):
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_noisy_series_derivative(tmp_path):
    out = tmp_path / "a.png"
    r = _load("examples/noisy_series_derivative.py").main(
        ["--quick", "--out", str(out)]
    )
    assert out.read_bytes()[:8] == PNG
    assert r["rmse"] < 0.4
    assert r["coverage"] > 0.8


def test_mixed_derivative_data(tmp_path):
    out = tmp_path / "b.png"
    r = _load("examples/mixed_derivative_data.py").main(["--quick", "--out", str(out)])
    assert out.read_bytes()[:8] == PNG
    # slopes and curvatures narrow the derivative's band and improve its mean
    assert r["all data"]["band"] < 0.5 * r["values only"]["band"]
    assert r["all data"]["rmse"] < r["values only"]["rmse"]
    assert r["fit"].params["noise.value"] == pytest.approx(0.01, rel=0.6)


def test_gradient_field_2d(tmp_path):
    out = tmp_path / "c.png"
    r = _load("examples/gradient_field_2d.py").main(["--quick", "--out", str(out)])
    assert out.read_bytes()[:8] == PNG
    assert r["gradient_rmse"] < 0.25
    assert r["hessian_rmse"] < 0.6
    assert r["coverage"] > 0.8


def test_accuracy_benchmark_quick(tmp_path, capsys):
    results, win_share, cov = _load("benchmarks/accuracy.py").main(
        ["--quick", "--kernel", "rbf", "--out", str(tmp_path)]
    )
    text = capsys.readouterr().out
    assert (
        "machine:" in text
        and "command: python benchmarks/accuracy.py --quick --kernel rbf" in text
    )
    md = (tmp_path / "accuracy.md").read_text()
    assert md.startswith("| function | noise | n | gpgrad |")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == PNG
    assert len(results) == 2
    for r in results:
        # finite differences of noisy data are far worse than a fitted GP
        assert r["rmse"]["gpgrad"] < 0.5 * r["rmse"]["finite differences"]
    assert 0.0 <= win_share <= 1.0 and 0.5 < cov <= 1.0
    # the held-out signals write files of their own beside these
    held, _, _ = _load("benchmarks/accuracy.py").main(
        ["--quick", "--kernel", "rbf", "--held-out", "--out", str(tmp_path)]
    )
    assert [r["function"] for r in held] == ["cos(3x) + x²/2", "exp(−2x)sin(4πx)"]
    assert (tmp_path / "accuracy_held_out.md").read_text().startswith("| function |")
    assert (tmp_path / "calibration_held_out.png").read_bytes()[:8] == PNG
    assert "accuracy.md" in {p.name for p in tmp_path.iterdir()}


def test_accuracy_signals_have_their_exact_derivatives():
    # each test signal's f' against central differences of its f, away from
    # the kinks (|x − c|^p, max(0, ·)) where those are not smooth
    acc = _load("benchmarks/accuracy.py")
    x = np.linspace(0.013, 0.987, 151)
    h = 1e-6
    for name, _, f, df in acc.FUNCTIONS + acc.HELD_OUT:
        keep = np.min(np.abs(x[:, None] - np.array([0.3, 0.4, 0.45, 0.6])), 1) > 0.01
        fd = (f(x + h) - f(x - h)) / (2 * h)
        np.testing.assert_allclose(df(x)[keep], fd[keep], rtol=1e-6, atol=1e-6,
                                   err_msg=name)  # fmt: skip
    assert len(acc.HELD_OUT) == 8
    assert not {n for n, *_ in acc.HELD_OUT} & {n for n, *_ in acc.FUNCTIONS}
