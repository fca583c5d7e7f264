"""Cutting ``range(n)`` into contiguous parts: the one helper for shares, micro-batches and ranges.

Two ways to cut, used everywhere a range is shared out:

- ``even(n, k)``: ``k`` parts whose lengths differ by at most one (a step's micro-batches over
  the workers; the flat weight vector over ``--servers S``);
- ``fixed(n, size)``: parts of ``size`` items, the last one shorter (a batch into micro-batches
  of ``M`` rows; a vector into cache-sized chunks).

Both return ``range`` objects, which are also the ``[lo, hi)`` bounds: ``r.start``, ``r.stop``.
"""

from __future__ import annotations


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


def aligned(n: int, k: int) -> list[range]:
    """``k`` contiguous parts tiling ``range(n)``, each made of whole ``blocks(n)``, as many blocks
    each give or take one (``even`` over the blocks): the servers' ranges of the flat vector."""
    parts = blocks(n)
    edges = [parts[i].start if i < len(parts) else n for i in (g.start for g in even(len(parts), k))] + [n]
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:])]


def within(n: int, part: range) -> list[range]:
    """The ``blocks(n)`` inside ``part`` (one of ``aligned(n, k)``), relative to ``part.start``."""
    return [range(b.start - part.start, b.stop - part.start) for b in blocks(n) if part.start <= b.start < part.stop]
