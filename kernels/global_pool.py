"""Global average pooling: (N, C, H, W) -> (N, C), each plane's mean, and its backward.

    y[n, c] = sum over h, w of x[n, c, h, w] / (H*W),      dx[n, c, h, w] = dy[n, c] / (H*W)

With ``mask`` the backward also applies the ReLU before the layer: dx is zero where x <= 0.
"""

from numba import cuda, njit, prange

from ._checks import check_arrays, check_ndim, check_shape, on_host
from ._cuda import blocks, flat, gpu_arrays, on_gpu, stream


def _check(fn, on_device, y, x):
    check_arrays(fn, on_device, {y[0]: y[1], x[0]: x[1]})
    check_ndim(fn, x[0], x[1], ("N", "C", "H", "W"))
    check_shape(fn, y[0], y[1], x[1].shape[:2], ("N", "C"))


# ----------------------------------------------------------------------------- CPU kernels


@njit(parallel=True, cache=True)
def _global_avgpool_forward_cpu(y, x):
    """y (N*C,) and x (N*C, H*W): one plane per task, summed in float64."""
    planes, size = x.shape
    for k in prange(planes):
        total = 0.0
        for j in range(size):
            total += x[k, j]
        y[k] = total / size


@njit(parallel=True, cache=True)
def _global_avgpool_backward_cpu(dx, dy, x, mask):
    planes, size = dx.shape
    for k in prange(planes):
        g = dy[k] / size
        for j in range(size):
            dx[k, j] = g if (not mask or x[k, j] > 0) else 0


def global_avgpool2d_forward_cpu(y, x):
    """``y`` (N, C) = the mean of each plane of ``x`` (N, C, H, W). Returns ``y``."""
    _check("global_avgpool2d_forward_cpu", on_host, ("y", y), ("x", x))
    global_avgpool2d_forward_core_cpu(y, x)
    return y


def global_avgpool2d_backward_cpu(dx, dy):
    """``dx`` (N, C, H, W) = ``dy`` (N, C) spread evenly over each plane. Returns ``dx``."""
    _check("global_avgpool2d_backward_cpu", on_host, ("dy", dy), ("dx", dx))
    global_avgpool2d_backward_core_cpu(dx, dy, dx, False)
    return dx


def global_avgpool2d_forward_core_cpu(y, x):
    N, C, H, W = x.shape
    _global_avgpool_forward_cpu(y.reshape(N * C), x.reshape(N * C, H * W))


def global_avgpool2d_backward_core_cpu(dx, dy, x, mask):
    N, C, H, W = dx.shape
    _global_avgpool_backward_cpu(dx.reshape(N * C, H * W), dy.reshape(N * C), x.reshape(N * C, H * W), mask)


# ---------------------------------------------------------------------------- CUDA kernels

THREADS = 256


@cuda.jit(cache=True)
def _global_avgpool_forward_kernel(y, x, size):
    """One thread per plane (planes are small: 7x7, 4x4 in the networks this serves)."""
    k = cuda.grid(1)
    if k < y.size:
        total = x.dtype.type(0)
        for j in range(size):
            total += x[k * size + j]
        y[k] = total / x.dtype.type(size)


@cuda.jit(cache=True)
def _global_avgpool_backward_kernel(dx, dy, x, size, mask):
    """One thread per element of dx."""
    i = cuda.grid(1)
    if i < dx.size:
        g = dy[i // size] / dx.dtype.type(size)
        dx[i] = g if (not mask or x[i] > 0) else 0


def global_avgpool2d_forward_core_cuda(y, x):
    N, C, H, W = x.shape
    _global_avgpool_forward_kernel[blocks(N * C, THREADS), THREADS, stream()](flat(y), flat(x), H * W)


def global_avgpool2d_backward_core_cuda(dx, dy, x, mask):
    N, C, H, W = dx.shape
    _global_avgpool_backward_kernel[blocks(dx.size, THREADS), THREADS, stream()](flat(dx), flat(dy), flat(x), H * W, mask)


def global_avgpool2d_forward_cuda(y, x):
    """``global_avgpool2d_forward_cpu`` on the GPU."""
    fn = "global_avgpool2d_forward_cuda"
    y, x = gpu_arrays(fn, y=y, x=x)
    _check(fn, on_gpu, ("y", y), ("x", x))
    global_avgpool2d_forward_core_cuda(y, x)
    return y


def global_avgpool2d_backward_cuda(dx, dy):
    """``global_avgpool2d_backward_cpu`` on the GPU."""
    fn = "global_avgpool2d_backward_cuda"
    dx, dy = gpu_arrays(fn, dx=dx, dy=dy)
    _check(fn, on_gpu, ("dy", dy), ("dx", dx))
    global_avgpool2d_backward_core_cuda(dx, dy, dx, False)
    return dx
