"""Dense (fully connected) layer, forward and backward.

Letters: N batch, IN input features, OUT output features. x (N, IN), w (OUT, IN) as
PyTorch stores it, b (OUT,), y (N, OUT); gradients dx, dw, db, dy of the same shapes.

    y = x w^T + b          y[n, o] = b[o] + sum_i x[n, i] * w[o, i]
    dx = dy w              dx[n, i] = sum_o dy[n, o] * w[o, i]
    dw = dy^T x            dw[o, i] = sum_n dy[n, o] * x[n, i]
    db = sum_n dy[n, :]

Backward kernels overwrite their outputs. Each task owns whole rows of its output
(a row of dx per sample, a row of dw per output feature): no races.
"""

import numpy as np
from numba import njit, prange

from ._checks import check_arrays, check_ndim, check_shape, on_host

# ------------------------------------------------------------------------ argument checks


def check_dense(fn, on_device, x, w, y, b=None):
    """Check one dense call; ``(name, array)`` pairs in the roles x (N, IN), w (OUT, IN),
    y (N, OUT), b (OUT,). Returns ``(N, IN, OUT)``."""
    pairs = [x, w, y] + ([b] if b is not None else [])
    check_arrays(fn, on_device, dict(pairs))
    (xn, xa), (wn, wa), (yn, ya) = x, w, y
    check_ndim(fn, xn, xa, ("N", "IN"))
    check_ndim(fn, wn, wa, ("OUT", "IN"))
    N, IN = xa.shape
    OUT = wa.shape[0]
    check_shape(fn, wn, wa, (OUT, IN), ("OUT", "IN"))
    check_shape(fn, yn, ya, (N, OUT), ("N", "OUT"))
    if b is not None:
        check_shape(fn, b[0], b[1], (OUT,), ("OUT",))
    return N, IN, OUT


# ----------------------------------------------------------------------------- CPU kernels


@njit(parallel=True, cache=True)
def _dense_forward_cpu(y, x, w, b):
    """y[n, o] = b[o] + x[n, :] . w[o, :]; one task per output element, a dot product of contiguous rows."""
    N, IN = x.shape
    OUT = w.shape[0]
    for task in prange(N * OUT):
        n = task // OUT
        o = task % OUT
        acc = b[o]
        for i in range(IN):
            acc += x[n, i] * w[o, i]
        y[n, o] = acc


@njit(parallel=True, cache=True)
def _dense_backward_input_cpu(dx, dy, w):
    """dx[n, :] = sum_o dy[n, o] * w[o, :]; one task per sample, adding whole rows of w."""
    N, IN = dx.shape
    OUT = w.shape[0]
    for n in prange(N):
        dx[n, :] = 0
        for o in range(OUT):
            g = dy[n, o]
            for i in range(IN):
                dx[n, i] += g * w[o, i]


@njit(parallel=True, cache=True)
def _dense_backward_weight_cpu(dw, dy, x):
    """dw[o, :] = sum_n dy[n, o] * x[n, :]; one task per output feature, adding whole rows of x."""
    OUT, IN = dw.shape
    N = x.shape[0]
    for o in prange(OUT):
        dw[o, :] = 0
        for n in range(N):
            g = dy[n, o]
            for i in range(IN):
                dw[o, i] += g * x[n, i]


@njit(parallel=True, cache=True)
def _dense_backward_bias_cpu(db, dy):
    """db[o] = sum_n dy[n, o]; one task per output feature."""
    N, OUT = dy.shape
    for o in prange(OUT):
        acc = db.dtype.type(0)
        for n in range(N):
            acc += dy[n, o]
        db[o] = acc


# ---------------------------------------------------------------- public entry points


def dense_forward_cpu(y, x, w, b=None):
    """``y = x w^T + b``: x (N, IN), w (OUT, IN), b (OUT,) or None, y (N, OUT). Returns ``y``."""
    _, _, OUT = check_dense("dense_forward_cpu", on_host, ("x", x), ("w", w), ("y", y),
                            ("b", b) if b is not None else None)
    if b is None:
        b = np.zeros(OUT, dtype=x.dtype)
    _dense_forward_cpu(y, x, w, b)
    return y


def dense_backward_input_cpu(dx, dy, w):
    """``dx = dy w``: dx (N, IN), dy (N, OUT), w (OUT, IN). Returns ``dx``."""
    check_dense("dense_backward_input_cpu", on_host, ("dx", dx), ("w", w), ("dy", dy))
    _dense_backward_input_cpu(dx, dy, w)
    return dx


def dense_backward_weight_cpu(dw, dy, x):
    """``dw = dy^T x``: dw (OUT, IN), dy (N, OUT), x (N, IN). Returns ``dw``."""
    check_dense("dense_backward_weight_cpu", on_host, ("x", x), ("dw", dw), ("dy", dy))
    _dense_backward_weight_cpu(dw, dy, x)
    return dw


def dense_backward_bias_cpu(db, dy):
    """``db = sum_n dy[n, :]``: db (OUT,), dy (N, OUT). Returns ``db``."""
    fn = "dense_backward_bias_cpu"
    check_arrays(fn, on_host, {"db": db, "dy": dy})
    check_ndim(fn, "dy", dy, ("N", "OUT"))
    check_shape(fn, "db", db, (dy.shape[1],), ("OUT",))
    _dense_backward_bias_cpu(db, dy)
    return db
