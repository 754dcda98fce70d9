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
    args = ["estimate", data, "--x", "x", "--y", "y", "--out", str(out)]
    # one kernel: the default average is tested in test_kernel_auto_averages_kernels
    code, text = _run(args + ["--restarts", "1", "--kernel", "matern52"])
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
    base += ["--kernel", "matern52"]  # one kernel: the default average is tested apart
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
    # the case's options replace the defaults (an option given twice is an error)
    given = {"--x": ["x"], "--y": ["y"], "--out": [str(out)]}
    for o in opts:
        if o.startswith("--"):
            key = o
            given[key] = []
        else:
            given[key].append(o)
    args = ["estimate", data] + [t for k, v in given.items() for t in [k, *v]]
    code = main(args, out=io.StringIO())
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gpgrad: error: ")
    assert match in lines[0]
    assert not out.exists()
    leftovers = [f for f in os.listdir(tmp_path) if f.startswith(".gpgrad-")]
    assert leftovers == []


def test_failed_plot_leaves_no_csv(tmp_path, monkeypatch, capsys, quick_fit):
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


# --------------------------------------------------------------------------
# never lose the user's data: every output is checked before any work


def _tiny(tmp_path, name="d.csv", n=8):
    x = np.linspace(0.0, 3.0, n)
    rows = [[f"{a:.3f}", f"{np.sin(a):.4f}"] for a in x]
    return _write_csv(tmp_path / name, ["t", "y"], rows)


def _refused(capsys, args, match):
    code = main(args, out=io.StringIO())
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("gpgrad: error: "), lines
    assert match in lines[0], lines[0]
    return lines[0]


def _no_temporaries(folder):
    return [f for f in os.listdir(folder) if f.startswith(".gpgrad-")] == []


@pytest.fixture
def quick_fit(monkeypatch):
    """Condition at fixed hyperparameters instead of fitting them: for tests of
    the command's input and output, not of the fit."""
    import gpgrad
    import gpgrad.cli as cli

    def fit_model(kernel, observations, *, d, **_):
        # the default model (an average over kernels) stands in as Matérn 5/2
        k = cli._make_kernel("matern52" if kernel == "auto" else kernel)
        k = type(k)(lengthscale=0.7)
        obs = [getattr(gpgrad, name)(*args) for name, args in observations]
        post = gpgrad.GP(k, noise=1e-4, mean=0.0).condition(*obs)
        return cli.Fitted(post, "fixed hyperparameters", [], k.order)

    monkeypatch.setattr(cli, "fit_model", fit_model)


def test_plot_onto_the_data_file_is_refused(tmp_path, capsys):
    data = _tiny(tmp_path)
    before = Path(data).read_bytes()
    args = ["estimate", data, "--x", "t", "--y", "y", "--out", str(tmp_path / "o.csv")]
    _refused(capsys, args + ["--plot", data], "never writes over an input")
    assert Path(data).read_bytes() == before
    assert not (tmp_path / "o.csv").exists() and _no_temporaries(tmp_path)


def test_out_and_plot_naming_one_file_is_refused(tmp_path, capsys):
    data = _tiny(tmp_path)
    same = str(tmp_path / "same.png")
    args = ["estimate", data, "--x", "t", "--y", "y", "--out", same, "--plot", same]
    _refused(capsys, args, "are the same file")
    assert not os.path.exists(same) and _no_temporaries(tmp_path)


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_output_through_a_link_to_the_data_is_refused(tmp_path, capsys, link):
    data = _tiny(tmp_path)
    before = Path(data).read_bytes()
    other = tmp_path / "link.csv"
    (os.symlink if link == "symbolic" else os.link)(data, other)
    # read through the link, write onto the real name ... and the other way round
    for src, dst in ((str(other), data), (data, str(other))):
        args = ["estimate", src, "--x", "t", "--y", "y", "--out", dst]
        _refused(capsys, args, "never writes over an input")
    assert Path(data).read_bytes() == before and _no_temporaries(tmp_path)


def test_plot_into_a_folder_is_refused_before_any_output(tmp_path, capsys):
    data = _tiny(tmp_path)
    out = tmp_path / "o.csv"
    out.write_text("keep me\n")
    (tmp_path / "adir").mkdir()
    args = ["estimate", data, "--x", "t", "--y", "y", "--out", str(out)]
    _refused(capsys, args + ["--plot", str(tmp_path / "adir")], "is a folder")
    assert out.read_text() == "keep me\n" and _no_temporaries(tmp_path)


