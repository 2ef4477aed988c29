"""2-D convolution on the CPU as matrix products in nbcnn's own register tiles (``kernels/matmul.py``).

The direct kernels in ``cpu.py`` do one multiply-add per load and run at a few GFLOP/s.
Written as a matrix product, the convolution runs in the product's register tile near the
machine's peak. Three ways, chosen per shape (``conv2d_workspace_cpu``), the first that applies:

- Few input channels (a first layer, ``few_channels``): y by the implicit product's forward
  (``implicit.convolve_body``, any padding); dw by a direct kernel over flat padded planes,
  four filters a task (the product would be a few taps deep and wide); dx by the implicit
  product's scatter where it applies, through im2col otherwise.
- Stride 1 with padding under the filter's size (``implicit.implicit_applies``): the implicit
  product of ``implicit.py``, the patches copied tap by tap into the product's panels, no
  matrix of patches written at all. Where the filters are 3x3 and the layer is not thin
  (``winograd.winograd_applies``, which asks more of a layer on an AVX2 machine), all three
  passes run Winograd's F(2x2, 3x3) of ``winograd.py`` instead: 16 multiplies for each 2x2
  block of outputs where the product does 36.
- Anything else: im2col, then one product a pass, with

    cols[(c*FH + fh)*FW + fw, n*OH*OW + oh*OW + ow] = x[n, c, oh*S - P + fh, ow*S - P + fw]

    forward          y^T  (K, N*OH*OW)      = w (K, C*FH*FW) @ cols (C*FH*FW, N*OH*OW)
    backward input   dcols (C*FH*FW, N*OH*OW) = w^T @ dy^T,   then col2im adds dcols back into dx
                     (a batch chunk at a time, so that col2im reads dcols back from the cache)
    backward weight  dw   (K, C*FH*FW)      = dy^T (K, N*OH*OW) @ cols^T   (computed as (cols @ dy)^T)

  The batch is folded into the columns so that each pass is a single large product.
  ``y^T`` and ``dy^T`` are (K, N, OH*OW): a transposing copy turns them into NCHW and back.
  Stride 1 (with a padding too large for the implicit kernels) has im2col kernels of its own
  (``_unit``) whose innermost loop is a plain unit-stride copy of a row segment, after one
  padding copy of the input; any other stride takes the general kernels, with the bounds
  arithmetic of ``_index``.

Same arguments, shapes and results as ``cpu.py`` (up to float rounding); outputs are
overwritten. The public entry points run what a Conv2D layer runs, allocating their scratch
on each call; given ``cols=``, they take the im2col path and the forward leaves its matrix there
for the weight gradient to take back, skipping a second im2col of the same input. The unchecked
cores at the end take their scratch from the caller (``conv2d_workspace_cpu`` says which), so
nbcnn's planned step, which allocates it once per shape, allocates nothing per step.
"""

from types import SimpleNamespace

import numba
import numpy as np
from numba import njit, prange

from .._checks import check_arrays, check_shape, on_host
from .._index import in_coord_cpu, valid_out_range_cpu
from ..activation import relu_backward_core_cpu
from ..matmul import matmul_core_cpu, matmul_workspace
from .checks import check_conv2d, check_conv2d_bias, check_stride_padding
from .implicit import (bias_gradient_cpu, conv2d_backward_implicit_core, conv2d_forward_implicit_core, gather_workspace,
                       implicit_applies, implicit_input_gradient, implicit_workspace)
from .winograd import (conv2d_forward_winograd_core, winograd_applies, winograd_input_gradient, winograd_weight_gradient,
                       winograd_workspace)

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
def _nkp_from_knp(out, src, b, relu):
    """out (N, K, P) = src (K, N, P) + b[k]: from the product's layout to NCHW, adding the bias,
    and with ``relu`` taking max(., 0) on the way (the ReLU after the convolution, for free)."""
    N, K, P = out.shape
    for task in prange(N * K):
        n = task // K
        k = task % K
        bk = b[k]
        if relu:
            for p in range(P):
                v = src[k, n, p] + bk
                out[n, k, p] = v if v > 0 else 0
        else:
            for p in range(P):
                out[n, k, p] = src[k, n, p] + bk


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


