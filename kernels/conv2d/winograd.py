"""3x3 stride-1 convolution on the CPU by Winograd's F(2x2, 3x3): 16 products where the implicit
product (``implicit.py``) does 36 multiply-adds a channel for each 2x2 block of outputs.

The idea is the polynomial product of the lecture, evaluated at points. Multiplying a
polynomial of degree 1 by one of degree 2 coefficient by coefficient takes 6 multiplies;
evaluating both at four points (0, 1, -1 and infinity, where the value is the leading
coefficient), multiplying the four values and interpolating the product (degree 3) back from
them takes 4. A 3-tap filter g slid over 4 inputs d, giving 2 outputs, is that algorithm run
backwards (its transpose): 4 multiplies instead of 6, and in 2-D 16 instead of 36. In matrices,
for one 2x2 output tile of one filter k and channel c, with its 4x4 input tile d and 3x3 filter g:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* element-wise; 16 products instead of 36)

    B^T = | 1  0 -1  0 |     G = | 1    0    0   |     A^T = | 1  1  1  0 |
          | 0  1  1  0 |         | 1/2  1/2  1/2 |           | 0  1 -1 -1 |
          | 0 -1  1  0 |         | 1/2 -1/2  1/2 |
          | 0  1  0 -1 |         | 0    0    1   |

B^T d B evaluates the input tile at the points (rows, then columns), G g G^T the filter, A^T . A
interpolates. Summed over the channels, each of the 16 positions (xi, nu) of the 4x4 tile is a
matrix product over C:

    M[xi, nu] (K, tiles) = U[xi, nu] (K, C) @ V[xi, nu] (C, tiles)     U = G g G^T,  V = B^T d B

and these 16 products run in the register tile of ``kernels/matmul.py``, U packed as A's slivers
once a call, V written by the input transform straight in the layout of B's slivers. The output
transform A^T M A then gives each tile's 2x2 outputs, with the bias and ReLU (or the input
gradient's mask) applied as they are stored. The transforms are additions only.

The tiles of the whole batch are numbered (sample, tile row, tile column) and cut into chunks of
``NB`` (a whole number of NR-column slivers), one chunk a task: small images from several samples
share a chunk, so no sliver is left mostly empty. A chunk's V and M (16 x C x NB and 16 x K x NB
values) stay in the thread's L2 cache between the transforms and the products. Each output is
computed by one task, so the result does not depend on the number of threads.

The input gradient of a 3x3 stride-1 convolution with padding P is the convolution of dy with
the filters flipped, padding 2 - P: the same kernel. The weight gradient takes the three linear
maps backwards: dU[xi, nu] = the sum over all tiles of (A dY A^T)[xi, nu] * V[xi, nu], 16
products over the tiles, and dw = G^T dU G; each thread adds its chunks into a part of its own,
summed in thread order (the same bits for the same number of threads). Rounding: against a
float64 reference, the float32 results are off by 1e-7 to 2e-6 of the largest value on the
tests' shapes (the transforms add up to 16 values with coefficients of 1 and 1/2).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..matmul import (KC, MAX_MR, MAX_NR, TILE, TILE_NAMES, _MR, _NR, _element_pointer, _lanes_below, _literal_tile,
                      _masked, _pick, _splat, _store_all, _vector, lanes, multiply_rows, multiply_sliver, slivers)


# The 16 positions' blocks of U, V and M lie PAD values apart more than their size: blocks a power
# of two apart would fall on the same few sets of the L1 cache, and a transform that writes or
# reads all 16 at once would evict its own lines (measured: the filters' transform 8x slower).
PAD = 16


@njit(inline="always", cache=True)
def apart(size):
    """Distance between two positions' blocks of ``size`` values."""
    return size + PAD


