"""Batch normalisation over the channels of (N, C, H, W), forward and backward.

Per channel c, over its M = N*H*W values (training mode):

    mean = sum(x) / M,   var = sum((x - mean)^2) / M          (biased: the normalisation's)
    xhat = (x - mean) * invstd,   invstd = 1 / sqrt(var + eps)
    y    = gamma * xhat + beta                                (then max(y, 0) when relu)
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (unbiased)

In evaluation mode mean and var are the running estimates and nothing is updated (PyTorch's
rules, momentum included). Backward, with g = dy (already masked by a following ReLU):

    dbeta  = sum(g),   dgamma = sum(g * xhat)
    dx     = gamma * invstd * (g - dbeta / M - xhat * dgamma / M)     (training)
    dx     = gamma * invstd * g                                       (evaluation)

The forward keeps ``mean`` and ``invstd`` (C,) for the backward. Every reduction is per
channel, by one worker in a fixed order (a CPU task per channel, summing in float64; a GPU
block per channel, its threads' partial sums added by a fixed tree): the same result on
every run, no atomics. Two passes over x for the variance, never E[x^2] - E[x]^2, whose
cancellation loses the digits of a channel with a large mean.
"""

import math

from numba import cuda, njit, prange

from ._checks import check_arrays, check_ndim, check_real, check_shape, on_host
from ._cuda import REDUCE_THREADS, block_sum, blocks, flat, gpu_arrays, on_gpu, stream

# ------------------------------------------------------------------------ argument checks


def check_batchnorm(fn, on_device, y, x, stats, params):
    """x and y (N, C, H, W), every (C,) array in ``stats`` and ``params`` of one float dtype; returns (N, C, H, W)."""
    check_arrays(fn, on_device, {**dict([y, x]), **stats, **params})
    check_ndim(fn, x[0], x[1], ("N", "C", "H", "W"))
    shape = tuple(x[1].shape)
    check_shape(fn, y[0], y[1], shape, ("N", "C", "H", "W"))
    for name, a in {**stats, **params}.items():
        check_shape(fn, name, a, (shape[1],), ("C",))
    return shape


def _check_forward(fn, on_device, y, mean, invstd, running_mean, running_var, x, gamma, beta, eps, momentum,
                   training):
    """The checks of both devices' forward entry points."""
    check_real(fn, "eps", eps, minimum=0, open_min=True)
    check_real(fn, "momentum", momentum, minimum=0, maximum=1)
    N, C, H, W = check_batchnorm(
        fn, on_device, ("y", y), ("x", x),
        {"mean": mean, "invstd": invstd, "running_mean": running_mean, "running_var": running_var},
        {"gamma": gamma, "beta": beta})
    if training and N * H * W < 2:
        raise ValueError(f"{fn}: training needs more than one value per channel, got x of shape {tuple(x.shape)}")


def _check_backward(fn, on_device, dx, dgamma, dbeta, dy, x, mean, invstd, gamma):
    """The checks of both devices' backward entry points."""
    shape = check_batchnorm(fn, on_device, ("dx", dx), ("x", x),
                            {"mean": mean, "invstd": invstd, "dgamma": dgamma, "dbeta": dbeta}, {"gamma": gamma})
    check_shape(fn, "dy", dy, shape, ("N", "C", "H", "W"))


# ----------------------------------------------------------------------------- CPU kernels


