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

Copying is what costs here, not the product: the (400, 6400) matrix of LeNet's second
layer is 10 MB, written by im2col and read by BLAS. Two things keep it cheap:

- Stride 1, the common case, has kernels of its own (``_unit``) whose innermost loop is
  a plain unit-stride copy of a row segment, which LLVM vectorizes; padding is done once,
  into a zero-bordered copy of the input, instead of by bounds tests in that loop. They
  see ``cols`` as (C, FH, FW, N, OH, OW), the same memory. Any other stride takes the
  general kernels, with the bounds arithmetic of ``_index``.
- The forward pass can leave its ``cols`` in an array the caller keeps (``cols=``), and
  the weight gradient can take it back, skipping the second im2col of the same input.
  ``conv2d_backward_gemm_cpu`` computes all three gradients with one transposition of dy.
"""

import numpy as np
from numba import njit, prange

from .._checks import check_arrays, check_shape, on_host
from .._index import in_coord_cpu, valid_out_range_cpu
from .checks import check_conv2d, check_conv2d_bias, check_stride_padding

# ----------------------------------------------------------------------------- CPU kernels


@njit(parallel=True, cache=True)
def _im2col_cpu(cols, x, FH, FW, sh, sw, ph, pw, OH, OW):
    """cols (C*FH*FW, N*OH*OW) from x (N, C, H, W), any stride; one task per row (c, fh, fw). Padding gives 0."""
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
    """dx (N, C, H, W) = the sum of cols' entries back onto the inputs they were copied from,
    any stride. One task per plane (n, c), which owns dx[n, c]: no races."""
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
def _pad_cpu(xp, x, ph, pw):
    """xp (N, C, H + 2*ph, W + 2*pw) = x with a border of zeros; one task per plane."""
    N, C, H, W = x.shape
    HP, WP = xp.shape[2], xp.shape[3]
    for task in prange(N * C):
        n = task // C
        c = task % C
        for i in range(HP):
            for j in range(WP):
                xp[n, c, i, j] = 0
        for i in range(H):
            for j in range(W):
                xp[n, c, i + ph, j + pw] = x[n, c, i, j]


@njit(parallel=True, cache=True)
def _im2col_unit_cpu(cols6, xp):
    """cols6 (C, FH, FW, N, OH, OW) from xp (N, C, OH+FH-1, OW+FW-1), stride 1, already padded.
    One task per input plane (n, c): it is read from cache FH*FW times."""
    C, FH, FW, N, OH, OW = cols6.shape
    for task in prange(N * C):
        n = task // C
        c = task % C
        for fh in range(FH):
            for fw in range(FW):
                for oh in range(OH):
                    for ow in range(OW):
                        cols6[c, fh, fw, n, oh, ow] = xp[n, c, oh + fh, ow + fw]


@njit(parallel=True, cache=True)
def _col2im_unit_cpu(dx, dxp, cols6, ph, pw):
    """dx (N, C, H, W) from cols6 (C, FH, FW, N, OH, OW), stride 1: each task sums its plane
    (n, c) into dxp[n, c] (the padded plane, scratch), then copies out the unpadded part."""
    N, C, H, W = dx.shape
    FH, FW, OH, OW = cols6.shape[1], cols6.shape[2], cols6.shape[4], cols6.shape[5]
    HP, WP = dxp.shape[2], dxp.shape[3]
    for task in prange(N * C):
        n = task // C
        c = task % C
        for i in range(HP):
            for j in range(WP):
                dxp[n, c, i, j] = 0
        for fh in range(FH):
            for fw in range(FW):
                for oh in range(OH):
                    for ow in range(OW):
                        dxp[n, c, oh + fh, ow + fw] += cols6[c, fh, fw, n, oh, ow]
        for i in range(H):
            for j in range(W):
                dx[n, c, i, j] = dxp[n, c, i + ph, j + pw]


@njit(parallel=True, cache=True)
def _nkp_from_knp(out, src, b):
    """out (N, K, P) = src (K, N, P) + b[k]: from the product's layout to NCHW, adding the bias."""
    N, K, P = out.shape
    for task in prange(N * K):
        n = task // K
        k = task % K
        for p in range(P):
            out[n, k, p] = src[k, n, p] + b[k]


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _knp_from_nkp(out, db, src):
    """out (K, N, P) = src (N, K, P) transposed: NCHW gradients into the product's layout; on the way
    db[k] = the sum of src[:, k, :] (the bias gradient), accumulated in float64. One task per k.
    ``reassoc`` lets LLVM split the sum over vector lanes (a single running sum waits 4 cycles per
    add: half the kernel's time); the order is still fixed, so the result does not vary run to run."""
    N, K, P = src.shape
    for k in prange(K):
        acc = 0.0
        for n in range(N):
            for p in range(P):
                v = src[n, k, p]
                out[k, n, p] = v
                acc += v
        db[k] = acc


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


