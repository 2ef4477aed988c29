"""One training step, the same for ``nbcnn train``, ``nbcnn profile``, ``nbcnn bench`` and the notebooks.

    batch    xb, yb = x[idx], y[idx]               one gather, into the trainer's own buffers
             (augment: each image shifted, maybe mirrored, at random: one more kernel)
    rate     optimizer.lr = schedule(steps)         a function of the step count alone
    forward  logits = model.forward(xb)            the model's plan: fused layers, its own buffers
    loss     sums += (loss, correct), dlogits      one kernel; nothing comes back to the host
    backward model.backward(dlogits)               gradients into the flat gradient buffer
    hooks    hook(trainer)                         e.g. an allreduce of optimizer.buffer.grad, clipping
    update   optimizer.step()                      one kernel over the flat parameter buffer

The summed loss and correct count stay on the device; the host reads them every
``read_every`` steps (for the progress bar and to stop on a NaN) and at the end of an
epoch, so on a GPU the host waits for it once every ``read_every`` steps, not every step.
"""

import math
import time
from types import SimpleNamespace

import numpy as np

from nbcnn import ops
from nbcnn.checks import check_instance, check_int, check_real
from nbcnn.layers import Layer
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.optim import Optimizer


class _NoSpan:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_SPAN = _NoSpan()


def _no_span(layer, phase):
    return _NO_SPAN


class Augment:
    """Random shifts of every training image by up to ``shift`` pixels each way (a crop of the
    image padded by ``shift``), and horizontal flips with ``flip`` (not for digits: a mirrored 2
    is no 2). ``fill`` is the value shifted in (the normalised background), ``seed`` the draws'."""

    def __init__(self, shift=2, flip=False, fill=0.0, seed=0):
        self.shift = check_int("Augment", "shift", shift, minimum=0)
        self.seed = check_int("Augment", "seed", seed, minimum=0)
        self.fill = check_real("Augment", "fill", fill)
        self.flip = bool(flip)

    def __repr__(self):
        return f"Augment(shift={self.shift}, flip={self.flip}, fill={self.fill:.4g}, seed={self.seed})"


class ClipGradNorm:
    """A Trainer hook: after backward (and after a data-parallel sum of the gradients, when that hook
    comes first), the model's gradients are scaled down together where their norm exceeds
    ``max_norm``: ``grad *= max_norm / (norm + 1e-6)``, as PyTorch's ``clip_grad_norm_``. One
    kernel call over the flat gradient buffer, on the device (two launches on a GPU: the norm, then
    the scaling); the norm before clipping stays there, in ``norm``, read back only when asked
    (``last_norm()``)."""

    def __init__(self, max_norm):
        self.max_norm = check_real("ClipGradNorm", "max_norm", max_norm, minimum=0.0, open_min=True)
        self.norm = self.kernel = self.ws = self.ws_for = None

    def __call__(self, trainer):
        grad = trainer.optimizer.buffer.grad
        if self.kernel is None or self.ws_for is not grad:  # planned once per gradient buffer
            self.kernel = trainer.kernels.get("clip_grad_norm", trainer.device)
            self.norm = trainer.device.zeros(1, np.float64)
            scratch = self.kernel.workspace(grad.size).items()
            self.ws = SimpleNamespace(**{name: trainer.device.zeros(shape, dtype) for name, (shape, dtype) in scratch})
            self.ws_for = grad
        self.kernel.run(grad, self.norm, self.max_norm, self.ws)

    def last_norm(self):
        """The gradients' norm before the last clipping, read back to the host (None before the first)."""
        if self.norm is None:
            return None
        return float(self.norm[0]) if isinstance(self.norm, np.ndarray) else float(self.norm.copy_to_host()[0])

    def __repr__(self):
        return f"ClipGradNorm(max_norm={self.max_norm:g})"


