"""What the parameter server does in a step, as a plain numpy object the Ray actor holds: no Ray here.

``ServerState.step`` adds the tree nodes of every worker's share into the batch gradient in
the tree's fixed order (tree.py), checks it is finite, fingerprints it, and applies the optimizer
to the server's part of the flat parameter vector.  The sum and the update are elementwise,
so a part's entries get the same bits whichever server owns them (``--servers S``), and
whichever thread of the server computes them: the sum, its check and the update run chunk by
chunk, the chunks shared out over the server's threads (``threads``), which the workers leave
idle while they wait for the new weights.

``--clip-norm`` and the noise scale (noise.py) need one number of the whole vector, the
gradient's squared norm.  The vector is cut
into fixed blocks by its size alone (``cuts.blocks``) and a server's part is whole blocks
(``cuts.striped``), so each block's sum of squares is the same bits whichever server computes
it; the squared norm is ``math.fsum`` of all of them, the exactly rounded sum, which no order
or grouping of the additions changes.  Each step's report carries the part's block sums
(``merge_reports`` adds them up).  A step is two halves, ``gather`` (sum and check) and
``apply`` (update); under ``--clip-norm`` with S servers each server's ``apply`` gets every
server's ``gather`` (the actors swap them: distributed/actors.py).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..lecture import cuts, tree
from ..lecture.optim import Hyper, clip_coef, init_state, update
from .fingerprint import Fingerprints
from .reports import exact_sum

# The server sums, checks and updates the vector this many bytes at a time, so that a chunk's
# operands stay in cache between those passes (ServerState._sum).
CHUNK_BYTES = 1 << 20
# The server's pass is bound by memory bandwidth, which a few cores saturate (docs/performance.md).
MOST_THREADS = 8


def pass_threads() -> int:
    """The threads a server's pass runs on: the cores this process may use, at most MOST_THREADS."""
    return max(1, min(MOST_THREADS, len(os.sched_getaffinity(0))))


