"""The ``gpgrad`` command: derivatives with error bars from a CSV file.

``gpgrad demo`` fits a GP to a small noisy series shipped with the package and
writes its derivative with 95 % bands (CSV and PNG). ``gpgrad estimate`` does
the same for your data::

    gpgrad estimate data.csv --x t --y signal --out derivative.csv --plot fig.png

Each output row holds the input columns (the text exactly as read), ``f_mean``,
``f_std`` and, for every input column ``X``, ``df/dX_mean`` and ``df/dX_std``
(with ``--hessian`` also ``d2f/dXdY_mean`` and ``d2f/dXdY_std`` for every pair
``X ≤ Y`` in ``--x`` order). A 95 % band is ``mean ± 1.96 std``.

Guarantees:

* an output never replaces an input (paths are compared as real files, through
  symbolic and hard links) nor another output;
* the user sees all outputs or none: every output is written to a temporary
  file beside its destination and all are renamed only when all are complete
  (an earlier rename is rolled back if a later one fails);
* every refusal (bad input, an output that cannot be written, a fit that would
  not fit in memory, an allocation failure) is one line on stderr and exit
  code 2, checked before any work where it can be.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

__all__ = [
    "main",
    "CLIError",
    "Cost",
    "estimate_cost",
    "fit_model",
    "read_table",
]

#: ``--kernel`` names and the kernel class of :mod:`gpgrad.kernels` each makes
#: (a name whose class this version lacks is left out). A model that is not a
#: single kernel (such as an average over kernels) is one more branch of
#: :func:`fit_model`.
KERNELS = {
    "matern52": "Matern52",
    "matern32": "Matern32",
    "matern72": "Matern72",
    "rbf": "RBF",
    "rq": "RationalQuadratic",
}
#: ``--kernel auto`` (Bayesian model averaging over kernel families) up to
#: this many rows; a longer 1-D series averages the Matérn family in linear
#: time (``fit_auto(family="statespace")``), other data fit ``matern52``
AUTO_MAX_ROWS = 5_000
#: ``--max-minutes``: a fit estimated to take longer is refused before it starts
MAX_MINUTES = 30.0
#: fewest data rows the command fits a GP to
MIN_ROWS = 3
#: the demo data: f(t) = sin t + 0.5 sin(2.3 t + 0.4), noise sd 0.08
DEMO_FILE = "demo_series.csv"
Z95 = 1.959963984540054
#: points of the grid a one-input figure draws its curves on
PLOT_GRID = 400
#: progress lines start once a fit has run this long (seconds) ...
PROGRESS_AFTER_S = 3.0
#: ... and follow at most this often
PROGRESS_EVERY_S = 5.0
#: a fit may plan to use this fraction of the available memory
MEMORY_FRACTION = 0.8
#: query points per prediction chunk are bounded by this many covariance entries
PREDICT_CHUNK_ENTRIES = 1 << 22


class CLIError(Exception):
    """A problem with the command's input: reported on one line, exit code 2."""


def _version():
    from . import __version__

    return __version__


def _kernel_names():
    from . import kernels

    return [n for n, cls in KERNELS.items() if hasattr(kernels, cls)] + ["auto"]


# --------------------------------------------------------------------------
# the parser: one line per error, every option at most once


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, not argparse's usage block, so scripts can log it
        raise CLIError(f"{message} (see '{self.prog} --help')")


