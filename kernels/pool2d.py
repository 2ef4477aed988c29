"""2-D max and average pooling, forward and backward.

Letters: N batch, C channels, H, W input size, FH, FW window size, OH, OW output size,
S stride, P padding (per axis). Gradients dx (N, C, H, W), dy (N, C, OH, OW).

    OH = (H + 2*P - FH) // S + 1,   OW = (W + 2*P - FW) // S + 1

Padding, as in PyTorch's defaults:

- max pooling treats padding as -inf, so it never wins;
- average pooling counts padding as zeros in the window (``count_include_pad=True``):
  every output is the window's sum divided by FH*FW.

Padding may be at most half the window (``P <= F // 2``, PyTorch's rule), so every
window holds at least one real input.

Max pooling records, for each output, where its maximum came from (``argmax``, the
flat index ``ih * W + iw`` inside the plane), and backward sends all of ``dy`` to
that one input. Ties go to the first maximum in row-major order, which is PyTorch's
rule; a NaN in a window wins, so NaN propagates.

Backward kernels overwrite dx. On the CPU each task owns a whole plane dx[n, c]; on
the GPU each thread owns one element of dx and gathers from the outputs whose window
covers it (``covering_outputs``). Either way no two workers write the same element.
"""

from numba import cuda, njit, prange

from ._checks import check_arrays, check_int, check_ndim, check_shape, on_host, output_size
from ._cuda import blocks, gpu_arrays, grid_z, on_gpu, stream
from ._index import compile_twice, covering_outputs_cpu, covering_outputs_cuda, window_cpu, window_cuda
from .activation import relu_backward_core_cpu
from .matmul import TILE, TILE_NAMES, lanes, pool_rows, unpool_rows

# ------------------------------------------------------------------------ argument checks


def check_pool2d(fn, on_device, x, y, window, stride, padding, argmax=None):
    """Check one pooling call; return ``(N, C, H, W, OH, OW)``.

    ``x`` and ``y`` are ``(name, array)`` pairs in the roles of input (N, C, H, W) and
    output (N, C, OH, OW); ``argmax`` (N, C, OH, OW) integers for max pooling.
    """
    fh, fw = (check_int(fn, n, v, minimum=1) for n, v in zip(("kernel_h", "kernel_w"), window))
    sh, sw = (check_int(fn, n, v, minimum=1) for n, v in zip(("stride_h", "stride_w"), stride))
    ph, pw = (check_int(fn, n, v, minimum=0) for n, v in zip(("pad_h", "pad_w"), padding))
    if ph > fh // 2 or pw > fw // 2:
        raise ValueError(
            f"{fn}: padding ({ph}, {pw}) must be at most half the window ({fh}, {fw}), "
            f"so that every window holds a real input"
        )
    check_arrays(fn, on_device, dict([x, y]), dict([argmax]) if argmax else None)
    (xn, xa), (yn, ya) = x, y
    check_ndim(fn, xn, xa, ("N", "C", "H", "W"))
    N, C, H, W = xa.shape
    OH = output_size(fn, H, fh, sh, ph, "height")
    OW = output_size(fn, W, fw, sw, pw, "width")
    check_shape(fn, yn, ya, (N, C, OH, OW), ("N", "C", "OH", "OW"))
    if argmax:
        check_shape(fn, argmax[0], argmax[1], (N, C, OH, OW), ("N", "C", "OH", "OW"))
    return N, C, H, W, OH, OW


def check_maxpool2d_backward(fn, on_device, dx, dy, argmax):
    """dx (N, C, H, W); dy and argmax (N, C, OH, OW)."""
    check_arrays(fn, on_device, {"dx": dx, "dy": dy}, {"argmax": argmax})
    check_ndim(fn, "dx", dx, ("N", "C", "H", "W"))
    check_ndim(fn, "dy", dy, ("N", "C", "OH", "OW"))
    check_shape(fn, "dy", dy, tuple(dx.shape[:2]) + tuple(dy.shape[2:]), ("N", "C", "OH", "OW"))
    check_shape(fn, "argmax", argmax, dy.shape, ("N", "C", "OH", "OW"))


def default_stride(kernel_h, kernel_w, stride_h, stride_w):
    """A stride of None means the window size (non-overlapping windows)."""
    return (kernel_h if stride_h is None else stride_h, kernel_w if stride_w is None else stride_w)


