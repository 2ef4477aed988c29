"""The dispatcher: one registry from (op, device, algorithm) to a kernel and its cost model.

This is the only module of nbcnn that imports ``nbcnn.kernels``. Each entry is a
``Kernel``: the unchecked core a planned step calls (``run``), what scratch it needs
(``workspace``), and its cost model (``cost``: FLOPs and bytes from its arguments). Every
op has the same call shape on every device, outputs first, then inputs, then integers and
flags, then the scratch, so nothing above this module asks which device it runs on:

    kernel = REGISTRY.get("conv2d_forward", device)          # once, when a step is planned
    kernel.run(y, x, w, b, sh, sw, ph, pw, relu, ws)          # every step, no checks

The cores do no checking: the layers check shapes, dtypes and devices once, when they plan
a step, and the kernels' public entry points (``conv2d_forward_cpu`` ...) keep their
checks for people who call them directly. Tools that want to see every call (the
profiler) pass a wrapper of the registry to the plan instead of patching it.

The fused ops: ``relu`` in a forward applies the ReLU that follows the layer; ``mask`` in a
backward multiplies dx by (x > 0), the backward of the ReLU before it. One launch then
does what two did, which matters most on a GPU, where a step is bound by launches.
"""

import numpy as np

from nbcnn.device import device_of, resolve_device
from nbcnn.kernels import (activation, augment, batchnorm, conv2d, dense, dropout, gather, global_pool, optim, pool2d,
                           residual, softmax_xent)
from nbcnn.kernels._checks import is_c_contiguous, output_size
from nbcnn.kernels.activation import KINDS as ACTIVATION_KINDS  # the activation kernels' codes, by name
from nbcnn.kernels.conv2d import cpu as conv_cpu
from nbcnn.kernels.conv2d import cuda as conv_cuda
from nbcnn.kernels.conv2d import gemm as conv_gemm
from nbcnn.kernels.conv2d import maxima as conv_maxima
from nbcnn.kernels.conv2d import pooled as conv_pooled


def _n(a):
    return int(np.prod(a.shape, dtype=np.int64))


def _bytes(*arrays):
    return sum(_n(a) * np.dtype(a.dtype).itemsize for a in arrays if a is not None)


def _taps(w):
    """C*FH*FW: the multiply-adds behind one output of a convolution."""
    return int(np.prod(w.shape[1:]))


