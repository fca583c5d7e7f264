"""Who computes what in a step, and when a share is late: the plan of every step, no Ray.

A step's ``n = ceil(B / M)`` micro-batches are shared out over the idle workers as contiguous
runs (``cuts.even``), each sent as the tree nodes that cover it (``tree.blocks``), which the
servers add in the tree's order: any sharing gives the same bits.  The crew (a step one by one,
whose pieces are shared again when a worker dies or is late) and a window of steps
(windows.py: every step shared at once, each share handed in under a key) plan with the same
functions, and judge lateness by the same rule.  Injected faults (``--fault-injection``) are
planned here too: which kill strikes in a window, at which step and on which actor.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..faults import Action, Fault
from ..lecture import cuts, tree

LATE_FACTOR = 3.0  # a share is late after 3x the time the quickest share took per micro-batch...
LATE_MIN_S = 0.1  # ...plus 0.1 s, so that ordinary scheduling jitter does not trigger backups


@dataclass(frozen=True)
class Share:
    """Micro-batches ``ids`` of a step on worker ``worker``, sent as tree ``nodes``."""

    worker: int
    ids: range
    nodes: list[tree.Node]


def count(batch_size: int, micro_batch: int) -> int:
    """The number of micro-batches of a step: ``ceil(B / M)``."""
    return -(-batch_size // micro_batch)


def shares(ids: range, n: int, idle: list[int]) -> list[Share]:
    """``ids`` (micro-batches of a step of ``n``) shared out over the ``idle`` workers in order;
    with fewer micro-batches than workers the last workers get them."""
    return [Share(k, ids[part.start:part.stop], tree.blocks(ids[part.start:part.stop], n))
            for k, part in zip(idle, cuts.even(len(ids), len(idle))) if part]


def late_after(pace: float, micro_batches: int) -> float:
    """Seconds after which a share of ``micro_batches`` is late, when the quickest share took
    ``pace`` seconds per micro-batch."""
    return LATE_FACTOR * pace * micro_batches + LATE_MIN_S


def pace_of(seconds: list[float], counts: list[int]) -> float:
    """Seconds per micro-batch of the quickest of the shares that took ``seconds`` for ``counts``."""
    return min(s / c for s, c in zip(seconds, counts))


def any_late(seconds: list[float], counts: list[int]) -> bool:
    """Whether a share of a step that is done was late, judged against the step's quickest."""
    pace = pace_of(seconds, counts)
    return any(s > late_after(pace, c) for s, c in zip(seconds, counts))


def strike(faults: list[Fault], kind: str, step: int, target: int | None = None) -> Action | None:
    """The action of the injected fault of ``kind`` at ``step`` (on worker ``target``), if any."""
    for fault in faults:
        if fault.kind == kind and fault.step == step and fault.target == target:
            return fault.action
    return None


def last_before_stall(faults: list[Fault], first: int, last: int) -> int:
    """The last step of a window from ``first`` to at most ``last`` that ends before an injected
    stall (``delay-worker``: the stalled worker's share goes to another, one step at a time)."""
    stalls = [f.step for f in faults if f.action is Action.DELAY and f.step >= first]
    return min(last, min(stalls) - 1) if stalls else last
