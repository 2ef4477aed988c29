"""Layers: explicit forward and backward, the backpropagation of the lecture, no autograd.

Each layer turns the gradient of the loss with respect to its output, ``dy``, into the
gradient with respect to its input, ``dx``, writing its parameters' gradients into
``Parameter.grad`` on the way (overwriting them: one backward per forward).
``backward(dy, need_dx=False)`` skips the gradient to the input where nothing needs it
(the first layer of a network being trained): for a convolution that is a third of its
backward pass.

How a layer runs: planned once, then only run. The first ``forward`` for an input shape
makes a *plan* (``Layer.plan``): it checks the shapes, dtypes and devices, computes the
output shape, picks the kernels from the registry (``nbcnn.ops.REGISTRY``), and
allocates the output, the input gradient and the kernels' scratch on the layer's
device. Every later call with that shape only runs the kernels on those buffers: no
checks, no allocation. ``forward`` therefore returns the plan's own output array, which
the next forward overwrites (copy it to keep it), as ``backward`` returns its ``dx``.
A ``Sequential`` plans its layers together and fuses each ReLU into its neighbours.

Inputs are batched: (N, C, H, W) for convolution and pooling, (N, features) for Dense.
"""

import math
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from nbcnn import ops
from nbcnn.checks import LARGEST, check_choice, check_instance, check_int, check_pair, check_real
from nbcnn.device import CPU, device_of, resolve_device, to_device, to_numpy
from nbcnn.parameter import Parameter

_rng = np.random.default_rng(0)

ALGORITHMS = ("gemm", "direct", "tiled")  # Conv2D(algorithm=...); None lets the registry choose


def set_seed(seed):
    """Seed the generator that initialises new layers' weights (He initialisation)."""
    global _rng
    _rng = np.random.default_rng(check_int("set_seed", "seed", seed, minimum=0))


def _pair(layer, name, value, minimum):
    """A window's size, stride or padding: an int or a pair (h, w) of ints, as two ints."""
    return check_pair(layer, name, value, minimum=minimum, maximum=LARGEST)


def _count(layer, name, value):
    """A size or count: an integer from 1 to the largest the kernels index."""
    return check_int(layer, name, value, minimum=1, maximum=LARGEST)


def _weights(layer, shape, fan_in):
    """He-initialised float32 weights of ``shape``, refused at once when they could not be indexed."""
    count = math.prod(shape)
    if count > LARGEST:
        raise ValueError(f"{layer}: {count:,} weights is more than the kernels can index ({LARGEST:,})")
    return _rng.normal(0.0, math.sqrt(2.0 / fan_in), shape).astype(np.float32)


# ------------------------------------------------------------------------------------ plans


class Plan:
    """What one layer needs to run forward and backward on inputs of one shape.

    ``in_shape``, ``out_shape``, ``dtype`` and ``device`` are fixed when the plan is made;
    ``allocate`` makes the buffers (after a Sequential has decided the fusions, which
    change what is needed). ``relu``: this layer applies the ReLU that follows it.
    ``mask``: this layer's dx includes the backward of the ReLU before it.
    """

    fuses_relu = False  # the forward can apply a following ReLU in the same pass
    masks = False  # the backward can apply a preceding ReLU's backward in the same pass
    is_relu = False  # a ReLU, which its neighbours may take over (``fuse``)
    pooling = None  # a pooling plan's Pooling (kind, window, stride, padding)
    pool = None  # the pooling plan this one computes too (``fuse``)

    def __init__(self, layer, in_shape, dtype, device, kernels):
        self.layer, self.in_shape, self.dtype, self.device = layer, tuple(in_shape), np.dtype(dtype), device
        self.out_shape = tuple(layer.output_shape(self.in_shape))
        self.relu = self.mask = False
        self.x = None  # the last forward's input (a view the caller owns)
        self.dx = None

    def take_relu(self):
        """From now on this plan's forward applies the ReLU after it (its class says it can)."""
        self.relu = True

    def take_mask(self):
        """From now on this plan's backward applies the backward of the ReLU before it."""
        self.mask = True

    def can_compute(self, pooling_plan):
        """Whether this plan's own kernels can compute ``pooling_plan``'s pooling as well."""
        return False

    def can_take_backward(self, pooling_plan):
        """Whether this plan's backward can do ``pooling_plan``'s backward as well."""
        return False

    def allocate(self, need_dx):
        if need_dx:
            self._dx()

    def _dx(self):
        if self.dx is None:
            self.dx = self.device.empty(self.in_shape, self.dtype)
        return self.dx

    def _check_parameters(self):
        for name, p in (("w", getattr(self.layer, "weight", None)), ("b", getattr(self.layer, "bias", None))):
            if p is None:
                continue
            if p.dtype != self.dtype:
                raise TypeError(f"{self.layer!r}: {name} is {p.dtype} but x is {self.dtype}; all float arrays "
                                f"of one call must share a dtype")
            if p.device.kind != self.device.kind:
                raise ValueError(f"{self.layer!r}: the input is on {self.device.kind} but the parameters are on "
                                 f"{p.device.kind}; move the layer with .to({self.device.kind!r})")

    def _workspace(self, shapes):
        """The plan's scratch, ``{name: shape}`` added to what it holds. A buffer asked for again
        with more room in any dimension is replaced: a first layer planned without its input gradient and asked for
        it after all needs more room in per-thread scratch that the forward sized for itself (only
        scratch changes size that way; what a forward leaves for the backward keeps its shape)."""
        ws = getattr(self, "ws", None) or SimpleNamespace()
        for name, shape in shapes.items():
            have = getattr(ws, name, None)
            if have is None or have.ndim != len(shape) or any(a < b for a, b in zip(have.shape, shape)):
                setattr(ws, name, self.device.empty(shape, self.dtype))
        self.ws = ws
        return ws


