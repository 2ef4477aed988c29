import numpy as np
from numba import cuda


def dev(a):
    """A device copy of a host array."""
    return cuda.to_device(np.ascontiguousarray(a))


def empty_like(a):
    """A device array of a's shape and dtype, filled with NaN (or -7 for integers) so a
    kernel that forgets an element is caught."""
    fill = np.nan if np.issubdtype(a.dtype, np.floating) else -7
    return cuda.to_device(np.full(a.shape, fill, a.dtype))


def host(d):
    return d.copy_to_host()


def assert_close(got, want, dtype):
    """float32: relative error under 1e-5 of the largest entry (summation order differs between
    the CPU and the GPU); float64: 1e-12."""
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)
