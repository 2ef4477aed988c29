"""Optimizer updates, one fused pass over each parameter: SGD (momentum, weight decay) and Adam.

Each kernel updates ``param`` and its state in place from ``grad``; all arrays of one
shape (any), processed as flat vectors. The formulas are PyTorch's:

SGD, with momentum mu and weight decay wd (the velocity starts at zero)::

    g = grad + wd * param
    velocity = mu * velocity + g
    param -= lr * velocity            (with mu = 0 this is param -= lr * g)

Adam, at step t = 1, 2, ... (m and v start at zero)::

    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad**2
    param -= (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

The bias corrections ``1 - beta**t`` are computed once per step on the host.

``fill`` sets every element of an array to one value (an optimizer's ``zero_grad``,
state initialised on the device without a copy from the host).

``clip_grad_norm`` scales a gradient down when its Euclidean norm exceeds ``max_norm``, as
PyTorch's ``clip_grad_norm_`` (over one flat vector: all of a model's gradients at once)::

    norm = sqrt(sum grad**2)                  summed in float64
    grad *= max_norm / (norm + 1e-6)          only where that factor is below 1
"""

import math
from types import SimpleNamespace

import numpy as np
from numba import cuda, int32, njit, prange
from numba import float64 as numba_float64

from ._checks import check_arrays, check_int, check_real, check_shape, on_host
from ._cpu import parallel_and_serial
from ._cuda import (REDUCE_THREADS, blocks, flat, gpu_arrays, grid_sum, on_gpu, reduce_parts,
                    reduce_scratch, stream)
from ._index import compile_twice

# ------------------------------------------------------------------------ argument checks


def check_update(fn, on_device, arrays):
    """All arrays float, of one dtype and of the shape of the first (the parameter)."""
    check_arrays(fn, on_device, arrays)
    first = next(iter(arrays))
    for name, a in arrays.items():
        check_shape(fn, name, a, arrays[first].shape)


def check_sgd_hyper(fn, lr, momentum, weight_decay):
    return (check_real(fn, "lr", lr, minimum=0.0),
            check_real(fn, "momentum", momentum, minimum=0.0),
            check_real(fn, "weight_decay", weight_decay, minimum=0.0))


def adam_constants(fn, lr, beta1, beta2, eps, step):
    """Checked hyperparameters, and the step's bias corrections: ``(lr, b1, b2, eps, 1-b1**t, 1-b2**t)``."""
    lr = check_real(fn, "lr", lr, minimum=0.0)
    beta1 = check_real(fn, "beta1", beta1, minimum=0.0, maximum=1.0, open_max=True)
    beta2 = check_real(fn, "beta2", beta2, minimum=0.0, maximum=1.0, open_max=True)
    eps = check_real(fn, "eps", eps, minimum=0.0, open_min=True)
    step = check_int(fn, "step", step, minimum=1)
    return lr, beta1, beta2, eps, 1.0 - beta1**step, 1.0 - beta2**step


# ----------------------------------------------------------------------------- CPU kernels


@njit(inline="always", cache=True)
def _sgd_element(param, velocity, grad, i, lr, momentum, weight_decay):
    g = grad[i] + weight_decay * param[i]
    vel = momentum * velocity[i] + g
    velocity[i] = vel
    param[i] -= lr * vel


@parallel_and_serial
def _sgd_update_cpu(param, velocity, grad, lr, momentum, weight_decay):
    """One SGD step over flat vectors, element by element."""
    for i in prange(param.size):
        _sgd_element(param, velocity, grad, i, lr, momentum, weight_decay)


@njit(inline="always", cache=True)
def _adam_element(param, m, v, grad, i, beta1, beta2, eps, step_size, root_bias2, decay):
    g = grad[i]
    mi = beta1 * m[i] + (1.0 - beta1) * g
    vi = beta2 * v[i] + (1.0 - beta2) * g * g
    m[i] = mi
    v[i] = vi
    # decay = 1 - lr * weight_decay: AdamW's decoupled weight decay (1 for Adam: p * 1 is p exactly)
    param[i] = param[i] * decay - step_size * mi / (math.sqrt(vi) / root_bias2 + eps)


@parallel_and_serial
def _adam_update_cpu(param, m, v, grad, lr, beta1, beta2, eps, bias1, bias2, decay):
    """One Adam step over flat vectors, element by element; bias1, bias2 = 1 - beta**t; each
    parameter first multiplied by ``decay`` (AdamW; 1 for Adam)."""
    step_size = lr / bias1
    root_bias2 = math.sqrt(bias2)
    for i in prange(param.size):
        _adam_element(param, m, v, grad, i, beta1, beta2, eps, step_size, root_bias2, decay)