PLANS_KEPT = 4  # input shapes whose plans a layer or model keeps at once


class Pooling(NamedTuple):
    """A pooling layer's settings, by name: ``kind`` ("max" or "average"), then (h, w) pairs."""

    kind: str
    kernel: tuple
    stride: tuple
    padding: tuple

    @classmethod
    def of(cls, kind, layer):
        return cls(kind, layer.kernel_size, layer.stride, layer.padding)

    @property
    def settings(self):
        """The kernels' arguments: window h, w, stride h, w, padding h, w."""
        return (*self.kernel, *self.stride, *self.padding)


# The pooling a model's first convolution computes in its own kernels (nbcnn.kernels.conv2d.pooled)
FUSED_POOLING = Pooling("max", ops.FUSED_POOL[0:2], ops.FUSED_POOL[2:4], ops.FUSED_POOL[4:6])


def fuse(plans):
    """Decide every fusion of a model's plans, in one walk, asking each plan what it can take over;
    before anything is allocated (fusion changes what each plan needs).

    - A ReLU is applied by the layer before it where that layer's forward can (``fuses_relu``), and
      its backward is done by the layer after it where that layer's backward can (``masks``).
    - A model that starts Conv2D -> [ReLU] -> MaxPool2D(2) computes the pooling in the convolution's
      kernels (``can_compute``): its output, four times the pooled one, is never stored. Only for
      the first layer, whose input gradient the step seldom needs.
    - A later Conv2D -> [ReLU] -> MaxPool2D(2) runs the two ops' backward as one where the
      convolution's kernels can (``can_take_backward``): from the pooled gradient and the maxima
      alone, never writing the convolution's output gradient, three quarters zeros.
    """
    for i, plan in enumerate(plans):
        before = plans[i - 1] if i > 0 else None
        after = plans[i + 1] if i + 1 < len(plans) else None
        if plan.is_relu:
            if before is not None and before.fuses_relu and not before.relu:
                before.take_relu()
                plan.applied_by_previous()
            if after is not None and after.masks:
                after.take_mask()
                plan.masked_by_next()
        elif plan.pooling is not None:
            source = _source(plans, i)
            if source == 0 and plans[0].can_compute(plan):
                plans[0].fuse_pool(plan)
            elif source is not None and plans[source].can_take_backward(plan):
                plans[source].take_backward(plan)


def _source(plans, i):
    """The index of the plan whose output plans[i] reads: the one before it, or the one before a ReLU
    that both took over entirely (None for the first plan)."""
    before = plans[i - 1] if i > 0 else None
    if before is not None and before.is_relu and before.in_previous and before.in_next:
        return i - 2
    return i - 1 if i > 0 else None


class Layer:
    """Base class: ``forward(x) -> y``, ``backward(dy) -> dx``, ``parameters()``, ``buffers()``,
    ``train()`` / ``eval()``, ``output_shape(input_shape)``, ``plan(...)``."""

    training = True
    Plan = None  # the plan class of this layer; None for layers without kernels of their own
    _plans = None
    _current = None

    def parameters(self):
        return []

    def buffers(self):
        """Non-trainable state (running statistics ...), as {name: array}; save, load and resume carry it."""
        return {}

    def train(self, mode=True):
        """Training mode (the default for a new layer); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode; returns self."""
        return self.train(False)

    @property
    def device(self):
        params = self.parameters()
        return params[0].device if params else getattr(self, "_device", CPU)

    def to(self, device):
        device = resolve_device(device)
        for p in self.parameters():
            p.to(device)
        self._device = device
        self._plans = self._current = None
        return self

    def output_shape(self, input_shape):
        """The shape ``forward`` returns for an input of ``input_shape`` (raises if impossible)."""
        return tuple(input_shape)

    def config(self):
        """Constructor arguments, enough to rebuild the layer (``Sequential.save`` stores them)."""
        return {}

    def plan(self, in_shape, dtype, device, kernels=ops.REGISTRY, spans=None):
        """A plan of this layer for inputs of ``in_shape`` and ``dtype`` on ``device``, kernels taken
        from ``kernels`` (the registry, or a profiler's wrapper of it). Checks everything once.
        ``spans`` labels the layers of a Sequential for a profiler; a single layer has none."""
        return self.Plan(self, in_shape, dtype, resolve_device(device), kernels)

    # A layer or model called on its own plans itself, one plan per input shape (PLANS_KEPT at most,
    # the oldest dropped), and reuses the plan while the shape stays. ``kernels`` and ``spans`` are
    # where its plans take their kernels and labels (a profiler sets them with ``instrument``).

    kernels = ops.REGISTRY
    spans = None

    def instrument(self, kernels=ops.REGISTRY, spans=None):
        """Plan from now on with ``kernels`` (a profiler's wrapper of the registry) and label each layer's
        forward and backward with ``spans``; the defaults undo it. Drops the plans made so far."""
        self.kernels, self.spans = kernels, spans
        self._plans = self._current = None
        return self

    def _input_device(self, where):
        """The device a plan for an input on ``where`` runs on: the parameters', else the input's."""
        return self.device if self.parameters() else resolve_device(where)

    def _plan_for(self, x):
        """The plan for ``x`` (made, checked and allocated the first time its shape is seen)."""
        try:
            where = device_of(x)
        except TypeError:
            raise TypeError(f"{type(self).__name__}.forward: x must be a NumPy or GPU array, got "
                            f"{type(x).__name__}") from None
        device = self._input_device(where)
        ops.check_input(f"{type(self).__name__}.forward", x, device)
        if self._plans is None:
            self._plans = {}
        key = (tuple(x.shape), np.dtype(x.dtype))
        plan = self._plans.get(key)
        if plan is None or plan.stamp != Parameter.rebinds:
            plan = self.plan(x.shape, x.dtype, device, self.kernels, self.spans)
            plan.allocate(need_dx=True)
            plan.stamp = Parameter.rebinds
            if len(self._plans) >= PLANS_KEPT:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        plan.in_type = type(x)
        return plan

    def forward(self, x):
        plan = self._current
        if (plan is None or plan.stamp != Parameter.rebinds or tuple(x.shape) != plan.in_shape
                or type(x) is not plan.in_type or x.dtype != plan.dtype or not _contiguous(x)):
            plan = self._current = self._plan_for(x)
        plan.ran = True
        return plan.forward(x)

    __call__ = forward

    def backward(self, dy, need_dx=True):
        """The gradient to the input, from ``dy`` the gradient to the last forward's output; None with
        ``need_dx=False`` (only the parameters' gradients are wanted)."""
        plan = self._current
        if plan is None or not getattr(plan, "ran", False):
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        if tuple(dy.shape) != plan.out_shape:
            raise ValueError(f"{type(self).__name__}.backward: dy has shape {tuple(dy.shape)}, the forward's "
                             f"output {plan.out_shape}")
        return plan.backward(dy, need_dx)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def _contiguous(x):
    flags = getattr(x, "flags", None)
    if flags is not None and not isinstance(flags, dict):
        return flags.c_contiguous
    return ops.is_c_contiguous(x)


