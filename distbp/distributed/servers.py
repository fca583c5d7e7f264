"""``--servers S``: the flat parameter vector cut into S parts, one server actor each.

Li et al. (OSDI 2014) shard a parameter server by key range, so that the bytes each server
receives per step fall as servers are added.  Here a server's keys are a slice of every
layer's range of the flat vector (``cuts.striped``: runs of whole blocks), so that each link's
push starts with the top layer and its pull with layer 1.  A worker hands server ``s`` only
its part's columns of its tree-node values and reads the S parts back into one buffer.  The
tree sum and the optimizer are elementwise (optim.py), so every entry goes through the same
additions and the same update whichever server owns it: the weights are bitwise identical for
any S.

The parts are decided once, by the run's transport (``transport.parts``).  ``Servers`` is
the driver's handle on the S actors: each method starts the same call on every server and
returns the ObjectRefs, in server order.  It also brings them back after a failure
(``recover``): a live group says how many steps it holds; a lost one restarts from the
latest checkpoint, in its bundle of the servers' placement group, which Ray moves to another
node when the server's node is lost.  Until there is a CPU for it the restart is tried again,
for up to ``--elastic-timeout``; then ``ServersLost`` stops the run at its last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError

from ..errors import Diverged, RunFailed
from ..lecture import cuts
from ..step.server import NonFiniteGradient
from .board import CallOff
from .runtime import ACTOR_LOST

SERVER_TIMEOUT_S = 30.0  # a live server answers step_count within this, whatever it is doing
RESTART_PAUSE_S = 1.0  # between tries to restart servers that could not start


class ServerFailed(RunFailed):
    """A server died or a step's inputs were lost; ``Servers.recover`` brings the servers back."""


class ServersLost(RunFailed):
    """The servers could not be restarted within --elastic-timeout (no CPU for them anywhere)."""


class Servers:
    """The S ``ParameterServer`` actors of a run; server ``s`` owns ``parts[s]`` of the flat vector."""

    def __init__(self, spawn: Callable[[int], object], parts: list[cuts.Part], wait_s: float = 300.0):
        """``spawn(s)`` starts the actor of server ``s``; ``wait_s``: how long a restart may wait for
        a CPU (--elastic-timeout)."""
        self.spawn, self.parts, self.wait_s = spawn, parts, wait_s
        self.actors = [spawn(s) for s in range(len(parts))]
        self.restarts = 0

    def weights(self) -> list:
        """The current weights, one ref per server: pass them on as ``Worker.steps(..., *refs)``."""
        return [a.weights.remote() for a in self.actors]

    def steps(self, window: int, plan: list[tuple]) -> tuple[list, list]:
        """Start window ``window`` of ``plan`` on every server (``ParameterServer.steps``; a kill
        injected in the plan strikes the first server only).  Returns the refs of each server's
        outcome and of the weights it then publishes, in server order."""
        calm = [(*entry[:-1], None) for entry in plan]
        calls = [a.steps.remote(window, plan if s == 0 else calm, self.actors) for s, a in enumerate(self.actors)]
        return [c[0] for c in calls], [c[1] for c in calls]

    def call_off(self, window: int) -> None:
        """Every server ends ``window`` where it is (a dead one runs no window: nothing to call off)."""
        for a in self.actors:
            a.ask.remote(CallOff(window))

    def report(self) -> list:
        return [a.report.remote() for a in self.actors]

    def snapshot(self) -> dict[str, np.ndarray]:
        """The weights and optimizer buffers the servers hold, as full-length arrays."""
        got = self.get([a.snapshot.remote() for a in self.actors])
        whole = {key: np.empty(sum(len(p) for p in self.parts), got[0][key].dtype) for key in got[0]}
        for part, arrays in zip(self.parts, got):
            for key, vector in whole.items():
                part.put(vector, arrays[key])
        return whole

    def restore(self, arrays: dict[str, np.ndarray], t: int, timeout: float | None = None) -> None:
        """Load full-length buffers (weights, optimizer state) of step ``t``: each server its part."""
        ray.get([a.restore.remote({k: part.take(v) for k, v in arrays.items()}, t)
                 for a, part in zip(self.actors, self.parts)], timeout=timeout)

    def node_ids(self) -> list[str]:
        return ray.get([a.node_id.remote() for a in self.actors])

    def get(self, refs):
        """``ray.get`` of server results: ServerFailed if a server is gone, Diverged if it refused."""
        try:
            return ray.get(refs)
        except NonFiniteGradient as exc:
            raise Diverged(f"training diverged: {_message(exc)} (the server did not apply it)") from None
        except (*ACTOR_LOST, ObjectLostError) as exc:
            raise ServerFailed(str(type(exc).__name__)) from exc

    def recover(self, latest: Callable[[], tuple[dict[str, np.ndarray], int]]) -> int:
        """After ServerFailed: the number of steps the (possibly new) servers hold.

        Live servers that agree have applied exactly that many steps, so nothing is applied
        twice.  Otherwise (any of them dead, or servers that disagree) all are replaced and
        loaded with ``latest()``: the arrays and step of the latest checkpoint.
        """
        try:
            counts = ray.get([a.step_count.remote() for a in self.actors], timeout=SERVER_TIMEOUT_S)
            if len(set(counts)) == 1:
                return counts[0]
        except (*ACTOR_LOST, GetTimeoutError):
            pass
        self.restarts += 1
        arrays, step = latest()
        deadline = time.monotonic() + self.wait_s
        while True:
            for actor in self.actors:  # all of them, so that they restart from one checkpoint
                ray.kill(actor, no_restart=True)
            self.actors = [self.spawn(s) for s in range(len(self.parts))]
            try:  # a server whose node was lost waits for its bundle to be placed again
                self.restore(arrays, step, timeout=max(1.0, deadline - time.monotonic()))
                return step
            except (*ACTOR_LOST, GetTimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise ServersLost(f"the parameter servers could not be restarted within {self.wait_s:g} s "
                                      f"(--elastic-timeout; {type(exc).__name__}): no CPU for them") from None
            time.sleep(RESTART_PAUSE_S)  # a node just lost: Ray moves its bundles elsewhere


def _message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return str(cause if cause is not None else exc).strip().splitlines()[-1]