def winograd_applies(x_shape, w_shape, stride, padding, tile=None):
    """Whether F(2x2, 3x3) runs this convolution: 3x3 filters, stride 1, padding at most 2 (the
    input gradient pads by 2 - P), and at least 8 input channels and filters (below that the
    products are too thin for the transforms to pay); then by the tile (``tile`` None: this
    CPU's). ``avx512``: outputs of at least 7 x 7, and without padding of at least 20 x 20. The
    input gradient of an unpadded layer is a full convolution (padding 2), whose plane has more
    tiles than the output (49 against 36 on 13x13 inputs), and the implicit product by pixels
    runs the layer's backward faster below that size (``benchmarks/winograd_vs_implicit.py`` on
    an Intel Xeon: 32->64 13x13 1.20-1.24x faster, 32->32 16x16 1.15x, 128->128 on 3x3 outputs
    1.16x; Winograd 0.88x on 26x26, 0.92x on 14x14 with padding 1, 0.93x on 7x7 with padding 1).
    ``avx2``: 64 channels or more and outputs of 16 x 16 or more: with 8 lanes (and AMD's slow
    masked stores before Zen 4) the transforms cost more than they save, and the implicit
    product measured 1.15-1.46x faster on every other layer of the same benchmark (Zen 3;
    64->64 32x32: Winograd 0.94x of it). The other tiles: always (not measured against the
    implicit product)."""
    K, C, FH, FW = w_shape
    if not ((FH, FW) == (3, 3) and tuple(stride) == (1, 1) and max(padding) <= 2 and min(C, K) >= 8):
        return False
    OH, OW = x_shape[2] + 2 * padding[0] - 2, x_shape[3] + 2 * padding[1] - 2
    name = TILE_NAMES[TILE if tile is None else tile]
    if name == "avx512":
        return OH * OW >= 7 * 7 and (max(padding) >= 1 or OH * OW >= 20 * 20)
    if name == "avx2":
        return C >= 64 and OH * OW >= 16 * 16
    return True


