"""The benchmark scripts: they run, and their figures mean what they say.

``benchmarks/compare_backends.py --quick`` runs end to end; its table and JSON
hold one record per cell, and its error columns are real: the torch float64
backend and GPyTorch's exact derivative GP (an independent implementation,
with the same hyperparameters) agree with the numpy reference to round-off,
float32 visibly does not. Budgets overrun are recorded, not dropped; the
memory probe sees an allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(ROOT))

import compare_backends as C  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("gpytorch")


def _run(script, *args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    js, png = tmp / "out.json", tmp / "out.png"
    out = _run("compare_backends.py", "--quick", "--json", str(js), "--plot", str(png))
    return out, json.loads(js.read_text()), png


def _records(doc, backend):
    return [r for r in doc["records"] if r["backend"] == backend]


@pytest.mark.slow  # runs compare_backends.py --quick in a subprocess
def test_quick_json_has_machine_and_one_record_per_cell(quick):
    _, doc, _ = quick
    m = doc["machine"]
    for key in ("cpu", "cpu_count", "python", "numpy", "torch", "gpytorch"):
        assert m[key], key
    names = [b["name"] for b in C.backends_available()]
    for must in (
        "gpgrad numpy f64",
        "gpgrad torch f64",
        "gpgrad torch f32",
        "gpytorch default",
        "gpytorch cholesky",
    ):
        assert must in names
    # the matrix-free methods are picked up from the solver registry
    from gpgrad.solvers.select import METHODS

    for meth in METHODS:
        if meth not in ("auto", "cholesky"):
            assert f"gpgrad torch f64 {meth}" in names
    problems = {r["problem"] for r in doc["records"]}
    assert len(problems) == 4  # 2 kernels x 2 observation mixes
    cells = [(r["problem"], r["backend"]) for r in doc["records"]]
    assert len(cells) == len(set(cells)) == len(problems) * len(names)
    for r in doc["records"]:
        for key in ("N", "D", "M", "rows", "kernel", "mix", "status"):
            assert key in r
        assert r["rows"] == r["N"] * (r["D"] + 1 if r["mix"] == "vg" else 1)


@pytest.mark.slow  # runs compare_backends.py --quick in a subprocess
def test_quick_cells_succeed_with_times_and_memory(quick):
    _, doc, _ = quick
    for r in doc["records"]:
        core = "method" not in r["config"] or r["config"]["method"] == "auto"
        if core:
            assert r["status"] == "ok", (r["backend"], r.get("message"))
        if r["status"] != "ok":
            # a specialised solver may decline a problem, saying why
            assert r["status"] == "n/a" and r["message"], r
            continue
        assert 0 < r["time_s"] < 30
        assert 1 <= r["repeats"] <= 2
        assert len(r["times_s"]) == r["repeats"]
        assert r["time_s"] == pytest.approx(np.median(r["times_s"]))
        # the interpreter alone is tens of MiB; a kernel matrix of 36 rows is not
        assert 20 < r["peak_rss_mb"] < 4000


@pytest.mark.slow  # runs compare_backends.py --quick in a subprocess
def test_quick_error_columns(quick):
    _, doc, _ = quick
    for r in _records(doc, "gpgrad numpy f64"):
        assert r["err_mean"] == 0.0 and r["err_var"] == 0.0
        assert r["err_hess_mean"] == 0.0
    for r in _records(doc, "gpgrad torch f64"):
        assert r["err_mean"] < 1e-10 and r["err_var"] < 1e-10
        assert r["err_hess_mean"] < 1e-9 and r["err_hess_var"] < 1e-9
    for r in _records(doc, "gpgrad torch f32"):
        # float32 differs visibly (the column measures something) but stays close
        assert 1e-9 < r["err_mean"] < 1e-2
        assert r["err_var"] < 1e-2
    # GPyTorch is an independent implementation: agreement to round-off checks
    # both the hyperparameter mapping and gpgrad's derivative covariances
    for name in ("gpytorch cholesky", "gpytorch default"):
        for r in _records(doc, name):
            assert r["err_mean"] < 1e-9 and r["err_var"] < 1e-9, r["problem"]
            assert "err_hess_mean" not in r  # GPyTorch predicts no Hessians
    for r in doc["records"]:
        if r["config"].get("method", "auto") not in ("auto", "cholesky"):
            if r["status"] == "ok":
                assert r["err_mean"] < 1e-4 and r["err_var"] < 1e-4


@pytest.mark.slow  # runs compare_backends.py --quick in a subprocess
def test_quick_table_and_plot(quick):
    out, doc, png = quick
    assert out.startswith("Machine: ")
    assert "| problem | rows | backend | status | time [s]" in out
    assert "| time [s] | CPU [s] |" in out
    full = out[: out.index("Summary:")]
    rows = [ln for ln in full.splitlines() if ln.startswith("| ") and " N=" in ln]
    assert len(rows) == len(doc["records"])
    for ln, r in zip(rows, doc["records"]):
        assert f"| {r['backend']} |" in ln
        if r.get("err_mean") is not None:
            assert f"{r['err_mean']:.1e}" in ln
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the summary pivot: one row per problem, time / memory of each backend
    summary = out[out.index("Summary:") :]
    assert C.summary_table(doc["records"]) in summary
    ref = _records(doc, "gpgrad numpy f64")[0]
    assert f"{C._fmt_time(ref['time_s'])} / {ref['peak_rss_mb']:.0f}" in summary


@pytest.mark.parametrize(
    "flags, status",
    [(["--time-budget", "0.001"], "timeout"), (["--mem-budget", "1"], "over memory")],
)
def test_budget_overrun_is_recorded(flags, status):
    # in this process (no torch needed): the grid driver and the table
    args = C.parse_args(["--quick", "--kernel", "rbf", "--mix", "v", *flags])
    (b,) = [x for x in C.backends_available(cuda=False) if x["name"] == C.REFERENCE]
    problem = C.make_problem("rbf", "v", 12, 2, 5)
    (rec,) = C.run_grid([problem], [b], args)
    assert rec["status"] == status
    assert rec["message"]
    assert "err_mean" not in rec and "time_s" not in rec
    table = C.markdown_table([rec])
    (row,) = [ln for ln in table.splitlines() if ln.startswith("| rbf v N=12")]
    assert f"- {C.REFERENCE}: {rec['message']}" in table  # the reason, below
    cells = [c.strip() for c in row.split("|")]
    assert status in cells and cells.count("—") >= 6  # no time, no errors


@pytest.mark.slow  # a subprocess
def test_dense_target_runs_small(tmp_path):
    js = tmp_path / "t.json"
    out = _run(
        "dense_target.py",
        *("--n", "15", "--d", "2", "--m", "4", "--isolate", "fork"),
        *("--json", str(js)),
    )
    doc = json.loads(js.read_text())
    recs = {r["backend"]: r for r in doc["records"]}
    assert set(recs) == {"gpgrad numpy f64", "gpgrad torch f64", "gpytorch cholesky"}
    assert all(r["status"] == "ok" for r in recs.values())
    assert recs["gpytorch cholesky"]["err_mean"] < 1e-9
    assert recs["gpgrad torch f64"]["err_var"] < 1e-10
    assert "GPyTorch ÷ this (time)" in out
    # tiny problem: far inside the target
    assert doc["meets_target"]["gpgrad numpy f64"] is True


@pytest.mark.slow  # a subprocess
def test_peak_rss_sees_an_allocation():
    # in a fresh interpreter: this process's high-water mark may already be
    # above what the allocation would reach
    code = (
        "import numpy as np, _machine as m\n"
        "b = m.peak_rss_mb()\n"
        "a = np.ones(200 * 2**20 // 8)\n"  # 200 MiB, every page touched
        "print(b, m.peak_rss_mb(), m.current_rss_mb())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=BENCH
    )
    before, after, now = map(float, out.stdout.split())
    assert 180 < after - before < 260
    assert now > 180


def test_problem_gradients_match_finite_differences():
    p = C.make_problem("rbf", "vg", 5, 3, 2)
    X, y, G, Xs = C.problem_data(p)
    t = X.sum(axis=1)

    def f(Z):
        s = Z.sum(axis=1)
        return np.sin(3.0 * Z).sum(axis=1) + 0.5 * s * s / Z.shape[1]

    assert np.allclose(f(X), y, rtol=0, atol=1e-14)
    h = 1e-6
    for i in range(3):
        e = np.zeros(3)
        e[i] = h
        fd = (f(X + e) - f(X - e)) / (2 * h)
        assert np.allclose(fd, G[:, i], rtol=0, atol=1e-8)
    assert t.shape == (5,) and Xs.shape == (2, 3)


def test_max_abs_errors_groups():
    ref = {
        "value_mean": np.zeros(3),
        "grad_mean": np.zeros((3, 2)),
        "value_var": np.ones(3),
        "hess_mean": np.zeros((1, 2, 2)),
    }
    pred = {
        "value_mean": np.array([0.0, -0.5, 0.1]),
        "grad_mean": np.array([[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]),
        "value_var": np.ones(3) * 1.25,
        "hess_mean": np.full((1, 2, 2), -3.0),
    }
    e = C.max_abs_errors(pred, ref)
    assert e == {"err_mean": 2.0, "err_var": 0.25, "err_hess_mean": 3.0}


def test_make_problem_rejects_unknown_names():
    with pytest.raises(ValueError, match="kernel must be one of"):
        C.make_problem("rq", "v", 3, 2, 2)
    with pytest.raises(ValueError, match="mix must be one of"):
        C.make_problem("rbf", "g", 3, 2, 2)


@pytest.mark.slow
def test_batched_benchmark_runs_and_its_bands_cover(tmp_path):
    # three problems, a short fit: the script's JSON holds the throughput of
    # the batch and of the loop, and the bands cover the true gradients
    out = tmp_path / "batched.json"
    _run("batched.py", "--problems", "3", "--looped", "1", "--json", str(out))
    rec = json.loads(out.read_text())
    assert rec["problems"] == 3 and rec["rows_per_problem"] == 200
    assert rec["batched_problems_per_s"] > 0 and rec["looped_s_per_problem"] > 0
    assert rec["coverage_95"] > 0.8 and rec["gradient_rmse"] < 0.5


@pytest.mark.slow  # subprocesses
def test_scaling_runs_on_a_chosen_device_and_dtype(tmp_path):
    # what benchmarks/gpu_session.sh runs on a GPU, here on the CPU in float32
    out = _run(
        "scaling.py",
        *("--only", "huge", "--huge-n", "150", "--device", "cpu"),
        *("--dtype", "float32", "--out", str(tmp_path), "--tag", "_t"),
    )
    assert "huge float32 matern52 N=150 D=100: cg" in out
    (row,) = json.loads((tmp_path / "scaling_huge_t.json").read_text())["huge"]
    assert row["device"] == "cpu" and row["dtype"] == "float32"
    assert row["method"] == "cg" and row["iterations"] > 0
    # float32 products: converged to float32's reach, not to float64's
    assert 1e-9 < row["relative_residual"] < 1e-4
