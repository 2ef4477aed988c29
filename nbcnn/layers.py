"""Layers: explicit forward and backward, the backpropagation of the lecture, no autograd.

``backward(dy, need_dx=False)`` skips the gradient to the input where nothing needs it
(the first layer of a network being trained): for a convolution that is a third of
its backward pass.

Each layer keeps from ``forward`` what its ``backward`` needs (a convolution its input,
ReLU its output, max pooling where each maximum came from) and turns the gradient of
the loss with respect to its output, ``dy``, into the gradient with respect to its
input, ``dx``, writing its parameters' gradients into ``Parameter.grad`` on the way
(overwriting them: one backward per forward).

Inputs are batched: (N, C, H, W) for convolution and pooling, (N, features) for Dense.
"""

import math
import numbers

import numpy as np

from nbcnn import ops
from nbcnn.device import resolve_device, to_device

_rng = np.random.default_rng(0)


def set_seed(seed):
    """Seed the generator that initialises new layers' weights (He initialisation)."""
    global _rng
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _rng = np.random.default_rng(int(seed))


def _pair(name, value, minimum, layer):
    """An int or a pair (h, w) of ints, each at least ``minimum``, as a tuple of two ints."""
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in pair):
        raise TypeError(f"{layer}: {name} must be an int or a pair of ints (h, w), got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{layer}: {name} must be at least {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _count(name, value, layer):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{layer}: {name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{layer}: {name} must be at least 1, got {value}")
    return int(value)


class Parameter:
    """A trainable array ``data`` and its gradient ``grad``, of one shape, on one device."""

    def __init__(self, data):
        self.data = data
        self.grad = ops.zeros(data.shape, data.dtype, ops.common_device("Parameter", data=data))

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def size(self):
        return int(np.prod(self.shape))

    def to(self, device):
        self.data = to_device(self.data, device)
        self.grad = to_device(self.grad, device)
        return self

    def grad_buffer(self):
        """``grad``, ready to be overwritten by a backward pass: the same array step after step,
        replaced only when ``data`` changed shape, dtype or device."""
        g, d = self.grad, self.data
        device = ops.common_device("Parameter", data=d)
        if (g is None or tuple(g.shape) != tuple(d.shape) or g.dtype != d.dtype
                or ops.common_device("Parameter", grad=g) != device):
            self.grad = ops.empty(d.shape, d.dtype, device)
        return self.grad

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={np.dtype(self.data.dtype)})"


