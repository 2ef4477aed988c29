"""Activations, the lecture's detector stage, forward and backward, on arrays of any shape.

ReLU, the one the lecture uses::

    y = max(x, 0),   dx = dy where y > 0, else 0

The gradient at exactly 0 is taken as 0, as in PyTorch. Backward reads the forward
output ``y`` rather than ``x`` (``y > 0`` exactly when ``x > 0``), so a layer need not
keep its input.

The others, with PyTorch's names and definitions (``activation_forward_*`` and
``activation_backward_*``, the activation named by a string)::

    leaky_relu   y = x if x > 0 else a*x          dy/dx = 1 if x > 0 else a   (a: negative_slope)
    tanh         y = tanh(x)                      dy/dx = 1 - y**2
    sigmoid      y = 1 / (1 + exp(-x))            dy/dx = y * (1 - y)
    gelu         y = x * Phi(x)                   dy/dx = Phi(x) + x * phi(x)
                 Phi(x) = (1 + erf(x / sqrt(2))) / 2, the normal distribution's CDF,
                 phi(x) = exp(-x**2 / 2) / sqrt(2*pi), its density (the exact form, not tanh's)

Their backward reads both the input and the output (tanh's and sigmoid's derivatives are
cheapest from y, GELU's needs x). Every backward overwrites dx. Arrays are processed as flat
vectors.
"""

import math

from numba import cuda, prange

from ._checks import check_arrays, check_real, check_shape, on_host
from ._cpu import parallel_and_serial
from ._cuda import blocks, flat, gpu_arrays, on_gpu, stream
from ._index import compile_twice

# ------------------------------------------------------------------------ argument checks


def check_same_shape(fn, on_device, arrays):
    """All arrays of one dtype and contiguous (``check_arrays``), and of the first one's shape."""
    check_arrays(fn, on_device, arrays)
    first = next(iter(arrays))
    for name, a in arrays.items():
        check_shape(fn, name, a, arrays[first].shape)


# ----------------------------------------------------------------------------- CPU kernels


@parallel_and_serial
def _relu_forward_cpu(y, x):
    """y = max(x, 0), element by element over flat vectors."""
    for i in prange(x.size):
        v = x[i]
        y[i] = v if v > 0 else 0


@parallel_and_serial
def _relu_backward_cpu(dx, dy, y):
    """dx = dy where y > 0, else 0, over flat vectors."""
    for i in prange(y.size):
        dx[i] = dy[i] if y[i] > 0 else 0


# ---------------------------------------------------------------- public entry points


def relu_forward_cpu(y, x):
    """``y = max(x, 0)``; ``x`` and ``y`` of one shape (any) and dtype; ``y`` may be ``x``. Returns ``y``."""
    check_same_shape("relu_forward_cpu", on_host, {"y": y, "x": x})
    relu = _relu_forward_cpu.for_size(x.size)
    relu(y.reshape(-1), x.reshape(-1))
    return y


def relu_backward_cpu(dx, dy, y):
    """``dx = dy * (y > 0)`` with ``y`` the forward output; all of one shape. Returns ``dx``."""
    check_same_shape("relu_backward_cpu", on_host, {"dx": dx, "dy": dy, "y": y})
    relu = _relu_backward_cpu.for_size(y.size)
    relu(dx.reshape(-1), dy.reshape(-1), y.reshape(-1))
    return dx


def relu_forward_core_cpu(y, x):
    """``relu_forward_cpu`` without the checks, for a caller that has checked a plan."""
    relu = _relu_forward_cpu.for_size(x.size)
    relu(y.reshape(-1), x.reshape(-1))


def relu_backward_core_cpu(dx, dy, y):
    """``relu_backward_cpu`` without the checks; ``dx`` may be ``dy`` (masks a gradient in place)."""
    relu = _relu_backward_cpu.for_size(y.size)
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


# ================================================================= the other activations

LEAKY_RELU, TANH, SIGMOID, GELU = 1, 2, 3, 4
KINDS = {"leaky_relu": LEAKY_RELU, "tanh": TANH, "sigmoid": SIGMOID, "gelu": GELU}
_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2*pi)


def activate(x, i, kind, slope):
    """f(x[i]) for activation ``kind``, in x's own precision (a float32 kernel does float32
    arithmetic: every constant is converted to x's type first)."""
    t = x.dtype.type
    v = x[i]
    if kind == LEAKY_RELU:
        return v if v > 0 else t(slope) * v
    if kind == TANH:
        return math.tanh(v)
    if kind == SIGMOID:  # exp of a non-positive number only: no overflow for any x
        if v >= 0:
            return t(1) / (t(1) + math.exp(-v))
        e = math.exp(v)
        return e / (t(1) + e)
    return t(0.5) * v * (t(1) + math.erf(v * t(_SQRT_HALF)))  # GELU


def derivative(x, y, i, kind, slope):
    """f'(x[i]) for activation ``kind``, from the input x and the forward's output y."""
    t = x.dtype.type
    if kind == LEAKY_RELU:
        return t(1) if x[i] > 0 else t(slope)
    if kind == TANH:
        return t(1) - y[i] * y[i]
    if kind == SIGMOID:
        return y[i] * (t(1) - y[i])
    v = x[i]  # GELU: Phi(x) + x * phi(x)
    return t(0.5) * (t(1) + math.erf(v * t(_SQRT_HALF))) + v * math.exp(-(v * v) * t(0.5)) * t(_INV_SQRT_2PI)