class _Once:
    """Refuse an option given twice (argparse would keep the last silently)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_given", set())
        if self.dest in seen:
            hint = ""
            if self.nargs == "+":
                hint = f"; list several after one {option_string}: {option_string} a b"
            raise argparse.ArgumentError(self, f"given twice{hint}")
        seen.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _StoreOnce(_Once, argparse._StoreAction):
    pass


class _StoreTrueOnce(_Once, argparse._StoreTrueAction):
    pass


def _sub(sub, name, **kw):
    p = sub.add_parser(name, **kw)
    p.register("action", None, _StoreOnce)
    p.register("action", "store", _StoreOnce)
    p.register("action", "store_true", _StoreTrueOnce)
    return p


def _parser():
    p = _Parser(
        prog="gpgrad",
        description="Estimate derivatives with credible bands from noisy data "
        "by Gaussian-process regression with fitted hyperparameters. Never "
        "writes over an input; writes all outputs or none; any refusal is one "
        "line on stderr and exit code 2.",
    )
    p.add_argument("--version", action="version", version=f"gpgrad {_version()}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    demo = _sub(
        sub,
        "demo",
        help="fit the shipped example series and write its derivative",
        description="Fit a GP to a noisy series shipped with gpgrad, write the "
        "derivative with 95%% bands to gpgrad_demo.csv and gpgrad_demo.png "
        "in the folder DIR.",
    )
    demo.add_argument("--out", default=".", metavar="DIR", help="output folder")
    demo.add_argument("--quiet", action="store_true", help="no progress lines")
    est = _sub(
        sub,
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
        help="measured derivatives of y, one column per --x column, same order; "
        "an empty cell means 'not measured at this row'",
    )
    est.add_argument(
        "--kernel",
        default="auto",
        choices=_kernel_names(),
        help="covariance kernel; 'auto' (the default) averages Matérn, RBF, "
        "rational-quadratic, periodic and cubic models and their trend, two-scale "
        "and warped variants by their evidence (up to "
        f"{AUTO_MAX_ROWS:,} rows; a longer one-column series averages the "
        "Matérn family in linear time, other data use matern52)",
    )
    est.add_argument(
        "--at",
        metavar="POINTS.csv",
        help="where to estimate (default: the data's own inputs)",
    )
    est.add_argument("--out", required=True, metavar="OUT.csv")
    est.add_argument(
        "--plot",
        metavar="FIG",
        help="also draw a figure; the format follows the extension (.png, .pdf, "
        ".svg, ...)",
    )
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
    est.add_argument(
        "--max-minutes",
        type=float,
        default=MAX_MINUTES,
        metavar="M",
        help="refuse a fit whose estimated time exceeds M minutes "
        f"(default {MAX_MINUTES:g})",
    )
    est.add_argument(
        "--delimiter",
        default=",",
        metavar="C",
        help="field separator of the CSV files (default ','; '\\t' for tab)",
    )
    est.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


# --------------------------------------------------------------------------
# reading: a fast float parser for big files; the original text of the columns
# that are written back is kept (read lazily on the fast path)


def _delimiter(text):
    if text in ("\\t", "tab", "TAB"):
        return "\t"
    if len(text) != 1 or text in '\r\n"':
        raise CLIError(
            f"--delimiter must be one character (or '\\t' for tab), got {text!r}"
        )
    return text


_DELIMITER_NAMES = {";": "semicolon", "\t": "tab", "|": "pipe", ",": "comma"}


class Table:
    """A CSV file: its header now, its columns on demand.

    Parameters
    ----------
    path : str
    what : str
        How messages name the file ("data file", "points file").
    delimiter : str
    """

    def __init__(self, path, what="data file", delimiter=","):
        self.path, self.what, self.delimiter = path, what, delimiter
        self._rows = None  # the slow path's rows: (line number, cells)
        self._fast_cols = None  # the fast path's columns by index
        self._text = {}  # column name -> list of str
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.reader(fh, delimiter=delimiter)
                first = next((r for r in reader if any(c.strip() for c in r)), None)
        except FileNotFoundError:
            raise CLIError(f"{what} {path!r} does not exist") from None
        except IsADirectoryError:
            raise CLIError(f"{what} {path!r} is a folder, not a CSV file") from None
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise CLIError(f"cannot read {what} {path!r}: {e}") from None
        if first is None:
            raise CLIError(f"{what} {path!r} is empty; expected a header row")
        self.header = [h.strip() for h in first]

    # -- columns --------------------------------------------------------------

    def index(self, name):
        if name in self.header:
            return self.header.index(name)
        msg = (
            f"column {name!r} is not in {self.path!r}; its columns are "
            f"{', '.join(self.header)}"
        )
        if len(self.header) == 1:
            for d, word in _DELIMITER_NAMES.items():
                if d != self.delimiter and d in self.header[0]:
                    arg = "'\\t'" if d == "\t" else repr(d)
                    msg += (
                        f" (one column only: the file looks {word}-separated; "
                        f"pass --delimiter {arg})"
                    )
                    break
        raise CLIError(msg)

    def numbers(self, names, missing_ok=False, *, also=()):
        """The named columns as floats, (rows, len(names)).

        Empty cells are NaN where ``missing_ok``, an error otherwise; a cell
        that is not a finite number is an error naming its line. Columns named
        in ``also`` are parsed in the same pass, for later calls.
        """
        idx = [self.index(n) for n in names]
        if self._rows is None:
            if self._fast_cols is None:
                want = sorted(set(idx) | {self.index(n) for n in also})
                self._fast_cols = self._fast(want) or {}
            if all(j in self._fast_cols for j in idx):
                return np.column_stack([self._fast_cols[j] for j in idx])
            self._rows = self._read_rows()
        return self._slow(idx, names, missing_ok)

    def text(self, names, values):
        """The original text of the named columns, checked against ``values``."""
        idx = [self.index(n) for n in names]
        cols = self._fast_text(idx) if self._rows is None else None
        if cols is None:
            if self._rows is None:
                self._rows = self._read_rows()
            cols = [
                [cells[j].strip() if j < len(cells) else "" for _, cells in self._rows]
                for j in idx
            ]
        try:
            check = np.array(cols, dtype=float).T.reshape(-1, len(idx))
        except ValueError:
            check = None
        # the fast parser may differ from Python's float() in the last bit
        if (
            check is None
            or check.shape != values.shape
            or not np.allclose(check, values, 1e-12, 0)
        ):
            raise CLIError(
                f"{self.what} {self.path!r} changed while gpgrad was reading it; "
                "run again"
            )
        return cols

    def _fast(self, idx):
        """``{column index: floats}`` by pandas' C parser (numpy's without
        pandas) when every cell of the columns ``idx`` (sorted) is a finite
        number, else None."""
        a = self._c_read(idx, float)
        if a is None:
            return None
        if a.shape[1] != len(idx) or not np.all(np.isfinite(a)):
            return None
        return dict(zip(idx, a.T))

    def _fast_text(self, idx):
        """The stripped text of the columns ``idx`` by the C parser that read
        the numbers (pandas', or numpy's without pandas), or None."""
        if not self._fast_cols:
            return None
        order = sorted(set(idx))
        a = self._c_read(order, str)
        if a is None or a.shape[1] != len(order):
            return None
        by = {j: a[:, i].tolist() for i, j in enumerate(order)}
        return [[c.strip() for c in by[j]] for j in idx]

    def _c_read(self, columns, dtype):
        """The columns (sorted indices) as a (rows, columns) array of floats
        or of their text (``dtype`` float or str) by pandas' C parser, or by
        numpy's where pandas is not installed; None on any doubt (the exact
        slow path decides then)."""
        try:
            import pandas  # noqa: F401
        except ImportError:  # pandas is optional
            return self._numpy(columns, dtype=dtype)
        try:
            if dtype is str:
                df = self._pandas(columns, dtype=str, keep_default_na=False)
                return df.to_numpy(dtype=object)
            return self._pandas(columns, dtype=float).to_numpy(dtype=float)
        except Exception:  # any doubt: the exact slow path decides
            return None

    def _numpy(self, columns, dtype=float):
        """The columns (sorted indices) as floats (or their text, ``dtype=str``)
        by numpy's C reader, or None where it has any doubt (a blank or short
        line, a quoted or empty cell, text): the exact slow path decides then.
        A million rows take about 1 s here against 8 s for the csv module's."""
        try:
            with open(self.path, encoding="utf-8-sig", newline="") as fh:
                first = fh.readline()
                if not first.strip():  # the header is not the first line
                    return None
                a = np.loadtxt(
                    fh, delimiter=self.delimiter, usecols=columns, dtype=dtype,
                    comments=None, ndmin=2, quotechar=None,
                )  # fmt: skip
        except Exception:  # any doubt: the exact slow path decides
            return None
        return a

    def _pandas(self, columns, **options):
        """The columns (sorted indices) of the file by pandas' C parser."""
        import pandas as pd

        return pd.read_csv(
            self.path,
            sep=self.delimiter,
            header=0,
            usecols=columns,
            encoding="utf-8-sig",
            skip_blank_lines=True,
            engine="c",
            **options,
        )

    def _read_rows(self):
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.reader(fh, delimiter=self.delimiter)
                rows = [
                    (reader.line_num, r) for r in reader if any(c.strip() for c in r)
                ]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise CLIError(f"cannot read {self.what} {self.path!r}: {e}") from None
        return rows[1:]

    def _slow(self, idx, names, missing_ok):
        out = np.empty((len(self._rows), len(names)))
        for r, (line, row) in enumerate(self._rows):
            for c, (j, name) in enumerate(zip(idx, names)):
                cell = row[j].strip() if j < len(row) else ""
                if not cell:
                    if missing_ok:
                        out[r, c] = np.nan
                        continue
                    raise CLIError(
                        f"{self.path!r} line {line}, column {name!r} is empty"
                    )
                try:
                    v = float(cell)
                except ValueError:
                    raise CLIError(
                        f"{self.path!r} line {line}, column {name!r}: {cell!r} is not "
                        "a number"
                    ) from None
                if not math.isfinite(v):
                    raise CLIError(
                        f"{self.path!r} line {line}, column {name!r} is {cell!r}; NaN "
                        "and infinite values cannot be fitted (drop the row)"
                    )
                out[r, c] = v
        return out


