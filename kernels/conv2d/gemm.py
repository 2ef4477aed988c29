"""2-D convolution on the CPU as a matrix product: im2col, then one BLAS call.

The direct kernels in ``cpu.py`` do one multiply-add per load and run at a few GFLOP/s.
Rewriting the convolution as a matrix product lets BLAS (NumPy's ``matmul``) run it at
close to the machine's peak, at the cost of copying the input into a matrix first:

    cols[(c*FH + fh)*FW + fw, n*OH*OW + oh*OW + ow] = x[n, c, oh*S - P + fh, ow*S - P + fw]

    forward          y^T  (K, N*OH*OW)      = w (K, C*FH*FW) @ cols (C*FH*FW, N*OH*OW)
    backward input   dcols (C*FH*FW, N*OH*OW) = w^T @ dy^T,   then col2im adds dcols back into dx
    backward weight  dw   (K, C*FH*FW)      = dy^T (K, N*OH*OW) @ cols^T

The batch is folded into the columns so that each pass is a single large product.
``y^T`` and ``dy^T`` are (K, N, OH*OW): a transposing copy turns them into NCHW and back.
Same arguments, shapes and results as ``cpu.py`` (up to float rounding); outputs are
overwritten. Scratch matrices are kept between calls and grown when too small, so the
steady state allocates nothing (one thread of the host calls at a time).
"""

import numpy as np
from numba import njit, prange

from .._checks import on_host
from .._index import in_coord_cpu, valid_out_range_cpu
from .checks import check_conv2d, check_stride_padding

# ----------------------------------------------------------------------------- CPU kernels


@njit(parallel=True, cache=True)
def _im2col_cpu(cols, x, FH, FW, sh, sw, ph, pw, OH, OW):
    """cols (C*FH*FW, N*OH*OW) from x (N, C, H, W); one task per row (c, fh, fw). Padding gives 0."""
    N, C, H, W = x.shape
    for row in prange(C * FH * FW):
        c = row // (FH * FW)
        fh = (row // FW) % FH
        fw = row % FW
        oh_lo, oh_hi = valid_out_range_cpu(H, OH, fh, sh, ph)
        ow_lo, ow_hi = valid_out_range_cpu(W, OW, fw, sw, pw)
        iw_lo = in_coord_cpu(ow_lo, fw, sw, pw)
        cols[row, :] = 0
        for n in range(N):
            base = n * OH * OW
            for oh in range(oh_lo, oh_hi):
                ih = in_coord_cpu(oh, fh, sh, ph)
                start = base + oh * OW
                for j in range(ow_hi - ow_lo):
                    cols[row, start + ow_lo + j] = x[n, c, ih, iw_lo + j * sw]


@njit(parallel=True, cache=True)
def _col2im_cpu(dx, cols, FH, FW, sh, sw, ph, pw, OH, OW):
    """dx (N, C, H, W) = the sum of cols' entries back onto the inputs they were copied from.
    One task per plane (n, c), which owns dx[n, c]: no races."""
    N, C, H, W = dx.shape
    for task in prange(N * C):
        n = task // C
        c = task % C
        dx[n, c, :, :] = 0
        base = n * OH * OW
        for fh in range(FH):
            oh_lo, oh_hi = valid_out_range_cpu(H, OH, fh, sh, ph)
            for fw in range(FW):
                ow_lo, ow_hi = valid_out_range_cpu(W, OW, fw, sw, pw)
                iw_lo = in_coord_cpu(ow_lo, fw, sw, pw)
                row = (c * FH + fh) * FW + fw
                for oh in range(oh_lo, oh_hi):
                    ih = in_coord_cpu(oh, fh, sh, ph)
                    start = base + oh * OW
                    for j in range(ow_hi - ow_lo):
                        dx[n, c, ih, iw_lo + j * sw] += cols[row, start + ow_lo + j]


@njit(parallel=True, cache=True)
def _nkp_from_knp(out, src, b):
    """out (N, K, P) = src (K, N, P) + b[k]: from the product's layout to NCHW, adding the bias."""
    N, K, P = out.shape
    for task in prange(N * K):
        n = task // K
        k = task % K
        for p in range(P):
            out[n, k, p] = src[k, n, p] + b[k]


@njit(parallel=True, cache=True)
def _knp_from_nkp(out, src):
    """out (K, N, P) = src (N, K, P) transposed: NCHW gradients into the product's layout."""
    N, K, P = src.shape
    for task in prange(N * K):
        n = task // K
        k = task % K
        for p in range(P):
            out[k, n, p] = src[n, k, p]


# ------------------------------------------------------------------------------- scratch

_scratch = {}


def scratch(name, dtype, shape):
    """A host scratch array kept between calls under ``name``, grown when too small."""
    key = (name, np.dtype(dtype))
    size = int(np.prod(shape))
    buf = _scratch.get(key)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype)
        _scratch[key] = buf
    return buf[:size].reshape(shape)


# ---------------------------------------------------------------- public entry points


def conv2d_forward_gemm_cpu(y, x, w, b=None, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Forward convolution by im2col and one matrix product; the arguments of ``conv2d_forward_cpu``."""
    fn = "conv2d_forward_gemm_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    b_pair = ("b", b) if b is not None else None
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_host, ("x", x), ("w", w), ("y", y), b_pair, stride, padding)
    if b is None:
        b = np.zeros(K, x.dtype)
    cols = scratch("cols", x.dtype, (C * FH * FW, N * OH * OW))
    yt = scratch("yt", x.dtype, (K, N * OH * OW))
    _im2col_cpu(cols, x, FH, FW, *stride, *padding, OH, OW)
    np.matmul(w.reshape(K, C * FH * FW), cols, out=yt)
    _nkp_from_knp(y.reshape(N, K, OH * OW), yt.reshape(K, N, OH * OW), b)
    return y


def conv2d_backward_input_gemm_cpu(dx, dy, w, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Gradient to the input by one matrix product and col2im; the arguments of ``conv2d_backward_input_cpu``."""
    fn = "conv2d_backward_input_gemm_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_host, ("dx", dx), ("w", w), ("dy", dy), None, stride,
                                                 padding)
    dyt = scratch("dyt", dx.dtype, (K, N * OH * OW))
    dcols = scratch("cols", dx.dtype, (C * FH * FW, N * OH * OW))
    _knp_from_nkp(dyt.reshape(K, N, OH * OW), dy.reshape(N, K, OH * OW))
    np.matmul(w.reshape(K, C * FH * FW).T, dyt, out=dcols)
    _col2im_cpu(dx, dcols, FH, FW, *stride, *padding, OH, OW)
    return dx


def conv2d_backward_weight_gemm_cpu(dw, dy, x, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Gradient to the filters by im2col and one matrix product; the arguments of ``conv2d_backward_weight_cpu``."""
    fn = "conv2d_backward_weight_gemm_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_host, ("x", x), ("dw", dw), ("dy", dy), None, stride,
                                                 padding)
    cols = scratch("cols", x.dtype, (C * FH * FW, N * OH * OW))
    dyt = scratch("dyt", x.dtype, (K, N * OH * OW))
    _im2col_cpu(cols, x, FH, FW, *stride, *padding, OH, OW)
    _knp_from_nkp(dyt.reshape(K, N, OH * OW), dy.reshape(N, K, OH * OW))
    np.matmul(dyt, cols.T, out=dw.reshape(K, C * FH * FW))
    return dw