# ------------------------------------------------ per-output work, shared by CPU and CUDA
# The CPU kernels loop over planes and outputs, the CUDA kernels give each output (or
# input) a thread; both call these for the work of one element, compiled for each target.


def window_max(x, n, c, ih_lo, ih_hi, iw_lo, iw_hi):
    """(largest value, its flat index ih * W + iw) of x[n, c] over rows [ih_lo, ih_hi) and
    columns [iw_lo, iw_hi). Ties keep the first in row-major order; a NaN wins."""
    W = x.shape[3]
    best = x[n, c, ih_lo, iw_lo]
    where = ih_lo * W + iw_lo
    for ih in range(ih_lo, ih_hi):
        for iw in range(iw_lo, iw_hi):
            v = x[n, c, ih, iw]
            if v > best or (v != v and best == best):
                best = v
                where = ih * W + iw
    return best, where


def window_sum(x, n, c, ih_lo, ih_hi, iw_lo, iw_hi):
    """Sum of x[n, c] over rows [ih_lo, ih_hi) and columns [iw_lo, iw_hi)."""
    acc = x.dtype.type(0)
    for ih in range(ih_lo, ih_hi):
        for iw in range(iw_lo, iw_hi):
            acc += x[n, c, ih, iw]
    return acc


def argmax_sum(dy, argmax, n, c, here, oh_lo, oh_hi, ow_lo, ow_hi):
    """Sum of dy[n, c] over the outputs in the given ranges whose argmax is ``here``."""
    acc = dy.dtype.type(0)
    for oh in range(oh_lo, oh_hi):
        for ow in range(ow_lo, ow_hi):
            if argmax[n, c, oh, ow] == here:
                acc += dy[n, c, oh, ow]
    return acc


window_max_cpu, window_max_cuda = compile_twice(window_max)
window_sum_cpu, window_sum_cuda = compile_twice(window_sum)
argmax_sum_cuda = cuda.jit(device=True, inline="always")(argmax_sum)  # the CPU scatters through argmax instead


# ----------------------------------------------------------------------------- CPU kernels


@njit(parallel=True, cache=True)
def _maxpool2d_forward_cpu(y, argmax, x, fh, fw, sh, sw, ph, pw):
    """y[n, c, oh, ow] = max of x over the window; argmax = where it was. One task per plane (n, c)."""
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    for task in prange(N * C):
        n = task // C
        c = task % C
        for oh in range(OH):
            ih_lo, ih_hi = window_cpu(oh, fh, sh, ph, H)
            for ow in range(OW):
                iw_lo, iw_hi = window_cpu(ow, fw, sw, pw, W)
                y[n, c, oh, ow], argmax[n, c, oh, ow] = window_max_cpu(x, n, c, ih_lo, ih_hi, iw_lo, iw_hi)


@njit(parallel=True, cache=True)
def _maxpool2d_backward_cpu(dx, dy, argmax, x, mask):
    """dx[n, c] = dy[n, c] scattered to the argmax positions (summed where windows overlap).

    ``mask``: skip the outputs whose maximum x[where] is not positive, which gives dx * (x > 0),
    the backward of a ReLU before the pooling (dx is zero away from the argmax positions anyway)."""
    N, C, H, W = dx.shape
    OH, OW = dy.shape[2], dy.shape[3]
    for task in prange(N * C):
        n = task // C
        c = task % C
        dx[n, c, :, :] = 0
        for oh in range(OH):
            for ow in range(OW):
                where = argmax[n, c, oh, ow]
                # An index outside the plane cannot come from forward: skip it rather than write out of bounds.
                if 0 <= where < H * W:
                    ih, iw = where // W, where % W
                    if mask and not x[n, c, ih, iw] > 0:
                        continue
                    dx[n, c, ih, iw] += dy[n, c, oh, ow]


