"""Inverted dropout, forward and backward, with a mask that is computed, never stored.

In training each element is kept with probability 1 - p and scaled by 1 / (1 - p), so the
expected output equals the input and evaluation needs no rescaling (it is the identity):

    y[i] = x[i] * scale   if keep(seed, step, i)   else 0,      scale = 1 / (1 - p)
    dx[i] = dy[i] * scale if keep(seed, step, i)   else 0

``keep`` hashes (seed, step, i) to 32 bits (``_random.hash32``) and compares them with
p * 2**32: a counter-based generator, so the CPU and the GPU draw the same mask, the backward
recomputes the forward's mask from the same three integers instead of reading one from
memory, and a run is reproducible from the seed (the layer counts its steps; resume
restores the count).
"""

from numba import cuda, prange

from ._checks import check_arrays, check_int, check_real, check_shape, on_host
from ._cpu import parallel_and_serial
from ._cuda import blocks, flat, gpu_arrays, on_gpu, stream
from ._random import hash32_cpu, hash32_cuda

def threshold(p):
    """Elements whose hash is below this are dropped: round(p * 2**32)."""
    return int(round(p * 2.0**32))


# ----------------------------------------------------------------------------- CPU kernels


@parallel_and_serial
def _dropout_cpu(out, a, seed, step, cut, scale):
    """out = a * scale where the hash is at least ``cut``, else 0 (the forward and the backward alike)."""
    for i in prange(a.size):
        out[i] = a[i] * scale if hash32_cpu(seed, step, i) >= cut else 0


def _check(fn, on_device, out, a, seed, step, p):
    check_arrays(fn, on_device, {out[0]: out[1], a[0]: a[1]})
    check_shape(fn, out[0], out[1], a[1].shape)
    check_int(fn, "seed", seed, minimum=0)
    check_int(fn, "step", step, minimum=0)
    return check_real(fn, "p", p, minimum=0.0, maximum=1.0, open_max=True)


def dropout_forward_cpu(y, x, seed, step, p):
    """``y`` = inverted dropout of ``x`` (any shape), drop probability ``p`` in [0, 1), mask from
    (``seed``, ``step``). Returns ``y``."""
    p = _check("dropout_forward_cpu", on_host, ("y", y), ("x", x), seed, step, p)
    dropout_forward_core_cpu(y, x, seed, step, p)
    return y


def dropout_backward_cpu(dx, dy, seed, step, p):
    """``dx`` = ``dy`` through the mask of the forward with the same (``seed``, ``step``, ``p``). Returns ``dx``."""
    p = _check("dropout_backward_cpu", on_host, ("dx", dx), ("dy", dy), seed, step, p)
    dropout_forward_core_cpu(dx, dy, seed, step, p)
    return dx


def dropout_forward_core_cpu(y, x, seed, step, p):
    run = _dropout_cpu.for_size(x.size)
    run(y.reshape(-1), x.reshape(-1), seed, step, threshold(p), x.dtype.type(1.0 / (1.0 - p)))


dropout_backward_core_cpu = dropout_forward_core_cpu  # the same mask, applied to dy


# ---------------------------------------------------------------------------- CUDA kernels

THREADS = 256


@cuda.jit(cache=True)
def _dropout_kernel(out, a, seed, step, cut, scale):
    """One thread per element of the flat vectors."""
    i = cuda.grid(1)
    if i < a.size:
        out[i] = a[i] * scale if hash32_cuda(seed, step, i) >= cut else 0


def dropout_forward_core_cuda(y, x, seed, step, p):
    _dropout_kernel[blocks(x.size, THREADS), THREADS, stream()](flat(y), flat(x), seed, step, threshold(p),
                                                      x.dtype.type(1.0 / (1.0 - p)))


dropout_backward_core_cuda = dropout_forward_core_cuda


def dropout_forward_cuda(y, x, seed, step, p):
    """``dropout_forward_cpu`` on the GPU: the same mask for the same (seed, step)."""
    fn = "dropout_forward_cuda"
    y, x = gpu_arrays(fn, y=y, x=x)
    p = _check(fn, on_gpu, ("y", y), ("x", x), seed, step, p)
    dropout_forward_core_cuda(y, x, seed, step, p)
    return y


def dropout_backward_cuda(dx, dy, seed, step, p):
    """``dropout_backward_cpu`` on the GPU."""
    fn = "dropout_backward_cuda"
    dx, dy = gpu_arrays(fn, dx=dx, dy=dy)
    p = _check(fn, on_gpu, ("dx", dx), ("dy", dy), seed, step, p)
    dropout_forward_core_cuda(dx, dy, seed, step, p)
    return dx
