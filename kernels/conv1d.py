"""The lecture's 1-D convolution: the product of two polynomials, and its Toeplitz matrix.

For p(t) = sum_i a_i t^i (degree la - 1) and s(t) = sum_i b_i t^i (degree lb - 1), the
product p(t) s(t) has the coefficients of the full convolution of a and b::

    d_j = sum_i a_i * b_{j-i},   j = 0 .. la + lb - 2   (terms with j - i outside b are 0)

The same product is a matrix-vector product ``d = T b`` with the Toeplitz matrix
T (la + lb - 1, lb), ``T[j, i] = a[j - i]`` where ``0 <= j - i < la``, else 0: each
column is a shifted down by one more row, the zeros being the padding.

The gradient of a convolution is a correlation: for a loss L with dL/dd = dd,

    da_i = sum_j dd_j * b_{j-i},   db_i = sum_j dd_j * a_{j-i}

which slides dd against the other factor without the flip. Backward overwrites da, db.
"""

from numba import cuda, njit, prange

from ._checks import check_arrays, check_ndim, check_shape, on_host
from ._cuda import blocks, gpu_arrays, on_gpu, stream

# ------------------------------------------------------------------------ argument checks


def check_conv1d(fn, on_device, d, a, b):
    """``(name, array)`` pairs in the roles d (la + lb - 1,), a (la,), b (lb,). Returns ``(la, lb)``."""
    check_arrays(fn, on_device, dict([d, a, b]))
    for name, arr in (a, b):
        check_ndim(fn, name, arr, (f"len({name})",))
        if arr.shape[0] < 1:
            raise ValueError(f"{fn}: {name} must hold at least one coefficient")
    la, lb = a[1].shape[0], b[1].shape[0]
    check_shape(fn, d[0], d[1], (la + lb - 1,), (f"len({a[0]}) + len({b[0]}) - 1",))
    return la, lb


def check_conv1d_backward(fn, on_device, da, db, dd, a, b):
    """da (la,), db (lb,), dd (la + lb - 1,)."""
    check_conv1d(fn, on_device, ("dd", dd), ("a", a), ("b", b))
    check_arrays(fn, on_device, {"dd": dd, "da": da, "db": db})
    check_shape(fn, "da", da, a.shape, ("len(a)",))
    check_shape(fn, "db", db, b.shape, ("len(b)",))


def check_toeplitz(fn, on_device, t, a):
    """t (la + n - 1, n), a (la,)."""
    check_arrays(fn, on_device, {"t": t, "a": a})
    check_ndim(fn, "a", a, ("la",))
    check_ndim(fn, "t", t, ("la + n - 1", "n"))
    la, n = a.shape[0], t.shape[1]
    if la < 1 or n < 1:
        raise ValueError(f"{fn}: a and the product's other factor need at least one coefficient each")
    check_shape(fn, "t", t, (la + n - 1, n), ("la + n - 1", "n"))


# ----------------------------------------------------------------------------- CPU kernels


@njit(parallel=True, cache=True)
def _conv1d_forward_cpu(d, a, b):
    """d[j] = sum_i a[i] * b[j - i]; one task per coefficient j, over the i that keep j - i inside b."""
    la, lb = a.shape[0], b.shape[0]
    for j in prange(la + lb - 1):
        acc = d.dtype.type(0)
        for i in range(max(0, j - lb + 1), min(la, j + 1)):
            acc += a[i] * b[j - i]
        d[j] = acc


@njit(parallel=True, cache=True)
def _conv1d_backward_cpu(da, db, dd, a, b):
    """da[i] = sum_j dd[j] * b[j - i] and db[i] = sum_j dd[j] * a[j - i]: correlations with dd."""
    la, lb = a.shape[0], b.shape[0]
    for i in prange(la + lb):
        if i < la:
            acc = da.dtype.type(0)
            for k in range(lb):
                acc += dd[i + k] * b[k]
            da[i] = acc
        else:
            r = i - la
            acc = db.dtype.type(0)
            for k in range(la):
                acc += dd[r + k] * a[k]
            db[r] = acc


@njit(parallel=True, cache=True)
def _toeplitz_matrix_cpu(t, a):
    """t[j, i] = a[j - i] where 0 <= j - i < la, else 0; one task per row j."""
    la = a.shape[0]
    rows, cols = t.shape
    for j in prange(rows):
        for i in range(cols):
            t[j, i] = a[j - i] if 0 <= j - i < la else 0


