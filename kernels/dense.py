"""Dense (fully connected) layer, forward and backward.

Letters: N batch, IN input features, OUT output features. x (N, IN), w (OUT, IN) as
PyTorch stores it, b (OUT,), y (N, OUT); gradients dx, dw, db, dy of the same shapes.

    y = x w^T + b          y[n, o] = b[o] + sum_i x[n, i] * w[o, i]
    dx = dy w              dx[n, i] = sum_o dy[n, o] * w[o, i]
    dw = dy^T x            dw[o, i] = sum_n dy[n, o] * x[n, i]
    db = sum_n dy[n, :]

The ``*_blas_cpu`` variants compute the same three products with NumPy's ``matmul``
(BLAS): the direct loops below are the reference, and their dot products do not
vectorize (a float sum may not be reordered), so BLAS is about ten times faster.

Backward kernels overwrite their outputs. On the CPU each task owns whole rows of its
output (a row of dx per sample, a row of dw per output feature): no races. On the GPU
all three are register-blocked matrix products ``C = op(A) op(B) + bias`` with op a transpose
or not (``_tiles.py``: a thread computes 4 x 8 elements of C), one kernel per pair of
transpositions; ``_matmul_kernel``, one element of C per thread, is the simpler version,
kept as a reference.
"""

import numba
import numpy as np
from numba import cuda, njit, prange

from ._checks import check_arrays, check_ndim, check_shape, on_host
from ._cpu import parallel_and_serial
from ._cuda import (REDUCE_THREADS, blocks, finished_last, flat, gpu_arrays, on_gpu, partial_sum, reduce_parts,
                    reduce_scratch, stream)
from ._tiles import (ACC, GEMM_THREADS, LOADS_A, LOADS_B, SPAN, STAGED_A, STAGED_B, SUB_M, SUB_N, TILE_K, TILE_M, TILE_N,
                     multiply_staged, tile_kernel, zero_acc)
from .activation import relu_backward_core_cpu
from .matmul import matmul_core_cpu, matmul_workspace

# ------------------------------------------------------------------------ argument checks


def check_dense(fn, on_device, x, w, y, b=None):
    """Check one dense call; ``(name, array)`` pairs in the roles x (N, IN), w (OUT, IN),
    y (N, OUT), b (OUT,). Returns ``(N, IN, OUT)``."""
    pairs = [x, w, y] + ([b] if b is not None else [])
    check_arrays(fn, on_device, dict(pairs))
    (xn, xa), (wn, wa), (yn, ya) = x, w, y
    check_ndim(fn, xn, xa, ("N", "IN"))
    check_ndim(fn, wn, wa, ("OUT", "IN"))
    N, IN = xa.shape
    OUT = wa.shape[0]
    check_shape(fn, wn, wa, (OUT, IN), ("OUT", "IN"))
    check_shape(fn, yn, ya, (N, OUT), ("N", "OUT"))
    if b is not None:
        check_shape(fn, b[0], b[1], (OUT,), ("OUT",))
    return N, IN, OUT


def check_dense_bias(fn, on_device, db, dy):
    """db (OUT,), dy (N, OUT)."""
    check_arrays(fn, on_device, {"db": db, "dy": dy})
    check_ndim(fn, "dy", dy, ("N", "OUT"))
    check_shape(fn, "db", db, (dy.shape[1],), ("OUT",))


# ----------------------------------------------------------------------------- CPU kernels


@njit(parallel=True, cache=True)
def _dense_forward_cpu(y, x, w, b):
    """y[n, o] = b[o] + x[n, :] . w[o, :]; one task per output element, a dot product of contiguous rows."""
    N, IN = x.shape
    OUT = w.shape[0]
    for task in prange(N * OUT):
        n = task // OUT
        o = task % OUT
        acc = b[o]
        for i in range(IN):
            acc += x[n, i] * w[o, i]
        y[n, o] = acc


@njit(parallel=True, cache=True)
def _dense_backward_input_cpu(dx, dy, w):
    """dx[n, :] = sum_o dy[n, o] * w[o, :]; one task per sample, adding whole rows of w."""
    N, IN = dx.shape
    OUT = w.shape[0]
    for n in prange(N):
        dx[n, :] = 0
        for o in range(OUT):
            g = dy[n, o]
            for i in range(IN):
                dx[n, i] += g * w[o, i]


