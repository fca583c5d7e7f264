"""What a worker does in a step, as a plain numpy object the Ray actor holds: no Ray here.

A step's global batch (``B`` sample indices) is cut into ``n = ceil(B / M)`` micro-batches
of ``M`` rows (the last one shorter), whose boundaries depend on the batch alone.  The driver
gives a worker some tree nodes over those micro-batches (``tree.blocks`` of its share,
computed once by the driver and handed to the server too); ``WorkerState.compute``
backpropagates the micro-batches they cover into the nodes' values.  The server adds the
nodes of all workers into the batch gradient in the tree's fixed order (server.py), so any
split of the micro-batches, over any number of workers, gives the same bits.

``--threads-per-worker T``: a worker backpropagates up to T micro-batches at once, one per
thread (each on one BLAS thread: numpy releases the GIL in BLAS, so T threads use T cores;
docs/performance.md measures it), each into a leaf buffer of its own, and then adds the leaves
into its nodes in the tree's order, with the same operands as one thread does.  It sends the
same nodes with the same bits, for any T.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from ..lecture import cuts, tree
from ..lecture.network import Layout, Workspace, backprop
from . import noise


def micro_batches(batch_size: int, micro_batch: int) -> list[range]:
    """Row ranges of the micro-batches of a batch: fixed by ``B`` and ``M`` alone."""
    return cuts.fixed(batch_size, micro_batch)


class Leaves(NamedTuple):
    """What a worker's compute call reports beside its nodes' values: for each micro-batch the
    nodes cover, in micro-batch order, its summed error and the squared norm of its mean
    gradient (step/noise.py); and the call's compute time."""

    errors: list[float]
    squares: list[float]
    seconds: float


class BufferPool:
    """Reusable flat buffers, so a step does not allocate a gradient-sized array per micro-batch."""

    def __init__(self, size: int, dtype):
        self.size, self.dtype, self.free = size, dtype, []
        self.lock = threading.Lock()

    def take(self) -> np.ndarray:
        with self.lock:
            if self.free:
                return self.free.pop()
        return np.empty(self.size, dtype=self.dtype)

    def give(self, buf: np.ndarray) -> None:
        with self.lock:
            self.free.append(buf)


