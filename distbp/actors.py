"""The Ray actors: thin shells over ``step.WorkerState`` and ``step.ServerState``.

Each worker runs BLAS on one thread.  That is not only to keep K workers from
oversubscribing the cores: OpenBLAS splits a GEMM differently over 1 and 2 threads and
the bits change, so a fixed thread count is part of what makes a micro-batch's gradient
the same on every worker.  Thread limits are set inside the process with threadpoolctl
because numpy's pool is sized at import and Ray reuses worker processes.
"""

from __future__ import annotations

import functools

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from .faults import strike
from .network import Layout
from .shm import Block, Board, Maps, Rows
from .step import ServerState, WorkerState

BLAS_THREADS = 1


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1)
class Worker:
    """Holds the training data (zero-copy from the object store) and backpropagates micro-batches."""

    def __init__(self, layers, activation, loss, dtype, X, Y, micro_batch, board: Board | None = None):
        """With a ``board`` (every process of the run on one machine) the weights are read from,
        and the node values computed into, shared files (shm.py)."""
        threadpool_limits(BLAS_THREADS)
        self.board, self.maps = board, Maps()
        self.rows = None if board is None else Rows(board, self.maps, Layout(tuple(layers)).size, dtype)
        self.state = WorkerState(layers, activation, loss, dtype, X, Y, micro_batch)
        self.fault: tuple[str, float] | None = None  # armed by --fault-injection for the next compute
        self.flat: np.ndarray | None = None  # the joined weight ranges with --servers S > 1

    def node_id(self) -> str:
        return _node_id()

    def pid(self) -> int:
        import os
        return os.getpid()

    def arm(self, action: str, seconds: float = 0.0) -> None:
        """--fault-injection: die now, whether or not a share comes (``kill``), or stall in the
        next ``compute`` call (``delay``); see ``faults.strike``."""
        if action == "kill":
            strike(action)
        self.fault = (action, seconds)

    @ray.method(num_returns=2)
    def compute(self, batch, ids, *weight_ranges, step: int | None = None):
        """Node values of micro-batches ``ids``, and (per-micro-batch errors, seconds) for the driver.

        With S > 1 weight ranges (--servers S) the caller asks for ``num_returns=S + 1``: the
        values come back as S objects, server s's columns in the s-th (shards.py).  ``step``
        says which step the call belongs to (with a board, calls of one step write distinct rows).
        """
        if self.fault is not None:
            action, seconds, self.fault = *self.fault, None
            strike(action, seconds)
        allocate = None if self.rows is None else functools.partial(self.rows.take, step)
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported by the driver, by step
            values, losses, seconds = self.state.compute(self._weights(weight_ranges), batch, ids, allocate)
        S = len(weight_ranges)
        if self.board is not None:  # each server reads its columns of the rows in place
            parts = [self.rows.last] * S
        elif S == 1:
            parts = [values]
        else:
            bounds = np.cumsum([0, *(len(w) for w in weight_ranges)])  # server s gets the columns of its range
            parts = [np.ascontiguousarray(values[:, lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
        return (*parts, (losses, seconds))

    def _weights(self, weight_ranges) -> np.ndarray:
        """The whole weight vector from the S servers' ranges."""
        if isinstance(weight_ranges[0], Block):  # the shared weights: every server updates its range of one file
            return self.maps.view(weight_ranges[0])
        if len(weight_ranges) == 1:
            return weight_ranges[0]
        return self._joined(weight_ranges)

    def _joined(self, weight_ranges) -> np.ndarray:
        """The S weight ranges in one buffer, reused from call to call."""
        if self.flat is None:
            self.flat = np.empty(sum(len(w) for w in weight_ranges), dtype=weight_ranges[0].dtype)
        return np.concatenate(weight_ranges, out=self.flat)

    def spans(self) -> list[tuple[float, float]]:
        """Wall-clock (start, end) and CPU seconds of the recent compute calls, oldest first (scripts/bench.py)."""
        return list(self.state.spans)


@ray.remote(num_cpus=1)
class ParameterServer:
    """Owns ``[lo, hi)`` of the flat weights and its optimizer state; sums and updates."""

    def __init__(self, weights, lo, hi, hyper, decay_mask, board: Board | None = None):
        """With a ``board``, the range lives in the run's shared weights file (shm.py) and the
        workers' node values are read from their files in place."""
        threadpool_limits(BLAS_THREADS)
        self.board, self.maps = board, Maps()
        out = None if board is None else self.maps.view(board.weights, writable=True)[lo:hi]
        self.state = ServerState(weights, lo, hi, hyper, decay_mask, out)
        self.fault: str | None = None  # armed by --fault-injection for the next step

    def node_id(self) -> str:
        return _node_id()

    def pid(self) -> int:
        import os
        return os.getpid()

    def weights(self):
        """The weights as the workers take them: this range, or with a board the shared file."""
        return self.state.weights if self.board is None else self.board.weights

    def arm(self, action: str) -> None:
        """The next ``step`` call dies (``faults.strike``): --fault-injection."""
        self.fault = action

    def step(self, n, nodes, lr, t, scale, *values):
        """Add the workers' nodes into the batch gradient, update, return the new weights."""
        if self.fault is not None:
            strike(self.fault)
        if self.board is not None:
            self.maps.retain({block.path for block in values} | {self.board.weights.path})
            lo, hi = self.state.lo, self.state.hi
            values = [self.maps.view(block)[:, lo:hi] for block in values]
        self.state.step(n, nodes, list(values), lr, t, scale)
        return self.weights()

    def step_count(self) -> int:
        """Steps applied so far: after a failure the driver resumes from here, never applying one twice."""
        return self.state.t

    def report(self) -> dict[int, dict]:
        return self.state.report()

    def snapshot(self) -> dict[str, np.ndarray]:
        """Weights and optimizer buffers, for a checkpoint."""
        return {"weights": self.state.weights, **self.state.state}

    def restore(self, arrays: dict[str, np.ndarray], t: int) -> None:
        """Weights and optimizer buffers of a checkpoint taken after step ``t``."""
        self.state.weights[:] = arrays["weights"]
        for name, buf in self.state.state.items():
            buf[:] = arrays[name]
        self.state.t = t
