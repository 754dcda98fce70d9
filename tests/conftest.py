"""Shared test configuration: every test starts from the same random state.

Tests draw their data from seeded generators; this fixture also fixes the
global generators (Python's ``random``, numpy's legacy ``np.random``, torch's
default generator) that a test or a library under test may use unseeded, so
that no test sees different data from one run to the next.
"""

import gc

# no cyclic garbage collection while the suite imports and collects (see
# pytest_runtestloop below): imports make next to no cyclic garbage
gc.disable()

import os  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

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
# session. The collector is off while they are imported and the tests
# collected; what is alive then, and after each test (once a pass has
# collected that test's garbage), is frozen out of its sight, so that its passes
# scan only what the current test makes: ~8 s per worker less, and pytest's
# five passes at the end of the session take no time.


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    # frozen without a pass first: a full pass over everything imported costs
    # ~0.5 s, and what little cyclic garbage the imports made is kept
    gc.freeze()
    gc.enable()


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