# ------------------------------------------------------------------------------ convolution


class _Conv2DPlan(Plan):
    fuses_relu = masks = True

    def __init__(self, layer, in_shape, dtype, device, kernels):
        super().__init__(layer, in_shape, dtype, device, kernels)
        self._check_parameters()
        self.kernels = kernels
        self.fwd = kernels.get("conv2d_forward", device, layer.algorithm)
        self.bwd = kernels.get("conv2d_backward", device, layer.algorithm)
        self.settings = (*layer.stride, *layer.padding)
        self.pool = None  # the max pooling plan this one computes too (fuse_pool)
        self.pool_backward = None  # the max pooling plan whose backward this one does (take_backward)
        self.y = self.dy = None  # the output, and its full-size gradient (only when fused and dx is asked for)

    def can_compute(self, pooling_plan):
        """The 2x2 max pooling right after this convolution (or after the ReLU it applies), with the
        default algorithm (a named one, "direct" or "tiled", keeps its own kernels)."""
        return (self.layer.algorithm is None and pooling_plan.pooling == FUSED_POOLING
                and pooling_plan.mask == self.relu)

    def can_take_backward(self, pooling_plan):
        """The 2x2 max pooling after this convolution (or after the ReLU it applies), at stride 1,
        with the default algorithm, where the device has the kernel (the CPU)."""
        if not (self.layer.algorithm is None and pooling_plan.pooling == FUSED_POOLING
                and pooling_plan.mask == self.relu and self.layer.stride == (1, 1)):
            return False
        try:
            self.kernels.get("conv2d_maxima_backward", self.device)
        except (KeyError, ValueError):  # no such kernel on this device
            return False
        return True

    def take_backward(self, pool):
        """Do ``pool``'s backward in this layer's: the weight and input gradients straight from the
        pooled gradient and the maxima (nbcnn.kernels.conv2d.maxima), a quarter of the dense
        backward's work. The forward stays the two ops'."""
        self.pool_backward = pool
        pool.hand_over_backward()
        self.bwd = self.kernels.get("conv2d_maxima_backward", self.device)

    def fuse_pool(self, pool):
        """Compute ``pool``'s 2x2 max pooling in this layer's own kernels (a model's first layer: see
        nbcnn.kernels.conv2d.pooled); called by ``fuse`` before anything is allocated. Asked for the
        input gradient, the fused op computes it from the pooled gradient where a kernel does (the
        CPU, few input channels); elsewhere the first such backward unfuses the two ops."""
        self.pool = pool
        pool.hand_over()
        self.pfwd = self.kernels.get("conv2d_maxpool_forward", self.device)
        self.pbwd = self.kernels.get("conv2d_maxpool_backward", self.device)
        try:
            self.pdx = self.kernels.get("conv2d_maxpool_backward_input", self.device)
        except (KeyError, ValueError):  # no such kernel on this device
            self.pdx = None

    def _scratch(self, need_dx):
        L = self.layer
        shape_args = (self.in_shape, L.weight.shape, self.out_shape, L.stride, L.padding, need_dx, self.dtype)
        return self._workspace({**self.fwd.workspace(*shape_args), **self.bwd.workspace(*shape_args)})

    def allocate(self, need_dx):
        super().allocate(need_dx)
        self.zeros = self.device.zeros(self.out_shape[1], self.dtype) if self.layer.bias is None else None
        if self.pool is None:
            self.y = self.device.empty(self.out_shape, self.dtype)
            self._scratch(need_dx)
            return
        L = self.layer
        self._workspace(self.pfwd.workspace(self.in_shape, L.weight.shape, L.stride, L.padding, self.dtype))
        if need_dx:
            self._fused_dx_scratch()

    def _fused_dx_scratch(self):
        """The input gradient of the fused op: its own kernel's scratch where there is one, else
        what the two ops need."""
        if self.pdx is None:
            return self._unfused_scratch()
        L = self.layer
        self._workspace(self.pdx.workspace(self.in_shape, L.weight.shape, L.stride, L.padding, self.dtype))
        return self._dx()

    def _unfused_scratch(self):
        """What the two ops need when the input gradient is asked for after all: the convolution's
        output and scratch, the full-size gradient the pooling writes."""
        if self.y is None:
            self.y = self.device.empty(self.out_shape, self.dtype)
            self.dy = self.device.empty(self.out_shape, self.dtype)
            self._scratch(True)
        return self._dx()

    def forward(self, x):
        L = self.layer
        self.x = x
        b = self.zeros if L.bias is None else L.bias.data
        if self.pool is not None:
            pool = self.pool
            self.pfwd.run(pool.y, pool.argmax, x, L.weight.data, b, *self.settings, self.relu, self.ws)
            return pool.y
        self.fwd.run(self.y, x, L.weight.data, b, *self.settings, self.relu, self.ws)
        return self.y

    def backward(self, dy, need_dx):
        L = self.layer
        db = None if L.bias is None else L.bias.grad
        if self.pool is not None:  # dy is the pooling's (its plan passed it on)
            pool = self.pool
            if need_dx:  # dx, dw and db in one pass where a kernel gives dx from the pooled gradient
                dx = self._fused_dx_scratch()
                if self.pdx is None or not self.pdx.run(dx, L.weight.grad, db, dy, pool.argmax, pool.y, self.x,
                                                        L.weight.data, *self.settings, self.relu, self.ws):
                    return self._backward_unfused(dy, db)
                return dx
            self.pbwd.run(L.weight.grad, db, dy, pool.argmax, pool.y, self.x, L.weight.data, *self.settings,
                          self.relu, self.ws)
            return None
        return self._backward(dy, db, need_dx)

    def _backward_unfused(self, dyp, db):
        """The fused op's backward with dx where no kernel gives it from the pooled gradient: the two
        ops' own kernels, from now on (a caller that wants dx once wants it every step)."""
        dy = self._unpooled(dyp)
        self._unfuse()
        return self._backward(dy, db, True)

    def _backward(self, dy, db, need_dx):
        L = self.layer
        dx = None
        if need_dx:
            if self.dx is None:  # a first layer asked for its input gradient after all
                self._dx()
                self._scratch(True)
            dx = self.dx
        pool = self.pool_backward
        if pool is not None:  # dy is the pooling's gradient (its plan passed it on)
            self.bwd.run(dx, L.weight.grad, db, dy, pool.argmax, pool.y, self.x, L.weight.data, *self.settings,
                         self.relu, self.mask, self.ws)
            return dx
        self.bwd.run(dx, L.weight.grad, db, dy, self.x, L.weight.data, *self.settings, self.mask, self.ws)
        return dx

    def _unfuse(self):
        """From the next step on, the two layers run their own kernels again."""
        self.pool.take_back()
        self.pool = None

    def _unpooled(self, dyp):
        """The full-size gradient of the convolution's output, for the unfused backward: the forward
        again (its output was never kept), then the pooling's own backward."""
        L, pool = self.layer, self.pool
        self._unfused_scratch()
        b = self.zeros if L.bias is None else L.bias.data
        self.fwd.run(self.y, self.x, L.weight.data, b, *self.settings, self.relu, self.ws)
        pool.bwd.run(self.dy, dyp, pool.argmax, self.y, *pool.settings, self.relu)
        return self.dy


