"""The Ray actors: thin shells over ``step.WorkerState`` and ``step.ServerState``.

Each actor gets the run's transport (transport.py) and makes its own end of it; what a
step's vectors look like on the wire is the transport's business, not the actors'.

Each worker runs BLAS on one thread.  That is not only to keep K workers from
oversubscribing the cores: OpenBLAS splits a GEMM differently over 1 and 2 threads and
the bits change, so a fixed thread count is part of what makes a micro-batch's gradient
the same on every worker.  Thread limits are set inside the process with threadpoolctl
because numpy's pool is sized at import and Ray reuses worker processes.
"""

from __future__ import annotations

import math
import os
import signal
import time

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from ..faults import Action, strike
from ..lecture import cuts, tree
from ..lecture.optim import Hyper
from ..step.outcome import Stopped, Why
from ..step.server import Abandoned, NonFiniteGradient, ServerState, pass_threads
from ..step.worker import Leaves, WorkerState
from .board import Sums
from .inbox import Late
from .transport import Transport

BLAS_THREADS = 1


def end_at_once_on_sigterm() -> None:
    """An actor's process ends at once on SIGTERM, as ``ray.kill`` ends it, with status 128 + 15.

    Ray sends SIGTERM to an actor whose placement group is removed: every run's servers, at
    the run's end.  Ray's own handler raises SystemExit wherever the main thread is.  In a
    finalizer (a thread pool's weakref callback, as the actor's objects are collected) Python
    prints that as "Exception ignored ... Traceback" on the actor's stderr, which Ray copies
    to the driver's.  An actor keeps nothing that its process's end could lose: the driver
    owns every file and the shared memory.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))


class _Actor:
    """What every actor answers: where it runs, for the summary and the benchmark."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=1)
class Worker(_Actor):
    """Holds the training data (zero-copy from the object store) and backpropagates micro-batches."""

    def __init__(self, layers, activation, loss, dtype, X, Y, micro_batch, transport: Transport, threads: int = 1):
        """``threads``: micro-batches backpropagated at once, each on one BLAS thread (--threads-per-worker)."""
        threadpool_limits(BLAS_THREADS)  # per BLAS call, whichever thread makes it
        end_at_once_on_sigterm()
        self.end = transport.worker_end()
        self.state = WorkerState(layers, activation, loss, dtype, X, Y, micro_batch, threads)
        self.fault: tuple[Action, float] | None = None  # armed by --fault-injection for the next call

    def arm(self, action: Action, seconds: float = 0.0) -> None:
        """--fault-injection: die now, whether or not a share comes (``kill``), or stall at the
        start of the next call (``delay``); see ``faults.strike``."""
        if action is Action.KILL:
            strike(action)
        self.fault = (action, seconds)

    def compute(self, step: int, batch, nodes: list[tree.Node], *weights):
        """The async loop's call: the values of tree ``nodes`` of ``batch``, computed on ``weights``
        (what the server returned), as the results of the call (``num_returns=2``: the node
        values, then the ``Leaves``)."""
        self._strike_armed()
        values = self.end.rows(step, len(nodes))
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported by the driver
            info = self.state.compute(self.end.weights(weights), batch, nodes, values, step)
        return (*self.end.send(values), info)

    def steps(self, window: int, plan: list[tuple], *weights) -> list[Leaves]:
        """The sync loop's call, a window of steps (windows.py): for each ``(step, batch, nodes, key,
        fault)`` of ``plan``, wait for the servers' weights after the step before (``weights``: what
        they published at the window's start), compute the nodes and hand them to the servers
        under ``key``, each layer as it is done.  Returns the ``Leaves`` of the steps it handed
        in: fewer when the window ended early (called off, or a server stopped)."""
        self._strike_armed()
        done = []
        for step, batch, nodes, key, fault in plan:
            if fault is not None:  # --fault-injection kill-worker at this step
                strike(fault)
            values = self.end.rows(step, len(nodes))
            flat = self.end.weights(weights, ahead=(window, step - 1))
            if flat is None:
                break
            def compute(sent, arrival, flat=flat, batch=batch, nodes=nodes, values=values, step=step) -> Leaves:
                with np.errstate(over="ignore", invalid="ignore"):  # the servers refuse a diverging step
                    return self.state.compute(flat, batch, nodes, values, step, sent, arrival)
            done.append(self.end.hand_in(values, key, compute))  # each layer read as it comes, sent as it is done
        self.end.read_answers()  # every server's answer to the hand-ins read: what it returns was taken
        return done

    def _strike_armed(self) -> None:
        """--fault-injection delay-worker: the stall armed for this call."""
        if self.fault is not None:
            action, seconds, self.fault = *self.fault, None
            strike(action, seconds)

    def spans(self) -> list[tuple[float, float, float, int]]:
        """Wall-clock (start, end), CPU seconds and step of the recent compute calls, oldest first
        (--timeline, scripts/bench.py)."""
        return list(self.state.spans)


PEERS = 64  # a server's calls from its peers at once: workers asking for weights, hand-ins, other servers