# (flops, bytes) of one kernel call, from its arguments (outputs first, as the kernels take them).
# FLOPs count a multiply-add as two operations and a comparison as one; bytes are the least
# traffic a kernel needs, every array it reads or writes once. The entries named after the
# kernels' public entry points cost those calls (nbcnn bench times them); the others cost the
# cores a planned step runs.
COSTS = {
    "conv2d_forward": lambda y, x, w, b, *_: (2 * _n(y) * _taps(w), _bytes(y, x, w, b)),
    "conv2d_backward_input": lambda dx, dy, w, *_: (2 * _n(dy) * _taps(w), _bytes(dx, dy, w)),
    "conv2d_backward_weight": lambda dw, dy, x, *_: (2 * _n(dy) * _taps(dw), _bytes(dw, dy, x)),
    "conv2d_backward_bias": lambda db, dy: (_n(dy), _bytes(db, dy)),
    # the three above in one call (dx and db may be None)
    "conv2d_backward": lambda dx, dw, db, dy, x, w, *_: (
        2 * _n(dy) * _taps(w) * (1 if dx is None else 2) + (0 if db is None else _n(dy)),
        _bytes(dx, dw, db, dy, x, w)),
    # a first convolution and the 2x2 max pooling after it in one op (its output, 4 per pooled
    # value, never stored; the FLOPs exact for an even output, a row or column short for an odd one)
    "conv2d_maxpool_forward": lambda yp, am, x, w, b, *_: (
        2 * 4 * _n(yp) * _taps(w) + 4 * _n(yp), _bytes(yp, am, x, w, b)),
    "conv2d_maxpool_backward": lambda dw, db, dyp, am, yp, x, w, *_: (
        2 * 4 * _n(dyp) * _taps(w) + (0 if db is None else _n(dyp)), _bytes(dw, db, dyp, am, yp, x)),
    # its backward with the input gradient (a full convolution of the unpooled gradient) in one pass
    "conv2d_maxpool_backward_input": lambda dx, dw, db, dyp, am, yp, x, w, *_: (
        2 * 2 * 4 * _n(dyp) * _taps(w) + (0 if db is None else _n(dyp)), _bytes(dx, dw, db, dyp, am, yp, x, w)),
    # a later convolution's backward from the gradient of the 2x2 max pooling after it: counted
    # as the dense backward it replaces (the work done for the layer), which it does a quarter of
    "conv2d_maxima_backward": lambda dx, dw, db, dyp, am, yp, x, w, *_: (
        2 * 4 * _n(dyp) * _taps(w) * (1 if dx is None else 2) + (0 if db is None else _n(dyp)),
        _bytes(dx, dw, db, dyp, am, yp, x, w)),
    "maxpool2d_forward": lambda y, am, x, fh, fw, *_: (_n(y) * fh * fw, _bytes(y, am, x)),
    "maxpool2d_backward": lambda dx, dy, am, *_: (_n(dy), _bytes(dx, dy, am)),
    "avgpool2d_forward": lambda y, x, fh, fw, *_: (_n(y) * fh * fw, _bytes(y, x)),
    "avgpool2d_backward": lambda dx, dy, fh, fw, *_: (_n(dy) * fh * fw, _bytes(dx, dy)),
    "relu_forward": lambda y, x: (_n(x), _bytes(y, x)),
    "relu_backward": lambda dx, dy, y: (_n(y), _bytes(dx, dy, y)),
    # the other activations: a few operations per element (a transcendental counted as one)
    "activation_forward": lambda y, x, *_: (4 * _n(x), _bytes(y, x)),
    "activation_backward": lambda dx, dy, x, y, *_: (5 * _n(x), _bytes(dx, dy, x, y)),
    # a residual block's join: an add (and the ReLU's max) per element; its backward an add
    "residual_add_forward": lambda y, a, b, *_: (2 * _n(y), _bytes(y, a, b)),
    "residual_add_backward": lambda dx, da, db, x, mask: (_n(dx), _bytes(dx, da, db) + (_bytes(x) if mask else 0)),
    "dense_forward": lambda y, x, w, b, *_: (2 * _n(x) * w.shape[0], _bytes(y, x, w, b)),
    "dense_backward_input": lambda dx, dy, w: (2 * _n(dx) * w.shape[0], _bytes(dx, dy, w)),
    "dense_backward_weight": lambda dw, dy, x: (2 * _n(x) * dw.shape[0], _bytes(dw, dy, x)),
    "dense_backward_bias": lambda db, dy: (_n(dy), _bytes(db, dy)),
    "dense_backward": lambda dx, dw, db, dy, x, w, *_: (
        2 * _n(x) * w.shape[0] * (1 if dx is None else 2) + (0 if db is None else _n(dy)),
        _bytes(dx, dw, db, dy, x, w)),
    # max, subtract, exp, sum, divide per logit
    "softmax_xent_forward": lambda loss, p, z, lab: (5 * _n(z), _bytes(loss, p, z, lab)),
    "softmax_xent_backward": lambda d, p, lab: (2 * _n(p), _bytes(d, p, lab)),
    # the forward's 5, the gradient's 2 and the argmax's 1 per logit
    "softmax_xent_step": lambda sums, p, d, z, lab, *_: (8 * _n(z), _bytes(sums, p, d, z, lab)),
    # g + wd*p (2), mu*v + g (2), p - lr*v (2); reads p, v, g, writes p, v
    "sgd_update": lambda p, v, g, *_: (6 * _n(p), _bytes(p, v, g) + _bytes(p, v)),
    # m (3), v (4), the step (sqrt, two divides, add, multiply-subtract: 6); reads p, m, v, g, writes p, m, v
    "adam_update": lambda p, m, v, g, *_: (13 * _n(p), _bytes(p, m, v, g) + _bytes(p, m, v)),
    # AdamW: Adam's 13 and the decay's multiply
    "adamw_update": lambda p, m, v, g, *_: (14 * _n(p), _bytes(p, m, v, g) + _bytes(p, m, v)),
    # statistics (two passes: 3 per value), normalise (multiply-add, and the ReLU's max: 3)
    "batchnorm2d_forward": lambda y, mean, invstd, rm, rv, x, *_: (6 * _n(x), 2 * _bytes(x) + _bytes(y)),
    # the two sums (4 per value), dx (5 per value)
    "batchnorm2d_backward": lambda dx, dg, db, dy, x, *_: (9 * _n(x), 2 * _bytes(dy, x) + _bytes(dx)),
    # a hash of about 10 integer operations and a multiply per element
    "dropout_forward": lambda y, x, *_: (_n(x), _bytes(y, x)),
    "dropout_backward": lambda dx, dy, *_: (_n(dy), _bytes(dx, dy)),
    "global_avgpool2d_forward": lambda y, x: (_n(x), _bytes(y, x)),
    "global_avgpool2d_backward": lambda dx, dy, x, mask: (_n(dx), _bytes(dx, dy)),
    "shift_flip": lambda out, x, *_: (0, _bytes(out, x)),
    "fill": lambda a, value: (0, _bytes(a)),
    # the sum of squares (2 per element), and the scaling (1) where it clips: the bound counted
    "clip_grad_norm": lambda g, norm, *_: (3 * _n(g), 2 * _bytes(g)),
    "gather_rows": lambda out, x, idx: (0, 2 * _bytes(out) + _bytes(idx)),
    "gather_batch": lambda xb, yb, x, y, idx: (0, 2 * _bytes(xb, yb) + _bytes(idx)),
    "count_correct": lambda count, z, lab: (_n(z), _bytes(count, z, lab)),
}