class Conv2D(Layer):
    """K filters of size FH x FW slid over C input channels: y = conv(x, w) + b.

    ``OH = (H + 2*P - FH) // S + 1`` and likewise OW. Each filter has C*FH*FW + 1
    parameters with its bias (the lecture's 5*5*3 + 1 = 76). ``algorithm`` picks the
    kernels: "gemm" (the default on both devices: register-blocked matrix products, implicit
    or through im2col, on the CPU and on a GPU; on the CPU, Winograd's F(2x2, 3x3) for most 3x3
    filters at stride 1), "direct" (CPU: the loops of the definition) or
    "tiled" (GPU: the simpler shared-memory kernels).
    """

    Plan = _Conv2DPlan

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, algorithm=None):
        name = "Conv2D"
        self.in_channels = _count(name, "in_channels", in_channels)
        self.out_channels = _count(name, "out_channels", out_channels)
        self.kernel_size = _pair(name, "kernel_size", kernel_size, 1)
        self.stride = _pair(name, "stride", stride, 1)
        self.padding = _pair(name, "padding", padding, 0)
        self.has_bias = bool(bias)
        self.algorithm = None if algorithm is None else check_choice(name, "algorithm", algorithm, ALGORITHMS)
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight = Parameter(_weights(name, (self.out_channels, self.in_channels, *self.kernel_size), fan_in))
        self.bias = Parameter(np.zeros(self.out_channels, np.float32)) if self.has_bias else None

    def parameters(self):
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def config(self):
        config = dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                      stride=self.stride, padding=self.padding, bias=self.has_bias)
        if self.algorithm is not None:
            config["algorithm"] = self.algorithm
        return config

    def output_shape(self, input_shape):
        if len(input_shape) != 4 or input_shape[1] != self.in_channels:
            raise ValueError(f"{self!r} expects input (N, {self.in_channels}, H, W), got {tuple(input_shape)}")
        N, _, H, W = input_shape
        return (N, self.out_channels) + ops.spatial_output(repr(self), H, W, self.kernel_size, self.stride,
                                                           self.padding, "kernel")