class Trainer:
    """Runs training steps of ``model`` with ``loss_fn`` and ``optimizer`` on the model's device.

    ``hooks``: functions called with the trainer after backward and before the update
    (where a data-parallel allreduce of ``optimizer.buffer.grad`` or gradient clipping go).
    ``kernels`` and ``spans``: a profiler's wrapper of the kernel registry and its labelled
    spans; the default runs the registry's kernels as they are. ``schedule``: a function of
    the number of steps taken (``steps``) giving each step's learning rate. ``augment``: an
    ``Augment`` applied to every batch ``batch`` gathers. ``group``: a ``distributed.Group``:
    each global batch is split between its ranks, and the epoch's and evaluation's sums are
    summed over them (the gradient's sum is a hook, ``distributed.gradient_hook``).
    """

    def __init__(self, model, loss_fn, optimizer, hooks=(), read_every=25, kernels=ops.REGISTRY, spans=None,
                 schedule=None, augment=None, group=None):
        check_instance("Trainer", "model", model, Layer, "an nbcnn layer or Sequential")
        check_instance("Trainer", "loss_fn", loss_fn, SoftmaxCrossEntropy, "an nbcnn.losses.SoftmaxCrossEntropy")
        check_instance("Trainer", "optimizer", optimizer, (Optimizer, type(None)),
                       "an nbcnn optimizer (None to evaluate only)")
        for hook in hooks:
            if not callable(hook):
                raise TypeError(f"Trainer: each hook must be callable, got {type(hook).__name__}")
        read_every = check_int("Trainer", "read_every", read_every, minimum=1)
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.hooks = list(hooks)
        self.read_every = read_every
        self.device = model.device
        self.kernels = kernels
        self.span = spans.span if spans is not None else _no_span
        if kernels is not ops.REGISTRY or spans is not None:
            model.instrument(kernels, spans)
        self.gather = kernels.get("gather_batch", self.device)
        self.fill = kernels.get("fill", self.device)
        self.sums = self.device.zeros(2, np.float64)  # summed loss, correct count
        self.eval_sums = self.device.zeros(2, np.float64)
        self.host = np.zeros(2, np.float64)
        self._batches = {}
        self.schedule = schedule
        self.steps = 0  # training steps taken: the schedule's and the augmentation's clock
        self.augment = check_instance("Trainer", "augment", augment, (Augment, type(None)), "an nbcnn.step.Augment or None")
        self.shift_flip = kernels.get("shift_flip", self.device) if augment is not None else None
        self.group = group
        self.batch_share = 1.0  # this rank's rows over the global batch's, for the gradient's sum

    # ----------------------------------------------------------------------------- steps

    def step(self, xb, yb):
        """One training step on a batch already on the device; its loss is added to ``sums``."""
        self._tick()
        logits = self.model.forward(xb)
        with self.span("loss", "forward"):
            self.loss_fn.accumulate(logits, yb, self.sums)  # the loss's gradient too: backward has nothing to launch
        self.model.backward(self.loss_fn.backward(), need_dx=False)
        for hook in self.hooks:
            hook(self)
        with self.span("optimizer", "step"):
            self.optimizer.step()

    def batch(self, x, y, idx):
        """The rows ``idx`` of the data set (x, y), gathered into this trainer's batch buffers
        (one pair per batch size, allocated the first time), augmented when the trainer augments."""
        key = (idx.shape[0], tuple(x.shape[1:]), np.dtype(x.dtype), np.dtype(y.dtype))
        buffers = self._batches.get(key)
        if buffers is None:
            shape = (idx.shape[0],) + tuple(x.shape[1:])
            buffers = (self.device.empty(shape, x.dtype), self.device.empty(idx.shape[0], y.dtype),
                       self.device.empty(shape, x.dtype) if self.augment is not None else None)
            self._batches[key] = buffers
        with self.span("batch", "gather"):
            self.gather.run(buffers[0], buffers[1], x, y, idx)
        if self.augment is None:
            return buffers[0], buffers[1]
        a = self.augment
        with self.span("batch", "augment"):
            self.shift_flip.run(buffers[2], buffers[0], a.seed, self.steps, a.shift, a.flip, a.fill)
        return buffers[2], buffers[1]

    def read(self, sums=None):
        """(summed loss, correct count) so far: on a GPU, the one place the host waits for it."""
        sums = self.sums if sums is None else sums
        if isinstance(sums, np.ndarray):
            return float(sums[0]), float(sums[1])
        sums.copy_to_host(self.host)
        return float(self.host[0]), float(self.host[1])

    def reset(self, sums=None):
        self.fill.run(self.sums if sums is None else sums, 0.0)

    # ---------------------------------------------------------------------------- epochs

    def run_epoch(self, x, y, order, batch_size, progress=None, after_first_step=None):
        """One pass over the data set (x, y) on the device, in ``order`` (indices on the device);
        returns the mean training loss per sample. ``progress(done, mean_loss, images_per_second)``
        is called every ``read_every`` steps; ``after_first_step()`` once the first step is done
        (the host waits for the device there, so the time is honest)."""
        n = order.shape[0]
        self.reset()
        started = time.perf_counter()
        steps = 0
        loss_sum = 0.0
        group = self.group
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            lo, hi = (start, stop) if group is None else group.shard(start, stop)
            self.batch_share = (hi - lo) / (stop - start)
            if hi > lo:
                xb, yb = self.batch(x, y, order[lo:hi])
                self.step(xb, yb)
            else:  # a last batch with fewer rows than ranks: this rank adds nothing, but takes the step
                self._empty_step()
            steps += 1
            if steps == 1 and after_first_step is not None:
                self.read()
                after_first_step()
            if steps % self.read_every == 0 or stop == n:
                loss_sum, _ = self.read()
                if group is not None:
                    loss_sum = float(group.sum([loss_sum])[0])
                if not math.isfinite(loss_sum):
                    raise FloatingPointError(f"the loss became {loss_sum} by step {steps}")
                if progress is not None:
                    progress(stop, loss_sum / stop, stop / (time.perf_counter() - started))
        return loss_sum / n

    def _tick(self):
        """Set this step's learning rate from the schedule, and count the step."""
        if self.schedule is not None:
            self.optimizer.lr = self.schedule(self.steps)
        self.steps += 1

    def _empty_step(self):
        self._tick()
        self.fill.run(self.optimizer.buffer.grad, 0.0)
        for hook in self.hooks:
            hook(self)
        self.optimizer.step()

    def evaluate(self, x, y, batch_size=250):
        """(mean loss, accuracy) of the model on (x, y), in evaluation mode; one read at the end.
        In a group each rank evaluates its share of the rows and the sums are added."""
        n = x.shape[0]
        first, last = (0, n) if self.group is None else self.group.shard(0, n)
        was_training = self.model.training
        self.model.eval()
        self.reset(self.eval_sums)
        try:
            for start in range(first, last, batch_size):
                stop = min(start + batch_size, last)
                logits = self.model.forward(x[start:stop])
                self.loss_fn.accumulate(logits, y[start:stop], self.eval_sums)
        finally:
            self.model.train(was_training)
        loss_sum, correct = self.read(self.eval_sums)
        if self.group is not None:
            loss_sum, correct = (float(v) for v in self.group.sum([loss_sum, correct]))
        return loss_sum / n, correct / n
