#!/usr/bin/env python3
"""The single-process yardstick of scripts/bench.py: one numpy training step, timed.

    python scripts/baselines/numpy_baseline.py --layers 784,1024,1024,10 --batch-size 1024 --dtype float64

What a user gets without distbp: the same network as bench.py's distbp runs (tanh hidden
layers, softmax cross-entropy, plain SGD on the mean over the batch), the same global batch
and dtype, trained by one process that hands the whole batch to BLAS with ``--threads``
threads.  Distributing only pays if distbp's K workers beat this, so it is written the way
one would write it plainly: no micro-batches, no tree sum, no bitwise guarantees.  It is
deliberately independent of distbp (numpy and threadpoolctl only), so that a change in
distbp cannot move the yardstick it is measured against.

Prints one JSON line: ``samples_per_second`` (the batch over the median step time),
``step_ms``, ``gflops`` and the options.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits


def init(sizes: list[int], dtype: np.dtype, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) per layer, W scaled by 1/sqrt(fan-in) so that tanh starts out of saturation."""
    return [((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(dtype), np.zeros(n_out, dtype))
            for n_in, n_out in zip(sizes[:-1], sizes[1:])]


def step(params: list[tuple[np.ndarray, np.ndarray]], X: np.ndarray, y: np.ndarray, lr: float) -> None:
    """One SGD step on the mean cross-entropy of the batch, updating ``params`` in place."""
    acts = [X]  # every layer's input, kept for the backward pass
    for W, b in params[:-1]:
        acts.append(np.tanh(acts[-1] @ W + b))
    W, b = params[-1]
    scores = acts[-1] @ W + b
    scores -= scores.max(axis=1, keepdims=True)  # exp cannot overflow; softmax is unchanged
    probs = np.exp(scores)
    probs /= probs.sum(axis=1, keepdims=True)
    # d(sum of losses)/d(scores) = softmax - one-hot; the 1/B of the mean goes into the step size
    delta = probs
    delta[np.arange(len(y)), y] -= 1
    scale = lr / len(y)
    for layer in range(len(params) - 1, -1, -1):
        W, b = params[layer]
        grad_W, grad_b = acts[layer].T @ delta, delta.sum(axis=0)
        if layer:  # before W changes: the delta of the layer below goes through the old weights
            delta = (delta @ W.T) * (1 - acts[layer] ** 2)  # tanh' from tanh's output
        W -= scale * grad_W
        b -= scale * grad_b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="784,1024,1024,10", help="layer sizes, inputs first")
    ap.add_argument("--batch-size", type=int, default=1024, help="the global batch B")
    ap.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="BLAS threads (default: every core)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (page faults, BLAS buffers)")
    args = ap.parse_args(argv)

    sizes = [int(v) for v in args.layers.split(",")]
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.batch_size, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], args.batch_size)
    params = init(sizes, dtype, rng)
    # threadpoolctl, not OMP_NUM_THREADS: the limit applies to the BLAS already loaded with numpy,
    # whatever the environment says, and bench.py can ask for any count per run.
    with threadpool_limits(args.threads):
        times = []
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            step(params, X, y, 0.01)
            times.append(time.perf_counter() - start)
    # A float64 literal slipping into the update would silently make a float32 run float64.
    assert all(W.dtype == dtype and b.dtype == dtype for W, b in params)
    median = float(np.median(times[args.warmup:]))
    flops = 6 * args.batch_size * sum(W.size for W, _ in params)  # forward 2, backward 4 per weight and sample
    print(json.dumps({"impl": "numpy-single-process", "threads": args.threads, "layers": sizes,
                      "batch_size": args.batch_size, "dtype": args.dtype, "steps": args.steps,
                      "step_ms": median * 1e3, "samples_per_second": args.batch_size / median,
                      "gflops": flops / median / 1e9}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