# Where a core's arguments differ from its public entry point's.
CORE_COSTS = {
    "avgpool2d_backward": lambda dx, dy, x, fh, fw, *_: (_n(dy) * fh * fw, _bytes(dx, dy)),
}


def cost(op, args):
    """(flops, bytes) of a call of ``op``'s kernel with ``args``."""
    return COSTS[op](*args)


def _no_workspace(*shapes):
    return {}


class Kernel:
    """One registry entry: ``run(*args)`` the unchecked core, ``workspace(...)`` the scratch it
    needs as {name: shape} (the plan allocates it), ``cost(args)`` its FLOPs and bytes."""

    __slots__ = ("op", "device", "algorithm", "run", "workspace")

    def __init__(self, op, device, algorithm, run, workspace=None):
        self.op, self.device, self.algorithm, self.run = op, device, algorithm, run
        self.workspace = workspace or _no_workspace

    def cost(self, args):
        return CORE_COSTS.get(self.op, COSTS[self.op])(*args)

    def __repr__(self):
        return f"Kernel({self.op!r}, {self.device!r}, {self.algorithm!r})"


class Registry:
    """(op, device, algorithm) -> Kernel, with one default algorithm per (op, device)."""

    def __init__(self):
        self.entries, self.defaults = {}, {}

    def add(self, op, device, algorithm, run, workspace=None, default=True):
        self.entries[(op, device, algorithm)] = Kernel(op, device, algorithm, run, workspace)
        if default or (op, device) not in self.defaults:
            self.defaults[(op, device)] = algorithm

    def get(self, op, device, algorithm=None):
        """The kernel for ``op`` on ``device`` ("cpu"/"cuda" or a Device); the default algorithm
        unless one is named."""
        kind = getattr(device, "kind", device)
        if algorithm is None:
            algorithm = self.defaults[(op, kind)]
        try:
            return self.entries[(op, kind, algorithm)]
        except KeyError:
            known = sorted(a for (o, d, a) in self.entries if o == op and d == kind)
            raise ValueError(f"no {algorithm!r} kernel for {op} on {kind}: choose one of {known}") from None

    def algorithms(self, op, device):
        return sorted(a for (o, d, a) in self.entries if o == op and d == getattr(device, "kind", device))

    def replace_all(self, run):
        """Make every entry run ``run`` instead (benchmarks/public_api_step.py measures the host's
        part of a step this way, with kernels that do nothing). Not for ordinary use."""
        for kernel in self.entries.values():
            kernel.run = run