@njit(parallel=True, cache=True)
def _fill_cpu(a, value):
    """a[:] = value over a flat vector."""
    for i in prange(a.size):
        a[i] = value


CLIP_EPS = 1e-6  # PyTorch's: the factor max_norm / (norm + eps) is finite for a zero gradient


def clip_factor(norm, max_norm):
    """What a gradient of length ``norm`` is multiplied by: max_norm / (norm + eps), at most 1."""
    return min(1.0, max_norm / (norm + CLIP_EPS))


clip_factor_cpu, clip_factor_cuda = compile_twice(clip_factor)


@parallel_and_serial
def _clip_grad_norm_cpu(grad, norm, max_norm):
    """norm[0] = |grad| (summed in float64); grad scaled to a norm of max_norm where it is longer."""
    total = 0.0
    for i in prange(grad.size):
        g = np.float64(grad[i])
        total += g * g
    norm[0] = math.sqrt(total)
    factor = clip_factor_cpu(norm[0], max_norm)
    if factor < 1.0:
        for i in prange(grad.size):
            grad[i] *= factor


# ---------------------------------------------------------------- public entry points


def clip_grad_norm_cpu(grad, max_norm):
    """Scale ``grad`` (any shape, float) in place so that its norm is at most ``max_norm``; returns
    the norm it had, as a Python float."""
    fn = "clip_grad_norm_cpu"
    check_arrays(fn, on_host, {"grad": grad})
    max_norm = check_real(fn, "max_norm", max_norm, minimum=0.0, open_min=True)
    norm = np.zeros(1)
    clip_grad_norm_core_cpu(grad, norm, max_norm)
    return float(norm[0])


def fill_cpu(a, value):
    """Set every element of ``a`` (any shape, float) to ``value``. Returns ``a``."""
    fn = "fill_cpu"
    check_arrays(fn, on_host, {"a": a})
    _fill_cpu(a.reshape(-1), check_real(fn, "value", value))
    return a



def sgd_update_cpu(param, velocity, grad, lr, momentum=0.0, weight_decay=0.0):
    """One SGD step in place on ``param`` and ``velocity`` (same shape as ``grad``). Returns ``param``."""
    fn = "sgd_update_cpu"
    check_update(fn, on_host, {"param": param, "velocity": velocity, "grad": grad})
    hyper = check_sgd_hyper(fn, lr, momentum, weight_decay)
    update = _sgd_update_cpu.for_size(param.size)
    update(param.reshape(-1), velocity.reshape(-1), grad.reshape(-1), *hyper)
    return param


def adam_update_cpu(param, m, v, grad, lr, beta1, beta2, eps, step):
    """One Adam step (``step`` = t, counted from 1) in place on ``param``, ``m`` and ``v``. Returns ``param``."""
    fn = "adam_update_cpu"
    check_update(fn, on_host, {"param": param, "m": m, "v": v, "grad": grad})
    consts = adam_constants(fn, lr, beta1, beta2, eps, step)
    update = _adam_update_cpu.for_size(param.size)
    update(param.reshape(-1), m.reshape(-1), v.reshape(-1), grad.reshape(-1), *consts, 1.0)
    return param


def adamw_update_cpu(param, m, v, grad, lr, beta1, beta2, eps, step, weight_decay):
    """One AdamW step: ``param *= 1 - lr * weight_decay``, then Adam's step, in one pass. Returns ``param``."""
    fn = "adamw_update_cpu"
    check_update(fn, on_host, {"param": param, "m": m, "v": v, "grad": grad})
    consts = adam_constants(fn, lr, beta1, beta2, eps, step)
    decay = 1.0 - consts[0] * check_real(fn, "weight_decay", weight_decay, minimum=0.0)
    update = _adam_update_cpu.for_size(param.size)
    update(param.reshape(-1), m.reshape(-1), v.reshape(-1), grad.reshape(-1), *consts, decay)
    return param


# Unchecked cores: what nbcnn's planned step calls on flat vectors it allocated itself (all
# the parameters of a model in one vector, so one call updates them all). Same arguments on
# both devices; Adam takes the bias corrections ``1 - beta**t`` rather than t.


def fill_core_cpu(a, value):
    _fill_cpu(a.reshape(-1), value)


def sgd_update_core_cpu(param, velocity, grad, lr, momentum, weight_decay):
    update = _sgd_update_cpu.for_size(param.size)
    update(param, velocity, grad, lr, momentum, weight_decay)


def adam_update_core_cpu(param, m, v, grad, lr, beta1, beta2, eps, bias1, bias2):
    update = _adam_update_cpu.for_size(param.size)
    update(param, m, v, grad, lr, beta1, beta2, eps, bias1, bias2, 1.0)