# The CPU kernels see x as (N, C, H*W), so that the innermost loop runs over a whole contiguous
# plane. ``fastmath={"reassoc"}`` lets LLVM split each sum into several partial sums (vector lanes
# and independent adds, instead of one add waiting for the previous); the split is fixed when the
# kernel is compiled, so every run still adds in the same order and gets the same bits.


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _batchnorm2d_forward_cpu(y, mean, invstd, running_mean, running_var, x, gamma, beta, eps, momentum, training,
                             relu):
    N, C, HW = x.shape
    M = N * HW
    for c in prange(C):
        if training:
            total = 0.0
            for n in range(N):
                for k in range(HW):
                    total += x[n, c, k]
            mu = total / M
            squares = 0.0
            for n in range(N):
                for k in range(HW):
                    d = x[n, c, k] - mu
                    squares += d * d
            var = squares / M
            unbiased = squares / (M - 1) if M > 1 else var
            running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mu
            running_var[c] = (1.0 - momentum) * running_var[c] + momentum * unbiased
        else:
            mu = float(running_mean[c])
            var = float(running_var[c])
        inv = 1.0 / math.sqrt(var + eps)
        mean[c] = mu
        invstd[c] = inv
        scale = x.dtype.type(gamma[c] * inv)  # y = x * scale + shift, in x's precision
        shift = x.dtype.type(beta[c] - mu * gamma[c] * inv)
        for n in range(N):
            for k in range(HW):
                v = x[n, c, k] * scale + shift
                y[n, c, k] = v if (v > 0 or not relu) else 0


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _batchnorm2d_backward_cpu(dx, dgamma, dbeta, dy, x, mean, invstd, gamma, training):
    N, C, HW = x.shape
    M = N * HW
    for c in prange(C):
        mu, inv = float(mean[c]), float(invstd[c])
        sum_g = 0.0
        sum_gx = 0.0
        for n in range(N):
            for k in range(HW):
                g = float(dy[n, c, k])
                sum_g += g
                sum_gx += g * x[n, c, k]
        sum_gx = (sum_gx - mu * sum_g) * inv  # sum(g * xhat), xhat = (x - mu) * inv
        dbeta[c] = sum_g
        dgamma[c] = sum_gx
        k_ = gamma[c] * inv
        if training:
            # dx = k * (g - a - (x - mu) * inv * b) = k * g - k * inv * b * x + k * (inv * b * mu - a)
            a = sum_g / M
            b = sum_gx / M
            p = x.dtype.type(k_)
            q = x.dtype.type(-k_ * inv * b)
            r = x.dtype.type(k_ * (inv * b * mu - a))
            for n in range(N):
                for k in range(HW):
                    dx[n, c, k] = p * dy[n, c, k] + q * x[n, c, k] + r
        else:
            p = x.dtype.type(k_)
            for n in range(N):
                for k in range(HW):
                    dx[n, c, k] = p * dy[n, c, k]


def _planes(*arrays):
    """(N, C, H, W) arrays as (N, C, H*W) views (None stays None)."""
    return [a.reshape(a.shape[0], a.shape[1], -1) for a in arrays]


# ---------------------------------------------------------------- public entry points


def batchnorm2d_forward_cpu(y, mean, invstd, running_mean, running_var, x, gamma, beta, eps=1e-5, momentum=0.1,
                            training=True, relu=False):
    """``y`` = batch norm of ``x`` (N, C, H, W) with ``gamma``, ``beta`` (C,); writes the batch's ``mean`` and
    ``invstd`` (C,) for the backward and, in training, updates ``running_mean`` and ``running_var`` in place.
    Returns ``y``."""
    _check_forward("batchnorm2d_forward_cpu", on_host, y, mean, invstd, running_mean, running_var, x, gamma, beta,
                   eps, momentum, training)
    batchnorm2d_forward_core_cpu(y, mean, invstd, running_mean, running_var, x, gamma, beta, float(eps),
                                 float(momentum), bool(training), bool(relu))
    return y


def batchnorm2d_backward_cpu(dx, dgamma, dbeta, dy, x, mean, invstd, gamma, training=True):
    """``dx``, ``dgamma`` and ``dbeta`` (overwritten) from ``dy``, the forward's ``x``, ``mean`` and ``invstd``."""
    _check_backward("batchnorm2d_backward_cpu", on_host, dx, dgamma, dbeta, dy, x, mean, invstd, gamma)
    batchnorm2d_backward_core_cpu(dx, dgamma, dbeta, dy, x, mean, invstd, gamma, bool(training))
    return dx


