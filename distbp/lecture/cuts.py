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
