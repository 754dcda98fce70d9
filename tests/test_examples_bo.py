"""Smoke test of examples/bayesopt_gradients.py (its --quick mode), and its
test functions' analytic gradients against torch autograd."""

import importlib.util
import pathlib

import numpy as np
import pytest
import torch

pytest.importorskip("botorch")
pytest.importorskip("matplotlib")

PATH = (
    pathlib.Path(__file__).resolve().parents[1] / "examples" / "bayesopt_gradients.py"
)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("bayesopt_gradients", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("key", ["branin", "hartmann6", "rosenbrock10"])
def test_problem_gradients_match_autograd(example, key):
    prob = example.PROBLEMS[key]
    U = torch.rand(
        5, prob.d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    U.requires_grad_(True)
    span = prob.hi - prob.lo
    f = prob._fun(prob.lo + span * U)
    (auto,) = torch.autograd.grad(f.sum(), U)
    _, g = prob(U.detach())
    torch.testing.assert_close(g, auto, rtol=1e-10, atol=1e-10)


def test_problem_minima(example):
    # known minimizers give the quoted minimum values
    br = example.PROBLEMS["branin"]
    xs = torch.tensor(
        [[-np.pi, 12.275], [np.pi, 2.275], [9.42478, 2.475]], dtype=torch.float64
    )
    np.testing.assert_allclose(example.branin(xs).numpy(), br.f_min, atol=1e-5)
    xh = torch.tensor(
        [[0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573]], dtype=torch.float64
    )
    np.testing.assert_allclose(example.hartmann6(xh).numpy(), -3.32237, atol=1e-5)
    np.testing.assert_allclose(
        example.rosenbrock(torch.ones(1, 10, dtype=torch.float64)).numpy(), 0.0
    )
    # the gradients vanish at the minimizers
    assert (
        example.rosenbrock_grad(torch.ones(1, 10, dtype=torch.float64)).abs().max() == 0
    )
    assert example.hartmann6_grad(xh).abs().max() < 1e-3


@pytest.mark.slow  # runs the example's BO loops
def test_quick_mode_runs_and_plots(example, tmp_path, capsys):
    out = tmp_path / "bo.png"
    results = example.main(["--quick", "--out", str(out)])
    text = capsys.readouterr().out
    assert "machine:" in text and "torch" in text and "botorch" in text
    assert out.exists() and out.stat().st_size > 1000
    assert set(results) == {"branin", "hartmann6", "rosenbrock10"}
    for res in results.values():
        for label in ("gradients", "values only"):
            regret = np.stack(res[label]["regret"])
            # one value per evaluation, non-increasing, non-negative
            assert regret.shape[-1] >= res["n_init"] + 1
            assert np.all(np.diff(regret, axis=-1) <= 0) and np.all(regret >= 0)


@pytest.mark.slow
def test_quick_mode_d_kg_and_transforms(example, tmp_path, capsys):
    out = tmp_path / "bo.png"
    results = example.main(
        [
            "--quick",
            "--problems",
            "branin",
            "--methods",
            "gradients,d-KG,transforms",
            "--out",
            str(out),
        ]
    )
    res = results["branin"]
    for label in ("gradients", "d-KG", "transforms"):
        regret = np.stack(res[label]["regret"])
        assert np.all(np.diff(regret, axis=-1) <= 0) and np.all(regret >= 0)
    # the same model in the problem's own coordinates: the same search, up to
    # the fits' stopping rule (gpgrad.fit stops at a relative likelihood change
    # of 1e-6, so the two parameterizations' optima differ at that level)
    np.testing.assert_allclose(
        res["transforms"]["regret"][0], res["gradients"]["regret"][0], rtol=1e-3
    )
    assert "d-KG" in capsys.readouterr().out


def test_unknown_method_is_refused(example):
    with pytest.raises(SystemExit):
        example.main(["--quick", "--methods", "thompson"])
