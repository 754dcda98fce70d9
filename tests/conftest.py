"""Shared test configuration: every test starts from the same random state.

Tests draw their data from seeded generators; this fixture also fixes the
global generators (Python's ``random``, numpy's legacy ``np.random``, torch's
default generator) that a test or a library under test may use unseeded, so
that no test sees different data from one run to the next.
"""

import gc
import os
import random

import numpy as np
import pytest

try:
    import torch
except ImportError:  # the numpy-only install
    torch = None

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs in one process per core (pytest-xdist): one torch and one
    # BLAS thread each, so that the workers do not oversubscribe the cores
    # (OpenBLAS threads spin while they wait)
    if torch is not None:
        torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    _BLAS_LIMIT = threadpool_limits(limits=1)


# The cyclic garbage collector's full passes scan every tracked object, and
# the suite's imports (torch and its compiler stack, scipy, sklearn,
# matplotlib, gpytorch) leave millions of them alive to the end of the
# session. What is alive after this file's imports, after each test module's
# collection and after each test is frozen out of the collector's sight (once
# a pass has collected that step's garbage), so that its passes scan only
# what the current step makes: ~7 s per worker less, and pytest's five passes
# at the end of the session take no time.
gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    yield
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _fixed_global_seeds():
    random.seed(0)
    np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)