# ---------------------------------------------------------------------------------- pooling


class _MaxPool2DPlan(Plan):
    masks = True

    def __init__(self, layer, in_shape, dtype, device, kernels):
        super().__init__(layer, in_shape, dtype, device, kernels)
        self.fwd = kernels.get("maxpool2d_forward", device)
        self.bwd = kernels.get("maxpool2d_backward", device)
        self.pooling = Pooling.of("max", layer)
        self.settings = self.pooling.settings
        self.in_previous = False  # the convolution before computes this pooling (hand_over)
        self.backward_in_previous = False  # the convolution before does this pooling's backward

    def hand_over_backward(self):
        """The convolution before does this pooling's backward, reading ``y`` and ``argmax``: this
        plan's backward passes the gradient on as it is."""
        self.backward_in_previous = True

    def hand_over(self):
        """The convolution before computes this pooling, into this plan's ``y`` and ``argmax``."""
        self.in_previous = True

    def take_back(self):
        """This plan runs its own kernels again (the convolution before unfused)."""
        self.in_previous = False

    def allocate(self, need_dx):
        super().allocate(need_dx and not self.backward_in_previous)  # no full-size gradient to write then
        self.y = self.device.empty(self.out_shape, self.dtype)
        self.argmax = self.device.empty(self.out_shape, np.int32)

    def forward(self, x):
        self.x = x
        if not self.in_previous:
            self.fwd.run(self.y, self.argmax, x, *self.settings)
        return self.y  # with in_previous, the convolution before filled y and argmax

    def backward(self, dy, need_dx):
        if self.in_previous or self.backward_in_previous:
            return dy  # the convolution before reads it through argmax
        if not need_dx:
            return None
        dx = self._dx()
        self.bwd.run(dx, dy, self.argmax, self.x, *self.settings, self.mask)
        return dx


class _AvgPool2DPlan(Plan):
    masks = True

    def __init__(self, layer, in_shape, dtype, device, kernels):
        super().__init__(layer, in_shape, dtype, device, kernels)
        self.fwd = kernels.get("avgpool2d_forward", device)
        self.bwd = kernels.get("avgpool2d_backward", device)
        self.pooling = Pooling.of("average", layer)
        self.settings = self.pooling.settings

    def allocate(self, need_dx):
        super().allocate(need_dx)
        self.y = self.device.empty(self.out_shape, self.dtype)

    def forward(self, x):
        self.x = x
        self.fwd.run(self.y, x, *self.settings)
        return self.y

    def backward(self, dy, need_dx):
        if not need_dx:
            return None
        dx = self._dx()
        self.bwd.run(dx, dy, self.x, *self.settings, self.mask)
        return dx