@njit(parallel=True, cache=True)
def _dense_backward_weight_cpu(dw, dy, x):
    """dw[o, :] = sum_n dy[n, o] * x[n, :]; one task per output feature, adding whole rows of x."""
    OUT, IN = dw.shape
    N = x.shape[0]
    for o in prange(OUT):
        dw[o, :] = 0
        for n in range(N):
            g = dy[n, o]
            for i in range(IN):
                dw[o, i] += g * x[n, i]


@njit(inline="always", cache=True)
def _bias_sum(db, dy, o):
    acc = db.dtype.type(0)
    for n in range(dy.shape[0]):
        acc += dy[n, o]
    db[o] = acc


@parallel_and_serial
def _dense_backward_bias_cpu(db, dy):
    """db[o] = sum_n dy[n, o]; one task per output feature."""
    for o in prange(dy.shape[1]):
        _bias_sum(db, dy, o)


# ---------------------------------------------------------------- public entry points


def dense_forward_cpu(y, x, w, b=None):
    """``y = x w^T + b``: x (N, IN), w (OUT, IN), b (OUT,) or None, y (N, OUT). Returns ``y``."""
    _, _, OUT = check_dense("dense_forward_cpu", on_host, ("x", x), ("w", w), ("y", y),
                            ("b", b) if b is not None else None)
    if b is None:
        b = np.zeros(OUT, dtype=x.dtype)
    _dense_forward_cpu(y, x, w, b)
    return y


def dense_backward_input_cpu(dx, dy, w):
    """``dx = dy w``: dx (N, IN), dy (N, OUT), w (OUT, IN). Returns ``dx``."""
    check_dense("dense_backward_input_cpu", on_host, ("dx", dx), ("w", w), ("dy", dy))
    _dense_backward_input_cpu(dx, dy, w)
    return dx


def dense_backward_weight_cpu(dw, dy, x):
    """``dw = dy^T x``: dw (OUT, IN), dy (N, OUT), x (N, IN). Returns ``dw``."""
    check_dense("dense_backward_weight_cpu", on_host, ("x", x), ("dw", dw), ("dy", dy))
    _dense_backward_weight_cpu(dw, dy, x)
    return dw


def dense_backward_bias_cpu(db, dy):
    """``db = sum_n dy[n, :]``: db (OUT,), dy (N, OUT). Returns ``db``."""
    check_dense_bias("dense_backward_bias_cpu", on_host, db, dy)
    _dense_backward_bias_cpu.parallel(db, dy)
    return db


@njit(inline="always", cache=True)
def _bias_row(y, b, n, relu):
    for o in range(y.shape[1]):
        v = y[n, o] + b[o]
        y[n, o] = v if (v > 0 or not relu) else 0


@parallel_and_serial
def _add_bias_rows_cpu(y, b, relu):
    """y[n, :] += b, then max(., 0) when ``relu`` (a dense layer followed by ReLU); one task per row."""
    for n in prange(y.shape[0]):
        _bias_row(y, b, n, relu)


def dense_forward_blas_cpu(y, x, w, b=None):
    """``y = x w^T + b`` with one BLAS product; the arguments of ``dense_forward_cpu``."""
    check_dense("dense_forward_blas_cpu", on_host, ("x", x), ("w", w), ("y", y), ("b", b) if b is not None else None)
    np.matmul(x, w.T, out=y)
    if b is not None:
        _add_bias_rows_cpu.parallel(y, b, False)
    return y


def dense_backward_input_blas_cpu(dx, dy, w):
    """``dx = dy w`` with one BLAS product; the arguments of ``dense_backward_input_cpu``."""
    check_dense("dense_backward_input_blas_cpu", on_host, ("dx", dx), ("w", w), ("dy", dy))
    np.matmul(dy, w, out=dx)
    return dx


def dense_backward_weight_blas_cpu(dw, dy, x):
    """``dw = dy^T x`` with one BLAS product; the arguments of ``dense_backward_weight_cpu``."""
    check_dense("dense_backward_weight_blas_cpu", on_host, ("x", x), ("dw", dw), ("dy", dy))
    np.matmul(dy.T, x, out=dw)
    return dw


# Unchecked cores, what nbcnn's planned step calls: the same arguments on both devices. ``b`` is
# always an array (zeros for a layer without bias); ``relu`` applies the ReLU that follows the
# layer; ``mask`` multiplies dx by (x > 0), the backward of a ReLU that precedes the layer (its
# output is this layer's input x); ``dx`` or ``db`` None skips that gradient. ``ws``: the plan's
# scratch (``ws.one``, a 1-element array the CUDA launch passes where an argument is unused).