REGISTRY = Registry()
_add = REGISTRY.add

# On the CPU, convolution is a matrix product in nbcnn's own register tiles (kernels/matmul.py):
# Winograd's F(2x2, 3x3) for 3x3 filters at stride 1 (conv2d/winograd.py), implicit at stride 1
# otherwise (conv2d/implicit.py), through im2col for other strides, direct kernels for a few
# input channels (conv2d/gemm.py); the loops of the definition (conv2d/cpu.py) stay available as
# "direct". On a GPU, implicit matrix products in register-blocked tiles (conv2d/cuda.py); the
# simpler shared-memory kernels they replaced stay available as "tiled".
_add("conv2d_forward", "cpu", "gemm", conv_gemm.conv2d_forward_core_cpu, conv_gemm.conv2d_workspace_cpu)
_add("conv2d_backward", "cpu", "gemm", conv_gemm.conv2d_backward_core_cpu, conv_gemm.conv2d_workspace_cpu)
_add("conv2d_forward", "cpu", "direct", conv_cpu.conv2d_forward_direct_core_cpu,
     conv_cpu.conv2d_workspace_direct_cpu, default=False)
_add("conv2d_backward", "cpu", "direct", conv_cpu.conv2d_backward_direct_core_cpu,
     conv_cpu.conv2d_workspace_direct_cpu, default=False)
_add("conv2d_forward", "cuda", "gemm", conv_cuda.conv2d_forward_core_cuda, conv_cuda.conv2d_workspace_cuda)
_add("conv2d_backward", "cuda", "gemm", conv_cuda.conv2d_backward_core_cuda, conv_cuda.conv2d_workspace_cuda)
_add("conv2d_forward", "cuda", "tiled", conv_cuda.conv2d_forward_direct_core_cuda,
     conv_cuda.conv2d_workspace_direct_cuda, default=False)
_add("conv2d_backward", "cuda", "tiled", conv_cuda.conv2d_backward_direct_core_cuda,
     conv_cuda.conv2d_workspace_direct_cuda, default=False)
# A model's first convolution with the 2x2 max pooling after it (nbcnn.layers.fuse): on the CPU
# its own kernels for few input channels, elsewhere the two ops' cores in turn. FUSED_POOL: the
# pooling it computes (window h, w, stride h, w, padding h, w).
FUSED_POOL = conv_pooled.POOL
for _device in ("cpu", "cuda"):
    for _op in ("conv2d_maxpool_forward", "conv2d_maxpool_backward"):
        _add(_op, _device, "gemm", getattr(conv_pooled, f"{_op}_core_{_device}"),
             getattr(conv_pooled, f"conv2d_maxpool_workspace_{_device}"))
# Its input gradient straight from the pooled gradient, on the CPU (few input channels): a layer
# without it unfuses the two ops when asked for dx. The one op that exists on one device only.
ONE_DEVICE = {"conv2d_maxpool_backward_input": "cpu"}
_add("conv2d_maxpool_backward_input", "cpu", "gemm", conv_pooled.conv2d_maxpool_backward_input_core_cpu,
     conv_pooled.conv2d_maxpool_backward_input_workspace_cpu)
# A later convolution's backward through the 2x2 max pooling after it, from the pooled gradient
# and the maxima (stride 1, on the CPU): nbcnn.layers.fuse gives it the pooling's backward.
ONE_DEVICE["conv2d_maxima_backward"] = "cpu"
_add("conv2d_maxima_backward", "cpu", "gemm", conv_maxima.conv2d_maxima_backward_core_cpu,
     conv_maxima.conv2d_maxima_backward_workspace_cpu)

