"""One distributed step, as plain numpy objects the Ray actors hold: no Ray here.

A step's global batch (``B`` sample indices) is cut into ``n = ceil(B / M)`` micro-batches
of ``M`` rows (the last one shorter), whose boundaries depend on the batch alone.  A
``WorkerState`` backpropagates the micro-batches it is given and returns the tree nodes
they cover (``tree.blocks``); a ``ServerState`` adds the nodes of all workers into the
batch gradient in the tree's fixed order and applies the optimizer to its range of the
flat parameter vector.  Any split of the micro-batches, over any number of workers, gives
the same bits.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue

import numpy as np

from . import tree
from .network import Layout, Workspace, backprop
from .optim import Hyper, init_state, update


def micro_batches(batch_size: int, micro_batch: int) -> list[tuple[int, int]]:
    """Row ranges ``[lo, hi)`` of the micro-batches of a batch: fixed by ``B`` and ``M`` alone."""
    return [(lo, min(lo + micro_batch, batch_size)) for lo in range(0, batch_size, micro_batch)]


def split_even(n: int, k: int) -> list[list[int]]:
    """Contiguous shares of ``range(n)`` for ``k`` workers, sizes differing by at most one.

    With ``k > n`` some shares are empty: those workers sit the step out.
    """
    bounds = [i * n // k for i in range(k + 1)]
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


class BufferPool:
    """Reusable flat buffers, so a step does not allocate a gradient-sized array per micro-batch."""

    def __init__(self, size: int, dtype):
        self.size, self.dtype, self.free = size, dtype, []

    def take(self) -> np.ndarray:
        return self.free.pop() if self.free else np.empty(self.size, dtype=self.dtype)

    def give(self, buf: np.ndarray) -> None:
        self.free.append(buf)


class WorkerState:
    """A worker's data and buffers; ``compute`` is its whole job."""

    def __init__(self, layers, activation: str, loss: str, dtype, X: np.ndarray, Y: np.ndarray,
                 micro_batch: int):
        self.layout = Layout(tuple(layers))
        self.activation, self.loss = activation, loss
        self.dtype = np.dtype(dtype)
        self.X, self.Y = X, Y  # read-only views of the object store: never written
        self.micro_batch = micro_batch
        self.pool = BufferPool(self.layout.size, self.dtype)
        self.workspaces: dict[int, Workspace] = {}
        self.out = np.empty((0, self.layout.size), dtype=self.dtype)
        # wall-clock (start, end) and CPU seconds of each call, for scripts/bench.py
        self.spans: deque[tuple[float, float, float]] = deque(maxlen=4096)

    def _reuse(self, rows: int) -> np.ndarray:
        if len(self.out) < rows:
            self.out = np.empty((rows, self.layout.size), dtype=self.dtype)
        return self.out[:rows]

    def leaf(self, W: list[np.ndarray], rows: np.ndarray, g: np.ndarray) -> float:
        """One micro-batch's summed gradient into the flat buffer ``g``; returns its summed error."""
        ws = self.workspaces.get(len(rows))
        if ws is None:
            ws = self.workspaces[len(rows)] = Workspace(self.layout.layers, len(rows), self.dtype)
        # Gather the rows straight into the workspace: no per-micro-batch allocation.
        np.take(self.X, rows, axis=0, out=ws.x[0][:, 1:], mode="clip")
        return backprop(W, None, self.Y[rows], self.activation, self.loss, ws, self.layout.views(g))

    def node(self, W: list[np.ndarray], batch: np.ndarray, ranges: list[tuple[int, int]], node: tree.Node,
             dst: np.ndarray, losses: np.ndarray) -> None:
        """Tree node ``node``'s value into ``dst``: a leaf's gradient, else ``left + right``.

        The same additions, with the same operands, as ``tree.combine``: an inner node whose
        right child starts at or past ``n`` is its left child.  Depth-first, so a worker holds
        at most one scratch buffer per tree level, whatever its share.
        """
        level, i = node
        if level == 0:
            lo, hi = ranges[i]
            losses[i] = self.leaf(W, batch[lo:hi], dst)
            return
        self.node(W, batch, ranges, (level - 1, 2 * i), dst, losses)
        right = (level - 1, 2 * i + 1)
        if tree.span(right, len(ranges))[0] < len(ranges):
            tmp = self.pool.take()
            self.node(W, batch, ranges, right, tmp, losses)
            np.add(dst, tmp, out=dst)
            self.pool.give(tmp)

    def compute(self, weights: np.ndarray, batch: np.ndarray, ids: list[int],
                allocate: Callable[[int], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Gradients of micro-batches ``ids`` of ``batch``, as the tree nodes they cover.

        ``allocate(rows)`` gives the ``(rows, P)`` array the node values are computed into:
        rows of a shared file for actors on one machine (actors.py, shm.py); by default a
        buffer reused from call to call.  Returns ``(values, losses, seconds)``: ``values[r]`` is the r-th node of
        ``tree.blocks(ids, n)`` (shape ``(nodes, P)``), ``losses[i]`` the summed error of
        micro-batch ``ids[i]`` (float64), and the compute time.
        """
        start, wall, cpu = time.perf_counter(), time.time(), time.thread_time()
        W = self.layout.views(weights)
        ranges = micro_batches(len(batch), self.micro_batch)
        nodes = tree.blocks(ids, len(ranges))
        out = (allocate or self._reuse)(len(nodes))
        losses = np.empty(len(ranges), dtype=np.float64)
        for r, node in enumerate(nodes):
            self.node(W, batch, ranges, node, out[r], losses)  # each node straight into its row
        seconds = time.perf_counter() - start
        self.spans.append((wall, wall + seconds, time.thread_time() - cpu))
        return out, losses[ids], seconds


# The server sums, checks and updates the vector this many bytes at a time, so that a chunk's
# operands stay in cache between those passes (ServerState._sum).
CHUNK_BYTES = 1 << 20


def chunks(size: int, itemsize: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cuts of ``range(size)`` of at most ``CHUNK_BYTES`` each."""
    step = max(1, CHUNK_BYTES // itemsize)
    return [(lo, min(lo + step, size)) for lo in range(0, size, step)]


class NonFiniteGradient(ArithmeticError):
    """A step's summed gradient holds NaN or inf: training diverged; the server did not update."""


class ServerState:
    """Weights and optimizer state for the range ``[lo, hi)`` of the flat parameter vector."""

    def __init__(self, weights: np.ndarray, lo: int, hi: int, hyper: Hyper, decay_mask: np.ndarray,
                 out: np.ndarray | None = None):
        """``weights`` are this range's starting values; ``out``, if given, is where the server
        keeps and updates them (its range of the shared weights: shm.py)."""
        self.lo, self.hi = lo, hi
        self.weights = np.empty_like(weights) if out is None else out  # owned and writable
        np.copyto(self.weights, weights)
        self.hyper = hyper
        self.state = init_state(hyper.optimizer, len(self.weights), self.weights.dtype)
        self.decay_mask = decay_mask
        self.t = 0  # steps applied so far: the driver asks for it after a failure, so no step is applied twice
        self.hashes: dict[int, str] = {}
        self.timings: dict[int, dict[str, float]] = {}
        self._hashing: threading.Thread | None = None
        self.grad = np.empty_like(self.weights)  # the last step's batch gradient, kept for its hash
        self.chunks = chunks(len(self.weights), self.weights.itemsize)
        self.scratch: list[np.ndarray] = []  # chunk-sized work buffers

    def _spare(self, i: int, length: int) -> np.ndarray:
        """The i-th chunk-sized scratch buffer, cut to ``length``."""
        while len(self.scratch) <= i:
            self.scratch.append(np.empty(self.chunks[0][1], dtype=self.weights.dtype))
        return self.scratch[i][:length]

    def _sum_chunk(self, n: int, nodes: dict[tree.Node, np.ndarray], lo: int, hi: int) -> np.ndarray:
        """Entries ``[lo, hi)`` of the batch gradient, added in the tree's order into ``self.grad[lo:hi]``.

        ``nodes`` maps each tree node to its value's entries ``[lo, hi)``.
        """
        out = self.grad[lo:hi]
        mine: list[np.ndarray] = []  # buffers made for this chunk; workers' inputs are never written

        def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            for ours, other in ((a, b), (b, a)):  # a + b == b + a: add into whichever operand is ours
                if any(ours is m for m in mine):
                    return np.add(ours, other, out=ours)
            mine.append(np.add(a, b, out=out if not mine else self._spare(len(mine) - 1, hi - lo)))
            return mine[-1]

        g = tree.combine(nodes, n, add)
        if g is not out:
            np.copyto(out, g)
        return out

    def _sum(self, n: int, nodes: list[list[tree.Node]], values: list[np.ndarray],
             summed: Callable[[tuple[int, int] | None], None] = lambda chunk: None) -> bool:
        """Fill ``self.grad`` with the batch gradient; True if every entry is finite.

        ``summed((lo, hi))`` is called as each chunk is done, ``summed(None)`` at the end.

        ``values[k]`` (shape ``(len(nodes[k]), P)``) holds the values of the nodes ``nodes[k]``.
        Chunk by chunk, so each chunk's additions and its check run while it is in cache: the
        same additions as one pass over whole vectors (they are elementwise), one trip to memory.
        """
        table = {node: row for node_list, value in zip(nodes, values) for node, row in zip(node_list, value)}
        finite = True
        for lo, hi in self.chunks:
            g = self._sum_chunk(n, {node: row[lo:hi] for node, row in table.items()}, lo, hi)
            # A NaN or inf anywhere makes the sum non-finite (so would an overflow of finite
            # entries, which needs entries near the dtype's max: diverged too).
            finite = finite and bool(np.isfinite(g.sum()))
            summed((lo, hi))
        summed(None)
        return finite

    def gradient(self, n: int, nodes: list[list[tree.Node]], values: list[np.ndarray]) -> np.ndarray:
        """The batch gradient over this range: every worker's nodes added in the tree's order.

        Returns ``self.grad``, which the next step overwrites.
        """
        self.wait_hashes()
        self._sum(n, nodes, values)
        return self.grad

    def step(self, n: int, nodes: list[list[tree.Node]], values: list[np.ndarray], lr: float, t: int,
             scale: float | None) -> np.ndarray:
        """Step ``t`` (counted from 1): sum, update in place, return the new weights of this range."""
        if t != self.t + 1:
            raise ValueError(f"step {t} sent to a server that has applied {self.t} steps")
        start, wall, cpu = time.perf_counter(), time.time(), time.thread_time()
        self.wait_hashes()  # the last step's hash reads self.grad
        waited = time.perf_counter()
        # The hash follows the sum chunk by chunk on a thread (hashlib releases the GIL), so it
        # runs while this thread sums and updates and the weights travel, when the workers wait
        # and a core is free, instead of only after the sum: it costs 10 ms a step at fp64.
        chunks: SimpleQueue = SimpleQueue()
        self._hashing = threading.Thread(target=self._hash, args=(t, chunks))
        self._hashing.start()
        if not self._sum(n, nodes, values, chunks.put):  # refuse it: the weights stay those of the last good step
            self.wait_hashes()
            self.hashes.pop(t)
            raise NonFiniteGradient(f"the summed gradient of step {t} has non-finite values")
        summed = time.perf_counter()
        mask = self.decay_mask
        for lo, hi in self.chunks:
            g = self._spare(0, hi - lo)
            np.copyto(g, self.grad[lo:hi])  # update() overwrites its gradient; self.grad is being hashed
            update(self.weights[lo:hi], g, {name: buf[lo:hi] for name, buf in self.state.items()}, self.hyper,
                   lr, t, scale, None if mask is None else mask[lo:hi])
        self.t = t
        done = time.perf_counter()
        # start and end are wall-clock times, comparable with the workers' spans (scripts/bench.py)
        self.timings[t] = {"server_sum": summed - waited, "update": done - summed, "hash_wait": waited - start,
                           "start": wall, "end": wall + done - start, "cpu": time.thread_time() - cpu,
                           "bytes_in": sum(v.nbytes for v in values)}  # what the workers sent this server
        return self.weights

    def _hash(self, t: int, chunks: SimpleQueue) -> None:
        """sha256 of ``self.grad``'s bytes, little-endian, fed chunk by chunk as ``chunks`` names them:
        the same digest as ``checkpoint.sha256_le`` of the whole, read in place."""
        digest = hashlib.sha256()
        little = self.grad.dtype.newbyteorder("<")
        while (chunk := chunks.get()) is not None:
            digest.update(np.ascontiguousarray(self.grad[chunk[0]:chunk[1]], little))
        self.hashes[t] = digest.hexdigest()

    def wait_hashes(self) -> None:
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None

    def report(self) -> dict[int, dict]:
        """Gradient hash and timings of every step since the last report."""
        self.wait_hashes()
        out = {t: {"grad_sha256": self.hashes.pop(t), **self.timings.pop(t)} for t in list(self.timings)}
        return out

