"""Index arithmetic shared by every kernel, CPU and CUDA, and by host code.

Each helper is written once, as plain Python, and compiled twice below: ``*_cpu``
for ``@njit`` kernels and ``*_cuda`` for ``@cuda.jit`` kernels (a CUDA kernel can
only call device functions). Host code calls the plain Python version.

Letters: ``size`` is an input extent (H or W), ``osize`` the output extent (OH or
OW), ``f`` the filter or window extent (FH or FW), ``s`` the stride, ``p`` the
padding, ``o`` an output coordinate and ``i`` an input coordinate.
"""

from numba import cuda, njit


def out_size(size, f, s, p):
    """Output extent of a sliding window: ``OH = (H + 2*P - FH) // S + 1``."""
    return (size + 2 * p - f) // s + 1


def in_coord(o, f, s, p):
    """Input coordinate read by tap ``f`` of the window at output ``o``: ``o*S - P + f``.

    It can fall outside ``[0, size)``: that is the zero (or -inf) padding.
    """
    return o * s - p + f


def out_coord(i, f, s, p, osize):
    """Output whose tap ``f`` reads input coordinate ``i``, or -1 when there is none.

    Inverts ``i = o*S - P + f``: ``o = (i + P - f) / S``, which must divide exactly and
    land in ``[0, osize)``.
    """
    num = i + p - f
    if num < 0 or num % s != 0:
        return -1
    o = num // s
    return o if o < osize else -1


def valid_out_range(size, osize, f, s, p):
    """Outputs ``[lo, hi)`` whose tap ``f`` reads inside the unpadded input.

    Solves ``0 <= o*S - P + f < size`` for ``o``, clipped to ``[0, osize)``. Loops that
    run over this range need no bounds test inside, so their body vectorizes.
    """
    lo = -((f - p) // s)  # ceil((p - f) / s), with floor division on negative numbers
    if lo < 0:
        lo = 0
    hi = (size - 1 + p - f) // s + 1
    if hi > osize:
        hi = osize
    if hi < lo:
        hi = lo
    return lo, hi


def window(o, f, s, p, size):
    """Input coordinates ``[lo, hi)`` covered by the window at output ``o``, clipped to the input."""
    lo = o * s - p
    hi = lo + f
    if lo < 0:
        lo = 0
    if hi > size:
        hi = size
    return lo, hi


def covering_outputs(i, f, s, p, osize):
    """Outputs ``[lo, hi)`` whose window covers input coordinate ``i``.

    Output ``o`` covers ``i`` when ``o*S - P <= i < o*S - P + F``, that is
    ``(i + P - F) / S < o <= (i + P) / S``.
    """
    lo = (i + p - f) // s + 1
    if lo < 0:
        lo = 0
    hi = (i + p) // s + 1
    if hi > osize:
        hi = osize
    if hi < lo:
        hi = lo
    return lo, hi


def compile_twice(fn):
    """``(cpu, cuda)``: a plain Python helper compiled for ``@njit`` kernels and as a CUDA device function."""
    return njit(inline="always", cache=True)(fn), cuda.jit(device=True, inline="always")(fn)


out_size_cpu, out_size_cuda = compile_twice(out_size)
in_coord_cpu, in_coord_cuda = compile_twice(in_coord)
out_coord_cpu, out_coord_cuda = compile_twice(out_coord)
valid_out_range_cpu, valid_out_range_cuda = compile_twice(valid_out_range)
window_cpu, window_cuda = compile_twice(window)
covering_outputs_cpu, covering_outputs_cuda = compile_twice(covering_outputs)
