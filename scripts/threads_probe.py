#!/usr/bin/env python3
"""--threads-per-worker without Ray: one worker's share of a step, T = 1 against T = 2, interleaved.

    python scripts/threads_probe.py          # about 20 s

``WorkerState.compute`` of one share of 8 micro-batches of 128 rows (B = 1024, 784-1024-1024-10),
float32 and float64, each BLAS call on one thread (threadpoolctl), six times each T in turn;
prints the median milliseconds (the first call left out) and T=1 / T=2.  What the threads
buy before Ray, the server and the other workers take their share of the cores.
"""

import os

import numpy as np
from threadpoolctl import threadpool_limits

from distbp.lecture import tree
from distbp.lecture.network import Network
from distbp.step.worker import WorkerState

LAYERS = (784, 1024, 1024, 10)


def main() -> None:
    for dtype in ("float32", "float64"):
        rng = np.random.default_rng(0)
        X, Y = rng.standard_normal((4096, LAYERS[0])).astype(dtype), rng.integers(0, LAYERS[-1], 4096)
        weights, batch, nodes = Network(LAYERS, dtype=dtype).flat, np.arange(1024), tree.blocks(range(8), 8)
        times: dict[int, list[float]] = {1: [], 2: []}
        with threadpool_limits(1):
            states = {T: WorkerState(LAYERS, "tanh", "cross-entropy", dtype, X, Y, 128, T) for T in times}
            out = np.empty((len(nodes), len(weights)), dtype)
            for _ in range(6):
                for T, state in states.items():
                    times[T].append(state.compute(weights, batch, nodes, out).seconds)
        med = {T: float(np.median(v[1:])) * 1e3 for T, v in times.items()}
        print(f"{dtype}: T=1 {med[1]:.0f} ms, T=2 {med[2]:.0f} ms, speedup {med[1] / med[2]:.2f} "
              f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
