"""Windows of steps without a Ray call each: the workers and servers hand each other the steps.

A step of the sync loop costs Ray task calls: each worker's compute, each server's step and
report, and the driver in between (the "Ray call floor": all of a small model's step,
docs/performance.md).  On the direct transport the actors already talk directly, so
for a run of steps with nothing to decide between them the driver plans them all at once: one
call to each worker and one to each server for the whole window, and then the actors go on
over their sockets (direct.py):

- a worker, for each step, asks each server for the weights after the step before (the server
  answers once it holds them), computes its share's tree nodes and hands them in under a key
  the driver chose, with its micro-batches' errors and its compute time;
- a server, for each step, waits until every key of the step is in, checks the step's loss
  (the errors' exact sum, as the sync loop does, before anything is applied), sums in the
  tree's order, updates, and lets the waiting workers have the weights.

Each step is shared out as the crew shares a step that goes well (``plan.shares``: ``cuts.even``
over the idle workers, ``tree.blocks`` of each share), and the servers add the same nodes in the
same order: the bits are those of steps run one by one (tests/test_equivalence.py).

What a window is not used for, so that everything else keeps its meaning:

- a step with an injected stall (``delay-worker``: its share goes to another worker), and a
  window may not run past a checkpoint, an evaluation or the end of an epoch (each needs the
  driver between two steps); injected kills strike inside windows, at their step;
- runs with ``--clip-norm`` over several servers (a step needs every server's sums first) and
  ``fit`` callbacks with ``on_step`` (they may stop the run after any step);
- the steps after a window where a worker was late: those go one by one, where the crew hands
  a late worker's share to another (a window cannot).  A server that waits for a late share
  inside a window (inbox.py's rule) ends the window there; the driver calls it off, and a
  worker still in its call then sits out the crew's steps until the call ends (``Crew.adopt``).

When something fails in a window (a worker or a server dies, a step diverges), the driver calls
the window off: every server ends its steps there and tells its waiting workers so.  The steps
every server applied are kept (and logged); a dead worker is replaced; servers that do not
agree, or a dead one, are recovered as in the sync loop (``ServerFailed``).  Nothing is applied
twice and no step is lost: what the window did not finish is redone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.exceptions import ObjectLostError

from ..errors import Diverged
from ..step import plan
from ..step.outcome import Decision, Outcome, Stopped, Why, decide
from .crew import Crew, outcome_of, plain
from .direct import call_off
from .runtime import ACTOR_LOST
from .servers import ServerFailed

WINDOW = 16  # steps a window holds at most: new workers join, and Ctrl-C acts, at its end
GRACE_S = 0.1  # a window called off and its servers done: how long its workers have to end their calls (one
# still in it then sits out until it ends: that costs the crew a worker for a while, never a wait)


@dataclass
class Ran:
    """A step a window applied on every server."""

    step: int
    batch_size: int
    loss: float
    seconds: float  # the slowest task's compute time
    workers: int
    micro_squares: float  # the exact sum of the micro-batches' squared norms (step/noise.py)
    when: float  # when it was applied, on the driver's perf_counter (the server's clock, anchored at the window's end)


class Windows:
    """Runs windows of steps for the sync loop, over the crew's workers and servers."""

    def __init__(self, crew: Crew, transport):
        self.crew, self.pool, self.servers, self.transport = crew, crew.pool, crew.servers, transport
        self.count = 0  # windows started: each one's number (from 1) tells its messages apart
        self.busy: set[int] = set()  # the worker slots with a share in the window under way
        self.one_by_one = 0  # steps to run one by one first (a worker was late)
        self.stats = {"windows": 0, "steps": 0, "called_off": 0}

    def last_step(self, step: int, total: int, boundary) -> int:
        """The last step of a window from ``step`` (``step`` itself: run it one by one).
        ``boundary(t)``: the driver has something to do after step ``t``."""
        if self.one_by_one > 0 or self.crew.running or self.pool.starting:
            return step
        # a stalled worker's share goes to another: one by one
        last = plan.last_before_stall(self.crew.faults, step, min(total, step + WINDOW - 1))
        for t in range(step, last):
            if boundary(t):
                return t
        return last

    def ran_one(self) -> None:
        """A step went one by one."""
        self.one_by_one = max(0, self.one_by_one - 1)

    def run(self, first: int, batches: list, lr_at, scale_of, weights: list) -> tuple[list[Ran], Exception | None]:
        """Steps from ``first`` on (``batches[i]`` is step ``first + i``'s batch), on the weights
        ``weights`` (the servers' refs).  Returns the steps every server applied, in order, and
        what to raise once they are logged (None if nothing failed)."""
        self.crew.enlist(first)  # workers that came up join; TooFewWorkers with too few
        idle = self.crew.idle()
        self.count += 1
        window = self.count
        steps = range(first, first + len(batches))
        # --fault-injection kills within the window strike at their step, in the actor's loop
        kills = [f for f in self.crew.faults if f.step in steps]
        for fault in kills:
            self.crew.faults.remove(fault)  # each strikes once, even if its step is redone
        worker_plans: dict[int, list] = {k: [] for k in idle}
        server_plan = []
        shares: dict[int, list[tuple[int, int]]] = {}  # step -> (worker, micro-batches) per task
        for i, batch in enumerate(batches):
            step = first + i
            n = plan.count(len(batch), self.crew.micro_batch)
            tasks = plan.shares(range(n), n, idle)
            keys = [f"{window}-{step}-{share.worker}" for share in tasks]
            for share, key in zip(tasks, keys):
                fault = plan.strike(kills, "kill-worker", step, share.worker)
                worker_plans[share.worker].append((step, batch, share.nodes, key, fault))
            server_plan.append((step, n, [share.nodes for share in tasks], keys, lr_at(step), scale_of(batch),
                                len(batch), plan.strike(kills, "kill-server", step)))
            shares[step] = [(share.worker, len(share.ids)) for share in tasks]
        for fault in kills:  # a worker with no share at its step dies at once, as in a step of its own
            planned = worker_plans.get(fault.target, ())
            if fault.kind == "kill-worker" and not any(e[0] == fault.step and e[4] is not None for e in planned):
                self.pool.arm(fault.target, fault.action, fault.seconds)
        # kill-server strikes the first server, as Servers.arm does
        calls = {a.steps.remote(window, server_plan if s == 0 else [(*p[:-1], None) for p in server_plan]):
                 ("server", s) for s, a in enumerate(self.servers.actors)}
        calls.update({self.pool.actors[k].steps.remote(window, plan, *weights): ("worker", k)
                      for k, plan in worker_plans.items() if plan})
        planned = {("worker", k): len(plan) for k, plan in worker_plans.items()}
        self.busy = {k for k, plan in worker_plans.items() if plan}
        try:
            results, failed = self._wait(calls, window, weights, planned)
        finally:
            self.busy = set()
        ended = time.perf_counter()
        self.stats["windows"] += 1
        self.stats["called_off"] += failed
        return self._outcome(first, batches, shares, results, ended)

    def _wait(self, calls: dict, window: int, weights: list, planned: dict) -> tuple[dict, bool]:
        """Every call's result (or its exception).  The first call that failed or ended short
        (a server that stopped at a diverging step, a worker told so) calls the window off, so
        that no actor waits for a step that will not come."""
        results, pending, failed = {}, list(calls), False
        servers, grace = sum(who[0] == "server" for who in calls.values()), None
        while pending:
            timeout = None if grace is None else max(0.0, grace - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:  # called off, every server done: a worker still in its call is a straggler
                for ref in pending:  # it sits out the crew's steps until its call ends
                    self.crew.adopt(calls[ref][1], ref)
                break
            who = calls[ready[0]]
            try:
                result = results[who] = ray.get(ready[0])
                short = result[1] is not None if who[0] == "server" else result < planned[who]
            except Exception as exc:  # noqa: BLE001 - sorted out in _outcome, once every call has ended
                results[who], short = exc, True
            if short and not failed:
                failed = True
                call_off(self.transport, _handles(weights), window)
            servers -= who[0] == "server"
            if failed and not servers and grace is None:
                grace = time.monotonic() + GRACE_S
        return results, failed

    def _outcome(self, first: int, batches: list, shares: dict, results: dict,
                 ended: float) -> tuple[list[Ran], Exception | None]:
        """The steps every server applied (``ended``: when the window's calls had all ended,
        on the driver's perf_counter) and what to raise once they are logged."""
        problem: Exception | None = None
        applied = []  # each server's steps applied
        for (role, k), result in sorted(results.items()):  # the servers first, in range order
            stopped = None  # why a server ended the window early
            if isinstance(result, Exception):
                outcome = outcome_of(result, worker=role == "worker")
            elif role == "server":
                stopped = result[1]
                outcome = Outcome.DONE if stopped is None else stopped.outcome
            else:
                outcome = Outcome.DONE
            if role == "server":
                applied.append({} if isinstance(result, Exception) else result[0])
            decision = decide(outcome)
            if decision is Decision.REDO_SHARE:
                self.pool.replace(k)  # the steps it did not hand in are redone by others
            elif decision is Decision.RECOVER_SERVERS:
                problem = problem or ServerFailed(f"{role} {k} of the window of steps {first}+: {outcome.value}")
            elif decision is Decision.STOP_DIVERGED:  # the run ends here, as when a step diverges one by one
                # a server's own refusal, or a call that failed on weights refused before the window
                problem = Diverged((stopped or Stopped(Why.GRADIENT, first - 1)).line())
            elif decision is Decision.RAISE:
                problem = problem or plain(result)  # an error in the call itself
        counts = [len(done) for done in applied]
        if len(set(counts)) > 1 and not isinstance(problem, Diverged):
            problem = ServerFailed(f"the servers applied {counts} steps of a window")  # recover them
        ran = []
        done = applied[0]
        for i in range(min(counts)):
            step = first + i
            loss, seconds, at, squares = done[step]
            when = ended - (done[first + min(counts) - 1][2] - at)
            ran.append(Ran(step, len(batches[i]), loss, max(seconds), len(seconds), squares, when))
        self._pace(ran, shares, applied[0])
        self.stats["steps"] += len(ran)
        return ran, problem

    def _pace(self, ran: list[Ran], shares: dict, done: dict) -> None:
        """The crew's yardstick from the window's last step; a worker late as the crew judges
        it (``plan.any_late``) sends the next WINDOW steps one by one, where its share can go to another."""
        for r in ran:
            counts = [count for _, count in shares[r.step]]
            seconds = done[r.step][1]
            if plan.any_late(seconds, counts):
                self.one_by_one = WINDOW
            self.crew.pace = plan.pace_of(seconds, counts)


def _handles(weights: list) -> list:
    """The servers' handles behind ``weights``, leaving out any whose server died before it
    answered (a dead server runs no window: nothing to call off there)."""
    handles = []
    for ref in weights:
        try:
            handles.append(ray.get(ref))
        except (*ACTOR_LOST, ObjectLostError):
            pass
    return handles
