"""The K worker actors of a run, and new ones in place of those that die.

A worker slot ``k`` holds one actor at a time.  When its actor dies (SIGKILL, OOM, a lost
node), ``replace`` kills it for good (freeing its bundle if it was only unreachable) and
starts a new one in the same bundle; the slot is busy until the new actor answers.  Each
actor's Ray node is recorded when it comes up, so the end of a run never has to ask an
actor anything: a worker that dies after its last task does not cost the run its summary.
"""

from __future__ import annotations

from collections.abc import Callable

import ray
from ray.exceptions import RayActorError

from ..errors import RunFailed
from ..faults import Action

MAX_LOST = 10  # per worker slot: past that, workers die of something a new actor will not cure


class WorkerPool:
    """Worker actors by slot; ``starting`` holds the first call to each new actor until it answers."""

    def __init__(self, spawn: Callable[[int], object], workers: int):
        self.spawn = spawn
        self.actors = [spawn(k) for k in range(workers)]
        self.node_ids: list[str | None] = [None] * workers  # each slot's latest actor's Ray node
        self.starting: dict[int, ray.ObjectRef] = {k: a.node_id.remote() for k, a in enumerate(self.actors)}
        self.lost = 0

    def __len__(self) -> int:
        return len(self.actors)

    def replace(self, k: int) -> None:
        """Worker ``k`` died: a new actor takes its place (its bundle is free again)."""
        self.lost += 1
        if self.lost > MAX_LOST * len(self.actors):
            raise RunFailed(f"{self.lost} worker actors died; giving up (see the Ray logs: out of memory?)")
        ray.kill(self.actors[k], no_restart=True)  # if it is only unreachable, free its bundle
        self.actors[k] = self.spawn(k)
        self.starting[k] = self.actors[k].node_id.remote()

    def started(self, k: int) -> None:
        """The first call to slot ``k``'s new actor has answered (or failed: then try again)."""
        ref = self.starting.pop(k)
        try:
            self.node_ids[k] = ray.get(ref)
        except RayActorError:
            self.replace(k)

    def wait_started(self) -> None:
        """Block until every new actor has answered (its node id recorded)."""
        while self.starting:
            self.started(next(iter(self.starting)))

    def arm(self, k: int, action: Action, seconds: float) -> None:
        """--fault-injection: worker ``k`` dies now or stalls in its next compute call."""
        self.actors[k].arm.remote(action, seconds)

    def nodes(self) -> list[str | None]:
        """The Ray node of each slot's actor, as recorded when it came up (no call to any actor)."""
        return list(self.node_ids)