def adamw_update_core_cpu(param, m, v, grad, lr, beta1, beta2, eps, bias1, bias2, weight_decay):
    update = _adam_update_cpu.for_size(param.size)
    update(param, m, v, grad, lr, beta1, beta2, eps, bias1, bias2, 1.0 - lr * weight_decay)


def clip_grad_norm_core_cpu(grad, norm, max_norm, ws=None):
    """``clip_grad_norm_cpu`` without the checks; the norm before clipping into ``norm`` (1,) float64.
    ``ws`` is unused: the CPU needs no scratch."""
    clip = _clip_grad_norm_cpu.for_size(grad.size)
    clip(grad.reshape(-1), norm, max_norm)


def clip_grad_norm_workspace_cpu(n):
    return {}


# ---------------------------------------------------------------------------- CUDA kernels

THREADS = 256


@cuda.jit(cache=True)
def _sgd_update_kernel(param, velocity, grad, lr, momentum, weight_decay):
    """One SGD step; one thread per element of the flat vectors. The hyperparameters arrive as
    float64 and are rounded once to the parameters' dtype, so a float32 model does float32
    arithmetic (a float64 operation is many times slower on most GPUs)."""
    i = cuda.grid(1)
    if i < param.size:
        real = param.dtype.type
        rate, mu, decay = real(lr), real(momentum), real(weight_decay)
        g = grad[i] + decay * param[i]
        vel = mu * velocity[i] + g
        velocity[i] = vel
        param[i] -= rate * vel


@cuda.jit(cache=True)
def _adam_update_kernel(param, m, v, grad, step_size, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, root_bias2,
                        decay):
    """One Adam step; one thread per element of the flat vectors. The launcher computes the step's
    constants in float64 (``_adam_kernel_constants``); they are rounded once to the parameters'
    dtype, as in ``_sgd_update_kernel``, so the element's arithmetic is all of that dtype."""
    i = cuda.grid(1)
    if i < param.size:
        real = param.dtype.type
        g = grad[i]
        mi = real(beta1) * m[i] + real(one_minus_beta1) * g
        vi = real(beta2) * v[i] + real(one_minus_beta2) * g * g
        m[i] = mi
        v[i] = vi
        param[i] = param[i] * real(decay) - real(step_size) * mi / (math.sqrt(vi) / real(root_bias2) + real(eps))


def _adam_kernel_constants(lr, beta1, beta2, eps, bias1, bias2):
    """What ``_adam_update_kernel`` takes after the arrays, from the arguments of the CPU kernels."""
    return lr / bias1, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, math.sqrt(bias2)


@cuda.jit(cache=True)
def _fill_kernel(a, value):
    """a[:] = value; one thread per element of the flat vector."""
    i = cuda.grid(1)
    if i < a.size:
        a[i] = a.dtype.type(value)


@cuda.jit(cache=True)
def _grad_norm_kernel(norm, factor, grad, max_norm, partials, tickets):
    """The first of clip_grad_norm's two launches. Thread i of the grid takes elements i, i + gridsize,
    ... and sums their squares in float64; the blocks' sums meet as in every grid-wide sum (see
    ``_cuda.finished_last``), and the last block writes the norm and the factor the second launch
    multiplies by (1 when the norm is within max_norm)."""
    total = 0.0
    for i in range(cuda.grid(1), grad.size, cuda.gridsize(1)):
        g = numba_float64(grad[i])
        total += g * g
    scratch = cuda.shared.array(REDUCE_THREADS, dtype=numba_float64)
    flag = cuda.shared.array(1, dtype=int32)
    last, total = grid_sum(scratch, flag, partials, tickets, 0, total)
    if last and cuda.threadIdx.x == 0:
        length = math.sqrt(total)
        norm[0] = length
        factor[0] = clip_factor_cuda(length, max_norm)


@cuda.jit(cache=True)
def _scale_by_kernel(grad, factor):
    """grad *= factor[0] where the factor is below 1; one thread per element of the flat vector."""
    i = cuda.grid(1)
    if i < grad.size and factor[0] < 1.0:
        grad[i] *= grad.dtype.type(factor[0])


# --------------------------------------------------------------------------- CUDA launchers


def clip_grad_norm_workspace_cuda(n):
    """{name: (shape, dtype)} of clip_grad_norm's scratch for ``n`` gradients, zeroed once when
    allocated: the blocks' partial sums, the last block's ticket, the factor between the launches."""
    return {"partials": ((1, reduce_parts(n)), np.float64), "tickets": ((1,), np.uint32),
            "factor": ((1,), np.float64)}


def clip_grad_norm_core_cuda(grad, norm, max_norm, ws):
    """Unchecked twin of ``clip_grad_norm_core_cpu``: two launches, nothing read back (the norm stays
    in ``norm``, on the GPU)."""
    g = flat(grad)
    _grad_norm_kernel[ws.partials.shape[1], REDUCE_THREADS, stream()](norm, ws.factor, g, max_norm, ws.partials,
                                                                      ws.tickets)
    _scale_by_kernel[blocks(g.size, THREADS), THREADS, stream()](g, ws.factor)