def test_out_is_a_folder_names_the_fix(tmp_path, capsys, monkeypatch):
    data = _tiny(tmp_path)
    monkeypatch.chdir(tmp_path)
    line = _refused(
        capsys, ["estimate", data, "--x", "t", "--y", "y", "--out", "."], "is a folder"
    )
    assert "Errno" not in line and "give a file name" in line


def test_unwritable_folder_is_one_line_not_a_traceback(tmp_path, capsys):
    target = "/sys/gpgrad-test.csv"
    if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _can_create(target):
        pytest.skip("needs a folder that cannot be written (/sys)")
    data = _tiny(tmp_path)
    args = ["estimate", data, "--x", "t", "--y", "y", "--out", target]
    _refused(capsys, args, "is not writable")


def _can_create(path):
    try:
        with open(path, "x"):
            pass
    except OSError:
        return False
    os.remove(path)
    return True


def test_a_failed_rename_rolls_back_the_earlier_ones(
    quick_fit, tmp_path, monkeypatch, capsys
):
    data = _tiny(tmp_path)
    out, png = tmp_path / "o.csv", tmp_path / "f.png"
    out.write_text("old result\n")
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the figure's rename fails after the CSV's
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    import gpgrad.cli as cli

    monkeypatch.setattr(cli.os, "replace", flaky)
    args = ["estimate", data, "--x", "t", "--y", "y", "--restarts", "1"]
    _refused(capsys, args + ["--out", str(out), "--plot", str(png)], "No space left")
    assert out.read_text() == "old result\n"  # restored, not the new table
    assert not png.exists() and _no_temporaries(tmp_path)


