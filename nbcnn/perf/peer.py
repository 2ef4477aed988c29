"""The PyTorch peer of an nbcnn network: the same layers as ``torch.nn`` modules, with nbcnn's
weights, for the benchmarks' comparisons and the tests' references.

``torch_module(torch, layer)`` converts a layer, a ``Sequential`` or a ``Residual`` (PyTorch is
passed in: it is never a dependency of nbcnn). A layer it has no counterpart for is refused
with a ``TypeError`` naming it, never replaced by something else: a comparison against a
different network would be a wrong answer that looks right. Layers are matched by their exact
class, so a subclass (which may compute something else) is refused too.
"""

import numpy as np

from nbcnn import layers as L
from nbcnn.device import to_numpy
from nbcnn.model import Sequential

_SIMPLE = {L.ReLU: "ReLU", L.Tanh: "Tanh", L.Sigmoid: "Sigmoid", L.GELU: "GELU", L.Flatten: "Flatten"}


def torch_module(torch, layer, dtype=None):
    """``(module, parameters)``: ``layer`` as a ``torch.nn`` module holding copies of its weights (and
    a batch normalisation's running statistics), in ``dtype`` (default: the weights' own), and the
    module's parameters in nbcnn's order (``layer.parameters()``'s), for comparing gradients."""
    nn = torch.nn
    if isinstance(layer, Sequential):
        parts = [torch_module(torch, inner, dtype) for inner in layer.layers]
        return nn.Sequential(*[m for m, _ in parts]), [p for _, ps in parts for p in ps]
    if isinstance(layer, L.Residual):
        block, params = torch_module(torch, layer.block, dtype)
        shortcut, more = (nn.Identity(), []) if layer.shortcut is None else torch_module(torch, layer.shortcut, dtype)
        return _join(nn, block, shortcut), params + more

    params = layer.parameters()
    if dtype is None:  # the weights' own precision (float64 in the gradient checks)
        dtype = torch.float64 if params and to_numpy(params[0].data).dtype == np.float64 else torch.float32

    def copied(module, names, buffers=()):
        """``module`` in ``dtype`` with nbcnn's parameters (then ``buffers``: (name, array)) copied in."""
        module = module.to(dtype)
        with torch.no_grad():
            for name, p in zip(names, params):
                getattr(module, name).copy_(torch.from_numpy(np.array(to_numpy(p.data))))
            for name, a in buffers:
                getattr(module, name).copy_(torch.from_numpy(np.array(to_numpy(a))))
        return module, [getattr(module, name) for name in names[:len(params)]]

    if type(layer) is L.Conv2D:
        return copied(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                layer.padding, bias=layer.has_bias), ("weight", "bias"))
    if type(layer) is L.Dense:
        return copied(nn.Linear(layer.in_features, layer.out_features, bias=layer.has_bias), ("weight", "bias"))
    if type(layer) is L.BatchNorm2D:
        return copied(nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum), ("weight", "bias"),
                      (("running_mean", layer.running_mean), ("running_var", layer.running_var)))
    if type(layer) is L.MaxPool2D:
        return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding), []
    if type(layer) is L.AvgPool2D:  # nbcnn counts the padding in the mean, as PyTorch's default does
        return nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding), []
    if type(layer) is L.LeakyReLU:
        return nn.LeakyReLU(layer.negative_slope), []
    if type(layer) is L.Dropout:
        return nn.Dropout(layer.p), []
    if type(layer) is L.GlobalAvgPool2D:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), []
    if type(layer) in _SIMPLE:
        return getattr(nn, _SIMPLE[type(layer)])(), []
    raise TypeError(f"torch_module: no PyTorch counterpart for {layer!r}")


def _join(nn, block, shortcut):
    """A residual block as a module: block(x) + shortcut(x)."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, x):
            return self.block(x) + self.shortcut(x)

    return Residual()