@ray.remote(num_cpus=1, concurrency_groups={"peers": PEERS})
class ParameterServer(_Actor):
    """Server ``s``: owns its part of the flat weights (``transport.parts[s]``) and its optimizer
    state; sums the workers' tree nodes and updates.

    Its steps run one call at a time; what its peers ask meanwhile (``ask``: a worker the weights
    after a step or a hand-in, on the object store; another server its sums of squares; the
    driver a call-off) runs on threads of the ``peers`` group and meets the steps on the end's
    board and inbox."""

    def __init__(self, s: int, weights, hyper: Hyper, decay_mask, transport: Transport):
        """``weights`` and ``decay_mask`` are whole vectors; the server keeps its part of them."""
        threadpool_limits(BLAS_THREADS)
        end_at_once_on_sigterm()
        self.s, self.end = s, transport.server_end(s)
        part = transport.parts[s]
        self.state = ServerState(self.end.own(weights), hyper, None if decay_mask is None else part.take(decay_mask),
                                 cuts.within(transport.size, part), pass_threads(),
                                 on_applied=self.end.applied)  # the step count in one place: the state's
        self.clip = hyper.clip_norm is not None

    def weights(self):
        """The weights as the workers take them."""
        return self.end.publish(self.state.weights)

    def step(self, n, nodes, lr, t, scale, *values):
        """The async loop's call: add the pushed nodes into the gradient, update, return the new weights."""
        self.state.step(n, nodes, self.end.receive(values), lr, t, scale)
        return self.weights()

    @ray.method(num_returns=2)
    def steps(self, window: int, plan: list[tuple], peers: list) -> tuple[tuple[dict[int, tuple], Stopped | None],
                                                                          object]:
        """The sync loop's call, a window of steps (windows.py): for each ``(step, n, nodes, keys,
        lr, scale, size, fault)`` of ``plan`` wait for the values handed in under ``keys``, check
        the step's loss (the micro-batches' errors over ``size`` samples), sum, update, and let
        the workers have the weights.  Under --clip-norm with several servers (``peers``, every
        server in range order) the servers swap their sums of squares between the sum and the
        update.  Returns ``{step: (loss, [each task's compute seconds], when it was applied
        (``perf_counter``), the exact sum of the micro-batches' squared norms)}`` of the steps
        applied and why the window ended early (None if it did not), then what ``weights``
        gives: the steps it leaves are the driver's to redo."""
        done: dict[int, tuple] = {}
        board = self.end.board
        board.begin_window(window)
        try:
            for step, n, nodes, keys, lr, scale, size, fault in plan:
                if fault is not None:  # --fault-injection kill-server at this step
                    strike(fault)
                why = self._step(window, peers, step, n, nodes, keys, lr, scale, size)
                if isinstance(why, Stopped):
                    return (done, why), self.weights()
                done[step] = why
            return (done, None), self.weights()
        finally:
            board.end_window()

    def _step(self, window, peers, step, n, nodes, keys, lr, scale, size) -> tuple | Stopped:
        """One step of a window: what ``steps`` keeps of it, or why the window ends before it."""
        got = self.end.collect(keys, step, n, nodes)
        if got is None:
            return Stopped(Why.CALLED_OFF, step)
        if isinstance(got, Late):  # a straggler: the driver calls the window off, the crew backs it up
            return Stopped(Why.LATE, step)
        values, metas, ready = got  # the values may still be coming in: ready() waits for each chunk
        try:
            sums = self.state.gather(n, nodes, values, step, ready)  # nothing is applied before the checks
        except Abandoned:
            return Stopped(Why.CALLED_OFF, step)
        except NonFiniteGradient:
            sums = None
        metas = metas()  # all in with the sum's last columns
        loss = math.fsum(x for leaves in metas for x in leaves.errors) / size
        if not math.isfinite(loss):
            if sums is not None:
                self.state.refuse()
            return Stopped(Why.LOSS, step, loss)
        if sums is None:
            return Stopped(Why.GRADIENT, step)
        try:
            if self.clip and len(peers) > 1:  # the norm is of the whole gradient: every server's sums
                for s, peer in enumerate(peers):
                    if s != self.s:
                        peer.ask.remote(Sums(window, step, self.s, sums))
                self.end.board.add_sums(window, step, self.s, sums)
                sums = self.end.board.sums(window, step, len(peers))
                if sums is None:
                    self.state.refuse()
                    return Stopped(Why.CALLED_OFF, step)
            else:
                sums = [sums]
            self.state.apply(lr, step, scale, sums, lambda i: self.end.board.updated(step, self.state.chunks[i]))
        except Abandoned:
            return Stopped(Why.CALLED_OFF, step)
        except NonFiniteGradient:
            return Stopped(Why.GRADIENT, step)
        return (loss, [leaves.seconds for leaves in metas], time.perf_counter(),
                math.fsum(x for leaves in metas for x in leaves.squares))

    @ray.method(concurrency_group="peers")
    def ask(self, request):
        """A peer's typed request, answered by the server's end while a window runs: the driver's
        ``CallOff``, another server's ``Sums`` (board.py); on the object store a worker's
        ``Reached`` and ``Hand`` (store.py; the direct transport's come over its sockets, but for
        a worker that cannot reach the server's socket)."""
        return self.end.answer(request)

    def step_count(self) -> int:
        """Steps applied so far: after a failure the driver resumes from here, never applying one twice."""
        return self.state.t

    def report(self) -> dict[int, dict]:
        return self.state.report()

    def snapshot(self) -> dict[str, np.ndarray]:
        """Weights and optimizer buffers, for a checkpoint."""
        return {"weights": self.state.weights, **self.state.state}

    def restore(self, arrays: dict[str, np.ndarray], t: int) -> None:
        """This range of the weights and optimizer buffers of a checkpoint taken after step ``t``."""
        self.state.restore(arrays, t)