def read_table(path: str, what: str = "data file", delimiter: str = ",") -> Table:
    """Open a CSV file for :class:`Table`'s column reads, or :class:`CLIError`."""
    return Table(path, what, delimiter)


# --------------------------------------------------------------------------
# size before work: what a fit will cost, per solver method


@dataclass(frozen=True)
class Cost:
    """Estimated cost of a hyperparameter fit.

    Attributes
    ----------
    method : str
        The solver (``Posterior.method``).
    memory : int
        Peak bytes of one log marginal likelihood evaluation with its gradient.
    seconds : float
        Rough wall time of the whole fit on a few CPU cores.
    """

    method: str
    memory: int
    seconds: float


#: memory that does not grow with the problem (autograd buffers, libraries)
_BASE_MEMORY = 256 << 20
#: likelihood evaluations per optimizer start (typically 30-60)
EVALS_PER_START = 50
#: dense arithmetic rate assumed for the time estimate (flop/s)
_FLOPS = 1e10


def _dense_cost(rows, n_obs, d, state):
    # autograd keeps up to ~28 N_obs² float64 arrays (kernel, its inputs, the
    # factor and their gradients): 895-981 MiB measured at 2,000 rows, 1.15 GiB at
    # 3,000 (benchmarks/cli_sizing.py)
    memory = 28 * 8 * n_obs**2
    seconds = (1.5 * n_obs**3 + 200.0 * (d + 1) * n_obs**2) / _FLOPS
    return memory, seconds


def _cg_cost(rows, n_obs, d, state):
    # three N×N profile matrices and CG/Lanczos iterates under autograd:
    # about fifty N² float64 arrays measured at 1,000-2,000 rows
    memory = 50 * 8 * rows**2 * max(1, d)
    seconds = 100 * 17 * 30.0 * rows**2 * (d + 1) / _FLOPS
    return memory, seconds


def _statespace_cost(rows, n_obs, d, state):
    # about a dozen state × state float64 arrays per row: 0.93 GB peak
    # measured for `gpgrad estimate` on 10⁶ rows (Matérn-5/2), about as much
    # for the scans of an irregular series. Time per evaluation: 0.15 s per
    # 10⁶ rows of a Matérn-5/2 series on one core (regular grid; the scans of
    # an irregular series cost about 40 times more), measured with
    # benchmarks/timeseries.py
    memory = 12 * 8 * rows * state * state
    # a fixed part (transients, Python) that grows up to a few thousand rows
    seconds = 0.003 + 6e-6 * min(rows, 4096) + 1.7e-8 * rows * state * state
    return memory, seconds


def _statespace_seconds(rows, restarts, per_eval):
    """Time of a state-space fit: a long series runs its starts on a window
    of ``gpgrad.fit.WINDOW`` rows, then one start on all the rows (about 15
    evaluations)."""
    from .fit import WINDOW

    if rows <= 2 * WINDOW:
        return per_eval * EVALS_PER_START * restarts
    window = _statespace_cost(WINDOW, WINDOW, 1, 3)[1]
    return 15 * per_eval + window * EVALS_PER_START * restarts


#: per solver method: ``(rows, n_obs, d, state) -> (bytes, seconds per
#: evaluation)``. A new solver is one entry.
COSTS = {
    "cholesky": _dense_cost,
    "cg": _cg_cost,
    "statespace": _statespace_cost,
}

#: state dimension of the Matérn kernels' state-space form (ν + 1/2)
_STATE = {"matern32": 2, "matern52": 3, "matern72": 4}


