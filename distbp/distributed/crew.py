"""A window of one step whose shares are planned again as workers die or lag: the crew.

Every step runs in a window (windows.py).  Most windows hand their steps to the workers and
the servers at once; a window of one step that may need its shares planned again (after a
late worker, an injected stall, a worker still starting) goes through the crew first: it hands
each share to a worker (``Worker.steps`` of that one step, under a key of its own) and, once
every micro-batch of the step has been handed in once, the servers get the step with the keys
that cover it.  Any tiling of ``range(n)`` by tree nodes sums to the same bits (tree.py), so any
part of a step may be redone on any worker without changing the result.  The crew uses that
freedom this way:

- a worker dies (its call raises ``RayActorError``: SIGKILL, OOM, a lost node): the idle
  workers redo its share at once, and a new actor takes its place (workers.py);
- a worker is late (its share has run ``plan.LATE_FACTOR`` times as long as the quickest share of
  the step, or of the last step, took per micro-batch, plus ``plan.LATE_MIN_S``): the idle workers
  redo its share as a backup, the first complete copy is used, and the late worker sits out
  until its call ends;
- workers come and go (``--workers MIN:MAX``): each step is shared out over the workers live
  at its start, and any that come up during it take part as soon as they do; below MIN live
  workers a step waits for more (``--elastic-timeout``), then ``TooFewWorkers`` ends the run
  at that step boundary, to be resumed (docs/elastic.md);
- a server dies, or the weights are lost: ``ServerFailed``.  The loop then calls
  ``Servers.recover``, which asks live servers how many steps they hold, or starts new ones
  from the latest checkpoint (servers.py).

Why a step is never applied twice or with a part missing: the servers get a step only with
the keys of copies that were all handed in; a copy nobody uses is dropped from their inboxes;
and a server refuses any step number but its count + 1 (``ServerState.gather``).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from ..errors import DistbpError, Diverged, RunFailed
from ..faults import Action, Fault
from ..lecture import tree
from ..step import plan
from ..step.outcome import Decision, Outcome, Stopped, Why, decide
from ..step.server import NonFiniteGradient
from ..step.worker import Leaves
from .direct import PeerLost
from .runtime import ACTOR_LOST
from .servers import ServerFailed, Servers
from .workers import TooFewWorkers, WorkerPool

START_TIMEOUT_S = 300.0  # a step waits this long for some worker to become available (the loop: --elastic-timeout)


class Status(Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Task:
    """One ``Worker.steps`` call of one step: tree ``nodes`` (over micro-batches ``ids``) on worker
    ``worker``, handed to the servers under ``key``."""

    worker: int
    ids: range
    nodes: list[tree.Node]  # computed once here, handed to the worker and then to the servers
    key: str
    info: ray.ObjectRef  # the call's result: its Leaves
    started: float
    part: Part | None  # None once its result is no longer wanted (stale)
    status: Status = Status.RUNNING
    result: Leaves | None = None


@dataclass
class Part:
    """Contiguous micro-batches that one task, or the parts it was split into, must cover."""

    ids: range
    task: Task | None = None
    children: list[Part] = field(default_factory=list)

    @property
    def done(self) -> bool:
        if self.task is not None and self.task.status is Status.DONE:
            return True
        return bool(self.children) and all(child.done for child in self.children)

    def tasks(self) -> list[Task]:
        """The finished tasks that cover this part, in micro-batch order."""
        if self.task is not None and self.task.status is Status.DONE:
            return [self.task]
        return [task for child in self.children for task in child.tasks()]

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def unfinished(self):
        """This part and its descendants that are not done, skipping whatever a done part covers."""
        if not self.done:
            yield self
            for child in self.children:
                yield from child.unfinished()


class Crew:
    """Shares out each step's micro-batches over the worker pool, with backups and redos."""

    def __init__(self, pool: WorkerPool, servers: Servers, micro_batch: int, faults: list[Fault] = (),
                 minimum: int = 1, wait_s: float = START_TIMEOUT_S):
        """``minimum``: a step starts only with that many live workers, waiting up to ``wait_s``
        for them (``--workers MIN:MAX``, ``--elastic-timeout``)."""
        self.pool, self.servers, self.micro_batch = pool, servers, micro_batch
        self.minimum, self.wait_s = minimum, wait_s
        self.resizes: list[dict] = []  # summary.json's: {"step", "from", "to", "why"}
        self.faults = list(faults)  # each strikes once, even if its step is redone after a recovery
        self.running: dict[int, Task] = {}  # worker -> its task in flight (one at a time)
        self.stats: Counter = Counter()  # backups, micro_batches_redone
        self.pace: float | None = None  # seconds per micro-batch of the quickest share of the last step
        self.stalled: set[int] = set()  # workers armed to stall in this step: they must get a share
        self.step, self.window = 0, 0  # the step being computed (from 1), and its window
        self.tries = itertools.count()  # tells apart the keys of the copies of a share

    def compute(self, step: int, batch: np.ndarray, weights: list[ray.ObjectRef], window: int) -> list[Task]:
        """Hand the servers every micro-batch of step ``step``, the step of window ``window``,
        computed on ``weights`` (what the servers published after the step before).  Returns the
        tasks whose node values the step sums, in micro-batch order.

        Raises ServerFailed if the weights cannot be had, Diverged if they come from a step
        whose gradient was not finite.
        """
        self.step, self.window = step, window
        self.stalled = self._arm(step)
        root = Part(range(plan.count(len(batch), self.micro_batch)))
        pace: float | None = None  # seconds per micro-batch of the quickest share of this step
        while not root.done:
            # a step of one share has nothing to compare with: then the last step is the yardstick
            wake = self._plan(root, batch, weights, pace if pace is not None else self.pace)
            waiting = {task.info: task for task in self.running.values()}
            waiting.update({ref: k for k, ref in self.pool.starting.items()})
            if not waiting:
                raise RunFailed(f"no worker is left to compute step {step}")
            if not self.running:  # only new actors to wait for: they may never fit on the cluster
                wake = time.monotonic() + self.wait_s
            timeout = None if wake is None else max(0.0, wake - time.monotonic())
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
            if not ready and not self.running:
                raise TooFewWorkers(f"no worker was left for step {step} and none started within "
                                    f"{self.wait_s:g} s (--elastic-timeout)")
            for ref in ready:
                job = waiting[ref]
                if isinstance(job, Task):
                    took = self._finished(job)
                    if took is not None:
                        pace = took / len(job.ids) if pace is None else min(pace, took / len(job.ids))
                else:
                    self.pool.started(job)
        for part in root.walk():  # copies still running are no longer wanted
            if part.task is not None:
                part.task.part = None
        self.pace = pace if pace is not None else self.pace
        self.stalled = set()
        return root.tasks()

    def adopt(self, worker: int, info: ray.ObjectRef) -> None:
        """``worker`` is still in a call nobody waits for (a window's, called off while it
        straggled): it sits out, as a late worker does, until that call ends."""
        self.running[worker] = Task(worker, range(0), [], "", info, time.monotonic(), None)

    def enlist(self, step: int) -> None:
        """Step ``step``'s boundary: workers that came up join; with fewer than ``minimum`` live,
        wait for more, and past ``wait_s`` raise TooFewWorkers (nothing of the step was sent)."""
        if not self.pool.wait_started(self.minimum, self.wait_s):
            live = len(self.pool.live())
            raise TooFewWorkers(f"{live} live worker{'s' if live != 1 else ''}, fewer than the {self.minimum} "
                                f"--workers asks for, after waiting {self.wait_s:g} s (--elastic-timeout)")
        resize = self.pool.resize(step)
        if resize is not None:
            self.resizes.append(resize)

    def _plan(self, root: Part, batch, weights, pace: float | None) -> float | None:
        """Give idle workers the parts that need them; return when the next share turns late."""
        for part in list(root.unfinished()):
            if part.children:  # being covered by its children (they are visited too)
                continue
            idle = self.idle()
            task = part.task
            if not idle:
                break
            if task is None or task.status is Status.FAILED:
                self._split(part, idle, batch, weights, redo=task is not None)
            elif task.status is Status.RUNNING and pace is not None and time.monotonic() >= self._late_at(task, pace):
                self.stats["backups"] += 1
                self._split(part, idle, batch, weights, redo=True)
        if pace is None or not self.idle():
            return None
        running = [p.task for p in root.unfinished() if not p.children and p.task and p.task.status is Status.RUNNING]
        return min((self._late_at(task, pace) for task in running), default=None)

    @staticmethod
    def _late_at(task: Task, pace: float) -> float:
        return task.started + plan.late_after(pace, len(task.ids))

    def _split(self, part: Part, idle: list[int], batch, weights, redo: bool) -> None:
        """Run ``part`` on the idle workers: as one task, or cut into one child part per worker."""
        if redo:
            self.stats["micro_batches_redone"] += len(part.ids)
        shares = plan.shares(part.ids, plan.count(len(batch), self.micro_batch), idle)
        if len(shares) == 1 and (part.task is None or part.task.status is Status.FAILED):
            part.task = self._submit(shares[0], part, batch, weights)
            return
        for share in shares:
            child = Part(share.ids)
            child.task = self._submit(share, child, batch, weights)
            part.children.append(child)

    def _submit(self, share: plan.Share, part: Part, batch, weights: list[ray.ObjectRef]) -> Task:
        key = f"{self.window}-{self.step}-{share.worker}-{next(self.tries)}"
        info = self.pool.actors[share.worker].steps.remote(
            self.window, [(self.step, batch, share.nodes, key, None)], *weights)
        task = Task(share.worker, share.ids, share.nodes, key, info, time.monotonic(), part)
        self.running[share.worker] = task
        return task

    def idle(self) -> list[int]:
        """Workers free for a share.  With fewer micro-batches than workers, ``cuts.even`` gives them
        to the last ones: workers armed with --fault-injection delay-worker go last."""
        idle = [k for k in range(len(self.pool)) if k not in self.running and k not in self.pool.starting]
        return sorted(idle, key=lambda k: k in self.stalled)

    def _finished(self, task: Task) -> float | None:
        """Collect a finished task; return its duration if it counts for this step."""
        del self.running[task.worker]
        try:
            handed = ray.get(task.info)
            if not handed:  # the servers said no to the weights: they were given up on
                raise PeerLost(f"step {self.step}: no weights after step {self.step - 1}")
            task.result = handed[0]
        except Exception as exc:  # noqa: BLE001 - decided below; what nothing here cures is re-raised
            task.status = Status.FAILED
            decision = decide(outcome_of(exc, worker=True), wanted=task.part is not None)
            if decision is Decision.REDO_SHARE:  # its part is planned again (``_plan``)
                self.pool.replace(task.worker)
            elif decision is Decision.STOP_DIVERGED:  # the weights it was given are the refused step's
                raise Diverged(Stopped(Why.GRADIENT, self.step - 1).line()) from None
            elif decision is Decision.RECOVER_SERVERS:
                self._abandon()
                raise ServerFailed(f"step {self.step}: its weights are lost ({type(exc).__name__})") from exc
            elif decision is Decision.RAISE:
                raise plain(exc) from None
            return None
        task.status = Status.DONE
        return time.monotonic() - task.started if task.part is not None else None

    def _abandon(self) -> None:
        """The step is given up: results of its other tasks, still running, are not wanted."""
        for task in self.running.values():
            task.part = None

    def _arm(self, step: int) -> set[int]:
        """Arm the workers' faults injected at ``step`` (a kill-server strikes in the servers' plan:
        windows.py); return the workers that will stall in it."""
        stalled = set()
        for fault in [f for f in self.faults if f.step == step and f.kind != "kill-server"]:
            self.faults.remove(fault)
            self.pool.arm(fault.target, fault.action, fault.seconds)
            if fault.action is Action.DELAY:
                stalled.add(fault.target)
        return stalled


def outcome_of(exc: BaseException, worker: bool) -> Outcome:
    """What a call's exception means: the server refused the step, the call's inputs (the weights,
    a server) were lost, its actor died (a ``worker``'s, or a server's), or a bug."""
    if isinstance(exc, NonFiniteGradient):
        return Outcome.DIVERGED
    if isinstance(exc, RayTaskError):  # the task did not run: an argument (the weights) failed
        return Outcome.INPUTS_LOST if isinstance(exc, (RayActorError, ObjectLostError)) else Outcome.BUG
    if isinstance(exc, ACTOR_LOST):  # also killed by Ray's memory monitor
        return Outcome.WORKER_LOST if worker else Outcome.SERVER_LOST
    if isinstance(exc, ObjectLostError):  # PeerLost too: a server the call talked to is gone
        return Outcome.INPUTS_LOST
    return Outcome.BUG


def plain(exc: BaseException) -> BaseException:
    """A DistbpError raised in an actor (data that changed under the run) as itself, not wrapped in
    Ray's RayTaskError with the actor's traceback: one line for the user."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(exc, RayTaskError) and isinstance(cause, DistbpError) else exc

