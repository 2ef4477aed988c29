"""The element-wise CPU kernels are one loop body compiled twice (kernels._cpu.parallel_and_serial):
on Numba's threads and on one; the entry points pick by size (SERIAL_BELOW). Both compilations
must give the same bits, and the entry points must agree with a NumPy reference on either side
of the threshold (the other tests mostly use small arrays)."""

import numpy as np
import pytest
from numba import prange

from nbcnn.kernels import activation, gather, optim
from nbcnn.kernels._cpu import SERIAL_BELOW, parallel_and_serial

SIZES = [7, SERIAL_BELOW + 13]


@parallel_and_serial
def _halve(a):
    """a = a / 2 (a body for the test below)."""
    for i in prange(a.size):
        a[i] = a[i] / 2


def test_one_body_compiles_twice_under_two_names(rng):
    a = rng.standard_normal(100)
    for size, which in ((10, _halve.serial), (SERIAL_BELOW, _halve.parallel)):
        assert _halve.for_size(size) is which
        b = a.copy()
        which(b)
        np.testing.assert_array_equal(b, a / 2)
    assert _halve.parallel.targetoptions.get("parallel") and not _halve.serial.targetoptions.get("parallel")
    # Numba's disk cache keys a compilation by its function's name: the two must not share one
    assert _halve.serial.py_func.__qualname__ == _halve.parallel.py_func.__qualname__ + "_serial"


def arrays(rng, size, count, dtype=np.float32):
    return [rng.standard_normal(size).astype(dtype) for _ in range(count)]


@pytest.mark.parametrize("size", SIZES)
def test_adam_compilations_agree_and_match_numpy(rng, size):
    p, m, v, g = arrays(rng, size, 4)
    v = np.abs(v)
    results = []
    for kernel in (optim._adam_update_cpu.parallel, optim._adam_update_cpu.serial):
        pp, mm, vv = p.copy(), m.copy(), v.copy()
        kernel(pp, mm, vv, g, 1e-3, 0.9, 0.999, 1e-8, 1 - 0.9**3, 1 - 0.999**3, 1.0)  # decay 1: Adam
        results.append((pp, mm, vv))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    pp, mm, vv = p.copy(), m.copy(), v.copy()
    optim.adam_update_cpu(pp, mm, vv, g, 1e-3, 0.9, 0.999, 1e-8, 3)
    m64 = 0.9 * m.astype(float) + 0.1 * g
    v64 = 0.999 * v.astype(float) + 0.001 * g.astype(float) ** 2
    want = p - (1e-3 / (1 - 0.9**3)) * m64 / (np.sqrt(v64) / np.sqrt(1 - 0.999**3) + 1e-8)
    np.testing.assert_allclose(pp, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("size", SIZES)
def test_sgd_compilations_agree_and_match_numpy(rng, size):
    p, vel, g = arrays(rng, size, 3)
    results = []
    for kernel in (optim._sgd_update_cpu.parallel, optim._sgd_update_cpu.serial):
        pp, vv = p.copy(), vel.copy()
        kernel(pp, vv, g, 0.1, 0.9, 0.01)
        results.append((pp, vv))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    pp, vv = p.copy(), vel.copy()
    optim.sgd_update_cpu(pp, vv, g, 0.1, 0.9, 0.01)
    want_v = 0.9 * vel.astype(float) + g + 0.01 * p
    np.testing.assert_allclose(vv, want_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pp, p - 0.1 * want_v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
def test_relu_compilations_agree_and_match_numpy(rng, size):
    x, dy = arrays(rng, size, 2)
    x[:5] = [0.0, -0.0, np.nan, np.inf, -np.inf]
    for forward in (activation._relu_forward_cpu.parallel, activation._relu_forward_cpu.serial):
        y = np.full_like(x, 7.0)
        forward(y, x)
        np.testing.assert_array_equal(y, np.where(x > 0, x, 0))
    y = np.maximum(x, 0)
    for backward in (activation._relu_backward_cpu.parallel, activation._relu_backward_cpu.serial):
        dx = np.full_like(x, 7.0)
        backward(dx, dy, y)
        np.testing.assert_array_equal(dx, np.where(y > 0, dy, 0))
    out = activation.relu_forward_cpu(np.empty_like(x), x)
    np.testing.assert_array_equal(out, np.where(x > 0, x, 0))


@pytest.mark.parametrize("rows", [3, SERIAL_BELOW // 16 + 5])
def test_gather_compilations_agree(rng, rows):
    x = rng.standard_normal((rows * 2, 16)).astype(np.float32)
    idx = rng.integers(0, rows * 2, rows).astype(np.int32)
    for kernel in (gather._gather_rows_cpu.parallel, gather._gather_rows_cpu.serial):
        out = np.full((rows, 16), np.nan, np.float32)
        kernel(out, x, idx)
        np.testing.assert_array_equal(out, x[idx])
    np.testing.assert_array_equal(gather.gather_rows_cpu(np.empty((rows, 16), np.float32), x, idx), x[idx])
