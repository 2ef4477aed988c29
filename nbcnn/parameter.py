"""Parameters, and the flat buffers that hold them.

A ``Parameter`` is a trainable array ``data`` and its gradient ``grad``, of one shape, on
one device. A model keeps all its parameters in one ``ParameterBuffer``: one flat vector of
values and one of gradients, each parameter's ``data`` and ``grad`` being views of its
segment. So an optimizer updates every parameter with one kernel call, ``zero_grad`` is
one fill, and a data-parallel allreduce would be one call on ``buffer.grad``.

Assigning ``p.data = a`` (or ``p.grad``) with an array of the same shape, dtype and device
copies ``a`` into the existing storage, so the views stay views. An array of another
dtype, shape or device replaces the storage (the parameter leaves its buffer) and bumps
``Parameter.rebinds``; plans and optimizers compare that one integer per step and re-plan
when it moved.
"""

import numpy as np

from nbcnn.device import copy_into, device_of, resolve_device, to_device


def _check_array(name, value):
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"Parameter.{name} must be a NumPy or GPU array, got {type(value).__name__}")
    if np.dtype(value.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"Parameter.{name} must be float32 or float64, got {np.dtype(value.dtype)}")


def _same_storage_kind(a, b):
    return (tuple(a.shape) == tuple(b.shape) and np.dtype(a.dtype) == np.dtype(b.dtype)
            and device_of(a) == device_of(b))


class Parameter:
    """A trainable array ``data`` and its gradient ``grad``, of one shape, on one device."""

    rebinds = 0  # how many times any parameter's storage was replaced (see the module docstring)

    def __init__(self, data):
        self._data = data
        self.buffer = None  # the ParameterBuffer whose views data and grad are, if any
        self.device = resolve_device(device_of(data))
        self._grad = self.device.zeros(data.shape, data.dtype)

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        _check_array("data", value)
        if _same_storage_kind(value, self._data):
            copy_into(self._data, value)
        else:
            self._replace(np.ascontiguousarray(value) if isinstance(value, np.ndarray) else value, None)

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value):
        _check_array("grad", value)
        if _same_storage_kind(value, self._grad):
            copy_into(self._grad, value)
        else:
            raise ValueError(f"a gradient of shape {tuple(value.shape)}, {np.dtype(value.dtype)} on "
                             f"{device_of(value)} does not fit {self!r} on {self.device}")

    def _replace(self, data, grad):
        """New storage for this parameter alone (it leaves its buffer)."""
        self._data = data
        self.device = resolve_device(device_of(data))
        self._grad = grad if grad is not None else self.device.zeros(data.shape, data.dtype)
        self.buffer = None
        Parameter.rebinds += 1

    @property
    def shape(self):
        return tuple(self._data.shape)

    @property
    def size(self):
        return int(np.prod(self.shape))

    @property
    def dtype(self):
        return np.dtype(self._data.dtype)

    def to(self, device):
        device = resolve_device(device)
        if device.kind != self.device.kind:
            self._replace(to_device(self._data, device), to_device(self._grad, device))
        return self

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class ParameterBuffer:
    """The parameters of a model in two flat vectors on one device, ``data`` and ``grad``; each
    parameter's ``data`` and ``grad`` become views of its segment (in order, weight before bias)."""

    def __init__(self, params, device=None):
        self.params = list(params)
        if not self.params:
            raise ValueError("no parameters to put in a buffer")
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise TypeError(f"parameters of one model must share a dtype, got {sorted(str(d) for d in dtypes)}")
        self.dtype = dtypes.pop()
        self.device = resolve_device(device) if device is not None else self.params[0].device
        self.offsets = np.cumsum([0] + [p.size for p in self.params]).tolist()
        self.size = self.offsets[-1]
        self.data = self.device.empty(self.size, self.dtype)
        self.grad = self.device.zeros(self.size, self.dtype)
        for p, lo, hi in zip(self.params, self.offsets, self.offsets[1:]):
            data_view = self.data[lo:hi].reshape(p.shape)
            copy_into(data_view, to_device(p.data, self.device) if p.device.kind != self.device.kind else p.data)
            p._data, p._grad, p.device, p.buffer = data_view, self.grad[lo:hi].reshape(p.shape), self.device, self
        Parameter.rebinds += 1

    def current(self):
        """Whether every parameter is still a view of this buffer."""
        return all(p.buffer is self for p in self.params)

    def segments(self, flat):
        """Views of a flat vector laid out as this buffer (an optimizer's state), one per parameter."""
        return [flat[lo:hi].reshape(p.shape) for p, lo, hi in zip(self.params, self.offsets, self.offsets[1:])]


def buffer_of(params, device=None):
    """The buffer that holds exactly ``params`` in this order, made if there is none."""
    params = list(params)
    first = params[0].buffer if params else None
    if (first is not None and first.params == params and first.current()
            and (device is None or resolve_device(device).kind == first.device.kind)):
        return first
    return ParameterBuffer(params, device)