@pytest.mark.parametrize(("ext", "magic"), [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_plot_format_follows_the_extension(quick_fit, tmp_path, ext, magic):
    data = _tiny(tmp_path)
    fig = tmp_path / f"q.{ext}"
    args = ["estimate", data, "--x", "t", "--y", "y", "--restarts", "1"]
    code, text = _run(args + ["--out", str(tmp_path / "o.csv"), "--plot", str(fig)])
    assert code == 0, text
    assert fig.read_bytes()[: len(magic)] == magic


def test_unknown_plot_format_is_refused_before_the_fit(tmp_path, capsys):
    data = _tiny(tmp_path)
    args = ["estimate", data, "--x", "t", "--y", "y", "--out", str(tmp_path / "o.csv")]
    _refused(capsys, args + ["--plot", str(tmp_path / "f.xyz")], "'.xyz' is not one")
    assert os.listdir(tmp_path) == ["d.csv"]


def test_input_columns_are_written_back_as_read(quick_fit, tmp_path):
    t = ["1717201224002", "1717201225002", "1717201226502", "1717201227000"]
    x = ["1.50", "2", "3.0e0", "4.25"]
    rows = [[a, b, f"{0.1 * i:.2f}"] for i, (a, b) in enumerate(zip(t, x))]
    data = _write_csv(tmp_path / "d.csv", ["t", "x", "y"], rows)
    out = tmp_path / "o.csv"
    args = ["estimate", data, "--x", "t", "x", "--y", "y", "--restarts", "1"]
    code, text = _run(args + ["--out", str(out)])
    assert code == 0, text
    with open(out, newline="") as fh:
        back = list(csv.reader(fh))[1:]
    assert [r[:2] for r in back] == [list(p) for p in zip(t, x)]
    at = _write_csv(tmp_path / "at.csv", ["x", "t"], [["2.50", "1717201224500"]])
    code, text = _run(args + ["--at", at, "--out", str(out)])
    assert code == 0, text
    with open(out, newline="") as fh:
        assert list(csv.reader(fh))[1][:2] == ["1717201224500", "2.50"]


# --------------------------------------------------------------------------
# size before work; memory failures reported as memory


def _column_file(path, n):
    t = np.arange(n, dtype=np.int64)
    y = np.round(np.sin(t / 50.0), 4)
    body = "\n".join(f"{a},{b}" for a, b in zip(t.tolist(), y.tolist()))
    path.write_text("t,y\n" + body + "\n")
    return str(path)


def test_a_fit_too_big_for_memory_is_refused_fast(tmp_path, capsys, monkeypatch):
    import gpgrad.cli as cli

    # a 12 GB limit, as `ulimit -v 12000000`
    monkeypatch.setattr(cli, "available_memory", lambda: 12_000_000_000)
    data = _column_file(tmp_path / "big.csv", 20_000)
    out = tmp_path / "o.csv"
    # rbf: no linear-time state-space form, so the fit is a dense one
    args = ["estimate", data, "--x", "t", "--y", "y", "--kernel", "rbf"]
    args += ["--out", str(out)]
    line = _refused(capsys, args, "20,000 rows")
    assert "needs about" in line and "11.2 GiB is available" in line
    assert "fit at most about" in line
    assert not out.exists() and _no_temporaries(tmp_path)


@pytest.mark.slow
def test_a_million_rows_end_within_ten_seconds(tmp_path):
    """Refused, or fitted, or (a long linear-time fit) announced with its
    estimate and stopped cleanly by Ctrl-C: never killed, never silent."""
    import signal
    import time

    data = _column_file(tmp_path / "big.csv", 1_000_000)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    # Ctrl-C as at a terminal: a runner started in the background (`cmd &`
    # in a script) ignores SIGINT, and its children inherit that
    p = subprocess.Popen(
        [sys.executable, "-m", "gpgrad", "estimate", data, "--x", "t", "--y", "y",
         "--out", str(tmp_path / "o.csv")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    first = p.stderr.readline()  # a refusal or the fit's first progress line
    elapsed = time.perf_counter() - t0
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    try:
        _, rest = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"no exit within 60 s of Ctrl-C; its first line: {first!r}")
    assert elapsed < 10, elapsed
    if p.returncode == 2:
        assert rest == "" and "1,000,000 rows" in first
        # refused for memory, or for its estimated time (--max-minutes)
        assert "of memory but" in first or "would take about" in first
    elif p.returncode == 130:
        assert first.startswith("gpgrad: fitting 1,000,000 rows"), first
        assert rest.strip().endswith("interrupted; no output was written")
        assert sorted(os.listdir(tmp_path)) == ["big.csv"]
    else:
        assert p.returncode == 0, first + rest


def test_cost_table_scales_by_method():
    from gpgrad.cli import COSTS, estimate_cost

    assert {"cholesky", "cg", "statespace"} <= set(COSTS)
    small = estimate_cost("cholesky", 1000, 1)
    big = estimate_cost("cholesky", 4000, 1)
    assert (big.memory - (256 << 20)) == 16 * (small.memory - (256 << 20))
    assert estimate_cost("cholesky", 1000, 3).seconds == 3 * small.seconds
    lin = [
        estimate_cost("statespace", n, 1).memory - (256 << 20) for n in (10**5, 10**6)
    ]
    assert lin[1] == 10 * lin[0] and lin[1] < 1 << 30
    with pytest.raises(ValueError, match="method must be one of"):
        estimate_cost("qr", 10, 1)


def _torch_oom():
    torch = pytest.importorskip("torch")
    try:
        torch.empty(1 << 60, dtype=torch.uint8)
    except RuntimeError as e:
        return e
    pytest.skip("this system allocated 2**60 bytes")


def test_allocation_failures_are_classified_as_memory():
    from gpgrad.exceptions import is_out_of_memory

    assert is_out_of_memory(_torch_oom())
    try:
        np.empty(1 << 45)
    except MemoryError as e:
        assert is_out_of_memory(e)
    assert not is_out_of_memory(RuntimeError("cholesky: the leading minor is not PD"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_fit_reports_an_allocation_failure_as_memory(monkeypatch):
    import gpgrad
    from gpgrad.exceptions import OutOfMemoryError

    err = _torch_oom()

    def boom(self, *obs):
        raise err

    monkeypatch.setattr(gpgrad.GP, "log_marginal_likelihood", boom)
    X = np.linspace(0, 1, 6)[:, None]
    with pytest.raises(OutOfMemoryError, match="can't allocate memory") as info:
        gpgrad.fit(gpgrad.GP(gpgrad.kernels.RBF()), X, np.sin(X[:, 0]), restarts=1)
    assert isinstance(info.value, MemoryError)


def test_cli_reports_an_allocation_failure_as_memory(tmp_path, capsys, monkeypatch):
    import gpgrad

    err = _torch_oom()

    def boom(self, *obs):
        raise err

    monkeypatch.setattr(gpgrad.GP, "log_marginal_likelihood", boom)
    # a 1-D series fits through the state-space solver's own likelihood
    from gpgrad.solvers.statespace import FitLikelihood

    monkeypatch.setattr(FitLikelihood, "__call__", boom)
    data = _tiny(tmp_path)
    args = ["estimate", data, "--x", "t", "--y", "y", "--out", str(tmp_path / "o.csv")]
    line = _refused(capsys, args, "ran out of memory")
    assert "noise" not in line and "factored" not in line


# --------------------------------------------------------------------------
# progress


def test_progress_on_stderr_and_quiet(tmp_path, capsys, monkeypatch):
    import gpgrad.cli as cli

    monkeypatch.setattr(cli, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 0.0)
    data = _tiny(tmp_path)
    args = ["estimate", data, "--x", "t", "--y", "y", "--restarts", "2"]
    # per-start progress lines: a single kernel's fit (not the default average)
    args += ["--kernel", "matern52", "--out", str(tmp_path / "o.csv")]
    assert main(args, out=io.StringIO()) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("gpgrad: fitting 8 rows (matern52, ")
    assert "2 starts)" in err[0]
    assert "available, roughly" in err[0]
    step = [e for e in err if "log marginal likelihood" in e]
    assert step and "start 2/2" in step[-1] and "log marginal likelihood" in step[-1]
    assert "elapsed" in step[-1]
    assert err[-1].startswith("gpgrad: fitted in ")
    args[args.index("--restarts") + 1] = "1"
    assert main(args + ["--quiet"], out=io.StringIO()) == 0
    assert capsys.readouterr().err == ""


def test_progress_names_the_whole_series_fit_after_the_window():
    import gpgrad.cli as cli
    from gpgrad.fit import WINDOW

    cost = cli.Cost(method="statespace", memory=1, seconds=1.0)
    n = 3 * WINDOW
    plan = cli.Plan("matern52", "statespace", n, n, 1, 3, cost, 1 << 30)
    stage = cli.Progress(plan, stream=io.StringIO())._stage(1)
    assert stage.startswith("whole series (from a 4,096-sample window")
    # with derivatives too (no window), or dense: the starts are counted
    plan = cli.Plan("matern52", "statespace", n, 2 * n, 1, 3, cost, 1 << 30)
    assert cli.Progress(plan, stream=io.StringIO())._stage(2) == "start 2/3"


# --------------------------------------------------------------------------
# friction


def _capture_figures(monkeypatch):
    import matplotlib.figure

    figs = []
    real = matplotlib.figure.Figure.savefig

    def keep(self, *a, **k):
        figs.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figs


def test_plot_draws_a_smooth_curve_with_bands_widening_across_gaps(
    quick_fit, tmp_path, monkeypatch
):
    figs = _capture_figures(monkeypatch)
    x = np.r_[np.linspace(0, 1, 8), np.linspace(3, 4, 8)]  # a gap from 1 to 3
    rows = [[f"{a:.4f}", f"{np.sin(2 * a):.5f}"] for a in x]
    data = _write_csv(tmp_path / "d.csv", ["time", "signal"], rows)
    at = _write_csv(tmp_path / "at.csv", ["time"], [[0.5], [2.0], [3.5]])
    args = ["estimate", data, "--x", "time", "--y", "signal", "--at", at]
    args += ["--restarts", "1", "--out", str(tmp_path / "o.csv")]
    code, text = _run(args + ["--plot", str(tmp_path / "f.png")])
    assert code == 0, text
    ax_f, ax_d = figs[0].axes
    assert ax_f.get_ylabel() == "signal" and ax_f.get_xlabel() == "time"
    assert ax_d.get_ylabel() == "dsignal/dtime"
    curve = next(ln for ln in ax_f.lines if ln.get_label() == "posterior mean")
    t = curve.get_xdata()
    assert len(t) >= 200  # a dense grid, not segments between the --at points
    band = ax_f.collections[0].get_paths()[0].vertices
    lo_hi = {}
    for tx, v in band:  # the band's polygon: lower edge, then upper edge
        lo_hi.setdefault(round(tx, 6), []).append(v)
    width = {k: max(v) - min(v) for k, v in lo_hi.items() if len(v) >= 2}
    near = lambda c: width[min(width, key=lambda k: abs(k - c))]  # noqa: E731
    assert near(2.0) > 3 * near(0.5)  # wider in the gap than among the data
    # the data and the --at points are markers, not lines
    styles = {ln.get_label(): ln.get_linestyle() for ln in ax_f.lines}
    assert styles["data"] == "None"
    at_marks = [c for c in ax_f.containers if c.get_label() == "--at points"]
    assert at_marks and len(at_marks[0].lines[0].get_xdata()) == 3


def test_version():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "gpgrad", "--version"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    import gpgrad

    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"gpgrad {gpgrad.__version__}"


def test_empty_dy_cells_mean_not_measured(quick_fit, tmp_path):
    rows = []
    for i, a in enumerate(np.linspace(0, 3, 10)):
        dy = f"{np.cos(a):.4f}" if i % 2 == 0 else ""
        rows.append([f"{a:.3f}", f"{np.sin(a):.4f}", dy])
    data = _write_csv(tmp_path / "d.csv", ["t", "y", "dy"], rows)
    out = tmp_path / "o.csv"
    args = ["estimate", data, "--x", "t", "--y", "y", "--dy", "dy"]
    code, text = _run(args + ["--restarts", "1", "--out", str(out)])
    assert code == 0, text
    assert "with 5 measured derivatives" in text
    _, r = _read_csv(out)
    # the measured slopes are honoured, the others estimated from the values
    np.testing.assert_allclose(r[::2, 3], np.cos(r[::2, 0]), atol=0.01)
    assert np.all(r[::2, 4] < r[1::2, 4])
    np.testing.assert_allclose(r[1:-1, 3], np.cos(r[1:-1, 0]), atol=0.1)


def test_an_option_given_twice_is_an_error(tmp_path, capsys):
    data = _tiny(tmp_path)
    args = ["estimate", data, "--x", "t", "--x", "y", "--y", "y"]
    line = _refused(capsys, args + ["--out", str(tmp_path / "o.csv")], "given twice")
    assert "--x a b" in line
    args = ["estimate", data, "--x", "t", "--y", "y", "--out", "a.csv", "--out", "b"]
    _refused(capsys, args, "argument --out: given twice")


@pytest.mark.parametrize(
    ("sep", "word", "arg"), [(";", "semicolon", ";"), ("\t", "tab", "\\t")]
)
def test_delimiter_hint_and_option(quick_fit, tmp_path, capsys, sep, word, arg):
    path = tmp_path / "d.csv"
    x = np.linspace(0, 3, 8)
    path.write_text(f"t{sep}y\n" + "".join(f"{a:.3f}{sep}{np.sin(a):.4f}\n" for a in x))
    out = tmp_path / "o.csv"
    args = ["estimate", str(path), "--x", "t", "--y", "y", "--out", str(out)]
    line = _refused(capsys, args, f"looks {word}-separated")
    assert f"--delimiter '{arg}'" in line
    code, text = _run(args + ["--delimiter", arg, "--restarts", "1"])
    assert code == 0, text
    assert _read_csv(out)[0][0] == "t"


def test_demo_out_naming_a_file_says_so(tmp_path, capsys):
    f = tmp_path / "existing.csv"
    f.write_text("x\n")
    line = _refused(capsys, ["demo", "--out", str(f)], "is a file")
    assert "does not exist" not in line and f.read_text() == "x\n"


def test_gp_docstring_says_noise_is_in_data_units():
    import gpgrad

    doc = " ".join(gpgrad.GP.__doc__.split())
    para = doc[doc.index("normalize_y : bool") : doc.index("backend :")]
    assert "noise" in para and "data units" in para
    assert (
        "the noise then refer" not in para
        and "standardized scale for values, and" not in para
    )
    # the behaviour it describes: scaling y by c and the noise by c² scales f by c
    X = np.linspace(0, 1, 6)[:, None]
    y = np.sin(3 * X[:, 0])
    k = gpgrad.kernels.RBF(lengthscale=0.3)
    a = gpgrad.GP(k, noise=1e-2, normalize_y=True).condition(X, y).value(X).mean
    b = gpgrad.GP(k, noise=1e-2 * 100, normalize_y=True).condition(X, 10 * y)
    np.testing.assert_allclose(b.value(X).mean, 10 * a, rtol=1e-10)


def test_a_fit_estimated_past_max_minutes_is_refused_before_work(tmp_path, capsys):
    t = np.arange(20_000) * 0.01
    path = tmp_path / "long.csv"
    np.savetxt(path, np.c_[t, np.sin(t)], delimiter=",", header="t,y", comments="")
    out = tmp_path / "o.csv"
    code, _ = _run(
        ["estimate", str(path), "--x", "t", "--y", "y", "--out", str(out),
         "--max-minutes", "0.001"]
    )  # fmt: skip
    assert code == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "would take about" in err and "--max-minutes" in err


def test_kernel_auto_averages_kernels(tmp_path):
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 6, 60))
    y = np.sin(t) + 0.02 * rng.normal(size=60)
    path = tmp_path / "s.csv"
    np.savetxt(path, np.c_[t, y], delimiter=",", header="t,y", comments="")
    out = tmp_path / "o.csv"
    code, text = _run(
        ["estimate", str(path), "--x", "t", "--y", "y", "--out", str(out),
         "--kernel", "auto", "--restarts", "1"]
    )  # fmt: skip
    assert code == 0, text
    assert "fitted a GP (auto)" in text and "model average of" in text
    _, data = _read_csv(out)
    err = data[:, 3] - np.cos(t)
    assert np.sqrt(np.mean(err**2)) < 0.2


def test_kernel_auto_on_a_long_series_averages_the_statespace_family(
    tmp_path, monkeypatch
):
    from gpgrad import cli

    monkeypatch.setattr(cli, "AUTO_MAX_ROWS", 50)
    t = np.linspace(0, 6, 200)
    y = np.sin(t) + 0.01 * np.random.default_rng(0).normal(size=200)
    path = tmp_path / "s.csv"
    np.savetxt(path, np.c_[t, y], delimiter=",", header="t,y", comments="")
    out = tmp_path / "o.csv"
    code, text = _run(
        ["estimate", str(path), "--x", "t", "--y", "y", "--out", str(out),
         "--restarts", "1"]
    )  # fmt: skip
    assert code == 0, text
    assert "fitted a GP (auto)" in text and "average the Matérn family" in text
    # every member has a state-space form (no RBF, warping or trend)
    members = [ln.split()[1] for ln in text.splitlines() if ln.startswith("      ")]
    assert members and all(m.startswith("Matern") for m in members), text
    _, data = _read_csv(out)
    assert np.sqrt(np.mean((data[:, 3] - np.cos(t)) ** 2)) < 0.05
    # two input columns have no state-space form: Matérn 5/2 as before
    plan = cli.plan_fit("auto", np.c_[t, t], [("values", (np.c_[t, t], y))], 1)
    assert plan.kernel == "matern52" and "fitted with matern52" in plan.note


@pytest.mark.parametrize(
    "body",
    [
        "t,y\n1,2\n3,4\n",
        "t,y\n1,2\n\n3,4\n",  # a blank line
        "t,y\n 1 , 2 \n3,4\n",  # spaces around the numbers
        "t,y\r\n1,2\r\n3,4\r\n",
        "\ufefft,y\n1e-3,2.5E+2\n-3,.4\n\n",  # a BOM, exponents, a last blank
        "t,y,z\n1,2\n3,4,5\n",  # a short row beside the used columns
        "t,y\n1,2\n   \n3,4\n",  # a line of spaces: the csv path decides
        '\nt,y\n"1",2\n3,4\n',  # a blank first line and a quoted cell: ditto
    ],
)
def test_columns_read_fast_as_the_csv_module_reads_them(tmp_path, body):
    """The C readers (pandas', else numpy's) give the csv module's numbers or
    step aside for it."""
    import gpgrad.cli as cli

    path = tmp_path / "d.csv"
    path.write_bytes(body.encode())
    exact = cli.Table(str(path))
    exact._rows = exact._read_rows()
    want = exact._slow([0, 1], ["t", "y"], False)
    fast = cli.Table(str(path))._numpy([0, 1])
    if fast is not None:
        np.testing.assert_array_equal(fast, want)
    table = cli.Table(str(path))
    np.testing.assert_array_equal(table.numbers(["t", "y"]), want)
    # the cells' text, which the output repeats: the same as the csv module's
    text = [[cells[j].strip() for _, cells in exact._rows] for j in (1, 0)]
    assert table.text(["y", "t"], want[:, ::-1]) == text
    fast = cli.Table(str(path))._numpy([0, 1], dtype=str)
    if fast is not None:
        assert [[c.strip() for c in col] for col in fast.T.tolist()] == text[::-1]


@pytest.mark.parametrize("cell", ["nan", "", "inf", "2#c", "x"])
def test_a_bad_cell_read_fast_still_gets_its_line_named(tmp_path, cell):
    import gpgrad.cli as cli

    path = tmp_path / "d.csv"
    path.write_text(f"t,y\n1,2\n3,{cell}\n5,6\n")
    with pytest.raises(cli.CLIError, match="line 3, column 'y'"):
        cli.Table(str(path)).numbers(["t", "y"])