def estimate_cost(
    method: str,
    rows: int,
    restarts: int,
    kernel: str = "matern52",
    *,
    d: int = 1,
    n_obs: int | None = None,
) -> Cost:
    """Memory and time of the fit about to run.

    Parameters
    ----------
    method : str
        A key of :data:`COSTS` (``"cholesky"``, ``"cg"``, ``"statespace"``).
    rows : int
        Data points.
    restarts : int
        Optimizer starts.
    kernel : str
        ``--kernel`` name (sets the state size of a state-space solver).
    d : int
        Input columns.
    n_obs : int, optional
        Scalar observations (default ``rows``; more with measured derivatives).

    Returns
    -------
    Cost

    Examples
    --------
    >>> from gpgrad.cli import estimate_cost
    >>> estimate_cost("cholesky", 1_000_000, 3).memory > 10**14  # 224 TB
    True
    """
    if method not in COSTS:
        raise ValueError(f"method must be one of {sorted(COSTS)}, got {method!r}")
    n_obs = rows if n_obs is None else n_obs
    memory, per_eval = COSTS[method](rows, n_obs, d, _STATE.get(kernel, 3))
    if method == "statespace":
        seconds = _statespace_seconds(rows, max(1, restarts), per_eval)
    else:
        seconds = per_eval * EVALS_PER_START * max(1, restarts)
    return Cost(method, int(memory + _BASE_MEMORY), float(seconds))


def _auto_statespace_cost(rows, n_obs, d) -> Cost:
    """``--kernel auto`` on the state-space family
    (``gpgrad.fit_auto(family="statespace")``), at its dearest: about six
    candidates (one a two-scale sum, state 8) each fitted on all rows like a
    long series (a window, then one start on all rows: what it does when an
    evenly spread subset would alias the series), Hessians on a window of
    ``STATESPACE_HESSIAN_WINDOW`` rows, then hyperparameter points and
    predictions worth about 60 evaluations on all rows, with several
    members' posteriors alive at once (measured peak: 6.7 GB at 1,000,000
    rows, ``benchmarks/results/auto_statespace.txt``)."""
    from .auto import STATESPACE_HESSIAN_WINDOW

    window = min(rows, STATESPACE_HESSIAN_WINDOW)
    memory, per_eval = _statespace_cost(rows, n_obs, d, 4)
    per_eval_sum = _statespace_cost(rows, n_obs, d, 8)[1]
    seconds = (
        6 * _statespace_seconds(rows, 1, per_eval_sum)
        + 4 * 50 * _statespace_cost(window, window, d, 4)[1]
        + 60 * per_eval
    )
    return Cost("statespace", int(5 * memory + _BASE_MEMORY), float(seconds))


def available_memory() -> int:
    """Bytes this process may still allocate: the system's available memory,
    lowered by a container's limit and by ``ulimit -v``."""
    from .solvers.select import available_memory as system

    avail = system()
    try:  # cgroup v2 (containers)
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as fh:
                avail = min(avail, int(limit) - int(fh.read()))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as fh:
                used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            avail = min(avail, soft - used)
    except (ImportError, OSError, ValueError):  # pragma: no cover - not Linux
        pass
    return max(0, int(avail))


def _fmt_bytes(n):
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def _fmt_time(s):
    if s < 60:
        return f"{s:.0f} s"
    if s < 600:
        return f"{s // 60:.0f} min {s % 60:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400 * 2:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"


_METHOD_NAMES = {
    "cholesky": "dense Cholesky",
    "cg": "conjugate gradients",
    "statespace": "linear-time state-space solver",
}


@dataclass
class Plan:
    """The fit the command will run and what it costs."""

    kernel: str
    method: str
    rows: int
    n_obs: int
    d: int
    restarts: int
    cost: Cost
    available: int
    note: str = ""

    def describe(self):
        return (
            f"{self.rows:,} rows ({self.kernel}, "
            f"{_METHOD_NAMES.get(self.method, self.method)}, {self.restarts} "
            f"start{'s' if self.restarts > 1 else ''})"
        )


def _statespace_applies(kernel, X, observations):
    """Whether the state-space solver exists and accepts this problem."""
    from .solvers.select import METHODS

    if "statespace" not in METHODS or X.shape[1] != 1 or kernel not in KERNELS:
        return False
    import gpgrad

    try:  # a tiny problem of the same kind answers it
        gpgrad.GP(_make_kernel(kernel), noise=0.1, method="statespace").condition(
            *[_head(f, 4) for f in observations]
        )
    except (ValueError, TypeError, NotImplementedError):
        return False
    return True


def _head(obs, m):
    """The first ``m`` entries of an observation built by :func:`_observations`."""
    kind, args = obs
    import gpgrad

    return getattr(gpgrad, kind)(*[a[:m] for a in args])


