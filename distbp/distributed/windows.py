"""Windows of steps: the one way the sync loop's steps run.

A window holds n >= 1 consecutive steps.  The driver plans them all at once (step/plan.py): each
step's micro-batches shared out over the idle workers (``plan.shares``: ``cuts.even``, then
``tree.blocks`` of each share), each share under a key, the injected kills at their step.  Then
one call to each worker and one to each server carries the whole window, and the actors go on
through the run's transport (transport.py) without the driver:

- a worker, for each step, asks each server for the weights after the step before (the server
  answers once it holds them), computes its share's tree nodes and hands them in under its key,
  with its micro-batches' errors, squared norms and compute time;
- a server, for each step, waits until every key of the step is in, checks the step's loss
  (the errors' exact sum, before anything is applied), sums in the tree's order, swaps its sums
  of squares with the other servers under --clip-norm, updates, and lets the waiting workers
  have the weights.

The servers add the same nodes in the same order however the steps were shared: the bits are
those of any other sharing (tests/test_equivalence.py).

A window ends where the driver has something to do: before a checkpoint, an evaluation or the
end of an epoch, after each step for a ``fit`` callback with ``on_step`` (it may stop the run),
and after ``WINDOW`` steps (new workers join, and Ctrl-C acts, at a window's end).

When a worker is late (a server sees a key come late by the crew's rule, inbox.py) or dies, or a
server stops (a diverging step), the driver calls the window off: every server ends its steps
there and tells its waiting workers so.  The steps every server applied are kept (and logged),
a dead worker is replaced, servers that do not agree or a dead one are recovered
(``ServerFailed``), and what the window did not finish is planned again.  The next ``WINDOW``
steps after a late worker, a step with an injected stall and a step while a worker is still in
a call of its own are windows of one step through the crew (crew.py), which plans a share
again on the idle workers when its worker dies or lags, and gives the servers the step once
its micro-batches are all in.  Nothing is applied twice and no step is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from ..errors import Diverged
from ..step import plan
from ..step.outcome import Decision, Outcome, Stopped, Why, decide
from .crew import Crew, outcome_of, plain
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
    """Runs the sync loop's windows of steps over the crew's workers and the servers."""

    def __init__(self, crew: Crew):
        self.crew, self.pool, self.servers = crew, crew.pool, crew.servers
        self.count = 0  # windows started: each one's number (from 1) tells its messages apart
        self.busy: set[int] = set()  # the worker slots with a share in the window under way
        self.one_by_one = 0  # steps to run through the crew first (a worker was late)
        self.stats = {"windows": 0, "steps": 0, "called_off": 0, "one_by_one": 0}

    def last_step(self, step: int, total: int, boundary) -> int:
        """The last step of a window from ``step`` (at most ``total``).  ``boundary(t)``: the
        driver has something to do after step ``t``."""
        if self._crewed(step):
            return step
        last = plan.last_before_stall(self.crew.faults, step, min(total, step + WINDOW - 1))
        for t in range(step, last):
            if boundary(t):
                return t
        return last

    def _crewed(self, step: int) -> bool:
        """Whether step ``step`` goes through the crew: after a late worker, while a worker is still
        in a call nobody waits for or starting, and at an injected stall (its share goes to another)."""
        return self.one_by_one > 0 or bool(self.crew.running) or bool(self.pool.starting) or \
            plan.last_before_stall(self.crew.faults, step, step) < step

    def run(self, first: int, batches: list, lr_at, scale_of,
            weights: list) -> tuple[list[Ran], list, Exception | None]:
        """Steps from ``first`` on (``batches[i]`` is step ``first + i``'s batch), on the weights
        ``weights`` (what the servers published).  Returns the steps every server applied, in
        order, what the servers published then, and what to raise once the steps are logged
        (None if nothing failed)."""
        self.crew.enlist(first)  # workers that came up join; TooFewWorkers with too few
        self.count += 1
        window = self.count
        if len(batches) == 1 and self._crewed(first):
            self.one_by_one = max(0, self.one_by_one - 1)
            self.stats["one_by_one"] += 1
            tasks = self.crew.compute(first, batches[0], weights, window)  # every share handed in once
            kill = self._kills(range(first, first + 1), "kill-server")
            server_plan = [self._server_step(first, batches[0], [task.nodes for task in tasks],
                                             [task.key for task in tasks], lr_at, scale_of, kill)]
            shares = {first: [(task.worker, len(task.ids)) for task in tasks]}
            return self._go(window, first, batches, server_plan, {}, shares, weights)
        server_plan, worker_plans, shares = self._plan(window, first, batches, lr_at, scale_of)
        self.stats["windows"] += 1
        ran, published, failure = self._go(window, first, batches, server_plan, worker_plans, shares, weights)
        self.stats["steps"] += len(ran)
        return ran, published, failure

    def _kills(self, steps: range, *kinds: str) -> list:
        """The injected faults of ``kinds`` at ``steps``, taken: each strikes once, even if its step is redone."""
        kills = [f for f in self.crew.faults if f.step in steps and f.kind in kinds]
        for fault in kills:
            self.crew.faults.remove(fault)
        return kills

    def _plan(self, window: int, first: int, batches: list, lr_at, scale_of) -> tuple[list, dict, dict]:
        """Every step of the window shared out over the idle workers: the servers' plan, each
        worker's, and ``{step: [(worker, micro-batches)]}``."""
        idle = self.crew.idle()
        # --fault-injection kills within the window strike at their step, in the actor's loop
        kills = self._kills(range(first, first + len(batches)), "kill-worker", "kill-server")
        worker_plans: dict[int, list] = {k: [] for k in idle}
        server_plan, shares = [], {}
        for i, batch in enumerate(batches):
            step = first + i
            n = plan.count(len(batch), self.crew.micro_batch)
            tasks = plan.shares(range(n), n, idle)
            keys = [f"{window}-{step}-{share.worker}" for share in tasks]
            for share, key in zip(tasks, keys):
                fault = plan.strike(kills, "kill-worker", step, share.worker)
                worker_plans[share.worker].append((step, batch, share.nodes, key, fault))
            server_plan.append(self._server_step(step, batch, [share.nodes for share in tasks], keys, lr_at,
                                                 scale_of, kills))
            shares[step] = [(share.worker, len(share.ids)) for share in tasks]
        for fault in kills:  # a worker with no share at its step dies at once, as in a step of its own
            planned = worker_plans.get(fault.target, ())
            if fault.kind == "kill-worker" and not any(e[0] == fault.step and e[4] is not None for e in planned):
                self.pool.arm(fault.target, fault.action, fault.seconds)
        return server_plan, {k: p for k, p in worker_plans.items() if p}, shares

    def _server_step(self, step: int, batch, nodes: list, keys: list[str], lr_at, scale_of, kills: list) -> tuple:
        """The servers' plan of step ``step``: ``(step, n, nodes, keys, lr, scale, size, kill)``
        (``ParameterServer.steps``), the tasks' tree ``nodes`` handed in under ``keys``."""
        return (step, plan.count(len(batch), self.crew.micro_batch), nodes, keys, lr_at(step), scale_of(batch),
                len(batch), plan.strike(kills, "kill-server", step))

    def _go(self, window: int, first: int, batches: list, server_plan: list, worker_plans: dict, shares: dict,
            weights: list) -> tuple[list[Ran], list, Exception | None]:
        """Start the window's calls (the servers', and the workers' of ``worker_plans``), wait for
        them, and sort out what came of them."""
        outcomes, published = self.servers.steps(window, server_plan)
        calls = {ref: ("server", s) for s, ref in enumerate(outcomes)}
        calls.update({self.pool.actors[k].steps.remote(window, p, *weights): ("worker", k)
                      for k, p in worker_plans.items()})
        planned = {("worker", k): len(p) for k, p in worker_plans.items()}
        self.busy = set(worker_plans)
        try:
            results, failed = self._wait(calls, window, planned)
        finally:
            self.busy = set()
        ended = time.perf_counter()
        self.stats["called_off"] += failed
        ran, problem = self._outcome(first, batches, shares, results, ended)
        return ran, published, problem

    def _wait(self, calls: dict, window: int, planned: dict) -> tuple[dict, bool]:
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
                short = result[1] is not None if who[0] == "server" else len(result) < planned[who]
            except Exception as exc:  # noqa: BLE001 - sorted out in _outcome, once every call has ended
                results[who], short = exc, True
            if short and not failed:
                failed = True
                self.servers.call_off(window)
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
            ran.append(Ran(step, len(batches[i]), loss, max(seconds), len({k for k, _ in shares[step]}), squares,
                           when))
        self._pace(ran, shares, applied[0])
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