# ------------------------------------------------------------------- im2col, col2im on hosts


def im2col(cols, x, FH, FW, stride, padding, OH, OW):
    """Fill ``cols`` (C*FH*FW, N*OH*OW) from ``x``: the stride-1 kernel where it applies."""
    N, C, H, W = x.shape
    if stride != (1, 1):
        _im2col_cpu(cols, x, FH, FW, *stride, *padding, OH, OW)
        return
    ph, pw = padding
    if ph or pw:
        xp = scratch("padded", x.dtype, (N, C, H + 2 * ph, W + 2 * pw))
        _pad_cpu(xp, x, ph, pw)
        x = xp
    _im2col_unit_cpu(cols.reshape(C, FH, FW, N, OH, OW), x)


def col2im(dx, cols, FH, FW, stride, padding, OH, OW):
    """dx = the sum of ``cols`` back onto the inputs (the adjoint of ``im2col``)."""
    N, C, H, W = dx.shape
    if stride != (1, 1):
        _col2im_cpu(dx, cols, FH, FW, *stride, *padding, OH, OW)
        return
    ph, pw = padding
    dxp = scratch("padded", dx.dtype, (N, C, H + 2 * ph, W + 2 * pw))
    _col2im_unit_cpu(dx, dxp, cols.reshape(C, FH, FW, N, OH, OW), ph, pw)


def _check_cols(fn, cols, like, shape):
    """``cols`` given by the caller: a C-contiguous host array of x's dtype and the im2col shape."""
    check_arrays(fn, on_host, {"x": like, "cols": cols})
    check_shape(fn, "cols", cols, shape, ("C*FH*FW", "N*OH*OW"))


# ---------------------------------------------------------------- public entry points


def conv2d_forward_gemm_cpu(y, x, w, b=None, stride_h=1, stride_w=1, pad_h=0, pad_w=0, cols=None):
    """Forward convolution by im2col and one matrix product; the arguments of ``conv2d_forward_cpu``.

    ``cols``: optional (C*FH*FW, N*OH*OW) array of x's dtype that receives the im2col matrix of
    ``x``, for ``conv2d_backward_weight_gemm_cpu(..., cols=cols)`` to reuse; by default a scratch
    array is used.
    """
    fn = "conv2d_forward_gemm_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    b_pair = ("b", b) if b is not None else None
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_host, ("x", x), ("w", w), ("y", y), b_pair, stride, padding)
    if b is None:
        b = np.zeros(K, x.dtype)
    if cols is None:
        cols = scratch("cols", x.dtype, (C * FH * FW, N * OH * OW))
    else:
        _check_cols(fn, cols, x, (C * FH * FW, N * OH * OW))
    yt = scratch("yt", x.dtype, (K, N * OH * OW))
    im2col(cols, x, FH, FW, stride, padding, OH, OW)
    np.matmul(w.reshape(K, C * FH * FW), cols, out=yt)
    _nkp_from_knp(y.reshape(N, K, OH * OW), yt.reshape(K, N, OH * OW), b)
    return y


