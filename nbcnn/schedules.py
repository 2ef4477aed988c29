"""Learning-rate schedules: the rate as a function of the training step alone.

A schedule is called with the number of steps already taken (0 for the first) and returns
the learning rate for the next one. Nothing else goes in, so a run resumed after epoch e
(step e * steps_per_epoch) continues with exactly the rates an uninterrupted run would use.

    step      lr * decay ** epoch                        (epoch = step // steps_per_epoch)
    cosine    lr * (1 + cos(pi * t)) / 2                 (t from 0 to 1 over the run)
    onecycle  up from lr / 25 to lr, then down to lr / 25e4, both halves cosine-shaped, the
              rise over the first 30% of the run (Smith and Topin's one-cycle policy, with
              the defaults of PyTorch's OneCycleLR)

``warmup`` steps (step and cosine) first raise the rate linearly from lr / warmup to lr;
the schedule proper starts after them. onecycle has its own rise and takes no warm-up.
"""

import math

KINDS = ("step", "cosine", "onecycle")


class Schedule:
    """``schedule(step) -> learning rate``; see the module docstring."""

    def __init__(self, kind, lr, total_steps, steps_per_epoch, warmup=0, decay=0.5, pct_start=0.3,
                 div_factor=25.0, final_div_factor=1e4):
        if kind not in KINDS:
            raise ValueError(f"unknown schedule {kind!r}: choose one of {', '.join(KINDS)}")
        for name, value in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < total_steps:
            raise ValueError(f"warm-up must be a whole number of steps in [0, {total_steps}), got {warmup!r}")
        if kind == "onecycle" and warmup:
            raise ValueError("onecycle rises from a low rate by itself: it takes no separate warm-up")

        if not 0 < lr < math.inf:
            raise ValueError(f"learning rate must be a positive number, got {lr!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"lr decay must be a number in (0, 1], got {decay!r}")
        self.kind, self.lr, self.total, self.per_epoch = kind, float(lr), total_steps, steps_per_epoch
        self.warmup, self.decay = warmup, float(decay)
        self.pct_start, self.div, self.final_div = pct_start, div_factor, final_div_factor

    def __call__(self, step):
        lr = self.lr
        if step < self.warmup:
            return lr * (step + 1) / self.warmup
        if self.kind == "step":
            return lr * self.decay ** (step // self.per_epoch)
        if self.kind == "cosine":
            t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return lr * (1 + math.cos(math.pi * t)) / 2
        # onecycle, phase for phase as PyTorch's OneCycleLR (anneal_strategy="cos")
        peak = max(0.0, self.pct_start * self.total - 1)  # the step at which the rate tops out
        low, lowest = lr / self.div, lr / self.div / self.final_div
        if step <= peak:
            return _cosine_between(low, lr, step / peak) if peak > 0 else lr
        return _cosine_between(lr, lowest, min(1.0, (step - peak) / max(1.0, self.total - 1 - peak)))

    def describe(self):
        if self.kind == "step":
            text = f"lr {self.lr} x{self.decay} per epoch"
        elif self.kind == "cosine":
            text = f"lr {self.lr}, cosine to 0"
        else:
            text = f"one cycle {self.lr / self.div:.3g} -> {self.lr} -> {self.lr / self.div / self.final_div:.3g}"
        return text + (f", {self.warmup} warm-up steps" if self.warmup else "")


def _cosine_between(start, end, t):
    """From ``start`` at t = 0 to ``end`` at t = 1 along half a cosine."""
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2
