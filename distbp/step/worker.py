"""What a worker does in a step, as a plain numpy object the Ray actor holds: no Ray here.

A step's global batch (``B`` sample indices) is cut into ``n = ceil(B / M)`` micro-batches
of ``M`` rows (the last one shorter), whose boundaries depend on the batch alone.  The driver
gives a worker some tree nodes over those micro-batches (``tree.blocks`` of its share,
computed once by the driver and handed to the server too); ``WorkerState.compute``
backpropagates the micro-batches they cover into the nodes' values.  The server adds the
nodes of all workers into the batch gradient in the tree's fixed order (server.py), so any
split of the micro-batches, over any number of workers, gives the same bits.

Layer 1 goes last: each micro-batch's forward pass and the backward pass of the layers above the
first (``network.backward_layer`` for ``l = L..2``, the GEMMs of ``backprop``: ``de/dW^l`` and
``delta^{l-1}``), then every micro-batch's ``de/dW^1``, each layer's leaves added into the nodes'
columns in the tree's order.  Once the columns of the layers above the first are done
``compute`` says so (``done``), and the transport sends them while layer 1's gradients are
computed (distributed/direct_worker.py): the overlap of communication with backprop that DDP
gets from its buckets.  Each number goes
through the operations it went through when a micro-batch was backpropagated whole, so the
bits are the same.  A share whose activations pass ``ACTIVATION_BYTES`` goes in groups of
micro-batches, one after another, each group's leaves folded into the nodes where the last
left off: memory stays bounded whatever the share, and the last group's layers go out as they
are done.

The weights may still be coming in when a step starts (the direct transport streams each
server's range as it is updated, layer 1 first: distributed/arrival.py): then the forward pass
goes layer by layer over the first group's micro-batches, each layer once its weights are in
(``_lead``), the same GEMMs in another order.

``--threads-per-worker T``: a worker runs up to T micro-batches' forward passes, or layer
gradients, at once, one per thread (each on one BLAS thread: numpy releases the GIL in BLAS, so
T threads use T cores; docs/performance.md measures it), each into a buffer of its own, and
adds them into its nodes in the tree's order, with the same operands as one thread does.  It
sends the same nodes with the same bits, for any T.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from ..lecture import cuts, tree
from ..lecture.network import Layout, Workspace, backward_layer, forward, output_delta
from . import noise


def micro_batches(batch_size: int, micro_batch: int) -> list[range]:
    """Row ranges of the micro-batches of a batch: fixed by ``B`` and ``M`` alone."""
    return cuts.fixed(batch_size, micro_batch)


# A worker runs the forward pass of at most this many bytes of micro-batches' activations at once
# (``WorkerState._group``): a larger share goes in groups, each backpropagated before the next, and
# the layers of the last group go to the servers as they are done.
ACTIVATION_BYTES = 256 << 20
SPLIT_MIN = 1 << 16  # a layer's additions go to the T threads from this many entries on


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


class Waited:
    """An ``arrival`` (``WorkerState._lead``) that counts the seconds its waits took."""

    def __init__(self, arrival):
        self.arrival, self.seconds = arrival, 0.0

    def has(self, columns: int) -> bool:
        return self.arrival.has(columns)

    def wait(self, columns: int) -> None:
        start = time.perf_counter()
        self.arrival.wait(columns)
        self.seconds += time.perf_counter() - start


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
        self.spaces: dict[int, list[Workspace]] = {}  # rows -> workspaces: one per micro-batch of a share
        one = Workspace(self.layout.layers, 1, self.dtype)  # what a workspace holds a row
        self.row_bytes = sum(a.nbytes for a in (*one.x, *one.s[1:], *one.delta[1:], *one.tmp[1:], one.e))
        self.threads = threads
        self.executor = ThreadPoolExecutor(threads, "distbp-leaf") if threads > 1 else None
        # wall-clock (start, end) and CPU seconds of each call, for scripts/bench.py
        self.spans: deque[tuple[float, float, float, int]] = deque(maxlen=4096)

    def _map(self, job: Callable, *args: Iterable) -> list:
        """``job`` over ``args``, T at a time on the worker's threads (in order on this one if T = 1);
        a job's error is raised here."""
        return list(self.executor.map(job, *args) if self.executor else map(job, *args))

    def _workspaces(self, ranges: list[range], owned: list[int]) -> dict[int, Workspace]:
        """A workspace for each micro-batch of the share, kept from call to call."""
        out, taken = {}, {}
        for i in owned:
            rows = len(ranges[i])
            k = taken[rows] = taken.get(rows, -1) + 1
            have = self.spaces.setdefault(rows, [])
            if len(have) <= k:
                have.append(Workspace(self.layout.layers, rows, self.dtype))
            out[i] = have[k]
        return out

    def _forward(self, W: list[np.ndarray], rows: np.ndarray, ws: Workspace, first: int = 1) -> float:
        """A micro-batch's forward pass from layer ``first`` (those below are in ``ws``: ``_lead``) and
        ``delta^L`` in ``ws``; returns its summed error."""
        if first == 1:
            self._gather(rows, ws)
        sL = forward(W, None, self.activation, ws, range(first, len(W) + 1))
        output_delta(sL, self.Y[rows], self.loss, ws.delta[-1], ws.e)
        return float(ws.e.sum(dtype=np.float64))

    def _gather(self, rows: np.ndarray, ws: Workspace) -> None:
        """A micro-batch's samples straight into its workspace: no per-micro-batch allocation."""
        np.take(self.X, rows, axis=0, out=ws.x[0][:, 1:], mode="clip")

    def _lead(self, W: list[np.ndarray], arrival, rows: Callable[[int], np.ndarray],
              spaces: dict[int, Workspace]) -> int:
        """While the weights still come in (``arrival``: ``has(c)`` and ``wait(c)`` for columns
        ``[0, c)``, distributed/arrival.py), the forward pass of the micro-batches of ``spaces``
        layer by layer, each layer once its weights are in: layer 1 starts while the layers above
        come.  Returns how many layers it did (none if the weights were in): the rest goes micro-batch
        by micro-batch.  The same GEMMs, in another order: the same bits."""
        offsets, done = self.layout.offsets, 0
        while done < len(W) and not arrival.has(offsets[-1]):
            done += 1
            arrival.wait(offsets[done])

            def one(i: int, l: int = done) -> None:
                if l == 1:
                    self._gather(rows(i), spaces[i])
                forward(W, None, self.activation, spaces[i], range(l, l + 1))
            self._map(one, list(spaces))
        return done

    def compute(self, weights: np.ndarray, batch: np.ndarray, nodes: list[tree.Node], out: np.ndarray,
                step: int = 0, done: Callable[[int, int], None] | None = None, arrival=None) -> Leaves:
        """The values of tree ``nodes`` over the micro-batches of ``batch``, into ``out`` (shape
        ``(len(nodes), P)``: row r is node r's summed gradient).

        Each micro-batch's forward pass and the backward pass of the layers above the first, T
        micro-batches at a time (while their activations are in cache), then every micro-batch's
        gradient of layer 1: ``done(lo, hi)``, if given, is called as columns ``[lo, hi)`` of every
        row are final, the layers above the first, then the first.  ``arrival``, if given, says how
        far ``weights`` are in while they still come (``_lead``).  Returns the ``Leaves`` of the
        micro-batches the nodes cover, whose seconds leave out the wait for weights.  ``step``: the
        step it is of, kept with the call's times in ``spans`` (--timeline).
        """
        start, wall, cpu = time.perf_counter(), time.time(), time.thread_time()
        waited = Waited(arrival)
        W = self.layout.views(weights)
        ranges = micro_batches(len(batch), self.micro_batch)
        spans = [tree.span(node, len(ranges)) for node in nodes]
        owned = [i for lo, hi in spans for i in range(lo, hi)]
        errors: list[float] = []
        squares: dict[int, list[float]] = {i: [] for i in owned}  # each micro-batch's layers' squared norms
        offsets, shapes = self.layout.offsets, self.layout.shapes
        stacks: dict[tuple[int, int], list] = {}  # (row, layer): the fold's subtrees so far (``_fold``)
        groups = cuts.fixed(len(owned), self._group())
        for part in groups:  # at most ACTIVATION_BYTES of activations at once
            ids = owned[part.start:part.stop]
            spaces = self._workspaces(ranges, ids)
            first = 1 + (self._lead(W, waited, lambda i: batch[ranges[i].start:ranges[i].stop], spaces)
                         if arrival is not None and part is groups[0] else 0)

            def layer(l: int, ids: list[int], spaces: dict = spaces) -> None:
                """Layer ``l``'s gradient of micro-batches ``ids`` (and their ``delta^{l-1}``), into the nodes."""
                def leaf(i: int, g: np.ndarray) -> float:
                    backward_layer(W, l, self.activation, spaces[i], g.reshape(shapes[l - 1]))
                    return float(np.dot(g, g))
                for r, span in enumerate(spans):
                    mine = [i for i in ids if span[0] <= i < span[1]]
                    if mine:
                        self._fold(mine, span, out[r, offsets[l - 1]:offsets[l]], leaf, squares,
                                   stacks.setdefault((r, l), []))
            for wave in cuts.fixed(len(ids), self.threads):  # T micro-batches at a time, while in cache
                some = ids[wave.start:wave.stop]
                errors += self._map(lambda i, spaces=spaces, first=first: self._forward(
                    W, batch[ranges[i].start:ranges[i].stop], spaces[i], first), some)
                for l in range(len(W), 1, -1):  # the layers above the first
                    layer(l, some)
            last = done is not None and part is groups[-1]
            if last and len(W) > 1:
                done(offsets[1], offsets[-1])
            layer(1, ids)  # the first layer's gradients last: the layers above go out meanwhile
            if last:
                done(0, offsets[1])
        seconds = time.perf_counter() - start
        self.spans.append((wall, wall + seconds, time.thread_time() - cpu, step))
        return Leaves(errors, [noise.leaf_square(squares[i], len(ranges[i])) for i in owned], seconds - waited.seconds)

    def _group(self) -> int:
        """Micro-batches whose activations a worker holds at once: ``ACTIVATION_BYTES`` worth."""
        return max(1, ACTIVATION_BYTES // (self.row_bytes * self.micro_batch))

    def _fold(self, ids: list[int], span: tuple[int, int], dst: np.ndarray, leaf: Callable[[int, np.ndarray], float],
              squares: dict[int, list[float]], stack: list) -> None:
        """Micro-batches ``ids`` of node ``span``'s into its columns of one layer, ``dst``: T at a time,
        each into a buffer of its own (the node's first straight into ``dst``, ``leaf(i, buffer)``),
        added as they come in the tree's order.  ``squares[i]`` gets what ``leaf`` returns.  ``stack``
        is the node's fold so far: a node's micro-batches may come in several calls, in order.

        The fold makes the tree's additions: a stack holds the finished subtrees left to right;
        two siblings on top become their parent (left + right, into the left one); after the
        node's last micro-batch the stack is added up from the right, which is the tree's
        ``left + right`` where a right part is cut short by ``n``.  So every row gets the same bits
        for any T, and a worker holds at most T + log2(n) leaf buffers a layer, whatever its share.
        """
        lo, hi = span
        # Each addition cut into T column ranges, one per thread: elementwise, so the same bits,
        # and the passes over memory of a share's leaves no longer run on one core (a small layer's
        # on this thread: handing it out would cost more than the addition).
        cols = [(c.start, c.stop) for c in cuts.even(len(dst), self.threads if len(dst) >= SPLIT_MIN else 1)]

        def add(left: np.ndarray, right: np.ndarray) -> None:
            if len(cols) == 1:
                np.add(left, right, out=left)
            else:
                self._map(lambda c: np.add(left[c[0]:c[1]], right[c[0]:c[1]], out=left[c[0]:c[1]]), cols)
            self.pool.give(right.base)

        for first in range(ids[0], ids[-1] + 1, self.threads):
            group = range(first, min(first + self.threads, ids[-1] + 1))
            bufs = [dst if i == lo else self.pool.take()[:len(dst)] for i in group]
            for i, buf, square in zip(group, bufs, self._map(leaf, group, bufs)):
                squares[i].append(square)
                stack.append(((0, i), buf))
                while len(stack) > 1 and stack[-2][0][0] == stack[-1][0][0] and stack[-2][0][1] % 2 == 0:
                    (level, i_left), left = stack[-2]
                    add(left, stack.pop()[1])
                    stack[-1] = ((level + 1, i_left // 2), left)
        while ids[-1] == hi - 1 and len(stack) > 1:
            right = stack.pop()[1]
            add(stack[-1][1], right)
