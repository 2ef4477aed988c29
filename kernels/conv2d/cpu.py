"""2-D convolution on the CPU: forward, and backward to the input, the weights and the bias.

Letters: N batch, C input channels, K filters (output channels), H, W input size,
FH, FW filter size, OH, OW output size, S stride, P padding (per axis: sh, sw, ph, pw).
Gradients: dx (N, C, H, W), dw (K, C, FH, FW), db (K,), dy (N, K, OH, OW).

What a CNN layer computes is cross-correlation, the lecture's convolution with a
flipped filter: the window slides over the zero-padded input and is multiplied
element by element, with no flip::

    y[n, k, oh, ow] = b[k] + sum_{c, fh, fw} w[k, c, fh, fw] * x[n, c, oh*S - P + fh, ow*S - P + fw]

    OH = (H + 2*P - FH) // S + 1,   OW = (W + 2*P - FW) // S + 1

Every kernel here overwrites its output; none adds into it.

Loop order. For each filter tap (c, fh, fw), the outputs whose tap lands inside the
input form one rectangle (``valid_out_range``), so the innermost loop runs along a
row with no bounds test and, at stride 1, unit stride in both arrays: it vectorizes.

Parallelism is race-free by construction: each thread owns whole output planes
(``y[n, k]`` in forward, ``dx[n, c]`` in backward-input, ``dw[k, c]`` in
backward-weight, ``db[k]``), so no two threads ever write the same element and the
result does not depend on the number of threads.
"""

import numpy as np
from numba import njit, prange

from .._checks import on_host
from .._index import in_coord_cpu, valid_out_range_cpu
from ..activation import relu_backward_core_cpu, relu_forward_core_cpu
from .checks import check_conv2d, check_conv2d_bias, check_stride_padding

# ----------------------------------------------------------------------------- CPU kernels


@njit(parallel=True, cache=True)
def _conv2d_forward_cpu(y, x, w, b, sh, sw, ph, pw):
    """y (N, K, OH, OW) = conv(x (N, C, H, W), w (K, C, FH, FW)) + b (K,); one task per (n, k)."""
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    OH, OW = y.shape[2], y.shape[3]
    for task in prange(N * K):
        n = task // K
        k = task % K
        y[n, k, :, :] = b[k]
        for c in range(C):
            for fh in range(FH):
                oh_lo, oh_hi = valid_out_range_cpu(H, OH, fh, sh, ph)
                for fw in range(FW):
                    ow_lo, ow_hi = valid_out_range_cpu(W, OW, fw, sw, pw)
                    iw_lo = in_coord_cpu(ow_lo, fw, sw, pw)
                    wv = w[k, c, fh, fw]
                    for oh in range(oh_lo, oh_hi):
                        ih = in_coord_cpu(oh, fh, sh, ph)
                        for j in range(ow_hi - ow_lo):
                            y[n, k, oh, ow_lo + j] += wv * x[n, c, ih, iw_lo + j * sw]


@njit(parallel=True, cache=True)
def _conv2d_backward_input_cpu(dx, dy, w, sh, sw, ph, pw):
    """dx[n, c, ih, iw] = sum of w[k, c, fh, fw] * dy[n, k, oh, ow] over the taps that read (ih, iw).

    One task per (n, c): each scatters every output's gradient back through the filter
    into its own plane dx[n, c]. Padding taps have no input, so they drop out.
    """
    N, C, H, W = dx.shape
    K, _, FH, FW = w.shape
    OH, OW = dy.shape[2], dy.shape[3]
    for task in prange(N * C):
        n = task // C
        c = task % C
        dx[n, c, :, :] = 0
        for k in range(K):
            for fh in range(FH):
                oh_lo, oh_hi = valid_out_range_cpu(H, OH, fh, sh, ph)
                for fw in range(FW):
                    ow_lo, ow_hi = valid_out_range_cpu(W, OW, fw, sw, pw)
                    iw_lo = in_coord_cpu(ow_lo, fw, sw, pw)
                    wv = w[k, c, fh, fw]
                    for oh in range(oh_lo, oh_hi):
                        ih = in_coord_cpu(oh, fh, sh, ph)
                        for j in range(ow_hi - ow_lo):
                            dx[n, c, ih, iw_lo + j * sw] += wv * dy[n, k, oh, ow_lo + j]


