"""The actors of a run, and how each step's micro-batches reach them whatever goes wrong.

A step is done when each of its ``n`` micro-batches has been backpropagated once into the
tree nodes the server adds.  Any tiling of ``range(n)`` by tree nodes sums to the same bits
(tree.py), so any part of a step may be redone on any worker without changing the result.
The crew uses that freedom three ways:

- a worker dies (its task raises ``RayActorError``: SIGKILL, OOM, a lost node): the idle
  workers redo its share at once, and a new actor takes its place in the placement group;
- a worker is late (its share has run ``LATE_FACTOR`` times as long as the quickest share of
  the step, or of the last step, took per micro-batch, plus ``LATE_MIN_S``): the idle workers
  redo its share as a backup, the first complete copy is used, and the late worker sits out
  until its task ends;
- the server dies, or a step's inputs are lost: ``ServerFailed``.  The trainer then calls
  ``recover``, which asks a live server how many steps it holds, or starts a new server
  from the latest checkpoint.

Why a step is never applied twice or with a part missing: the driver sends the server a
step only once all of its inputs exist; Ray runs an actor task only when its arguments are
ready and fails it unrun when one of them failed (checked: the server's step counter stays
put); and the server refuses any step number but its count + 1 (``ServerState.step``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from . import tree
from .errors import Diverged, RunFailed
from .faults import Fault
from .step import NonFiniteGradient, split_even

LATE_FACTOR = 3.0  # a share is late after 3x the time the quickest share took per micro-batch...
LATE_MIN_S = 0.1  # ...plus 0.1 s, so that ordinary scheduling jitter does not trigger backups
SERVER_TIMEOUT_S = 30.0  # a live server answers step_count within this, whatever it is doing
START_TIMEOUT_S = 300.0  # a step waits this long for some worker to become available
MAX_LOST = 10  # per worker slot: past that, workers die of something a new actor will not cure


class ServerFailed(RunFailed):
    """The server died or a step's inputs were lost; ``Crew.recover`` brings the server back."""


@dataclass
class Task:
    """One ``Worker.compute`` call: micro-batches ``ids`` on worker ``worker``."""

    worker: int
    ids: list[int]
    values: list[ray.ObjectRef]  # its node values: one object per server range (shards.py)
    info: ray.ObjectRef
    started: float
    piece: Piece | None  # None once its result is no longer wanted (stale)
    status: str = "running"  # running | done | failed
    result: tuple[np.ndarray, float] | None = None  # (per-micro-batch errors, seconds)


@dataclass
class Piece:
    """Contiguous micro-batches that one task, or the pieces it was split into, must cover."""

    ids: list[int]
    task: Task | None = None
    children: list[Piece] = field(default_factory=list)

    @property
    def done(self) -> bool:
        if self.task is not None and self.task.status == "done":
            return True
        return bool(self.children) and all(child.done for child in self.children)

    def tasks(self) -> list[Task]:
        """The finished tasks that cover this piece, in micro-batch order."""
        if self.task is not None and self.task.status == "done":
            return [self.task]
        return [task for child in self.children for task in child.tasks()]

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def unfinished(self):
        """This piece and its descendants that are not done, skipping whatever a done piece covers."""
        if not self.done:
            yield self
            for child in self.children:
                yield from child.unfinished()


@dataclass
class Computed:
    """A step's micro-batch results, ready for ``ParameterServer.step``."""

    n: int
    nodes: list[list[tree.Node]]  # per task, the tree nodes it sends
    values: list[list[ray.ObjectRef]]  # per task, its node values: one object per server range
    losses: list[float]  # summed error of each micro-batch, in order
    seconds: float  # the longest compute time of the tasks used