def plan_fit(
    kernel: str,
    X: np.ndarray,
    observations: list,
    restarts: int,
    path: str = "data",
    max_minutes: float = math.inf,
) -> Plan:
    """Choose the solver and check the fit's size before any work.

    Returns
    -------
    Plan

    Raises
    ------
    CLIError
        One line naming the size, the memory needed, the memory available and
        the way out, when the fit would not fit in memory; or the estimated
        time and ``--max-minutes``, when it would take longer than that.
    """
    rows, d = X.shape
    n_obs = sum(int(np.size(args[-1])) for _, args in observations)
    note = ""
    auto_ss = False
    if kernel == "auto" and rows > AUTO_MAX_ROWS:
        auto_ss = _statespace_applies("matern52", X, observations)
        if auto_ss:
            note = (
                f"--kernel auto averages every family up to {AUTO_MAX_ROWS:,} "
                f"rows; {rows:,} rows average the Matérn family (3/2, 5/2, 7/2 "
                "and two-scale sums) in linear time"
            )
        else:
            kernel = "matern52"
            note = (
                f"--kernel auto averages kernels up to {AUTO_MAX_ROWS:,} rows; "
                f"{rows:,} rows are fitted with matern52"
            )
    if auto_ss:
        method = "statespace"
        cost = _auto_statespace_cost(rows, n_obs, d)
    else:
        ss = kernel != "auto" and _statespace_applies(kernel, X, observations)
        method = "statespace" if ss else "cholesky"
        # auto: about five families on a subset, then up to four on all rows
        starts = restarts + 4 if kernel == "auto" else restarts
        cost = estimate_cost(method, rows, starts, kernel, d=d, n_obs=n_obs)
    avail = available_memory()
    plan = Plan(kernel, method, rows, n_obs, d, restarts, cost, avail, note)
    if cost.memory <= MEMORY_FRACTION * avail:
        if cost.seconds > 60.0 * max_minutes:
            raise CLIError(
                f"{path!r}: fitting {plan.describe()} would take about "
                f"{_fmt_time(cost.seconds)} (estimate); pass --max-minutes "
                f"{math.ceil(cost.seconds / 60)} to run it anyway, or fit fewer rows"
            )
        return plan
    # the way out: the rows that would fit, and a linear-time kernel if any
    per_row = n_obs / rows
    lo, hi = MIN_ROWS, rows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        need = estimate_cost(
            method, mid, restarts, kernel, d=d, n_obs=int(mid * per_row)
        ).memory
        lo, hi = (mid, hi) if need <= MEMORY_FRACTION * avail else (lo, mid)
    way = f"fit at most about {lo:,} rows (e.g. one row in {math.ceil(rows / lo)})"
    from .solvers.select import METHODS

    if not ss and "statespace" in METHODS and d == 1 and kernel not in _STATE:
        way += " or use --kernel matern32 or matern52, which fit one input column in "
        way += "linear time"
    raise CLIError(
        f"{path!r}: fitting {plan.describe()} needs about "
        f"{_fmt_bytes(cost.memory)} of memory but {_fmt_bytes(avail)} is "
        f"available; {way}"
    )


# --------------------------------------------------------------------------
# the model: one function from a --kernel name to a fitted posterior


def _make_kernel(name):
    from . import kernels

    if name not in KERNELS or not hasattr(kernels, KERNELS[name]):
        raise CLIError(f"unknown kernel {name!r}; choose from {_kernel_names()}")
    return getattr(kernels, KERNELS[name])()


def _observations(X, y, G=None):
    """``[(constructor name, args)]``: values, and measured derivatives (full
    gradients, or single partials where some ``G`` cells are NaN)."""
    obs = [("values", (X, y))]
    if G is not None:
        have = ~np.isnan(G)
        if have.all():
            obs.append(("gradients", (X, G)))
        elif have.any():
            rows, dims = np.nonzero(have)
            obs.append(("partials", (X[rows], dims, G[rows, dims])))
    return obs


@dataclass
class Fitted:
    """A fitted model: ``posterior`` answers ``.value``, ``.gradient`` and
    ``.hessian`` with predictions holding ``.mean`` and ``.std``."""

    posterior: object
    summary: str
    notes: list = field(default_factory=list)
    order: int = 2