# Few input channels (a first layer: 1 for MNIST, 3 for colour): the product above is then thin
# (C*FH*FW rows), and its time goes into copying: im2col's matrix is FH*FW times the input, and
# the product's result is transposed into NCHW afterwards. The two kernels below write neither.
#
# They see a padded input plane (HP x WP) as one flat run of values. Tap (fh, fw) of output
# (oh, ow) reads the input at flat index (oh*WP + ow) + (fh*WP + fw): an output plane kept with
# the input's row length WP (its last FW - 1 columns are never used) is, tap by tap, a scaled copy
# of the input shifted by fh*WP + fw. Each tap is then one loop over the whole plane (28 x 32
# values for MNIST), which LLVM vectorizes; a loop over a 28-value row would spend more on
# entering the loop than in it. Stride 1 only.

FEW_CHANNELS = 3  # at most this many input channels take the direct kernels below (stride 1)
FILTER_BLOCK = 4  # filters a task of the direct kernels computes together


def few_channels(x_shape, w_shape, stride):
    """Whether a convolution takes the few-channel kernels (in a planned step)."""
    return x_shape[1] <= FEW_CHANNELS and tuple(stride) == (1, 1)


def few_channels_planes(OH, OW, FW):
    """Shape of the few-channel kernels' scratch: for each of Numba's threads, FILTER_BLOCK flat planes
    of row length OW + FW - 1 (``numba.get_thread_id()`` picks a task's: nothing is allocated in a step)."""
    return (numba.config.NUMBA_NUM_THREADS, FILTER_BLOCK, OH * (OW + FW - 1))


