"""The worker actors of a run: MAX slots, filled as the cluster has CPUs, and emptied as it loses them.

``--workers MIN:MAX`` (a plain K is K:K) gives MAX slots.  Each slot holds one actor at a
time, placed on its own (one CPU wherever Ray finds one), not in a placement group: an actor
the cluster cannot place yet waits in Ray's queue, and Ray starts it the moment a node with
a free CPU joins (the autoscaler's, or a ``ray start --address`` by hand: the queued actors
are what asks the autoscaler for nodes).  A slot is *live* once its actor has answered its
first call; until then it is *starting*.

When a slot's actor dies (SIGKILL, OOM, a lost node), ``replace`` kills it for good and
queues a new one in the same slot: on a live node it starts at once (a replaced worker);
with no CPU left anywhere it waits for one (the run goes on with fewer workers).  Each actor's
Ray node is recorded when it comes up, so the end of a run never has to ask an actor
anything: a worker that dies after its last task does not cost the run its summary.
``resize`` turns what happened between two steps into summary.json's ``resizes`` entries.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from ..errors import RunFailed
from ..faults import Action
from .runtime import ACTOR_LOST

MAX_LOST = 10  # per worker slot: past that, workers die of something a new actor will not cure


class TooFewWorkers(RunFailed):
    """Fewer live workers than --workers MIN after waiting --elastic-timeout: the run checkpoints and stops."""


class WorkerPool:
    """Worker actors by slot; ``starting`` holds the first call to each new actor until it answers."""

    def __init__(self, spawn: Callable[[int], object], slots: int):
        self.spawn = spawn
        self.actors = [spawn(k) for k in range(slots)]
        self.node_ids: list[str | None] = [None] * slots  # each slot's latest actor's Ray node
        self.starting: dict[int, ray.ObjectRef] = {k: a.node_id.remote() for k, a in enumerate(self.actors)}
        self.lost = 0
        self.size: int | None = None  # live workers at the last ``resize``
        self.events: list[str] = []  # what changed since then, for the resize's "why"

    def __len__(self) -> int:
        return len(self.actors)

    def live(self) -> list[int]:
        """The slots whose actor is up (as far as the driver knows: a lost node shows at its next task)."""
        return [k for k in range(len(self.actors)) if k not in self.starting]

    def replace(self, k: int) -> None:
        """Worker ``k`` died: a new actor is queued in its slot (placed wherever a CPU is free)."""
        self.lost += 1
        self.events.append(f"worker {k} lost")
        if self.lost > MAX_LOST * len(self.actors):
            raise RunFailed(f"{self.lost} worker actors died; giving up (see the Ray logs: out of memory?)")
        ray.kill(self.actors[k], no_restart=True)  # if it is only unreachable, free its CPU
        self.actors[k] = self.spawn(k)
        self.starting[k] = self.actors[k].node_id.remote()

    def started(self, k: int) -> None:
        """The first call to slot ``k``'s new actor has answered (or failed: then try again)."""
        ref = self.starting.pop(k)
        try:
            self.node_ids[k] = ray.get(ref)
        except ACTOR_LOST:
            self.replace(k)
            return
        self.events.append(f"worker {k} started on node {self.node_ids[k][:8]}")

    def _take_in(self, count: int, timeout: float | None) -> None:
        """The starting actors that answer within ``timeout`` seconds (up to ``count``) become live."""
        by_ref = {ref: k for k, ref in self.starting.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=count, timeout=timeout)
        for ref in ready:
            self.started(by_ref[ref])

    def poll(self) -> None:
        """Take in the actors that came up since the last look, without waiting."""
        if self.starting:
            self._take_in(len(self.starting), 0)

    def wait_started(self, minimum: int | None = None, timeout: float | None = None) -> bool:
        """Block until ``minimum`` workers (default: every slot) are live, or ``timeout`` seconds
        have passed; True if they are."""
        minimum = len(self.actors) if minimum is None else minimum
        deadline = None if timeout is None else time.monotonic() + timeout
        self.poll()
        while len(self.live()) < minimum and self.starting:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._take_in(1, left)
        return len(self.live()) >= minimum

    def resize(self, step: int) -> dict | None:
        """A ``resizes`` entry if the number of live workers changed since the last call (the
        first call only counts them): ``step`` is the first step computed by the new number."""
        self.poll()
        now, before, why = len(self.live()), self.size, "; ".join(self.events)
        self.size, self.events = now, []
        if before is None or now == before:
            return None
        return {"step": step, "from": before, "to": now, "why": why}

    def arm(self, k: int, action: Action, seconds: float) -> None:
        """--fault-injection: worker ``k`` dies now or stalls in its next compute call."""
        self.actors[k].arm.remote(action, seconds)

    def nodes(self) -> list[str | None]:
        """The Ray node of each slot's actor, as recorded when it came up (no call to any actor);
        None for a slot that never had a live actor."""
        return list(self.node_ids)

    def close(self) -> None:
        """Kill every actor, queued ones too (the session's end: nothing may outlive the run)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
