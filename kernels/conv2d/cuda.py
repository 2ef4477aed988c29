"""2-D convolution on NVIDIA GPUs: the CUDA twins of ``cpu.py``, same arguments, same results.

Letters as in ``cpu.py``: N batch, C input channels, K filters, H, W input size, FH, FW
filter size, OH, OW output size, S stride, P padding (sh, sw, ph, pw).

- forward: tiles of outputs; for each input channel the block stages the input region
  its tile reads, and the filters of its group, in shared memory (coalesced loads,
  threadIdx.x along W), and each thread accumulates several filters in registers.
- backward to the input: one thread per input pixel, gathering dy through the taps
  that read it. Each element is written by one thread: no atomics.
- backward to the weights and the bias: deterministic two-pass reduction. Pass 1 gives
  each filter tap, each filter's bias, and each chunk of the batch one block, whose
  threads sum their share and add the shares in shared memory; pass 2 adds the chunks'
  partial sums in a fixed order (skipped when the batch is one chunk: pass 1 then writes
  dw and db). No float atomics, so the result is bitwise the same on every run.
- backward to the bias alone (``conv2d_backward_bias_cuda``): blocks per filter, as many as fill the GPU.

Fused epilogues, switched by flags: ``relu`` in the forward writes max(y, 0) (the ReLU after
the convolution), ``mask`` in the backward to the input zeroes dx where x is not positive
(the backward of a ReLU before it).

Every kernel overwrites its output.
"""

import numba
import numpy as np
from numba import cuda

from .._cuda import (REDUCE_THREADS, block_sum, blocks, flat, gpu_arrays, grid_sum, grid_z, on_gpu,
                     reduce_parts, reduce_scratch, stream)
from .._tiles import (ACC, GEMM_THREADS, LOADS_A, LOADS_B, SPAN, STAGED_A, STAGED_B, SUB_M, SUB_N, TILE_K, TILE_M,
                      TILE_N, multiply_staged, tile_kernel, zero_acc)
from .._index import in_coord_cuda, out_coord_cuda
from .checks import check_conv2d, check_conv2d_bias, check_stride_padding

TILE_W = 16  # output columns per block, threadIdx.x: 16 neighbouring threads read neighbouring inputs
TILE_H = 8  # output rows per block, threadIdx.y
K_PER_BLOCK = 4  # filters per block: each staged input value is used 4 times from a register
MAX_SHARED_BYTES = 48 * 1024  # dynamic shared memory a kernel may take without opting in
GATHER_W, GATHER_H = 32, 8  # block of the backward-input kernel: a warp along W
MIN_REDUCE_BLOCKS = 1024  # split the weight-gradient reduction until about this many blocks run

# ---------------------------------------------------------------------------- CUDA kernels


