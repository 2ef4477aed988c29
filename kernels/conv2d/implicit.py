"""2-D convolution on the CPU as an implicit matrix product: the micro-kernel (``kernels/matmul.py``)
reads the patches where they lie, in the padded input; no im2col matrix is written, and no
sliver of patches either.

Stride 1. A sample's input, zero-padded to HP x WP planes, is one flat run of values: tap
(c, fh, fw) of output (oh, ow) reads it at (c*HP + fh)*WP + fw + (oh*WP + ow). Give the output
the padded row length WP too (its last FW - 1 columns are never kept) and, tap by tap, the
patches matrix of im2col is the flat input shifted by the tap's offset:

    patches[r, q] = xpad[offset(r) + q]      r = (c, fh, fw),  q = oh*WP + ow,  offset(r) = (c*HP + fh)*WP + fw

so NR adjacent columns of it are NR adjacent input values for each tap: the micro-kernel takes
B's row r straight from xpad at offset(r) (``microkernel_gather``), the padded sample staying in
L1 or L2. Or the other way round, each output pixel q = (oh, ow) a row of the tile, its window at
pix(q) = oh*WP + ow: patches[r, q] = xpad[pix(q) + offset(r)], MR pixels read through both
tables (``microkernel_indirect``), no padding column computed and the filters as B's columns
(``pixel_product``; ``pixel_rows`` picks the way round that keeps more of the tiles' work). The
three products, per sample n:

    forward          y[n]  (K, OH*WP)   = w (K, C*FH*FW) @ patches          (+ bias, ReLU when stored)
                     or y[n]^T (OH*OW, K) = patches^T @ w^T, by pixels
    backward input   dx[n]              = patches^T of (w^T (C*FH*FW, K) @ dy[n] (K, OH*WP)): each
                                          tile of the product added back along its rows' taps into
                                          the padded gradient (``microkernel_scatter``; with few
                                          filters, the filter's columns folded into the depth:
                                          ``fold_product``); or, where
                                          the padding is at least half the filter, the full
                                          convolution of dy padded by F - 1 - P with the filters
                                          flipped, w'[c, k, fh, fw] = w[k, c, FH-1-fh, FW-1-fw], as the
                                          forward; times x > 0 with ``mask``
    backward weight  dw^T  (C*FH*FW, K) += patches (C*FH*FW, OH*OW) @ dy[n]^T, the depth over the
                                          pixels through pix(q) (summed over the samples)

Threads take whole samples: each pads its sample into its own buffer, multiplies, and stores
its sample's output (forward, input gradient) or adds into its own copy of dw, summed in a
fixed order at the end (weight gradient): no two threads write one element, and the same thread
count gives the same bits. The products by pixels take small samples a group at a time
(``sample_group``): the group's pixels are one product's rows (or depth), so the filters are
read once for the group, not once for each few pixels. Every buffer comes from the caller
(``implicit_workspace``).
"""

import numba
import numpy as np
from numba import njit, prange

from ..matmul import (HALF_NR, KC, MAX_MR, MAX_NR, TILE, TILE_NAMES, _MR, _NR, lanes, microkernel_fold,
                      microkernel_gather, microkernel_indirect, microkernel_scatter, pack_a, pack_b, slivers, store_run)

# ----------------------------------------------------------------------------- shared pieces


def implicit_applies(w_shape, stride, padding):
    """Whether the implicit kernels run this convolution: stride 1, and padding under the filter's
    size (the input gradient's full convolution pads by F - 1 - P)."""
    FH, FW = w_shape[2], w_shape[3]
    return tuple(stride) == (1, 1) and padding[0] < FH and padding[1] < FW


@njit(inline="always", cache=True)
def pad_sample(xp, x, n, ph, pw):
    """xp = sample n of x (N, C, H, W) with a zero border, planes of (H + 2*ph) x (W + 2*pw) flat;
    the values after the last plane are zero too (slivers read up to NR + FW past it)."""
    N, C, H, W = x.shape
    HP, WP = H + 2 * ph, W + 2 * pw
    zero = xp.dtype.type(0)
    for c in range(C):
        plane = c * HP * WP
        for i in range(ph * WP):  # the rows above and below
            xp[plane + i] = zero
            xp[plane + (HP - ph) * WP + i] = zero
        for i in range(H):
            o = plane + (i + ph) * WP
            row = x[n, c, i]
            for j in range(pw):  # left and right of the row
                xp[o + j] = zero
                xp[o + pw + W + j] = zero
            for j in range(W):
                xp[o + pw + j] = row[j]
    for i in range(C * HP * WP, xp.shape[0]):
        xp[i] = zero


@njit(inline="always", cache=True)
def samples_for_pixels(xpads, t, x, n0, count, ph, pw):
    """Samples n0 .. n0 + count - 1 of x as the products by pixels read them
    (``microkernel_indirect``: every window inside its padded sample, nothing read past the
    last): x's own values, flat, where there is no padding, with no copy; else padded one after
    the other into the thread's xpads[t] (``pad_sample``), a padded sample's values apart."""
    N, C, H, W = x.shape
    if ph == 0 and pw == 0:
        return x.reshape(N * C * H * W)[n0 * C * H * W:(n0 + count) * C * H * W]
    xp = xpads[t]
    S = C * (H + 2 * ph) * (W + 2 * pw)
    for g in range(count):
        pad_sample(xp[g * S:(g + 1) * S], x, n0 + g, ph, pw)
    return xp


@njit(inline="always", cache=True)
def tap_offsets(scratch, C, FH, FW, HP, WP):
    """offset(r) = (c*HP + fh)*WP + fw of every tap r = (c, fh, fw), then MAX_MR zeros (rows past
    the last tap read the sample's first values; their results are dropped): int64s in a scratch
    array of the layer's dtype, viewed as int64."""
    taps = scratch.view(np.int64)
    r = 0
    for c in range(C):
        for fh in range(FH):
            for fw in range(FW):
                taps[r] = (c * HP + fh) * WP + fw
                r += 1
    for i in range(MAX_MR):
        taps[r + i] = 0
    return taps