# Fast paths. The loops above take any window, stride and padding; their window loops have
# run-time bounds, and the comparisons of the running maximum become branches that random data
# mispredicts half the time: about 17 ns an output. The usual 2x2 window with stride 2 and no
# padding gets its own kernels, two rows of V/2 windows at a time in vector lanes (``pool_rows``,
# ``unpool_rows``): the comparisons are selects, and the backward writes each dx element dy or 0,
# running along dx's rows (each output's argmax compared with the positions below it), instead
# of zeroing the plane and scattering through a division by W per output; with the ReLU mask it
# reads x where it writes (contiguous) rather than at the argmax (a gather). Measured against the
# scatter (the mask on, same run): 0.61x on 128x16x28x28, 0.77x on 128x32x10x10, 0.63x on
# 128x6x28x28. A row's windows past the last multiple of V/2 are done by one more call that
# overlaps the one before it (the windows both cover get the same values twice), and a row of
# fewer than V/2 windows by one call of masked loads and stores. Against one window at a time
# (an AVX2 machine, 8 lanes, batch 64, the mask on, same process, forward and backward): 14x14
# planes 0.57x and 0.42x, 28x28 0.80x and 0.63x, 7x7 0.82x and 0.66x (24x24, no such row: 1.00x,
# 0.96x).


@njit(inline="always", cache=True)
def row_chunk(p0, OW, step):
    """(first window, windows) of the call for windows p0.. of a row of OW: ``step`` of them,
    the last call moved back to overlap the one before it; a row shorter than a call, whole."""
    if OW < step:
        return 0, OW
    return min(p0, OW - step), step


