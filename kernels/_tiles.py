"""The register-blocked matrix product every fast CUDA kernel is built on (dense layers, and
convolution written as an implicit matrix product).

A block of GEMM_THREADS = 256 threads computes a TILE_M x TILE_N = 64 x 64 tile of C = A B.
It walks along the shared dimension TILE_K = 16 at a time: the block stages a 64 x 16 piece
of A and a 16 x 64 piece of B in shared memory (the caller's code: where the values come
from is what differs between a dense layer and a convolution), then every thread updates a
4 x 4 sub-tile of C that it holds in registers. Thread (tx, ty) = (t % 16, t // 16) owns
rows ty, ty + 16, ty + 32, ty + 48 and columns tx, tx + 16, tx + 32, tx + 48 of the tile:
for each step of k it reads 4 values of A and 4 of B from shared memory and does 16
multiply-adds with them, 8 loads for 16 FMAs, where one output per thread would need 2
loads per FMA. Columns 16 apart keep the reads of a warp in different banks (B) or on
one address (A, a broadcast), and the stores of C coalesced.

Shared tiles are stored k-major, ``sa[k, m]`` and ``sb[k, n]``, so the 4 values a thread
reads for one k are 16 elements apart in one row.
"""

import numba
import numpy as np
from numba import cuda

TILE_M = 64  # rows of C per block
TILE_N = 64  # columns of C per block
TILE_K = 16  # depth of each staged piece of A and B
GEMM_THREADS = 256  # 16 x 16 threads, each owning 4 x 4 elements of C
SUB = 4  # each thread's sub-tile is SUB x SUB
ACC = SUB * SUB  # elements of C each thread holds
SPAN = 16  # rows (columns) of the threads' grid: element i of a thread's sub-tile is SPAN * i further on
LOADS = TILE_M * TILE_K // GEMM_THREADS  # elements of A (and of B) each thread stages per step: 4
STAGED = TILE_K * TILE_M  # elements of each shared tile (TILE_M == TILE_N)

# Offsets into the shared tiles as unsigned integers: Numba wraps a negative signed index around
# (a comparison and a select per access); with an unsigned index there is nothing to wrap, and
# each load is one LDS with a constant offset.
_S1, _S2, _S3 = np.uint64(SPAN), np.uint64(2 * SPAN), np.uint64(3 * SPAN)  # a thread's 4 rows or columns
_K1, _K2, _K3, _K4 = (np.uint64(TILE_M * k) for k in (1, 2, 3, 4))  # 1 to 4 steps of k further on


@cuda.jit(device=True, inline="always")
def zero_acc(acc):
    for i in range(ACC):
        acc[i] = 0


@cuda.jit(device=True, inline="always")
def _step(acc, sa, sb, ai, bi):
    """One k: 4 values of A, 4 of B, 16 multiply-adds into the thread's sub-tile."""
    a0, a1, a2, a3 = sa[ai], sa[ai + _S1], sa[ai + _S2], sa[ai + _S3]
    b0, b1, b2, b3 = sb[bi], sb[bi + _S1], sb[bi + _S2], sb[bi + _S3]
    acc[0] += a0 * b0; acc[1] += a0 * b1; acc[2] += a0 * b2; acc[3] += a0 * b3  # noqa: E702
    acc[4] += a1 * b0; acc[5] += a1 * b1; acc[6] += a1 * b2; acc[7] += a1 * b3  # noqa: E702
    acc[8] += a2 * b0; acc[9] += a2 * b1; acc[10] += a2 * b2; acc[11] += a2 * b3  # noqa: E702
    acc[12] += a3 * b0; acc[13] += a3 * b1; acc[14] += a3 * b2; acc[15] += a3 * b3  # noqa: E702


@cuda.jit(device=True, inline="always")
def _four_steps(acc, sa, sb, ai, bi):
    _step(acc, sa, sb, ai, bi)
    _step(acc, sa, sb, ai + _K1, bi + _K1)
    _step(acc, sa, sb, ai + _K2, bi + _K2)
    _step(acc, sa, sb, ai + _K3, bi + _K3)


@cuda.jit(device=True, inline="always")
def tile_product(acc, sa, sb, tx, ty):
    """acc[i * SUB + j] += sum over k of sa[k, ty + SPAN * i] * sb[k, tx + SPAN * j]: one staged step.

    ``sa`` and ``sb`` are the flat shared tiles (k-major, TILE_M to a row). The 16 steps of k are
    written out (four times four), not looped: no loop counter, every load a constant offset
    from one register, ``acc`` and the 8 operands in registers. The static report checks it:
    no local memory, about 1.5 instructions per FMA.
    """
    ai, bi = numba.uint64(ty), numba.uint64(tx)
    _four_steps(acc, sa, sb, ai, bi)
    _four_steps(acc, sa, sb, ai + _K4, bi + _K4)
    _four_steps(acc, sa, sb, ai + _K4 + _K4, bi + _K4 + _K4)
    _four_steps(acc, sa, sb, ai + _K4 + _K4 + _K4, bi + _K4 + _K4 + _K4)