@njit(inline="always", cache=True)
def pack_weights(tile, a_pack, wf):
    """The filters wf (K, R) as A's slivers, depth block by depth block: block pc starts at
    pc * Kpad (Kpad = K rounded up to MR)."""
    MR = _MR[tile]
    K, R = wf.shape
    Kpad = slivers(K, MR) * MR
    for s in prange(slivers(K, MR)):
        for pc in range(0, R, KC):
            kc = min(KC, R - pc)
            pack_a(tile, a_pack, pc * Kpad + s * kc * MR, wf, s * MR, K, pc, kc, False)


@njit(inline="always", cache=True)
def unpad_sample(tile, dx, n, dxp, ph, pw, x, masked):
    """dx[n] = the inside of the padded gradient dxp (rows of W + 2*pw, planes of H + 2*ph rows),
    times x[n] > 0 with ``masked`` (``x`` is read only then): a row at a time in vector runs."""
    C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    HP, WP = H + 2 * ph, W + 2 * pw
    V = lanes(tile, dx)
    zero = dx.dtype.type(0)
    for c in range(C):
        for i in range(H):
            at = ((n * C + c) * H + i) * W
            for j in range(0, W, V):
                store_run(tile, dx, at + j, dxp, (c * HP + i + ph) * WP + pw + j, min(V, W - j), zero, False, x,
                          masked)


@njit(inline="always", cache=True)
def store_sample(tile, y, n, plane, b, relu, mask, masked, WP):
    """y[n, k, oh, ow] = plane[k, oh*WP + ow] + b[k], max(., 0) with ``relu``, times mask[n, k, oh, ow] > 0
    with ``masked``: a row at a time in runs of the tile's vectors (``store_run``)."""
    K, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    V = lanes(tile, y)
    for k in range(K):
        for oh in range(OH):
            at = ((n * K + k) * OH + oh) * OW
            for ow in range(0, OW, V):
                store_run(tile, y, at + ow, plane[k], oh * WP + ow, min(V, OW - ow), b[k], relu, mask, masked)


@njit(inline="always", cache=True)
def whole_tiles(scratch, rows, cols, MR, NR):
    """scratch's first values as a (rows, cols) matrix rounded up to whole MR x NR tiles: the
    micro-kernel stores every tile straight into it, none through an edge buffer."""
    R, Q = slivers(rows, MR) * MR, slivers(cols, NR) * NR
    return scratch[:R * Q].reshape(R, Q)


def tiles_size(rows, cols):
    """Values ``whole_tiles`` needs for any tile."""
    return (rows + MAX_MR) * (cols + MAX_NR)


@njit(inline="always", cache=True)
def gather_product(tile, plane, xp, a_pack, taps, R, Q, Kpad):
    """plane (Kpad, Q in whole tiles) = the packed filters (``pack_weights``) @ the patches of the
    padded sample xp, the patches read in place: for NR adjacent columns of the plane, tap r's row
    of B is NR adjacent values of xp from the tap's offset (``microkernel_gather``); the last
    sliver takes a half tile where it is no wider than one."""
    MR, NR, HALF = _MR[tile], _NR[tile], HALF_NR[tile]
    ldc = plane.shape[1]
    for pc in range(0, R, KC):
        kc = min(KC, R - pc)
        for q0 in range(0, Q, NR):
            half = HALF < NR and Q - q0 <= HALF
            for i in range(0, Kpad, MR):
                ai = pc * Kpad + i * kc
                if half:
                    microkernel_gather(tile, True, kc, a_pack, ai, xp, q0, taps, pc, plane, i * ldc + q0, ldc, pc > 0)
                else:
                    microkernel_gather(tile, False, kc, a_pack, ai, xp, q0, taps, pc, plane, i * ldc + q0, ldc, pc > 0)


# The same product with the output pixels as the tile's rows. The gather above gives the tile's
# rows to the filters and its columns to NR adjacent values of a padded output row: a 10 x 10
# output from a 14-wide padded input keeps 100 of every 140 columns it computes, and 32 filters
# fill 32 of 36 rows of a 6-row tile (62% of the work kept). Turned round,
#
#     plane (OH*OW, K) = patches^T (OH*OW, C*FH*FW) @ w^T (C*FH*FW, K)
#
# row i of a tile is any output pixel q, its window starting at pix[q] = oh*WP + ow in the padded
# sample, and step p adds tap p, at taps[p] from every window's start: A[i, p] = xp[pix[q0 + i] +
# taps[p]], read in place through the two tables (``microkernel_indirect``). The MR pixels need
# not share an image row, so only the last tile of a sample has rows to spare; the filters, as
# B's packed columns, fill whole vectors wherever K is a multiple of one. The plane comes out
# transposed (pixel-major) and is stored back filter by filter.


@njit(inline="always", cache=True)
def pixel_offsets(scratch, OH, OW, WP, group, S):
    """pix[g*OH*OW + q] = g*S + oh*WP + ow, where output pixel q = oh*OW + ow of the g-th of
    ``group`` samples has its window in the padded samples laid S values apart
    (``samples_for_pixels``): int64s in a scratch array of the layer's dtype, viewed as int64."""
    pix = scratch.view(np.int64)
    q = 0
    for g in range(group):
        for oh in range(OH):
            for ow in range(OW):
                pix[q] = g * S + oh * WP + ow
                q += 1
    return pix


@njit(inline="always", cache=True)
def window_starts(pix, q0, last):
    """The tile rows' windows for pixels q0 .. q0 + MAX_MR - 1: pix's entries, those past ``last``
    (a last tile's spare rows, whose results are dropped) reading the last pixel's window."""
    return (pix[min(q0, last)], pix[min(q0 + 1, last)], pix[min(q0 + 2, last)], pix[min(q0 + 3, last)],
            pix[min(q0 + 4, last)], pix[min(q0 + 5, last)], pix[min(q0 + 6, last)], pix[min(q0 + 7, last)])


