"""Optimizers that update each parameter on its own device, with one fused kernel per parameter.

``step()`` reads each parameter's ``.grad`` (written by the last backward) and updates
``.data`` in place; ``zero_grad()`` sets the gradients to zero. The state (velocity,
moments) lives beside the parameter, on its device.
"""

import numbers

from nbcnn import ops


def _real(name, value, minimum=0.0, below=None, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < minimum or (positive and value <= 0):
        raise ValueError(f"{name} must be {'greater than' if positive else 'at least'} {minimum}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be less than {below}, got {value}")
    return value


class Optimizer:
    def __init__(self, params):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got no parameters to optimise")

    def zero_grad(self):
        for p in self.params:
            ops.fill(p.grad, 0.0)

    def _state_like(self, p):
        return ops.zeros(p.data.shape, p.data.dtype, ops.common_device("optimizer", p=p.data))

    def state_arrays(self):
        """Optimizer state as named arrays (for resuming)."""
        raise NotImplementedError

    def load_state_arrays(self, arrays):
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and weight decay (PyTorch's formulation)."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params)
        self.lr = _real("lr", lr, positive=True)
        self.momentum = _real("momentum", momentum, below=1.0)
        self.weight_decay = _real("weight_decay", weight_decay)
        self.velocity = [self._state_like(p) for p in self.params]

    def step(self):
        for p, v in zip(self.params, self.velocity):
            ops.sgd_update(p.data, v, p.grad, self.lr, self.momentum, self.weight_decay)

    def state_arrays(self):
        return {f"velocity{i}": v for i, v in enumerate(self.velocity)}

    def load_state_arrays(self, arrays):
        self.velocity = [arrays[f"velocity{i}"] for i in range(len(self.params))]


class Adam(Optimizer):
    """Adam (Kingma and Ba), with PyTorch's bias correction and eps placement."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params)
        self.lr = _real("lr", lr, positive=True)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_real("beta1", betas[0], below=1.0), _real("beta2", betas[1], below=1.0))
        self.eps = _real("eps", eps, positive=True)
        self.t = 0
        self.m = [self._state_like(p) for p in self.params]
        self.v = [self._state_like(p) for p in self.params]

    def step(self):
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            ops.adam_update(p.data, m, v, p.grad, self.lr, *self.betas, self.eps, self.t)

    def state_arrays(self):
        arrays = {f"m{i}": m for i, m in enumerate(self.m)}
        arrays.update({f"v{i}": v for i, v in enumerate(self.v)})
        return arrays

    def load_state_arrays(self, arrays):
        self.m = [arrays[f"m{i}"] for i in range(len(self.params))]
        self.v = [arrays[f"v{i}"] for i in range(len(self.params))]
