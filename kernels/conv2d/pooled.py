"""A model's first convolution and the 2x2 max pooling after it (a ReLU between or not), as one op.

In a model that starts Conv2D -> [ReLU] -> MaxPool2D(2), only the pooling reads the
convolution's output: forward, to take each window's maximum; backward, to send the pooled
gradient back to where the maxima were, which the convolution's weight gradient then reads.
The fused op never writes that output:

    forward   yp, argmax = maxpool2x2(relu(conv(x, w) + b))      argmax: flat index in (OH, OW)
    backward  dw, db     = the weight and bias gradients, from dyp through argmax
                           (times yp > 0 with ``mask``, the ReLU's backward)

On the CPU, with few input channels (``gemm.few_channels``), each sample's output planes stay in
its thread's scratch: the forward computes them by the implicit product (``implicit.py``) and
pools them there. The backward never writes the full-size gradient either: a window passed its
gradient to its maximum alone, so each filter's weight gradient is the sum, over the pooled
outputs, of the gradient times the input patch under the maximum (``matmul.window_gradients``:
a quarter of the multiply-adds of the dense gradient's, three quarters of whose values are
zeros). The input gradient, when a caller asks for it (a first layer's input is usually the
data), comes from the gradient planes (zeros but at the maxima), as a product in nbcnn's
register tile in the same pass over the samples (``pooled_backward_body``). Other shapes, and
CUDA, run the two ops' own cores one after the other through a scratch convolution output: the
same results (and, asked for the input gradient, the layer plan unfuses them).
"""

import numba
import numpy as np
from numba import njit, prange

from .._index import out_size
from ..matmul import (MAX_MR, MAX_V, MAX_WINDOW_ROWS, TILE, TILE_NAMES, _MR, _NR, lanes, pool_rows, slivers,
                      unpool_rows, window_gradients)
from ..pool2d import (maxpool2d_backward_core_cpu, maxpool2d_backward_core_cuda,
                      maxpool2d_forward_core_cpu, maxpool2d_forward_core_cuda)
from .cuda import conv2d_backward_core_cuda, conv2d_forward_core_cuda, conv2d_workspace_cuda
from .gemm import _padded, conv2d_backward_core_cpu, conv2d_forward_core_cpu, conv2d_workspace_cpu, few_channels
from .implicit import (fold_product, fold_room, fold_taps, folds, gather_product, pack_fold_filters,
                       pack_scatter_filters, pack_weights, pad_sample, plane_stride, scatter_product, scatter_taps,
                       tap_offsets, unpad_sample, whole_tiles)

POOL = (2, 2, 2, 2, 0, 0)  # the pooling this op fuses: window, stride, padding


def conv_output(x_shape, w_shape, stride, padding):
    """(N, K, OH, OW) of the convolution before the pooling."""
    N, _, H, W = x_shape
    K, _, FH, FW = w_shape
    return (N, K, out_size(H, FH, stride[0], padding[0]), out_size(W, FW, stride[1], padding[1]))


# ----------------------------------------------------------------------------- CPU kernels


