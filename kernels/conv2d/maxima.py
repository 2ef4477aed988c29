"""A convolution's backward through the 2x2 max pooling after it (a ReLU between or not), from the
pooled gradient and the maxima alone.

Each 2x2 window of the pooling passed its gradient to its maximum and nowhere else, so the
gradient of the convolution's output is three quarters zeros, and a backward that reads it
dense (``implicit.py``, ``gemm.py``) spends three quarters of its multiply-adds on them. Going
from the pooled gradient instead, for each sample n, filter k and pooled output p (gradient g,
maximum at pixel q of the convolution's output, P the input patch under q):

    dw[k] += g * P            the patch, every channel and tap, times one number
    dx[patch under q] += g * w[k]

a quarter of the dense work, in vectors: the sample is copied channels last (a patch row is
then FW*C contiguous values, read as vectors), each filter's weight gradient is held in
registers through the loop over its pooled outputs (``matmul.maxima_gradients``), and its input
gradient is added by the same walk with the filter's vectors in registers
(``matmul.maxima_scatter``) into a channels-last gradient of the sample, copied back at the end.
The ReLU between the two layers (``relu``) is the pooled output's sign: where the maximum was not
positive, nothing passed back. The forward is the two ops' own: only their backward is one.

This is what a planned step runs for a convolution at stride 1 followed by [ReLU ->]
MaxPool2D(2) that is not the model's first layer (the first has ``pooled.py``, which never
writes the convolution's output at all); the two ops' own backward gives the same values, up to
the order of the sums.
"""

import numba
import numpy as np
from numba import njit, prange

from ..matmul import MAX_V, PATCH_VECTORS, TILE, TILE_NAMES, lanes, maxima_gradients, maxima_scatter
from .pooled import POOL, pooled_sum


LINE = 16  # values of the scratch's rows are counted in: a 64-byte line of float32s, two of float64s
BAND_BYTES = 16 << 10  # the input rows of one band of pooled rows, and as much of their gradient: both in L1


