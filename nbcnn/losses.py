"""Losses. SoftmaxCrossEntropy: softmax and cross-entropy in one numerically stable step."""

from types import SimpleNamespace

import numpy as np

from nbcnn import ops
from nbcnn.checks import check_real
from nbcnn.device import device_of, resolve_device


class _LossPlan:
    """Buffers for logits of one shape: probs, dlogits, and ``sums`` (2,) float64 on the device, the
    batch's summed loss and correct count (``host``: where they are read back to)."""

    def __init__(self, logits, labels, kernels):
        where = device_of(logits)
        if len(logits.shape) != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
            raise ValueError(f"SoftmaxCrossEntropy: logits must be (N, classes) with N and classes at least 1, "
                             f"got shape {tuple(logits.shape)}")
        try:
            label_device = device_of(labels)
        except TypeError:
            raise TypeError(f"SoftmaxCrossEntropy: labels must be an array, got {type(labels).__name__}") from None
        if label_device != where:
            raise ValueError(f"SoftmaxCrossEntropy: logits on {where} but labels on {label_device}; "
                             f"move them with nbcnn.to_device")
        if tuple(labels.shape) != (logits.shape[0],):
            raise ValueError(f"SoftmaxCrossEntropy: labels must be ({logits.shape[0]},), one per row of the logits, "
                             f"got shape {tuple(labels.shape)}")
        if np.dtype(labels.dtype) not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise TypeError(f"SoftmaxCrossEntropy: labels must be int32 or int64, got {np.dtype(labels.dtype)}")
        device = resolve_device(where)
        self.n = logits.shape[0]
        self.kernel = kernels.get("softmax_xent_step", device)
        self.probs = device.empty(logits.shape, logits.dtype)
        self.dlogits = device.empty(logits.shape, logits.dtype)
        self.sums = device.zeros(2, np.float64)
        self.host = np.zeros(2, np.float64)
        # scratch of the kernel's sum over the batch (on a GPU: one partial sum a block), zeroed once
        scratch = self.kernel.workspace(self.n).items()
        self.ws = SimpleNamespace(**{name: device.zeros(shape, dtype) for name, (shape, dtype) in scratch})


class SoftmaxCrossEntropy:
    """Mean over the batch of -log softmax(logits)[label]; with ``label_smoothing`` e (in [0, 1],
    PyTorch's ``cross_entropy`` argument), the cross-entropy against a target of 1 - e on the
    label and e / classes spread over every class.

    ``forward(logits (N, M), labels (N,) ints) -> float``; ``backward() -> dlogits`` (N, M),
    the gradient of that mean, which forward already computed (one kernel does both).
    On a GPU only the scalar loss comes back to the host; ``accumulate`` does not even
    that: it adds the batch's loss and correct count to a device array the caller reads
    when it chooses (the training loop, every few steps). ``forward`` refuses host labels
    outside [0, M) with a ValueError; on a GPU, and in ``accumulate`` (the training loop's
    path, whose labels were checked when the data were loaded), such a label makes the loss NaN.
    """

    def __init__(self, label_smoothing=0.0, kernels=ops.REGISTRY):
        self.label_smoothing = check_real("SoftmaxCrossEntropy", "label_smoothing", label_smoothing,
                                          minimum=0.0, maximum=1.0)
        self.kernels = kernels
        self._plans = {}
        self._plan = None
        self._ran = False

    def _plan_for(self, logits, labels):
        plan = self._plan
        key = (tuple(logits.shape), logits.dtype, type(logits), labels.dtype, type(labels), tuple(labels.shape))
        if plan is None or key != plan.key:
            plan = self._plans.get(key)
            if plan is None:
                plan = _LossPlan(logits, labels, self.kernels)  # checks once, with clear errors
                plan.key = key
                self._plans[key] = plan
            self._plan = plan
        return plan

    def accumulate(self, logits, labels, sums):
        """Add the batch's summed loss to ``sums[0]`` and its correct count to ``sums[1]`` ((2,) float64
        on the logits' device); compute dlogits for ``backward``. Reads nothing back."""
        plan = self._plan_for(logits, labels)
        plan.kernel.run(sums, plan.probs, plan.dlogits, logits, labels, True, self.label_smoothing, plan.ws)
        self._ran = True

    def forward(self, logits, labels):
        plan = self._plan_for(logits, labels)
        if isinstance(labels, np.ndarray):
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= logits.shape[1]:
                raise ValueError(f"SoftmaxCrossEntropy: labels must be in [0, {logits.shape[1]}), "
                                 f"got {low if low < 0 else high}")
        plan.kernel.run(plan.sums, plan.probs, plan.dlogits, logits, labels, False, self.label_smoothing,
                        plan.ws)
        self._ran = True
        if isinstance(plan.sums, np.ndarray):
            return float(plan.sums[0]) / plan.n
        plan.sums.copy_to_host(plan.host)  # waits for the GPU: the float the contract returns
        return float(plan.host[0]) / plan.n

    __call__ = forward

    def backward(self):
        if not self._ran:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        return self._plan.dlogits

    @property
    def probs(self):
        """The softmax of the last forward's logits."""
        return None if self._plan is None else self._plan.probs