@njit(inline="always", cache=True)
def pool_forward_body(tile, yp, argmax, x, w, b, ph, pw, relu, a_pack, taps_scratch, xpads, planes):
    """yp, argmax (N, K, OH // 2, OW // 2): the 2x2 max pooling of the stride-1 convolution of x with
    w (padding ph, pw) plus b, max(., 0) first with ``relu``. A sample a task: its K output planes
    by the implicit product's forward (``implicit.gather_product``) in the thread's scratch, then
    the bias and ReLU in place, and the pooling read from there, two rows and V/2 windows a call
    (``pool_rows``)."""
    MR, NR = _MR[tile], _NR[tile]
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    PH, PW = yp.shape[2], yp.shape[3]
    HP, WP = H + 2 * ph, W + 2 * pw
    OH, OW = HP - FH + 1, WP - FW + 1
    R = C * FH * FW
    Q = OH * WP
    Kpad = slivers(K, MR) * MR
    zero = yp.dtype.type(0)
    V = lanes(tile, yp)
    pack_weights(tile, a_pack, w.reshape(K, R))
    taps = tap_offsets(taps_scratch, C, FH, FW, HP, WP)
    for n in prange(N):
        t = numba.get_thread_id()
        xp, plane = xpads[t], whole_tiles(planes[t], K, Q, MR, NR)
        pad_sample(xp, x, n, ph, pw)
        gather_product(tile, plane, xp, a_pack, taps, R, Q, Kpad)
        for k in range(K):
            row, bk = plane[k], b[k]
            for i in range(2 * PH * WP):  # the rows the windows cover
                v = row[i] + bk
                if relu and v < zero:  # a NaN stays, as where the convolution stores its output
                    v = zero
                row[i] = v
            for i in range(PH):
                at = ((n * K + k) * PH + i) * PW
                for p0 in range(0, PW, V // 2):
                    # a row's last call stores whole vectors where the values past the row land in
                    # the sample's next row, written after it (AVX2's masked stores are slow on AMD)
                    room = V // 2 if at + p0 + V // 2 <= (n + 1) * K * PH * PW else PW - p0
                    pool_rows(tile, yp, at + p0, argmax, row, 2 * i * WP + 2 * p0, WP, 2 * i * OW + 2 * p0, OW,
                              min(V // 2, room))


def _pool_forward_for(tile):
    @njit(parallel=True, cache=True)
    def forward(yp, argmax, x, w, b, ph, pw, relu, a_pack, taps, xpads, planes):
        pool_forward_body(tile, yp, argmax, x, w, b, ph, pw, relu, a_pack, taps, xpads, planes)

    return forward


# One compiled forward per tile (the tile a constant in each: see kernels/matmul.py)
_POOL_FORWARD = tuple(_pool_forward_for(tile) for tile in range(len(TILE_NAMES)))


@njit(inline="always", cache=True)
def unpool_plane(tile, plane, dyp, argmax, yp, n, k, mask, OW, WP):
    """plane (row length WP) = the gradient of the 2x2 max pooling of filter k, sample n: dyp's
    values at the maxima (0 where yp is not positive, with ``mask``), zeros elsewhere in the
    first OW columns of each row the windows cover (``unpool_rows``, two rows a call), and in as
    many of the columns past them as make a row's last call whole vectors (AVX2's masked stores
    are slow on AMD); the other columns and a last odd row are left as they are (zeros, from the
    caller)."""
    K, PH, PW = dyp.shape[1], dyp.shape[2], dyp.shape[3]
    V = lanes(tile, plane)
    for i in range(PH):
        at = ((n * K + k) * PH + i) * PW
        for p0 in range(0, PW, V // 2):
            j0 = 2 * p0
            unpool_rows(tile, plane, 2 * i * WP + j0, WP, dyp, at + p0, argmax, 2 * i * OW + j0, OW, yp, mask, False,
                        min(V // 2, PW - p0), min(V, WP - j0))


@njit(inline="always", cache=True)
def pooled_sum(dyp, yp, n, k, mask):
    """The sum of dyp[n, k] (where yp > 0, with ``mask``) in float64: sample n's share of db[k]."""
    total = 0.0
    for i in range(dyp.shape[2]):
        for j in range(dyp.shape[3]):
            if not mask or yp[n, k, i, j] > 0:
                total += dyp[n, k, i, j]
    return total


@njit(inline="always", cache=True)
def window_rows(scratch, C, FH, FW, HP, WP, V):
    """The rows of a filter's patch as ``window_gradients`` reads them from a padded sample: for
    each (c, fh) and each V columns from fw0, the offset (c*HP + fh)*WP + fw0 from the patch's
    corner, int64s in a scratch array of the layer's dtype (viewed as int64). Returns the table
    and its rows."""
    table = scratch.view(np.int64)
    r = 0
    for c in range(C):
        for fh in range(FH):
            for fw0 in range(0, FW, V):
                table[r] = (c * HP + fh) * WP + fw0
                r += 1
    return table, r


def window_values(C, FH, FW):
    """Values of one filter's sums in ``add_window_gradients``'s layout, for any tile and dtype
    (V lanes a row of the patch, V at most MAX_V)."""
    return C * FH * (FW + MAX_V - 1)


@njit(inline="always", cache=True)
def add_window_gradients(tile, part, dyp, argmax, yp, mask, xp, n, table, count, OW, WP, tail):
    """part[(k*count + r)*V + l] += sample n's share of the weight gradient of filter k, row r of
    its patch (``window_rows``: ``count`` rows), lane l, for every filter k: ``window_gradients``
    on two filters and up to MAX_WINDOW_ROWS rows a call (the rows split evenly over the calls).
    xp (N, C, HP*WP); a sample too near its end for the V - 1 values a row reads past itself is
    read from a copy in ``tail`` (at least MAX_V values longer than a sample)."""
    K, PH, PW = dyp.shape[1], dyp.shape[2], dyp.shape[3]
    V = lanes(tile, part)
    plane = PH * PW
    S = xp.shape[1] * xp.shape[2]
    calls = -(-count // MAX_WINDOW_ROWS)
    x, xi = xp.reshape(xp.size), n * S
    if (xp.shape[0] - n) * S < S + MAX_V:
        for i in range(S):
            tail[i] = x[xi + i]
        x, xi = tail, 0
    for k in range(0, K, 2):
        two = k + 1 < K  # else the last filter alone, twice over the same sums
        for c in range(calls):
            r0, r1 = c * count // calls, (c + 1) * count // calls
            window_gradients(tile, PH, PW, dyp, (n * K + k) * plane, plane if two else 0, argmax, yp, mask, x, xi,
                             OW, WP, table, r0, r1 - r0, part, (k * count + r0) * V, count * V if two else 0)


@njit(inline="always", cache=True)
def sum_window_gradients(tile, dw, db, parts, dyp, yp, mask, count):
    """dw (K, C, FH, FW) = the blocks' sums in ``parts`` added in order (``add_window_gradients``'s
    layout), and db (K,) = the sum of dyp (where yp > 0, with ``mask``), in float64."""
    K, C, FH, FW = dw.shape
    V = lanes(tile, parts)
    blocks = parts.shape[0]
    for k in prange(K):
        r = 0
        for c in range(C):
            for fh in range(FH):
                for fw0 in range(0, FW, V):
                    for lane in range(min(V, FW - fw0)):
                        at = (k * count + r) * V + lane
                        total = parts[0, at]
                        for block in range(1, blocks):
                            total += parts[block, at]
                        dw[k, c, fh, fw0 + lane] = total
                    r += 1
        total = 0.0
        for n in range(dyp.shape[0]):
            total += pooled_sum(dyp, yp, n, k, mask)
        db[k] = total


@njit(inline="always", cache=True)
def pool_backward_weight_body(tile, dw, db, dyp, argmax, yp, xp, mask, OH, OW, table_scratch, parts, tails):
    """dw (K, C, FH, FW) and db (K,) from dyp (N, K, OH // 2, OW // 2) through argmax, xp the padded
    input (N, C, HP*WP): each filter's gradient from the patches under its maxima alone
    (``add_window_gradients``), the samples split into one block per row of ``parts``, each
    block's sums in its own row and the rows added in order: the same bits every run with the same
    thread count, and the same as ``pooled_backward_body``'s."""
    N, K = dyp.shape[0], dyp.shape[1]
    C, FH, FW = dw.shape[1], dw.shape[2], dw.shape[3]
    WP, HP = OW + FW - 1, OH + FH - 1
    V = lanes(tile, parts)
    table, count = window_rows(table_scratch, C, FH, FW, HP, WP, V)
    blocks = parts.shape[0]
    for block in prange(blocks):
        part = parts[block, :K * count * V]
        part[:] = 0
        for n in range(block * N // blocks, (block + 1) * N // blocks):
            add_window_gradients(tile, part, dyp, argmax, yp, mask, xp, n, table, count, OW, WP,
                                 tails[numba.get_thread_id()])
    sum_window_gradients(tile, dw, db, parts, dyp, yp, mask, count)


def _pool_backward_weight_for(tile):
    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def backward_weight(dw, db, dyp, argmax, yp, xp, mask, OH, OW, table, parts, tails):
        pool_backward_weight_body(tile, dw, db, dyp, argmax, yp, xp, mask, OH, OW, table, parts, tails)

    return backward_weight


# One compiled weight gradient per tile (the tile a constant in each: see kernels/matmul.py)
_POOL_BACKWARD_WEIGHT = tuple(_pool_backward_weight_for(tile) for tile in range(len(TILE_NAMES)))


@njit(inline="always", cache=True)
def pooled_backward_body(tile, dx, dw, db, dyp, argmax, yp, xp, w, mask, ph, pw, OH, OW, a_pack, taps_scratch, gs,
                         dxpads, table_scratch, parts, tails):
    """The fused op's whole backward when its input gradient is asked for: dx (N, C, H, W), dw and
    db, in one pass over the samples that writes each gradient plane once. Per sample, the K
    gradient planes (zeros but at the maxima, row length WP, in the thread's ``gs``, written by
    ``unpool_plane``) are B of dx's product, read in place: with the filter's columns in its
    depth (``implicit.fold_product``) where that multiplies no more padding rows than w^T dy,
    whose depth is only K (``implicit.scatter_product``, otherwise). dw and db as
    ``pool_backward_weight_body`` computes them, the same blocks of samples in the same rows of
    ``parts``: the same bits as without the input gradient."""
    MR = _MR[tile]
    N, C, H, W = dx.shape
    K, _, FH, FW = w.shape
    WP = OW + FW - 1  # = W + 2 * pw
    HP = OH + FH - 1
    R = C * FH * FW
    Q = OH * WP  # columns of a gradient plane
    stride = plane_stride(Q, FW)
    fold = folds(C, K, FH, FW, MR)
    if fold:
        Rpad = slivers(C * FH, MR) * MR
        pack_fold_filters(a_pack, w, MR)
        starts, offsets = fold_taps(taps_scratch, C, K, FH, FW, HP, WP, stride)
    else:
        Rpad = slivers(R, MR) * MR
        pack_scatter_filters(a_pack, w, MR)
        starts = offsets = scatter_taps(taps_scratch, C, FH, FW, HP, WP)
    V = lanes(tile, parts)
    table, count = window_rows(table_scratch, C, FH, FW, HP, WP, V)
    blocks = parts.shape[0]
    for t in prange(gs.shape[0]):  # what the planes never get: columns past OW, a last odd row, the tails
        gs[t, :FW + K * stride] = 0
    for block in prange(blocks):
        t = numba.get_thread_id()
        g, dxp = gs[t], dxpads[t]
        planes = g[FW:FW + K * stride].reshape(K, stride)  # FW zeros before the first: B's rows start at -fw
        part = parts[block, :K * count * V]
        part[:] = 0
        for n in range(block * N // blocks, (block + 1) * N // blocks):
            dxp[:] = 0
            for k in range(K):
                unpool_plane(tile, planes[k], dyp, argmax, yp, n, k, mask, OW, WP)
            if fold:
                fold_product(tile, dxp, g, FW, a_pack, starts, offsets, Q + FW - 1, K * FW, Rpad)
            else:
                scatter_product(tile, dxp, g[FW:], stride, a_pack, starts, Q, K, Rpad)
            unpad_sample(tile, dx, n, dxp, ph, pw, dx, False)  # no mask: the input is the data
            add_window_gradients(tile, part, dyp, argmax, yp, mask, xp, n, table, count, OW, WP, tails[t])
    sum_window_gradients(tile, dw, db, parts, dyp, yp, mask, count)


def _backward_for(tile):
    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def backward(dx, dw, db, dyp, argmax, yp, xp, w, mask, ph, pw, OH, OW, a_pack, taps, gs, dxpads, table, parts,
                 tails):
        pooled_backward_body(tile, dx, dw, db, dyp, argmax, yp, xp, w, mask, ph, pw, OH, OW, a_pack, taps, gs, dxpads,
                             table, parts, tails)

    return backward


# One compiled backward with the input gradient per tile (the tile a constant in each: see kernels/matmul.py)
_BACKWARD = tuple(_backward_for(tile) for tile in range(len(TILE_NAMES)))


# ------------------------------------------------------------------ unchecked cores, both devices
#
# What nbcnn's planned step calls, the same arguments on both devices: ``b`` always an array,
# ``relu`` the ReLU between the two layers (forward), ``mask`` the same ReLU's backward; ``db``
# None skips the bias gradient (a layer without one); ``ws`` holds what the workspace function
# named, and the backward needs it as the forward left it.


def conv2d_maxpool_workspace_cpu(x_shape, w_shape, stride, padding, dtype):
    """{name: shape}: the few-channel kernels' scratch, or else the convolution's and a full-size
    output and gradient for the two ops one after the other."""
    y_shape = conv_output(x_shape, w_shape, stride, padding)
    if few_channels(x_shape, w_shape, stride):
        N, C, H, W = x_shape
        K, _, FH, FW = w_shape
        threads = numba.config.NUMBA_NUM_THREADS
        shapes = conv2d_workspace_cpu(x_shape, w_shape, y_shape, stride, padding, False, dtype)
        del shapes["planes"]  # the unfused weight gradient's, which the fused op does not run
        return {**shapes,
                # the weight gradient's (``pool_backward_weight_body``): the patch's rows (int64s, two float32s
                # each), each block's sums, and each thread's copy of a last sample with room past it
                "pool_rows": (2 * C * FH * FW,),
                "pool_parts": (min(threads, N), K * window_values(C, FH, FW)),
                "pool_tail": (threads, C * (H + 2 * padding[0]) * (W + 2 * padding[1]) + MAX_V)}
    shapes = conv2d_workspace_cpu(x_shape, w_shape, y_shape, stride, padding, False, dtype)
    return {**shapes, "conv_y": y_shape, "conv_dy": y_shape}


def conv2d_maxpool_backward_input_workspace_cpu(x_shape, w_shape, stride, padding, dtype):
    """{name: shape} for the fused op's backward with the input gradient (few input channels;
    nothing otherwise): the packed filters and the taps' offsets, for each of Numba's threads the
    K gradient planes and a padded input gradient, and a weight gradient for each block of
    samples."""
    if not few_channels(x_shape, w_shape, stride):
        return {}
    N, C, H, W = x_shape
    K, _, FH, FW = w_shape
    HP, WP = H + 2 * padding[0], W + 2 * padding[1]
    R = C * FH * FW
    threads = numba.config.NUMBA_NUM_THREADS
    return {
        "pool_a_pack": (max(C * FH + MAX_MR, R) * K * FW,),  # the fold's or the scatter's A
        "pool_taps": (2 * (max(C * FH + K * FW, R) + MAX_MR),),  # int64s: two float32s each
        "pool_g": (threads, FW + K * plane_stride((HP - FH + 1) * WP, FW)),
        "pool_dx": (threads, fold_room(C, HP, WP, FH, FW)),
    }


def conv2d_maxpool_backward_input_core_cpu(dx, dw, db, dyp, argmax, yp, x, w, sh, sw, ph, pw, mask, ws, tile=None):
    """The fused op's backward with its input gradient: dx, dw and db (None: no bias, computed into
    scratch) in one pass, from the pooled gradient and what the forward left. Returns False,
    computing nothing, where the op runs as two ops (not few input channels): the caller then
    unfuses them. ``tile``: a tile's index (None: this CPU's)."""
    if getattr(ws, "pool_g", None) is None:
        return False
    N, C = x.shape[0], x.shape[1]
    _, _, COH, COW = conv_output(dx.shape, w.shape, (sh, sw), (ph, pw))
    xp = ws.padded if ph or pw else x  # the forward left ws.padded filled
    _BACKWARD[TILE if tile is None else tile](dx, dw, ws.db if db is None else db, dyp, argmax, yp,
                                              xp.reshape(N, C, -1), w, mask, ph, pw, COH, COW, ws.pool_a_pack,
                                              ws.pool_taps, ws.pool_g, ws.pool_dx, ws.pool_rows, ws.pool_parts,
                                              ws.pool_tail)
    return True


def conv2d_maxpool_forward_core_cpu(yp, argmax, x, w, b, sh, sw, ph, pw, relu, ws):
    if getattr(ws, "pool_parts", None) is None:  # not few input channels: the two ops in turn
        conv2d_forward_core_cpu(ws.conv_y, x, w, b, sh, sw, ph, pw, relu, ws)
        maxpool2d_forward_core_cpu(yp, argmax, ws.conv_y, *POOL)
        return
    _padded(x, ph, pw, ws)  # for the backward's direct kernel
    _POOL_FORWARD[TILE](yp, argmax, x, w, b, ph, pw, relu, ws.im_a_pack, ws.im_taps, ws.im_xpads, ws.im_planes)


def conv2d_maxpool_backward_core_cpu(dw, db, dyp, argmax, yp, x, w, sh, sw, ph, pw, mask, ws):
    if getattr(ws, "pool_parts", None) is None:  # not few input channels: the two ops in turn
        maxpool2d_backward_core_cpu(ws.conv_dy, dyp, argmax, ws.conv_y, *POOL, mask)
        conv2d_backward_core_cpu(None, dw, db, ws.conv_dy, x, w, sh, sw, ph, pw, False, ws)
        return
    pooled_weight_gradient(dw, db, dyp, argmax, yp, x, w, ph, pw, mask, ws)


def pooled_weight_gradient(dw, db, dyp, argmax, yp, x, w, ph, pw, mask, ws, tile=None):
    """The few-channel backward without the input gradient (``pool_backward_weight_body``): dw and
    db (None: no bias, computed into scratch); ``tile`` a tile's index (None: this CPU's)."""
    N, C = x.shape[0], x.shape[1]
    _, _, OH, OW = conv_output(x.shape, w.shape, (1, 1), (ph, pw))
    xp = ws.padded if ph or pw else x  # the forward left ws.padded filled
    _POOL_BACKWARD_WEIGHT[TILE if tile is None else tile](dw, ws.db if db is None else db, dyp, argmax, yp,
                                                          xp.reshape(N, C, -1), mask, OH, OW, ws.pool_rows,
                                                          ws.pool_parts, ws.pool_tail)


def conv2d_maxpool_workspace_cuda(x_shape, w_shape, stride, padding, dtype):
    y_shape = conv_output(x_shape, w_shape, stride, padding)
    return {**conv2d_workspace_cuda(x_shape, w_shape, y_shape, stride, padding, False, dtype),
            "conv_y": y_shape, "conv_dy": y_shape}


def conv2d_maxpool_forward_core_cuda(yp, argmax, x, w, b, sh, sw, ph, pw, relu, ws):
    conv2d_forward_core_cuda(ws.conv_y, x, w, b, sh, sw, ph, pw, relu, ws)
    maxpool2d_forward_core_cuda(yp, argmax, ws.conv_y, *POOL)


def conv2d_maxpool_backward_core_cuda(dw, db, dyp, argmax, yp, x, w, sh, sw, ph, pw, mask, ws):
    maxpool2d_backward_core_cuda(ws.conv_dy, dyp, argmax, ws.conv_y, *POOL, mask)
    conv2d_backward_core_cuda(None, dw, db, ws.conv_dy, x, w, sh, sw, ph, pw, False, ws)