def conv2d_backward_gemm_cpu(dx, dw, db, dy, x, w, stride_h=1, stride_w=1, pad_h=0, pad_w=0, cols=None):
    """All three gradients of a convolution, with one transposition of ``dy``: ``dx`` (N, C, H, W),
    or None to skip it; ``dw`` (K, C, FH, FW); ``db`` (K,), or None to skip it.

    ``cols``: the im2col matrix of ``x`` as ``conv2d_forward_gemm_cpu(..., cols=cols)`` left it;
    given, the weight gradient skips recomputing it (the caller vouches that ``x`` has not changed
    since). Without it, it is recomputed. Returns ``(dx, dw, db)``.
    """
    fn = "conv2d_backward_gemm_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_host, ("x", x), ("w", w), ("dy", dy), None, stride,
                                                 padding)
    check_conv2d(fn, on_host, ("x", x), ("dw", dw), ("dy", dy), None, stride, padding)
    if dx is not None:
        check_conv2d(fn, on_host, ("dx", dx), ("w", w), ("dy", dy), None, stride, padding)
    if db is not None:
        check_conv2d_bias(fn, on_host, db, dy)
    shape = (C * FH * FW, N * OH * OW)
    if cols is None:
        cols = scratch("cols", x.dtype, shape)
        im2col(cols, x, FH, FW, stride, padding, OH, OW)
    else:
        _check_cols(fn, cols, x, shape)
    dyt = scratch("dyt", x.dtype, (K, N * OH * OW))
    _knp_from_nkp(dyt.reshape(K, N, OH * OW), db if db is not None else scratch("db", x.dtype, (K,)),
                  dy.reshape(N, K, OH * OW))
    np.matmul(dyt, cols.T, out=dw.reshape(K, C * FH * FW))
    if dx is not None:
        dcols = scratch("dcols", x.dtype, shape)
        np.matmul(w.reshape(K, C * FH * FW).T, dyt, out=dcols)
        col2im(dx, dcols, FH, FW, stride, padding, OH, OW)
    return dx, dw, db


def conv2d_backward_input_gemm_cpu(dx, dy, w, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Gradient to the input by one matrix product and col2im; the arguments of ``conv2d_backward_input_cpu``."""
    fn = "conv2d_backward_input_gemm_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_host, ("dx", dx), ("w", w), ("dy", dy), None, stride,
                                                 padding)
    dyt = scratch("dyt", dx.dtype, (K, N * OH * OW))
    dcols = scratch("dcols", dx.dtype, (C * FH * FW, N * OH * OW))
    _knp_from_nkp(dyt.reshape(K, N, OH * OW), scratch("db", dx.dtype, (K,)), dy.reshape(N, K, OH * OW))
    np.matmul(w.reshape(K, C * FH * FW).T, dyt, out=dcols)
    col2im(dx, dcols, FH, FW, stride, padding, OH, OW)
    return dx


def conv2d_backward_weight_gemm_cpu(dw, dy, x, stride_h=1, stride_w=1, pad_h=0, pad_w=0, cols=None):
    """Gradient to the filters by im2col and one matrix product; the arguments of
    ``conv2d_backward_weight_cpu``, and ``cols`` as in ``conv2d_backward_gemm_cpu``."""
    fn = "conv2d_backward_weight_gemm_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_host, ("x", x), ("dw", dw), ("dy", dy), None, stride,
                                                 padding)
    shape = (C * FH * FW, N * OH * OW)
    if cols is None:
        cols = scratch("cols", x.dtype, shape)
        im2col(cols, x, FH, FW, stride, padding, OH, OW)
    else:
        _check_cols(fn, cols, x, shape)
    dyt = scratch("dyt", x.dtype, (K, N * OH * OW))
    _knp_from_nkp(dyt.reshape(K, N, OH * OW), scratch("db", x.dtype, (K,)), dy.reshape(N, K, OH * OW))
    np.matmul(dyt, cols.T, out=dw.reshape(K, C * FH * FW))
    return dw