def clip_grad_norm_cuda(grad, max_norm):
    """``clip_grad_norm_cpu`` on the GPU; returns the norm before clipping as a (1,) float64 GPU array
    (reading it waits for the GPU)."""
    fn = "clip_grad_norm_cuda"
    (grad,) = gpu_arrays(fn, grad=grad)
    check_arrays(fn, on_gpu, {"grad": grad})
    max_norm = check_real(fn, "max_norm", max_norm, minimum=0.0, open_min=True)
    parts = reduce_parts(grad.size)
    partials, tickets = reduce_scratch(1, parts, np.float64)
    ws = SimpleNamespace(partials=partials, tickets=tickets, factor=cuda.device_array(1, np.float64))
    norm = cuda.device_array(1, np.float64)
    clip_grad_norm_core_cuda(grad, norm, max_norm, ws)
    return norm



def fill_cuda(a, value):
    """Set every element of the GPU array ``a`` to ``value``; the arguments of ``fill_cpu``."""
    fn = "fill_cuda"
    (a,) = gpu_arrays(fn, a=a)
    check_arrays(fn, on_gpu, {"a": a})
    _fill_kernel[blocks(a.size, THREADS), THREADS, stream()](flat(a), check_real(fn, "value", value))
    return a



def sgd_update_cuda(param, velocity, grad, lr, momentum=0.0, weight_decay=0.0):
    """One SGD step on the GPU; the arguments of ``sgd_update_cpu``."""
    fn = "sgd_update_cuda"
    param, velocity, grad = gpu_arrays(fn, param=param, velocity=velocity, grad=grad)
    check_update(fn, on_gpu, {"param": param, "velocity": velocity, "grad": grad})
    hyper = check_sgd_hyper(fn, lr, momentum, weight_decay)
    _sgd_update_kernel[blocks(param.size, THREADS), THREADS, stream()](flat(param), flat(velocity), flat(grad), *hyper)
    return param


def adam_update_cuda(param, m, v, grad, lr, beta1, beta2, eps, step):
    """One Adam step on the GPU; the arguments of ``adam_update_cpu``."""
    fn = "adam_update_cuda"
    param, m, v, grad = gpu_arrays(fn, param=param, m=m, v=v, grad=grad)
    check_update(fn, on_gpu, {"param": param, "m": m, "v": v, "grad": grad})
    consts = adam_constants(fn, lr, beta1, beta2, eps, step)
    _adam_update_kernel[blocks(param.size, THREADS), THREADS, stream()](flat(param), flat(m), flat(v), flat(grad),
                                                              *_adam_kernel_constants(*consts), 1.0)
    return param


def adamw_update_cuda(param, m, v, grad, lr, beta1, beta2, eps, step, weight_decay):
    """One AdamW step on the GPU; the arguments of ``adamw_update_cpu``."""
    fn = "adamw_update_cuda"
    param, m, v, grad = gpu_arrays(fn, param=param, m=m, v=v, grad=grad)
    check_update(fn, on_gpu, {"param": param, "m": m, "v": v, "grad": grad})
    consts = adam_constants(fn, lr, beta1, beta2, eps, step)
    decay = 1.0 - consts[0] * check_real(fn, "weight_decay", weight_decay, minimum=0.0)
    _adam_update_kernel[blocks(param.size, THREADS), THREADS, stream()](flat(param), flat(m), flat(v), flat(grad),
                                                              *_adam_kernel_constants(*consts), decay)
    return param


def fill_core_cuda(a, value):
    _fill_kernel[blocks(a.size, THREADS), THREADS, stream()](flat(a), value)


def sgd_update_core_cuda(param, velocity, grad, lr, momentum, weight_decay):
    _sgd_update_kernel[blocks(param.size, THREADS), THREADS, stream()](param, velocity, grad, lr, momentum, weight_decay)


def adam_update_core_cuda(param, m, v, grad, lr, beta1, beta2, eps, bias1, bias2):
    _adam_update_kernel[blocks(param.size, THREADS), THREADS, stream()](param, m, v, grad,
                                                              *_adam_kernel_constants(lr, beta1, beta2, eps, bias1, bias2),
                                                              1.0)


def adamw_update_core_cuda(param, m, v, grad, lr, beta1, beta2, eps, bias1, bias2, weight_decay):
    _adam_update_kernel[blocks(param.size, THREADS), THREADS, stream()](param, m, v, grad,
                                                              *_adam_kernel_constants(lr, beta1, beta2, eps, bias1, bias2),
                                                              1.0 - lr * weight_decay)