@njit(inline="always", cache=True)
def pack_filter_columns(tile, b_pack, wf):
    """The filters wf (K, R) as B's slivers for ``pixel_product``: sliver s (filters s*NR ..) at
    s * R * NR, b_pack[s*R*NR + p*NR + j] = wf[s*NR + j, p], zero for filters past the last."""
    NR = _NR[tile]
    K, R = wf.shape
    for s in range(slivers(K, NR)):
        pack_b(tile, b_pack, s * R * NR, wf, s * NR, K, 0, R, False)


@njit(inline="always", cache=True)
def even_blocks(depth):
    """The depth of each block when ``depth`` is cut into as few blocks of at most KC as it takes,
    all about equal: 288 as 144 + 144, not 256 + 32 (each block stores its tiles once more)."""
    return slivers(depth, slivers(depth, KC))


@njit(inline="always", cache=True)
def last_half(tile, n):
    """Whether the last of the NR-wide slivers over n columns fits the tile's half (``HALF_NR``)."""
    NR, HALF = _NR[tile], HALF_NR[tile]
    return HALF < NR and slivers(n, NR) * NR - n >= NR - HALF


@njit(inline="always", cache=True)
def pixel_product(tile, plane, ldc, xp, b_pack, pix, taps, R, P, K):
    """plane (P pixels in whole tiles, rows ``ldc`` apart) = the patches of the padded samples xp
    (``pix``: where each pixel's window starts), pixel by pixel, @ the filters packed by
    ``pack_filter_columns``: MR pixels x NR filters a tile (``microkernel_indirect``), the last
    sliver of filters as a half tile where it fits one."""
    MR, NR = _MR[tile], _NR[tile]
    columns = slivers(K, NR)
    half = last_half(tile, K)
    block = even_blocks(R)
    for pc in range(0, R, block):
        kc = min(block, R - pc)
        for s in range(columns):
            bi = (s * R + pc) * NR
            for q0 in range(0, P, MR):
                rows = window_starts(pix, q0, P - 1)
                if half and s == columns - 1:
                    microkernel_indirect(tile, True, kc, xp, rows, taps, pc, b_pack, bi, plane, q0 * ldc + s * NR, ldc,
                                         pc > 0)
                else:
                    microkernel_indirect(tile, False, kc, xp, rows, taps, pc, b_pack, bi, plane, q0 * ldc + s * NR, ldc,
                                         pc > 0)


@njit(inline="always", cache=True)
def store_pixels(y, n, plane, ldc, b, relu, mask, masked):
    """y[n, k, oh, ow] = plane[q, k] + b[k] for pixel q = oh*OW + ow, then ReLU and the mask as
    ``store_run`` applies them (a NaN stays through the ReLU): the pixel-major plane turned back
    into the layer's filter planes."""
    N, K = y.shape[0], y.shape[1]
    P = y.shape[2] * y.shape[3]
    out, keep = y.reshape(N, K, P), mask.reshape(N, K, P)
    zero = y.dtype.type(0)
    for k in range(K):
        bk = b[k]
        for q in range(P):
            v = plane[q * ldc + k] + bk
            if relu and v < zero:
                v = zero
            if masked and not keep[n, k, q] > zero:
                v = zero
            out[n, k, q] = v


# A sample's pixels are few in the last layers of a network (a 3x3 output: 9 pixels, two tiles of
# six rows), and a task of one sample then reads all the filters (128 x 128 x 9 values: 590 KB,
# more than L2) for those two tiles, and the weight gradient adds a depth of 9 pixels into the
# whole of its copy of dw. A task takes ``sample_group`` samples instead: their pixels, in one
# table, are the rows of one product (the forward) or its depth (the weight gradient), and the
# filters and dw are read once for the group.
GROUP_PIXELS = 192  # a task's pixels at least, where its samples have fewer
GROUP_VALUES = 1 << 16  # and at most this many values of padded samples (256 KB of float32)


