"""Summing micro-batch gradients in one fixed order, whoever computes which part.

Floating-point addition is not associative, so the batch gradient is only the same bits
for every split of the batch if the additions happen in the same order every time.  We fix
that order as a binary tree over the micro-batch indices ``0..n-1``:

- node ``(level, i)`` covers the micro-batches ``[i * 2^level, (i+1) * 2^level)`` clipped to ``n``;
- a leaf ``(0, i)`` is micro-batch ``i``'s gradient;
- an inner node is ``left + right``, or just ``left`` when ``right`` starts at or past ``n``.

A worker that owns a set of micro-batches computes the largest whole nodes inside it
(``blocks``) and sends those; the server adds the nodes it receives into the root
(``combine``).  Every addition is one of the tree's, with the same two operands, so the
root has the same bits for 1 worker or 7, even or uneven shares, or after a lost worker's
micro-batches were redone elsewhere.  It costs nothing extra: ``n - 1`` additions, as any sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

Node = tuple[int, int]  # (level, index)


def span(node: Node, n: int) -> tuple[int, int]:
    """The micro-batch range ``[lo, hi)`` a node covers in a tree over ``n`` leaves."""
    level, i = node
    return i << level, min((i + 1) << level, n)


def blocks(indices: Iterable[int], n: int) -> list[Node]:
    """The maximal tree nodes whose leaves all lie in ``indices`` (a subset of ``range(n)``), in order.

    For a contiguous range ``[lo, hi)`` that is at most ``2 log2 n`` nodes.
    """
    owned = set(indices)
    top = top_level(n)
    out: list[Node] = []
    i = 0
    while i < n:
        if i not in owned:
            i += 1
            continue
        level = 0
        while level < top:
            lo, hi = span((level + 1, i >> (level + 1)), n)
            if lo != i or not owned.issuperset(range(lo, hi)):
                break
            level += 1
        out.append((level, i >> level))
        i = span(out[-1], n)[1]
    return out


def top_level(n: int) -> int:
    """Level of the root of a tree over ``n`` leaves."""
    return max(n - 1, 0).bit_length()


def combine(nodes: dict[Node, np.ndarray], n: int,
            add: Callable[[np.ndarray, np.ndarray], np.ndarray], root: Node | None = None) -> np.ndarray:
    """Add nodes that tile ``root``'s span (default: the whole tree) into ``root``, as ``left + right``.

    ``add(a, b)`` returns ``a + b`` and may write into either operand it owns (IEEE addition
    is commutative, so ``a + b`` and ``b + a`` are the same bits).  ``nodes`` is consumed.
    """
    root = root if root is not None else (top_level(n), 0)
    for level in range(root[0]):
        for i in sorted(i for (lv, i) in nodes if lv == level):
            if (level, i) not in nodes:
                continue  # consumed as a right sibling
            if i % 2:
                raise ValueError(f"node {(level, i)} has no left sibling: the nodes do not tile {root}")
            if (level + 1, i // 2) in nodes:  # else the sum would silently replace it
                raise ValueError(f"node {(level + 1, i // 2)} overlaps {(level, i)}: the nodes do not tile {root}")
            left = nodes.pop((level, i))
            if span((level, i + 1), n)[0] >= n:
                nodes[(level + 1, i // 2)] = left  # no right subtree: the parent is its left child
                continue
            right = nodes.pop((level, i + 1), None)
            if right is None:
                raise ValueError(f"node {(level, i + 1)} is missing: the nodes do not tile {root}")
            nodes[(level + 1, i // 2)] = add(left, right)
    if set(nodes) != {root}:
        raise ValueError(f"nodes {sorted(nodes)} do not tile {root} over {n} leaves")
    return nodes.pop(root)