@njit(parallel=True, cache=True)
def _conv2d_backward_weight_cpu(dw, dy, x, sh, sw, ph, pw):
    """dw[k, c, fh, fw] = sum over n, oh, ow of dy[n, k, oh, ow] * x[n, c, oh*S - P + fh, ow*S - P + fw].

    One task per (k, c): the sum over the batch happens inside one thread, into its
    own filter dw[k, c], so there is nothing to reduce across threads.
    """
    N, C, H, W = x.shape
    K, _, FH, FW = dw.shape
    OH, OW = dy.shape[2], dy.shape[3]
    for task in prange(K * C):
        k = task // C
        c = task % C
        for fh in range(FH):
            oh_lo, oh_hi = valid_out_range_cpu(H, OH, fh, sh, ph)
            for fw in range(FW):
                ow_lo, ow_hi = valid_out_range_cpu(W, OW, fw, sw, pw)
                iw_lo = in_coord_cpu(ow_lo, fw, sw, pw)
                acc = dw.dtype.type(0)
                for n in range(N):
                    for oh in range(oh_lo, oh_hi):
                        ih = in_coord_cpu(oh, fh, sh, ph)
                        for j in range(ow_hi - ow_lo):
                            acc += dy[n, k, oh, ow_lo + j] * x[n, c, ih, iw_lo + j * sw]
                dw[k, c, fh, fw] = acc


@njit(parallel=True, cache=True)
def _conv2d_backward_bias_cpu(db, dy):
    """db[k] = sum over n, oh, ow of dy[n, k, oh, ow]; one task per k."""
    N, K, OH, OW = dy.shape
    for k in prange(K):
        acc = db.dtype.type(0)
        for n in range(N):
            for oh in range(OH):
                for ow in range(OW):
                    acc += dy[n, k, oh, ow]
        db[k] = acc


# ---------------------------------------------------------------- public entry points


def conv2d_forward_cpu(y, x, w, b=None, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Forward convolution (cross-correlation) into ``y``; returns ``y``.

    x: (N, C, H, W), w: (K, C, FH, FW), b: (K,) or None for no bias,
    y: (N, K, OH, OW) with ``OH = (H + 2*pad_h - FH) // stride_h + 1``, likewise OW.
    All float arrays float32 or float64 (one dtype), C-contiguous NumPy arrays.
    """
    fn = "conv2d_forward_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    b_pair = ("b", b) if b is not None else None
    dims = check_conv2d(fn, on_host, ("x", x), ("w", w), ("y", y), b_pair, stride, padding)
    if b is None:
        b = np.zeros(dims[4], dtype=x.dtype)
    _conv2d_forward_cpu(y, x, w, b, *stride, *padding)
    return y


def conv2d_backward_input_cpu(dx, dy, w, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Gradient to the input, ``dx`` (N, C, H, W), from ``dy`` (N, K, OH, OW) and ``w`` (K, C, FH, FW).

    The shape of ``dx`` says H and W (with stride > 1, several H give the same OH).
    """
    fn = "conv2d_backward_input_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    check_conv2d(fn, on_host, ("dx", dx), ("w", w), ("dy", dy), None, stride, padding)
    _conv2d_backward_input_cpu(dx, dy, w, *stride, *padding)
    return dx


def conv2d_backward_weight_cpu(dw, dy, x, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Gradient to the filters, ``dw`` (K, C, FH, FW), from ``dy`` (N, K, OH, OW) and ``x`` (N, C, H, W)."""
    fn = "conv2d_backward_weight_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    check_conv2d(fn, on_host, ("x", x), ("dw", dw), ("dy", dy), None, stride, padding)
    _conv2d_backward_weight_cpu(dw, dy, x, *stride, *padding)
    return dw


def conv2d_backward_bias_cpu(db, dy):
    """Gradient to the bias, ``db`` (K,), the sum of ``dy`` (N, K, OH, OW) over n, oh and ow."""
    check_conv2d_bias("conv2d_backward_bias_cpu", on_host, db, dy)
    _conv2d_backward_bias_cpu(db, dy)
    return db


# ------------------------------------------------------------ unchecked cores (planned steps)
#
# The direct loops with the call shape of the fast cores in gemm.py, so that a plan can pick
# them by name (``algorithm="direct"``) to show what the definition costs. No scratch.


def conv2d_workspace_direct_cpu(x_shape, w_shape, y_shape, stride, padding, need_dx, dtype):
    return {}


def conv2d_forward_direct_core_cpu(y, x, w, b, sh, sw, ph, pw, relu, ws):
    _conv2d_forward_cpu(y, x, w, b, sh, sw, ph, pw)
    if relu:
        relu_forward_core_cpu(y, y)


def conv2d_backward_direct_core_cpu(dx, dw, db, dy, x, w, sh, sw, ph, pw, mask, ws):
    if dx is not None:
        _conv2d_backward_input_cpu(dx, dy, w, sh, sw, ph, pw)
        if mask:
            relu_backward_core_cpu(dx, dx, x)
    _conv2d_backward_weight_cpu(dw, dy, x, sh, sw, ph, pw)
    if db is not None:
        _conv2d_backward_bias_cpu(db, dy)
