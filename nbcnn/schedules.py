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

from nbcnn.checks import check_choice, check_int, check_real

KINDS = ("step", "cosine", "onecycle")


class Schedule:
    """``schedule(step) -> learning rate``; see the module docstring."""

    def __init__(self, kind, lr, total_steps, steps_per_epoch, warmup=0, decay=0.5, pct_start=0.3,
                 div_factor=25.0, final_div_factor=1e4):
        check_choice("Schedule", "schedule", kind, KINDS)
        lr = check_real("Schedule", "lr", lr, minimum=0.0, open_min=True)
        total_steps = check_int("Schedule", "total_steps", total_steps, minimum=1)
        steps_per_epoch = check_int("Schedule", "steps_per_epoch", steps_per_epoch, minimum=1)
        warmup = check_int("Schedule", "warmup", warmup, minimum=0, maximum=total_steps - 1)
        if kind == "onecycle" and warmup:
            raise ValueError("Schedule: onecycle rises from a low rate by itself; it takes no warmup")
        decay = check_real("Schedule", "decay", decay, minimum=0.0, maximum=1.0, open_min=True)
        pct_start = check_real("Schedule", "pct_start", pct_start, minimum=0.0, maximum=1.0, open_min=True,
                               open_max=True)
        div_factor = check_real("Schedule", "div_factor", div_factor, minimum=0.0, open_min=True)
        final_div_factor = check_real("Schedule", "final_div_factor", final_div_factor, minimum=0.0, open_min=True)
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
