"""The ``gpgrad`` command: derivatives with error bars from a CSV file.

``gpgrad demo`` fits a GP to a small noisy series shipped with the package and
writes its derivative with 95 % bands (CSV and PNG). ``gpgrad estimate`` does
the same for your data::

    gpgrad estimate data.csv --x t --y signal --out derivative.csv --plot fig.png

Each output row holds the input columns, ``f_mean``, ``f_std`` and, for every
input column ``X``, ``df/dX_mean`` and ``df/dX_std`` (with ``--hessian`` also
``d2f/dXdY_mean`` and ``d2f/dXdY_std`` for every pair ``X ≤ Y`` in ``--x``
order). A 95 % band is ``mean ± 1.96 std``. Bad input ends the command with one
line on stderr and exit code 2, and no output file is written.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import warnings
from importlib import resources

import numpy as np

__all__ = ["main", "CLIError"]

KERNELS = ("matern52", "rbf", "matern32", "rq")
#: fewest data rows the command fits a GP to
MIN_ROWS = 3
#: the demo data: f(t) = sin t + 0.5 sin(2.3 t + 0.4), noise sd 0.08
DEMO_FILE = "demo_series.csv"
Z95 = 1.959963984540054


class CLIError(Exception):
    """A problem with the command's input: reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, not argparse's usage block, so scripts can log it
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _parser():
    p = _Parser(
        prog="gpgrad",
        description="Estimate derivatives with credible bands from noisy data "
        "by Gaussian-process regression with fitted hyperparameters.",
    )
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    demo = sub.add_parser(
        "demo",
        help="fit the shipped example series and write its derivative",
        description="Fit a GP to a noisy series shipped with gpgrad, write the "
        "derivative with 95% bands to gpgrad_demo.csv and gpgrad_demo.png.",
    )
    demo.add_argument("--out", default=".", metavar="DIR", help="output folder")
    est = sub.add_parser(
        "estimate",
        help="fit a CSV file and write f and its derivatives at points",
        description="Fit a GP to DATA.csv and write, for each point, the "
        "posterior mean and standard deviation of f and of every first "
        "derivative (and second derivatives with --hessian).",
    )
    est.add_argument("data", metavar="DATA.csv")
    est.add_argument(
        "--x", nargs="+", required=True, metavar="COL", help="input column(s)"
    )
    est.add_argument("--y", required=True, metavar="COL", help="output column")
    est.add_argument(
        "--dy",
        nargs="+",
        metavar="COL",
        help="measured derivatives of y, one column per --x column, same order",
    )
    est.add_argument("--kernel", default="matern52", choices=KERNELS)
    est.add_argument(
        "--at",
        metavar="POINTS.csv",
        help="where to estimate (default: the data's own inputs)",
    )
    est.add_argument("--out", required=True, metavar="OUT.csv")
    est.add_argument("--plot", metavar="OUT.png", help="also draw a figure")
    est.add_argument(
        "--hessian", action="store_true", help="add the second derivatives"
    )
    est.add_argument(
        "--restarts",
        type=int,
        default=3,
        metavar="N",
        help="optimizer starts for the hyperparameters (default 3)",
    )
    est.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the random starts"
    )
    return p


# --------------------------------------------------------------------------
# reading


