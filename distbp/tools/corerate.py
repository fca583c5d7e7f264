"""This machine's backprop rate on one core, as distbp computes it.  Pure numpy.

``nodemodel.Constants`` holds per-core rates measured on one machine (``gflops_core_*``); on
another CPU the model's compute term is off by the ratio of the two rates (docs/performance.md:
the lab's steps ran 1.1-1.3 times the model's on an AMD EPYC, with the rates of an Intel Xeon).
``core_gflops`` times ``WorkerState.compute`` on one BLAS thread over one worker's rows of a
step, in micro-batches of M, as a worker computes them; scripts/netlab.py measures it before
its runs and gives the model this machine's rate.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from ..lecture import tree
from ..lecture.network import Network
from ..step.worker import WorkerState
from .nodemodel import FLOPS_PER_WEIGHT_SAMPLE


def core_gflops(layers: tuple[int, ...], dtype: str, rows: int, micro_batch: int, repeats: int = 3) -> float:
    """GFLOP/s of one worker's backprop over ``rows`` samples in micro-batches of ``micro_batch``
    on one BLAS thread: 6 flops per weight and sample over the median of ``repeats`` computes
    (one more before them, left out: the first touches every buffer)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, layers[0])).astype(dtype)
    Y = rng.integers(0, layers[-1], rows)
    net = Network(layers, dtype=dtype)
    n = -(-rows // micro_batch)
    nodes = tree.blocks(range(n), n)
    out = np.empty((len(nodes), net.layout.size), dtype)
    with threadpool_limits(1):
        state = WorkerState(layers, "tanh", "cross-entropy", dtype, X, Y, micro_batch, 1)
        seconds = [state.compute(net.flat, np.arange(rows), nodes, out).seconds for _ in range(repeats + 1)]
    return FLOPS_PER_WEIGHT_SAMPLE * net.layout.size * rows / float(np.median(seconds[1:])) / 1e9
