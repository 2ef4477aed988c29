"""The dispatcher: one table from (op, device) to kernel, output allocation, device checks.

Each function here takes arrays that all live on one device, allocates the outputs
there, and calls the kernel the table names for that device. The kernels' own entry
points check shapes, dtypes and contiguity (with messages naming the shapes); this
module adds the one check they cannot make, that no call mixes host and GPU arrays.
There are no hidden copies between host and device. This is the only module of nbcnn
that imports ``nbcnn.kernels``.
"""

import sys
import threading

import numpy as np

from nbcnn.device import device_of
from nbcnn.kernels import activation, conv2d, dense, gather, optim, pool2d, softmax_xent
from nbcnn.kernels._checks import output_size

# On the CPU, convolution goes through im2col and one BLAS product (conv2d/gemm.py) and the
# dense layer through BLAS products: several times faster than the direct loops
# (conv2d/cpu.py, dense.py), which stay as the tested reference.
KERNELS = {
    ("conv2d_forward", "cpu"): conv2d.conv2d_forward_gemm_cpu,
    ("conv2d_forward", "cuda"): conv2d.conv2d_forward_cuda,
    ("conv2d_backward_input", "cpu"): conv2d.conv2d_backward_input_gemm_cpu,
    ("conv2d_backward_input", "cuda"): conv2d.conv2d_backward_input_cuda,
    ("conv2d_backward_weight", "cpu"): conv2d.conv2d_backward_weight_gemm_cpu,
    ("conv2d_backward_weight", "cuda"): conv2d.conv2d_backward_weight_cuda,
    ("conv2d_backward_bias", "cpu"): conv2d.conv2d_backward_bias_cpu,
    ("conv2d_backward_bias", "cuda"): conv2d.conv2d_backward_bias_cuda,
    # All three gradients in one call: on the CPU one transposition of dy serves them all, the
    # bias gradient is summed on the way, and the forward pass's im2col matrix is reused.
    ("conv2d_backward", "cpu"): conv2d.conv2d_backward_gemm_cpu,
    ("maxpool2d_forward", "cpu"): pool2d.maxpool2d_forward_cpu,
    ("maxpool2d_forward", "cuda"): pool2d.maxpool2d_forward_cuda,
    ("maxpool2d_backward", "cpu"): pool2d.maxpool2d_backward_cpu,
    ("maxpool2d_backward", "cuda"): pool2d.maxpool2d_backward_cuda,
    ("avgpool2d_forward", "cpu"): pool2d.avgpool2d_forward_cpu,
    ("avgpool2d_forward", "cuda"): pool2d.avgpool2d_forward_cuda,
    ("avgpool2d_backward", "cpu"): pool2d.avgpool2d_backward_cpu,
    ("avgpool2d_backward", "cuda"): pool2d.avgpool2d_backward_cuda,
    ("relu_forward", "cpu"): activation.relu_forward_cpu,
    ("relu_forward", "cuda"): activation.relu_forward_cuda,
    ("relu_backward", "cpu"): activation.relu_backward_cpu,
    ("relu_backward", "cuda"): activation.relu_backward_cuda,
    ("dense_forward", "cpu"): dense.dense_forward_blas_cpu,
    ("dense_forward", "cuda"): dense.dense_forward_cuda,
    ("dense_backward_input", "cpu"): dense.dense_backward_input_blas_cpu,
    ("dense_backward_input", "cuda"): dense.dense_backward_input_cuda,
    ("dense_backward_weight", "cpu"): dense.dense_backward_weight_blas_cpu,
    ("dense_backward_weight", "cuda"): dense.dense_backward_weight_cuda,
    ("dense_backward_bias", "cpu"): dense.dense_backward_bias_cpu,
    ("dense_backward_bias", "cuda"): dense.dense_backward_bias_cuda,
    ("softmax_xent_forward", "cpu"): softmax_xent.softmax_xent_forward_cpu,
    ("softmax_xent_forward", "cuda"): softmax_xent.softmax_xent_forward_cuda,
    ("softmax_xent_backward", "cpu"): softmax_xent.softmax_xent_backward_cpu,
    ("softmax_xent_backward", "cuda"): softmax_xent.softmax_xent_backward_cuda,
    ("sgd_update", "cpu"): optim.sgd_update_cpu,
    ("sgd_update", "cuda"): optim.sgd_update_cuda,
    ("adam_update", "cpu"): optim.adam_update_cpu,
    ("adam_update", "cuda"): optim.adam_update_cuda,
    ("fill", "cpu"): optim.fill_cpu,
    ("fill", "cuda"): optim.fill_cuda,
    ("gather_rows", "cpu"): gather.gather_rows_cpu,
    ("gather_rows", "cuda"): gather.gather_rows_cuda,
    ("count_correct", "cpu"): softmax_xent.count_correct_cpu,
    ("count_correct", "cuda"): softmax_xent.count_correct_cuda,
}


