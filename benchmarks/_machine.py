"""Shared helpers of the benchmark scripts: the machine, memory, isolated runs.

Every benchmark figure is taken in a process of its own so that its peak
resident memory (``VmHWM``, the high-water mark of the resident set, which
includes the interpreter and the imported libraries) belongs to that figure
alone. :func:`run_isolated` starts such a process, enforces a wall-time and a
resident-memory budget on it, and reports a budget overrun as such instead of
dropping it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = [
    "machine_info",
    "torch_info",
    "machine_line",
    "peak_rss_mb",
    "current_rss_mb",
    "median",
    "run_isolated",
    "REPO_ROOT",
]

#: the repository root, put on ``sys.path`` so the scripts run from a checkout
REPO_ROOT = Path(__file__).resolve().parent.parent


def _proc_status(pid="self"):
    """``/proc/<pid>/status`` as a dict of kB values (Linux), or {}."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB, interpreter included.

    Reads ``VmHWM`` from ``/proc/self/status`` (Linux); elsewhere falls back to
    ``ru_maxrss`` (kB on Linux, bytes on macOS).
    """
    st = _proc_status()
    if "VmHWM" in st:
        return st["VmHWM"] / 1024.0
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def current_rss_mb() -> float:
    """Current resident memory of this process in MiB (``VmRSS``), or NaN."""
    st = _proc_status()
    return st["VmRSS"] / 1024.0 if "VmRSS" in st else float("nan")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name):
    """The installed version of a distribution, without importing it."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torch_info() -> dict:
    """Torch's thread count and GPU (imports torch: call it in a worker)."""
    try:
        import torch
    except ImportError:
        return {"torch_threads": None, "cuda": False, "gpu": None}
    cuda = torch.cuda.is_available()
    return {
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def machine_info(torch_details=None) -> dict:
    """The machine and library versions that every figure depends on.

    ``torch_details`` is :func:`torch_info`'s result where the caller has it
    (from a worker process, so that the caller need not import torch).
    """
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "torch": _version("torch"),
        "gpytorch": _version("gpytorch"),
        "gpgrad": _gpgrad_version(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        with open("/proc/meminfo") as fh:
            total_kb = int(fh.readline().split()[1])
        info["memory_gib"] = round(total_kb / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        info["memory_gib"] = None
    try:
        import numpy as np

        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        name, version = blas.get("name", "?"), blas.get("version", "")
        info["numpy_blas"] = f"{name} {version}".strip()
    except Exception:  # noqa: BLE001 - older numpy: no dict config
        info["numpy_blas"] = None
    info.update(torch_details or {})
    return info


def _gpgrad_version():
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import gpgrad

        return gpgrad.__version__
    except ImportError:
        return None


def machine_line(info: dict) -> str:
    """One line naming the machine, for tables and logs."""
    parts = [f"{info['cpu']} ({info['cpu_count']} threads"]
    if info.get("torch_threads"):
        parts[0] += f", torch {info['torch_threads']} threads"
    parts[0] += ")"
    if info.get("memory_gib"):
        parts.append(f"{info['memory_gib']} GiB RAM")
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    libs = [
        f"{k} {info[k]}"
        for k in ("python", "numpy", "scipy", "torch", "gpytorch", "gpgrad")
        if info.get(k)
    ]
    parts.append(", ".join(libs))
    if info.get("load_average_1min") is not None:
        parts.append(f"load average {info['load_average_1min']:.2f} at start")
    return "; ".join(parts)


# --------------------------------------------------------------------------
# isolated runs


def _fork_entry(module_path, func_name, spec, result_path):
    # runs in a child forked from the fork server: import the worker module by
    # path (it is a script, not a package module) and write its result
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("_bench_worker", module_path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    result = getattr(mod, func_name)(spec)
    Path(result_path).write_text(json.dumps(result))


_FORK_CTX = None


def _fork_context(preload):
    global _FORK_CTX
    if _FORK_CTX is None:
        import multiprocessing as mp

        _FORK_CTX = mp.get_context("forkserver")
        # the server imports these once; every cell is forked from it, so a
        # cell costs milliseconds instead of an interpreter start
        _FORK_CTX.set_forkserver_preload(list(preload))
    return _FORK_CTX


def run_isolated(
    script,
    func_name,
    spec,
    *,
    time_budget=600.0,
    mem_budget_mb=8192.0,
    isolate="process",
    preload=(),
    poll=0.02,
):
    """Run ``func_name(spec)`` from ``script`` in a process of its own.

    Parameters
    ----------
    script : path
        A script whose ``--worker`` mode reads a JSON spec on stdin, calls
        ``func_name(spec)`` and writes its JSON result to the file named in
        ``spec["result_path"]``.
    spec : dict
        JSON-serializable description of the run.
    time_budget : float
        Seconds of wall time before the process is killed (status
        ``"timeout"``).
    mem_budget_mb : float
        Resident MiB before the process is killed (status ``"over memory"``),
        checked every ``poll`` seconds.
    isolate : {"process", "fork"}
        ``"process"``: a fresh interpreter per run (its peak memory includes
        the interpreter and every import, as a user would see it).
        ``"fork"``: a child of a fork server that has imported ``preload``
        already (much faster to start; the peak then counts the inherited,
        already-touched pages only, so it reads lower).

    Returns
    -------
    dict
        The worker's result with ``status`` ("ok", "timeout", "over memory" or
        "error"), ``wall_process_s`` and, when killed, ``peak_rss_mb`` as last
        seen.
    """
    fd, result_path = tempfile.mkstemp(suffix=".json", prefix="gpgrad_bench_")
    os.close(fd)
    spec = dict(spec, result_path=result_path)
    t0 = time.perf_counter()
    if isolate == "fork":
        ctx = _fork_context(preload)
        proc = ctx.Process(
            target=_fork_entry, args=(str(script), func_name, spec, result_path)
        )
        proc.start()
        pid = proc.pid

        def alive():
            return proc.is_alive()

        def kill():
            proc.kill()
            proc.join()

        def finish():
            proc.join()
            return proc.exitcode, ""

    elif isolate == "process":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        errf = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(
            [sys.executable, str(script), "--worker", func_name],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=errf,
            env=env,
            text=True,
        )
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        pid = proc.pid

        def alive():
            return proc.poll() is None

        def kill():
            proc.kill()
            proc.wait()

        def finish():
            rc = proc.wait()
            errf.seek(0)
            return rc, errf.read()[-2000:]

    else:
        raise ValueError(f"isolate must be 'process' or 'fork', got {isolate!r}")

    status, seen_peak = None, 0.0
    while alive():
        st = _proc_status(pid)
        if "VmHWM" in st:
            seen_peak = max(seen_peak, st["VmHWM"] / 1024.0)
        if seen_peak > mem_budget_mb:
            status = "over memory"
            kill()
            break
        if time.perf_counter() - t0 > time_budget:
            status = "timeout"
            kill()
            break
        time.sleep(poll)
    wall = time.perf_counter() - t0
    try:
        if status is not None:
            return {
                "status": status,
                "peak_rss_mb": seen_peak,
                "wall_process_s": wall,
                "message": (
                    f"killed after {wall:.1f} s (budget {time_budget:g} s)"
                    if status == "timeout"
                    else f"killed at {seen_peak:.0f} MiB (budget {mem_budget_mb:g} MiB)"
                ),
            }
        rc, err = finish()
        text = Path(result_path).read_text() if os.path.exists(result_path) else ""
        if rc != 0 or not text:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            return {
                "status": "error",
                "wall_process_s": wall,
                "message": lines[-1] if lines else f"worker exited with code {rc}",
            }
        result = json.loads(text)
        result.setdefault("status", "ok")
        result["wall_process_s"] = wall
        return result
    finally:
        try:
            os.unlink(result_path)
        except OSError:
            pass


def worker_main(namespace: dict):
    """Entry for ``script --worker FUNC``: spec on stdin, result to a file."""
    func = namespace[sys.argv[sys.argv.index("--worker") + 1]]
    spec = json.loads(sys.stdin.read())
    result = func(spec)
    Path(spec["result_path"]).write_text(json.dumps(result))
