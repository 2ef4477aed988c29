"""CUDA kernels against their CPU twins: on a GPU when there is one, else in Numba's simulator.

Run them without a GPU with ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda`` (the
variable must be set before Numba is imported, hence a pytest run of their own). In a
run with neither a GPU nor the simulator they are skipped, and say so.
"""

import pytest

from nbcnn.kernels._cuda import SIMULATOR, cuda_unavailable_reason


def pytest_collection_modifyitems(config, items):
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"CUDA not usable here ({reason}); run with NUMBA_ENABLE_CUDASIM=1")
    for item in items:
        if "tests/cuda/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


def pytest_report_header(config):
    return f"nbcnn CUDA tests: {'Numba CUDA simulator' if SIMULATOR else 'real GPU when present'}"