# ---------------------------------------------------------------- public entry points


def conv1d_forward_cpu(d, a, b):
    """Full convolution ``d = a * b`` (the coefficients of the product of two polynomials).

    a: (la,), b: (lb,), d: (la + lb - 1,). Equals ``numpy.convolve(a, b)``. Returns ``d``.
    """
    check_conv1d("conv1d_forward_cpu", on_host, ("d", d), ("a", a), ("b", b))
    _conv1d_forward_cpu(d, a, b)
    return d


def conv1d_backward_cpu(da, db, dd, a, b):
    """Gradients ``da`` (la,) and ``db`` (lb,) of a loss whose gradient to ``d = a * b`` is ``dd``. Returns ``(da, db)``."""
    check_conv1d_backward("conv1d_backward_cpu", on_host, da, db, dd, a, b)
    _conv1d_backward_cpu(da, db, dd, a, b)
    return da, db


def toeplitz_matrix_cpu(t, a):
    """Toeplitz matrix ``t`` (la + n - 1, n) of ``a`` (la,), so that ``t @ b == conv(a, b)`` for b of length n.

    Returns ``t``.
    """
    check_toeplitz("toeplitz_matrix_cpu", on_host, t, a)
    _toeplitz_matrix_cpu(t, a)
    return t


# ---------------------------------------------------------------------------- CUDA kernels

THREADS = 128


@cuda.jit(cache=True)
def _conv1d_forward_kernel(d, a, b):
    """d[j] = sum_i a[i] * b[j - i]; one thread per coefficient j."""
    la, lb = a.shape[0], b.shape[0]
    j = cuda.grid(1)
    if j >= la + lb - 1:
        return
    acc = d.dtype.type(0)
    for i in range(max(0, j - lb + 1), min(la, j + 1)):
        acc += a[i] * b[j - i]
    d[j] = acc


@cuda.jit(cache=True)
def _conv1d_backward_kernel(da, db, dd, a, b):
    """Threads 0 .. la-1 compute da[i], threads la .. la+lb-1 compute db[i - la]."""
    la, lb = a.shape[0], b.shape[0]
    i = cuda.grid(1)
    if i < la:
        acc = da.dtype.type(0)
        for k in range(lb):
            acc += dd[i + k] * b[k]
        da[i] = acc
    elif i < la + lb:
        r = i - la
        acc = db.dtype.type(0)
        for k in range(la):
            acc += dd[r + k] * a[k]
        db[r] = acc


@cuda.jit(cache=True)
def _toeplitz_matrix_kernel(t, a):
    """t[j, i] = a[j - i] inside the band, else 0; one thread per element, threads along a row."""
    la = a.shape[0]
    rows, cols = t.shape
    idx = cuda.grid(1)
    if idx >= rows * cols:
        return
    j, i = idx // cols, idx % cols
    t[j, i] = a[j - i] if 0 <= j - i < la else 0


# --------------------------------------------------------------------------- CUDA launchers


def conv1d_forward_cuda(d, a, b):
    """Full convolution on the GPU; the arguments of ``conv1d_forward_cpu``."""
    fn = "conv1d_forward_cuda"
    d, a, b = gpu_arrays(fn, d=d, a=a, b=b)
    check_conv1d(fn, on_gpu, ("d", d), ("a", a), ("b", b))
    _conv1d_forward_kernel[blocks(d.shape[0], THREADS), THREADS, stream()](d, a, b)
    return d


def conv1d_backward_cuda(da, db, dd, a, b):
    """Gradients of the full convolution on the GPU; the arguments of ``conv1d_backward_cpu``."""
    fn = "conv1d_backward_cuda"
    da, db, dd, a, b = gpu_arrays(fn, da=da, db=db, dd=dd, a=a, b=b)
    check_conv1d_backward(fn, on_gpu, da, db, dd, a, b)
    _conv1d_backward_kernel[blocks(a.shape[0] + b.shape[0], THREADS), THREADS, stream()](da, db, dd, a, b)
    return da, db


def toeplitz_matrix_cuda(t, a):
    """Toeplitz matrix on the GPU; the arguments of ``toeplitz_matrix_cpu``."""
    fn = "toeplitz_matrix_cuda"
    t, a = gpu_arrays(fn, t=t, a=a)
    check_toeplitz(fn, on_gpu, t, a)
    _toeplitz_matrix_kernel[blocks(t.size, THREADS), THREADS, stream()](t, a)
    return t
