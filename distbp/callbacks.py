"""What ``distbp.fit`` calls as a run goes: ``Callback`` and the built-in ``EarlyStopping``.

A callback gets a copy of each record as it is written to metrics.jsonl (``on_step``, after
each step; ``on_evaluation``, after each evaluation of the test or validation split), each
checkpoint (``on_checkpoint``: ``{"step", "path"}``) and the summary (``on_end``).  Returning
True from any but ``on_end`` stops the run with the weights of that step: it is checkpointed,
``summary.json`` is written and ``stopped_early`` names the step.

A callback with ``on_step`` has each step's record before the next step starts, so the run
goes step by step; one without it (``EarlyStopping`` on an evaluation metric) lets steps run
in windows between evaluations, which end windows anyway.
"""

from __future__ import annotations

import math

from .errors import UsageError

# The figures of a step's record that a callback may watch (an evaluation's: <split>_loss, _accuracy).
STEP_METRICS = ("loss", "grad_norm")


def noop(method):
    """Marks a ``Callback`` method that does nothing, so the loop knows the callback does not need it."""
    method.noop = True
    return method


class Callback:
    """Override what you need; return True from ``on_step``, ``on_evaluation`` or
    ``on_checkpoint`` to stop the run after that step."""

    @noop
    def on_step(self, record: dict) -> bool | None:
        """After each step's line is written to metrics.jsonl (``record`` is a copy of it)."""

    @noop
    def on_evaluation(self, record: dict) -> bool | None:
        """After each evaluation of the test (or validation) split: ``step``, ``epoch``,
        ``<split>_loss``, ``<split>_accuracy``."""

    @noop
    def on_checkpoint(self, record: dict) -> bool | None:
        """After each checkpoint is written: ``{"step", "path"}``."""

    @noop
    def on_end(self, summary: dict) -> None:
        """Once the run has written its summary.json (a copy of it), also when a callback stopped it."""

    def check(self, metrics: set[str]) -> None:
        """Before the run starts: raise UsageError if this callback needs a figure that the run's
        records will not have (``metrics``: the names they will have)."""


class EarlyStopping(Callback):
    """Stop when ``metric`` has not improved for ``patience`` records of it in a row.

    ``metric`` is a step figure (``loss``) or an evaluation's (``validation_loss``,
    ``test_accuracy``: a validation split comes from ``val_fraction``, a test split from
    ``X_test``/``y_test``); ``mode`` "min" or "max" (default: "max" for accuracies, else
    "min"); an improvement is a change of more than ``min_delta`` the right way.  ``best`` and
    ``best_step`` say where it was best; ``stopped_step`` where it stopped the run (or None).
    """

    def __init__(self, metric: str = "validation_loss", patience: int = 3, mode: str | None = None,
                 min_delta: float = 0.0):
        mode = mode or ("max" if metric.endswith("accuracy") else "min")
        if mode not in ("min", "max"):
            raise UsageError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise UsageError(f"EarlyStopping patience must be an integer >= 1, got {patience!r}")
        if not isinstance(min_delta, int | float) or not min_delta >= 0:
            raise UsageError(f"EarlyStopping min_delta must be a number >= 0, got {min_delta!r}")
        self.metric, self.patience, self.mode, self.min_delta = metric, patience, mode, float(min_delta)
        self.best, self.best_step, self.stopped_step, self.waited = None, None, None, 0
        if metric not in STEP_METRICS:  # watched at evaluations only: steps may run in windows
            self.on_step = Callback.on_step.__get__(self)

    def __repr__(self) -> str:
        return (f"EarlyStopping(metric={self.metric!r}, patience={self.patience}, mode={self.mode!r}, "
                f"best={self.best}, best_step={self.best_step}, stopped_step={self.stopped_step})")

    def check(self, metrics: set[str]) -> None:
        if self.metric not in metrics:
            raise UsageError(f"EarlyStopping watches {self.metric!r}, which this run does not record; it records "
                             f"{', '.join(sorted(metrics))}")

    def on_step(self, record: dict) -> bool:
        return self._seen(record)

    def on_evaluation(self, record: dict) -> bool:
        return self._seen(record)

    def _seen(self, record: dict) -> bool:
        value = record.get(self.metric)
        if value is None:
            return False
        if self.best is None or self._better(value):
            self.best, self.best_step, self.waited = value, record["step"], 0
            return False
        self.waited += 1
        if self.waited >= self.patience:
            self.stopped_step = record["step"]
            return True
        return False

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if not math.isfinite(self.best):
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
