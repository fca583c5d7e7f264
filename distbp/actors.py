"""The Ray actors: thin shells over ``step.WorkerState`` and ``step.ServerState``.

Each worker runs BLAS on one thread.  That is not only to keep K workers from
oversubscribing the cores: OpenBLAS splits a GEMM differently over 1 and 2 threads and
the bits change, so a fixed thread count is part of what makes a micro-batch's gradient
the same on every worker.  Thread limits are set inside the process with threadpoolctl
because numpy's pool is sized at import and Ray reuses worker processes.
"""

from __future__ import annotations

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from .step import ServerState, WorkerState

BLAS_THREADS = 1


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1)
class Worker:
    """Holds the training data (zero-copy from the object store) and backpropagates micro-batches."""

    def __init__(self, layers, activation, loss, dtype, X, Y, micro_batch):
        threadpool_limits(BLAS_THREADS)
        self.state = WorkerState(layers, activation, loss, dtype, X, Y, micro_batch)

    def node_id(self) -> str:
        return _node_id()

    def pid(self) -> int:
        import os
        return os.getpid()

    @ray.method(num_returns=2)
    def compute(self, batch, ids, *weight_ranges):
        """Node values of micro-batches ``ids``, and (per-micro-batch errors, seconds) for the driver."""
        weights = weight_ranges[0] if len(weight_ranges) == 1 else np.concatenate(weight_ranges)
        values, losses, seconds = self.state.compute(weights, batch, ids)
        return values, (losses, seconds)


@ray.remote(num_cpus=1)
class ParameterServer:
    """Owns ``[lo, hi)`` of the flat weights and its optimizer state; sums and updates."""

    def __init__(self, weights, lo, hi, hyper, decay_mask):
        threadpool_limits(BLAS_THREADS)
        self.state = ServerState(weights, lo, hi, hyper, decay_mask)

    def node_id(self) -> str:
        return _node_id()

    def weights(self):
        return self.state.weights

    def step(self, n, nodes, lr, t, scale, *values):
        """Add the workers' nodes into the batch gradient, update, return the new weights."""
        return self.state.step(n, nodes, list(values), lr, t, scale)

    def report(self) -> dict[int, dict]:
        return self.state.report()

    def snapshot(self) -> dict[str, np.ndarray]:
        """Weights and optimizer buffers, for a checkpoint."""
        return {"weights": self.state.weights, **self.state.state}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.state.weights[:] = arrays["weights"]
        for name, buf in self.state.state.items():
            buf[:] = arrays[name]