class Layer:
    """Base class: ``forward(x) -> y``, ``backward(dy) -> dx``, ``parameters()``."""

    def parameters(self):
        return []

    def to(self, device):
        device = resolve_device(device)
        for p in self.parameters():
            p.to(device)
        return self

    def output_shape(self, input_shape):
        """The shape ``forward`` returns for an input of ``input_shape`` (raises if impossible)."""
        return tuple(input_shape)

    def config(self):
        """Constructor arguments, enough to rebuild the layer (``Sequential.save`` stores them)."""
        return {}

    def _saved(self, name):
        value = getattr(self, name, None)
        if value is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return value

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Conv2D(Layer):
    """K filters of size FH x FW slid over C input channels: y = conv(x, w) + b.

    ``OH = (H + 2*P - FH) // S + 1`` and likewise OW. Each filter has C*FH*FW + 1
    parameters with its bias (the lecture's 5*5*3 + 1 = 76).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        name = "Conv2D"
        self.in_channels = _count("in_channels", in_channels, name)
        self.out_channels = _count("out_channels", out_channels, name)
        self.kernel_size = _pair("kernel_size", kernel_size, 1, name)
        self.stride = _pair("stride", stride, 1, name)
        self.padding = _pair("padding", padding, 0, name)
        self.has_bias = bool(bias)
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        w = _rng.normal(0.0, math.sqrt(2.0 / fan_in), (self.out_channels, self.in_channels, *self.kernel_size))
        self.weight = Parameter(w.astype(np.float32))
        self.bias = Parameter(np.zeros(self.out_channels, np.float32)) if self.has_bias else None
        self._x = None
        self._workspace = {}  # what the forward pass leaves for backward (on the CPU: the im2col matrix)

    def parameters(self):
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def config(self):
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                    stride=self.stride, padding=self.padding, bias=self.has_bias)

    def output_shape(self, input_shape):
        if len(input_shape) != 4 or input_shape[1] != self.in_channels:
            raise ValueError(f"{self!r} expects input (N, {self.in_channels}, H, W), got {tuple(input_shape)}")
        N, _, H, W = input_shape
        return (N, self.out_channels) + ops.spatial_output(repr(self), H, W, self.kernel_size, self.stride,
                                                           self.padding, "kernel")

    def forward(self, x):
        self.output_shape(tuple(x.shape))
        self._x = x
        b = self.bias.data if self.bias is not None else None
        return ops.conv2d_forward(x, self.weight.data, b, self.stride, self.padding, saved=self._workspace)

    def backward(self, dy, need_dx=True):
        x = self._saved("_x")
        bias = self.bias
        # The gradients are written into the parameters' grad arrays (allocated once).
        dx, _, _ = ops.conv2d_backward(dy, x, self.weight.data, self.stride, self.padding, need_dx,
                                       dw=self.weight.grad_buffer(),
                                       db=bias.grad_buffer() if bias is not None else None,
                                       has_bias=bias is not None, saved=self._workspace)
        return dx


class _Pool2D(Layer):
    def __init__(self, kernel_size, stride=None, padding=0):
        name = type(self).__name__
        self.kernel_size = _pair("kernel_size", kernel_size, 1, name)
        self.stride = self.kernel_size if stride is None else _pair("stride", stride, 1, name)
        self.padding = _pair("padding", padding, 0, name)
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{name}: padding {self.padding} must be at most half the kernel size {self.kernel_size}")
        self._x_shape = None

    def config(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)

    def output_shape(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"{self!r} expects input (N, C, H, W), got {tuple(input_shape)}")
        N, C, H, W = input_shape
        return (N, C) + ops.spatial_output(repr(self), H, W, self.kernel_size, self.stride, self.padding)


class MaxPool2D(_Pool2D):
    """The maximum of each window; backward sends dy to where the maximum was (the first, on ties)."""

    def forward(self, x):
        self.output_shape(tuple(x.shape))
        self._x_shape = tuple(x.shape)
        y, self._argmax = ops.maxpool2d_forward(x, self.kernel_size, self.stride, self.padding)
        return y

    def backward(self, dy, need_dx=True):
        x_shape = self._saved("_x_shape")
        return ops.maxpool2d_backward(dy, self._argmax, x_shape, self.kernel_size, self.stride, self.padding)


class AvgPool2D(_Pool2D):
    """The mean of each window, padding counted as zeros (PyTorch's default)."""

    def forward(self, x):
        self.output_shape(tuple(x.shape))
        self._x_shape = tuple(x.shape)
        return ops.avgpool2d_forward(x, self.kernel_size, self.stride, self.padding)

    def backward(self, dy, need_dx=True):
        x_shape = self._saved("_x_shape")
        return ops.avgpool2d_backward(dy, x_shape, self.kernel_size, self.stride, self.padding)


class ReLU(Layer):
    """The detector stage: y = max(x, 0)."""

    def __init__(self):
        self._y = None

    def forward(self, x):
        self._y = ops.relu_forward(x)
        return self._y

    def backward(self, dy, need_dx=True):
        return ops.relu_backward(dy, self._saved("_y"))


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), a view without a copy; backward restores the shape."""

    def __init__(self):
        self._x_shape = None

    def output_shape(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"Flatten expects a batched input (N, ...), got {tuple(input_shape)}")
        return (input_shape[0], int(np.prod(input_shape[1:])))

    def forward(self, x):
        self._x_shape = tuple(x.shape)
        return x.reshape(self.output_shape(self._x_shape))

    def backward(self, dy, need_dx=True):
        return dy.reshape(self._saved("_x_shape"))


class Dense(Layer):
    """Fully connected: y = x W^T + b, W (out_features, in_features)."""

    def __init__(self, in_features, out_features, bias=True):
        self.in_features = _count("in_features", in_features, "Dense")
        self.out_features = _count("out_features", out_features, "Dense")
        self.has_bias = bool(bias)
        w = _rng.normal(0.0, math.sqrt(2.0 / self.in_features), (self.out_features, self.in_features))
        self.weight = Parameter(w.astype(np.float32))
        self.bias = Parameter(np.zeros(self.out_features, np.float32)) if self.has_bias else None
        self._x = None

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

    def forward(self, x):
        self.output_shape(tuple(x.shape))
        self._x = x
        b = self.bias.data if self.bias is not None else None
        return ops.dense_forward(x, self.weight.data, b)

    def backward(self, dy, need_dx=True):
        bias = self.bias
        dx, _, _ = ops.dense_backward(dy, self._saved("_x"), self.weight.data, need_dx, dw=self.weight.grad_buffer(),
                                      db=bias.grad_buffer() if bias is not None else None,
                                      has_bias=bias is not None)
        return dx


LAYERS = {cls.__name__: cls for cls in (Conv2D, MaxPool2D, AvgPool2D, ReLU, Flatten, Dense)}
