"""ReLU, the lecture's detector stage, forward and backward, on arrays of any shape.

    y = max(x, 0),   dx = dy where y > 0, else 0

The gradient at exactly 0 is taken as 0, as in PyTorch. Backward reads the forward
output ``y`` rather than ``x`` (``y > 0`` exactly when ``x > 0``), so a layer need not
keep its input. Backward overwrites dx. Arrays are processed as flat vectors.
"""

from numba import cuda, njit, prange

from ._checks import check_arrays, check_shape, on_host
from ._cpu import serial
from ._cuda import blocks, flat, gpu_arrays, on_gpu, stream

# ------------------------------------------------------------------------ argument checks


def check_same_shape(fn, on_device, arrays):
    """All arrays of one dtype and contiguous (``check_arrays``), and of the first one's shape."""
    check_arrays(fn, on_device, arrays)
    first = next(iter(arrays))
    for name, a in arrays.items():
        check_shape(fn, name, a, arrays[first].shape)


# ----------------------------------------------------------------------------- CPU kernels


@njit(parallel=True, cache=True)
def _relu_forward_cpu(y, x):
    """y = max(x, 0), element by element over flat vectors."""
    for i in prange(x.size):
        v = x[i]
        y[i] = v if v > 0 else 0


@njit(cache=True)
def _relu_forward_serial_cpu(y, x):
    """``_relu_forward_cpu`` on one thread, for small arrays (see ``_cpu.SERIAL_BELOW``)."""
    for i in range(x.size):
        v = x[i]
        y[i] = v if v > 0 else 0


@njit(parallel=True, cache=True)
def _relu_backward_cpu(dx, dy, y):
    """dx = dy where y > 0, else 0, over flat vectors."""
    for i in prange(y.size):
        dx[i] = dy[i] if y[i] > 0 else 0


@njit(cache=True)
def _relu_backward_serial_cpu(dx, dy, y):
    """``_relu_backward_cpu`` on one thread, for small arrays."""
    for i in range(y.size):
        dx[i] = dy[i] if y[i] > 0 else 0


# ---------------------------------------------------------------- public entry points


def relu_forward_cpu(y, x):
    """``y = max(x, 0)``; ``x`` and ``y`` of one shape (any) and dtype; ``y`` may be ``x``. Returns ``y``."""
    check_same_shape("relu_forward_cpu", on_host, {"y": y, "x": x})
    relu = _relu_forward_serial_cpu if serial(x.size) else _relu_forward_cpu
    relu(y.reshape(-1), x.reshape(-1))
    return y


def relu_backward_cpu(dx, dy, y):
    """``dx = dy * (y > 0)`` with ``y`` the forward output; all of one shape. Returns ``dx``."""
    check_same_shape("relu_backward_cpu", on_host, {"dx": dx, "dy": dy, "y": y})
    relu = _relu_backward_serial_cpu if serial(y.size) else _relu_backward_cpu
    relu(dx.reshape(-1), dy.reshape(-1), y.reshape(-1))
    return dx


def relu_forward_core_cpu(y, x):
    """``relu_forward_cpu`` without the checks, for a caller that has checked a plan."""
    relu = _relu_forward_serial_cpu if serial(x.size) else _relu_forward_cpu
    relu(y.reshape(-1), x.reshape(-1))


def relu_backward_core_cpu(dx, dy, y):
    """``relu_backward_cpu`` without the checks; ``dx`` may be ``dy`` (masks a gradient in place)."""
    relu = _relu_backward_serial_cpu if serial(y.size) else _relu_backward_cpu
    relu(dx.reshape(-1), dy.reshape(-1), y.reshape(-1))


# ---------------------------------------------------------------------------- CUDA kernels

THREADS = 256


@cuda.jit(cache=True)
def _relu_forward_kernel(y, x):
    """One thread per element of the flat vectors."""
    i = cuda.grid(1)
    if i < x.size:
        v = x[i]
        y[i] = v if v > 0 else 0


@cuda.jit(cache=True)
def _relu_backward_kernel(dx, dy, y):
    """One thread per element of the flat vectors."""
    i = cuda.grid(1)
    if i < y.size:
        dx[i] = dy[i] if y[i] > 0 else 0


# --------------------------------------------------------------------------- CUDA launchers


def relu_forward_cuda(y, x):
    """``y = max(x, 0)`` on the GPU; the arguments of ``relu_forward_cpu``."""
    fn = "relu_forward_cuda"
    y, x = gpu_arrays(fn, y=y, x=x)
    check_same_shape(fn, on_gpu, {"y": y, "x": x})
    _relu_forward_kernel[blocks(x.size, THREADS), THREADS, stream()](flat(y), flat(x))
    return y


def relu_backward_cuda(dx, dy, y):
    """``dx = dy * (y > 0)`` on the GPU; the arguments of ``relu_backward_cpu``."""
    fn = "relu_backward_cuda"
    dx, dy, y = gpu_arrays(fn, dx=dx, dy=dy, y=y)
    check_same_shape(fn, on_gpu, {"dx": dx, "dy": dy, "y": y})
    _relu_backward_kernel[blocks(y.size, THREADS), THREADS, stream()](flat(dx), flat(dy), flat(y))
    return dx


def relu_forward_core_cuda(y, x):
    """``relu_forward_cuda`` without the checks: GPU arrays of one shape, as a plan checked them."""
    _relu_forward_kernel[blocks(x.size, THREADS), THREADS, stream()](flat(y), flat(x))


def relu_backward_core_cuda(dx, dy, y):
    """``relu_backward_cuda`` without the checks."""
    _relu_backward_kernel[blocks(y.size, THREADS), THREADS, stream()](flat(dx), flat(dy), flat(y))