def fit_model(
    kernel: str,
    observations: list,
    *,
    d: int,
    restarts: int = 3,
    seed: int = 0,
    method: str = "auto",
    progress=False,
) -> Fitted:
    """Fit the model named by ``--kernel`` to the observations.

    Parameters
    ----------
    kernel : str
        A key of :data:`KERNELS`. A model that is not one kernel (an average
        over kernels, ``--kernel auto``) is one more branch here returning a
        :class:`Fitted`, plus its name in the parser's ``--kernel`` choices.
    observations : list of (str, tuple)
        From :func:`_observations`.
    d : int
        Input columns (ARD lengthscales when > 1).
    method : str
        The solver, as ``GP(method=...)``.
    progress : bool or callable
        As for :func:`gpgrad.fit`.

    Returns
    -------
    Fitted
    """
    import gpgrad

    obs = [getattr(gpgrad, name)(*args) for name, args in observations]
    if kernel == "auto":
        # the state-space plan averages the Matérn family in linear time
        family = "statespace" if method == "statespace" else "default"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            post = gpgrad.fit_auto(*obs, restarts=restarts, seed=seed, family=family)
        notes = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
        return Fitted(post, post.summary(), notes, 2)
    k = _make_kernel(kernel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = gpgrad.fit(
            gpgrad.GP(k, method=method),
            *obs,
            ard=d > 1,
            restarts=restarts,
            seed=seed,
            progress=progress,
        )
    notes = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
    return Fitted(res.posterior, res.summary(), notes, k.order)


def predict_table(
    model: Fitted, P: np.ndarray, names: list, *, hessian: bool = False, text=None
) -> dict:
    """Output columns at points ``P`` (m, d), predicted in chunks.

    ``text`` (list of d lists of str) replaces the input columns by their
    original text.
    """
    post = model.posterior
    m, d = P.shape
    n_obs = sum(int(np.size(f.y)) for f in getattr(post, "observations", [])) or 1
    per_point = (d + 1) * (d + 2) if hessian else d + 1
    step = max(1, PREDICT_CHUNK_ENTRIES // (n_obs * per_point))
    if getattr(post, "method", None) == "statespace":
        # the smoother answers marginals in O(m) memory: no cross-covariance
        step = max(step, PREDICT_CHUNK_ENTRIES // per_point)
    parts = {"f": [], "g": [], "h": []}
    for s in range(0, m, step):
        Q = P[s : s + step]
        v = post.value(Q)
        g = post.gradient(Q)
        parts["f"].append((np.asarray(v.mean), np.asarray(v.std)))
        parts["g"].append((np.asarray(g.mean), np.asarray(g.std)))
        if hessian:
            h = post.hessian(Q)
            parts["h"].append((np.asarray(h.mean), np.asarray(h.std)))

    def cat(key, i):
        return np.concatenate([p[i] for p in parts[key]]) if m else np.empty(0)

    table = {}
    for i, n in enumerate(names):
        table[n] = text[i] if text is not None else P[:, i]
    table["f_mean"], table["f_std"] = cat("f", 0), cat("f", 1)
    gm, gs = cat("g", 0), cat("g", 1)
    for i, n in enumerate(names):
        table[f"df/d{n}_mean"] = gm[:, i]
        table[f"df/d{n}_std"] = gs[:, i]
    if hessian:
        hm, hs = cat("h", 0), cat("h", 1)
        for i in range(d):
            for j in range(i, d):
                key = f"d2f/d{names[i]}d{names[j]}"
                table[f"{key}_mean"] = hm[:, i, j]
                table[f"{key}_std"] = hs[:, i, j]
    return table


# --------------------------------------------------------------------------
# progress on stderr


class Progress:
    """Progress lines for a fit that runs longer than a few seconds.

    Called by :func:`gpgrad.fit` as ``progress(start, evaluation, lml)``.
    """

    def __init__(self, plan, stream=None, quiet=False):
        self.plan, self.quiet = plan, quiet
        self.stream = sys.stderr if stream is None else stream
        self.t0 = time.perf_counter()
        self.last = None
        self.count = 0
        if plan.cost.seconds >= PROGRESS_AFTER_S:
            self._header()

    def _say(self, text):
        if not self.quiet:
            print(f"gpgrad: {text}", file=self.stream, flush=True)
        self.last = time.perf_counter()

    def _header(self):
        c = self.plan.cost
        self._say(
            f"fitting {self.plan.describe()}: needs about {_fmt_bytes(c.memory)} "
            f"of {_fmt_bytes(self.plan.available)} available, roughly "
            f"{_fmt_time(c.seconds)}"
            + ("; Ctrl-C stops it and writes nothing" if c.seconds > 600 else "")
        )

    def __call__(self, start, evaluation, lml):
        self.count = evaluation
        now = time.perf_counter()
        if now - self.t0 < PROGRESS_AFTER_S:
            return
        if self.last is None:
            self._header()
        elif now - self.last < PROGRESS_EVERY_S:
            return
        self._say(
            f"{self._stage(start)}, evaluation {evaluation}, log "
            f"marginal likelihood {float(np.sum(lml)):.6g}, "
            f"{_fmt_time(now - self.t0)} elapsed"
        )

    def _stage(self, start):
        """Which fit is running: a start, or for a long series of values
        fitted by the state-space solver the single whole-series fit that
        follows the starts on a window (:data:`gpgrad.fit.WINDOW`)."""
        from .fit import WINDOW

        plan = self.plan
        values_only = plan.n_obs == plan.rows
        if plan.method == "statespace" and values_only and plan.n_obs > 2 * WINDOW:
            return f"whole series (from a {WINDOW:,}-sample window's fit)"
        return f"start {start}/{self.plan.restarts}"

    def done(self):
        if self.last is not None:
            # --kernel auto's fits do not report their evaluations here
            count = f" ({self.count} evaluations)" if self.count else ""
            self._say(f"fitted in {_fmt_time(time.perf_counter() - self.t0)}{count}")


# --------------------------------------------------------------------------
# outputs: checked before any work, staged beside their destinations,
# committed all together or not at all


def _plot_format(path):
    import matplotlib.figure  # noqa: F401 - registers the backends
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in formats:
        got = f"'.{ext}'" if ext else "no extension"
        raise CLIError(
            f"--plot {path!r}: the figure format follows the extension, and "
            f"{got} is not one matplotlib writes; use .png, .pdf or .svg "
            f"(or {', '.join(sorted(set(formats) - {'png', 'pdf', 'svg'}))})"
        )
    return ext


class _Outputs:
    """Check, stage and commit a command's outputs.

    :meth:`add` checks a destination before any work (not an input, not
    another output, not a folder, in a folder that exists and can be written)
    and reserves its temporary file beside it; :meth:`commit` renames every
    temporary into place, or restores what was there if a rename fails.
    """

    def __init__(self, inputs):
        # (label, path) of every input; outputs may not be any of them
        self.inputs = [(lab, p) for lab, p in inputs if p is not None]
        self.staged = []  # (label, path, real destination, temporary)

    def add(self, label, path):
        real = os.path.realpath(path)
        if os.path.isdir(path):
            example = os.path.join(path, "out.csv" if label == "--out" else "fig.png")
            raise CLIError(
                f"{label} {path!r} is a folder; give a file name such as {example!r}"
            )
        folder = os.path.dirname(real)
        if not os.path.isdir(folder):
            shown = os.path.dirname(path) or "."
            raise CLIError(f"the folder {shown!r} of {label} {path!r} does not exist")
        for ilab, ipath in self.inputs:
            if _same_file(real, path, ipath):
                raise CLIError(
                    f"{label} {path!r} is the {ilab} {ipath!r}; gpgrad never writes "
                    "over an input: choose another name"
                )
        for olab, opath, _, _ in self.staged:
            if _same_file(real, path, opath):
                raise CLIError(
                    f"{label} {path!r} and {olab} {opath!r} are the same file; "
                    "give each output its own name"
                )
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=".gpgrad-", suffix=os.path.splitext(path)[1], dir=folder
            )
        except OSError as e:
            raise CLIError(
                f"cannot write {label} {path!r}: the folder {folder!r} is not "
                f"writable ({e.strerror})"
            ) from None
        os.close(fd)
        self.staged.append((label, path, real, tmp))
        return tmp

    def write(self, path, writer):
        """Write the staged temporary of ``path`` with ``writer(tmp)``."""
        label, _, _, tmp = next(s for s in self.staged if s[1] == path)
        try:
            writer(tmp)
        except OSError as e:
            raise CLIError(f"cannot write {label} {path!r}: {e}") from None
        # mkstemp creates owner-only files; give the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)

    def commit(self):
        backups = {}
        done = []
        try:
            for *_, real, _ in self.staged:
                if os.path.exists(real):
                    backups[real] = _backup(real)
            for label, path, real, tmp in self.staged:  # noqa: B007 - in the message
                os.replace(tmp, real)
                done.append(real)
        except OSError as e:
            for real in reversed(done):
                try:
                    if real in backups:
                        os.replace(backups.pop(real), real)
                    else:
                        os.remove(real)
                except OSError:  # pragma: no cover - nothing more to do
                    pass
            raise CLIError(
                f"cannot write {label} {path!r}: {e.strerror or e}; no output was "
                "written"
            ) from None
        finally:
            for b in backups.values():
                if os.path.exists(b):
                    os.remove(b)
        self.staged = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for *_, tmp in self.staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        return False


def _same_file(real, path, other):
    if real == os.path.realpath(other):
        return True
    try:  # hard links: two names, one file
        return os.path.exists(path) and os.path.samefile(path, other)
    except OSError:
        return False


def _backup(real):
    """A second name for an existing destination, to restore it on rollback."""
    fd, tmp = tempfile.mkstemp(prefix=".gpgrad-old-", dir=os.path.dirname(real))
    os.close(fd)
    os.remove(tmp)
    try:
        os.link(real, tmp)
    except OSError:
        shutil.copy2(real, tmp)
    return tmp


def write_table(outputs, path, table):
    """Write the output columns as CSV into the staged temporary of ``path``.

    Text columns (lists of str) are written as they are, number columns with
    10 significant digits.
    """
    keys = list(table)
    texts = [table[k] for k in keys if isinstance(table[k], list)]
    # no text cell needs quoting: one %-format per row (about 3 times faster)
    plain = not any(set("".join(c)) & set(',"\r\n') for c in texts + [keys])
    if plain:
        cols = [
            c if isinstance(c, list) else np.asarray(c, dtype=float).tolist()
            for c in table.values()
        ]
        fmt = ",".join("%s" if isinstance(c, list) else "%.10g" for c in table.values())
        fmt += "\n"
    else:
        cols = []
        for k in keys:
            c = table[k]
            if isinstance(c, list):
                cols.append(c)
            else:
                cols.append([f"{v:.10g}" for v in np.asarray(c, dtype=float).tolist()])

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            if plain:
                fh.write(",".join(keys) + "\n")
                fh.writelines([fmt % row for row in zip(*cols)])
                return
            w = csv.writer(fh)
            w.writerow(keys)
            w.writerows(zip(*cols))

    outputs.write(path, write)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'gpgrad[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(
    outputs, path, X, y, names, table, *, ylabel="f", G=None, grid=None, at=None,
    truth=None, title="",
):  # fmt: skip
    """Draw the data, f and each first derivative with 95 % bands.

    One input: the posterior mean as a smooth curve over ``grid`` (a table of
    predictions on a dense grid) with its band, which widens across gaps in
    the data; the data and the ``at`` points (the output table's points) as
    markers. Several inputs: one panel per quantity against its own input
    column, with error bars at the output points.
    """
    plt = _pyplot()
    fmt = _plot_format(path)
    d = X.shape[1]
    P = np.column_stack([np.asarray(table[n], dtype=float) for n in names])
    panels = [("f", ylabel, 0, y)] + [
        (f"df/d{n}", f"d{ylabel}/d{n}", i, None if G is None else G[:, i])
        for i, n in enumerate(names)
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)))
    axes = np.atleast_1d(axes)
    for ax, (key, label, i, data) in zip(axes, panels):
        m = np.asarray(table[f"{key}_mean"])
        s = np.asarray(table[f"{key}_std"])
        xs = P[:, i]
        if d == 1 and grid is not None:
            t = np.asarray(grid[names[0]], dtype=float)
            gm, gs = np.asarray(grid[f"{key}_mean"]), np.asarray(grid[f"{key}_std"])
            ax.fill_between(
                t, gm - Z95 * gs, gm + Z95 * gs, alpha=0.3, label="95% band"
            )
            ax.plot(t, gm, lw=1.5, label="posterior mean")
        else:
            ax.errorbar(xs, m, yerr=Z95 * s, fmt=".", ms=3, label="mean, 95%")
        if data is not None:
            ok = np.isfinite(data)
            ax.plot(X[ok, i], data[ok], "k.", ms=3, label="data")
        if at is not None and d == 1:
            ax.errorbar(
                xs, m, yerr=Z95 * s, fmt="o", ms=4, mfc="none", color="C3",
                label="--at points",
            )  # fmt: skip
        if truth is not None and key in truth:
            t = np.asarray(grid[names[0]], dtype=float)
            ax.plot(t, truth[key], "k--", lw=1, label="truth")
        ax.set_ylabel(label)
        ax.set_xlabel(names[i])
        ax.legend(fontsize=7, loc="best")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    try:
        outputs.write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt))
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


