"""Data augmentation on the device where the batch is: random shifts (a crop of the image padded
by ``max_shift`` on every side) and, where the data allow it, horizontal flips.

Image n of the batch drawn at training step ``step`` moves by (dy, dx), each in
[-max_shift, max_shift], and is mirrored left to right when ``flip`` is set and a coin says
so; all three from one hash of (seed, step, n) (``_random.hash32``), so the CPU and the GPU
draw the same, and a run is reproducible from its seed. Pixels shifted in from outside the
image take the value ``fill`` (the data's background: the normalised value of a black pixel).

    out[n, c, i, j] = x[n, c, i - dy, j' - dx]  (or fill outside),  j' = W-1-j if mirrored else j
"""

from numba import cuda, njit, prange

from ._checks import check_arrays, check_int, check_ndim, check_real, check_shape, on_host
from ._cuda import blocks, flat, gpu_arrays, on_gpu, stream
from ._index import compile_twice
from ._random import hash32_cpu, hash32_cuda


def draw(h, max_shift, flip):
    """(dy, dx, mirrored) from a 32-bit hash: the low bits give the shifts, the top bit the coin."""
    span = 2 * max_shift + 1
    dy = h % span - max_shift
    dx = (h // span) % span - max_shift
    return dy, dx, flip and (h >> 31) == 1


draw_cpu, draw_cuda = compile_twice(draw)


@njit(parallel=True, cache=True)
def _shift_flip_cpu(out, x, seed, step, max_shift, flip, fill):
    N, C, H, W = x.shape
    for n in prange(N):
        dy, dx, mirrored = draw_cpu(hash32_cpu(seed, step, n), max_shift, flip)
        for c in range(C):
            for i in range(H):
                si = i - dy
                for j in range(W):
                    sj = (W - 1 - j if mirrored else j) - dx
                    out[n, c, i, j] = x[n, c, si, sj] if 0 <= si < H and 0 <= sj < W else fill


def _check(fn, on_device, out, x, seed, step, max_shift, fill):
    check_arrays(fn, on_device, {"out": out, "x": x})
    check_ndim(fn, "x", x, ("N", "C", "H", "W"))
    check_shape(fn, "out", out, x.shape, ("N", "C", "H", "W"))
    check_int(fn, "seed", seed, minimum=0)
    check_int(fn, "step", step, minimum=0)
    check_int(fn, "max_shift", max_shift, minimum=0)
    return check_real(fn, "fill", fill)


def shift_flip_cpu(out, x, seed, step, max_shift, flip=False, fill=0.0):
    """``out`` = the batch ``x`` (N, C, H, W), each image shifted (and mirrored) at random. Returns ``out``."""
    fill = _check("shift_flip_cpu", on_host, out, x, seed, step, max_shift, fill)
    shift_flip_core_cpu(out, x, seed, step, max_shift, bool(flip), fill)
    return out


def shift_flip_core_cpu(out, x, seed, step, max_shift, flip, fill):
    _shift_flip_cpu(out, x, seed, step, max_shift, flip, x.dtype.type(fill))


THREADS = 256


@cuda.jit(cache=True)
def _shift_flip_kernel(out, x, N, C, H, W, seed, step, max_shift, flip, fill):
    """One thread per element of the flat output; each recomputes its image's draw."""
    k = cuda.grid(1)
    if k < out.size:
        j = k % W
        i = (k // W) % H
        nc = k // (W * H)
        n = nc // C
        dy, dx, mirrored = draw_cuda(hash32_cuda(seed, step, n), max_shift, flip)
        si = i - dy
        sj = (W - 1 - j if mirrored else j) - dx
        out[k] = x[(nc * H + si) * W + sj] if 0 <= si < H and 0 <= sj < W else fill


def shift_flip_core_cuda(out, x, seed, step, max_shift, flip, fill):
    N, C, H, W = x.shape
    _shift_flip_kernel[blocks(out.size, THREADS), THREADS, stream()](flat(out), flat(x), N, C, H, W, seed, step, max_shift,
                                                           flip, x.dtype.type(fill))


def shift_flip_cuda(out, x, seed, step, max_shift, flip=False, fill=0.0):
    """``shift_flip_cpu`` on the GPU: the same draws for the same (seed, step)."""
    fn = "shift_flip_cuda"
    out, x = gpu_arrays(fn, out=out, x=x)
    fill = _check(fn, on_gpu, out, x, seed, step, max_shift, fill)
    shift_flip_core_cuda(out, x, seed, step, max_shift, bool(flip), fill)
    return out