@njit(inline="always", cache=True)
def band_rows(PH, FH, XW, itemsize):
    """Pooled rows a band takes: its 2*rows + FH - 1 input rows (XW values each) within
    ``BAND_BYTES``, at least one. Every filter walks a band before the next: the sample's rows under
    it stay in L1 (a whole sample, 86 KB for 32 channels of 26 x 26, does not)."""
    rows_in = BAND_BYTES // (XW * itemsize)
    return min(PH, max(1, (rows_in - FH + 1) // 2))


@njit(inline="always", cache=True)
def lead(a):
    """Elements from a's start to its first value on a 64-byte boundary (rows of a whole number of
    lines stay on it): a vector read there never spans two lines."""
    return (-a.ctypes.data % 64) // a.itemsize


@njit(inline="always", cache=True)
def patch_vectors(C, FH, FW, V):
    """(vectors a patch row, vectors a patch): a row's FW*C channels-last values in whole vectors."""
    row = -(-(FW * C) // V)
    return row, FH * row


@njit(inline="always", cache=True)
def patch_offsets(scratch, C, FH, FW, XW, V):
    """The table ``maxima_gradients`` reads: vector r of a patch (row fh, vector v) starts
    fh*XW + v*V values after the patch's corner; int64s in a scratch array of the layer's dtype
    (viewed as int64). Returns the table and the patch's vectors."""
    row, count = patch_vectors(C, FH, FW, V)
    table = scratch.view(np.int64)
    for fh in range(FH):
        for v in range(row):
            table[fh * row + v] = fh * XW + v * V
    return table, count


@njit(inline="always", cache=True)
def filter_vectors(table, w, V):
    """table[(k*count + fh*row + v)*V + l] = filter k's value at channels-last position v*V + l of
    its row fh (fw*C + c), zeros past FW*C: what ``maxima_scatter`` holds in registers."""
    K, C, FH, FW = w.shape
    row, count = patch_vectors(C, FH, FW, V)
    table[:K * count * V] = 0
    for k in range(K):
        for c in range(C):
            for fh in range(FH):
                at = (k * count + fh * row) * V
                for fw in range(FW):
                    table[at + fw * C + c] = w[k, c, fh, fw]


@njit(inline="always", cache=True)
def channels_last(xt, x, n, ph, pw):
    """xt[((h + ph)*WP + w + pw)*C + c] = x[n, c, h, w], zeros in the padding (WP = W + 2*pw)."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    WP = W + 2 * pw
    if ph or pw:
        xt[:(H + 2 * ph) * WP * C] = 0
    for h in range(H):  # written in order, read C strided streams: 4.8x faster than the other way round
        for w in range(W):
            at = ((h + ph) * WP + w + pw) * C
            for c in range(C):
                xt[at + c] = x[n, c, h, w]


@njit(inline="always", cache=True)
def channels_first(dx, n, dxt, ph, pw, x, mask):
    """dx[n, c, h, w] = dxt at (h + ph, w + pw, c), times (x > 0) with ``mask`` (the backward of a
    ReLU before the convolution)."""
    C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    WP = W + 2 * pw
    zero = dx.dtype.type(0)
    for h in range(H):  # read in order (1.4x faster than in dx's order)
        for w in range(W):
            at = ((h + ph) * WP + w + pw) * C
            for c in range(C):
                v = dxt[at + c]
                if mask and not x[n, c, h, w] > 0:
                    v = zero
                dx[n, c, h, w] = v


@njit(inline="always", cache=True)
def maxima_backward_body(tile, dx, dw, db, dyp, argmax, yp, x, w, relu, mask, ph, pw, OW, table_scratch, w_table,
                         xts, dxts, parts, need_dx):
    """dw (K, C, FH, FW), db (K,) and, with ``need_dx``, dx (N, C, H, W) from dyp (N, K, OH // 2,
    OW // 2) through argmax (flat in rows of OW), yp the pooled output (where it is not positive
    nothing passed back, with ``relu``). The samples split into one block per row of ``parts``,
    a block's weight gradient summed in its own row and the rows added in order: the same bits
    every run with the same thread count. Per sample: its channels-last copy in the thread's
    ``xts`` row, then band by band of pooled rows (``band_rows``: the band's input rows and their
    gradient stay in L1 while every filter walks it), every filter's weight gradient share and
    its input gradient's, PATCH_VECTORS vectors of the patch a call (the patch split evenly over
    the calls)."""
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    PH, PW = dyp.shape[2], dyp.shape[3]
    WP = W + 2 * pw
    XW = WP * C
    V = lanes(tile, parts)
    row, count = patch_vectors(C, FH, FW, V)
    table, _ = patch_offsets(table_scratch, C, FH, FW, XW, V)
    if need_dx:
        filter_vectors(w_table, w, V)
    most = PATCH_VECTORS[tile]
    calls = -(-count // most)
    plane = PH * PW
    band = band_rows(PH, FH, XW, x.itemsize)
    blocks = parts.shape[0]
    for block in prange(blocks):
        t = numba.get_thread_id()
        xt, dxt = xts[t, lead(xts):], dxts[t, lead(dxts):]  # from a cache line's start: no vector splits one
        part = parts[block, :K * count * V]
        part[:] = 0
        for n in range(block * N // blocks, (block + 1) * N // blocks):
            channels_last(xt, x, n, ph, pw)
            if need_dx:
                dxt[:] = 0
            for i0 in range(0, PH, band):
                rows = min(band, PH - i0)
                di = n * K * plane + i0 * PW
                for c in range(calls):  # every filter in one call: the patch's addresses set up once
                    r0, r1 = c * count // calls, (c + 1) * count // calls
                    maxima_gradients(tile, rows, PW, dyp, di, argmax, yp, relu, xt, 2 * i0 * XW, OW, XW, C, table,
                                     r0, r1 - r0, part, r0 * V, 2 * i0 * OW, K, plane, count * V)
                    if need_dx:
                        maxima_scatter(tile, rows, PW, dyp, di, argmax, yp, relu, dxt, 2 * i0 * XW, OW, XW, C, table,
                                       r0, r1 - r0, w_table, r0 * V, 2 * i0 * OW, K, plane, count * V)
            if need_dx:
                channels_first(dx, n, dxt, ph, pw, x, mask)
    for k in range(K):  # one thread: a second parallel loop would cost more than it saves
        for c in range(C):
            for fh in range(FH):
                at = (k * count + fh * row) * V + c
                for fw in range(FW):
                    total = parts[0, at + fw * C]
                    for block in range(1, blocks):
                        total += parts[block, at + fw * C]
                    dw[k, c, fh, fw] = total
        total = 0.0
        for n in range(N):
            total += pooled_sum(dyp, yp, n, k, relu)
        db[k] = total


def _backward_for(tile):
    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def backward(dx, dw, db, dyp, argmax, yp, x, w, relu, mask, ph, pw, OW, table, w_table, xts, dxts, parts,
                 need_dx):
        maxima_backward_body(tile, dx, dw, db, dyp, argmax, yp, x, w, relu, mask, ph, pw, OW, table, w_table, xts,
                             dxts, parts, need_dx)

    return backward


# One compiled backward per tile (the tile a constant in each: see kernels/matmul.py)
_BACKWARD = tuple(_backward_for(tile) for tile in range(len(TILE_NAMES)))


# ------------------------------------------------------------------ unchecked core, the CPU's


def conv2d_maxima_backward_workspace_cpu(x_shape, w_shape, y_shape, stride, padding, need_dx, dtype):
    """{name: shape}, from the convolution's backward's arguments (the scratch is the same with or
    without dx): the patch's offsets (int64s, two float32s each), the filters' vectors, for
    each of Numba's threads a channels-last sample and its gradient (with V values of room past
    them), a weight gradient for each block of samples, and the bias gradient of a layer without
    a bias."""
    N, C, H, W = x_shape
    K, _, FH, FW = w_shape
    threads = numba.config.NUMBA_NUM_THREADS
    patch = FH * (FW * C + MAX_V - 1)  # values of a patch in whole vectors, any tile and dtype
    # a sample and V values of room, in whole cache lines, and a line's worth more to start on one
    sample = -(-((H + 2 * padding[0]) * (W + 2 * padding[1]) * C + MAX_V) // LINE) * LINE + LINE
    return {"max_offsets": (2 * patch,), "max_w": (K * patch,), "max_x": (threads, sample),
            "max_dx": (threads, sample), "max_parts": (min(threads, N), K * patch), "max_db": (K,)}


def conv2d_maxima_backward_core_cpu(dx, dw, db, dyp, argmax, yp, x, w, sh, sw, ph, pw, relu, mask, ws, tile=None):
    """dx (None: not asked for), dw and db (None: no bias, computed into scratch) of a stride-1
    convolution from the gradient of the 2x2 max pooling after it (``POOL``), its argmax and
    output yp (``relu``: a ReLU between the two; ``mask``: one before the convolution, applied to
    dx). ``tile``: a tile's index (None: this CPU's)."""
    OW = x.shape[3] + 2 * pw - w.shape[3] + 1
    need_dx = dx is not None
    # without dx, x stands in for it (the same type, never written)
    _BACKWARD[TILE if tile is None else tile](dx if need_dx else x, dw, ws.max_db if db is None else db, dyp,
                                              argmax, yp, x, w, relu, mask, ph, pw, OW, ws.max_offsets, ws.max_w,
                                              ws.max_x, ws.max_dx, ws.max_parts, need_dx)


assert POOL == (2, 2, 2, 2, 0, 0)  # the pooling these kernels read through argmax
