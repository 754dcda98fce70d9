"""Shared test configuration: every test starts from the same random state.

Tests draw their data from seeded generators; this fixture also fixes the
global generators (Python's ``random``, numpy's legacy ``np.random``, torch's
default generator) that a test or a library under test may use unseeded, so
that no test sees different data from one run to the next.
"""

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


@pytest.fixture(autouse=True)
def _fixed_global_seeds():
    random.seed(0)
    np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)
