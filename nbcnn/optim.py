"""Optimizers: one fused kernel call per step over all the parameters at once.

The parameters given to an optimizer live in one flat ``ParameterBuffer`` (the model's,
when they are ``model.parameters()``; one of the optimizer's own otherwise), and its state
(velocity, moments) in flat vectors of the same layout on the same device. ``step()``
reads the gradients written by the last backward and updates every parameter with one
kernel call; ``zero_grad()`` is one fill. Hyperparameters are checked when the optimizer
is made; ``lr`` may be changed between steps (a schedule), the others are fixed.
"""

from nbcnn import ops
from nbcnn.checks import check_instance, check_real
from nbcnn.device import copy_into, to_device, to_numpy
from nbcnn.parameter import Parameter, buffer_of


class Optimizer:
    """Base class: the flat buffer, its state, and the check (one integer) that they still hold the parameters."""

    state_names = ()

    def __init__(self, params, kernels=ops.REGISTRY):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got no parameters to optimise")
        for p in self.params:
            check_instance(type(self).__name__, "each parameter", p, Parameter, "an nbcnn Parameter")
        self.kernels = kernels
        self.buffer = None
        self.state = {}
        self._bind()

    def _bind(self):
        """Find (or make) the flat buffer of the parameters; move the state beside it."""
        old = {name: to_numpy(a) for name, a in self.state.items()}
        self.buffer = buffer_of(self.params)
        device, size, dtype = self.buffer.device, self.buffer.size, self.buffer.dtype
        self.state = {}
        for name in self.state_names:
            if name in old and old[name].shape == (size,):
                self.state[name] = to_device(old[name].astype(dtype), device)
            else:
                self.state[name] = device.zeros(size, dtype)
        self.update = self.kernels.get(self.op, device)
        self.fill = self.kernels.get("fill", device)
        self._stamp = Parameter.rebinds

    def _current(self):
        if self._stamp != Parameter.rebinds:
            if not self.buffer.current():
                self._bind()
            self._stamp = Parameter.rebinds
        return self.buffer

    def zero_grad(self):
        self.fill.run(self._current().grad, 0.0)

    def state_arrays(self):
        """The state as named arrays per parameter (``m0``, ``v0``, ...), for resuming: views of the flat vectors."""
        self._current()
        arrays = {}
        for name, flat in self.state.items():
            for i, seg in enumerate(self.buffer.segments(flat)):
                arrays[f"{name}{i}"] = seg
        return arrays

    def load_state_arrays(self, arrays):
        """Copy state saved by ``state_arrays`` into this optimizer's flat vectors."""
        self._current()
        for name, flat in self.state.items():
            for i, (p, seg) in enumerate(zip(self.params, self.buffer.segments(flat))):
                key = f"{name}{i}"
                if key not in arrays:
                    raise ValueError(f"optimizer state has no array {key} for parameter {i} of shape {p.shape}")
                a = arrays[key]
                if tuple(a.shape) != p.shape:
                    raise ValueError(f"optimizer state {key} has shape {tuple(a.shape)}, the parameter {p.shape}")
                copy_into(seg, to_numpy(a).astype(self.buffer.dtype, copy=False))


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and weight decay (PyTorch's formulation)."""

    op = "sgd_update"
    state_names = ("velocity",)

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, kernels=ops.REGISTRY):
        self.lr = check_real("SGD", "lr", lr, minimum=0.0, open_min=True)
        self.momentum = check_real("SGD", "momentum", momentum, minimum=0.0, maximum=1.0, open_max=True)
        self.weight_decay = check_real("SGD", "weight_decay", weight_decay, minimum=0.0)
        super().__init__(params, kernels)

    def step(self):
        b = self._current()
        self.update.run(b.data, self.state["velocity"], b.grad, self.lr, self.momentum, self.weight_decay)


class Adam(Optimizer):
    """Adam (Kingma and Ba), with PyTorch's bias correction and eps placement."""

    op = "adam_update"
    state_names = ("m", "v")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, kernels=ops.REGISTRY):
        name = type(self).__name__
        self.lr = check_real(name, "lr", lr, minimum=0.0, open_min=True)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = tuple(check_real(name, f"beta{i + 1}", beta, minimum=0.0, maximum=1.0, open_max=True)
                           for i, beta in enumerate(betas))
        self.eps = check_real(name, "eps", eps, minimum=0.0, open_min=True)
        self.t = 0
        super().__init__(params, kernels)

    def step(self):
        b = self._current()
        self.t += 1
        beta1, beta2 = self.betas
        # the bias corrections 1 - beta**t, once per step on the host
        self.update.run(b.data, self.state["m"], self.state["v"], b.grad, self.lr, beta1, beta2, self.eps,
                        1.0 - beta1 ** self.t, 1.0 - beta2 ** self.t)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter), as PyTorch's ``AdamW``: each step
    first multiplies every parameter by 1 - lr * weight_decay, then takes Adam's step; one kernel."""

    op = "adamw_update"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, kernels=ops.REGISTRY):
        self.weight_decay = check_real("AdamW", "weight_decay", weight_decay, minimum=0.0)
        super().__init__(params, lr=lr, betas=betas, eps=eps, kernels=kernels)

    def step(self):
        b = self._current()
        self.t += 1
        beta1, beta2 = self.betas
        self.update.run(b.data, self.state["m"], self.state["v"], b.grad, self.lr, beta1, beta2, self.eps,
                        1.0 - beta1 ** self.t, 1.0 - beta2 ** self.t, self.weight_decay)