def batchnorm2d_forward_core_cpu(y, mean, invstd, running_mean, running_var, x, gamma, beta, eps, momentum,
                                 training, relu):
    """``batchnorm2d_forward_cpu`` without the checks."""
    y3, x3 = _planes(y, x)
    _batchnorm2d_forward_cpu(y3, mean, invstd, running_mean, running_var, x3, gamma, beta, eps, momentum, training,
                             relu)


def batchnorm2d_backward_core_cpu(dx, dgamma, dbeta, dy, x, mean, invstd, gamma, training):
    """``batchnorm2d_backward_cpu`` without the checks."""
    dx3, dy3, x3 = _planes(dx, dy, x)
    _batchnorm2d_backward_cpu(dx3, dgamma, dbeta, dy3, x3, mean, invstd, gamma, training)


# ---------------------------------------------------------------------------- CUDA kernels

THREADS = 256


@cuda.jit(cache=True)
def _batchnorm2d_stats_kernel(mean, invstd, running_mean, running_var, x, eps, momentum, training):
    """One block per channel: its threads sum the channel's values in a fixed order (mean, then
    squared deviations); thread 0 writes mean and invstd and updates the running estimates."""
    c = cuda.blockIdx.x
    N, C, H, W = x.shape
    HW = H * W
    M = N * HW
    zero, one = x.dtype.type(0), x.dtype.type(1)
    count = x.dtype.type(M)
    scratch = cuda.shared.array(REDUCE_THREADS, dtype=x.dtype)
    squares = zero
    if training:
        acc = zero
        for idx in range(cuda.threadIdx.x, M, REDUCE_THREADS):
            n = idx // HW
            r = idx - n * HW
            acc += x[n, c, r // W, r % W]
        mu = block_sum(scratch, acc) / count
        acc = zero
        for idx in range(cuda.threadIdx.x, M, REDUCE_THREADS):
            n = idx // HW
            r = idx - n * HW
            d = x[n, c, r // W, r % W] - mu
            acc += d * d
        squares = block_sum(scratch, acc)
        var = squares / count
    else:
        mu = running_mean[c]
        var = running_var[c]
    if cuda.threadIdx.x == 0:
        mean[c] = mu
        invstd[c] = one / math.sqrt(var + eps)
        if training:
            unbiased = squares / (count - one) if M > 1 else var
            running_mean[c] = (one - momentum) * running_mean[c] + momentum * mu
            running_var[c] = (one - momentum) * running_var[c] + momentum * unbiased


@cuda.jit(cache=True)
def _batchnorm2d_normalize_kernel(y, x, mean, invstd, gamma, beta, C, HW, relu):
    """One thread per element of the flat x: y = (x - mean[c]) * invstd[c] * gamma[c] + beta[c]."""
    i = cuda.grid(1)
    if i < x.size:
        c = (i // HW) % C
        scale = gamma[c] * invstd[c]
        v = x[i] * scale + (beta[c] - mean[c] * scale)
        y[i] = v if (v > 0 or not relu) else 0


@cuda.jit(cache=True)
def _batchnorm2d_backward_reduce_kernel(dgamma, dbeta, dy, x, mean, invstd):
    """One block per channel: dbeta = sum(dy), dgamma = sum(dy * xhat), in a fixed order."""
    c = cuda.blockIdx.x
    N, C, H, W = x.shape
    HW = H * W
    M = N * HW
    mu, inv = mean[c], invstd[c]
    scratch = cuda.shared.array(REDUCE_THREADS, dtype=x.dtype)
    sum_g = x.dtype.type(0)
    sum_gx = x.dtype.type(0)
    for idx in range(cuda.threadIdx.x, M, REDUCE_THREADS):
        n = idx // HW
        r = idx - n * HW
        h = r // W
        w = r - h * W
        g = dy[n, c, h, w]
        sum_g += g
        sum_gx += g * (x[n, c, h, w] - mu) * inv
    total_g = block_sum(scratch, sum_g)
    total_gx = block_sum(scratch, sum_gx)
    if cuda.threadIdx.x == 0:
        dbeta[c] = total_g
        dgamma[c] = total_gx


@cuda.jit(cache=True)
def _batchnorm2d_backward_input_kernel(dx, dy, x, mean, invstd, gamma, dgamma, dbeta, C, HW, training):
    """One thread per element of the flat dx."""
    i = cuda.grid(1)
    if i < x.size:
        c = (i // HW) % C
        count = x.dtype.type(x.size // C)
        k = gamma[c] * invstd[c]
        g = dy[i]
        if training:
            xhat = (x[i] - mean[c]) * invstd[c]
            g = g - dbeta[c] / count - xhat * (dgamma[c] / count)
        dx[i] = k * g


# --------------------------------------------------------------------------- CUDA launchers


def batchnorm2d_forward_core_cuda(y, mean, invstd, running_mean, running_var, x, gamma, beta, eps, momentum,
                                  training, relu):
    """Two launches: the statistics (a block per channel), then the normalisation (a thread per element)."""
    dt = x.dtype.type  # eps and momentum in the arrays' precision, so that the kernel computes in it
    N, C, H, W = x.shape
    _batchnorm2d_stats_kernel[C, REDUCE_THREADS, stream()](mean, invstd, running_mean, running_var, x, dt(eps), dt(momentum),
                                                 training)
    _batchnorm2d_normalize_kernel[blocks(x.size, THREADS), THREADS, stream()](flat(y), flat(x), mean, invstd, gamma, beta, C,
                                                                    H * W, relu)


def batchnorm2d_backward_core_cuda(dx, dgamma, dbeta, dy, x, mean, invstd, gamma, training):
    """Two launches: the sums (a block per channel), then dx (a thread per element)."""
    N, C, H, W = x.shape
    _batchnorm2d_backward_reduce_kernel[C, REDUCE_THREADS, stream()](dgamma, dbeta, dy, x, mean, invstd)
    _batchnorm2d_backward_input_kernel[blocks(x.size, THREADS), THREADS, stream()](flat(dx), flat(dy), flat(x), mean, invstd,
                                                                         gamma, dgamma, dbeta, C, H * W, training)


def batchnorm2d_forward_cuda(y, mean, invstd, running_mean, running_var, x, gamma, beta, eps=1e-5, momentum=0.1,
                             training=True, relu=False):
    """``batchnorm2d_forward_cpu`` on the GPU."""
    fn = "batchnorm2d_forward_cuda"
    y, mean, invstd, running_mean, running_var, x, gamma, beta = gpu_arrays(
        fn, y=y, mean=mean, invstd=invstd, running_mean=running_mean, running_var=running_var, x=x, gamma=gamma,
        beta=beta)
    _check_forward(fn, on_gpu, y, mean, invstd, running_mean, running_var, x, gamma, beta, eps, momentum, training)
    batchnorm2d_forward_core_cuda(y, mean, invstd, running_mean, running_var, x, gamma, beta, float(eps),
                                  float(momentum), bool(training), bool(relu))
    return y


def batchnorm2d_backward_cuda(dx, dgamma, dbeta, dy, x, mean, invstd, gamma, training=True):
    """``batchnorm2d_backward_cpu`` on the GPU."""
    fn = "batchnorm2d_backward_cuda"
    dx, dgamma, dbeta, dy, x, mean, invstd, gamma = gpu_arrays(
        fn, dx=dx, dgamma=dgamma, dbeta=dbeta, dy=dy, x=x, mean=mean, invstd=invstd, gamma=gamma)
    _check_backward(fn, on_gpu, dx, dgamma, dbeta, dy, x, mean, invstd, gamma)
    batchnorm2d_backward_core_cuda(dx, dgamma, dbeta, dy, x, mean, invstd, gamma, bool(training))
    return dx
