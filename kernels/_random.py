"""Random numbers from a counter: a 32-bit hash of (seed, step, i), the same in Python, NumPy,
Numba on the CPU and CUDA.

A kernel that needs randomness (dropout's mask, augmentation's shifts) hashes the integers
that name what it is drawing for, instead of carrying a generator's state: every thread
draws independently, the GPU draws what the CPU draws, and a draw can be recomputed (the
dropout backward recomputes the forward's mask) rather than stored.

The mixer is a multiply-xorshift hash of the kind used for hash tables (odd 32-bit
constants with well-spread bits). Products are taken modulo 2**64 by int64 arithmetic and
masked to 32 bits, which gives the same low 32 bits as Python's unbounded integers.
"""

from ._index import compile_twice

MASK32 = 0xFFFFFFFF


def hash32(seed, step, i):
    """A 32-bit hash of (seed, step, i), as a non-negative integer below 2**32."""
    h = (seed * 0x9E3779B1 + step * 0x85EBCA77 + i * 0xC2B2AE3D) & MASK32
    h ^= h >> 16
    h = (h * 0x7FEB352D) & MASK32
    h ^= h >> 15
    h = (h * 0x846CA68B) & MASK32
    h ^= h >> 16
    return h


hash32_cpu, hash32_cuda = compile_twice(hash32)