class Crew:
    """The parameter server (``shards.Servers``: S actors) and ``workers`` worker actors, replaced when they die."""

    def __init__(self, spawn_server: Callable[[], object], spawn_worker: Callable[[int], object], workers: int,
                 micro_batch: int, faults: list[Fault] = ()):
        self.spawn_server, self.spawn_worker = spawn_server, spawn_worker
        self.server = spawn_server()
        self.workers = [spawn_worker(k) for k in range(workers)]
        self.micro_batch = micro_batch
        self.faults = list(faults)  # each strikes once, even if its step is redone after a recovery
        self.running: dict[int, Task] = {}  # worker -> its task in flight (one at a time)
        self.starting: dict[int, ray.ObjectRef] = {}  # worker -> first call to its replacement actor
        self.stats: Counter = Counter()  # workers_lost, backups, micro_batches_redone, server_restarts
        self.pace: float | None = None  # seconds per micro-batch of the quickest share of the last step
        self.stalled: set[int] = set()  # workers armed to stall in this step: they must get a share
        self.step = 0  # the step being computed (from 0)

    # -- one step ---------------------------------------------------------------------------

    def compute(self, t: int, batch: np.ndarray, weights: list[ray.ObjectRef]) -> Computed:
        """Backpropagate every micro-batch of step ``t`` (from 0) on ``weights`` (one ref per server range).

        Raises ServerFailed if the weights cannot be had, Diverged if they come from a step
        whose gradient was not finite.
        """
        n = -(-len(batch) // self.micro_batch)
        self.step = t
        self.stalled = self._arm(t + 1)
        root = Piece(list(range(n)))
        pace: float | None = None  # seconds per micro-batch of the quickest share of this step
        while not root.done:
            # a step of one share has nothing to compare with: then the last step is the yardstick
            wake = self._plan(root, batch, weights, pace if pace is not None else self.pace)
            waiting = {task.info: task for task in self.running.values()}
            waiting.update({ref: k for k, ref in self.starting.items()})
            if not waiting:
                raise RunFailed(f"no worker is left to compute step {t + 1}")
            if not self.running:  # only new actors to wait for: they may never fit on the cluster
                wake = time.monotonic() + START_TIMEOUT_S
            timeout = None if wake is None else max(0.0, wake - time.monotonic())
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
            if not ready and not self.running:
                raise RunFailed(f"no worker could be started for step {t + 1} within {START_TIMEOUT_S:.0f} s")
            for ref in ready:
                job = waiting[ref]
                if isinstance(job, Task):
                    took = self._finished(job, t)
                    if took is not None:
                        pace = took / len(job.ids) if pace is None else min(pace, took / len(job.ids))
                else:
                    self._started(job)
        for piece in root.walk():  # copies still running are no longer wanted
            if piece.task is not None:
                piece.task.piece = None
        self.pace = pace if pace is not None else self.pace
        self.stalled = set()
        tasks = root.tasks()
        return Computed(n, [tree.blocks(task.ids, n) for task in tasks], [task.values for task in tasks],
                        [float(v) for task in tasks for v in task.result[0]],
                        max(task.result[1] for task in tasks))

    def _plan(self, root: Piece, batch, weights, pace: float | None) -> float | None:
        """Give idle workers the pieces that need them; return when the next share turns late."""
        for piece in list(root.unfinished()):
            if piece.children:  # being covered by its children (they are visited too)
                continue
            idle = self._idle()
            task = piece.task
            if not idle:
                break
            if task is None or task.status == "failed":
                self._split(piece, idle, batch, weights, redo=task is not None)
            elif task.status == "running" and pace is not None and time.monotonic() >= self._late_at(task, pace):
                self.stats["backups"] += 1
                self._split(piece, idle, batch, weights, redo=True)
        if pace is None or not self._idle():
            return None
        running = [p.task for p in root.unfinished() if not p.children and p.task and p.task.status == "running"]
        return min((self._late_at(task, pace) for task in running), default=None)

    @staticmethod
    def _late_at(task: Task, pace: float) -> float:
        return task.started + LATE_FACTOR * pace * len(task.ids) + LATE_MIN_S

    def _split(self, piece: Piece, idle: list[int], batch, weights, redo: bool) -> None:
        """Run ``piece`` on the idle workers: as one task, or cut into one child piece per worker."""
        if redo:
            self.stats["micro_batches_redone"] += len(piece.ids)
        shares = [(k, ids) for k, ids in zip(idle, split_even(len(piece.ids), len(idle))) if ids]
        if len(shares) == 1 and (piece.task is None or piece.task.status == "failed"):
            piece.task = self._submit(shares[0][0], piece.ids, piece, batch, weights)
            return
        for k, positions in shares:
            child = Piece([piece.ids[i] for i in positions])
            child.task = self._submit(k, child.ids, child, batch, weights)
            piece.children.append(child)

    def _submit(self, k: int, ids: list[int], piece: Piece, batch, weights: list[ray.ObjectRef]) -> Task:
        if len(weights) == 1:
            values, info = self.workers[k].compute.remote(batch, ids, *weights, step=self.step)
            values = [values]
        else:  # --servers S: one object of node values per server range (shards.py)
            *values, info = self.workers[k].compute.options(num_returns=len(weights) + 1).remote(
                batch, ids, *weights, step=self.step)
        task = Task(k, ids, values, info, time.monotonic(), piece)
        self.running[k] = task
        return task

    def _idle(self) -> list[int]:
        """Workers free for a share.  With fewer micro-batches than workers, split_even gives them
        to the last ones: workers armed with --fault-injection delay-worker go last."""
        idle = [k for k in range(len(self.workers)) if k not in self.running and k not in self.starting]
        return sorted(idle, key=lambda k: k in self.stalled)

    def _finished(self, task: Task, t: int) -> float | None:
        """Collect a finished task; return its duration if it counts for this step."""
        del self.running[task.worker]
        try:
            task.result = ray.get(task.info)
        except Exception as exc:  # noqa: BLE001 - sorted below; anything else is re-raised
            task.status = "failed"
            for ref in task.values:
                _consume(ref)
            cause = _cause(exc)
            if cause == "worker":
                self._replace(task.worker)
            elif task.piece is None:
                pass  # a copy nobody waits for, on inputs that failed: nothing to do
            elif cause == "diverged":
                raise Diverged(f"training diverged at step {t}: the summed gradient has NaN or inf "
                               "(the server did not apply it)") from None
            elif cause == "inputs":
                self._abandon(task)
                raise ServerFailed(f"step {t + 1}: its weights are lost ({type(exc).__name__})") from exc
            else:
                raise
            return None
        task.status = "done"
        return time.monotonic() - task.started if task.piece is not None else None

    def _abandon(self, failed: Task) -> None:
        """The step is given up: results of its other tasks, still running, are not wanted."""
        for task in self.running.values():
            task.piece = None

    # -- workers come and go -----------------------------------------------------------------

    def _replace(self, k: int) -> None:
        """Worker ``k`` died: a new actor takes its place (its bundle is free again)."""
        self.stats["workers_lost"] += 1
        if self.stats["workers_lost"] > MAX_LOST * len(self.workers):
            raise RunFailed(f"{self.stats['workers_lost']} worker actors died; giving up (see the Ray logs: "
                            "out of memory?)")
        ray.kill(self.workers[k], no_restart=True)  # if it is only unreachable, free its bundle
        self.workers[k] = self.spawn_worker(k)
        self.starting[k] = self.workers[k].node_id.remote()

    def _started(self, k: int) -> None:
        ref = self.starting.pop(k)
        try:
            ray.get(ref)
        except RayActorError:  # the replacement died too: try again
            self._replace(k)

    def _arm(self, step: int) -> set[int]:
        """Arm the faults injected at ``step``; return the workers that will stall in it."""
        stalled = set()
        for fault in [f for f in self.faults if f.step == step]:
            self.faults.remove(fault)
            if fault.kind == "kill-server":
                self.server.arm(fault.action)
            else:
                self.workers[fault.target].arm.remote(fault.action, fault.seconds)
                if fault.action == "delay":
                    stalled.add(fault.target)
        return stalled

    # -- the server ----------------------------------------------------------------------------

    def get(self, ref):
        """``ray.get`` of a server result: ServerFailed if the server is gone, Diverged if it refused."""
        try:
            return ray.get(ref)
        except NonFiniteGradient as exc:
            raise Diverged(f"training diverged: {_message(exc)} (the server did not apply it)") from None
        except (RayActorError, ObjectLostError) as exc:
            raise ServerFailed(str(type(exc).__name__)) from exc

    def recover(self, restore: Callable[[object], int]) -> int:
        """After ServerFailed: the number of steps the (possibly new) server holds.

        A live server has applied exactly ``step_count`` steps, so nothing is applied twice.
        A dead one (with --servers S: any of them, or servers that disagree) is replaced, and
        ``restore(server)`` loads the latest checkpoint into the new one and returns its step.
        """
        try:
            counts = ray.get(self.server.step_count(), timeout=SERVER_TIMEOUT_S)
            if len(set(counts)) == 1:
                return counts[0]
        except (RayActorError, GetTimeoutError):
            pass
        self.server.kill()  # with --servers S: all of them, so that they restart from one checkpoint
        self.stats["server_restarts"] += 1
        self.server = self.spawn_server()
        return restore(self.server)

    def nodes(self) -> list[str]:
        """The Ray node id of each worker."""
        return ray.get([w.node_id.remote() for w in self.workers])


def _cause(exc: BaseException) -> str:
    """Why a compute task failed: its worker died, its inputs failed, the server refused, or a bug."""
    if isinstance(exc, NonFiniteGradient):
        return "diverged"
    if isinstance(exc, RayTaskError):  # the task did not run: an argument (the weights) failed
        return "inputs" if isinstance(exc, (RayActorError, ObjectLostError)) else "bug"
    if isinstance(exc, RayActorError):
        return "worker"
    if isinstance(exc, ObjectLostError):
        return "inputs"
    return "bug"


def _consume(ref: ray.ObjectRef) -> None:
    """Read a failed result we are done with, so Ray does not report it as an unhandled error."""
    try:
        ray.get(ref)
    except Exception:  # noqa: BLE001, S110 - the failure was already handled through the task's other result
        pass


def _message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return str(cause if cause is not None else exc).strip().splitlines()[-1]
