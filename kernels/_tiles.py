"""The register-blocked matrix product every fast CUDA kernel is built on (dense layers, and
convolution written as an implicit matrix product).

A block of GEMM_THREADS = 256 threads computes a TILE_M x TILE_N = 64 x 128 tile of C = A B.
It walks along the shared dimension TILE_K = 16 at a time: the block stages a 64 x 16 piece
of A and a 16 x 128 piece of B in shared memory (the caller's code: where the values come
from is what differs between a dense layer and a convolution), then every thread updates a
SUB_M x SUB_N = 4 x 8 sub-tile of C that it holds in registers. Thread (tx, ty) =
(t % 16, t // 16) owns rows ty + 16 i (i < 4) and columns tx + 16 j (j < 8) of the tile:
for each step of k it reads 4 values of A and 8 of B from shared memory and does 32
multiply-adds with them, 12 loads for 32 FMAs, where one output per thread would need 2
loads per FMA. Columns 16 apart keep the reads of a warp in different banks (B) or on one
address (A, a broadcast), and the stores of C coalesced.

Shared tiles are stored k-major, ``sa[k * TILE_M + m]`` and ``sb[k * TILE_N + n]``, so the
values a thread reads for one k are 16 elements apart in one row.
"""

import numba
import numpy as np
from numba import cuda

from ._cuda import SIMULATOR

# The simulator runs every thread as a Python thread: under it the blocks are 8 x 8 threads
# (tiles of 32 x 64), the same code, tested faster.
SPAN = 8 if SIMULATOR else 16  # threads along each side of the block; a thread's rows (columns) are SPAN apart
SUB_M, SUB_N = 4, 8  # each thread's sub-tile of C
GEMM_THREADS = SPAN * SPAN  # 256
TILE_M = SPAN * SUB_M  # rows of C per block: 64
TILE_N = SPAN * SUB_N  # columns of C per block: 128
TILE_K = 16  # depth of each staged piece of A and B (tile_product writes its 16 steps out)
ACC = SUB_M * SUB_N  # elements of C each thread holds
LOADS_A = TILE_M * TILE_K // GEMM_THREADS  # elements of A each thread stages per step: 4
LOADS_B = TILE_N * TILE_K // GEMM_THREADS  # and of B: 8
STAGED_A = TILE_K * TILE_M  # elements of the shared tiles
STAGED_B = TILE_K * TILE_N
# What every tile kernel promises the compiler (``cuda.jit(launch_bounds=...)``): blocks of
# GEMM_THREADS, and 2 of them resident on an SM (25% occupancy), which caps a thread at 128
# registers; the static report checks that nothing spills under the cap.
LAUNCH_BOUNDS = (GEMM_THREADS, 2)


def tile_kernel(fn):
    """``cuda.jit`` with LAUNCH_BOUNDS and the on-disk cache, as every kernel has it (the simulator
    takes no launch bounds)."""
    return cuda.jit(fn, cache=True) if SIMULATOR else cuda.jit(fn, cache=True, launch_bounds=LAUNCH_BOUNDS)

# Offsets into the shared tiles as unsigned integers: Numba wraps a negative signed index around
# (a comparison and a select per access); with an unsigned index there is nothing to wrap, and
# each load is one LDS with a constant offset.
_SPAN_U = np.uint64(SPAN)
_KA, _KB = np.uint64(TILE_M), np.uint64(TILE_N)  # one step of k further on, in A and in B


@cuda.jit(device=True, inline="always")
def zero_acc(acc):
    for i in range(ACC):
        acc[i] = 0


@cuda.jit(device=True, inline="always")
def _step(acc, sa, sb, ai, bi):
    """One k: 4 values of A, 8 of B, 32 multiply-adds into the thread's sub-tile (loops with
    constant bounds: unrolled, every index a constant, so ``a``, ``b`` and ``acc`` are registers)."""
    a = cuda.local.array(SUB_M, dtype=sa.dtype)
    b = cuda.local.array(SUB_N, dtype=sb.dtype)
    for i in range(SUB_M):
        a[i] = sa[ai + numba.uint64(i) * _SPAN_U]
    for j in range(SUB_N):
        b[j] = sb[bi + numba.uint64(j) * _SPAN_U]
    for i in range(SUB_M):
        for j in range(SUB_N):
            acc[i * SUB_N + j] += a[i] * b[j]


@cuda.jit(device=True, inline="always")
def _four_steps(acc, sa, sb, ai, bi):
    _step(acc, sa, sb, ai, bi)
    _step(acc, sa, sb, ai + _KA, bi + _KB)
    _step(acc, sa, sb, ai + _KA + _KA, bi + _KB + _KB)
    _step(acc, sa, sb, ai + _KA + _KA + _KA, bi + _KB + _KB + _KB)


@cuda.jit(device=True, inline="always")
def tile_product(acc, sa, sb, t):
    """acc[i * SUB_N + j] += sum over k of A[ty + SPAN i, k] B[k, tx + SPAN j] for the staged step,
    thread t = (tx, ty) = (t % SPAN, t // SPAN).

    The 16 steps of k are written out (four times four), not looped: no loop counter, every
    load a constant offset from one register. The static report checks it (``nbcnn profile
    --static``): no local memory, no spills, 1.4 instructions per FMA in this part.
    """
    ai, bi = numba.uint64(t // SPAN), numba.uint64(t % SPAN)
    four_a, four_b = _KA + _KA + _KA + _KA, _KB + _KB + _KB + _KB
    _four_steps(acc, sa, sb, ai, bi)
    _four_steps(acc, sa, sb, ai + four_a, bi + four_b)
    _four_steps(acc, sa, sb, ai + four_a + four_a, bi + four_b + four_b)
    _four_steps(acc, sa, sb, ai + four_a + four_a + four_a, bi + four_b + four_b + four_b)


@cuda.jit(device=True, inline="always")
def multiply_staged(acc, sa, sb, t):
    """``tile_product`` of the step the block just staged, between the two barriers every step needs."""
    cuda.syncthreads()  # wait until both tiles are staged
    tile_product(acc, sa, sb, t)
    cuda.syncthreads()  # wait until every thread is done with the tiles before the next ones overwrite them