def chunk_room(CK):
    """Slivers of MAX_NR tiles the scratch holds a chunk, for up to CK channels and filters: V and
    M of one chunk (16 x 2CK x NB float32s) in about 1 MB, at least one sliver, at most 8."""
    return max(1, min(8, (1 << 14) // (2 * CK * MAX_NR)))


# ----------------------------------------------------------------------------- the transforms


@njit(inline="always", cache=True)
def at_points(a, b, e, half):
    """The polynomial a + b t + e t^2 at t = 0, 1, -1 and infinity (its leading coefficient), the
    middle two halved: G applied to (a, b, e)."""
    return a, (a + b + e) * half, (a - b + e) * half, e


@njit(inline="always", cache=True)
def tap(w, k, c, i, j, flipped):
    """g[i, j] of filter k, channel c: w[k, c, i, j], or with ``flipped`` the input gradient's
    filters (filter and channel swapped, the window turned by 180 degrees)."""
    return w[c, k, 2 - i, 2 - j] if flipped else w[k, c, i, j]


@njit(inline="always", cache=True)
def transform_filters(u_pack, w, K, C, flipped, MR):
    """U[xi, nu] = (G g G^T)[xi, nu] (K, C) for every filter g of the convolution (``tap``), written
    straight as A's slivers of the 16 products, depth block by depth block: position f's block
    pc starts at f * apart(Kpad * C) + pc * Kpad (Kpad = K rounded up to MR, the rows past K zero).
    One task a sliver of MR filters."""
    Kpad = slivers(K, MR) * MR
    ustride = apart(Kpad * C)
    half = w.dtype.type(0.5)
    zero = w.dtype.type(0)
    for s in prange(slivers(K, MR)):
        for pc in range(0, C, KC):
            block = pc * Kpad + s * min(KC, C - pc) * MR
            for c in range(pc, min(C, pc + KC)):
                for i in range(MR):
                    at = block + (c - pc) * MR + i  # A[k, c] of each position's sliver s
                    k = s * MR + i
                    if k >= K:
                        for f in range(16):
                            u_pack[f * ustride + at] = zero
                        continue
                    c0 = at_points(tap(w, k, c, 0, 0, flipped), tap(w, k, c, 1, 0, flipped),
                                   tap(w, k, c, 2, 0, flipped), half)  # G g: the filter's columns at the points
                    c1 = at_points(tap(w, k, c, 0, 1, flipped), tap(w, k, c, 1, 1, flipped),
                                   tap(w, k, c, 2, 1, flipped), half)
                    c2 = at_points(tap(w, k, c, 0, 2, flipped), tap(w, k, c, 1, 2, flipped),
                                   tap(w, k, c, 2, 2, flipped), half)
                    for xi in range(4):  # (G g) G^T: then each row at the points
                        r = at_points(c0[xi], c1[xi], c2[xi], half)
                        for nu in range(4):
                            u_pack[(xi * 4 + nu) * ustride + at] = r[nu]


# ------------------------------------------------------------- the transforms in vectors
#
# Both transforms work on V tiles side by side, one tile a vector lane (V of the tile's lanes),
# so that a run of adjacent tiles is a few vector instructions. Adjacent tiles are two input
# columns apart: the input transform loads 2V values and takes the even and odd ones apart
# (a shuffle); the output transform interleaves its two output columns the same way. Runs of
# fewer than V tiles store only their lanes (LLVM's masked loads and stores).

@intrinsic(prefer_literal=True)
def input_tiles(typingctx, tile, x, xi, W, col, rows, v, vi, vstride, count):
    """B^T d B for ``count`` (at most V) adjacent tiles, read straight from x: their four input rows
    start at flat offsets xi, xi + W, xi + 2W and xi + 3W (bit r of ``rows`` set where row r is
    inside x, the others read as zeros), tile l at column col + 2l (``col`` may be negative; columns
    outside 0 .. W - 1 read as zeros: masked loads). Position f = xi*4 + nu of tile l goes to
    v[vi + f*vstride + l]."""
    V32 = _literal_tile(tile)[2]
    sig = types.void(tile, x, xi, W, col, rows, v, vi, vstride, count)

    def codegen(context, builder, signature, args):
        _, x_, xi_, W_, col_, rows_, v_, vi_, vstride_, count_ = args
        scalar, V = _vector(signature.args[1], V32)
        vec, wide = ir.VectorType(scalar, V), ir.VectorType(scalar, 2 * V)
        i64 = ir.IntType(64)
        align = ir.Constant(ir.IntType(32), 4)
        zeros = ir.Constant(wide, [0.0] * (2 * V))
        load = _masked(builder, "load", wide)
        start = _element_pointer(context, builder, signature.args[1], x_, xi_)
        lane = ir.Constant(ir.VectorType(i64, 2 * V), list(range(2 * V)))

        def row(r, shift):  # 2V values of row r from column col + shift, zero outside x
            first = builder.add(col_, ir.Constant(i64, shift))
            cols = builder.add(lane, _splat(builder, ir.VectorType(i64, 2 * V), first))
            inside = builder.and_(builder.icmp_signed(">=", cols, ir.Constant(cols.type, [0] * (2 * V))),
                                  builder.icmp_signed("<", cols, _splat(builder, cols.type, W_)))
            ok = builder.icmp_unsigned("!=", builder.and_(rows_, ir.Constant(i64, 1 << r)), ir.Constant(i64, 0))
            inside = builder.and_(inside, _splat(builder, ir.VectorType(ir.IntType(1), 2 * V), ok))
            where = builder.gep(start, [builder.add(builder.mul(W_, ir.Constant(i64, r)), first)])
            return builder.call(load, [builder.bitcast(where, wide.as_pointer()), align, inside, zeros])

        t = []
        for shift in (0, 2):  # B^T d on the values of tiles l (columns 2l, 2l + 1) and l + 1 (2l + 2, 2l + 3)
            d0, d1, d2, d3 = (row(r, shift) for r in range(4))
            t.append((builder.fsub(d0, d2), builder.fadd(d1, d2), builder.fsub(d2, d1), builder.fsub(d1, d3)))
        store = _masked(builder, "store", vec)
        mask = _lanes_below(builder, count_, V)
        out = _element_pointer(context, builder, signature.args[6], v_, vi_)
        for xi in range(4):  # (B^T d) B: each row's columns 2l .. 2l + 3 at the four points
            a, b = _pick(builder, t[0][xi], 0), _pick(builder, t[0][xi], 1)
            e, f = _pick(builder, t[1][xi], 0), _pick(builder, t[1][xi], 1)
            for nu, value in enumerate((builder.fsub(a, e), builder.fadd(b, e), builder.fsub(e, b), builder.fsub(b, f))):
                where = builder.gep(out, [builder.mul(vstride_, ir.Constant(i64, xi * 4 + nu))])
                builder.call(store, [value, builder.bitcast(where, vec.as_pointer()), align, mask])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def output_tiles(typingctx, tile, m, mi, mstride, count, y, yi, ystride, cols, rows, bias, relu, mask, masked):
    """A^T M A for ``count`` (at most V) adjacent tiles: position f of tile l is m[mi + f*mstride + l].
    Their outputs go to the rows of ``y`` at flat offsets yi and yi + ystride (``rows`` of them, 1
    or 2), ``cols`` columns, plus ``bias``, max(., 0) with ``relu``, zero where ``mask`` (the same
    offsets) is not > 0 with ``masked``."""
    V32 = _literal_tile(tile)[2]
    sig = types.void(tile, m, mi, mstride, count, y, yi, ystride, cols, rows, bias, relu, mask, masked)

    def codegen(context, builder, signature, args):
        _, m_, mi_, mstride_, count_, y_, yi_, ystride_, cols_, rows_, bias_, relu_, mask_, masked_ = args
        scalar, V = _vector(signature.args[1], V32)
        vec, wide = ir.VectorType(scalar, V), ir.VectorType(scalar, 2 * V)
        i64 = ir.IntType(64)
        align = ir.Constant(ir.IntType(32), 4)
        zero, zeros = ir.Constant(vec, [0.0] * V), ir.Constant(wide, [0.0] * (2 * V))
        load, load_wide, store = _masked(builder, "load", vec), _masked(builder, "load", wide), _masked(builder, "store", wide)
        start = _element_pointer(context, builder, signature.args[1], m_, mi_)
        in_run = _lanes_below(builder, count_, V)
        pos = [builder.call(load, [builder.bitcast(builder.gep(start, [builder.mul(mstride_, ir.Constant(i64, f))]),
                                                   vec.as_pointer()), align, in_run, zero]) for f in range(16)]
        b = _splat(builder, vec, bias_)
        in_cols = _lanes_below(builder, cols_, 2 * V)
        interleave = ir.Constant(ir.VectorType(ir.IntType(32), 2 * V), [i // 2 + (i % 2) * V for i in range(2 * V)])
        out = _element_pointer(context, builder, signature.args[5], y_, yi_)
        gate = _element_pointer(context, builder, signature.args[12], mask_, yi_)
        for i in range(2):  # A^T down the columns: (1, 1, 1, 0) for output row 0, (0, 1, -1, -1) for row 1
            if i == 0:
                s = [builder.fadd(builder.fadd(pos[nu], pos[4 + nu]), pos[8 + nu]) for nu in range(4)]
            else:
                s = [builder.fsub(builder.fsub(pos[4 + nu], pos[8 + nu]), pos[12 + nu]) for nu in range(4)]
            left = builder.fadd(builder.fadd(builder.fadd(s[0], s[1]), s[2]), b)  # then along the row
            right = builder.fadd(builder.fsub(builder.fsub(s[1], s[2]), s[3]), b)
            value = builder.shuffle_vector(left, right, interleave)
            value = builder.select(relu_, builder.select(builder.fcmp_ordered("<", value, zeros), zeros, value), value)
            lanes = builder.and_(in_cols, _splat(builder, ir.VectorType(ir.IntType(1), 2 * V),
                                                 builder.icmp_signed("<", ir.Constant(i64, i), rows_)))
            offset = builder.mul(ystride_, ir.Constant(i64, i))
            kept = builder.call(load_wide, [builder.bitcast(builder.gep(gate, [offset]), wide.as_pointer()), align,
                                            builder.and_(lanes, _splat(builder, ir.VectorType(ir.IntType(1), 2 * V),
                                                                       masked_)), zeros])
            value = builder.select(masked_, builder.select(builder.fcmp_ordered(">", kept, zeros), value, zeros), value)
            builder.call(store, [value, builder.bitcast(builder.gep(out, [offset]), wide.as_pointer()), align, lanes])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def gradient_tiles(typingctx, tile, dy, di, plane, OW, right, below, dm, mi, mstride, count):
    """A dY A^T for one tile and ``count`` (at most V) filters side by side: filter l's 2x2 block of
    dy starts at flat offset di + l*plane (its right column read where ``right``, its lower row
    where ``below``, zeros otherwise); position f goes to dm[mi + f*mstride + l]. The filters'
    values are ``plane`` apart: each lane is loaded on its own."""
    V32 = _literal_tile(tile)[2]
    sig = types.void(tile, dy, di, plane, OW, right, below, dm, mi, mstride, count)

    def codegen(context, builder, signature, args):
        _, dy_, di_, plane_, OW_, right_, below_, dm_, mi_, mstride_, count_ = args
        scalar, V = _vector(signature.args[1], V32)
        vec = ir.VectorType(scalar, V)
        i64 = ir.IntType(64)
        zero = ir.Constant(vec, [0.0] * V)
        start = _element_pointer(context, builder, signature.args[1], dy_, di_)
        last = builder.sub(count_, ir.Constant(i64, 1))

        def block(shift):  # dy at offset ``shift`` from each filter's block (lanes past count: the last one's)
            value = ir.Constant(vec, ir.Undefined)
            for lane in range(V):
                k = builder.select(builder.icmp_signed("<", ir.Constant(i64, lane), count_), ir.Constant(i64, lane), last)
                where = builder.gep(start, [builder.add(builder.mul(k, plane_), shift)])
                value = builder.insert_element(value, builder.load(where), ir.Constant(ir.IntType(32), lane))
            return value

        one = ir.Constant(i64, 1)
        y00 = block(ir.Constant(i64, 0))
        y01 = builder.select(right_, block(builder.select(right_, one, ir.Constant(i64, 0))), zero)
        y10 = builder.select(below_, block(builder.select(below_, OW_, ir.Constant(i64, 0))), zero)
        corner = builder.and_(right_, below_)
        y11 = builder.select(corner, block(builder.select(corner, builder.add(OW_, one), ir.Constant(i64, 0))), zero)
        rows = ((y00, y01), (builder.fadd(y00, y10), builder.fadd(y01, y11)), (builder.fsub(y00, y10), builder.fsub(y01, y11)),
                (builder.fsub(zero, y10), builder.fsub(zero, y11)))  # A dY
        out = _element_pointer(context, builder, signature.args[7], dm_, mi_)
        stores = []
        for xi, (a, b) in enumerate(rows):  # (A dY) A^T
            for nu, value in enumerate((a, builder.fadd(a, b), builder.fsub(a, b), builder.fsub(zero, b))):
                where = builder.gep(out, [builder.mul(mstride_, ir.Constant(i64, xi * 4 + nu))])
                stores.append((value, builder.bitcast(where, vec.as_pointer())))
        _store_all(builder, stores, count_)
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------------------------------------ the kernel


@njit(inline="always", cache=True)
def segment(q, end, TT, TW, NR):
    """The run of tiles from global tile q on that lies in one tile row and one sliver of its
    chunk (``end``: the chunk's end, tiles numbered over the whole batch): (sample, tile row, first
    tile column, count). Cutting the run at a sliver's end is the caller's."""
    n, rest = q // TT, q % TT
    th, tw = rest // TW, rest % TW
    return n, th, tw, min(TW - tw, end - q)


@njit(inline="always", cache=True)
def transform_input(tile, v, vstride, x, n, th, tw0, cnt, s, j0, ph, pw):
    """V[xi*4 + nu][s, c, j0 + j] = (B^T d B)[xi, nu] for the tiles tw0 .. tw0 + cnt - 1 (at most NR)
    of tile row th of sample n, every channel c; d is the 4x4 input from row 2*th - ph and column
    2*tw - pw, zero outside x. Position f's block of V, (S, C, NR), starts at v[f * vstride]."""
    V = lanes(tile, x)
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    NR = _NR[tile]
    ih0 = 2 * th - ph
    rows = 0
    for r in range(4):
        if 0 <= ih0 + r < H:
            rows |= 1 << r
    xflat = x.reshape(-1)
    for c in range(C):
        xi = ((n * C + c) * H + ih0) * W
        for j in range(0, cnt, V):
            input_tiles(tile, xflat, xi, W, 2 * (tw0 + j) - pw, rows, v, (s * C + c) * NR + j0 + j, vstride,
                        min(V, cnt - j))


@njit(inline="always", cache=True)
def transform_output(tile, y, m, mstride, NB, n, th, tw0, cnt, q0, bias, relu, mask, masked):
    """y[n, k, 2*th + i, 2*tw + j] = (A^T M A)[i, j] + bias[k] for the tiles tw0 .. tw0 + cnt - 1 of
    tile row th, M[xi, nu] = m[(xi*4 + nu) * mstride + k*NB + q0 + tw - tw0]; max(., 0) with ``relu``,
    times mask > 0 with ``masked`` (``mask`` is read only then). Outputs past y's edge (odd OH or
    OW) are dropped."""
    V = lanes(tile, y)
    K, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    rows = min(2, OH - 2 * th)
    yflat, maskflat = y.reshape(-1), mask.reshape(-1)
    for k in range(K):
        row = ((n * K + k) * OH + 2 * th) * OW
        for j in range(0, cnt, V):
            ow = 2 * (tw0 + j)
            run = min(V, cnt - j)
            output_tiles(tile, m, k * NB + q0 + j, mstride, run, yflat, row + ow, OW, min(2 * run, OW - ow), rows,
                         bias[k], relu, maskflat, masked)


@njit(inline="always", cache=True)
def winograd_body(tile, y, x, w, flipped, b, ph, pw, relu, mask, masked, S, u_pack, vs, ms, edges):
    """y (N, K, OH, OW) = the 3x3 stride-1 convolution of x (N, C, H, W) with w (K, C, 3, 3) (or
    with ``flipped`` the input gradient's filters of w (C, K, 3, 3): see ``tap``), padding (ph,
    pw), plus b, then ReLU / mask as ``transform_output`` says. Scratch: ``u_pack`` (the filters
    transformed and packed), and per thread ``vs`` (room for V: 16 blocks of S x C x NR, S
    slivers a chunk), ``ms`` (M: 16 blocks of K x S*NR) and ``edges``."""
    MR, NR = _MR[tile], _NR[tile]
    N, C = x.shape[0], x.shape[1]
    K, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    TT = TH * TW
    NB = S * NR
    Kpad = slivers(K, MR) * MR
    ustride, vstride, mstride = apart(Kpad * C), apart(S * C * NR), apart(K * NB)
    transform_filters(u_pack, w, K, C, flipped, MR)
    total = N * TT
    for chunk in prange(slivers(total, NB)):
        t = numba.get_thread_id()
        v, m = vs[t], ms[t]
        start, end = chunk * NB, min(total, chunk * NB + NB)
        q = start
        while q < end:  # V: the input transform, a run of tiles in one row and one sliver at a time
            n, th, tw, cnt = segment(q, end, TT, TW, NR)
            local = q - start
            cnt = min(cnt, NR - local % NR)
            transform_input(tile, v, vstride, x, n, th, tw, cnt, local // NR, local % NR, ph, pw)
            q += cnt
        for f in range(16):  # M = U V, position by position, sliver by sliver
            for s in range(slivers(end - start, NR)):
                for pc in range(0, C, KC):
                    kc = min(KC, C - pc)
                    multiply_sliver(tile, u_pack[f * ustride + pc * Kpad:], v[f * vstride + (s * C + pc) * NR:],
                                    m[f * mstride:f * mstride + K * NB].reshape(K, NB), s * NR, kc, pc > 0, edges[t])
        q = start
        while q < end:  # Y = A^T M A, a run of tiles in one row at a time
            n, th, tw, cnt = segment(q, end, TT, TW, NR)
            transform_output(tile, y, m, mstride, NB, n, th, tw, cnt, q - start, b, relu, mask, masked)
            q += cnt


@njit(inline="always", cache=True)
def from_points(a, b, e, f, half):
    """G^T applied to the values at the points 0, 1, -1, infinity: the way back of ``at_points``."""
    return a + (b + e) * half, (b - e) * half, (b + e) * half + f


@njit(inline="always", cache=True)
def transform_gradient(tile, dm, dstride, KS, dy, n, th, tw0, cnt, s, j0):
    """dM[xi*4 + nu][s, k // NR, j0 + j, k % NR] = (A dY A^T)[xi, nu] for the tiles tw0 .. tw0 + cnt - 1
    of tile row th of sample n and every filter k, dY the tile's 2x2 block of dy (zero past its
    edge): the output transform's way back, filters side by side (B's slivers of the weight
    gradient's product). Position f's block, (S, KS, NR, NR), starts at dm[f * dstride]."""
    V = lanes(tile, dy)
    K, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    NR = _NR[tile]
    oh = 2 * th
    dyflat = dy.reshape(-1)
    for j in range(cnt):
        ow = 2 * (tw0 + j)
        corner = ((n * K) * OH + oh) * OW + ow
        for k in range(0, K, V):
            at = ((s * KS + k // NR) * NR + j0 + j) * NR + k % NR
            gradient_tiles(tile, dyflat, corner + k * OH * OW, OH * OW, OW, ow + 1 < OW, oh + 1 < OH, dm, at, dstride,
                           min(V, K - k))


@njit(inline="always", cache=True)
def winograd_weight_gradient_body(tile, dw, dy, x, ph, pw, S, vs, dms, starts_scratch, edges, parts):
    """dw (K, C, 3, 3) = the weight gradient of the 3x3 stride-1 convolution, through the transforms
    taken backwards: dU[xi, nu] = sum over the tiles of (A dY A^T)[xi, nu] * V[xi, nu], then
    dw = G^T dU G. Each chunk's 16 products dU^T (C, K) += V (C, tiles) @ dM^T (tiles, K) read V
    in place as A's rows (``multiply_rows``) and the gradient's transform as B's slivers; each
    thread adds into its own ``parts[t]`` (16, C, K), summed in thread order at the end."""
    NR = _NR[tile]
    N, C = x.shape[0], x.shape[1]
    K, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    TT = TH * TW
    NB = S * NR
    KS = slivers(K, NR)
    vstride, dstride = apart(S * C * NR), apart(S * KS * NR * NR)
    threads = parts.shape[0]
    starts = starts_scratch[:2 * (C + MAX_MR)].view(np.int64)
    for c in range(C + MAX_MR):  # A's rows: channel c of a sliver of V
        starts[c] = c * NR
    fresh = starts_scratch[2 * (C + MAX_MR):].view(np.int64)  # whether thread t has yet to zero its part
    for t in range(threads):
        fresh[t] = 1
    total = N * TT
    for chunk in prange(slivers(total, NB)):
        t = numba.get_thread_id()
        if fresh[t]:  # the thread's first chunk: only this thread reads or writes fresh[t] and parts[t]
            parts[t] = 0
            fresh[t] = 0
        v, dm = vs[t], dms[t]
        start, end = chunk * NB, min(total, chunk * NB + NB)
        q = start
        while q < end:  # V and dM, a run of tiles in one row and one sliver at a time
            n, th, tw, cnt = segment(q, end, TT, TW, NR)
            local = q - start
            cnt = min(cnt, NR - local % NR)
            transform_input(tile, v, vstride, x, n, th, tw, cnt, local // NR, local % NR, ph, pw)
            transform_gradient(tile, dm, dstride, KS, dy, n, th, tw, cnt, local // NR, local % NR)
            q += cnt
        for f in range(16):
            for s in range(slivers(end - start, NR)):
                kc = min(NR, end - start - s * NR)  # the sliver's tiles: the products' depth
                for ks in range(KS):
                    multiply_rows(tile, v, f * vstride + s * C * NR, starts, dm[f * dstride + (s * KS + ks) * NR * NR:],
                                  parts[t, f], ks * NR, kc, True, edges[t])
    half = dw.dtype.type(0.5)
    for c in prange(C):  # parts[t, f, c] is a run over k: read along it
        for k in range(K):
            r0, r1 = row_from_points(parts, fresh, 0, c, k, half), row_from_points(parts, fresh, 1, c, k, half)
            r2, r3 = row_from_points(parts, fresh, 2, c, k, half), row_from_points(parts, fresh, 3, c, k, half)
            for j in range(3):  # then down each column: dw = G^T dU G
                out = from_points(r0[j], r1[j], r2[j], r3[j], half)
                for i in range(3):
                    dw[k, c, i, j] = out[i]


@njit(inline="always", cache=True)
def row_from_points(parts, fresh, xi, c, k, half):
    """Row xi of dU G for filter k and channel c: the threads' parts summed, then G^T on the row."""
    return from_points(summed(parts, fresh, xi * 4, c, k), summed(parts, fresh, xi * 4 + 1, c, k),
                       summed(parts, fresh, xi * 4 + 2, c, k), summed(parts, fresh, xi * 4 + 3, c, k), half)


@njit(inline="always", cache=True)
def summed(parts, fresh, f, c, k):
    """parts[:, f, c, k] added in thread order, the parts of threads that took no chunk left out."""
    total = parts.dtype.type(0)
    for t in range(parts.shape[0]):
        if not fresh[t]:
            total += parts[t, f, c, k]
    return total


def _compiled_for(tile):
    @njit(parallel=True, cache=True)
    def forward(y, x, w, b, ph, pw, relu, S, u_pack, vs, ms, edges):
        winograd_body(tile, y, x, w, False, b, ph, pw, relu, y, False, S, u_pack, vs, ms, edges)

    @njit(parallel=True, cache=True)
    def backward_input(dx, dy, w, zeros, ph, pw, x, masked, S, u_pack, vs, ms, edges):
        winograd_body(tile, dx, dy, w, True, zeros, 2 - ph, 2 - pw, False, x, masked, S, u_pack, vs, ms, edges)

    @njit(parallel=True, cache=True)
    def backward_weight(dw, dy, x, ph, pw, S, vs, dms, starts, edges, parts):
        winograd_weight_gradient_body(tile, dw, dy, x, ph, pw, S, vs, dms, starts, edges, parts)

    return forward, backward_input, backward_weight


# One set of compiled kernels per tile (the tile a constant in each: see kernels/matmul.py)
_KERNELS = tuple(_compiled_for(tile) for tile in range(len(TILE_NAMES)))


def winograd_workspace(x_shape, w_shape, need_dx):
    """{name: shape} of the scratch for the forward, the weight gradient (and with ``need_dx`` the
    input gradient): the transformed filters as A's slivers, the weight gradient's row offsets,
    and for each of Numba's threads a chunk's V and M (or dM), an edge tile and its own part of
    the weight gradient. Sized for any tile (any NR up to MAX_NR)."""
    C = x_shape[1]
    K = w_shape[0]
    threads = numba.config.NUMBA_NUM_THREADS
    CK = max(C, K)  # the input gradient swaps the two
    S = chunk_room(CK)
    shapes = {
        "wg_u_pack": (16 * ((CK + MAX_MR) * CK + PAD),),
        "wg_v": (threads, 16 * (S * CK * MAX_NR + PAD) + MAX_MR * MAX_NR),  # the weight gradient reads MR rows past C
        "wg_m": (threads, 16 * ((CK + MAX_NR) * S * MAX_NR + PAD)),  # M, or dM (K up to whole slivers)
        "wg_edges": (threads, MAX_MR * MAX_NR),
        "wg_starts": (2 * (C + MAX_MR + threads),),  # int64s (two float32s each): row offsets, then a flag a thread
        "wg_parts": (threads, 16, C, K),
    }
    if need_dx:
        shapes["wg_zeros"] = (C,)
    return shapes


def _slivers_a_chunk(ws, y_shape, tile):
    """Slivers of NR tiles a chunk: at most what the scratch holds, and such that the chunks come
    in whole rounds of Numba's threads (a parallel loop hands each thread a run of them)."""
    CK = max(ws.wg_parts.shape[2], ws.wg_parts.shape[3])
    room = chunk_room(CK)
    N, _, OH, OW = y_shape
    total = -(-N * ((OH + 1) // 2) * ((OW + 1) // 2) // int(_NR[TILE if tile is None else tile]))  # slivers
    threads = numba.get_num_threads()
    rounds = -(-total // (threads * room))
    return max(1, -(-total // (threads * rounds)))


def conv2d_forward_winograd_core(y, x, w, b, ph, pw, relu, ws, tile=None):
    """y = conv(x, w) + b (3x3, stride 1, padding ph, pw), max(., 0) with ``relu``; ``ws`` from
    ``winograd_workspace``, ``tile`` a tile's index (None: this CPU's)."""
    forward = _KERNELS[TILE if tile is None else tile][0]
    forward(y, x, w, b, ph, pw, relu, _slivers_a_chunk(ws, y.shape, tile), ws.wg_u_pack, ws.wg_v, ws.wg_m,
            ws.wg_edges)


def winograd_weight_gradient(dw, dy, x, ph, pw, ws, tile=None):
    """dw = the weight gradient of that convolution (``winograd_weight_gradient_body``)."""
    backward_weight = _KERNELS[TILE if tile is None else tile][2]
    backward_weight(dw, dy, x, ph, pw, _slivers_a_chunk(ws, dy.shape, tile), ws.wg_v, ws.wg_m, ws.wg_starts,
                    ws.wg_edges, ws.wg_parts)


def winograd_input_gradient(dx, dy, w, x, ph, pw, mask, ws, tile=None):
    """dx = the input gradient of that convolution (the convolution of dy with the flipped filters,
    padding 2 - P), times x > 0 with ``mask`` (``x`` is read only then)."""
    backward_input = _KERNELS[TILE if tile is None else tile][1]
    ws.wg_zeros[:] = 0
    backward_input(dx, dy, w, ws.wg_zeros, ph, pw, x, bool(mask), _slivers_a_chunk(ws, dx.shape, tile),
                   ws.wg_u_pack, ws.wg_v, ws.wg_m, ws.wg_edges)


def winograd_scratch(x_shape, w_shape, need_dx, dtype):
    """Fresh scratch arrays for the Winograd kernels (tests, and calls outside a planned step)."""
    from types import SimpleNamespace

    shapes = winograd_workspace(x_shape, w_shape, need_dx)
    return SimpleNamespace(**{name: np.empty(shape, dtype) for name, shape in shapes.items()})