def chunks(blocks: list[range], itemsize: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cuts of the range tiled by ``blocks``: runs of whole blocks of at most
    ``CHUNK_BYTES`` each (or one block, if it is larger)."""
    most, out = max(1, CHUNK_BYTES // itemsize), []
    for b in blocks:
        if out and b.stop - out[-1][0] <= most:
            out[-1] = (out[-1][0], b.stop)
        else:
            out.append((b.start, b.stop))
    return out


class NonFiniteGradient(ArithmeticError):
    """A step's summed gradient holds NaN or inf: training diverged; the server did not update."""


class Abandoned(RuntimeError):
    """A step's inputs stopped coming in (``ready`` said no): nothing was applied."""


def always(lo: int, hi: int) -> bool:
    """``ready`` when a step's inputs are all in before it starts: every chunk is."""
    return True


def nothing(i: int) -> None:
    """``updated`` (or ``on_applied``) when nobody waits for the chunks of the new weights."""


class ServerState:
    """Weights and optimizer state for one part of the flat parameter vector (all of it with
    one server; ``--servers S``: the part the transport gives server s, its runs one after another)."""

    def __init__(self, weights: np.ndarray, hyper: Hyper, decay_mask: np.ndarray | None,
                 blocks: list[range] | None = None, threads: int = 1, on_applied: Callable[[int], None] = nothing):
        """``weights`` holds this part's starting values; the server owns it and updates it in
        place (an array of its own, or its part of the shared weights file: transport.py).
        ``blocks``: the part's ``cuts.blocks`` of the whole vector, as its own columns
        (``cuts.within``); None when the server holds the whole vector.  ``threads``: how many
        threads share out the chunks of a step's pass (the same bits for any number).
        ``on_applied(t)``: the server now holds the weights after ``t`` steps (each step
        applied, a checkpoint restored): its transport tells the waiting workers."""
        self.weights = weights
        self.hyper = hyper
        self.state = init_state(hyper.optimizer, len(self.weights), self.weights.dtype)
        self.decay_mask = decay_mask
        self.t = 0  # steps applied so far: the driver asks for it after a failure, so no step is applied twice
        self.on_applied = on_applied
        self.timings: dict[int, dict[str, float]] = {}
        self.grad = np.empty_like(self.weights)  # the last step's batch gradient, kept for its hash
        self.blocks = cuts.blocks(len(self.weights)) if blocks is None else blocks
        self.chunks = chunks(self.blocks, self.weights.itemsize)
        self.fingerprints = Fingerprints(self.grad, self.chunks)
        # each chunk's block starts, relative to the chunk: np.add.reduceat's segments
        starts = np.array([b.start for b in self.blocks], dtype=np.intp)
        self.segments = [starts[(starts >= lo) & (starts < hi)] - lo for lo, hi in self.chunks]
        self.first_block = np.cumsum([0] + [len(seg) for seg in self.segments]).tolist()  # each chunk's
        self.local = threading.local()  # each thread's chunk-sized work buffers (``_spare``)
        self.widest = max(hi - lo for lo, hi in self.chunks)
        self.squares = np.empty(len(self.blocks), dtype=self.weights.dtype)  # each block's sum of squares
        self.threads = max(1, min(threads, len(self.chunks)))
        self.pool = ThreadPoolExecutor(self.threads - 1, "distbp-pass") if self.threads > 1 else None
        self.summed = 0  # the step whose gradient is summed (gather), to be applied
        self.clock: dict[str, float] = {}  # the step under way's times

    def _spare(self, i: int, length: int) -> np.ndarray:
        """The calling thread's i-th chunk-sized scratch buffer, cut to ``length``."""
        scratch = self.local.__dict__.setdefault("scratch", [])
        while len(scratch) <= i:
            scratch.append(np.empty(self.widest, dtype=self.weights.dtype))
        return scratch[i][:length]

    def _each(self, job: Callable[[int], None], top_down: bool = False) -> None:
        """``job(i)`` for every chunk ``i``, the chunks taken in order (``top_down``: from the last)
        by the server's threads (this one among them) as each finishes its last; returns once
        all are done."""
        chunks = range(len(self.chunks))
        if top_down:
            chunks = chunks[::-1]
        if self.pool is None:
            for i in chunks:
                job(i)
            return
        order, lock = iter(chunks), threading.Lock()

        def run() -> None:
            while True:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                job(i)
        helpers = [self.pool.submit(run) for _ in range(self.threads - 1)]
        try:
            run()
        finally:
            for helper in helpers:  # they write the step's buffers: none may outlive the pass
                helper.result()

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
             summed: Callable[[int], None] = nothing, ready: Callable[[int, int], bool] = always) -> bool:
        """Fill ``self.grad`` with the batch gradient; True if every entry is finite.

        ``summed(i)`` is called as chunk ``i`` (``self.chunks[i]``) is done, from the thread that did it.
        ``ready(lo, hi)`` waits until entries ``[lo, hi)`` of every value are in (they may still
        be arriving when the sum starts: the direct transport's windows); False: they will
        not come, and the sum stops (``Abandoned``).

        ``values[k]`` (shape ``(len(nodes[k]), P)``) holds the values of the nodes ``nodes[k]``.
        Chunk by chunk, so each chunk's additions and its check run while it is in cache: the
        same additions as one pass over whole vectors (they are elementwise), one trip to memory.
        """
        table = {node: row for node_list, value in zip(nodes, values) for node, row in zip(node_list, value)}
        finite = [True] * len(self.chunks)

        def chunk(i: int) -> None:
            lo, hi = self.chunks[i]
            if not ready(lo, hi):
                raise Abandoned(f"the inputs of entries {lo}:{hi} will not come")
            g = self._sum_chunk(n, {node: row[lo:hi] for node, row in table.items()}, lo, hi)
            # Each block's sum of squares, while the chunk is in cache (--clip-norm, the noise
            # scale).  reduceat sums each block with numpy's pairwise sum: bits that depend on the
            # block's values alone, not on where the block lies in memory or in the chunk.
            with np.errstate(over="ignore", invalid="ignore"):
                square = np.square(g, out=self._spare(0, hi - lo))
                sums = self.squares[self.first_block[i]:self.first_block[i + 1]]
                np.add.reduceat(square, self.segments[i], out=sums)
                # A NaN or inf anywhere makes a sum non-finite; so does an entry whose square
                # overflows (past 1.8e19 in float32): diverged too.
                finite[i] = bool(np.isfinite(sums.sum()))
            summed(i)
        self._each(chunk, top_down=True)  # in the order pushes come in: a worker's top layer first
        return all(finite)

    def gradient(self, n: int, nodes: list[list[tree.Node]], values: list[np.ndarray]) -> np.ndarray:
        """The batch gradient over this range: every worker's nodes added in the tree's order.

        Returns ``self.grad``, which the next step overwrites.
        """
        self.fingerprints.wait()
        self._sum(n, nodes, values)
        return self.grad

    def step(self, n: int, nodes: list[list[tree.Node]], values: list[np.ndarray], lr: float, t: int,
             scale: float | None, ready: Callable[[int, int], bool] = always,
             updated: Callable[[int], None] = nothing) -> np.ndarray:
        """Step ``t`` (counted from 1): sum, update in place, return the new weights of this range.

        The server holds the whole vector (or no clipping needs the whole norm): both halves here.
        ``ready`` and ``updated``: as ``gather`` and ``apply`` take them.
        """
        return self.apply(lr, t, scale, [self.gather(n, nodes, values, t, ready)], updated)

    def gather(self, n: int, nodes: list[list[tree.Node]], values: list[np.ndarray], t: int,
               ready: Callable[[int, int], bool] = always) -> np.ndarray:
        """The first half of step ``t``: the batch gradient over this range, summed and checked.

        ``ready``: as ``_sum`` takes it; a chunk waits for its inputs, not the whole sum for all
        of them.  ``Abandoned`` if they stop coming: nothing is applied.

        Returns each of the range's blocks' sum of squares of the summed gradient (its dtype, in
        block order): ``--clip-norm`` needs every server's, the noise scale gets them in the report.
        """
        if t != self.t + 1:
            raise ValueError(f"step {t} sent to a server that has applied {self.t} steps")
        start, wall, cpu = time.perf_counter(), time.time(), time.thread_time()
        self.fingerprints.wait()  # the last step's hash reads self.grad
        waited = time.perf_counter()
        done = self.fingerprints.start(t)
        try:
            finite = self._sum(n, nodes, values, lambda i: done[i].set(), ready)
        except BaseException:
            for event in done:  # the hash ends, and is forgotten with the step
                event.set()
            self.refuse()
            raise
        if not finite:  # refuse it: the weights stay those of the last good step
            self.refuse()
            raise NonFiniteGradient(f"the summed gradient of step {t} has non-finite values")
        self.summed = t
        self.clock = {"start": start, "wall": wall, "cpu": time.thread_time() - cpu, "waited": waited,
                      "summed": time.perf_counter(), "bytes_in": sum(v.nbytes for v in values),
                      "squares": self.squares.tolist()}
        return self.squares.copy()

    def apply(self, lr: float, t: int, scale: float | None, squares: list[np.ndarray],
              updated: Callable[[int], None] = nothing) -> np.ndarray:
        """The second half of step ``t``: update this range in place; return its new weights.

        ``squares``: what ``gather`` returned on every server, in range order (this one's alone
        where it holds the whole vector): under ``--clip-norm`` each adds them up to one norm.  ``updated(i)`` is called
        as chunk ``i`` holds its new weights (from the thread that updated it), so that they can
        go out while the others are updated.
        """
        if self.summed != t:
            raise ValueError(f"step {t} is to be applied but the gradient summed is of step {self.summed}")
        cpu = time.thread_time()
        applying = time.perf_counter()
        clip, norm = None, None
        if self.hyper.clip_norm is not None:
            norm = _norm(squares, scale)
            if not math.isfinite(norm):  # overflowed: as diverged as a NaN
                self.refuse()
                raise NonFiniteGradient(f"the norm of the summed gradient of step {t} is not finite")
            clip = clip_coef(norm, self.hyper.clip_norm)
        mask = self.decay_mask

        def chunk(i: int) -> None:
            lo, hi = self.chunks[i]
            g = self._spare(0, hi - lo)
            np.copyto(g, self.grad[lo:hi])  # update() overwrites its gradient; self.grad is being hashed
            update(self.weights[lo:hi], g, {name: buf[lo:hi] for name, buf in self.state.items()}, self.hyper,
                   lr, t, scale, None if mask is None else mask[lo:hi], clip)
            updated(i)
        self._each(chunk)
        self.t, self.summed = t, 0
        self.on_applied(t)
        done, c = time.perf_counter(), self.clock
        # start and end are wall-clock times, comparable with the workers' spans (scripts/bench.py)
        self.timings[t] = {"server_sum": c["summed"] - c["waited"], "update": done - applying,
                           "start": c["wall"], "end": c["wall"] + done - c["start"],
                           "cpu": c["cpu"] + time.thread_time() - cpu,
                           "bytes_in": c["bytes_in"],  # what the workers sent this server
                           "squares": c["squares"]}  # this range's blocks' sums of squares
        if norm is not None:
            self.timings[t]["grad_norm"] = norm
        return self.weights

    def refuse(self) -> None:
        """The step is not applied: forget its hash."""
        self.fingerprints.forget(self.t + 1)
        self.summed = 0

    def restore(self, arrays: dict[str, np.ndarray], t: int) -> None:
        """This range's weights and optimizer buffers of a checkpoint taken after step ``t``."""
        self.fingerprints.wait()
        self.weights[:] = arrays["weights"]
        for name, buf in self.state.items():
            buf[:] = arrays[name]
        self.t = t
        self.on_applied(t)

    def report(self) -> dict[int, dict]:
        """Gradient hash and timings of every step since the last report."""
        self.fingerprints.wait()
        return {t: {"grad_xxh3": self.fingerprints.hashes.pop(t), **self.timings.pop(t)} for t in list(self.timings)}


def _norm(squares: list[np.ndarray], scale: float | None) -> float:
    """The 2-norm of the gradient the optimizer sees (the sum divided by ``scale`` if given),
    from every block's sum of squares of the sum: fsum is exact, so the order does not matter."""
    total = exact_sum([part.tolist() for part in squares])  # inf where the partial sums overflowed
    norm = math.sqrt(total) if total >= 0 else math.nan
    return norm / scale if scale is not None else norm
