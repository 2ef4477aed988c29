"""Row gather, the minibatch op: out[i] = x[idx[i]] along the first axis.

Training draws each minibatch from a shuffled order without moving the data set: the
permutation's slice for the batch says which rows to copy into the batch buffer. On a
GPU this keeps the whole data set on the device; only the indices travel, once per epoch.

x (R, ...) and out (B, ...) have the same trailing shape and dtype (float or integer);
idx (B,) int32 or int64 with values in [0, R). The kernels see them as 2-D (rows, D).
An index outside [0, R) writes nothing (the CPU entry point rejects it first).
"""

import numpy as np
from numba import cuda, prange

from ._checks import check_arrays, check_shape, is_c_contiguous, on_host
from ._cpu import parallel_and_serial
from ._cuda import blocks, gpu_arrays, on_gpu, stream

INT_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def check_gather(fn, on_device, out, x, idx):
    """Return ``(B, R, D)``: out (B, ...), x (R, ...), idx (B,)."""
    for name, a in (("out", out), ("x", x)):
        if not hasattr(a, "shape") or not on_device(a) or not is_c_contiguous(a):
            raise TypeError(f"{fn}: {name} must be a C-contiguous array; {on_device.__doc__}")
    if np.dtype(out.dtype) != np.dtype(x.dtype):
        raise TypeError(f"{fn}: out is {np.dtype(out.dtype)} but x is {np.dtype(x.dtype)}")
    check_arrays(fn, on_device, {}, {"idx": idx})
    if len(x.shape) < 1 or tuple(out.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"{fn}: out {tuple(out.shape)} and x {tuple(x.shape)} must share their trailing shape")
    check_shape(fn, "idx", idx, (out.shape[0],), ("B",))
    D = int(np.prod(x.shape[1:], dtype=np.int64))
    return out.shape[0], x.shape[0], D


# ----------------------------------------------------------------------------- CPU kernels


@parallel_and_serial
def _gather_rows_cpu(out, x, idx):
    """out[i, :] = x[idx[i], :]; one task per row."""
    R = x.shape[0]
    for i in prange(out.shape[0]):
        r = idx[i]
        if 0 <= r < R:
            out[i, :] = x[r, :]


def gather_rows_cpu(out, x, idx):
    """``out[i] = x[idx[i]]`` for every i. Returns ``out``."""
    fn = "gather_rows_cpu"
    B, R, D = check_gather(fn, on_host, out, x, idx)
    if B and (idx.min() < 0 or idx.max() >= R):
        raise ValueError(f"{fn}: idx must lie in [0, {R}), got values in [{idx.min()}, {idx.max()}]")
    gather = _gather_rows_cpu.for_size(B * D)
    gather(out.reshape(B, D), x.reshape(R, D), idx)
    return out


def gather_batch_core_cpu(xb, yb, x, y, idx):
    """Unchecked: a minibatch ``xb[i] = x[idx[i]]`` (rows of any shape) and its labels ``yb[i] = y[idx[i]]``,
    for a caller that has checked the shapes and the indices once (nbcnn's planned step)."""
    B, R = xb.shape[0], x.shape[0]
    D = xb.size // B
    gather = _gather_rows_cpu.for_size(B * D)
    gather(xb.reshape(B, D), x.reshape(R, D), idx)
    _gather_rows_cpu.serial(yb.reshape(B, 1), y.reshape(R, 1), idx)


# ---------------------------------------------------------------------------- CUDA kernels

THREADS = 256


def gather_rows_cuda(out, x, idx):
    """``out[i] = x[idx[i]]`` on the GPU; the arguments of ``gather_rows_cpu`` (indices not range-checked)."""
    fn = "gather_rows_cuda"
    out, x, idx = gpu_arrays(fn, out=out, x=x, idx=idx)
    B, R, D = check_gather(fn, on_gpu, out, x, idx)
    _gather_batch_kernel[blocks(B * D, THREADS), THREADS, stream()](out.reshape(B, D), idx, x.reshape(R, D), idx, idx, False)
    return out


@cuda.jit(cache=True)
def _gather_batch_kernel(xb, yb, x, y, idx, with_labels):
    """xb[i] = x[idx[i]], and with ``with_labels`` yb[i] = y[idx[i]]: a minibatch and its labels in one
    launch. One thread per element of xb (B, D), threads along D, so each row is read and written
    coalesced; the thread of column 0 of each row also copies the row's label."""
    B, D = xb.shape
    t = cuda.grid(1)
    if t >= B * D:
        return
    i, j = t // D, t % D
    r = idx[i]
    if 0 <= r < x.shape[0]:
        xb[i, j] = x[r, j]
        if with_labels and j == 0:
            yb[i] = y[r]


def gather_batch_core_cuda(xb, yb, x, y, idx):
    """Unchecked twin of ``gather_batch_core_cpu`` (2-D views of the images: (B, D) and (R, D))."""
    B, R = xb.shape[0], x.shape[0]
    D = xb.size // B
    _gather_batch_kernel[blocks(B * D, THREADS), THREADS, stream()](xb.reshape(B, D), yb, x.reshape(R, D), y, idx, True)