def common_device(op, **arrays):
    """The one device all the named arrays live on; raises if they are split or not arrays."""
    where = {}
    for name, a in arrays.items():
        try:
            where[name] = device_of(a)
        except TypeError:
            raise TypeError(f"{op}: {name} must be a NumPy or GPU array, got {type(a).__name__}") from None
    devices = set(where.values())
    if len(devices) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in where.items())
        raise ValueError(f"{op}: inputs live on different devices ({listed}); move them with nbcnn.to_device")
    return devices.pop()


def kernel(op, device):
    """The kernel the table names for ``op`` on ``device``."""
    return KERNELS[(op, device)]


class HostPool:
    """Host arrays recycled across training steps, so that the steady state allocates nothing.

    Every output the dispatcher returns on the CPU comes from here. The pool keeps a reference
    to each array it hands out, and hands an array out again only when that reference is the
    last one: when nothing else (no caller, no layer keeping it for backward, no view of it)
    can see it any more. A step's activations and gradients are dead by the next step, so the
    next step gets the same arrays back; arrays a caller still holds are never reused. Without
    it, each step asked the allocator for fresh memory for each activation and paid the page
    faults of touching it (about 800 a step for LeNet).

    At most ``per_shape`` arrays are kept per (shape, dtype) and ``limit`` bytes in all; past
    that, arrays are plain ``np.empty`` ones that the pool does not keep.
    """

    def __init__(self, per_shape=8, limit=1 << 29):
        self.per_shape, self.limit = per_shape, limit
        self.arrays, self.nbytes = {}, 0
        self.fresh = 0  # arrays allocated so far (not recycled): flat in the steady state
        self.lock = threading.Lock()
        # What _references reports for an array that only a bucket holds, measured rather than
        # assumed: how many references the interpreter's own frames add varies between versions.
        self.only_the_pool = self._references([np.empty(0)])[0]

    @staticmethod
    def _references(bucket):
        return [sys.getrefcount(a) for a in bucket]

    def empty(self, shape, dtype):
        key = (tuple(int(d) for d in shape), np.dtype(dtype))
        with self.lock:
            bucket = self.arrays.setdefault(key, [])
            for i, count in enumerate(self._references(bucket)):
                if count == self.only_the_pool:
                    return bucket[i]
            a = np.empty(*key)
            self.fresh += 1
            if len(bucket) < self.per_shape and self.nbytes + a.nbytes <= self.limit:
                bucket.append(a)
                self.nbytes += a.nbytes
            return a


host_pool = HostPool()


def empty(shape, dtype, device):
    """An uninitialised array on ``device`` (on the CPU, recycled through ``host_pool``)."""
    if device == "cpu":
        return host_pool.empty(shape, dtype)
    from numba import cuda

    return cuda.device_array(shape, dtype)


def zeros(shape, dtype, device):
    """An array of zeros on ``device``, filled there (no copy from the host)."""
    return fill(empty(shape, dtype, device), 0.0)


def fill(a, value):
    kernel("fill", common_device("fill", a=a))(a, value)
    return a


def spatial_output(who, H, W, window, stride, padding, what="window"):
    """(OH, OW) of a window sliding over an H x W input, ``OH = (H + 2*P - FH) // S + 1``;
    a ValueError naming ``who`` and the numbers when the window does not fit."""
    return (output_size(who, H, window[0], stride[0], padding[0], "height", what),
            output_size(who, W, window[1], stride[1], padding[1], "width", what))