@njit(inline="always", cache=True)
def pool_2x2_body(tile, y, argmax, x):
    """Max pooling with a 2x2 window, stride 2, no padding: same results as ``_maxpool2d_forward_cpu``
    (the first of equal values wins; a NaN wins, the first NaN), V/2 windows a call of ``pool_rows``,
    a row's last call overlapping the one before it, a row of fewer windows in one short call."""
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    V = lanes(tile, x)
    for task in prange(N * C):
        for oh in range(OH):
            ih = 2 * oh
            at = task * OH * OW + oh * OW  # y's and argmax's flat index of (n, c, oh, 0)
            for p0 in range(0, OW, V // 2):
                p0, count = row_chunk(p0, OW, V // 2)
                pool_rows(tile, y, at + p0, argmax, x, (task * H + ih) * W + 2 * p0, W, ih * W + 2 * p0, W, count)


def _pool_2x2_for(tile):
    @njit(parallel=True, cache=True)
    def forward(y, argmax, x):
        pool_2x2_body(tile, y, argmax, x)

    return forward


# One compiled 2x2 forward per tile (the tile a constant: see kernels/matmul.py); the host's runs
_MAXPOOL_FORWARD_2X2 = tuple(_pool_2x2_for(tile) for tile in range(len(TILE_NAMES)))


@njit(inline="always", cache=True)
def unpool_2x2_body(tile, dx, dy, argmax, x, mask):
    """``_maxpool2d_backward_cpu`` for a 2x2 window, stride 2, no padding: the same dx, two rows and
    V/2 windows a call of ``unpool_rows`` (vector compares of the positions, no branch on the
    data), a row's last call overlapping the one before it, a row of fewer windows in one short
    call. A last row or column no window covers (odd H or W) gets 0."""
    N, C, H, W = dx.shape
    OH, OW = dy.shape[2], dy.shape[3]
    V = lanes(tile, dx)
    zero = dx.dtype.type(0)
    for task in prange(N * C):
        n, c = task // C, task % C
        plane = dx[n, c]
        for oh in range(OH):
            at = task * OH * OW + oh * OW  # dy's and argmax's flat index of (n, c, oh, 0)
            first = 2 * oh * W  # dx's (and argmax's) flat position of (2*oh, 0) in the plane
            for p0 in range(0, OW, V // 2):
                p0, count = row_chunk(p0, OW, V // 2)
                unpool_rows(tile, dx, task * H * W + first + 2 * p0, W, dy, at + p0, argmax, first + 2 * p0, W, x,
                            mask, True, count, 2 * count)
            for iw in range(2 * OW, W):
                plane[2 * oh, iw] = plane[2 * oh + 1, iw] = zero
        for ih in range(2 * OH, H):
            plane[ih, :] = zero


def _unpool_2x2_for(tile):
    @njit(parallel=True, cache=True)
    def backward(dx, dy, argmax, x, mask):
        unpool_2x2_body(tile, dx, dy, argmax, x, mask)

    return backward


# One compiled 2x2 backward per tile (the tile a constant: see kernels/matmul.py); the host's runs
_MAXPOOL_BACKWARD_2X2 = tuple(_unpool_2x2_for(tile) for tile in range(len(TILE_NAMES)))


@njit(parallel=True, cache=True)
def _avgpool2d_forward_cpu(y, x, fh, fw, sh, sw, ph, pw):
    """y[n, c, oh, ow] = sum of x over the window / (FH*FW). One task per plane (n, c)."""
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    scale = 1.0 / (fh * fw)
    for task in prange(N * C):
        n = task // C
        c = task % C
        for oh in range(OH):
            ih_lo, ih_hi = window_cpu(oh, fh, sh, ph, H)
            for ow in range(OW):
                iw_lo, iw_hi = window_cpu(ow, fw, sw, pw, W)
                y[n, c, oh, ow] = window_sum_cpu(x, n, c, ih_lo, ih_hi, iw_lo, iw_hi) * scale


@njit(parallel=True, cache=True)
def _avgpool2d_backward_cpu(dx, dy, fh, fw, sh, sw, ph, pw):
    """dx[n, c, ih, iw] = sum of dy over the outputs whose window covers (ih, iw), / (FH*FW)."""
    N, C, H, W = dx.shape
    OH, OW = dy.shape[2], dy.shape[3]
    scale = 1.0 / (fh * fw)
    for task in prange(N * C):
        n = task // C
        c = task % C
        for ih in range(H):
            oh_lo, oh_hi = covering_outputs_cpu(ih, fh, sh, ph, OH)
            for iw in range(W):
                ow_lo, ow_hi = covering_outputs_cpu(iw, fw, sw, pw, OW)
                dx[n, c, ih, iw] = window_sum_cpu(dy, n, c, oh_lo, oh_hi, ow_lo, ow_hi) * scale


# ---------------------------------------------------------------- public entry points


def maxpool2d_forward_cpu(y, argmax, x, kernel_h, kernel_w, stride_h=None, stride_w=None, pad_h=0, pad_w=0):
    """Max pooling of ``x`` (N, C, H, W) into ``y`` (N, C, OH, OW); ``argmax`` (N, C, OH, OW), int32 or int64,
    receives the flat index ``ih * W + iw`` of each maximum. A stride of None means the window size.
    Returns ``y``.
    """
    stride = default_stride(kernel_h, kernel_w, stride_h, stride_w)
    check_pool2d("maxpool2d_forward_cpu", on_host, ("x", x), ("y", y), (kernel_h, kernel_w), stride,
                 (pad_h, pad_w), ("argmax", argmax))
    if (kernel_h, kernel_w, *stride, pad_h, pad_w) == (2, 2, 2, 2, 0, 0):
        _MAXPOOL_FORWARD_2X2[TILE](y, argmax, x)
    else:
        _maxpool2d_forward_cpu(y, argmax, x, kernel_h, kernel_w, *stride, pad_h, pad_w)
    return y


def maxpool2d_backward_cpu(dx, dy, argmax, kernel_h, kernel_w, stride_h=None, stride_w=None, pad_h=0, pad_w=0):
    """Gradient of max pooling: ``dx`` (N, C, H, W) from ``dy`` and ``argmax`` (N, C, OH, OW). Returns ``dx``.

    The window settings are those of the forward call; they check the shapes (the CPU's
    general kernel scatters through ``argmax`` alone, its 2x2 one compares ``argmax`` with each
    window's positions, the CUDA kernel needs them to gather).
    """
    fn = "maxpool2d_backward_cpu"
    stride = default_stride(kernel_h, kernel_w, stride_h, stride_w)
    check_maxpool2d_backward(fn, on_host, dx, dy, argmax)
    check_pool2d(fn, on_host, ("dx", dx), ("dy", dy), (kernel_h, kernel_w), stride, (pad_h, pad_w))
    maxpool2d_backward_core_cpu(dx, dy, argmax, dx, kernel_h, kernel_w, *stride, pad_h, pad_w, False)  # dx is not read
    return dx


def avgpool2d_forward_cpu(y, x, kernel_h, kernel_w, stride_h=None, stride_w=None, pad_h=0, pad_w=0):
    """Average pooling of ``x`` (N, C, H, W) into ``y`` (N, C, OH, OW), padding counted as zeros. Returns ``y``."""
    stride = default_stride(kernel_h, kernel_w, stride_h, stride_w)
    check_pool2d("avgpool2d_forward_cpu", on_host, ("x", x), ("y", y), (kernel_h, kernel_w), stride,
                 (pad_h, pad_w))
    _avgpool2d_forward_cpu(y, x, kernel_h, kernel_w, *stride, pad_h, pad_w)
    return y


def avgpool2d_backward_cpu(dx, dy, kernel_h, kernel_w, stride_h=None, stride_w=None, pad_h=0, pad_w=0):
    """Gradient of average pooling: ``dx`` (N, C, H, W) from ``dy`` (N, C, OH, OW). Returns ``dx``."""
    stride = default_stride(kernel_h, kernel_w, stride_h, stride_w)
    check_pool2d("avgpool2d_backward_cpu", on_host, ("dx", dx), ("dy", dy), (kernel_h, kernel_w), stride,
                 (pad_h, pad_w))
    _avgpool2d_backward_cpu(dx, dy, kernel_h, kernel_w, *stride, pad_h, pad_w)
    return dx


# Unchecked cores, what nbcnn's planned step calls: the same arguments on both devices, the window
# settings already resolved (the stride is never None). ``x`` is the pooling's input; ``mask``
# multiplies dx by (x > 0), the backward of a ReLU just before the pooling, in the same pass.


def maxpool2d_forward_core_cpu(y, argmax, x, fh, fw, sh, sw, ph, pw):
    if fh == 2 and fw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0:
        _MAXPOOL_FORWARD_2X2[TILE](y, argmax, x)
    else:
        _maxpool2d_forward_cpu(y, argmax, x, fh, fw, sh, sw, ph, pw)


def maxpool2d_backward_core_cpu(dx, dy, argmax, x, fh, fw, sh, sw, ph, pw, mask):
    if fh == 2 and fw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0:
        _MAXPOOL_BACKWARD_2X2[TILE](dx, dy, argmax, x, mask)
    else:
        _maxpool2d_backward_cpu(dx, dy, argmax, x, mask)


def avgpool2d_forward_core_cpu(y, x, fh, fw, sh, sw, ph, pw):
    _avgpool2d_forward_cpu(y, x, fh, fw, sh, sw, ph, pw)


def avgpool2d_backward_core_cpu(dx, dy, x, fh, fw, sh, sw, ph, pw, mask):
    _avgpool2d_backward_cpu(dx, dy, fh, fw, sh, sw, ph, pw)
    if mask:
        relu_backward_core_cpu(dx, dx, x)


# ---------------------------------------------------------------------------- CUDA kernels

POOL_W, POOL_H = 32, 8  # block: a warp along W, 8 rows


@cuda.jit(device=True, inline="always")
def _plane_position():
    """(row, col) of this thread in a plane: threadIdx.x runs along the columns (a warp reads a row
    segment), threadIdx.y along the rows. The planes n*C + c are blockIdx.z, blockIdx.z + gridDim.z,
    ...: a grid-stride loop, so that gridDim.z stays within MAX_GRID_Z for any batch."""
    return cuda.blockIdx.y * POOL_H + cuda.threadIdx.y, cuda.blockIdx.x * POOL_W + cuda.threadIdx.x


@cuda.jit(cache=True)
def _maxpool2d_forward_kernel(y, argmax, x, fh, fw, sh, sw, ph, pw):
    """One thread per output position (oh, ow), threadIdx.x along OW, for every plane (n, c) in turn;
    grid (ceil(OW/32), ceil(OH/8), min(N*C, MAX_GRID_Z))."""
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    oh, ow = _plane_position()
    if oh >= OH or ow >= OW:
        return
    ih_lo, ih_hi = window_cuda(oh, fh, sh, ph, H)
    iw_lo, iw_hi = window_cuda(ow, fw, sw, pw, W)
    for z in range(cuda.blockIdx.z, N * C, cuda.gridDim.z):
        n, c = z // C, z % C
        y[n, c, oh, ow], argmax[n, c, oh, ow] = window_max_cuda(x, n, c, ih_lo, ih_hi, iw_lo, iw_hi)


@cuda.jit(cache=True)
def _maxpool2d_backward_kernel(dx, dy, argmax, x, fh, fw, sh, sw, ph, pw, mask):
    """One thread per input (n, c, ih, iw): the sum of dy over the covering outputs whose
    argmax is this input, zeroed where ``mask`` and x is not positive; every plane in turn, grid
    (ceil(W/32), ceil(H/8), min(N*C, MAX_GRID_Z))."""
    N, C, H, W = dx.shape
    OH, OW = dy.shape[2], dy.shape[3]
    ih, iw = _plane_position()
    if ih >= H or iw >= W:
        return
    oh_lo, oh_hi = covering_outputs_cuda(ih, fh, sh, ph, OH)
    ow_lo, ow_hi = covering_outputs_cuda(iw, fw, sw, pw, OW)
    for z in range(cuda.blockIdx.z, N * C, cuda.gridDim.z):
        n, c = z // C, z % C
        v = argmax_sum_cuda(dy, argmax, n, c, ih * W + iw, oh_lo, oh_hi, ow_lo, ow_hi)
        if mask and not x[n, c, ih, iw] > 0:  # the backward of a ReLU before the pooling
            v = dx.dtype.type(0)
        dx[n, c, ih, iw] = v


@cuda.jit(cache=True)
def _avgpool2d_forward_kernel(y, x, fh, fw, sh, sw, ph, pw):
    """One thread per output position (oh, ow): the window's sum / (FH*FW). Grid as max pooling's."""
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    oh, ow = _plane_position()
    if oh >= OH or ow >= OW:
        return
    ih_lo, ih_hi = window_cuda(oh, fh, sh, ph, H)
    iw_lo, iw_hi = window_cuda(ow, fw, sw, pw, W)
    scale = y.dtype.type(1.0 / (fh * fw))  # rounded once to y's dtype: float32 arithmetic for float32 data
    for z in range(cuda.blockIdx.z, N * C, cuda.gridDim.z):
        n, c = z // C, z % C
        y[n, c, oh, ow] = window_sum_cuda(x, n, c, ih_lo, ih_hi, iw_lo, iw_hi) * scale


@cuda.jit(cache=True)
def _avgpool2d_backward_kernel(dx, dy, x, fh, fw, sh, sw, ph, pw, mask):
    """One thread per input (n, c, ih, iw): the sum of dy over the covering outputs / (FH*FW),
    zeroed where ``mask`` and x is not positive; every plane in turn."""
    N, C, H, W = dx.shape
    OH, OW = dy.shape[2], dy.shape[3]
    ih, iw = _plane_position()
    if ih >= H or iw >= W:
        return
    oh_lo, oh_hi = covering_outputs_cuda(ih, fh, sh, ph, OH)
    ow_lo, ow_hi = covering_outputs_cuda(iw, fw, sw, pw, OW)
    scale = dx.dtype.type(1.0 / (fh * fw))
    for z in range(cuda.blockIdx.z, N * C, cuda.gridDim.z):
        n, c = z // C, z % C
        v = window_sum_cuda(dy, n, c, oh_lo, oh_hi, ow_lo, ow_hi) * scale
        if mask and not x[n, c, ih, iw] > 0:  # the backward of a ReLU before the pooling
            v = dx.dtype.type(0)
        dx[n, c, ih, iw] = v


# --------------------------------------------------------------------------- CUDA launchers


def _grid(N, C, rows, cols):
    return (blocks(cols, POOL_W), blocks(rows, POOL_H), grid_z(N * C))


def maxpool2d_forward_cuda(y, argmax, x, kernel_h, kernel_w, stride_h=None, stride_w=None, pad_h=0, pad_w=0):
    """Max pooling on the GPU; the arguments and shapes of ``maxpool2d_forward_cpu``."""
    fn = "maxpool2d_forward_cuda"
    y, argmax, x = gpu_arrays(fn, y=y, argmax=argmax, x=x)
    stride = default_stride(kernel_h, kernel_w, stride_h, stride_w)
    N, C, H, W, OH, OW = check_pool2d(fn, on_gpu, ("x", x), ("y", y), (kernel_h, kernel_w), stride,
                                      (pad_h, pad_w), ("argmax", argmax))
    _maxpool2d_forward_kernel[_grid(N, C, OH, OW), (POOL_W, POOL_H), stream()](
        y, argmax, x, kernel_h, kernel_w, *stride, pad_h, pad_w)
    return y


def maxpool2d_backward_cuda(dx, dy, argmax, kernel_h, kernel_w, stride_h=None, stride_w=None, pad_h=0, pad_w=0):
    """Gradient of max pooling on the GPU; the arguments of ``maxpool2d_backward_cpu``. Each
    thread gathers from the outputs whose window covers its input, so no two threads write
    the same element and no atomics are needed."""
    fn = "maxpool2d_backward_cuda"
    dx, dy, argmax = gpu_arrays(fn, dx=dx, dy=dy, argmax=argmax)
    stride = default_stride(kernel_h, kernel_w, stride_h, stride_w)
    check_maxpool2d_backward(fn, on_gpu, dx, dy, argmax)
    N, C, H, W, _, _ = check_pool2d(fn, on_gpu, ("dx", dx), ("dy", dy), (kernel_h, kernel_w), stride,
                                    (pad_h, pad_w))
    _maxpool2d_backward_kernel[_grid(N, C, H, W), (POOL_W, POOL_H), stream()](
        dx, dy, argmax, dx, kernel_h, kernel_w, *stride, pad_h, pad_w, False)
    return dx


def avgpool2d_forward_cuda(y, x, kernel_h, kernel_w, stride_h=None, stride_w=None, pad_h=0, pad_w=0):
    """Average pooling on the GPU; the arguments and shapes of ``avgpool2d_forward_cpu``."""
    fn = "avgpool2d_forward_cuda"
    y, x = gpu_arrays(fn, y=y, x=x)
    stride = default_stride(kernel_h, kernel_w, stride_h, stride_w)
    N, C, H, W, OH, OW = check_pool2d(fn, on_gpu, ("x", x), ("y", y), (kernel_h, kernel_w), stride,
                                      (pad_h, pad_w))
    _avgpool2d_forward_kernel[_grid(N, C, OH, OW), (POOL_W, POOL_H), stream()](y, x, kernel_h, kernel_w, *stride, pad_h, pad_w)
    return y


def avgpool2d_backward_cuda(dx, dy, kernel_h, kernel_w, stride_h=None, stride_w=None, pad_h=0, pad_w=0):
    """Gradient of average pooling on the GPU; the arguments of ``avgpool2d_backward_cpu``."""
    fn = "avgpool2d_backward_cuda"
    dx, dy = gpu_arrays(fn, dx=dx, dy=dy)
    stride = default_stride(kernel_h, kernel_w, stride_h, stride_w)
    N, C, H, W, _, _ = check_pool2d(fn, on_gpu, ("dx", dx), ("dy", dy), (kernel_h, kernel_w), stride,
                                    (pad_h, pad_w))
    _avgpool2d_backward_kernel[_grid(N, C, H, W), (POOL_W, POOL_H), stream()](dx, dy, dx, kernel_h, kernel_w, *stride, pad_h,
                                                                    pad_w, False)
    return dx


def maxpool2d_forward_core_cuda(y, argmax, x, fh, fw, sh, sw, ph, pw):
    N, C, OH, OW = y.shape
    _maxpool2d_forward_kernel[_grid(N, C, OH, OW), (POOL_W, POOL_H), stream()](y, argmax, x, fh, fw, sh, sw, ph, pw)


def maxpool2d_backward_core_cuda(dx, dy, argmax, x, fh, fw, sh, sw, ph, pw, mask):
    N, C, H, W = dx.shape
    _maxpool2d_backward_kernel[_grid(N, C, H, W), (POOL_W, POOL_H), stream()](dx, dy, argmax, x, fh, fw, sh, sw, ph, pw, mask)


def avgpool2d_forward_core_cuda(y, x, fh, fw, sh, sw, ph, pw):
    N, C, OH, OW = y.shape
    _avgpool2d_forward_kernel[_grid(N, C, OH, OW), (POOL_W, POOL_H), stream()](y, x, fh, fw, sh, sw, ph, pw)


def avgpool2d_backward_core_cuda(dx, dy, x, fh, fw, sh, sw, ph, pw, mask):
    N, C, H, W = dx.shape
    _avgpool2d_backward_kernel[_grid(N, C, H, W), (POOL_W, POOL_H), stream()](dx, dy, x, fh, fw, sh, sw, ph, pw, mask)
