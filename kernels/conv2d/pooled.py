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
pools them there; the backward writes the pooled gradient densely into the rows that the weight
gradient's dot products read (a quarter of their values, the rest zero), instead of a full-size
gradient written by the pooling and read back by the convolution. The input gradient, when a
caller asks for it (a first layer's input is usually the data), comes from the same gradient
planes in the same pass over the samples, as a product in nbcnn's register tile
(``pooled_backward_body``). Other shapes, and
CUDA, run the two ops' own cores one after the other through a scratch convolution output: the
same results (and, asked for the input gradient, the layer plan unfuses them).
"""

import numba
from numba import njit, prange

from .._index import out_size
from ..matmul import MAX_MR, TILE, TILE_NAMES, _MR, _NR, lanes, pool_rows, slivers, unpool_rows
from ..pool2d import (maxpool2d_backward_core_cpu, maxpool2d_backward_core_cuda,
                      maxpool2d_forward_core_cpu, maxpool2d_forward_core_cuda)
from .cuda import conv2d_backward_core_cuda, conv2d_forward_core_cuda, conv2d_workspace_cuda
from .gemm import (FILTER_BLOCK, _padded, add_weight_gradients, conv2d_backward_core_cpu, conv2d_forward_core_cpu,
                   conv2d_workspace_cpu, few_channels, filter_block)
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
def pool_backward_weight_body(tile, dw, db, dyp, argmax, yp, xp, mask, OH, OW, planes):
    """dw (K, C, FH, FW) and db (K,) from dyp (N, K, OH // 2, OW // 2) through argmax, as
    ``gemm._few_channels_backward_weight_cpu`` computes them from the full gradient: the same
    planes (``unpool_plane``), the same dot products, the same order (dw is the same to the
    bit)."""
    N, K = dyp.shape[0], dyp.shape[1]
    C, FH, FW = dw.shape[1], dw.shape[2], dw.shape[3]
    WP = OW + FW - 1
    span = OH * WP - (FW - 1)
    dwf = dw.reshape(K, C * FH * FW)
    for block in prange((K + FILTER_BLOCK - 1) // FILTER_BLOCK):
        k0 = block * FILTER_BLOCK
        ka, kb, kc, kd = filter_block(k0, K)
        count = min(FILTER_BLOCK, K - k0)
        four = planes[numba.get_thread_id()]
        four[:, :] = 0
        for j in range(count):
            dwf[k0 + j, :] = 0
        s0, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0
        for n in range(N):
            for j, k in enumerate((ka, kb, kc, kd)):
                unpool_plane(tile, four[j], dyp, argmax, yp, n, k, mask, OW, WP)
            add_weight_gradients(dwf, four, xp, n, k0, count, FH, FW, WP, span)
            s0 += pooled_sum(dyp, yp, n, ka, mask)
            s1 += pooled_sum(dyp, yp, n, kb, mask)
            s2 += pooled_sum(dyp, yp, n, kc, mask)
            s3 += pooled_sum(dyp, yp, n, kd, mask)
        for j, s in enumerate((s0, s1, s2, s3)):
            if j < count:
                db[k0 + j] = s


def _pool_backward_weight_for(tile):
    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def backward_weight(dw, db, dyp, argmax, yp, xp, mask, OH, OW, planes):
        pool_backward_weight_body(tile, dw, db, dyp, argmax, yp, xp, mask, OH, OW, planes)

    return backward_weight


# One compiled weight gradient per tile (the tile a constant in each: see kernels/matmul.py)
_POOL_BACKWARD_WEIGHT = tuple(_pool_backward_weight_for(tile) for tile in range(len(TILE_NAMES)))


@njit(inline="always", cache=True)
def pooled_backward_body(tile, dx, dw, db, dyp, argmax, yp, xp, w, mask, ph, pw, OH, OW, a_pack, taps_scratch, gs,
                         dxpads, partials):
    """The fused op's whole backward when its input gradient is asked for: dx (N, C, H, W), dw and
    db, in one pass over the samples that writes each gradient plane once. Per sample, the K
    gradient planes (zeros but at the maxima, row length WP, in the thread's ``gs``, written by
    ``unpool_plane``) are B of dx's product, read in place: with the filter's columns in its
    depth (``implicit.fold_product``) where that multiplies no more padding rows than w^T dy,
    whose depth is only K (``implicit.scatter_product``, otherwise). The same planes then give
    the sample's dw by the dot products of ``pool_backward_weight_body``. The samples are split
    into one block per thread, each block's dw summed in its own row of ``partials``, and the
    rows added in order: the same bits every run with the same thread count."""
    MR = _MR[tile]
    N, C, H, W = dx.shape
    K, _, FH, FW = w.shape
    WP = OW + FW - 1  # = W + 2 * pw
    HP = OH + FH - 1
    R = C * FH * FW
    Q = OH * WP  # columns of a gradient plane
    stride = plane_stride(Q, FW)
    span = Q - (FW - 1)
    fold = folds(C, K, FH, FW, MR)
    if fold:
        Rpad = slivers(C * FH, MR) * MR
        pack_fold_filters(a_pack, w, MR)
        starts, offsets = fold_taps(taps_scratch, C, K, FH, FW, HP, WP, stride)
    else:
        Rpad = slivers(R, MR) * MR
        pack_scatter_filters(a_pack, w, MR)
        starts = offsets = scatter_taps(taps_scratch, C, FH, FW, HP, WP)
    blocks = partials.shape[0]
    for t in prange(gs.shape[0]):  # what the planes never get: columns past OW, a last odd row, the tails
        gs[t, :FW + K * stride] = 0
    for block in prange(blocks):
        t = numba.get_thread_id()
        g, dxp = gs[t], dxpads[t]
        planes = g[FW:FW + K * stride].reshape(K, stride)  # FW zeros before the first: B's rows start at -fw
        dwf = partials[block, :K * R].reshape(K, R)
        dwf[:, :] = 0
        for n in range(block * N // blocks, (block + 1) * N // blocks):
            dxp[:] = 0
            for k in range(K):
                unpool_plane(tile, planes[k], dyp, argmax, yp, n, k, mask, OW, WP)
            if fold:
                fold_product(tile, dxp, g, FW, a_pack, starts, offsets, Q + FW - 1, K * FW, Rpad)
            else:
                scatter_product(tile, dxp, g[FW:], stride, a_pack, starts, Q, K, Rpad)
            unpad_sample(tile, dx, n, dxp, ph, pw, dx, False)  # no mask: the input is the data
            for k0 in range(0, K, FILTER_BLOCK):
                ka, kb, kc, kd = filter_block(k0, K)
                add_weight_gradients(dwf, (planes[ka], planes[kb], planes[kc], planes[kd]), xp, n, k0,
                                     min(FILTER_BLOCK, K - k0), FH, FW, WP, span)
    dwk = dw.reshape(K, R)
    for k in prange(K):
        for r in range(R):
            total = partials[0, k * R + r]
            for block in range(1, blocks):
                total += partials[block, k * R + r]
            dwk[k, r] = total
        total = 0.0
        for n in range(N):
            total += pooled_sum(dyp, yp, n, k, mask)
        db[k] = total


def _backward_for(tile):
    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def backward(dx, dw, db, dyp, argmax, yp, xp, w, mask, ph, pw, OH, OW, a_pack, taps, gs, dxpads, partials):
        pooled_backward_body(tile, dx, dw, db, dyp, argmax, yp, xp, w, mask, ph, pw, OH, OW, a_pack, taps, gs, dxpads,
                             partials)

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
        return conv2d_workspace_cpu(x_shape, w_shape, y_shape, stride, padding, False, dtype)
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
        "pool_dw": (min(threads, N), K * R),
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
                                              ws.pool_taps, ws.pool_g, ws.pool_dx, ws.pool_dw)
    return True


def conv2d_maxpool_forward_core_cpu(yp, argmax, x, w, b, sh, sw, ph, pw, relu, ws):
    if getattr(ws, "planes", None) is None:
        conv2d_forward_core_cpu(ws.conv_y, x, w, b, sh, sw, ph, pw, relu, ws)
        maxpool2d_forward_core_cpu(yp, argmax, ws.conv_y, *POOL)
        return
    _padded(x, ph, pw, ws)  # for the backward's direct kernel
    _POOL_FORWARD[TILE](yp, argmax, x, w, b, ph, pw, relu, ws.im_a_pack, ws.im_taps, ws.im_xpads, ws.im_planes)


def conv2d_maxpool_backward_core_cpu(dw, db, dyp, argmax, yp, x, w, sh, sw, ph, pw, mask, ws):
    if getattr(ws, "planes", None) is None:
        maxpool2d_backward_core_cpu(ws.conv_dy, dyp, argmax, ws.conv_y, *POOL, mask)
        conv2d_backward_core_cpu(None, dw, db, ws.conv_dy, x, w, sh, sw, ph, pw, False, ws)
        return
    N, C = x.shape[0], x.shape[1]
    _, _, OH, OW = conv_output(x.shape, w.shape, (sh, sw), (ph, pw))
    xp = ws.padded if ph or pw else x  # the forward left ws.padded filled
    _POOL_BACKWARD_WEIGHT[TILE](dw, ws.db if db is None else db, dyp, argmax, yp, xp.reshape(N, C, -1), mask, OH, OW,
                                ws.planes)


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