# ----------------------------------------------------------------------------- convolution


def conv2d_forward(x, w, b, stride, padding, saved=None):
    """y (N, K, OH, OW) = conv(x (N, C, H, W), w (K, C, FH, FW)) + b (K,) or no bias.

    ``saved``: a dict kept by the caller between forward and backward. On the CPU the
    forward pass leaves in it the im2col matrix of ``x`` (and ``x`` itself), which
    ``conv2d_backward(..., saved=saved)`` then reuses instead of recomputing it; the
    matrix is allocated once and reused while the shapes stay the same.
    """
    args = dict(x=x, w=w) if b is None else dict(x=x, w=w, b=b)
    device = common_device("conv2d", **args)
    if len(x.shape) != 4 or len(w.shape) != 4:
        raise ValueError(f"conv2d: x must be (N, C, H, W) and w (K, C, FH, FW), got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    N, C, H, W = x.shape
    K, _, FH, FW = w.shape
    shape = (N, K) + spatial_output("conv2d", H, W, (FH, FW), stride, padding, "kernel")
    y = empty(shape, x.dtype, device)
    if device == "cpu" and saved is not None:
        cols_shape = (C * FH * FW, N * shape[2] * shape[3])
        cols = saved.get("cols")
        if cols is None or cols.shape != cols_shape or cols.dtype != x.dtype:
            cols = np.empty(cols_shape, x.dtype)
        saved.clear()
        kernel("conv2d_forward", device)(y, x, w, b, *stride, *padding, cols=cols)
        saved.update(cols=cols, x=x)
    else:
        kernel("conv2d_forward", device)(y, x, w, b, *stride, *padding)
    return y


def conv2d_backward(dy, x, w, stride, padding, need_dx=True, dw=None, db=None, has_bias=True, saved=None):
    """(dx or None, dw, db or None) of a convolution, from dy (N, K, OH, OW).

    ``dw`` and ``db`` may be given to be overwritten (a parameter's ``grad``), else they are
    allocated; ``has_bias=False`` skips the bias gradient. ``saved``: the dict given to
    ``conv2d_forward`` for this same ``x``.
    """
    device = common_device("conv2d backward", dy=dy, x=x, w=w)
    dx = empty(x.shape, x.dtype, device) if need_dx else None
    dw = empty(w.shape, w.dtype, device) if dw is None else dw
    if has_bias:
        db = empty((w.shape[0],), w.dtype, device) if db is None else db
    else:
        db = None
    if device == "cpu":
        cols = saved.get("cols") if saved is not None and saved.get("x") is x else None
        kernel("conv2d_backward", device)(dx, dw, db, dy, x, w, *stride, *padding, cols=cols)
        return dx, dw, db
    if need_dx:
        kernel("conv2d_backward_input", device)(dx, dy, w, *stride, *padding)
    kernel("conv2d_backward_weight", device)(dw, dy, x, *stride, *padding)
    if db is not None:
        kernel("conv2d_backward_bias", device)(db, dy)
    return dx, dw, db


# --------------------------------------------------------------------------------- pooling


def _pool_shape(op, x, window, stride, padding):
    if len(x.shape) != 4:
        raise ValueError(f"{op}: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    return (N, C) + spatial_output(op, H, W, window, stride, padding)


def maxpool2d_forward(x, window, stride, padding):
    """(y, argmax), both (N, C, OH, OW); argmax int32, the flat index of each maximum in its plane."""
    device = common_device("max pooling", x=x)
    shape = _pool_shape("max pooling", x, window, stride, padding)
    y = empty(shape, x.dtype, device)
    argmax = empty(shape, np.int32, device)
    kernel("maxpool2d_forward", device)(y, argmax, x, *window, *stride, *padding)
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape, window, stride, padding):
    device = common_device("max pooling backward", dy=dy, argmax=argmax)
    dx = empty(x_shape, dy.dtype, device)
    kernel("maxpool2d_backward", device)(dx, dy, argmax, *window, *stride, *padding)
    return dx


def avgpool2d_forward(x, window, stride, padding):
    device = common_device("average pooling", x=x)
    y = empty(_pool_shape("average pooling", x, window, stride, padding), x.dtype, device)
    kernel("avgpool2d_forward", device)(y, x, *window, *stride, *padding)
    return y


def avgpool2d_backward(dy, x_shape, window, stride, padding):
    device = common_device("average pooling backward", dy=dy)
    dx = empty(x_shape, dy.dtype, device)
    kernel("avgpool2d_backward", device)(dx, dy, *window, *stride, *padding)
    return dx


# ------------------------------------------------------------------------ activation, dense


def relu_forward(x):
    device = common_device("relu", x=x)
    y = empty(x.shape, x.dtype, device)
    kernel("relu_forward", device)(y, x)
    return y


def relu_backward(dy, y):
    device = common_device("relu backward", dy=dy, y=y)
    dx = empty(y.shape, y.dtype, device)
    kernel("relu_backward", device)(dx, dy, y)
    return dx


def dense_forward(x, w, b):
    """y (N, OUT) = x (N, IN) w^T + b."""
    args = dict(x=x, w=w) if b is None else dict(x=x, w=w, b=b)
    device = common_device("dense", **args)
    if len(x.shape) != 2:
        raise ValueError(f"dense: x must be (N, IN), got shape {tuple(x.shape)} (use Flatten before Dense)")
    y = empty((x.shape[0], w.shape[0]), x.dtype, device)
    kernel("dense_forward", device)(y, x, w, b)
    return y


def dense_backward(dy, x, w, need_dx=True, dw=None, db=None, has_bias=True):
    """(dx or None, dw, db or None) of a dense layer; ``dw``, ``db`` and ``has_bias`` as in
    ``conv2d_backward``."""
    device = common_device("dense backward", dy=dy, x=x, w=w)
    dx = None
    if need_dx:
        dx = empty(x.shape, x.dtype, device)
        kernel("dense_backward_input", device)(dx, dy, w)
    dw = empty(w.shape, w.dtype, device) if dw is None else dw
    kernel("dense_backward_weight", device)(dw, dy, x)
    if not has_bias:
        return dx, dw, None
    db = empty((w.shape[0],), w.dtype, device) if db is None else db
    kernel("dense_backward_bias", device)(db, dy)
    return dx, dw, db


# --------------------------------------------------------------------------- loss, updates


def softmax_xent_forward(logits, labels):
    """(loss, probs): loss a (1,) array on the logits' device holding the mean loss."""
    device = common_device("softmax cross-entropy", logits=logits, labels=labels)
    if len(logits.shape) != 2:
        raise ValueError(f"softmax cross-entropy: logits must be (N, classes), got shape {tuple(logits.shape)}")
    loss = empty((1,), logits.dtype, device)
    probs = empty(logits.shape, logits.dtype, device)
    kernel("softmax_xent_forward", device)(loss, probs, logits, labels)
    return loss, probs


def softmax_xent_backward(probs, labels):
    device = common_device("softmax cross-entropy backward", probs=probs, labels=labels)
    d = empty(probs.shape, probs.dtype, device)
    kernel("softmax_xent_backward", device)(d, probs, labels)
    return d


def sgd_update(param, velocity, grad, lr, momentum, weight_decay):
    device = common_device("SGD", param=param, velocity=velocity, grad=grad)
    kernel("sgd_update", device)(param, velocity, grad, lr, momentum, weight_decay)


def adam_update(param, m, v, grad, lr, beta1, beta2, eps, step):
    device = common_device("Adam", param=param, m=m, v=v, grad=grad)
    kernel("adam_update", device)(param, m, v, grad, lr, beta1, beta2, eps, step)


# ---------------------------------------------------------------------------- data, metrics


def gather_rows(x, idx, out=None):
    """out[i] = x[idx[i]] (a minibatch from a data set), on the data's device."""
    device = common_device("gather", x=x, idx=idx)
    if out is None:
        out = empty((idx.shape[0],) + tuple(x.shape[1:]), x.dtype, device)
    kernel("gather_rows", device)(out, x, idx)
    return out


def count_correct(logits, labels):
    """(1,) int64 array on the logits' device: how many rows' argmax equals the label."""
    device = common_device("accuracy", logits=logits, labels=labels)
    count = empty((1,), np.int64, device)
    kernel("count_correct", device)(count, logits, labels)
    return count