def dense_workspace_cpu(x_shape, w_shape):
    """The scratch of the three products (kernels/matmul.py): y = x w^T, dx = dy w, dw = dy^T x."""
    (B, IN), OUT = x_shape, w_shape[0]
    return matmul_workspace((B, OUT, IN), (B, IN, OUT), (OUT, IN, B))


def dense_forward_core_cpu(y, x, w, b, relu, ws):
    matmul_core_cpu(y, x, w, False, True, False, ws)  # y = x w^T
    add = _add_bias_rows_cpu.for_size(y.size)
    add(y, b, relu)


def dense_backward_core_cpu(dx, dw, db, dy, x, w, mask, ws):
    if dx is not None:
        matmul_core_cpu(dx, dy, w, False, False, False, ws)  # dx = dy w
        if mask:
            relu_backward_core_cpu(dx, dx, x)
    matmul_core_cpu(dw, dy, x, True, False, False, ws)  # dw = dy^T x
    if db is not None:
        _dense_backward_bias_cpu.serial(db, dy)


# ---------------------------------------------------------------------------- CUDA kernels

TILE = 16  # a TILE x TILE block of threads computes a TILE x TILE tile of C
TILE_PAD = 17  # shared-memory row length: TILE + 1, so a column's elements fall in different banks


@cuda.jit(cache=True)
def _matmul_kernel(c, a, b, bias, mask, extra, trans_a, trans_b, has_bias, relu, has_mask, ones_col):
    """c (M, P) = op(a) (M, Q) @ op(b) (Q, P) + bias (P,), op a transpose when trans_a / trans_b.

    One thread per element of c: threadIdx.x along P, threadIdx.y along M; grid
    (ceil(P / TILE), ceil(M / TILE)). The block walks along Q one TILE at a time,
    staging a tile of op(a) and of op(b) in shared memory. Loads are coalesced either
    way: threadIdx.x always runs along the array's contiguous axis, and a transposed
    tile is written transposed into shared memory (its rows padded by one element so
    the transposed writes hit different banks).

    Epilogues, each switched by a flag, so that one launch does what several would:
    ``relu`` writes max(c, 0); ``has_mask`` zeroes c where ``mask`` (M, P) is not positive
    (the backward of a ReLU); ``ones_col`` treats op(b) as having one more column of ones,
    P, whose result goes to ``extra`` (M,): with c = dy^T x that column is sum_n dy[n, :],
    the bias gradient, so the weight and bias gradients come from one launch (the grid
    then covers P + 1 columns).
    """
    M, P = c.shape
    Q = a.shape[0] if trans_a else a.shape[1]
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    m0, p0 = cuda.blockIdx.y * TILE, cuda.blockIdx.x * TILE
    sa = cuda.shared.array((TILE, TILE_PAD), dtype=c.dtype)  # sa[i, t] = op(a)[m0 + i, q0 + t]
    sb = cuda.shared.array((TILE, TILE_PAD), dtype=c.dtype)  # sb[t, j] = op(b)[q0 + t, p0 + j]
    acc = c.dtype.type(0)
    for q0 in range(0, Q, TILE):
        if trans_a:  # op(a)[m, q] = a[q, m]: threads along m read a row of a
            q, m = q0 + ty, m0 + tx
            sa[tx, ty] = a[q, m] if q < Q and m < M else 0
        else:
            m, q = m0 + ty, q0 + tx
            sa[ty, tx] = a[m, q] if m < M and q < Q else 0
        if trans_b:  # op(b)[q, p] = b[p, q]: threads along q read a row of b
            p, q = p0 + ty, q0 + tx
            sb[tx, ty] = b[p, q] if p < P and q < Q else 0
        else:
            q, p = q0 + ty, p0 + tx
            if q < Q and p < P:
                sb[ty, tx] = b[q, p]
            elif ones_col and q < Q and p == P:
                sb[ty, tx] = 1
            else:
                sb[ty, tx] = 0
        cuda.syncthreads()  # wait until both tiles are staged
        for t in range(TILE):
            acc += sa[ty, t] * sb[t, tx]
        cuda.syncthreads()  # wait until every thread is done with the tiles before the next ones overwrite them
    m, p = m0 + ty, p0 + tx
    if m < M and p < P:
        v = acc + bias[p] if has_bias else acc
        if (relu and not v > 0) or (has_mask and not mask[m, p] > 0):
            v = c.dtype.type(0)  # of c's dtype: a plain 0 would turn v, and the epilogue, into float64
        c[m, p] = v
    elif m < M and ones_col and p == P:
        extra[m] = acc