class _Pool2D(Layer):
    def __init__(self, kernel_size, stride=None, padding=0):
        name = type(self).__name__
        self.kernel_size = _pair(name, "kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _pair(name, "stride", stride, 1)
        self.padding = _pair(name, "padding", padding, 0)
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{name}: padding {self.padding} must be at most half the kernel size {self.kernel_size}")

    def config(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)

    def output_shape(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"{self!r} expects input (N, C, H, W), got {tuple(input_shape)}")
        N, C, H, W = input_shape
        return (N, C) + ops.spatial_output(repr(self), H, W, self.kernel_size, self.stride, self.padding)


class MaxPool2D(_Pool2D):
    """The maximum of each window; backward sends dy to where the maximum was (the first, on ties)."""

    Plan = _MaxPool2DPlan


class AvgPool2D(_Pool2D):
    """The mean of each window, padding counted as zeros (PyTorch's default)."""

    Plan = _AvgPool2DPlan


# ------------------------------------------------------------------------ activation, shape


class _ReLUPlan(Plan):
    is_relu = True

    def applied_by_previous(self):
        """The layer before applies max(., 0) in its own forward."""
        self.in_previous = True

    def masked_by_next(self):
        """The layer after applies the mask in its own backward."""
        self.in_next = True

    def __init__(self, layer, in_shape, dtype, device, kernels):
        super().__init__(layer, in_shape, dtype, device, kernels)
        self.fwd = kernels.get("relu_forward", device)
        self.bwd = kernels.get("relu_backward", device)
        self.in_previous = False  # the layer before applies max(., 0) in its own forward
        self.in_next = False  # the layer after applies the mask in its own backward
        self.y = None

    def allocate(self, need_dx):
        if not self.in_previous:
            self.y = self.device.empty(self.out_shape, self.dtype)
        if need_dx and not self.in_next:
            self._dx()

    def forward(self, x):
        if self.in_previous:
            self.y = x  # the previous layer's output, already max(., 0)
            return x
        self.fwd.run(self.y, x)
        return self.y

    def backward(self, dy, need_dx):
        if self.in_next:
            return dy  # already multiplied by (y > 0)
        if not need_dx:
            return None
        dx = self._dx()
        self.bwd.run(dx, dy, self.y)
        return dx


class ReLU(Layer):
    """The detector stage: y = max(x, 0)."""

    Plan = _ReLUPlan


class _ActivationPlan(Plan):
    """LeakyReLU, Tanh, Sigmoid, GELU: one kernel each way (``kernels/activation.py``), the
    activation named by the layer's ``kind``; backward reads the forward's input and output."""

    def __init__(self, layer, in_shape, dtype, device, kernels):
        super().__init__(layer, in_shape, dtype, device, kernels)
        self.fwd = kernels.get("activation_forward", device)
        self.bwd = kernels.get("activation_backward", device)
        self.args = (ops.ACTIVATION_KINDS[layer.kind], getattr(layer, "negative_slope", 0.0))

    def allocate(self, need_dx):
        super().allocate(need_dx)
        self.y = self.device.empty(self.out_shape, self.dtype)

    def forward(self, x):
        self.x = x
        self.fwd.run(self.y, x, *self.args)
        return self.y

    def backward(self, dy, need_dx):
        if not need_dx:
            return None
        dx = self._dx()
        self.bwd.run(dx, dy, self.x, self.y, *self.args)
        return dx


class LeakyReLU(Layer):
    """y = x where x > 0, else ``negative_slope`` * x (PyTorch's ``LeakyReLU``): a ReLU that keeps a
    small gradient for negative inputs."""

    Plan = _ActivationPlan
    kind = "leaky_relu"

    def __init__(self, negative_slope=0.01):
        self.negative_slope = check_real("LeakyReLU", "negative_slope", negative_slope)

    def config(self):
        return dict(negative_slope=self.negative_slope)


class Tanh(Layer):
    """y = tanh(x); backward dx = dy * (1 - y**2)."""

    Plan = _ActivationPlan
    kind = "tanh"


class Sigmoid(Layer):
    """y = 1 / (1 + exp(-x)); backward dx = dy * y * (1 - y)."""

    Plan = _ActivationPlan
    kind = "sigmoid"


class GELU(Layer):
    """y = x * Phi(x), Phi the standard normal distribution's CDF, (1 + erf(x / sqrt(2))) / 2: the
    exact form (PyTorch's ``GELU()`` default, not its tanh approximation)."""

    Plan = _ActivationPlan
    kind = "gelu"


class _FlattenPlan(Plan):
    def allocate(self, need_dx):
        self._seen = self._view = self._dy = self._dx_view = None

    def forward(self, x):
        if x is not self._seen:  # within a Sequential, x is the previous layer's buffer: one view, made once
            self._seen, self._view = x, x.reshape(self.out_shape)
        return self._view

    def backward(self, dy, need_dx):
        if dy is not self._dy:
            self._dy, self._dx_view = dy, dy.reshape(self.in_shape)
        return self._dx_view


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), a view without a copy; backward restores the shape."""

    Plan = _FlattenPlan

    def output_shape(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"Flatten expects a batched input (N, ...), got {tuple(input_shape)}")
        return (input_shape[0], int(np.prod(input_shape[1:])))


# ------------------------------------------------------------------------------------ dense


class _DensePlan(Plan):
    fuses_relu = masks = True

    def __init__(self, layer, in_shape, dtype, device, kernels):
        super().__init__(layer, in_shape, dtype, device, kernels)
        self._check_parameters()
        self.fwd = kernels.get("dense_forward", device)
        self.bwd = kernels.get("dense_backward", device)

    def allocate(self, need_dx):
        super().allocate(need_dx)
        self.y = self.device.empty(self.out_shape, self.dtype)
        self.zeros = self.device.zeros(self.out_shape[1], self.dtype) if self.layer.bias is None else None
        shapes = self.in_shape, self.layer.weight.shape
        self._workspace({**self.fwd.workspace(*shapes), **self.bwd.workspace(*shapes)})

    def forward(self, x):
        L = self.layer
        self.x = x
        self.fwd.run(self.y, x, L.weight.data, self.zeros if L.bias is None else L.bias.data, self.relu, self.ws)
        return self.y

    def backward(self, dy, need_dx):
        L = self.layer
        dx = self._dx() if need_dx else None
        db = None if L.bias is None else L.bias.grad
        self.bwd.run(dx, L.weight.grad, db, dy, self.x, L.weight.data, self.mask, self.ws)
        return dx


class Dense(Layer):
    """Fully connected: y = x W^T + b, W (out_features, in_features)."""

    Plan = _DensePlan

    def __init__(self, in_features, out_features, bias=True):
        self.in_features = _count("Dense", "in_features", in_features)
        self.out_features = _count("Dense", "out_features", out_features)
        self.has_bias = bool(bias)
        self.weight = Parameter(_weights("Dense", (self.out_features, self.in_features), self.in_features))
        self.bias = Parameter(np.zeros(self.out_features, np.float32)) if self.has_bias else None

    def parameters(self):
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def config(self):
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.has_bias)

    def output_shape(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"{self!r} expects input (N, {self.in_features}), got {tuple(input_shape)}"
                             + (" (put a Flatten before it)" if len(input_shape) > 2 else ""))
        if input_shape[1] != self.in_features:
            raise ValueError(f"{self!r} expects {self.in_features} input features, got {input_shape[1]} "
                             f"(input shape {tuple(input_shape)})")
        return (input_shape[0], self.out_features)


# ------------------------------------------------------------------- normalisation, dropout


class _BatchNorm2DPlan(Plan):
    fuses_relu = True

    def __init__(self, layer, in_shape, dtype, device, kernels):
        super().__init__(layer, in_shape, dtype, device, kernels)
        self._check_parameters()
        if layer.running_mean.dtype != self.dtype:  # the parameters were made float64 (a gradient check): follow
            layer.running_mean = to_device(to_numpy(layer.running_mean).astype(self.dtype), device)
            layer.running_var = to_device(to_numpy(layer.running_var).astype(self.dtype), device)
        self.fwd = kernels.get("batchnorm2d_forward", device)
        self.bwd = kernels.get("batchnorm2d_backward", device)
        N, C, H, W = self.in_shape
        self.values_per_channel = N * H * W
        self.trained = True

    def allocate(self, need_dx):
        super().allocate(need_dx)
        C = self.in_shape[1]
        self.y = self.device.empty(self.out_shape, self.dtype)
        self.mean = self.device.empty(C, self.dtype)
        self.invstd = self.device.empty(C, self.dtype)

    def forward(self, x):
        L = self.layer
        self.x = x
        self.trained = L.training
        if self.trained and self.values_per_channel < 2:
            raise ValueError(f"{L!r}: training needs more than one value per channel, got input {self.in_shape}")
        self.fwd.run(self.y, self.mean, self.invstd, L.running_mean, L.running_var, x, L.weight.data, L.bias.data,
                     L.eps, L.momentum, self.trained, self.relu)
        return self.y

    def backward(self, dy, need_dx):
        L = self.layer
        dx = self._dx()  # computed even when not asked for: the same pass gives dgamma and dbeta
        self.bwd.run(dx, L.weight.grad, L.bias.grad, dy, self.x, self.mean, self.invstd, L.weight.data, self.trained)
        return dx if need_dx else None


class BatchNorm2D(Layer):
    """Batch normalisation of each channel (Ioffe and Szegedy), as PyTorch's ``BatchNorm2d``.

    Training: each channel normalised with its batch mean and (biased) variance, then scaled
    by ``weight`` (gamma, ones) and shifted by ``bias`` (beta, zeros); ``running_mean`` and
    ``running_var`` (unbiased) follow the batches with ``momentum``. Evaluation: normalised
    with the running estimates. The running estimates are buffers on the layer's device.
    """

    Plan = _BatchNorm2DPlan

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        self.num_features = _count("BatchNorm2D", "num_features", num_features)
        self.eps = check_real("BatchNorm2D", "eps", eps, minimum=0.0, open_min=True)
        self.momentum = check_real("BatchNorm2D", "momentum", momentum, minimum=0.0, maximum=1.0)
        self.weight = Parameter(np.ones(self.num_features, np.float32))
        self.bias = Parameter(np.zeros(self.num_features, np.float32))
        self.running_mean = np.zeros(self.num_features, np.float32)
        self.running_var = np.ones(self.num_features, np.float32)

    def parameters(self):
        return [self.weight, self.bias]

    def buffers(self):
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def to(self, device):
        super().to(device)
        device = resolve_device(device)
        self.running_mean = to_device(to_numpy(self.running_mean), device)
        self.running_var = to_device(to_numpy(self.running_var), device)
        return self

    def config(self):
        return dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum)

    def output_shape(self, input_shape):
        if len(input_shape) != 4 or input_shape[1] != self.num_features:
            raise ValueError(f"{self!r} expects input (N, {self.num_features}, H, W), got {tuple(input_shape)}")
        return tuple(input_shape)


class _DropoutPlan(Plan):
    def __init__(self, layer, in_shape, dtype, device, kernels):
        super().__init__(layer, in_shape, dtype, device, kernels)
        self.fwd = kernels.get("dropout_forward", device)
        self.bwd = kernels.get("dropout_backward", device)
        self.step = None  # the mask of the last forward: None when it was the identity

    def allocate(self, need_dx):
        super().allocate(need_dx)
        self.y = self.device.empty(self.out_shape, self.dtype)

    def forward(self, x):
        L = self.layer
        if not L.training or L.p == 0.0:
            self.step = None
            return x
        L.state[1] += 1  # a new mask for every training forward
        self.step = int(L.state[1])
        self.fwd.run(self.y, x, int(L.state[0]), self.step, L.p)
        return self.y

    def backward(self, dy, need_dx):
        if not need_dx:
            return None
        if self.step is None:
            return dy
        L = self.layer
        dx = self._dx()
        self.bwd.run(dx, dy, int(L.state[0]), self.step, L.p)
        return dx


class Dropout(Layer):
    """Inverted dropout: in training each value is zeroed with probability ``p`` and the others are
    scaled by 1 / (1 - p); in evaluation, the identity. The masks come from a seed drawn when the
    layer is made (``set_seed`` makes them reproducible) and a count of training forwards, both in
    the buffer ``state``, so save, load and resume carry them."""

    Plan = _DropoutPlan

    def __init__(self, p=0.5):
        self.p = check_real("Dropout", "p", p, minimum=0.0, maximum=1.0, open_max=True)
        self.state = np.array([_rng.integers(0, 2**31), 0], np.int64)  # seed, training forwards so far

    def buffers(self):
        return {"state": self.state}

    def config(self):
        return dict(p=self.p)


class _GlobalAvgPool2DPlan(Plan):
    masks = True

    def __init__(self, layer, in_shape, dtype, device, kernels):
        super().__init__(layer, in_shape, dtype, device, kernels)
        self.fwd = kernels.get("global_avgpool2d_forward", device)
        self.bwd = kernels.get("global_avgpool2d_backward", device)

    def allocate(self, need_dx):
        super().allocate(need_dx)
        self.y = self.device.empty(self.out_shape, self.dtype)

    def forward(self, x):
        self.x = x
        self.fwd.run(self.y, x)
        return self.y

    def backward(self, dy, need_dx):
        if not need_dx:
            return None
        dx = self._dx()
        self.bwd.run(dx, dy, self.x, self.mask)
        return dx


class GlobalAvgPool2D(Layer):
    """(N, C, H, W) -> (N, C): the mean of each channel's plane, whatever its size."""

    Plan = _GlobalAvgPool2DPlan

    def output_shape(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"GlobalAvgPool2D expects input (N, C, H, W), got {tuple(input_shape)}")
        return tuple(input_shape[:2])