def read_table(path, what="data file"):
    """Header and rows of a CSV file, or :class:`CLIError`."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except FileNotFoundError:
        raise CLIError(f"{what} {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CLIError(f"cannot read {what} {path!r}: {e}") from None
    if not rows:
        raise CLIError(f"{what} {path!r} is empty; expected a header row")
    header = [h.strip() for h in rows[0]]
    return header, rows[1:]


def columns(header, rows, names, path):
    """The named columns as a float array (rows, len(names))."""
    idx = []
    for name in names:
        if name not in header:
            raise CLIError(
                f"column {name!r} is not in {path!r}; its columns are "
                f"{', '.join(header)}"
            )
        idx.append(header.index(name))
    out = np.empty((len(rows), len(names)))
    for r, row in enumerate(rows):
        line = r + 2  # the header is line 1
        for c, (j, name) in enumerate(zip(idx, names)):
            cell = row[j].strip() if j < len(row) else ""
            if not cell:
                raise CLIError(f"{path!r} line {line}, column {name!r} is empty")
            try:
                v = float(cell)
            except ValueError:
                raise CLIError(
                    f"{path!r} line {line}, column {name!r}: {cell!r} is not a number"
                ) from None
            if not math.isfinite(v):
                raise CLIError(
                    f"{path!r} line {line}, column {name!r} is {cell!r}; NaN and "
                    "infinite values cannot be fitted (drop the row)"
                )
            out[r, c] = v
    return out


# --------------------------------------------------------------------------
# the computation


def _kernel(name):
    from . import kernels

    return {
        "matern52": kernels.Matern52,
        "rbf": kernels.RBF,
        "matern32": kernels.Matern32,
        "rq": kernels.RationalQuadratic,
    }[name]()


def estimate(
    X,
    y,
    names,
    *,
    G=None,
    at=None,
    kernel="matern52",
    hessian=False,
    restarts=3,
    seed=0,
):
    """Fit a GP and evaluate f and its derivatives.

    Parameters
    ----------
    X : array (n, d)
    y : array (n,)
    names : list of str
        The d input names, used for the output columns.
    G : array (n, d), optional
        Measured gradients at ``X``.
    at : array (m, d), optional
        Where to evaluate (default ``X``).

    Returns
    -------
    table : dict of str -> array (m,)
        The output columns in order.
    fit : gpgrad.fit.FitResult
    notes : list of str
        Warnings raised while fitting, one line each.
    """
    import gpgrad

    k = _kernel(kernel)
    if hessian and k.order < 2:
        raise CLIError(
            f"--hessian needs a twice differentiable kernel; {kernel} is only "
            "once: use --kernel matern52, rbf or rq"
        )
    d = X.shape[1]
    obs = [gpgrad.values(X, y)]
    if G is not None:
        obs.append(gpgrad.gradients(X, G))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = gpgrad.fit(
                gpgrad.GP(k), *obs, ard=d > 1, restarts=restarts, seed=seed
            )
        except gpgrad.NotPositiveDefiniteError as e:
            raise CLIError(f"the fit failed: {e}") from None
        post = res.posterior
        P = X if at is None else at
        table = {n: P[:, i] for i, n in enumerate(names)}
        v = post.value(P)
        table["f_mean"], table["f_std"] = v.mean, v.std
        g = post.gradient(P)
        for i, n in enumerate(names):
            table[f"df/d{n}_mean"] = g.mean[:, i]
            table[f"df/d{n}_std"] = g.std[:, i]
        if hessian:
            h = post.hessian(P)
            for i in range(d):
                for j in range(i, d):
                    key = f"d2f/d{names[i]}d{names[j]}"
                    table[f"{key}_mean"] = h.mean[:, i, j]
                    table[f"{key}_std"] = h.std[:, i, j]
    notes = [str(w.message).splitlines()[0] for w in caught]
    return table, res, list(dict.fromkeys(notes))


# --------------------------------------------------------------------------
# writing: every output goes to a temporary file beside its target and is
# renamed only when all of them are complete, so a failure leaves no partial
# output behind


class _Outputs:
    """Stage files under temporary names; :meth:`commit` renames them all."""

    def __init__(self):
        self.staged = []

    def stage(self, path, write):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise CLIError(f"the output folder {folder!r} does not exist")
        fd, tmp = tempfile.mkstemp(
            prefix=".gpgrad-", suffix=os.path.splitext(path)[1], dir=folder
        )
        os.close(fd)
        self.staged.append((tmp, path))
        try:
            write(tmp)
        except OSError as e:
            raise CLIError(f"cannot write {path!r}: {e}") from None
        # mkstemp creates owner-only files; give the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)

    def commit(self):
        try:
            for tmp, path in self.staged:
                os.replace(tmp, path)
        except OSError as e:
            raise CLIError(f"cannot write {path!r}: {e}") from None
        self.staged = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for tmp, _ in self.staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        return False


def write_table(outputs, path, table):
    """Stage the output columns as a CSV file."""
    keys = list(table)
    data = np.column_stack([np.asarray(table[k], dtype=float) for k in keys])

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(keys)
            for row in data:
                w.writerow([f"{v:.10g}" for v in row])

    outputs.stage(path, write)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'gpgrad[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(outputs, path, X, y, names, table, *, G=None, truth=None, title=""):
    """Stage a figure: the data, f and each first derivative with 95 % bands.

    One input: lines with shaded bands over the input. Several inputs: one
    panel per quantity against its own input column, with error bars.
    """
    plt = _pyplot()
    d = X.shape[1]
    P = np.column_stack([np.asarray(table[n]) for n in names])
    panels = [("f", "f", 0, y)] + [
        (f"df/d{n}", f"df/d{n}", i, None if G is None else G[:, i])
        for i, n in enumerate(names)
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)))
    axes = np.atleast_1d(axes)
    for ax, (key, label, i, data) in zip(axes, panels):
        m = np.asarray(table[f"{key}_mean"])
        s = np.asarray(table[f"{key}_std"])
        xs = P[:, i]
        if d == 1:
            o = np.argsort(xs, kind="stable")
            lo, hi = (m - Z95 * s)[o], (m + Z95 * s)[o]
            ax.fill_between(xs[o], lo, hi, alpha=0.3, label="95% band")
            ax.plot(xs[o], m[o], lw=1.5, label="posterior mean")
        else:
            ax.errorbar(xs, m, yerr=Z95 * s, fmt=".", ms=3, label="mean, 95%")
        if data is not None:
            ax.plot(X[:, i], data, "k.", ms=3, label="data")
        if truth is not None and key in truth:
            o = np.argsort(xs, kind="stable")
            ax.plot(xs[o], truth[key][o], "k--", lw=1, label="truth")
        ax.set_ylabel(label)
        ax.set_xlabel(names[i])
        ax.legend(fontsize=7, loc="best")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    try:
        outputs.stage(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------
# commands


def _check_inputs(X, names, path):
    if X.shape[0] < MIN_ROWS:
        raise CLIError(
            f"{path!r} has {X.shape[0]} data row(s); at least {MIN_ROWS} are needed "
            "to fit"
        )
    for i, n in enumerate(names):
        if np.ptp(X[:, i]) == 0:
            raise CLIError(
                f"input column {n!r} is constant ({X[0, i]:g} in every row); "
                "remove it from --x"
            )


def _estimate_cmd(a, out):
    if len(set(a.x)) != len(a.x):
        raise CLIError(f"--x names a column twice: {' '.join(a.x)}")
    if a.y in a.x:
        raise CLIError(f"--y {a.y!r} is also an input column in --x")
    if a.dy is not None and len(a.dy) != len(a.x):
        raise CLIError(
            f"--dy needs one derivative column per --x column ({len(a.x)}), got "
            f"{len(a.dy)}"
        )
    if a.restarts < 1:
        raise CLIError(f"--restarts must be at least 1, got {a.restarts}")
    if os.path.abspath(a.out) == os.path.abspath(a.data):
        raise CLIError("--out would overwrite the data file; choose another name")
    for path in (a.out, a.plot):
        # fail before the fit, not after it
        folder = os.path.dirname(os.path.abspath(path)) if path else "."
        if not os.path.isdir(folder):
            raise CLIError(f"the output folder {folder!r} does not exist")
    header, rows = read_table(a.data)
    X = columns(header, rows, a.x, a.data)
    y = columns(header, rows, [a.y], a.data)[:, 0]
    G = None if a.dy is None else columns(header, rows, a.dy, a.data)
    _check_inputs(X, a.x, a.data)
    at = None
    if a.at is not None:
        h2, r2 = read_table(a.at, "points file")
        at = columns(h2, r2, a.x, a.at)
        if at.shape[0] == 0:
            raise CLIError(f"points file {a.at!r} has no data rows")
    if a.plot is not None:
        _pyplot()  # fail before the fit, not after it
    table, res, notes = estimate(
        X,
        y,
        list(a.x),
        G=G,
        at=at,
        kernel=a.kernel,
        hessian=a.hessian,
        restarts=a.restarts,
        seed=a.seed,
    )
    with _Outputs() as outputs:
        write_table(outputs, a.out, table)
        if a.plot is not None:
            plot(outputs, a.plot, X, y, list(a.x), table, G=G)
        outputs.commit()
    print(
        f"fitted a GP ({a.kernel}) to {X.shape[0]} rows of {a.data}"
        + ("" if G is None else " with measured derivatives"),
        file=out,
    )
    print(_indent(res.summary()), file=out)
    for n in notes:
        print(f"warning: {n}", file=out)
    print(f"wrote {len(next(iter(table.values())))} rows to {a.out}", file=out)
    if a.plot is not None:
        print(f"wrote the figure to {a.plot}", file=out)
    return 0


def _indent(text):
    return "\n".join("  " + line for line in text.splitlines())


def _demo_cmd(a, out):
    if not os.path.isdir(a.out):
        raise CLIError(f"the output folder {a.out!r} does not exist")
    src = resources.files("gpgrad").joinpath("data", DEMO_FILE)
    with resources.as_file(src) as path:
        header, rows = read_table(str(path))
        X = columns(header, rows, ["time"], DEMO_FILE)
        y = columns(header, rows, ["signal"], DEMO_FILE)[:, 0]
    grid = np.linspace(X.min(), X.max(), 201)[:, None]
    table, res, notes = estimate(X, y, ["time"], at=grid)
    t = grid[:, 0]
    true_d = np.cos(t) + 1.15 * np.cos(2.3 * t + 0.4)
    err = np.asarray(table["df/dtime_mean"]) - true_d
    inside = np.abs(err) <= Z95 * np.asarray(table["df/dtime_std"])
    csv_path = os.path.join(a.out, "gpgrad_demo.csv")
    png_path = os.path.join(a.out, "gpgrad_demo.png")
    truth = {"f": np.sin(t) + 0.5 * np.sin(2.3 * t + 0.4), "df/dtime": true_d}
    with _Outputs() as outputs:
        write_table(outputs, csv_path, table)
        plot(
            outputs,
            png_path,
            X,
            y,
            ["time"],
            table,
            truth=truth,
            title="gpgrad demo: noisy series and its derivative (95% bands)",
        )
        outputs.commit()
    print(
        f"gpgrad demo: {X.shape[0]} noisy samples of f(t) = sin t + "
        "0.5 sin(2.3 t + 0.4) (noise sd 0.08), shipped as gpgrad/data/"
        f"{DEMO_FILE}",
        file=out,
    )
    print("fitted a Matern-5/2 GP by maximum marginal likelihood:", file=out)
    print(_indent(res.summary()), file=out)
    for n in notes:
        print(f"warning: {n}", file=out)
    print(
        f"derivative on {len(t)} points: RMSE {np.sqrt(np.mean(err**2)):.3f} "
        f"against the true df/dt, {100 * inside.mean():.0f}% of it inside the "
        "95% band",
        file=out,
    )
    print(f"wrote {csv_path}", file=out)
    print(f"wrote {png_path}", file=out)
    return 0


def main(argv=None, out=None) -> int:
    """Run the command; returns the exit code (0, or 2 on bad input)."""
    out = sys.stdout if out is None else out
    parser = _parser()
    try:
        a = parser.parse_args(argv)
        if a.command is None:
            parser.print_help(out)
            return 0
        if a.command == "demo":
            return _demo_cmd(a, out)
        return _estimate_cmd(a, out)
    except CLIError as e:
        print(f"gpgrad: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
