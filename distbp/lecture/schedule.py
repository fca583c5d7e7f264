"""The learning rate of each step: a pure function of the step number.  No state, no Ray.

``lr(t)`` for step ``t = 1..T`` is built from three independent pieces:

- the linear scaling rule (Goyal et al. 2017, section 2.1), optional: ``--lr`` is the rate
  tuned for a batch of ``--base-batch`` samples, and a run with global batch ``B`` uses the
  peak rate ``lr * B / base_batch``;
- linear warmup (Goyal et al. 2017, section 2.2, "gradual warmup"): the first ``W`` steps
  ramp linearly, ``peak * t / W``, so step ``W`` is the first at the full rate and step 1
  already moves the weights;
- the schedule after warmup: ``constant``; ``step`` multiplies the rate by ``--lr-decay``
  at each epoch listed in ``--lr-step-epochs`` (counted from the start of training, as in
  Goyal et al.'s "divide by 10 at epochs 30, 60 and 80"); ``cosine`` decays from the peak
  to 0 over the steps after warmup (Loshchilov & Hutter 2017, without restarts).

Because the rate depends on ``t`` alone, never on the worker count, runs with any K still
apply the same updates bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class Schedule:
    """``lr(t)`` for steps ``t = 1..total_steps`` of ``steps_per_epoch`` steps each."""

    peak: float
    total_steps: int
    steps_per_epoch: int
    kind: str = "constant"
    warmup_steps: int = 0
    decay: float = 0.1
    milestones: tuple[float, ...] = ()  # epochs at which ``step`` multiplies by ``decay``

    def __call__(self, t: int) -> float:
        if t <= self.warmup_steps:
            return self.peak * t / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        if self.kind == "step":
            done = t - 1  # steps completed before step t
            passed = sum(1 for epoch in self.milestones if done >= epoch * self.steps_per_epoch)
            return self.peak * self.decay ** passed
        if self.kind == "cosine":
            # Progress 0 at the first step after warmup; the last step's rate is small but not 0,
            # so no step of the run is wasted on a zero update.
            span = max(1, self.total_steps - self.warmup_steps)
            progress = (t - self.warmup_steps - 1) / span
            return self.peak * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown learning-rate schedule {self.kind!r}")


def scaled_lr(lr: float, batch_size: int, base_batch: int | None) -> float:
    """The linear scaling rule: ``lr`` is for ``base_batch`` samples, so ``B`` gets ``lr * B / base_batch``."""
    return lr if base_batch is None else lr * batch_size / base_batch


def parse_milestones(text: str | None) -> tuple[float, ...]:
    """``"30,60,80"`` -> ``(30.0, 60.0, 80.0)``; raises ValueError on anything else."""
    if text is None or str(text).strip() == "":
        return ()
    values = tuple(float(v) for v in str(text).split(","))
    if any(not math.isfinite(v) or v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise ValueError(f"expected increasing positive epochs, got {text!r}")
    return values


def from_config(config, total_steps: int, steps_per_epoch: int) -> Schedule:
    """The schedule a validated ``Config`` asks for."""
    return Schedule(peak=scaled_lr(config.lr, config.batch_size, config.base_batch),
                    total_steps=total_steps, steps_per_epoch=steps_per_epoch, kind=config.lr_schedule,
                    warmup_steps=config.warmup_steps, decay=config.lr_decay,
                    milestones=parse_milestones(config.lr_step_epochs))
