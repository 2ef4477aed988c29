"""The join of a residual connection: two paths' outputs added, forward and backward.

A residual block computes y = F(x) + S(x), F the block and S the shortcut (the identity,
or a projection where the shape changes). Forward adds the two outputs; with ``relu`` it
also applies the ReLU that follows the join (ResNet's basic block ends that way), in the
same pass::

    y = a + b,      or  max(a + b, 0)

Backward is the lecture's rule for a fork: x fed two paths, so the gradient reaching x is
the sum of the gradients coming back along each; the join itself passes dy unchanged to
both. The kernel here adds the two input gradients; with ``mask`` it also applies the
backward of a ReLU before the block (dx is zero where that ReLU's output x was not positive)::

    dx = da + db,   or  (da + db) * (x > 0)

Every array has one shape (any), processed as a flat vector; outputs are overwritten and
may be one of the inputs.
"""

from numba import cuda, prange

from ._checks import check_arrays, check_shape, on_host
from ._cpu import parallel_and_serial
from ._cuda import blocks, flat, gpu_arrays, on_gpu, stream
from ._index import compile_twice


def _check(fn, on_device, arrays):
    check_arrays(fn, on_device, arrays)
    first = next(iter(arrays))
    for name, a in arrays.items():
        check_shape(fn, name, a, arrays[first].shape)


# ----------------------------------------------------------------------------- CPU kernels


def join(y, a, b, i, relu):
    """y[i] = a[i] + b[i], through the ReLU with ``relu``."""
    v = a[i] + b[i]
    y[i] = v if (not relu or v > 0) else 0


def fork(dx, da, db, x, i, mask):
    """dx[i] = da[i] + db[i], zero where ``mask`` and x[i] <= 0."""
    dx[i] = da[i] + db[i] if (not mask or x[i] > 0) else 0


_join, _join_cuda = compile_twice(join)
_fork, _fork_cuda = compile_twice(fork)


@parallel_and_serial
def _residual_add_forward_cpu(y, a, b, relu):
    for i in prange(y.size):
        _join(y, a, b, i, relu)


@parallel_and_serial
def _residual_add_backward_cpu(dx, da, db, x, mask):
    for i in prange(dx.size):
        _fork(dx, da, db, x, i, mask)


# ---------------------------------------------------------------- public entry points


def residual_add_forward_cpu(y, a, b, relu=False):
    """``y = a + b`` (then ``max(., 0)`` with ``relu``); all of one shape and dtype. Returns ``y``."""
    _check("residual_add_forward_cpu", on_host, {"y": y, "a": a, "b": b})
    residual_add_forward_core_cpu(y, a, b, bool(relu))
    return y


def residual_add_backward_cpu(dx, da, db, x=None, mask=False):
    """``dx = da + db`` (zero where ``x <= 0`` with ``mask``: the ReLU before the block); all of
    one shape. Returns ``dx``."""
    fn = "residual_add_backward_cpu"
    if mask and x is None:
        raise ValueError(f"{fn}: mask=True needs x, the output of the ReLU before the block")
    _check(fn, on_host, {"dx": dx, "da": da, "db": db, "x": da if x is None else x})
    residual_add_backward_core_cpu(dx, da, db, da if x is None else x, bool(mask))
    return dx


def residual_add_forward_core_cpu(y, a, b, relu):
    """``residual_add_forward_cpu`` without the checks."""
    forward = _residual_add_forward_cpu.for_size(y.size)
    forward(y.reshape(-1), a.reshape(-1), b.reshape(-1), relu)


def residual_add_backward_core_cpu(dx, da, db, x, mask):
    """``residual_add_backward_cpu`` without the checks (``x`` is read only with ``mask``)."""
    backward = _residual_add_backward_cpu.for_size(dx.size)
    backward(dx.reshape(-1), da.reshape(-1), db.reshape(-1), x.reshape(-1), mask)


# ---------------------------------------------------------------------------- CUDA kernels

THREADS = 256


@cuda.jit(cache=True)
def _residual_add_forward_kernel(y, a, b, relu):
    """One thread per element of the flat vectors."""
    i = cuda.grid(1)
    if i < y.size:
        _join_cuda(y, a, b, i, relu)


@cuda.jit(cache=True)
def _residual_add_backward_kernel(dx, da, db, x, mask):
    """One thread per element of the flat vectors."""
    i = cuda.grid(1)
    if i < dx.size:
        _fork_cuda(dx, da, db, x, i, mask)


# --------------------------------------------------------------------------- CUDA launchers


def residual_add_forward_core_cuda(y, a, b, relu):
    """``residual_add_forward_cuda`` without the checks."""
    _residual_add_forward_kernel[blocks(y.size, THREADS), THREADS, stream()](flat(y), flat(a), flat(b), relu)


def residual_add_backward_core_cuda(dx, da, db, x, mask):
    """``residual_add_backward_cuda`` without the checks."""
    _residual_add_backward_kernel[blocks(dx.size, THREADS), THREADS, stream()](flat(dx), flat(da), flat(db),
                                                                                flat(x), mask)


def residual_add_forward_cuda(y, a, b, relu=False):
    """``residual_add_forward_cpu`` on the GPU."""
    fn = "residual_add_forward_cuda"
    y, a, b = gpu_arrays(fn, y=y, a=a, b=b)
    _check(fn, on_gpu, {"y": y, "a": a, "b": b})
    residual_add_forward_core_cuda(y, a, b, bool(relu))
    return y


def residual_add_backward_cuda(dx, da, db, x=None, mask=False):
    """``residual_add_backward_cpu`` on the GPU."""
    fn = "residual_add_backward_cuda"
    dx, da, db, x = gpu_arrays(fn, dx=dx, da=da, db=db, x=x)
    if mask and x is None:
        raise ValueError(f"{fn}: mask=True needs x, the output of the ReLU before the block")
    _check(fn, on_gpu, {"dx": dx, "da": da, "db": db, "x": da if x is None else x})
    residual_add_backward_core_cuda(dx, da, db, da if x is None else x, bool(mask))
    return dx