@njit(inline="always", cache=True)
def tap(t, FH, FW, WP):
    """Tap t of the flattened (c, fh, fw): its input channel, and how far its input is shifted in a
    flat padded plane of row length WP."""
    c = t // (FH * FW)
    fh = (t // FW) % FH
    fw = t % FW
    return c, fh * WP + fw


@njit(inline="always", cache=True)
def filter_block(k0, K):
    """The FILTER_BLOCK (4) filters from k0; where fewer than four are left (K not a multiple of 4), the
    last one stands in for the missing ones: computed again, never written."""
    return k0, min(k0 + 1, K - 1), min(k0 + 2, K - 1), min(k0 + 3, K - 1)


# Both kernels take four filters and two taps a pass over the plane: each input value loaded feeds
# eight multiply-adds (one had four taps of a single filter: one load and one store of the sum for
# four, a third of the machine's rate), and 14 vector registers hold the pass (8 weights or sums, the
# two shifted inputs and the four planes), within AVX2's 16. An odd last tap is paired with itself at
# weight 0 (forward) or not written (backward). Measured on the default model's first layer, batch
# 128 (16 filters, 5x5, 28x28): forward 1.69 -> 0.93 ms, weight gradient 1.95 -> 0.90 ms.


@njit(inline="always", cache=True)
def add_weight_gradients(dwf, four, xp, n, k0, count, FH, FW, WP, span):
    """dwf[k0 + j] (K, C*FH*FW) += the dot products of the gradient plane four[j] (row length WP,
    zeros in the unused columns) with sample n's input shifted by each tap, for j < count."""
    taps = dwf.shape[1]
    p0, p1, p2, p3 = four[0], four[1], four[2], four[3]
    for t in range(0, taps, 2):
        t1 = min(t + 1, taps - 1)
        c0, h0 = tap(t, FH, FW, WP)
        c1, h1 = tap(t1, FH, FW, WP)
        u0, u1 = xp[n, c0, h0:h0 + span], xp[n, c1, h1:h1 + span]
        a0 = a1 = a2 = a3 = e0 = e1 = e2 = e3 = dwf.dtype.type(0)
        for i in range(span):
            u, v = u0[i], u1[i]
            q0, q1, q2, q3 = p0[i], p1[i], p2[i], p3[i]
            a0 += q0 * u
            a1 += q1 * u
            a2 += q2 * u
            a3 += q3 * u
            e0 += q0 * v
            e1 += q1 * v
            e2 += q2 * v
            e3 += q3 * v
        for j, (a, e) in enumerate(((a0, e0), (a1, e1), (a2, e2), (a3, e3))):
            if j < count:
                dwf[k0 + j, t] += a
                if t1 > t:
                    dwf[k0 + j, t1] += e


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def _few_channels_backward_weight_cpu(dw, db, dy, xp, planes):
    """dw (K, C, FH, FW) and db (K,) from dy (N, K, OH, OW) and xp (N, C, HP*WP), the zero-padded
    input with its planes flat. One task per block of four filters, which alone writes their dw and db: for each
    sample, dy of the four is laid out with row length WP in its thread's ``planes`` (zeros in the
    unused columns), and each tap's gradient is the dot product of a plane with the input shifted by
    the tap. ``reassoc`` lets the dot products use every vector lane; the order is fixed at compile
    time and the samples are added in order, so the result does not vary run to run."""
    N, K, OH, OW = dy.shape
    C, FH, FW = dw.shape[1], dw.shape[2], dw.shape[3]
    WP = OW + FW - 1
    span = OH * WP - (FW - 1)
    dwf = dw.reshape(K, C * FH * FW)  # a view: dw is C-contiguous
    for block in prange((K + FILTER_BLOCK - 1) // FILTER_BLOCK):
        k0 = block * FILTER_BLOCK
        ka, kb, kc, kd = filter_block(k0, K)
        count = min(FILTER_BLOCK, K - k0)
        four = planes[numba.get_thread_id()]
        p0, p1, p2, p3 = four[0], four[1], four[2], four[3]
        four[:, :] = 0  # the unused columns stay zero
        for j in range(count):
            dwf[k0 + j, :] = 0
        s0, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0  # the bias gradients, in float64
        for n in range(N):
            for oh in range(OH):
                for ow in range(OW):
                    i = oh * WP + ow
                    g0, g1, g2, g3 = dy[n, ka, oh, ow], dy[n, kb, oh, ow], dy[n, kc, oh, ow], dy[n, kd, oh, ow]
                    p0[i], p1[i], p2[i], p3[i] = g0, g1, g2, g3
                    s0, s1, s2, s3 = s0 + g0, s1 + g1, s2 + g2, s3 + g3
            add_weight_gradients(dwf, four, xp, n, k0, count, FH, FW, WP, span)
        for j, s in enumerate((s0, s1, s2, s3)):
            if j < count:
                db[k0 + j] = s


# ------------------------------------------------------------------- im2col, col2im on hosts


def im2col(cols, x, FH, FW, stride, padding, OH, OW, padded):
    """Fill ``cols`` (C*FH*FW, N*OH*OW) from ``x``: the stride-1 kernel where it applies.
    ``padded``: scratch (N, C, H + 2*ph, W + 2*pw) for the zero-bordered copy (stride 1 with padding)."""
    N, C, H, W = x.shape
    if stride != (1, 1):
        _im2col_cpu(cols, x, FH, FW, *stride, *padding, OH, OW)
        return
    ph, pw = padding
    if ph or pw:
        _pad_cpu(padded, x, ph, pw)
        x = padded
    _im2col_unit_cpu(cols.reshape(C, FH, FW, N, OH, OW), x)


def col2im(dx, cols, FH, FW, stride, padding, OH, OW, padded):
    """dx = the sum of ``cols`` back onto the inputs (the adjoint of ``im2col``); ``padded`` as there
    (used at stride 1 whatever the padding)."""
    N, C, H, W = dx.shape
    if stride != (1, 1):
        _col2im_cpu(dx, cols, FH, FW, *stride, *padding, OH, OW)
        return
    ph, pw = padding
    _col2im_unit_cpu(dx, padded, cols.reshape(C, FH, FW, N, OH, OW), ph, pw)


# The input gradient goes through dcols a batch chunk at a time: a chunk of about 4 MB is still in
# the cache when col2im reads it back. Measured on conv2 of the default model at batch 128 (the
# product and col2im, the caches flushed between calls): 4.7 ms in one piece, 3.4 in chunks.
DCOLS_BYTES = 4 << 20


def dcols_shape(rows, N, OH, OW, itemsize):
    """Shape of the scratch for one chunk of dcols: ``rows`` = C*FH*FW, as many samples as fit in
    DCOLS_BYTES (at least one, at most the batch)."""
    samples = max(1, min(N, DCOLS_BYTES // (rows * OH * OW * itemsize)))
    return (rows, samples * OH * OW)


def input_gradient(dx, w, kt, dcols, stride, padding, OH, OW, padded, ws):
    """dx from kt (K, N*OH*OW), dy in the product's layout: dcols = w^T kt and col2im, one chunk of
    the batch at a time (``dcols`` holds one chunk; ``padded`` as ``col2im`` takes it; ``ws`` the
    product's scratch)."""
    N = dx.shape[0]
    K, C, FH, FW = w.shape
    rows, plane = C * FH * FW, OH * OW
    step = dcols.shape[1] // plane
    wf = w.reshape(K, rows)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        part = dcols.reshape(-1)[:rows * (n1 - n0) * plane].reshape(rows, (n1 - n0) * plane)  # contiguous
        matmul_core_cpu(part, wf, kt[:, n0 * plane:n1 * plane], True, False, False, ws)
        col2im(dx[n0:n1], part, FH, FW, stride, padding, OH, OW, None if padded is None else padded[n0:n1])


def conv2d_workspace_cpu(x_shape, w_shape, y_shape, stride, padding, need_dx, dtype, direct=True):
    """{name: shape} of the scratch the CPU cores need for these shapes. Three ways, the first that
    applies (unless ``direct`` is False, which always takes the last):

    - few input channels (``few_channels``): ``planes`` for the weight gradient's direct kernel,
      ``padded`` for the zero-bordered input, the implicit forward's scratch (``im_*``), and for
      the input gradient the implicit scatter's where it applies, ``kt`` and the product's
      otherwise;
    - stride 1 (``implicit.implicit_applies``): Winograd's scratch (``wg_*``) where it applies,
      the implicit product's (``im_*``) otherwise;
    - otherwise im2col: the matrix ``cols`` (kept from forward for backward), ``kt`` (K, N*OH*OW)
      for the products in their layout, ``padded`` for stride 1, ``dcols`` when the input gradient
      is needed, and the product's own scratch (``mm_*``).

    ``db`` always (a layer without bias still computes one).
    """
    N, C, H, W = x_shape
    K, _, FH, FW = w_shape
    OH, OW = y_shape[2], y_shape[3]
    rows = C * FH * FW
    shapes = {"db": (K,)}
    if direct and implicit_applies(w_shape, stride, padding) and not few_channels(x_shape, w_shape, stride):
        if winograd_applies(x_shape, w_shape, stride, padding):
            return {**shapes, **winograd_workspace(x_shape, w_shape, need_dx)}
        return {**shapes, **implicit_workspace(x_shape, w_shape, y_shape, padding, need_dx)}
    shapes["kt"] = (K, N * OH * OW)
    if tuple(stride) == (1, 1):
        shapes["padded"] = (N, C, H + 2 * padding[0], W + 2 * padding[1])
    # the three products: kt = w cols, dcols = w^T kt (a chunk of the batch), dw = kt cols^T
    NQ = N * OH * OW
    product = matmul_workspace((K, NQ, rows), (rows, NQ, K), (K, rows, NQ))
    if direct and few_channels(x_shape, w_shape, stride):  # no im2col matrix to keep
        shapes["planes"] = few_channels_planes(OH, OW, FW)
        shapes.update(gather_workspace(x_shape, w_shape, y_shape, padding))
        if need_dx and implicit_applies(w_shape, stride, padding):  # dx by the implicit scatter
            shapes.update(implicit_workspace(x_shape, w_shape, y_shape, padding, True, scatter=True))
            del shapes["kt"]
            return shapes
        if not need_dx:
            del shapes["kt"]
        else:
            shapes.update(product)
    else:
        shapes["cols"] = (rows, N * OH * OW)
        shapes.update(product)
    if need_dx:
        shapes["dcols"] = dcols_shape(rows, N, OH, OW, np.dtype(dtype).itemsize)
    return shapes


def _scratch(x_shape, w_shape, y_shape, stride, padding, need_dx, dtype, cols=False):
    """Fresh scratch arrays for one call of a public entry point: for what a planned step runs on
    these shapes, or with ``cols`` for the im2col path (whose matrix the caller keeps)."""
    shapes = conv2d_workspace_cpu(x_shape, w_shape, y_shape, stride, padding, need_dx, dtype, direct=not cols)
    return {name: np.empty(shape, dtype) for name, shape in shapes.items()}


def _check_cols(fn, cols, like, shape):
    """``cols`` given by the caller: a C-contiguous host array of x's dtype and the im2col shape."""
    check_arrays(fn, on_host, {"x": like, "cols": cols})
    check_shape(fn, "cols", cols, shape, ("C*FH*FW", "N*OH*OW"))


# ---------------------------------------------------------------- public entry points


def conv2d_forward_gemm_cpu(y, x, w, b=None, stride_h=1, stride_w=1, pad_h=0, pad_w=0, cols=None):
    """Forward convolution as a matrix product, the way a Conv2D layer runs it (see the module's
    text); the arguments of ``conv2d_forward_cpu``.

    ``cols``: optional (C*FH*FW, N*OH*OW) array of x's dtype; given, the product goes through
    im2col and ``cols`` receives the im2col matrix of ``x``, for
    ``conv2d_backward_weight_gemm_cpu(..., cols=cols)`` to reuse.
    """
    fn = "conv2d_forward_gemm_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    b_pair = ("b", b) if b is not None else None
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_host, ("x", x), ("w", w), ("y", y), b_pair, stride, padding)
    if b is None:
        b = np.zeros(K, x.dtype)
    ws = _scratch(x.shape, w.shape, y.shape, stride, padding, False, x.dtype, cols is not None)
    if cols is not None:
        _check_cols(fn, cols, x, (C * FH * FW, N * OH * OW))
        ws["cols"] = cols
    conv2d_forward_core_cpu(y, x, w, b, *stride, *padding, False, SimpleNamespace(**ws))
    return y


def conv2d_backward_gemm_cpu(dx, dw, db, dy, x, w, stride_h=1, stride_w=1, pad_h=0, pad_w=0, cols=None):
    """All three gradients of a convolution, as a Conv2D layer computes them: ``dx`` (N, C, H, W),
    or None to skip it; ``dw`` (K, C, FH, FW); ``db`` (K,), or None to skip it.

    ``cols``: the im2col matrix of ``x`` as ``conv2d_forward_gemm_cpu(..., cols=cols)`` left it;
    given, the gradients go through im2col and the weight gradient skips recomputing it (the
    caller vouches that ``x`` has not changed since). Returns ``(dx, dw, db)``.
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
    ws = _scratch(x.shape, w.shape, dy.shape, stride, padding, dx is not None, x.dtype, cols is not None)
    if cols is not None:
        _check_cols(fn, cols, x, ws["cols"].shape)
        ws["cols"] = cols
    elif "cols" in ws:  # what the forward core leaves for the backward one
        im2col(ws["cols"], x, FH, FW, stride, padding, OH, OW, ws.get("padded"))
    elif "planes" in ws:
        _padded(x, *padding, SimpleNamespace(**ws))
    conv2d_backward_core_cpu(dx, dw, db, dy, x, w, *stride, *padding, False, SimpleNamespace(**ws))
    return dx, dw, db


def conv2d_backward_input_gemm_cpu(dx, dy, w, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Gradient to the input as a matrix product, as a Conv2D layer computes it; the arguments of
    ``conv2d_backward_input_cpu``."""
    fn = "conv2d_backward_input_gemm_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_host, ("dx", dx), ("w", w), ("dy", dy), None, stride,
                                                 padding)
    if implicit_applies(w.shape, stride, padding):
        ws = SimpleNamespace(**_scratch(dx.shape, w.shape, dy.shape, stride, padding, True, dx.dtype))
        _input_gradient_of_stride_one(dx, dy, w, dx, *padding, False, ws)  # no mask: x is not read
        return dx
    ws = _scratch(dx.shape, w.shape, dy.shape, stride, padding, True, dx.dtype, cols=True)
    _knp_from_nkp(ws["kt"].reshape(K, N, OH * OW), ws["db"], dy.reshape(N, K, OH * OW))
    input_gradient(dx, w, ws["kt"], ws["dcols"], stride, padding, OH, OW, ws.get("padded"), SimpleNamespace(**ws))
    return dx


def conv2d_backward_weight_gemm_cpu(dw, dy, x, stride_h=1, stride_w=1, pad_h=0, pad_w=0, cols=None):
    """Gradient to the filters as a matrix product, as a Conv2D layer computes it; the arguments of
    ``conv2d_backward_weight_cpu``, and ``cols`` as in ``conv2d_backward_gemm_cpu``."""
    fn = "conv2d_backward_weight_gemm_cpu"
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    check_conv2d(fn, on_host, ("x", x), ("dw", dw), ("dy", dy), None, stride, padding)
    # without dx the filters are not read, only their shape: dw stands in for them
    conv2d_backward_gemm_cpu(None, dw, None, dy, x, dw, stride_h, stride_w, pad_h, pad_w, cols=cols)
    return dw


# ------------------------------------------------------------ unchecked cores (planned steps)
#
# What nbcnn's planned step calls once a plan has checked the shapes; the CUDA cores in cuda.py
# take the same arguments. ``b`` is always an array (zeros without a bias); ``relu`` applies the
# ReLU after the convolution in the same pass; ``mask`` multiplies dx by (x > 0), the backward of a
# ReLU before it; ``dx`` or ``db`` None skips that gradient. ``ws`` holds the arrays
# ``conv2d_workspace_cpu`` named; the backward core needs ``ws.cols`` as the forward core left it.


def _padded(x, ph, pw, ws):
    """x with its zero border (in ``ws.padded``), or x itself without padding."""
    if ph or pw:
        _pad_cpu(ws.padded, x, ph, pw)
        return ws.padded
    return x


def _input_gradient_of_stride_one(dx, dy, w, x, ph, pw, mask, ws):
    """dx by Winograd where ``ws`` was made for it, by the implicit product otherwise."""
    if getattr(ws, "wg_v", None) is not None:
        winograd_input_gradient(dx, dy, w, x, ph, pw, mask, ws)
    else:
        implicit_input_gradient(dx, dy, w, x, ph, pw, mask, ws)


def conv2d_forward_core_cpu(y, x, w, b, sh, sw, ph, pw, relu, ws):
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    OH, OW = y.shape[2], y.shape[3]
    if getattr(ws, "planes", None) is not None:  # few input channels (see few_channels)
        _padded(x, ph, pw, ws)  # for the backward's direct kernels
        conv2d_forward_implicit_core(y, x, w, b, ph, pw, relu, ws)
        return
    if getattr(ws, "wg_v", None) is not None:  # 3x3, stride 1: Winograd
        conv2d_forward_winograd_core(y, x, w, b, ph, pw, relu, ws)
        return
    if getattr(ws, "im_xpads", None) is not None:  # stride 1: the implicit product
        conv2d_forward_implicit_core(y, x, w, b, ph, pw, relu, ws)
        return
    im2col(ws.cols, x, FH, FW, (sh, sw), (ph, pw), OH, OW, getattr(ws, "padded", None))
    matmul_core_cpu(ws.kt, w.reshape(K, C * FH * FW), ws.cols, False, False, False, ws)
    _nkp_from_knp(y.reshape(N, K, OH * OW), ws.kt.reshape(K, N, OH * OW), b, relu)


def conv2d_backward_core_cpu(dx, dw, db, dy, x, w, sh, sw, ph, pw, mask, ws):
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    OH, OW = dy.shape[2], dy.shape[3]
    if getattr(ws, "wg_v", None) is not None:  # 3x3, stride 1: Winograd
        winograd_weight_gradient(dw, dy, x, ph, pw, ws)
        if dx is not None:
            winograd_input_gradient(dx, dy, w, x, ph, pw, mask, ws)
        bias_gradient_cpu(ws.db if db is None else db, dy)
        return
    if getattr(ws, "planes", None) is not None:  # few input channels: the forward left ws.padded filled
        if (ph or pw) and getattr(ws, "kt", None) is not None:  # col2im below uses ws.padded as scratch:
            _padded(x, ph, pw, ws)  # fill it again, or a second backward after one forward reads a spoiled x
        xp = ws.padded if ph or pw else x
        _few_channels_backward_weight_cpu(dw, ws.db if db is None else db, dy, xp.reshape(N, C, -1), ws.planes)
        if dx is not None and getattr(ws, "im_dyq", None) is not None:  # w^T dy added back along the taps
            implicit_input_gradient(dx, dy, w, x, ph, pw, mask, ws)
            return
        if dx is not None:
            _knp_from_nkp(ws.kt.reshape(K, N, OH * OW), ws.db, dy.reshape(N, K, OH * OW))
    elif getattr(ws, "im_xpads", None) is not None:  # stride 1: the implicit products
        conv2d_backward_implicit_core(dx, dw, dy, x, w, ph, pw, mask, ws)
        bias_gradient_cpu(ws.db if db is None else db, dy)
        return
    else:
        _knp_from_nkp(ws.kt.reshape(K, N, OH * OW), ws.db if db is None else db, dy.reshape(N, K, OH * OW))
        # dw (K, C*FH*FW) = kt cols^T
        matmul_core_cpu(dw.reshape(K, C * FH * FW), ws.kt, ws.cols, False, True, False, ws)
    if dx is not None:
        input_gradient(dx, w, ws.kt, ws.dcols, (sh, sw), (ph, pw), OH, OW, getattr(ws, "padded", None), ws)
        if mask:
            relu_backward_core_cpu(dx, dx, x)
