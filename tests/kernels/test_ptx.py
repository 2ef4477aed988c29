"""Every CUDA kernel compiles to PTX for a real GPU (sm_90), with the types its launcher passes.

The simulator runs kernels as Python, so it accepts code that the CUDA compiler would
reject (an unsupported call, a type that does not unify). Compiling here, with NVRTC
and no GPU, catches that in the ordinary test run.
"""

import re

import numpy as np
import pytest

from nbcnn.perf import static
from nbcnn.kernels._cuda import SIMULATOR
from nbcnn.kernels.catalogue import FLOAT64_BY_DESIGN, MODULES, launch_types

pytestmark = pytest.mark.skipif(SIMULATOR, reason="compiling PTX needs the real CUDA target, not the simulator")


CASES = [(k, sig, dt) for dt in (np.float32, np.float64) for k, sig in launch_types(dt)]


def ptx_of(kernel, sig):
    """The PTX of ``kernel`` for these argument types, with its launch bounds, for sm_90: compiled once
    per process (``nbcnn.perf.static`` keeps it: ``tests/test_static.py`` reads the same kernels)."""
    return static.ptx_of(kernel, sig, (9, 0))


def test_every_kernel_is_cached_on_disk():
    """``cuda.jit(cache=True)`` on every kernel: a second run on a GPU loads them instead of compiling."""
    uncached = sorted({k.py_func.__name__ for k, _, _ in CASES if type(k._cache).__name__ == "NullCache"})
    assert uncached == []


def test_every_kernel_is_listed():
    found = {
        (m.__name__, name)
        for m in MODULES
        for name, obj in vars(m).items()
        if name.endswith("_kernel") and hasattr(obj, "py_func")
    }
    listed = {(k.py_func.__module__, k.py_func.__name__) for k, _, _ in CASES}
    assert found == listed


@pytest.mark.parametrize("kernel, sig, dtype", CASES,
                         ids=[f"{k.py_func.__name__}-{np.dtype(d).name}-{i}" for i, (k, _, d) in enumerate(CASES)])
def test_compiles_to_ptx_for_sm90(kernel, sig, dtype):
    ptx = ptx_of(kernel, sig)
    assert ".target sm_90" in ptx
    assert ".entry" in ptx  # a kernel, not just device functions


F64_ARITHMETIC = re.compile(r"^\s*(add|sub|mul|fma|div|rcp|sqrt|neg|max|min|abs)\.[a-z.]*f64")


@pytest.mark.parametrize("kernel, sig", [(k, s) for k, s in launch_types(np.float32)
                                         if k.py_func.__name__ not in FLOAT64_BY_DESIGN],
                         ids=lambda v: getattr(getattr(v, "py_func", None), "__name__", ""))
def test_float32_kernels_do_float32_arithmetic(kernel, sig):
    """A float64 operation is many times slower than a float32 one on most GPUs; a stray Python
    float or a plain 0 in a float32 kernel turns its arithmetic into float64 silently. At most a
    constant or two computed once per thread (a pooling window's 1 / (FH*FW)) may remain."""
    ptx = ptx_of(kernel, sig)
    assert sum(1 for line in ptx.splitlines() if F64_ARITHMETIC.match(line)) <= 1