@cuda.jit(cache=True)
def _conv2d_forward_kernel(y, x, w, b, sh, sw, ph, pw, relu):
    """y = conv(x, w) + b, or max(that, 0) with ``relu``. Threads (TILE_W, TILE_H): one per output
    pixel (oh, ow) of a tile, each computing K_PER_BLOCK filters. Grid: (ceil(OW / TILE_W), ceil(OH / TILE_H), Z) with
    Z = min(N * ceil(K / K_PER_BLOCK), MAX_GRID_Z); blockIdx.z and its strides by gridDim.z pick
    the sample n and the filter group.

    Dynamic shared memory, sized by the launcher: the input region the tile reads,
    tile_h x tile_w values, then the group's filters for one channel, K_PER_BLOCK x FH x FW.
    """
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    OH, OW = y.shape[2], y.shape[3]
    groups = (K + K_PER_BLOCK - 1) // K_PER_BLOCK
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid = ty * TILE_W + tx
    oh0, ow0 = cuda.blockIdx.y * TILE_H, cuda.blockIdx.x * TILE_W
    # The tile's outputs read input rows in_coord(oh0, 0) .. in_coord(oh0 + TILE_H - 1, FH - 1).
    tile_h = (TILE_H - 1) * sh + FH
    tile_w = (TILE_W - 1) * sw + FW
    ih0, iw0 = in_coord_cuda(oh0, 0, sh, ph), in_coord_cuda(ow0, 0, sw, pw)
    taps = FH * FW
    w_base = tile_h * tile_w  # where the filters start in shared memory
    smem = cuda.shared.array(0, dtype=x.dtype)
    acc = cuda.local.array(K_PER_BLOCK, dtype=y.dtype)
    # Grid-stride over (n, filter group), so gridDim.z stays within its limit of 65535 for any
    # batch; every thread of the block takes the same iterations (the barriers need them all).
    for z in range(cuda.blockIdx.z, N * groups, cuda.gridDim.z):
        n = z // groups
        k0 = (z % groups) * K_PER_BLOCK
        for kk in range(K_PER_BLOCK):
            acc[kk] = 0
        for c in range(C):
            # Stage the input region row by row: consecutive threads take consecutive columns.
            for idx in range(tid, tile_h * tile_w, TILE_H * TILE_W):
                ih = ih0 + idx // tile_w
                iw = iw0 + idx % tile_w
                if 0 <= ih < H and 0 <= iw < W:
                    smem[idx] = x[n, c, ih, iw]
                else:
                    smem[idx] = 0  # zero padding
            for idx in range(tid, K_PER_BLOCK * taps, TILE_H * TILE_W):
                k = k0 + idx // taps
                t = idx % taps
                if k < K:
                    smem[w_base + idx] = w[k, c, t // FW, t % FW]
                else:
                    smem[w_base + idx] = 0
            cuda.syncthreads()  # wait until channel c's input region and filters are staged
            base = ty * sh * tile_w + tx * sw
            for fh in range(FH):
                for fw in range(FW):
                    v = smem[base + fh * tile_w + fw]
                    for kk in range(K_PER_BLOCK):
                        acc[kk] += smem[w_base + kk * taps + fh * FW + fw] * v
            cuda.syncthreads()  # wait until every thread is done with channel c before it is overwritten
        oh, ow = oh0 + ty, ow0 + tx
        if oh < OH and ow < OW:
            for kk in range(K_PER_BLOCK):
                k = k0 + kk
                if k < K:
                    v = acc[kk] + b[k]
                    if relu and not v > 0:
                        v = y.dtype.type(0)
                    y[n, k, oh, ow] = v


@cuda.jit(cache=True)
def _conv2d_backward_input_kernel(dx, dy, w, x, sh, sw, ph, pw, mask):
    """dx[n, c, ih, iw] = sum over k, fh, fw of w[k, c, fh, fw] * dy[n, k, oh, ow], over the taps
    whose output (oh, ow) = out_coord(...) exists; 0 where ``mask`` and x[n, c, ih, iw] is not
    positive. One thread per input pixel, threadIdx.x along W; grid (ceil(W / GATHER_W),
    ceil(H / GATHER_H), min(N * C, MAX_GRID_Z)), striding over the planes (n, c)."""
    N, C, H, W = dx.shape
    K, _, FH, FW = w.shape
    OH, OW = dy.shape[2], dy.shape[3]
    iw = cuda.blockIdx.x * GATHER_W + cuda.threadIdx.x
    ih = cuda.blockIdx.y * GATHER_H + cuda.threadIdx.y
    if ih >= H or iw >= W:
        return
    for z in range(cuda.blockIdx.z, N * C, cuda.gridDim.z):  # grid-stride over the planes (n, c)
        n = z // C
        c = z % C
        acc = dx.dtype.type(0)
        for fh in range(FH):
            oh = out_coord_cuda(ih, fh, sh, ph, OH)
            if oh < 0:
                continue
            for fw in range(FW):
                ow = out_coord_cuda(iw, fw, sw, pw, OW)
                if ow < 0:
                    continue
                for k in range(K):
                    acc += w[k, c, fh, fw] * dy[n, k, oh, ow]
        if mask and not x[n, c, ih, iw] > 0:
            acc = dx.dtype.type(0)
        dx[n, c, ih, iw] = acc


@cuda.jit(cache=True)
def _conv2d_backward_weight_partial_kernel(partial, partial_b, dy, x, sh, sw, ph, pw):
    """Pass 1: partial[g, k, c, fh, fw] = the chunk g's share of dw[k, c, fh, fw], and
    partial_b[g, k] its share of db[k].

    One block of REDUCE_THREADS threads per filter tap or bias (blockIdx.x: the K*C*FH*FW
    taps, then the K biases) and batch chunk (blockIdx.y). The threads stride over the
    chunk's (n, oh, ow) with ow fastest, so a warp reads neighbouring elements of dy and
    x, then add their sums with block_sum. A bias is a tap whose input is always 1.
    """
    G, K, C, FH, FW = partial.shape
    N, _, H, W = x.shape
    OH, OW = dy.shape[2], dy.shape[3]
    taps = K * C * FH * FW
    tap = cuda.blockIdx.x
    g = cuda.blockIdx.y
    is_bias = tap >= taps
    fw = tap % FW
    fh = (tap // FW) % FH
    c = (tap // (FW * FH)) % C
    k = tap - taps if is_bias else tap // (FW * FH * C)
    n_lo = g * N // G  # chunks split the batch as evenly as integers allow
    n_hi = (g + 1) * N // G
    acc = partial.dtype.type(0)
    for idx in range(cuda.threadIdx.x, (n_hi - n_lo) * OH * OW, REDUCE_THREADS):
        ow = idx % OW
        oh = (idx // OW) % OH
        n = n_lo + idx // (OW * OH)
        if is_bias:
            acc += dy[n, k, oh, ow]
        else:
            ih = in_coord_cuda(oh, fh, sh, ph)
            iw = in_coord_cuda(ow, fw, sw, pw)
            if 0 <= ih < H and 0 <= iw < W:
                acc += dy[n, k, oh, ow] * x[n, c, ih, iw]
    scratch = cuda.shared.array(REDUCE_THREADS, dtype=partial.dtype)
    total = block_sum(scratch, acc)
    if cuda.threadIdx.x == 0:
        if is_bias:
            partial_b[g, k] = total
        else:
            partial[g, k, c, fh, fw] = total


@cuda.jit(cache=True)
def _conv2d_backward_weight_reduce_kernel(dw, db, partial, partial_b):
    """Pass 2: dw = sum over g of partial[g], db = sum over g of partial_b[g], chunks added in
    order. One thread per element of dw, then of db."""
    G = partial.shape[0]
    K, C, FH, FW = dw.shape
    taps = K * C * FH * FW
    i = cuda.grid(1)
    if i >= taps + K:
        return
    acc = dw.dtype.type(0)
    if i >= taps:
        for g in range(G):
            acc += partial_b[g, i - taps]
        db[i - taps] = acc
        return
    fw = i % FW
    fh = (i // FW) % FH
    c = (i // (FW * FH)) % C
    k = i // (FW * FH * C)
    for g in range(G):
        acc += partial[g, k, c, fh, fw]
    dw[k, c, fh, fw] = acc


@cuda.jit(cache=True)
def _conv2d_backward_bias_kernel(db, dy, partials, tickets):
    """db[k] = sum of dy[:, k]: gridDim.x blocks per filter k (blockIdx.y), each summing every
    gridDim.x-th run of REDUCE_THREADS values of dy[:, k] into partials[k, blockIdx.x]; the last of
    them to finish adds the partials in order (see ``_cuda.finished_last``)."""
    N, K, OH, OW = dy.shape
    k = cuda.blockIdx.y
    acc = db.dtype.type(0)
    for idx in range(cuda.blockIdx.x * REDUCE_THREADS + cuda.threadIdx.x, N * OH * OW, cuda.gridDim.x * REDUCE_THREADS):
        acc += dy[idx // (OH * OW), k, (idx // OW) % OH, idx % OW]
    scratch = cuda.shared.array(REDUCE_THREADS, dtype=db.dtype)
    flag = cuda.shared.array(1, dtype=numba.int32)
    last, total = grid_sum(scratch, flag, partials, tickets, k, acc)
    if last and cuda.threadIdx.x == 0:
        db[k] = total


# ------------------------------------------------------- implicit matrix products (the fast path)
#
# Each convolution pass is a matrix product whose operands are read straight from the arrays,
# never written out as an im2col matrix: C (M x P) = A (M x Q) B (Q x P), computed by the
# register-blocked tiles of ``_tiles.py`` (64 x 128 outputs a block, 4 x 8 a thread).
#
#   forward          M = K filters, Q = C*FH*FW taps (c, fh, fw), P = N*OH*OW outputs (n, oh, ow);
#                    A = w, B[(c, fh, fw), (n, oh, ow)] = x[n, c, oh*sh - ph + fh, ow*sw - pw + fw]
#   backward, input  (stride 1) M = C, Q = K*FH*FW (k, fh, fw), P = N*H*W (n, ih, iw);
#                    A[c, (k, fh, fw)] = w[k, c, fh, fw], B = dy[n, k, ih + ph - fh, iw + pw - fw]
#   backward, weight M = K, Q = N*OH*OW (n, oh, ow), P = C*FH*FW + 1 (the bias as a column of ones);
#                    A = dy, B[(n, oh, ow), (c, fh, fw)] = x[n, c, ...]; the batch split in chunks,
#                    one partial product each, added in a fixed order (no atomics)
#
# Where a tap's (c, fh, fw) decomposition is needed in the staging loop, the block first builds a
# table of it in shared memory (divisions once per block, none per step). Positions outside the
# input (padding) and rows or columns past the end read as 0.

TABLE_LIMIT = MAX_SHARED_BYTES - (STAGED_A + STAGED_B) * 8  # shared bytes left for tables beside float64 tiles
GEMM_BLOCKS = 264  # blocks the weight gradient aims for (batch chunks): two for each of an H100's 132 SMs
A_ROWS = GEMM_THREADS // TILE_K  # rows of A between a thread's staged elements (16 threads along q)
ROWS = GEMM_THREADS // TILE_N  # rows of B between a thread's staged elements (one column a thread)


def gemm_table_bytes(taps, tables=2):
    """Dynamic shared memory of an implicit-product kernel: ``tables`` int32 entries per tap."""
    return 4 * tables * taps


@cuda.jit(device=True, inline="always")
def _stage_patch_column(sb, src, table, t_off, t_packed, at, row0, col0, sign, rows_u, cols_u, q_left, b_k, j,
                        zero):
    """Stage this thread's LOADS_B rows (b_k + ROWS r) of column j of B, gathered from ``src``: row
    r's tap has its offset from ``at`` at table[t_off + ROWS r], and (fh, fw) packed at
    table[t_packed + ROWS r]; the position read is (row0 + sign fh, col0 + sign fw), 0 outside
    [0, rows) x [0, cols) (one unsigned comparison each) and past the last tap (q_left)."""
    for r in range(LOADS_B):
        v = zero
        if r * ROWS < q_left:
            packed = table[t_packed + numba.uint64(r * ROWS)]
            row, col = row0 + sign * (packed >> 16), col0 + sign * (packed & 65535)
            if numba.uint32(row) < rows_u and numba.uint32(col) < cols_u:
                v = src[numba.uint64(at + table[t_off + numba.uint64(r * ROWS)])]
        sb[(b_k + r * ROWS) * TILE_N + j] = v


@tile_kernel
def _conv2d_forward_gemm_kernel(y, yf, x, xf, w, wf, b, sh, sw, ph, pw, relu):
    """y = conv(x, w) + b (then max(., 0) with ``relu``) as the implicit product W (K x Q) X (Q x P).

    Each array comes twice, as itself (its shape) and flat (``yf``, ``xf``, ``wf``: what is
    indexed). Grid (ceil(P / TILE_N), ceil(K / TILE_M)), GEMM_THREADS threads; dynamic shared
    memory ``gemm_table_bytes(Q)``: per tap q = (c, fh, fw), where it reads relative to an
    output's top-left input (c*H*W + fh*W + fw), and fh and fw (packed as fh * 65536 + fw).
    """
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    OH, OW = y.shape[2], y.shape[3]
    Q, P, OHW = C * FH * FW, N * OH * OW, OH * OW
    t = cuda.threadIdx.x
    m0, p0 = cuda.blockIdx.y * TILE_M, cuda.blockIdx.x * TILE_N
    table = cuda.shared.array(0, dtype=numba.int32)
    for q in range(t, Q, GEMM_THREADS):
        c, fh, fw = q // (FH * FW), (q // FW) % FH, q % FW
        table[q] = c * H * W + fh * W + fw
        table[Q + q] = fh * 65536 + fw
    sa = cuda.shared.array(STAGED_A, dtype=y.dtype)  # sa[k * TILE_M + i] = w[m0 + i, q0 + k]
    sb = cuda.shared.array(STAGED_B, dtype=y.dtype)  # sb[k * TILE_N + j] = X[q0 + k, p0 + j]
    acc = cuda.local.array(ACC, dtype=y.dtype)
    zero_acc(acc)
    zero = y.dtype.type(0)
    # A (w, K x Q, contiguous along q): 16 threads along q, rows i, i + A_ROWS, ...
    a_k, i = t % TILE_K, t // TILE_K
    a_at, a_dr = numba.uint64((m0 + i) * Q + a_k), numba.uint64(A_ROWS * Q)
    # B (the input's patches): one output column p = (n, oh, ow) a thread, rows b_k + ROWS r.
    b_k, j = t // TILE_N, t % TILE_N
    p = p0 + j
    n = p // OHW
    ih0 = (p % OHW) // OW * sh - ph
    iw0 = p % OW * sw - pw
    q_end = Q if p < P else 0  # a column past the end reads nothing
    x_at = n * C * H * W + ih0 * W + iw0  # where this output's window starts (may be outside x)
    # Unsigned, so that nothing wraps around: the table index of row b_k this step, and the
    # bounds that one unsigned comparison checks (a negative coordinate becomes a huge one).
    tq, tq_packed = numba.uint64(b_k), numba.uint64(Q + b_k)
    H_u, W_u = numba.uint32(H), numba.uint32(W)
    cuda.syncthreads()  # wait until the table is built
    for q0 in range(0, Q, TILE_K):
        for r in range(LOADS_A):
            v = zero
            if m0 + i + r * A_ROWS < K and q0 + a_k < Q:
                v = wf[a_at + numba.uint64(r) * a_dr]
            sa[a_k * TILE_M + i + r * A_ROWS] = v
        _stage_patch_column(sb, xf, table, tq, tq_packed, x_at, ih0, iw0, 1, H_u, W_u, q_end - q0 - b_k, b_k, j,
                            zero)
        tq += numba.uint64(TILE_K)
        tq_packed += numba.uint64(TILE_K)
        a_at += numba.uint64(TILE_K)
        multiply_staged(acc, sa, sb, t)
    tx, ty = t % SPAN, t // SPAN
    for jj in range(SUB_N):
        p = p0 + tx + SPAN * jj
        if p >= P:
            continue
        n, s = p // OHW, p % OHW
        for ii in range(SUB_M):
            k = m0 + ty + SPAN * ii
            if k < K:
                v = acc[ii * SUB_N + jj] + b[k]
                if relu and not v > 0:
                    v = zero
                yf[(n * K + k) * OHW + s] = v


@tile_kernel
def _conv2d_backward_input_gemm_kernel(dx, dxf, dy, dyf, w, wf, x, xf, ph, pw, mask):
    """dx = the gradient to the input of a stride-1 convolution, as the implicit product
    A (C x Q) DY (Q x P), Q = K*FH*FW, P = N*H*W; zero where ``mask`` and x is not positive.

    Arrays twice, as for the forward kernel. Grid (ceil(P / TILE_N), ceil(C / TILE_M)); dynamic
    shared memory ``gemm_table_bytes(Q, 3)``: per tap q = (k, fh, fw), where A's element is in w
    relative to channel c's first tap (k*C*FH*FW + fh*FW + fw), where DY's element is in dy
    relative to the pixel's own (n, ih + ph, iw + pw) (k*OH*OW - fh*OW - fw), and fh, fw packed.
    """
    N, C, H, W = dx.shape
    K, _, FH, FW = w.shape
    OH, OW = dy.shape[2], dy.shape[3]
    Q, P, HW, TAPS = K * FH * FW, N * H * W, H * W, FH * FW
    t = cuda.threadIdx.x
    m0, p0 = cuda.blockIdx.y * TILE_M, cuda.blockIdx.x * TILE_N
    table = cuda.shared.array(0, dtype=numba.int32)
    for q in range(t, Q, GEMM_THREADS):
        k, fh, fw = q // TAPS, (q // FW) % FH, q % FW
        table[q] = k * C * TAPS + fh * FW + fw
        table[Q + q] = k * OH * OW - fh * OW - fw
        table[2 * Q + q] = fh * 65536 + fw
    sa = cuda.shared.array(STAGED_A, dtype=dx.dtype)
    sb = cuda.shared.array(STAGED_B, dtype=dx.dtype)
    acc = cuda.local.array(ACC, dtype=dx.dtype)
    zero_acc(acc)
    zero = dx.dtype.type(0)
    # A: 16 threads along q, channel rows A_ROWS apart (w[k, c, fh, fw] at c*TAPS + table[q]).
    a_k, i = t % TILE_K, t // TILE_K
    # B: one input pixel p = (n, ih, iw) a thread; its taps read dy at (ih + ph - fh, iw + pw - fw).
    b_k, j = t // TILE_N, t % TILE_N
    p = p0 + j
    n = p // HW
    oh0 = (p % HW) // W + ph
    ow0 = p % W + pw
    q_end = Q if p < P else 0  # a column past the end reads nothing
    dy_at = n * K * OH * OW + oh0 * OW + ow0
    # Unsigned indices, advanced a step at a time: nothing to wrap around, no multiplication.
    a_row, a_dr = numba.uint64((m0 + i) * TAPS), numba.uint64(A_ROWS * TAPS)  # w[., c, ...] of the first row
    t_a, t_dy, t_hw = numba.uint64(a_k), numba.uint64(Q + b_k), numba.uint64(2 * Q + b_k)  # table indices
    OH_u, OW_u = numba.uint32(OH), numba.uint32(OW)
    cuda.syncthreads()  # wait until the table is built
    for q0 in range(0, Q, TILE_K):
        tap_ok = q0 + a_k < Q
        w_tap = numba.uint64(table[t_a]) if tap_ok else numba.uint64(0)
        for r in range(LOADS_A):
            v = zero
            if m0 + i + r * A_ROWS < C and tap_ok:
                v = wf[a_row + numba.uint64(r) * a_dr + w_tap]
            sa[a_k * TILE_M + i + r * A_ROWS] = v
        _stage_patch_column(sb, dyf, table, t_dy, t_hw, dy_at, oh0, ow0, -1, OH_u, OW_u, q_end - q0 - b_k, b_k, j,
                            zero)
        t_a += numba.uint64(TILE_K)
        t_dy += numba.uint64(TILE_K)
        t_hw += numba.uint64(TILE_K)
        multiply_staged(acc, sa, sb, t)
    tx, ty = t % SPAN, t // SPAN
    for jj in range(SUB_N):
        p = p0 + tx + SPAN * jj
        if p >= P:
            continue
        n, s = p // HW, p % HW
        for ii in range(SUB_M):
            c = m0 + ty + SPAN * ii
            if c < C:
                at = (n * C + c) * HW + s
                v = acc[ii * SUB_N + jj]
                if mask and not xf[at] > 0:
                    v = zero
                dxf[at] = v


@tile_kernel
def _conv2d_backward_weight_gemm_kernel(partial, pf, partial_b, dy, dyf, x, xf, sh, sw, ph, pw):
    """One batch chunk's share of dw and db as the implicit product DY (K x Q) X (Q x P+1),
    Q = the chunk's (n, oh, ow), P = C*FH*FW taps (c, fh, fw), the last column all ones (db).

    ``partial`` (G, K, C, FH, FW), flat ``pf``, and ``partial_b`` (G, K) receive chunk
    g = blockIdx.z's sums (with G = 1, dw and db themselves); chunk g is images g*N//G to
    (g+1)*N//G - 1. Grid (ceil((P + 1) / TILE_N), ceil(K / TILE_M), G). No table: each thread
    follows the output positions (oh, ow) of its 4 rows as they advance 16 a step.
    """
    G, K, C, FH, FW = partial.shape
    N, _, H, W = x.shape
    OH, OW = dy.shape[2], dy.shape[3]
    OHW, TAPS = OH * OW, FH * FW
    P = C * TAPS
    t = cuda.threadIdx.x
    g = cuda.blockIdx.z
    m0, p0 = cuda.blockIdx.y * TILE_M, cuda.blockIdx.x * TILE_N
    sa = cuda.shared.array(STAGED_A, dtype=pf.dtype)
    sb = cuda.shared.array(STAGED_B, dtype=pf.dtype)
    acc = cuda.local.array(ACC, dtype=pf.dtype)
    zero_acc(acc)
    zero, one = pf.dtype.type(0), pf.dtype.type(1)
    # A (dy[n] as K x OH*OW, contiguous along q): 16 threads along q, rows A_ROWS apart.
    a_k, i = t % TILE_K, t // TILE_K
    # B: one tap column p = (c, fh, fw) a thread (or the column of ones), LOADS_B consecutive rows
    # b_k * LOADS_B + r, so that one input position serves them all.
    b_k, j = t // TILE_N, t % TILE_N
    p = p0 + j
    c, fh, fw = p // TAPS, (p // FW) % FH, p % FW
    fill = one if p == P else zero  # what a row reads outside x: 1 in the column of ones (a column that
    # is no tap reads no x: ``never`` below keeps it outside)
    never = -(1 << 30)  # an offset no step brings into the plane: columns that are not taps read no x
    # The input position (ih, iw) = (oh*sh - ph + fh, ow*sw - pw + fw) of the thread's first row's
    # output position (oh, ow), kept as ih * W (in [0, H*W) exactly when ih is in [0, H): the
    # offset in the plane is one addition, each bound one unsigned comparison). Row r is r output
    # positions further on; a step moves all of them TILE_K positions. Passing the right edge
    # means OW positions back and one output row down.
    # (The positions are int32, each update wrapped in int32(): Numba computes in 64 bits, and
    # the truncation lets the compiler use 32-bit instructions, half as many.)
    i32 = numba.int32
    d_ihw, d_iw = i32(TILE_K // OW * sh * W), i32(TILE_K % OW * sw)
    iw_end, back, down, step_w = i32(OW * sw - pw + fw), i32(OW * sw), i32(sh * W), i32(sw)
    HW_u, W_u = numba.uint32(H * W), numba.uint32(W)
    first = b_k * LOADS_B  # the thread's first row in a step
    a_dr = numba.uint64(A_ROWS * OHW)  # between a thread's rows of A
    a_rows = i32(K - m0 - i)  # rows r * A_ROWS below this are filters
    for n in range(g * N // G, (g + 1) * N // G):
        a_at = numba.uint64((n * K + m0 + i) * OHW + a_k)  # dy[n, m0 + i, a_k], the thread's first element
        x_at = (n * C + c) * H * W
        ihw = i32((first // OW * sh - ph + fh) * W if p < P else never)
        iw = i32(first % OW * sw - pw + fw)
        a_left, b_left = i32(OHW - a_k), i32(OHW - first)  # positions left from this step's first row on
        for q0 in range(0, OHW, TILE_K):
            for r in range(LOADS_A):
                v = zero
                if r * A_ROWS < a_rows and 0 < a_left:
                    v = dyf[a_at + numba.uint64(r) * a_dr]
                sa[a_k * TILE_M + i + r * A_ROWS] = v
            a_at += numba.uint64(TILE_K)
            for r in range(LOADS_B):
                v = fill  # (past the last position A is 0: the column of ones may stay 1 there)
                if r < b_left:
                    row, col = ihw, i32(iw + r * step_w)
                    while col >= iw_end:  # past the right edge: once at most where OW >= LOADS_B
                        col = i32(col - back)
                        row = i32(row + down)
                    if numba.uint32(row) < HW_u and numba.uint32(col) < W_u:
                        v = xf[numba.uint64(x_at + i32(row + col))]
                sb[(first + r) * TILE_N + j] = v
            ihw = i32(ihw + d_ihw)  # advance TILE_K positions
            iw = i32(iw + d_iw)
            if iw >= iw_end:
                iw = i32(iw - back)
                ihw = i32(ihw + down)
            a_left = i32(a_left - TILE_K)
            b_left = i32(b_left - TILE_K)
            multiply_staged(acc, sa, sb, t)
    tx, ty = t % SPAN, t // SPAN
    for ii in range(SUB_M):
        k = m0 + ty + SPAN * ii
        if k >= K:
            continue
        for jj in range(SUB_N):
            p = p0 + tx + SPAN * jj
            if p < P:
                pf[(g * K + k) * P + p] = acc[ii * SUB_N + jj]
            elif p == P:
                partial_b[g, k] = acc[ii * SUB_N + jj]


# --------------------------------------------------------------------------- CUDA launchers


def forward_shared_bytes(FH, FW, sh, sw, itemsize):
    """Dynamic shared memory of the forward kernel: the staged input region and filters."""
    tile = ((TILE_H - 1) * sh + FH) * ((TILE_W - 1) * sw + FW)
    return (tile + K_PER_BLOCK * FH * FW) * itemsize


def forward_gemm_fits(w_shape, dtype=None):
    """Whether the implicit-product forward kernel can take this filter: its tap table in shared memory."""
    K, C, FH, FW = w_shape
    return gemm_table_bytes(C * FH * FW) <= TABLE_LIMIT


def backward_input_gemm_fits(w_shape, stride):
    """Whether the implicit-product backward-input kernel applies: stride 1, its tables in shared memory."""
    K, C, FH, FW = w_shape
    return tuple(stride) == (1, 1) and gemm_table_bytes(K * FH * FW, 3) <= TABLE_LIMIT


def check_forward_fits(fn, w_shape, stride, dtype):
    """Refuse, with a clear message, a filter and stride that neither forward kernel can stage in
    shared memory (the implicit product's tap table, or the direct kernel's input region)."""
    if forward_gemm_fits(w_shape):
        return
    FH, FW = w_shape[2], w_shape[3]
    shared = forward_shared_bytes(FH, FW, *stride, np.dtype(dtype).itemsize)
    if shared > MAX_SHARED_BYTES:
        raise ValueError(
            f"{fn}: a {FH}x{FW} filter at stride {tuple(stride)} needs {shared} bytes of shared memory per "
            f"block, more than {MAX_SHARED_BYTES}"
        )


def conv2d_forward_cuda(y, x, w, b=None, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Forward convolution on the GPU; the arguments and shapes of ``conv2d_forward_cpu``."""
    fn = "conv2d_forward_cuda"
    y, x, w, b = gpu_arrays(fn, y=y, x=x, w=w, b=b)
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    b_pair = ("b", b) if b is not None else None
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_gpu, ("x", x), ("w", w), ("y", y), b_pair, stride, padding)
    check_forward_fits(fn, w.shape, stride, x.dtype)
    if b is None:
        b = cuda.to_device(np.zeros(K, x.dtype))  # a direct call may allocate; a planned step passes its own zeros
    conv2d_forward_core_cuda(y, x, w, b, *stride, *padding, False, None)
    return y


def conv2d_backward_input_cuda(dx, dy, w, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Gradient to the input on the GPU; the arguments and shapes of ``conv2d_backward_input_cpu``."""
    fn = "conv2d_backward_input_cuda"
    dx, dy, w = gpu_arrays(fn, dx=dx, dy=dy, w=w)
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    N, C, H, W, *_ = check_conv2d(fn, on_gpu, ("dx", dx), ("w", w), ("dy", dy), None, stride, padding)
    _backward_input_gemm(dx, dy, w, dx, *stride, *padding, False)
    return dx


def weight_chunks(N, taps):
    """How many chunks the direct weight-gradient kernel splits the batch into: about
    MIN_REDUCE_BLOCKS blocks in all."""
    return max(1, min(N, blocks(MIN_REDUCE_BLOCKS, taps)))


def conv2d_backward_weight_cuda(dw, dy, x, stride_h=1, stride_w=1, pad_h=0, pad_w=0):
    """Gradient to the filters on the GPU, deterministic; the arguments of ``conv2d_backward_weight_cpu``."""
    fn = "conv2d_backward_weight_cuda"
    dw, dy, x = gpu_arrays(fn, dw=dw, dy=dy, x=x)
    stride, padding = check_stride_padding(fn, stride_h, stride_w, pad_h, pad_w)
    N, C, H, W, K, FH, FW, OH, OW = check_conv2d(fn, on_gpu, ("x", x), ("dw", dw), ("dy", dy), None, stride,
                                                 padding)
    ws = conv2d_workspace_cuda(x.shape, dw.shape, dy.shape, stride, padding, True, x.dtype)
    arrays = {name: cuda.device_array(shape, x.dtype) for name, shape in ws.items()}
    _weight_and_bias_gemm(dw, arrays["db"], dy, x, *stride, *padding, arrays.get("partial"), arrays.get("partial_b"))
    return dw


def conv2d_backward_bias_cuda(db, dy):
    """Gradient to the bias on the GPU; the arguments of ``conv2d_backward_bias_cpu``."""
    fn = "conv2d_backward_bias_cuda"
    db, dy = gpu_arrays(fn, db=db, dy=dy)
    check_conv2d_bias(fn, on_gpu, db, dy)
    N, K, OH, OW = dy.shape
    parts = reduce_parts(N * OH * OW, K)
    partials, tickets = reduce_scratch(K, parts, db.dtype)
    _conv2d_backward_bias_kernel[(parts, K), REDUCE_THREADS, stream()](db, dy, partials, tickets)
    return db


# ------------------------------------------------------------ unchecked cores (planned steps)
#
# What nbcnn's planned step calls once a plan has checked the shapes; the same arguments as the
# CPU cores in gemm.py. ``b`` is always an array (zeros without a bias); ``dx`` or ``db`` None
# skips that gradient; ``ws`` holds the scratch ``conv2d_workspace_cuda`` asked for.


def gemm_chunks(N, K, P):
    """How many batch chunks the weight gradient's implicit product is split into: enough blocks
    for about GEMM_BLOCKS in all, at most one chunk per image."""
    tiles = blocks(P + 1, TILE_N) * blocks(K, TILE_M)
    return max(1, min(N, blocks(GEMM_BLOCKS, tiles)))


# ------------------------------------------------------------ unchecked cores (planned steps)
#
# What nbcnn's planned step calls once a plan has checked the shapes; the same arguments as the
# CPU cores in gemm.py. ``b`` is always an array (zeros without a bias); ``dx`` or ``db`` None
# skips that gradient; ``ws`` holds the scratch the workspace function asked for.
#
# Two algorithms, chosen in the registry (nbcnn.ops): "gemm", the implicit products (the
# default; a shape they cannot take falls back to the simpler kernel for that pass), and
# "tiled", the simpler kernels, kept as references (*_direct_* here).


def _workspace(x_shape, w_shape, stride, dtype, chunks):
    check_forward_fits("Conv2D on cuda", w_shape, stride, dtype)
    K, C, FH, FW = w_shape
    G = chunks(x_shape[0], K, C * FH * FW)
    shapes = {"db": (K,)}
    if G > 1:
        shapes.update(partial=(G, K, C, FH, FW), partial_b=(G, K))
    return shapes


def conv2d_workspace_cuda(x_shape, w_shape, y_shape, stride, padding, need_dx, dtype):
    """{name: shape} of the scratch the backward core needs: the weight gradient's partial sums per
    batch chunk (none when the batch is one chunk), and a bias gradient for a layer without bias.
    Refuses a filter the forward kernels cannot stage (the plan calls this once)."""
    return _workspace(x_shape, w_shape, stride, dtype, gemm_chunks)


def conv2d_workspace_direct_cuda(x_shape, w_shape, y_shape, stride, padding, need_dx, dtype):
    """``conv2d_workspace_cuda`` for the direct kernels (their own number of chunks)."""
    return _workspace(x_shape, w_shape, stride, dtype, lambda N, K, taps: weight_chunks(N, K * taps + K))


def _backward_input_direct(dx, dy, w, x, sh, sw, ph, pw, mask):
    N, C, H, W = dx.shape
    grid = (blocks(W, GATHER_W), blocks(H, GATHER_H), grid_z(N * C))
    _conv2d_backward_input_kernel[grid, (GATHER_W, GATHER_H), stream()](dx, dy, w, x, sh, sw, ph, pw, mask)


def _backward_input_gemm(dx, dy, w, x, sh, sw, ph, pw, mask):
    if not backward_input_gemm_fits(w.shape, (sh, sw)):
        _backward_input_direct(dx, dy, w, x, sh, sw, ph, pw, mask)
        return
    N, C, H, W = dx.shape
    K, _, FH, FW = w.shape
    grid = (blocks(N * H * W, TILE_N), blocks(C, TILE_M))
    _conv2d_backward_input_gemm_kernel[grid, GEMM_THREADS, stream(), gemm_table_bytes(K * FH * FW, 3)](
        dx, flat(dx), dy, flat(dy), w, flat(w), x, flat(x), ph, pw, mask)


def _chunks_or_gradients(dw, db, partial, partial_b):
    if partial is None:  # one chunk: the first pass writes the gradients themselves
        K, C, FH, FW = dw.shape
        return dw.reshape(1, K, C, FH, FW), db.reshape(1, K)
    return partial, partial_b


def _weight_and_bias_direct(dw, db, dy, x, sh, sw, ph, pw, partial, partial_b):
    K, C, FH, FW = dw.shape
    taps = K * C * FH * FW
    partial, partial_b = _chunks_or_gradients(dw, db, partial, partial_b)
    G = partial.shape[0]
    _conv2d_backward_weight_partial_kernel[(taps + K, G), REDUCE_THREADS, stream()](partial, partial_b, dy, x, sh, sw, ph, pw)
    if G > 1:
        _conv2d_backward_weight_reduce_kernel[blocks(taps + K, 256), 256, stream()](dw, db, partial, partial_b)


def _weight_and_bias_gemm(dw, db, dy, x, sh, sw, ph, pw, partial, partial_b):
    K, C, FH, FW = dw.shape
    P = C * FH * FW
    partial, partial_b = _chunks_or_gradients(dw, db, partial, partial_b)
    G = partial.shape[0]
    grid = (blocks(P + 1, TILE_N), blocks(K, TILE_M), G)
    _conv2d_backward_weight_gemm_kernel[grid, GEMM_THREADS, stream()](partial, flat(partial), partial_b, dy, flat(dy), x,
                                                           flat(x), sh, sw, ph, pw)
    if G > 1:
        _conv2d_backward_weight_reduce_kernel[blocks(K * P + K, 256), 256, stream()](dw, db, partial, partial_b)


def conv2d_forward_direct_core_cuda(y, x, w, b, sh, sw, ph, pw, relu, ws):
    N, K, OH, OW = y.shape
    FH, FW = w.shape[2], w.shape[3]
    shared = forward_shared_bytes(FH, FW, sh, sw, x.dtype.itemsize)
    grid = (blocks(OW, TILE_W), blocks(OH, TILE_H), grid_z(N * blocks(K, K_PER_BLOCK)))
    _conv2d_forward_kernel[grid, (TILE_W, TILE_H), stream(), shared](y, x, w, b, sh, sw, ph, pw, relu)


def conv2d_forward_core_cuda(y, x, w, b, sh, sw, ph, pw, relu, ws):
    if not forward_gemm_fits(w.shape):
        conv2d_forward_direct_core_cuda(y, x, w, b, sh, sw, ph, pw, relu, ws)
        return
    N, K, OH, OW = y.shape
    _, C, FH, FW = w.shape
    grid = (blocks(N * OH * OW, TILE_N), blocks(K, TILE_M))
    _conv2d_forward_gemm_kernel[grid, GEMM_THREADS, stream(), gemm_table_bytes(C * FH * FW)](
        y, flat(y), x, flat(x), w, flat(w), b, sh, sw, ph, pw, relu)


def conv2d_backward_direct_core_cuda(dx, dw, db, dy, x, w, sh, sw, ph, pw, mask, ws):
    if dx is not None:
        _backward_input_direct(dx, dy, w, x, sh, sw, ph, pw, mask)
    _weight_and_bias_direct(dw, ws.db if db is None else db, dy, x, sh, sw, ph, pw, getattr(ws, "partial", None),
                            getattr(ws, "partial_b", None))


def conv2d_backward_core_cuda(dx, dw, db, dy, x, w, sh, sw, ph, pw, mask, ws):
    if dx is not None:
        _backward_input_gemm(dx, dy, w, x, sh, sw, ph, pw, mask)
    _weight_and_bias_gemm(dw, ws.db if db is None else db, dy, x, sh, sw, ph, pw, getattr(ws, "partial", None),
                          getattr(ws, "partial_b", None))