# ------------------------------------------------------------------------ residual blocks


class _ResidualPlan(Plan):
    """The block's and the shortcut's own plans (each a ``ModelPlan``, fused inside), and the join:
    one kernel adds the two outputs (and applies the ReLU after the block, fused), one adds the two
    input gradients (and applies the mask of a ReLU before the block, fused)."""

    fuses_relu = masks = True

    def __init__(self, layer, in_shape, dtype, device, kernels):
        super().__init__(layer, in_shape, dtype, device, kernels)
        self.block = layer.block.plan(in_shape, dtype, device, kernels)
        self.shortcut = None if layer.shortcut is None else layer.shortcut.plan(in_shape, dtype, device, kernels)
        self.join = kernels.get("residual_add_forward", device)
        self.fork = kernels.get("residual_add_backward", device)

    def allocate(self, need_dx):
        super().allocate(need_dx)  # the two paths' plans allocated their forward buffers when they were made
        self.y = self.device.empty(self.out_shape, self.dtype)

    def forward(self, x):
        self.x = x
        a = self.block.forward(x)
        b = x if self.shortcut is None else self.shortcut.forward(x)
        self.join.run(self.y, a, b, self.relu)
        return self.y

    def backward(self, dy, need_dx):
        # The join passes dy unchanged to both paths; the fork before them adds what comes back.
        da = self.block.backward(dy, need_dx)
        db = dy if self.shortcut is None else self.shortcut.backward(dy, need_dx)
        if not need_dx:
            return None
        dx = self._dx()
        self.fork.run(dx, da, db, self.x, self.mask)
        return dx