activate_cpu, activate_cuda = compile_twice(activate)
derivative_cpu, derivative_cuda = compile_twice(derivative)


def activation_kind(fn, name):
    """The kernels' code for the activation called ``name`` (a ValueError naming the choices otherwise)."""
    if not isinstance(name, str) or name not in KINDS:
        raise ValueError(f"{fn}: unknown activation {name!r}: choose one of {', '.join(KINDS)}")
    return KINDS[name]


# ----------------------------------------------------------------------------- CPU kernels


@parallel_and_serial
def _activation_forward_cpu(y, x, kind, slope):
    """y = f(x) element by element over flat vectors."""
    for i in prange(x.size):
        y[i] = activate_cpu(x, i, kind, slope)


@parallel_and_serial
def _activation_backward_cpu(dx, dy, x, y, kind, slope):
    """dx = dy * f'(x) over flat vectors."""
    for i in prange(x.size):
        dx[i] = dy[i] * derivative_cpu(x, y, i, kind, slope)


# ---------------------------------------------------------------- public entry points


def activation_forward_cpu(y, x, name, negative_slope=0.01):
    """``y = f(x)`` for the activation ``name`` ("leaky_relu", "tanh", "sigmoid", "gelu");
    ``x`` and ``y`` of one shape (any) and dtype; ``negative_slope`` is leaky_relu's. Returns ``y``."""
    fn = "activation_forward_cpu"
    kind = activation_kind(fn, name)
    slope = check_real(fn, "negative_slope", negative_slope)
    check_same_shape(fn, on_host, {"y": y, "x": x})
    activation_forward_core_cpu(y, x, kind, slope)
    return y


def activation_backward_cpu(dx, dy, x, y, name, negative_slope=0.01):
    """``dx = dy * f'(x)``, with ``x`` the forward's input and ``y`` its output; all of one shape.
    Returns ``dx``."""
    fn = "activation_backward_cpu"
    kind = activation_kind(fn, name)
    slope = check_real(fn, "negative_slope", negative_slope)
    check_same_shape(fn, on_host, {"dx": dx, "dy": dy, "x": x, "y": y})
    activation_backward_core_cpu(dx, dy, x, y, kind, slope)
    return dx


def activation_forward_core_cpu(y, x, kind, slope):
    """``activation_forward_cpu`` without the checks; ``kind`` the code of ``KINDS``."""
    forward = _activation_forward_cpu.for_size(x.size)
    forward(y.reshape(-1), x.reshape(-1), kind, slope)


def activation_backward_core_cpu(dx, dy, x, y, kind, slope):
    """``activation_backward_cpu`` without the checks; ``dx`` may be ``dy``."""
    backward = _activation_backward_cpu.for_size(x.size)
    backward(dx.reshape(-1), dy.reshape(-1), x.reshape(-1), y.reshape(-1), kind, slope)


# ---------------------------------------------------------------------------- CUDA kernels


@cuda.jit(cache=True)
def _activation_forward_kernel(y, x, kind, slope):
    """One thread per element of the flat vectors."""
    i = cuda.grid(1)
    if i < x.size:
        y[i] = activate_cuda(x, i, kind, slope)


@cuda.jit(cache=True)
def _activation_backward_kernel(dx, dy, x, y, kind, slope):
    """One thread per element of the flat vectors."""
    i = cuda.grid(1)
    if i < x.size:
        dx[i] = dy[i] * derivative_cuda(x, y, i, kind, slope)


# --------------------------------------------------------------------------- CUDA launchers


def activation_forward_core_cuda(y, x, kind, slope):
    """``activation_forward_cuda`` without the checks."""
    _activation_forward_kernel[blocks(x.size, THREADS), THREADS, stream()](flat(y), flat(x), kind, slope)


def activation_backward_core_cuda(dx, dy, x, y, kind, slope):
    """``activation_backward_cuda`` without the checks."""
    _activation_backward_kernel[blocks(x.size, THREADS), THREADS, stream()](flat(dx), flat(dy), flat(x), flat(y),
                                                                             kind, slope)


def activation_forward_cuda(y, x, name, negative_slope=0.01):
    """``activation_forward_cpu`` on the GPU."""
    fn = "activation_forward_cuda"
    y, x = gpu_arrays(fn, y=y, x=x)
    kind = activation_kind(fn, name)
    slope = check_real(fn, "negative_slope", negative_slope)
    check_same_shape(fn, on_gpu, {"y": y, "x": x})
    activation_forward_core_cuda(y, x, kind, slope)
    return y


def activation_backward_cuda(dx, dy, x, y, name, negative_slope=0.01):
    """``activation_backward_cpu`` on the GPU."""
    fn = "activation_backward_cuda"
    dx, dy, x, y = gpu_arrays(fn, dx=dx, dy=dy, x=x, y=y)
    kind = activation_kind(fn, name)
    slope = check_real(fn, "negative_slope", negative_slope)
    check_same_shape(fn, on_gpu, {"dx": dx, "dy": dy, "x": x, "y": y})
    activation_backward_core_cuda(dx, dy, x, y, kind, slope)
    return dx
