"""What became of a call of a step, and what the sync loop does about it: one decision, no Ray.

The crew (a step one by one) and a window (steps without a Ray call each) meet the same few
things: a worker dies, a server or the weights a call needs are lost, a step's loss or summed
gradient is not finite.  Each is an ``Outcome``; ``decide`` says what to do about it, in one
place, as Ray Train v2 keeps its failure policy in one object.  Which exception is which
outcome is Ray's business (``distributed/crew.outcome_of``); what a server says when it ends
a window early is a ``Stopped``, and ``Stopped.line`` words a divergence for the user, the one
place that does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    """What became of one call of a step."""

    DONE = "done"
    CALLED_OFF = "ended early: something else in its window failed"
    WORKER_LOST = "its worker died"
    INPUTS_LOST = "the weights it needed, or the server it talked to, were lost"
    SERVER_LOST = "its server died"
    DIVERGED = "the step's loss or summed gradient is not finite"
    BUG = "an error in the call itself"


class Decision(Enum):
    """What the driver does about an outcome."""

    GO_ON = "use what the call gave"
    REDO_SHARE = "replace the worker; others redo its share"
    RECOVER_SERVERS = "recover the servers (Servers.recover), then go on from the steps they hold"
    STOP_DIVERGED = "stop the run: it diverged (the last good checkpoint is kept)"
    RAISE = "raise the error: nothing here can cure it"


def decide(outcome: Outcome, wanted: bool = True) -> Decision:
    """What to do about ``outcome``; ``wanted``: whether its result counts for the step (a late
    copy whose share was done by another does not: whatever else it met is not the run's)."""
    if outcome is Outcome.WORKER_LOST:
        return Decision.REDO_SHARE  # a lost worker is replaced, wanted or not: its slot must work again
    if outcome in (Outcome.DONE, Outcome.CALLED_OFF) or not wanted:
        return Decision.GO_ON
    if outcome in (Outcome.INPUTS_LOST, Outcome.SERVER_LOST):
        return Decision.RECOVER_SERVERS
    if outcome is Outcome.DIVERGED:
        return Decision.STOP_DIVERGED
    return Decision.RAISE


class Why(Enum):
    """Why a server ended a window before its last step."""

    CALLED_OFF = "called off"
    LATE = "a worker's share of the step is late: the driver hands it to another"
    LOSS = "the loss is not finite"
    GRADIENT = "the summed gradient has NaN or inf"


@dataclass(frozen=True)
class Stopped:
    """A server's window ended before step ``step`` was applied, for ``why``; ``loss``: the
    step's loss (``Why.LOSS``)."""

    why: Why
    step: int
    loss: float = math.nan

    @property
    def outcome(self) -> Outcome:
        return Outcome.CALLED_OFF if self.why in (Why.CALLED_OFF, Why.LATE) else Outcome.DIVERGED

    def line(self) -> str:
        """The user's one line for a divergence (``Diverged``'s message)."""
        if self.why is Why.LOSS:
            return f"training diverged at step {self.step}: the loss is {self.loss}"
        return f"training diverged at step {self.step}: {self.why.value} (the server did not apply it)"
