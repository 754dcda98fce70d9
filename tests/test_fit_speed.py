"""benchmarks/fit_speed.py runs end to end and its figures mean what they say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("gpytorch")

import fit_speed as F  # noqa: E402


def test_problem_gradients_are_the_functions_gradients(monkeypatch):
    monkeypatch.setattr(F, "NOISE_SD", 0.0)
    X, y, G = F.problem(6, 3, seed=1)
    rng = np.random.default_rng(1)  # the same draws as problem(): X, then w
    rng.uniform(0.0, 1.0, (6, 3))
    w = rng.normal(size=3)

    def f(Z):
        return np.sin(2 * Z @ w) + 0.5 * np.cos(1.5 * Z.sum(1))

    np.testing.assert_allclose(y, f(X), rtol=1e-12)
    h = 1e-6
    for i, e in enumerate(h * np.eye(3)):
        fd = (f(X + e) - f(X - e)) / (2 * h)
        np.testing.assert_allclose(G[:, i], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_fit_speed_runs_and_writes_its_records(tmp_path):
    out = tmp_path / "fit.json"
    md = tmp_path / "fit.md"
    argv = ["--rows", "140", "--repeats", "1", "--eval-repeats", "1", "--bo"]
    argv += ["--bo-iterations", "1", "--json", str(out), "--md", str(md)]
    assert F.main(argv) == 0
    data = json.loads(out.read_text())
    (rec,) = data["records"]
    assert rec["rows"] == 140 and rec["n"] * (rec["d"] + 1) == 140
    assert rec["gpgrad_evaluations"] > 1 and rec["gpytorch_evaluations"] > 1
    assert rec["fit_ratio"] == pytest.approx(
        rec["gpgrad_fit_s"] / rec["gpytorch_fit_s"]
    )
    # both likelihoods are exact log densities of the same 140 numbers
    assert abs(rec["gpgrad_lml"] - rec["gpytorch_lml"]) < 50
    assert data["bo"][0]["warm_evaluations"] >= 1
    assert "| 140 (20, 6) |" in md.read_text()