for _device in ("cpu", "cuda"):
    _algorithm = "loops" if _device == "cpu" else "threads"
    _mod = {"cpu": "_cpu", "cuda": "_cuda"}[_device]
    for _op, _module in [("maxpool2d_forward", pool2d), ("maxpool2d_backward", pool2d),
                         ("avgpool2d_forward", pool2d), ("avgpool2d_backward", pool2d),
                         ("relu_forward", activation), ("relu_backward", activation),
                         ("activation_forward", activation), ("activation_backward", activation),
                         ("residual_add_forward", residual), ("residual_add_backward", residual),
                         ("softmax_xent_step", softmax_xent), ("gather_batch", gather),
                         ("sgd_update", optim), ("adam_update", optim), ("adamw_update", optim),
                         ("fill", optim), ("clip_grad_norm", optim),
                         ("batchnorm2d_forward", batchnorm), ("batchnorm2d_backward", batchnorm),
                         ("dropout_forward", dropout), ("dropout_backward", dropout),
                         ("global_avgpool2d_forward", global_pool), ("global_avgpool2d_backward", global_pool),
                         ("shift_flip", augment)]:
        _add(_op, _device, _algorithm, getattr(_module, f"{_op}_core{_mod}"),
             getattr(_module, f"{_op}_workspace{_mod}", None))  # scratch, where a core needs it
    # Dense layers: register-tiled products on both devices (kernels/matmul.py on the CPU; on a GPU
    # with fused epilogues) (the simpler one-output-a-thread product stays available as "tiled").
    _add("dense_forward", _device, "gemm", getattr(dense, f"dense_forward_core{_mod}"),
         dense.dense_workspace_cpu if _device == "cpu" else None)
    _add("dense_backward", _device, "gemm", getattr(dense, f"dense_backward_core{_mod}"),
         dense.dense_workspace_cpu if _device == "cpu" else lambda *shapes: {"one": (1,)})
_add("dense_forward", "cuda", "tiled", dense.dense_forward_tiled_core_cuda, default=False)
_add("dense_backward", "cuda", "tiled", dense.dense_backward_tiled_core_cuda, lambda *shapes: {"one": (1,)},
     default=False)


# ------------------------------------------------------------------------ checks, used once


def spatial_output(who, H, W, window, stride, padding, what="window"):
    """(OH, OW) of a window sliding over an H x W input, ``OH = (H + 2*P - FH) // S + 1``;
    a ValueError naming ``who`` and the numbers when the window does not fit."""
    return (output_size(who, H, window[0], stride[0], padding[0], "height", what),
            output_size(who, W, window[1], stride[1], padding[1], "width", what))


def check_input(who, x, device):
    """``x`` must be an array on ``device``, C-contiguous, float32 or float64."""
    try:
        where = device_of(x)
    except TypeError:
        raise TypeError(f"{who}: x must be a NumPy or GPU array, got {type(x).__name__}") from None
    if where != device.kind:
        raise ValueError(f"{who}: the input is on {where} but the model is on {device.kind}; "
                         f"move it with nbcnn.to_device(x, {device.kind!r})")
    if not is_c_contiguous(x):
        raise ValueError(f"{who}: the input must be C-contiguous (np.ascontiguousarray makes a contiguous copy)")
    if np.dtype(x.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{who}: the input must be float32 or float64, got {np.dtype(x.dtype)}")


def gather_rows(x, idx, out=None):
    """out[i] = x[idx[i]] (a minibatch from a data set), on the data's device, through the checked public
    kernels. Allocates ``out`` when not given; a planned step gathers with the ``gather_batch`` core."""
    where = {device_of(x), device_of(idx)}
    if len(where) > 1:
        raise ValueError("gather: x and idx live on different devices; move them with nbcnn.to_device")
    device = resolve_device(where.pop())
    if out is None:
        out = device.empty((idx.shape[0],) + tuple(x.shape[1:]), x.dtype)
    public_kernel(f"gather_rows_{device.kind}")(out, x, idx)
    return out


def public_kernel(name):
    """A kernel's public, checked entry point by its name (``conv2d_forward_cpu`` ...), for tools
    that time the kernels as a user calls them (nbcnn bench)."""
    for module in (conv2d, pool2d, activation, residual, dense, softmax_xent, optim, gather, batchnorm, dropout,
                   global_pool, augment):
        if hasattr(module, name):
            return getattr(module, name)
    raise ValueError(f"no kernel named {name}")