@contextlib.contextmanager
def _memory_errors(plan, path):
    """Report an allocation failure inside as memory, on one line."""
    from .exceptions import is_out_of_memory

    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(
            f"ran out of memory fitting {path!r}, {plan.describe()}: {first} "
            f"(estimated need {_fmt_bytes(plan.cost.memory)}, available "
            f"{_fmt_bytes(plan.available)}); fit fewer rows"
        ) from None


def _run_fit(plan, observations, *, restarts, seed, quiet):
    """The fit, with progress lines on stderr."""
    from .exceptions import NotPositiveDefiniteError

    progress = Progress(plan, quiet=quiet)
    try:
        model = fit_model(
            plan.kernel,
            observations,
            d=plan.d,
            restarts=restarts,
            seed=seed,
            method=plan.method,
            progress=progress,
        )
    except (NotPositiveDefiniteError, ValueError) as e:
        # the library's own refusals name what was expected and what was given
        raise CLIError(f"the fit failed: {str(e).splitlines()[0]}") from None
    progress.done()
    return model


def _grid_table(model, X, at, names):
    lo, hi = X[:, 0].min(), X[:, 0].max()
    if at is not None:
        lo, hi = min(lo, at[:, 0].min()), max(hi, at[:, 0].max())
    t = np.linspace(lo, hi, PLOT_GRID)
    return predict_table(model, t[:, None], names)


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
    delim = _delimiter(a.delimiter)
    names = list(a.x)
    with _Outputs([("data file", a.data), ("points file", a.at)]) as outputs:
        # every output is checked (and its temporary reserved) before any work
        outputs.add("--out", a.out)
        if a.plot is not None:
            _pyplot()
            outputs.add("--plot", a.plot)
            _plot_format(a.plot)
        data = Table(a.data, "data file", delim)
        points = None if a.at is None else Table(a.at, "points file", delim)
        X = data.numbers(names, also=[a.y, *(a.dy or [])])
        y = data.numbers([a.y])[:, 0]
        G = None if a.dy is None else data.numbers(a.dy, missing_ok=True)
        _check_inputs(X, names, a.data)
        at = None
        if points is not None:
            at = points.numbers(names)
            if at.shape[0] == 0:
                raise CLIError(f"points file {a.at!r} has no data rows")
        if a.hessian and a.kernel in KERNELS and _make_kernel(a.kernel).order < 2:
            raise CLIError(
                f"--hessian needs a twice differentiable kernel; {a.kernel} is only "
                "once: use --kernel matern52, rbf or rq"
            )
        observations = _observations(X, y, G)
        plan = plan_fit(a.kernel, X, observations, a.restarts, a.data, a.max_minutes)
        source, P = (data, X) if at is None else (points, at)
        with _memory_errors(plan, a.data):
            model = _run_fit(
                plan, observations, restarts=a.restarts, seed=a.seed, quiet=a.quiet
            )
            table = predict_table(
                model, P, names, hessian=a.hessian, text=source.text(names, P)
            )
            grid = None
            if a.plot is not None and len(names) == 1:
                grid = _grid_table(model, X, at, names)
        write_table(outputs, a.out, table)
        if a.plot is not None:
            plot(
                outputs, a.plot, X, y, names, table, ylabel=a.y, G=G, grid=grid,
                at=at,
            )  # fmt: skip
        outputs.commit()
    n_dy = 0 if G is None else int(np.sum(~np.isnan(G)))
    print(
        f"fitted a GP ({plan.kernel}) to {X.shape[0]} rows of {a.data}"
        + ("" if not n_dy else f" with {n_dy} measured derivatives"),
        file=out,
    )
    if plan.note:
        print(f"  note: {plan.note}", file=out)
    print(_indent(model.summary), file=out)
    for n in model.notes:
        print(f"warning: {n}", file=out)
    print(f"wrote {P.shape[0]} rows to {a.out}", file=out)
    if a.plot is not None:
        print(f"wrote the figure to {a.plot}", file=out)
    return 0


