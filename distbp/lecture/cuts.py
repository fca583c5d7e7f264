"""Cutting ``range(n)`` into contiguous parts: the one helper for shares, micro-batches and ranges.

Two ways to cut, used everywhere a range is shared out:

- ``even(n, k)``: ``k`` parts whose lengths differ by at most one (a step's micro-batches over
  the workers; each layer of the flat weight vector over ``--servers S``: ``striped``);
- ``fixed(n, size)``: parts of ``size`` items, the last one shorter (a batch into micro-batches
  of ``M`` rows; a vector into cache-sized chunks).

Both return ``range`` objects, which are also the ``[lo, hi)`` bounds: ``r.start``, ``r.stop``.
"""

from __future__ import annotations

import numpy as np


def even(n: int, k: int) -> list[range]:
    """``k`` contiguous parts tiling ``range(n)``, lengths differing by at most one.

    With ``k > n`` some parts are empty (a worker with no micro-batch sits the step out).
    """
    bounds = [i * n // k for i in range(k + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def fixed(n: int, size: int) -> list[range]:
    """Contiguous parts of ``size`` items tiling ``range(n)``; the last one may be shorter."""
    return [range(lo, min(lo + size, n)) for lo in range(0, n, size)]


# ``--clip-norm`` needs the norm of the whole summed gradient, the same bits for any S.  The
# flat vector is cut into at most this many blocks, by its size alone; each block's sum of
# squares is computed where the block lies (in one server's range), and the partials are added
# exactly (math.fsum), so neither the cut into servers nor the order of addition matters.  1024
# blocks: a step's partials are 8 KB at most, and up to 1024 servers get whole blocks.
BLOCKS = 1024


def blocks(n: int) -> list[range]:
    """The fixed blocks of a vector of ``n`` entries: ``min(n, BLOCKS)`` parts, as ``even`` cuts them."""
    return even(n, min(n, BLOCKS))


class Part:
    """A server's part of the flat vector: ``runs``, ranges of whole ``blocks(n)`` in the vector's
    order, which the server holds one after another (its columns, or local entries: the first
    run's from 0).  ``striped`` makes them."""

    def __init__(self, runs: list[range]):
        merged: list[range] = []
        for r in (r for r in runs if len(r)):
            if merged and merged[-1].stop == r.start:
                r = range(merged.pop().start, r.stop)
            merged.append(r)
        self.runs = tuple(merged)
        self.starts = [0]  # each run's first column, and the part's width last
        for r in self.runs:
            self.starts.append(self.starts[-1] + len(r))

    def __len__(self) -> int:
        return self.starts[-1]

    def __repr__(self) -> str:
        return f"Part({list(self.runs)})"

    def local(self, column: int) -> int:
        """How many of the part's entries lie before ``column`` of the flat vector."""
        return sum(max(0, min(r.stop, column) - r.start) for r in self.runs)

    def segments(self, lo: int, hi: int) -> list[tuple[range, range]]:
        """Columns ``[lo, hi)`` of the part as ``(columns, their range of the vector)`` pairs, one
        per run they touch, in order."""
        out = []
        for start, r in zip(self.starts, self.runs):
            a, b = max(lo, start), min(hi, start + len(r))
            if a < b:
                out.append((range(a, b), range(r.start + a - start, r.start + b - start)))
        return out

    def take(self, vector: np.ndarray) -> np.ndarray:
        """The part's entries of ``vector`` (along its last axis), in the part's order: a view
        with one run, else a new array."""
        if len(self.runs) == 1:
            return vector[..., self.runs[0].start:self.runs[0].stop]
        return np.concatenate([vector[..., r.start:r.stop] for r in self.runs], axis=-1)

    def put(self, vector: np.ndarray, mine: np.ndarray) -> None:
        """Write the part's entries ``mine`` into their places in ``vector`` (along its last axis)."""
        for start, r in zip(self.starts, self.runs):
            vector[..., r.start:r.stop] = mine[..., start:start + len(r)]


def striped(n: int, k: int, edges: list[int] | None = None) -> list[Part]:
    """The servers' parts of a vector of ``n`` entries: of each span between consecutive
    ``edges`` (where each layer's weights start, then their end: ``Layout.offsets``; the whole
    vector if None), the ``blocks(n)`` that start in it, cut into ``k`` runs in server order;
    server s's part is run s of every span.  So each server holds a slice of every layer, and
    every link carries the top layer's entries of a push first and layer 1's of a pull
    first, whichever server it reaches.  A span's runs are as many blocks each, give or take
    one, the one more going to the servers with the fewest blocks so far: the parts, too, are
    as many blocks each, give or take one."""
    parts = blocks(n)
    runs: list[list[range]] = [[] for _ in range(k)]
    count = [0] * k  # each server's blocks so far
    edges = edges or [0, n]
    for span in (range(a, b) for a, b in zip(edges, edges[1:])):
        inside = [b for b in parts if span.start <= b.start < span.stop]
        each, more = divmod(len(inside), k)
        fewest = set(sorted(range(k), key=count.__getitem__)[:more])
        at = 0
        for s in range(k):
            size = each + (s in fewest)
            if size:
                runs[s].append(range(inside[at].start, inside[at + size - 1].stop))
            at, count[s] = at + size, count[s] + size
    return [Part(r) for r in runs]


def within(n: int, part: Part) -> list[range]:
    """The ``blocks(n)`` inside ``part`` (one of ``striped(n, k)``), as the part's columns."""
    return [range(start + b.start - r.start, start + b.stop - r.start)
            for start, r in zip(part.starts, part.runs) for b in blocks(n) if r.start <= b.start < r.stop]