def _chain(what, layers):
    """A Sequential of ``layers`` (a Sequential, or a list or tuple of layers), for a residual path."""
    from nbcnn.model import Sequential  # the container; nbcnn.model builds on this module

    if isinstance(layers, Sequential):
        return layers
    return Sequential(list(check_instance("Residual", what, layers, (list, tuple), "a Sequential or a list of layers")))


class Residual(Layer):
    """A residual block (He et al.): ``y = block(x) + shortcut(x)``, the shortcut the identity when
    not given (``y = block(x) + x``); a projection (a 1x1 convolution, say) where the block changes
    the shape.

    Backward is the lecture's backpropagation with one new rule, the fork: x feeds two paths, so
    its gradient is the sum of what comes back along each::

        forward                                  backward
        x --+--> block ----> a --+               dx = dblock(dy) + dshortcut(dy)
            |                    +--> y = a + b       (dshortcut(dy) = dy for the identity)
            +--> shortcut -> b --+

    ``block`` and ``shortcut`` are each a ``Sequential`` or a list of layers; ``parameters()`` lists
    the block's, then the shortcut's. A ReLU after the block is applied by the join, in the same pass.
    """

    Plan = _ResidualPlan

    def __init__(self, block, shortcut=None):
        self.block = _chain("block", block)
        self.shortcut = None if shortcut is None else _chain("shortcut", shortcut)
        if not self.block.layers:
            raise ValueError("Residual: the block has no layers (an empty block would double its input)")

    def _paths(self):
        return [self.block] + ([self.shortcut] if self.shortcut is not None else [])

    def parameters(self):
        return [p for path in self._paths() for p in path.parameters()]

    def buffers(self):
        return {f"{name}.{key}": a for name, path in zip(("block", "shortcut"), self._paths())
                for key, a in path.buffers().items()}

    def train(self, mode=True):
        for path in self._paths():
            path.train(mode)
        return super().train(mode)

    def to(self, device):
        for path in self._paths():
            path.to(device)
        return super().to(device)

    def output_shape(self, input_shape):
        a = tuple(self.block.output_shape(input_shape))
        b = tuple(input_shape) if self.shortcut is None else tuple(self.shortcut.output_shape(input_shape))
        if a != b:
            what = "the input (the identity shortcut)" if self.shortcut is None else "the shortcut's output"
            raise ValueError(f"Residual: for input {tuple(input_shape)} the block outputs {a} but {what} is {b}; "
                             f"the two are added, so they must have one shape (give a shortcut that projects)")
        return a

    def config(self):
        return dict(block=self.block.config(), shortcut=None if self.shortcut is None else self.shortcut.config())

    def __repr__(self):
        def listed(path):
            return "[" + ", ".join(repr(layer) for layer in path.layers) + "]"

        shortcut = "" if self.shortcut is None else f", shortcut={listed(self.shortcut)}"
        return f"Residual({listed(self.block)}{shortcut})"


LAYERS = {cls.__name__: cls for cls in (Conv2D, MaxPool2D, AvgPool2D, ReLU, Flatten, Dense, BatchNorm2D, Dropout,
                                        GlobalAvgPool2D, LeakyReLU, Tanh, Sigmoid, GELU, Residual)}

__all__ = ["Parameter", "Layer", "Plan", "Conv2D", "MaxPool2D", "AvgPool2D", "ReLU", "LeakyReLU", "Tanh", "Sigmoid",
           "GELU", "Flatten", "Dense", "BatchNorm2D", "Dropout", "GlobalAvgPool2D", "Residual", "LAYERS", "set_seed"]