def _gemm_kernel_for(trans_a, trans_b):
    """The register-blocked product c = op(a) op(b) for one pair of transpositions, fixed when the
    kernel is compiled so that the staging code has no branches on them (see ``_tiles.py``).

    ``_gemm_<ab>_kernel(c, a, b, Q, bias, mask, extra, has_bias, relu, has_mask, ones_col)``: the
    arguments and epilogues of ``_matmul_kernel``; ``a`` and ``b`` are flat views of the operands
    (op(a) is M x Q, op(b) is Q x P). Each of the GEMM_THREADS threads computes SUB_M x SUB_N
    elements of a TILE_M x TILE_N tile of c (M, P). Grid (ceil(P' / TILE_N), ceil(M / TILE_M)),
    P' = P + 1 with ``ones_col`` (which only the "tn" kernel, the weight gradient, takes).

    Staging is coalesced: for each operand, consecutive threads take consecutive elements along
    the array's contiguous axis (16 threads along q when it is contiguous along q, a whole row
    of the tile along m or p otherwise). A thread works out once where its elements are
    (unsigned flat indices, so nothing wraps around); per step it checks q and adds a constant.
    """
    # This thread stages op(a)[m0 + i + r * a_di, q0 + a_k + r * a_dk] for r < LOADS_A, and
    # op(b)[q0 + b_k + r * b_dk, p0 + j + r * b_dj] for r < LOADS_B.
    a_dk, a_di = (GEMM_THREADS // TILE_M, 0) if trans_a else (0, GEMM_THREADS // TILE_K)
    b_dk, b_dj = (0, GEMM_THREADS // TILE_K) if trans_b else (GEMM_THREADS // TILE_N, 0)
    with_ones = trans_a and not trans_b  # the weight gradient: its bias as a column of ones

    def gemm(c, a, b, Q, bias, mask, extra, has_bias, relu, has_mask, ones_col):
        M, P = c.shape
        t = cuda.threadIdx.x
        m0, p0 = cuda.blockIdx.y * TILE_M, cuda.blockIdx.x * TILE_N
        sa = cuda.shared.array(STAGED_A, dtype=c.dtype)  # sa[k * TILE_M + i] = op(a)[m0 + i, q0 + k]
        sb = cuda.shared.array(STAGED_B, dtype=c.dtype)  # sb[k * TILE_N + j] = op(b)[q0 + k, p0 + j]
        acc = cuda.local.array(ACC, dtype=c.dtype)
        zero_acc(acc)
        zero, one = c.dtype.type(0), c.dtype.type(1)
        a_k, i = (t // TILE_M, t % TILE_M) if trans_a else (t % TILE_K, t // TILE_K)
        b_k, j = (t % TILE_K, t // TILE_K) if trans_b else (t // TILE_N, t % TILE_N)
        # Flat index of the thread's first element of a and b, between its elements, per step.
        if trans_a:  # a is Q x M
            a_at, a_dr, a_step = a_k * M + m0 + i, a_dk * M, TILE_K * M
        else:  # a is M x Q
            a_at, a_dr, a_step = (m0 + i) * Q + a_k, a_di * Q, TILE_K
        if trans_b:  # b is P x Q
            b_at, b_dr, b_step = (p0 + j) * Q + b_k, b_dj * Q, TILE_K
        else:  # b is Q x P
            b_at, b_dr, b_step = b_k * P + p0 + j, b_dk * P, TILE_K * P
        a_at, a_dr, a_step = numba.uint64(a_at), numba.uint64(a_dr), numba.uint64(a_step)
        b_at, b_dr, b_step = numba.uint64(b_at), numba.uint64(b_dr), numba.uint64(b_step)
        s_a = a_k * TILE_M + i  # where the first element goes in the shared tiles
        s_b = b_k * TILE_N + j
        # Past the last column of b: 0, or 1 in the column of ones.
        b_fill = one if with_ones and ones_col and p0 + j == P else zero
        for q0 in range(0, Q, TILE_K):
            for r in range(LOADS_A):
                v = zero
                if m0 + i + r * a_di < M and q0 + a_k + r * a_dk < Q:
                    v = a[a_at + numba.uint64(r) * a_dr]
                sa[s_a + r * (a_dk * TILE_M + a_di)] = v
            for r in range(LOADS_B):
                v = zero
                if q0 + b_k + r * b_dk < Q:
                    v = b_fill
                    if p0 + j + r * b_dj < P:
                        v = b[b_at + numba.uint64(r) * b_dr]
                sb[s_b + r * (b_dk * TILE_N + b_dj)] = v
            a_at += a_step
            b_at += b_step
            multiply_staged(acc, sa, sb, t)
        tx, ty = t % SPAN, t // SPAN
        for ii in range(SUB_M):
            m = m0 + ty + SPAN * ii
            if m >= M:
                continue
            for jj in range(SUB_N):
                p = p0 + tx + SPAN * jj
                v = acc[ii * SUB_N + jj]
                if p < P:
                    if has_bias:
                        v += bias[p]
                    if (relu and not v > 0) or (has_mask and not mask[m, p] > 0):
                        v = zero
                    c[m, p] = v
                elif with_ones and ones_col and p == P:
                    extra[m] = v

    gemm.__name__ = gemm.__qualname__ = f"_gemm_{'t' if trans_a else 'n'}{'t' if trans_b else 'n'}_kernel"
    return tile_kernel(gemm)


_gemm_nt_kernel = _gemm_kernel_for(False, True)  # y = x w^T
_gemm_nn_kernel = _gemm_kernel_for(False, False)  # dx = dy w
_gemm_tn_kernel = _gemm_kernel_for(True, False)  # dw = dy^T x (and db, as the column of ones)


# The bias gradient's blocks: BIAS_COLUMNS adjacent features (a warp reads 32 adjacent floats of a
# row of dy, one transaction) by BIAS_LANES rows at a time.
BIAS_COLUMNS = 32
BIAS_LANES = REDUCE_THREADS // BIAS_COLUMNS


@cuda.jit(cache=True)
def _dense_backward_bias_kernel(db, dy, partials, tickets):
    """db[o] = sum_n dy[n, o]. Block (part, column block) sums features o of its column block
    over rows n = part * BIAS_LANES + lane, stepping by all parts' lanes; the lanes' sums are
    added in order into partials[o, part], and the last part to finish adds those in order
    (see ``_cuda.finished_last``). No atomics on values: the same result on every run."""
    N, OUT = dy.shape
    column = cuda.threadIdx.x % BIAS_COLUMNS
    lane = cuda.threadIdx.x // BIAS_COLUMNS
    o = cuda.blockIdx.y * BIAS_COLUMNS + column
    part = cuda.blockIdx.x
    acc = db.dtype.type(0)
    if o < OUT:
        for n in range(part * BIAS_LANES + lane, N, cuda.gridDim.x * BIAS_LANES):
            acc += dy[n, o]
    lanes = cuda.shared.array(REDUCE_THREADS, dtype=db.dtype)
    flag = cuda.shared.array(1, dtype=numba.int32)
    lanes[cuda.threadIdx.x] = acc
    cuda.syncthreads()
    if lane == 0 and o < OUT:
        for other in range(1, BIAS_LANES):
            acc += lanes[other * BIAS_COLUMNS + column]
        partials[o, part] = acc
    if finished_last(flag, tickets, cuda.blockIdx.y):
        if lane == 0 and o < OUT:
            total = db.dtype.type(0)
            for other in range(cuda.gridDim.x):
                total += partial_sum(partials, o, other)
            db[o] = total


# --------------------------------------------------------------------------- CUDA launchers


_GEMM = {(False, True): _gemm_nt_kernel, (False, False): _gemm_nn_kernel, (True, False): _gemm_tn_kernel}


def _gemm(c, a, b, bias, mask, extra, trans_a, trans_b, has_bias, relu, has_mask, ones_col):
    """c = op(a) op(b) with the register-blocked kernel for these transpositions; the flags as
    ``_matmul_kernel`` takes them."""
    M, P = c.shape
    Q = a.shape[0] if trans_a else a.shape[1]
    columns = P + 1 if ones_col else P  # (only the "tn" kernel has a column of ones)
    _GEMM[(trans_a, trans_b)][(blocks(columns, TILE_N), blocks(M, TILE_M)), GEMM_THREADS, stream()](
        c, flat(a), flat(b), Q, bias, mask, extra, has_bias, relu, has_mask, ones_col)


def _matmul(c, a, b, bias, trans_a, trans_b):
    has_bias = bias is not None
    if not has_bias:
        bias = cuda.device_array(1, c.dtype)  # never read; a public call may allocate, a planned step does not
    _gemm(c, a, b, bias, c, bias, trans_a, trans_b, has_bias, False, False, False)


def dense_forward_cuda(y, x, w, b=None):
    """``y = x w^T + b`` on the GPU; the arguments and shapes of ``dense_forward_cpu``."""
    fn = "dense_forward_cuda"
    y, x, w, b = gpu_arrays(fn, y=y, x=x, w=w, b=b)
    check_dense(fn, on_gpu, ("x", x), ("w", w), ("y", y), ("b", b) if b is not None else None)
    _matmul(y, x, w, b, False, True)
    return y


def dense_backward_input_cuda(dx, dy, w):
    """``dx = dy w`` on the GPU; the arguments of ``dense_backward_input_cpu``."""
    fn = "dense_backward_input_cuda"
    dx, dy, w = gpu_arrays(fn, dx=dx, dy=dy, w=w)
    check_dense(fn, on_gpu, ("dx", dx), ("w", w), ("dy", dy))
    _matmul(dx, dy, w, None, False, False)
    return dx


def dense_backward_weight_cuda(dw, dy, x):
    """``dw = dy^T x`` on the GPU; the arguments of ``dense_backward_weight_cpu``."""
    fn = "dense_backward_weight_cuda"
    dw, dy, x = gpu_arrays(fn, dw=dw, dy=dy, x=x)
    check_dense(fn, on_gpu, ("x", x), ("dw", dw), ("dy", dy))
    _matmul(dw, dy, x, None, True, False)
    return dw


def dense_backward_bias_cuda(db, dy):
    """``db = sum_n dy[n, :]`` on the GPU; the arguments of ``dense_backward_bias_cpu``."""
    fn = "dense_backward_bias_cuda"
    db, dy = gpu_arrays(fn, db=db, dy=dy)
    check_dense_bias(fn, on_gpu, db, dy)
    N, OUT = dy.shape
    columns = blocks(OUT, BIAS_COLUMNS)
    parts = reduce_parts(N * BIAS_COLUMNS, columns)  # a block sums REDUCE_THREADS values a pass
    partials, tickets = reduce_scratch(OUT, parts, db.dtype, counters=columns)  # a ticket per column block
    _dense_backward_bias_kernel[(parts, columns), REDUCE_THREADS, stream()](db, dy, partials, tickets)
    return db


def dense_forward_core_cuda(y, x, w, b, relu, ws):
    _gemm(y, x, w, b, y, b, False, True, True, relu, False, False)


def dense_backward_core_cuda(dx, dw, db, dy, x, w, mask, ws):
    if dx is not None:
        _gemm(dx, dy, w, ws.one, x, ws.one, False, False, False, False, mask, False)
    with_bias = db is not None  # the bias gradient is the product's extra column of ones
    _gemm(dw, dy, x, ws.one, dw, db if with_bias else ws.one, True, False, False, False, False, with_bias)


# The simpler product, one output a thread (registry algorithm "tiled"): kept as a reference.


def dense_forward_tiled_core_cuda(y, x, w, b, relu, ws):
    M, P = y.shape
    _matmul_kernel[(blocks(P, TILE), blocks(M, TILE)), (TILE, TILE), stream()](y, x, w, b, y, b, False, True, True, relu,
                                                                     False, False)


def dense_backward_tiled_core_cuda(dx, dw, db, dy, x, w, mask, ws):
    if dx is not None:
        M, P = dx.shape
        _matmul_kernel[(blocks(P, TILE), blocks(M, TILE)), (TILE, TILE), stream()](dx, dy, w, ws.one, x, ws.one, False, False,
                                                                         False, False, mask, False)
    OUT, IN = dw.shape
    with_bias = db is not None
    columns = IN + 1 if with_bias else IN  # the bias gradient is the product's extra column of ones
    _matmul_kernel[(blocks(columns, TILE), blocks(OUT, TILE)), (TILE, TILE), stream()](
        dw, dy, x, ws.one, dw, db if with_bias else ws.one, True, False, False, False, False, with_bias)
