"""The fingerprint of a step's summed gradient (``grad_xxh3`` in metrics.jsonl): no Ray here.

A step computed twice (redone after a failure, or by a resumed run) must be the same sum to the
bit; the driver compares the two fingerprints (loops/steplog.py).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import xxhash


class Fingerprints:
    """XXH3-128 of each step's summed gradient, on one thread of its own that follows the sum
    chunk by chunk, so it runs while the server sums and updates.  XXH3-128, not sha256: it only
    has to tell two computations of one step apart (a redo against its first run), not resist an
    adversary, and sha256 cost several times as much of a core the workers need (measured in
    docs/performance.md's log, 2026-12-02)."""

    def __init__(self, grad: np.ndarray, chunks: list[tuple[int, int]]):
        self.grad, self.chunks = grad, chunks  # the buffer the server sums into, and its chunks
        self.hashes: dict[int, str] = {}  # step -> its digest, until reported
        self.running: Future | None = None
        self.thread = ThreadPoolExecutor(1, "distbp-hash")  # one thread for every step's hash

    def start(self, t: int) -> list[threading.Event]:
        """Hash step ``t``'s gradient as it is summed: set the i-th event once chunk i is."""
        done = [threading.Event() for _ in self.chunks]
        self.running = self.thread.submit(self._hash, t, done)
        return done

    def _hash(self, t: int, done: list[threading.Event]) -> None:
        """XXH3-128 of the gradient's bytes, little-endian, fed chunk by chunk in order as each
        is summed (``done``): the same digest as ``grad_xxh3`` of the whole, read in place."""
        digest = xxhash.xxh3_128()
        little = self.grad.dtype.newbyteorder("<")
        for (lo, hi), event in zip(self.chunks, done):
            event.wait()
            digest.update(np.ascontiguousarray(self.grad[lo:hi], little))
        self.hashes[t] = digest.hexdigest()

    def wait(self) -> None:
        """Until the last hash started is done (the next sum overwrites what it reads)."""
        if self.running is not None:
            running, self.running = self.running, None
            running.result()

    def forget(self, t: int) -> None:
        """Step ``t`` was not applied: its hash goes."""
        self.wait()
        self.hashes.pop(t, None)


def grad_xxh3(flat: np.ndarray) -> str:
    """XXH3-128 of a flat buffer's bytes, little-endian: a step's gradient fingerprint (``grad_xxh3``)."""
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("<")))
