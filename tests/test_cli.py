"""The ``gpgrad`` command: outputs against known derivatives, and every kind of
bad input ending with one stderr line, exit code 2 and no output file."""

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpgrad.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _read_csv(path):
    with open(path, newline="") as fh:
        r = list(csv.reader(fh))
    return r[0], np.array(r[1:], dtype=float)


def _series(tmp_path, n=25, noise=0.02, seed=0, name="data.csv"):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0, 4, n))
    y = np.sin(x) + noise * rng.normal(size=n)
    dy = np.cos(x) + noise * rng.normal(size=n)
    rows = [[f"{a:.6f}", f"{b:.6f}", f"{c:.6f}"] for a, b, c in zip(x, y, dy)]
    return _write_csv(tmp_path / name, ["x", "y", "dy"], rows), x


def _run(args):
    out = io.StringIO()
    code = main(args, out=out)
    return code, out.getvalue()


def test_demo_writes_csv_and_png_with_an_accurate_derivative(tmp_path):
    code, text = _run(["demo", "--out", str(tmp_path)])
    assert code == 0
    assert "gpgrad_demo.csv" in text and "gpgrad_demo.png" in text
    header, data = _read_csv(tmp_path / "gpgrad_demo.csv")
    assert header == ["time", "f_mean", "f_std", "df/dtime_mean", "df/dtime_std"]
    t = data[:, 0]
    true = np.cos(t) + 1.15 * np.cos(2.3 * t + 0.4)
    err = data[:, 3] - true
    assert np.sqrt(np.mean(err**2)) < 0.35
    assert np.mean(np.abs(err) <= 1.96 * data[:, 4]) > 0.8
    assert (tmp_path / "gpgrad_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["gpgrad_demo.csv", "gpgrad_demo.png"]


def test_estimate_columns_and_values(tmp_path):
    data, x = _series(tmp_path)
    out = tmp_path / "out.csv"
    code, text = _run(
        ["estimate", data, "--x", "x", "--y", "y", "--out", str(out), "--restarts", "1"]
    )
    assert code == 0, text
    header, rows = _read_csv(out)
    assert header == ["x", "f_mean", "f_std", "df/dx_mean", "df/dx_std"]
    np.testing.assert_allclose(rows[:, 0], x, atol=1e-6)
    np.testing.assert_allclose(rows[:, 1], np.sin(x), atol=0.05)
    inner = (x > 0.3) & (x < 3.7)
    np.testing.assert_allclose(rows[inner, 3], np.cos(x[inner]), atol=0.15)
    assert np.all(rows[:, 2] > 0) and np.all(rows[:, 4] > 0)
    assert "wrote 25 rows" in text


def test_estimate_at_points_with_hessian_and_plot(tmp_path):
    data, _ = _series(tmp_path)
    at = _write_csv(tmp_path / "at.csv", ["x"], [[0.5], [1.5], [2.5]])
    out, png = tmp_path / "out.csv", tmp_path / "fig.png"
    args = ["estimate", data, "--x", "x", "--y", "y", "--at", at, "--hessian"]
    args += ["--restarts", "1"]
    code, text = _run(args + ["--out", str(out), "--plot", str(png), "--kernel", "rbf"])
    assert code == 0, text
    header, rows = _read_csv(out)
    assert header[-2:] == ["d2f/dxdx_mean", "d2f/dxdx_std"]
    xs = np.array([0.5, 1.5, 2.5])
    np.testing.assert_allclose(rows[:, 0], xs)
    np.testing.assert_allclose(rows[:, 3], np.cos(xs), atol=0.15)
    np.testing.assert_allclose(rows[:, 5], -np.sin(xs), atol=0.4)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_measured_derivatives_narrow_the_bands(tmp_path):
    data, _ = _series(tmp_path, noise=0.05)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    base = ["estimate", data, "--x", "x", "--y", "y", "--restarts", "1"]
    assert _run(base + ["--out", str(a)])[0] == 0
    assert _run(base + ["--dy", "dy", "--out", str(b)])[0] == 0
    _, ra = _read_csv(a)
    _, rb = _read_csv(b)
    assert np.median(rb[:, 4]) < 0.7 * np.median(ra[:, 4])
    np.testing.assert_allclose(rb[:, 3], np.cos(rb[:, 0]), atol=0.15)


def test_two_inputs_with_cross_derivatives(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.uniform(-1, 1, (40, 2))
    y = np.sin(X[:, 0]) * np.exp(0.5 * X[:, 1])
    data = _write_csv(tmp_path / "d.csv", ["a", "b", "y"], np.column_stack([X, y]))
    at = _write_csv(tmp_path / "at.csv", ["b", "a"], [[0.1, 0.2], [-0.3, 0.4]])
    out = tmp_path / "o.csv"
    args = ["estimate", data, "--x", "a", "b", "--y", "y", "--at", at, "--hessian"]
    args += ["--restarts", "1"]
    png = tmp_path / "f.png"
    code, text = _run(args + ["--out", str(out), "--kernel", "rbf", "--plot", str(png)])
    assert code == 0, text
    assert png.read_bytes()[:4] == b"\x89PNG"
    header, r = _read_csv(out)
    assert header == [
        "a", "b", "f_mean", "f_std", "df/da_mean", "df/da_std", "df/db_mean",
        "df/db_std", "d2f/dada_mean", "d2f/dada_std", "d2f/dadb_mean",
        "d2f/dadb_std", "d2f/dbdb_mean", "d2f/dbdb_std",
    ]  # fmt: skip
    a, b = r[:, 0], r[:, 1]
    np.testing.assert_allclose(a, [0.2, 0.4])
    e = np.exp(0.5 * b)
    np.testing.assert_allclose(r[:, 4], np.cos(a) * e, atol=0.03)
    np.testing.assert_allclose(r[:, 6], 0.5 * np.sin(a) * e, atol=0.03)
    np.testing.assert_allclose(r[:, 10], 0.5 * np.cos(a) * e, atol=0.1)


BAD = [
    ("missing file", lambda p: ["--data", str(p / "nope.csv")], "does not exist"),
    ("missing column", lambda p: ["--x", "q"], "column 'q' is not in"),
    ("non-numeric", lambda p: ["--cell", "abc"], "'abc' is not a number"),
    ("empty cell", lambda p: ["--cell", ""], "column 'y' is empty"),
    ("nan", lambda p: ["--cell", "nan"], "NaN and infinite values"),
    ("inf", lambda p: ["--cell", "inf"], "NaN and infinite values"),
    ("too few rows", lambda p: ["--rows", "2"], "at least 3 are needed"),
    ("constant column", lambda p: ["--x", "c"], "input column 'c' is constant"),
    ("dy count", lambda p: ["--dy", "dy", "dy"], "one derivative column per --x"),
    ("hessian order", lambda p: ["--kernel", "matern32", "--hessian"], "--hessian"),
    ("bad kernel", lambda p: ["--kernel", "cubic"], "invalid choice: 'cubic'"),
    ("no out folder", lambda p: ["--out", str(p / "no" / "o.csv")], "does not exist"),
    ("plot folder", lambda p: ["--plot", str(p / "no" / "f.png")], "does not exist"),
    ("at column", lambda p: ["--at-bad"], "column 'x' is not in"),
]


@pytest.mark.parametrize(("label", "extra", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, label, extra, match):
    opts = extra(tmp_path)
    rows = [
        [f"{0.2 * i:.3f}", f"{np.sin(0.2 * i):.4f}", "1.0", "0.5"] for i in range(8)
    ]
    n = 8
    if opts[:1] == ["--rows"]:
        n, opts = int(opts[1]), []
    if opts[:1] == ["--cell"]:
        rows[3][1], opts = opts[1], []
    data = _write_csv(tmp_path / "data.csv", ["x", "y", "dy", "c"], rows[:n])
    if opts[:1] == ["--data"]:
        data, opts = opts[1], []
    if opts[:1] == ["--at-bad"]:
        at = _write_csv(tmp_path / "at.csv", ["t"], [[1.0]])
        opts = ["--at", at]
    out = tmp_path / "out.csv"
    args = ["estimate", data, "--x", "x", "--y", "y", "--out", str(out)]
    # later options override earlier ones
    code = main(args + opts, out=io.StringIO())
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gpgrad: error: ")
    assert match in lines[0]
    assert not out.exists()
    leftovers = [f for f in os.listdir(tmp_path) if f.startswith(".gpgrad-")]
    assert leftovers == []


def test_failed_plot_leaves_no_csv(tmp_path, monkeypatch, capsys):
    data, _ = _series(tmp_path)
    out, png = tmp_path / "out.csv", tmp_path / "fig.png"
    import matplotlib.figure

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", boom)
    code = main(
        [
            "estimate",
            data,
            "--x",
            "x",
            "--y",
            "y",
            "--out",
            str(out),
            "--plot",
            str(png),
        ],
        out=io.StringIO(),
    )
    assert code == 2
    assert "disk full" in capsys.readouterr().err
    assert not out.exists() and not png.exists()
    assert [f for f in os.listdir(tmp_path) if f.startswith(".gpgrad-")] == []


@pytest.mark.slow  # a subprocess
def test_console_command_exit_code(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "gpgrad.cli", "estimate", str(tmp_path / "x.csv"),
         "--x", "x", "--y", "y", "--out", str(tmp_path / "o.csv")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "does not exist" in r.stderr
    assert r.stdout == ""


def test_no_command_prints_help():
    code, text = _run([])
    assert code == 0 and "estimate" in text and "demo" in text
