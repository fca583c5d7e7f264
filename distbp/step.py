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

import threading
import time

import numpy as np

from . import tree
from .checkpoint import sha256_le
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
        self._made: set[int] = set()

    def take(self) -> np.ndarray:
        if self.free:
            return self.free.pop()
        buf = np.empty(self.size, dtype=self.dtype)
        self._made.add(id(buf))
        return buf

    def give(self, buf: np.ndarray) -> None:
        self.free.append(buf)

    def owns(self, buf: np.ndarray) -> bool:
        """True for buffers this pool made (ids are safe: the pool keeps them alive)."""
        return id(buf) in self._made


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

    def _add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        np.add(a, b, out=a)
        self.pool.give(b)
        return a

    def leaf(self, W: list[np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, float]:
        """One micro-batch's summed gradient (a pool buffer) and summed error."""
        ws = self.workspaces.get(len(rows))
        if ws is None:
            ws = self.workspaces[len(rows)] = Workspace(self.layout.layers, len(rows), self.dtype)
        g = self.pool.take()
        loss = backprop(W, self.X[rows], self.Y[rows], self.activation, self.loss, ws, self.layout.views(g))
        return g, loss

    def compute(self, weights: np.ndarray, batch: np.ndarray, ids: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
        """Gradients of micro-batches ``ids`` of ``batch``, as the tree nodes they cover.

        Returns ``(values, losses, seconds)``: ``values[r]`` is the r-th node of
        ``tree.blocks(ids, n)`` (shape ``(nodes, P)``), ``losses[i]`` the summed error of
        micro-batch ``ids[i]`` (float64), and the compute time.
        """
        start = time.perf_counter()
        W = self.layout.views(weights)
        ranges = micro_batches(len(batch), self.micro_batch)
        n = len(ranges)
        nodes = tree.blocks(ids, n)
        if len(self.out) < len(nodes):
            self.out = np.empty((len(nodes), self.layout.size), dtype=self.dtype)
        losses = np.empty(len(ids), dtype=np.float64)
        k = 0
        for r, node in enumerate(nodes):
            acc = tree.Accumulator(n, self._add)
            lo, hi = tree.span(node, n)
            for i in range(lo, hi):
                g, losses[k] = self.leaf(W, batch[ranges[i][0]:ranges[i][1]])
                acc.push(i, g)
                k += 1
            value = acc.finish(node)
            self.out[r] = value
            self.pool.give(value)
        return self.out[:len(nodes)], losses, time.perf_counter() - start


class ServerState:
    """Weights and optimizer state for the range ``[lo, hi)`` of the flat parameter vector."""

    def __init__(self, weights: np.ndarray, lo: int, hi: int, hyper: Hyper, decay_mask: np.ndarray):
        self.lo, self.hi = lo, hi
        self.weights = np.array(weights, copy=True)  # this server's range, owned and writable
        self.hyper = hyper
        self.state = init_state(hyper.optimizer, len(self.weights), self.weights.dtype)
        self.decay_mask = decay_mask
        self.pool = BufferPool(len(self.weights), self.weights.dtype)
        self.hashes: dict[int, str] = {}
        self.timings: dict[int, dict[str, float]] = {}
        self._hashing: threading.Thread | None = None
        self._hash_buf = np.empty_like(self.weights)

    def _add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # Inputs from workers are not ours to write; add into whichever operand we own (a + b == b + a).
        for mine, other in ((a, b), (b, a)):
            if self.pool.owns(mine):
                np.add(mine, other, out=mine)
                if self.pool.owns(other):
                    self.pool.give(other)
                return mine
        return np.add(a, b, out=self.pool.take())

    def gradient(self, n: int, nodes: list[list[tree.Node]], values: list[np.ndarray]) -> np.ndarray:
        """The batch gradient over this range: every worker's nodes added in the tree's order."""
        table = {}
        for node_list, value in zip(nodes, values):
            for node, row in zip(node_list, value):
                table[node] = row
        g = tree.combine(table, n, self._add)
        if not self.pool.owns(g):  # a single node: the optimizer needs a buffer it may overwrite
            g = _copy(g, self.pool.take())
        return g

    def step(self, n: int, nodes: list[list[tree.Node]], values: list[np.ndarray], lr: float, t: int,
             scale: float | None) -> np.ndarray:
        """Step ``t`` (counted from 1): sum, update in place, return the new weights of this range."""
        start = time.perf_counter()
        g = self.gradient(n, nodes, values)
        summed = time.perf_counter()
        self._hash_later(t, g)
        update(self.weights, g, self.state, self.hyper, lr, t, scale, self.decay_mask)
        self.pool.give(g)
        self.timings[t] = {"server_sum": summed - start, "update": time.perf_counter() - summed}
        return self.weights

    def _hash_later(self, t: int, g: np.ndarray) -> None:
        """sha256 of the summed gradient, on a thread: it runs while the workers compute the next step
        (hashlib releases the GIL), instead of adding ~10 ms to every 15 MB step."""
        self.wait_hashes()
        np.copyto(self._hash_buf, g)
        self._hashing = threading.Thread(target=self._hash, args=(t,))
        self._hashing.start()

    def _hash(self, t: int) -> None:
        self.hashes[t] = sha256_le(self._hash_buf)

    def wait_hashes(self) -> None:
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None

    def report(self) -> dict[int, dict]:
        """Gradient hash and timings of every step since the last report."""
        self.wait_hashes()
        out = {t: {"grad_sha256": self.hashes.pop(t), **self.timings.pop(t)} for t in list(self.timings)}
        return out


def _copy(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    np.copyto(dst, src)
    return dst