class WorkerState:
    """A worker's data and buffers; ``compute`` is its whole job."""

    def __init__(self, layers, activation: str, loss: str, dtype, X: np.ndarray, Y: np.ndarray,
                 micro_batch: int, threads: int = 1):
        self.layout = Layout(tuple(layers))
        self.activation, self.loss = activation, loss
        self.dtype = np.dtype(dtype)
        self.X, self.Y = X, Y  # read-only views of the object store: never written
        self.micro_batch = micro_batch
        self.pool = BufferPool(self.layout.size, self.dtype)
        self.workspaces = threading.local()  # each thread's {rows: Workspace}
        self.threads = threads
        self.executor = ThreadPoolExecutor(threads, "distbp-leaf") if threads > 1 else None
        # wall-clock (start, end) and CPU seconds of each call, for scripts/bench.py
        self.spans: deque[tuple[float, float, float, int]] = deque(maxlen=4096)

    def leaf(self, W: list[np.ndarray], rows: np.ndarray, g: np.ndarray) -> tuple[float, float]:
        """One micro-batch's summed gradient into the flat buffer ``g``; returns its summed error
        and the squared norm of its mean gradient (the noise scale's, step/noise.py)."""
        mine = self.workspaces.__dict__.setdefault("by_rows", {})
        ws = mine.get(len(rows))
        if ws is None:
            ws = mine[len(rows)] = Workspace(self.layout.layers, len(rows), self.dtype)
        # Gather the rows straight into the workspace: no per-micro-batch allocation.
        np.take(self.X, rows, axis=0, out=ws.x[0][:, 1:], mode="clip")
        error = backprop(W, None, self.Y[rows], self.activation, self.loss, ws, self.layout.views(g))
        return error, noise.leaf_square(g, len(rows))

    def node(self, W: list[np.ndarray], batch: np.ndarray, ranges: list[range], node: tree.Node,
             dst: np.ndarray, leaves: dict[int, tuple[float, float]]) -> None:
        """Tree node ``node``'s value into ``dst``: a leaf's gradient, else ``left + right``.

        The same additions, with the same operands, as ``tree.combine``: an inner node whose
        right child starts at or past ``n`` is its left child.  Depth-first, so a worker holds
        at most one scratch buffer per tree level, whatever its share.
        """
        level, i = node
        if level == 0:
            leaves[i] = self.leaf(W, batch[ranges[i].start:ranges[i].stop], dst)
            return
        self.node(W, batch, ranges, (level - 1, 2 * i), dst, leaves)
        right = (level - 1, 2 * i + 1)
        if tree.span(right, len(ranges))[0] < len(ranges):
            tmp = self.pool.take()
            self.node(W, batch, ranges, right, tmp, leaves)
            np.add(dst, tmp, out=dst)
            self.pool.give(tmp)

    def compute(self, weights: np.ndarray, batch: np.ndarray, nodes: list[tree.Node],
                out: np.ndarray, step: int = 0) -> tuple[np.ndarray, float]:
        """The values of tree ``nodes`` over the micro-batches of ``batch``, into ``out`` (shape
        ``(len(nodes), P)``: row r is node r's summed gradient).

        Returns the ``Leaves`` of the micro-batches the nodes cover.  ``step``: the step it is of,
        kept with the call's times in ``spans`` (--timeline).
        """
        start, wall, cpu = time.perf_counter(), time.time(), time.thread_time()
        W = self.layout.views(weights)
        ranges = micro_batches(len(batch), self.micro_batch)
        leaves: dict[int, tuple[float, float]] = {}
        if self.executor is None:
            for r, node in enumerate(nodes):
                self.node(W, batch, ranges, node, out[r], leaves)  # each node straight into its row
        else:
            self.threaded(W, batch, ranges, nodes, out, leaves)
        seconds = time.perf_counter() - start
        self.spans.append((wall, wall + seconds, time.thread_time() - cpu, step))
        order = sorted(leaves)
        return Leaves([leaves[i][0] for i in order], [leaves[i][1] for i in order], seconds)

    def threaded(self, W: list[np.ndarray], batch: np.ndarray, ranges: list[range], nodes: list[tree.Node],
                 out: np.ndarray, leaves: dict[int, tuple[float, float]]) -> None:
        """``compute``'s nodes with T threads: a node's leaves T at a time, in order, each into a
        buffer of its own (the node's first leaf straight into its row), folded into the node as
        they come.

        The fold makes the additions of ``node``: a stack holds the finished subtrees left to
        right; two siblings on top become their parent (left + right, into the left one); at the
        end the stack is added up from the right, which is the tree's ``left + right`` where a
        right part is cut short by ``n``.  So every row gets the bits one thread gives it, and a
        worker holds at most T + log2(n) leaf buffers, whatever its share.
        """
        n = len(ranges)
        # Each addition cut into T column ranges, one per thread: elementwise, so the same bits,
        # and the 2 (n - 1) passes over memory of a share's n leaves no longer run on one core.
        cols = [(r.start, r.stop) for r in cuts.even(self.layout.size, self.threads)]

        def add(dst: np.ndarray, src: np.ndarray) -> None:
            list(self.executor.map(lambda c: np.add(dst[c[0]:c[1]], src[c[0]:c[1]], out=dst[c[0]:c[1]]), cols))
            self.pool.give(src)

        for r, node in enumerate(nodes):
            lo, hi = tree.span(node, n)
            stack: list[tuple[tree.Node, np.ndarray]] = []
            for first in range(lo, hi, self.threads):
                group = range(first, min(first + self.threads, hi))
                bufs = {i: out[r] if i == lo else self.pool.take() for i in group}
                rows = [batch[ranges[i].start:ranges[i].stop] for i in group]
                # map re-raises a thread's error here
                for i, leaf in zip(group, self.executor.map(self.leaf, [W] * len(group), rows,
                                                             [bufs[i] for i in group])):
                    leaves[i] = leaf
                    stack.append(((0, i), bufs[i]))
                    while len(stack) > 1 and stack[-2][0][0] == stack[-1][0][0] and stack[-2][0][1] % 2 == 0:
                        (level, i_left), left = stack[-2]
                        add(left, stack.pop()[1])
                        stack[-1] = ((level + 1, i_left // 2), left)
            while len(stack) > 1:
                right = stack.pop()[1]
                add(stack[-1][1], right)