def sample_group(N, pixels, sample, threads=None):
    """Samples a task of the products by pixels takes: enough for GROUP_PIXELS output pixels
    (``pixels`` a sample) within GROUP_VALUES values of padded samples (``sample`` a sample), as
    many tasks on each of Numba's threads, and the samples spread evenly over them (64 samples of
    9 pixels on 2 threads: 4 tasks of 16; 100 samples: 6 tasks of 17, the last of 15)."""
    threads = numba.config.NUMBA_NUM_THREADS if threads is None else threads
    if pixels >= GROUP_PIXELS or N <= threads:
        return 1
    group = min(-(-GROUP_PIXELS // pixels), max(1, GROUP_VALUES // sample), -(-N // threads))
    tasks = threads * -(-N // (threads * group))
    return -(-N // tasks)


def pixel_rows(K, OH, OW, WP, tile=None, group=1):
    """Whether the forward's product takes the output pixels as its tile's rows
    (``pixel_product``) rather than the filters (``gather_product``): where more of the work its
    tiles do is kept. The gather computes, a sample, K rows rounded up to MR by OH*WP columns
    rounded up to NR (or half of one); the pixels, the OH*OW rows of ``group`` samples rounded
    up to MR, by K columns rounded up likewise, over the group."""
    t = TILE if tile is None else tile
    MR, NR, HALF = int(_MR[t]), int(_NR[t]), int(HALF_NR[t])

    def rows(n):
        return -(-n // MR) * MR

    def columns(n):
        whole = -(-n // NR) * NR
        return whole - (NR - HALF) if HALF < NR and whole - n >= NR - HALF else whole

    gather = rows(K) * columns(OH * WP) * group
    pixels = rows(OH * OW * group) * columns(K)
    return pixels < gather


@njit(inline="always", cache=True)
def convolve_body(tile, y, x, w, b, ph, pw, relu, mask, masked, a_pack, taps_scratch, pix_scratch, xpads, planes,
                  by_pixels, group):
    """y (N, K, OH, OW) = the stride-1 convolution of x (N, C, H, W) with w (K, C, FH, FW), padding
    (ph, pw), plus b, then ReLU / mask as ``store_sample`` says: a sample a task, its product by
    ``gather_product``, or with ``by_pixels`` ``group`` samples a task (``sample_group``), their
    pixels the rows of one ``pixel_product`` (``pixel_rows`` says which way keeps more of the
    work). Scratch: ``a_pack`` (the packed filters), ``taps_scratch`` and ``pix_scratch`` (the
    taps' and pixels' offsets), per thread ``xpads`` (a padded sample, or a group's) and
    ``planes`` (the product's output in whole tiles, flat: ``whole_tiles``)."""
    MR, NR = _MR[tile], _NR[tile]
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    OH, OW = y.shape[2], y.shape[3]
    HP, WP = H + 2 * ph, W + 2 * pw
    R = C * FH * FW
    Q = OH * WP
    Kpad = slivers(K, MR) * MR
    ldc = slivers(K, NR) * NR  # the pixel-major plane's row
    P = OH * OW
    taps = tap_offsets(taps_scratch, C, FH, FW, HP, WP)
    if by_pixels:
        pix = pixel_offsets(pix_scratch, OH, OW, WP, group, C * HP * WP)
        pack_filter_columns(tile, a_pack, w.reshape(K, R))
        for task in prange(slivers(N, group)):
            t = numba.get_thread_id()
            n0 = task * group
            count = min(group, N - n0)
            xp = samples_for_pixels(xpads, t, x, n0, count, ph, pw)
            pixel_product(tile, planes[t], ldc, xp, a_pack, pix, taps, R, count * P, K)
            for g in range(count):
                store_pixels(y, n0 + g, planes[t][g * P * ldc:], ldc, b, relu, mask, masked)
    else:
        pack_weights(tile, a_pack, w.reshape(K, R))
        for n in prange(N):
            t = numba.get_thread_id()
            xp = xpads[t][:C * HP * WP + MAX_NR + FW]  # a sample (the buffer may hold a group's)
            pad_sample(xp, x, n, ph, pw)
            plane = whole_tiles(planes[t], K, Q, MR, NR)
            gather_product(tile, plane, xp, a_pack, taps, R, Q, Kpad)
            store_sample(tile, y, n, plane, b, relu, mask, masked, WP)


@njit(inline="always", cache=True)
def weight_gradient_body(tile, dw, dy, x, ph, pw, taps_scratch, pix_scratch, xpads, b_slivers, parts, group):
    """dw (K, C, FH, FW) = the weight gradient of the stride-1 convolution, computed transposed:
    dw^T (C*FH*FW, K) += patches (C*FH*FW, OH*OW) @ dy[n]^T, the depth running over the output
    pixels, only those that exist, of ``group`` samples a task (``sample_group``): A[r, p] =
    xp[taps[r] + pix[p]], the padded samples read in place through the taps' and the pixels'
    offsets (``microkernel_indirect``), and B's slivers dy's values for NR filters (``pack_b``,
    sample by sample). Each thread adds its samples into its ``parts[t]`` (C*FH*FW in whole
    tiles, rows of K in whole slivers); the parts are summed in thread order."""
    MR, NR = _MR[tile], _NR[tile]
    N, C, H, W = x.shape
    K, _, FH, FW = dw.shape
    OH, OW = dy.shape[2], dy.shape[3]
    HP, WP = H + 2 * ph, W + 2 * pw
    R = C * FH * FW
    P = OH * OW
    ldc = slivers(K, NR) * NR
    columns = slivers(K, NR)
    half = last_half(tile, K)
    threads = parts.shape[0]
    taps = tap_offsets(taps_scratch, C, FH, FW, HP, WP)
    pix = pixel_offsets(pix_scratch, OH, OW, WP, group, C * HP * WP)
    dyf = dy.reshape(N, K, P)
    for t in prange(threads):
        parts[t] = 0
    for task in prange(slivers(N, group)):
        t = numba.get_thread_id()
        sliver, part = b_slivers[t], parts[t]
        n0 = task * group
        count = min(group, N - n0)
        xp = samples_for_pixels(xpads, t, x, n0, count, ph, pw)
        depth = count * P
        block = even_blocks(depth)
        for pc in range(0, depth, block):
            kc = min(block, depth - pc)
            for s in range(columns):
                for g in range(pc // P, (pc + kc - 1) // P + 1):  # dy's values for NR filters, sample by sample
                    lo, hi = max(pc, g * P), min(pc + kc, (g + 1) * P)
                    pack_b(tile, sliver, (lo - pc) * NR, dyf[n0 + g], s * NR, K, lo - g * P, hi - lo, False)
                for r0 in range(0, R, MR):
                    rows = (taps[r0], taps[r0 + 1], taps[r0 + 2], taps[r0 + 3],
                            taps[r0 + 4], taps[r0 + 5], taps[r0 + 6], taps[r0 + 7])  # MAX_MR of them
                    if half and s == columns - 1:
                        microkernel_indirect(tile, True, kc, xp, rows, pix, pc, sliver, 0, part, r0 * ldc + s * NR,
                                             ldc, True)
                    else:
                        microkernel_indirect(tile, False, kc, xp, rows, pix, pc, sliver, 0, part, r0 * ldc + s * NR,
                                             ldc, True)
    dwf = dw.reshape(K, R)
    for k in prange(K):
        for r in range(R):
            total = parts[0, r * ldc + k]
            for t in range(1, threads):
                total += parts[t, r * ldc + k]
            dwf[k, r] = total


@njit(inline="always", cache=True)
def scatter_taps(scratch, C, FH, FW, HP, WP):
    """The taps' offsets in the scatter's row order r = (fw*FH + fh)*C + c, so that the rows a tile
    adds one after the other do not overlap: channels are planes apart, filter rows a padded row
    (apart from rows shorter than a tile), and only taps fw and fw + 1, C*FH rows apart, share all
    but one value (adding a row that overlaps one just added waits for that store). Then MAX_MR
    offsets of a sink for the rows past the last tap, beyond what any tap's sliver reaches (room
    for it: ``scatter_room``): int64s, as ``tap_offsets``."""
    taps = scratch.view(np.int64)
    R = C * FH * FW
    sink = C * HP * WP + MAX_NR + FW
    for fw in range(FW):
        for fh in range(FH):
            for c in range(C):
                taps[(fw * FH + fh) * C + c] = (c * HP + fh) * WP + fw
    for i in range(MAX_MR):
        taps[R + i] = sink
    return taps


@njit(inline="always", cache=True)
def pack_scatter_filters(a_pack, w, MR):
    """w^T as A's slivers in ``scatter_taps``' row order: A[r, k] = w[k, c, fh, fw] for r = (fw*FH +
    fh)*C + c, zero past the last row; the filters (the depth) block by block, block pc at
    pc * Rpad, sliver s at s * kc * MR within it."""
    K, C, FH, FW = w.shape
    R = C * FH * FW
    Rpad = slivers(R, MR) * MR
    zero = a_pack.dtype.type(0)
    for s in prange(slivers(R, MR)):
        for pc in range(0, K, KC):
            kc = min(KC, K - pc)
            at = pc * Rpad + s * kc * MR
            for i in range(MR):
                r = s * MR + i
                c, tap = r % C, r // C
                for p in range(kc):
                    a_pack[at + p * MR + i] = w[pc + p, c, tap % FH, tap // FH] if r < R else zero


@njit(inline="always", cache=True)
def gradient_plane(tile, dyq, dy, n, WP):
    """dyq (K, Qpad) = dy[n] laid out in rows of length WP, as the forward's output plane: zero in
    the columns past OW and past the plane's end. B of the input gradient's product, read in
    place."""
    K, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    V = lanes(tile, dy)
    dyq[:] = 0
    zero = dy.dtype.type(0)
    for k in range(K):
        for oh in range(OH):
            at = ((n * K + k) * OH + oh) * OW
            for ow in range(0, OW, V):
                store_run(tile, dyq, k * dyq.shape[1] + oh * WP + ow, dy, at + ow, min(V, OW - ow), zero,
                          False, dyq, False)


@njit(inline="always", cache=True)
def scatter_product(tile, dxp, g, ldg, a_pack, taps, Q, K, Rpad):
    """dxp (the padded input gradient) += G = w^T @ g along the taps: g's K rows (``ldg`` apart,
    the plane's Q columns and zeros past them) are B, read in place; each MR x NR tile of G is
    added at its rows' offsets ``taps`` (``scatter_taps``) by ``microkernel_scatter``, the last
    sliver as a half tile where it is no wider than one. A packed by ``pack_scatter_filters``."""
    MR, NR, HALF = _MR[tile], _NR[tile], HALF_NR[tile]
    for q0 in range(0, Q, NR):
        half = HALF < NR and Q - q0 <= HALF
        for pc in range(0, K, KC):
            kc = min(KC, K - pc)
            for i in range(0, Rpad, MR):
                rows = (taps[i], taps[i + 1], taps[i + 2], taps[i + 3],
                        taps[i + 4], taps[i + 5], taps[i + 6], taps[i + 7])  # MAX_MR of them
                if half:
                    microkernel_scatter(tile, True, kc, a_pack, pc * Rpad + i * kc, g, pc * ldg + q0, ldg, dxp, q0,
                                        rows)
                else:
                    microkernel_scatter(tile, False, kc, a_pack, pc * Rpad + i * kc, g, pc * ldg + q0, ldg, dxp, q0,
                                        rows)


# The input gradient with the filter's columns folded into the depth (``fold_product``): where
# w^T dy has few rows of depth (a first layer: 25 taps, 6 or 16 filters), each tile's short
# product is dwarfed by adding it back, and taps fw and fw + 1 of one filter row add overlapping
# runs one right after the other. Written instead as
#
#     dxp[c, fh, :] += sum over (k, fw) of w[k, c, fh, fw] * g_k shifted right by fw
#
# the tile's rows are the C*FH filter rows (each added a padded row further down, no two
# overlapping), the depth is K*FW (the gradient planes read in place at -fw), and each row of
# the padded gradient gets Q + FW - 1 columns: the same multiply-adds, FW times fewer tiles added.
#
# What each way costs, measured on an AVX2 machine (the input gradient alone, one process, both
# ways alternating): a tile added back costs about as much as 2.5 steps of its depth, and the
# fold's steps about 8% more than the scatter's (B's rows start at any column, not at a whole
# sliver). Folded / scattered: 6->16 5x5 0.89, 8->8 3x3 0.86, 32->16 5x5 0.91, 16->16 5x5 0.98,
# 16->32 5x5 1.00, 32->64 3x3 1.04-1.11.
TILE_COST = 2.5
FOLD_COST = 1.08


@njit(inline="always", cache=True)
def fold_taps(scratch, C, K, FH, FW, HP, WP, stride):
    """(starts, offsets), int64s in ``scratch`` (two float32s each): the tile rows' offsets in the
    padded input gradient, row r = fh*C + c at (c*HP + fh)*WP, then MAX_MR offsets of a sink for
    the rows past the last (beyond what any row's sliver reaches: ``fold_room``); and the depth's
    offsets in the gradient planes, p = k*FW + fw at k*stride - fw."""
    taps = scratch.view(np.int64)
    R = C * FH
    sink = C * HP * WP + MAX_NR + FW
    for fh in range(FH):
        for c in range(C):
            taps[fh * C + c] = (c * HP + fh) * WP
    for i in range(MAX_MR):
        taps[R + i] = sink
    offsets = taps[R + MAX_MR:R + MAX_MR + K * FW]
    for k in range(K):
        for fw in range(FW):
            offsets[k * FW + fw] = k * stride - fw
    return taps[:R + MAX_MR], offsets


@njit(inline="always", cache=True)
def pack_fold_filters(a_pack, w, MR):
    """A for ``fold_product``, packed: A[r, p] = w[k, c, fh, fw] for r = fh*C + c, p = k*FW + fw,
    zero past the last row; the depth block by block (KC), block pc at pc * Rpad, sliver s at
    s * kc * MR within it."""
    K, C, FH, FW = w.shape
    R, D = C * FH, K * FW
    Rpad = slivers(R, MR) * MR
    zero = a_pack.dtype.type(0)
    for s in range(slivers(R, MR)):
        for pc in range(0, D, KC):
            kc = min(KC, D - pc)
            at = pc * Rpad + s * kc * MR
            for i in range(MR):
                r = s * MR + i
                for p in range(kc):
                    k, fw = (pc + p) // FW, (pc + p) % FW
                    a_pack[at + p * MR + i] = w[k, r % C, r // C, fw] if r < R else zero


@njit(inline="always", cache=True)
def fold_product(tile, dxp, g, bi, a_pack, starts, offsets, Qf, D, Rpad):
    """dxp (the padded input gradient) += the product of A (``pack_fold_filters``) and B, whose
    row p is the gradient planes' run ``g[bi + offsets[p]:]`` (``fold_taps``), over Qf columns
    (the last sliver a half tile where it is no wider than one); each tile added at its rows'
    ``starts`` by ``microkernel_fold``."""
    MR, NR, HALF = _MR[tile], _NR[tile], HALF_NR[tile]
    for q0 in range(0, Qf, NR):
        half = HALF < NR and Qf - q0 <= HALF
        for pc in range(0, D, KC):
            kc = min(KC, D - pc)
            for i in range(0, Rpad, MR):
                rows = (starts[i], starts[i + 1], starts[i + 2], starts[i + 3],
                        starts[i + 4], starts[i + 5], starts[i + 6], starts[i + 7])  # MAX_MR of them
                if half:
                    microkernel_fold(tile, True, kc, a_pack, pc * Rpad + i * kc, g, bi + q0, offsets, pc, dxp, q0,
                                     rows)
                else:
                    microkernel_fold(tile, False, kc, a_pack, pc * Rpad + i * kc, g, bi + q0, offsets, pc, dxp, q0,
                                     rows)


def fold_room(C, HP, WP, FH, FW):
    """Values of a padded input gradient ``fold_product`` adds into: ``scatter_room``'s, and the
    FW - 1 columns more that each row gets."""
    return scatter_room(C, HP, WP, FH, FW) + FW


@njit(inline="always", cache=True)
def plane_stride(Q, FW):
    """Values from one gradient plane of Q to the next where ``fold_product`` reads them: room for
    the last sliver of a row shifted by up to FW - 1 to read zeros past the plane's end."""
    return Q + MAX_NR + FW


@njit(inline="always", cache=True)
def folds(C, K, FH, FW, MR):
    """Whether an input gradient by the scatter folds the filter's columns into its depth: where
    that takes fewer steps of the micro-kernel, counting TILE_COST steps for adding a tile back
    and FOLD_COST for B's rows read from any column. Few filters fold (their tiles are shallow:
    6->16 5x5, 8->8 3x3, 32->16 5x5, and a 5x5 first layer), 32 or more do not."""
    fold = slivers(C * FH, MR) * (K * FW + TILE_COST) * FOLD_COST
    scatter = slivers(C * FH * FW, MR) * (K + TILE_COST)
    return FW > 1 and fold < scatter


@njit(inline="always", cache=True)
def input_gradient_scatter_body(tile, dx, dy, w, ph, pw, x, masked, a_pack, taps_scratch, dxpads, dyqs, fold):
    """dx (N, C, H, W) = the input gradient of the stride-1 convolution as the forward's gather run
    backwards: per sample, G (C*FH*FW, OH*WP) = w^T @ dy[n], each tile of G added straight into
    the padded input gradient along its rows' taps (``microkernel_scatter``), no G stored; or with
    ``fold``, the filter's columns in the depth (``fold_product``): FW times fewer tiles added,
    each FW times deeper. B is dy[n] laid out as the forward's plane (``gradient_plane``), read in
    place. Where the filters are large against the image (no padding), this multiplies fewer
    zeros than the full convolution of dy. Times x > 0 with ``masked``."""
    MR, NR = _MR[tile], _NR[tile]
    N, C, H, W = dx.shape
    K, _, FH, FW = w.shape
    OH = dy.shape[2]
    HP, WP = H + 2 * ph, W + 2 * pw
    Q = OH * WP
    if fold:  # FW zeros before the first plane, each plane stride apart: B's rows start at -fw
        stride = plane_stride(Q, FW)
        Rpad = slivers(C * FH, MR) * MR
        pack_fold_filters(a_pack, w, MR)
        starts, offsets = fold_taps(taps_scratch, C, K, FH, FW, HP, WP, stride)
        first = FW
    else:
        stride = slivers(Q, NR) * NR
        Rpad = slivers(C * FH * FW, MR) * MR
        pack_scatter_filters(a_pack, w, MR)
        starts = offsets = scatter_taps(taps_scratch, C, FH, FW, HP, WP)
        first = 0
    for n in prange(N):
        t = numba.get_thread_id()
        g, dxp = dyqs[t], dxpads[t]
        dxp[:] = 0
        g[:first] = 0
        gradient_plane(tile, g[first:first + K * stride].reshape(K, stride), dy, n, WP)
        if fold:
            fold_product(tile, dxp, g, first, a_pack, starts, offsets, Q + FW - 1, K * FW, Rpad)
        else:
            scatter_product(tile, dxp, g, stride, a_pack, starts, Q, K, Rpad)
        unpad_sample(tile, dx, n, dxp, ph, pw, x, masked)


@njit(inline="always", cache=True)
def flip_filters(wt, w):
    """wt (C, K, FH, FW) = w (K, C, FH, FW) with filter and channel swapped and the window turned
    by 180 degrees: the filters of the input gradient's full convolution."""
    K, C, FH, FW = w.shape
    for c in prange(C):
        for k in range(K):
            for fh in range(FH):
                for fw in range(FW):
                    wt[c, k, fh, fw] = w[k, c, FH - 1 - fh, FW - 1 - fw]


def _compiled_for(tile):
    @njit(parallel=True, cache=True)
    def forward(y, x, w, b, ph, pw, relu, a_pack, taps, pix, xpads, planes, by_pixels, group):
        convolve_body(tile, y, x, w, b, ph, pw, relu, y, False, a_pack, taps, pix, xpads, planes, by_pixels, group)

    @njit(parallel=True, cache=True)
    def backward_input(dx, dy, w, wt, zeros, ph, pw, x, masked, a_pack, taps, pix, xpads, planes, by_pixels, group):
        flip_filters(wt, w)
        FH, FW = w.shape[2], w.shape[3]
        convolve_body(tile, dx, dy, wt, zeros, FH - 1 - ph, FW - 1 - pw, False, x, masked, a_pack, taps, pix, xpads,
                      planes, by_pixels, group)

    @njit(parallel=True, cache=True)
    def backward_input_scatter(dx, dy, w, ph, pw, x, masked, a_pack, taps, dxpads, dyqs, fold):
        input_gradient_scatter_body(tile, dx, dy, w, ph, pw, x, masked, a_pack, taps, dxpads, dyqs, fold)

    @njit(parallel=True, cache=True)
    def backward_weight(dw, dy, x, ph, pw, taps, pix, xpads, b_slivers, parts, group):
        weight_gradient_body(tile, dw, dy, x, ph, pw, taps, pix, xpads, b_slivers, parts, group)

    return forward, backward_input, backward_input_scatter, backward_weight


# One set of compiled kernels per tile (the tile a constant in each: see kernels/matmul.py)
_KERNELS = tuple(_compiled_for(tile) for tile in range(len(TILE_NAMES)))


def scatter_input_gradient(x_shape, w_shape, padding):
    """Whether the input gradient runs as a scatter of w^T @ dy (``input_gradient_scatter_body``)
    rather than as the full convolution of dy: when it multiplies fewer values, that is when
    the padding is less than the filter's half (the full convolution pads dy by F - 1 - P)."""
    H, W = x_shape[2], x_shape[3]
    FH, FW = w_shape[2], w_shape[3]
    ph, pw = padding
    OH = H + 2 * ph - FH + 1
    scatter = OH * (W + 2 * pw)  # columns of G per sample
    full = H * (W + FW - 1)  # columns of the full convolution's output per sample
    return scatter < full


def scatter_room(C, HP, WP, FH, FW):
    """Values of a padded input gradient the scatter adds into (``scatter_product``): the C padded
    planes, what the last tap's last sliver reaches past them, and the sink where the rows past
    the last tap go (``scatter_taps``), a plane's OH*WP columns rounded up to a sliver."""
    return C * HP * WP + MAX_NR + FW + (HP - FH + 1) * WP + MAX_NR


def forward_group(x_shape, y_shape, padding):
    """``sample_group`` of the forward and the weight gradient."""
    N, C, H, W = x_shape
    return sample_group(N, y_shape[2] * y_shape[3], C * (H + 2 * padding[0]) * (W + 2 * padding[1]))


def full_group(x_shape, w_shape, y_shape, padding):
    """``sample_group`` of the input gradient's full convolution (dy padded by F - 1 - P)."""
    N, _, H, W = x_shape
    K, _, FH, FW = w_shape
    dHP, dWP = y_shape[2] + 2 * (FH - 1 - padding[0]), y_shape[3] + 2 * (FW - 1 - padding[1])
    return sample_group(N, H * W, K * dHP * dWP)


def gather_workspace(x_shape, w_shape, y_shape, padding, extra=0):
    """{name: shape} of the forward's scratch (``convolve_body``, and the fused first layer's):
    the packed filters (either way round), the taps' and the pixels' offsets (for the forward or
    the full convolution of dy, whichever has more, a group of samples' pixels), and for each of
    Numba's threads a padded sample or a group of them (``extra`` values more) and an output plane
    in whole tiles (either way round)."""
    N, C, H, W = x_shape
    K, _, FH, FW = w_shape
    OH, OW = y_shape[2], y_shape[3]
    threads = numba.config.NUMBA_NUM_THREADS
    HP, WP = H + 2 * padding[0], W + 2 * padding[1]
    group, full = forward_group(x_shape, y_shape, padding), full_group(x_shape, w_shape, y_shape, padding)
    return {
        "im_a_pack": ((K + MAX_NR) * C * FH * FW,),
        "im_taps": (2 * (max(max(C, K) * FH * FW, C * FH + K * FW) + MAX_MR),),  # int64s (two float32s each)
        "im_pixels": (2 * (max(group * OH * OW, full * H * W) + MAX_MR),),
        "im_xpads": (threads, group * C * HP * WP + MAX_NR + FW + extra),  # the last sliver reads past the planes
        "im_planes": (threads, max(tiles_size(K, OH * WP), tiles_size(group * OH * OW, K))),
    }


def implicit_workspace(x_shape, w_shape, y_shape, padding, need_dx, scatter=None):
    """{name: shape} of the scratch the implicit kernels need (any tile): the packed filters, the
    taps' and pixels' offsets, and for each of Numba's threads a padded sample, an output plane, a
    sliver of B and its own weight gradient (in whole tiles); with ``need_dx``, what the input gradient's
    product needs (the flipped filters and the padded gradient and planes of the full
    convolution, or for the scatter dy's plane and room past the padded sample for the rows
    past the last tap; ``scatter`` None: as ``scatter_input_gradient`` says)."""
    N, C, H, W = x_shape
    K, _, FH, FW = w_shape
    OH, OW = y_shape[2], y_shape[3]
    ph, pw = padding
    threads = numba.config.NUMBA_NUM_THREADS
    WP = W + 2 * pw
    R = C * FH * FW
    tail = MAX_NR + FW  # read past the last plane by the last sliver
    if scatter is None:
        scatter = scatter_input_gradient(x_shape, w_shape, padding)
    HP = H + 2 * ph
    extra = fold_room(C, HP, WP, FH, FW) - (C * HP * WP + tail) if need_dx and scatter else 0
    shapes = {
        **gather_workspace(x_shape, w_shape, y_shape, padding, extra),
        "im_b_slivers": (threads, KC * MAX_NR),
        "im_parts": (threads, tiles_size(R, K)),
    }
    if need_dx and scatter:  # room for the scatter's product and the fold's (``input_gradient_scatter_body``)
        shapes.update({
            "im_dx_pack": (max(R + MAX_MR, (C * FH + MAX_MR) * FW) * K,),
            "im_dyq": (threads, FW + K * (OH * WP + MAX_NR + FW)),
        })
    elif need_dx:  # the full convolution of dy: padding F - 1 - P, planes of row length OW + 2*(FW - 1 - pw)
        dHP, dWP = OH + 2 * (FH - 1 - ph), OW + 2 * (FW - 1 - pw)
        shapes.update({
            "im_flipped": (C, K, FH, FW),
            "im_zeros": (C,),
            "im_dx_pack": ((C + MAX_NR) * K * FH * FW,),
            "im_dy_pads": (threads, full_group(x_shape, w_shape, y_shape, padding) * K * dHP * dWP + tail),
            "im_dx_planes": (threads, max(tiles_size(C, H * dWP),
                                          tiles_size(full_group(x_shape, w_shape, y_shape, padding) * H * W, C))),
        })
    return shapes


def conv2d_forward_implicit_core(y, x, w, b, ph, pw, relu, ws, tile=None, by_pixels=None):
    """y = conv(x, w) + b (stride 1, padding ph, pw), max(., 0) with ``relu``; ``ws`` from
    ``implicit_workspace``, ``tile`` a tile's index (None: this CPU's), ``by_pixels`` the way round
    of the product (None: as ``pixel_rows`` says)."""
    t = TILE if tile is None else tile
    K, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    group = forward_group(x.shape, y.shape, (ph, pw))
    if by_pixels is None:
        by_pixels = pixel_rows(K, OH, OW, x.shape[3] + 2 * pw, t, group)
    _KERNELS[t][0](y, x, w, b, ph, pw, relu, ws.im_a_pack, ws.im_taps, ws.im_pixels, ws.im_xpads, ws.im_planes,
                   bool(by_pixels), group if by_pixels else 1)


def conv2d_backward_implicit_core(dx, dw, dy, x, w, ph, pw, mask, ws, tile=None, by_pixels=None, fold=None):
    """dw, and dx when it is not None (times x > 0 with ``mask``); the bias gradient is the caller's."""
    implicit_weight_gradient(dw, dy, x, ph, pw, ws, tile)
    if dx is not None:
        implicit_input_gradient(dx, dy, w, x, ph, pw, mask, ws, tile, by_pixels, fold)


def implicit_weight_gradient(dw, dy, x, ph, pw, ws, tile=None):
    """dw alone (``weight_gradient_body``)."""
    backward_weight = _KERNELS[TILE if tile is None else tile][3]
    backward_weight(dw, dy, x, ph, pw, ws.im_taps, ws.im_pixels, ws.im_xpads, ws.im_b_slivers, ws.im_parts,
                    forward_group(x.shape, dy.shape, (ph, pw)))


def implicit_input_gradient(dx, dy, w, x, ph, pw, mask, ws, tile=None, by_pixels=None, fold=None):
    """dx alone, times x > 0 with ``mask`` (``x`` is read only then): the scatter or the full
    convolution of dy, whichever ``ws`` was made for; ``by_pixels`` as for the forward, ``fold``
    the scatter's form (None: as ``folds`` says)."""
    t = TILE if tile is None else tile
    _, full, scatter, _ = _KERNELS[t]
    if hasattr(ws, "im_dyq"):
        if fold is None:
            K, C, FH, FW = w.shape
            fold = folds(C, K, FH, FW, _MR[t])
        scatter(dx, dy, w, ph, pw, x, bool(mask), ws.im_dx_pack, ws.im_taps, ws.im_xpads, ws.im_dyq, bool(fold))
    else:
        C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
        group = full_group(x.shape, w.shape, dy.shape, (ph, pw))
        if by_pixels is None:
            by_pixels = pixel_rows(C, H, W, dy.shape[3] + 2 * (w.shape[3] - 1 - pw), t, group)
        ws.im_zeros[:] = 0
        full(dx, dy, w, ws.im_flipped, ws.im_zeros, ph, pw, x, bool(mask), ws.im_dx_pack, ws.im_taps, ws.im_pixels,
             ws.im_dy_pads, ws.im_dx_planes, bool(by_pixels), group if by_pixels else 1)


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def bias_gradient_cpu(db, dy):
    """db[k] = the sum of dy[:, k]: each sample's plane summed in float32 across the vector lanes
    (``reassoc``; a fixed order, so the same bits every run), the samples added in float64."""
    N, K = dy.shape[0], dy.shape[1]
    P = dy.shape[2] * dy.shape[3]
    flat = dy.reshape(N, K, P)
    for k in prange(K):
        total = 0.0
        for n in range(N):
            plane = flat[n, k]
            s = plane.dtype.type(0)
            for p in range(P):
                s += plane[p]
            total += s
        db[k] = total


def implicit_scratch(x_shape, w_shape, y_shape, padding, need_dx, dtype, scatter=None):
    """Fresh scratch arrays for the implicit kernels (tests, and calls outside a planned step)."""
    from types import SimpleNamespace

    shapes = implicit_workspace(x_shape, w_shape, y_shape, padding, need_dx, scatter)
    return SimpleNamespace(**{name: np.empty(shape, dtype) for name, shape in shapes.items()})