def _indent(text):
    return "\n".join("  " + line for line in text.splitlines())


def _demo_cmd(a, out):
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise CLIError(
            f"demo --out {a.out!r} is a file; the demo writes gpgrad_demo.csv and "
            "gpgrad_demo.png into a folder: give a folder"
        )
    if not os.path.isdir(a.out):
        raise CLIError(f"the output folder {a.out!r} does not exist")
    csv_path = os.path.join(a.out, "gpgrad_demo.csv")
    png_path = os.path.join(a.out, "gpgrad_demo.png")
    src = resources.files("gpgrad").joinpath("data", DEMO_FILE)
    with resources.as_file(src) as path, _Outputs([("demo data", str(path))]) as outs:
        outs.add("--out", csv_path)
        _pyplot()
        outs.add("--out", png_path)
        data = Table(str(path))
        X = data.numbers(["time"])
        y = data.numbers(["signal"])[:, 0]
        observations = _observations(X, y)
        plan = plan_fit("matern52", X, observations, 3, DEMO_FILE)
        with _memory_errors(plan, DEMO_FILE):
            model = _run_fit(plan, observations, restarts=3, seed=0, quiet=a.quiet)
        grid = np.linspace(X.min(), X.max(), 201)[:, None]
        table = predict_table(model, grid, ["time"])
        t = grid[:, 0]
        true_d = np.cos(t) + 1.15 * np.cos(2.3 * t + 0.4)
        err = np.asarray(table["df/dtime_mean"]) - true_d
        inside = np.abs(err) <= Z95 * np.asarray(table["df/dtime_std"])
        truth = {"f": np.sin(t) + 0.5 * np.sin(2.3 * t + 0.4), "df/dtime": true_d}
        write_table(outs, csv_path, table)
        plot(
            outs, png_path, X, y, ["time"], table, ylabel="signal", grid=table,
            truth=truth,
            title="gpgrad demo: noisy series and its derivative (95% bands)",
        )  # fmt: skip
        outs.commit()
    print(
        f"gpgrad demo: {X.shape[0]} noisy samples of f(t) = sin t + "
        "0.5 sin(2.3 t + 0.4) (noise sd 0.08), shipped as gpgrad/data/"
        f"{DEMO_FILE}",
        file=out,
    )
    print("fitted a Matern-5/2 GP by maximum marginal likelihood:", file=out)
    print(_indent(model.summary), file=out)
    for n in model.notes:
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
    """Run the command; returns the exit code (0, 2 on any refusal, 130 when
    interrupted)."""
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
    except SystemExit as e:  # --help and --version
        return 0 if e.code is None else int(e.code)
    except KeyboardInterrupt:
        print("gpgrad: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
