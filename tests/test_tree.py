"""The fixed binary tree (distbp/lecture/tree.py): any split of the leaves gives the bits of the full tree."""

import numpy as np
import pytest

from distbp.lecture import tree


def reference(leaves: list[np.ndarray], level: int, i: int) -> np.ndarray:
    """The tree's definition, recursively: node (level, i) = left + right, or left alone at the edge."""
    n = len(leaves)
    if level == 0:
        return leaves[i]
    left = reference(leaves, level - 1, 2 * i)
    if (2 * i + 1) << (level - 1) >= n:
        return left
    return left + reference(leaves, level - 1, 2 * i + 1)


def make_leaves(n: int, rng: np.random.Generator, size: int = 64) -> list[np.ndarray]:
    # Magnitudes over ten decades, so that a different order of additions changes the bits.
    return [rng.standard_normal(size) * 10.0 ** rng.uniform(-5, 5, size) for _ in range(n)]


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def random_split(n: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    """``k`` contiguous shares of ``range(n)`` at random cut points (some may be empty)."""
    cuts = np.sort(rng.integers(0, n + 1, size=k - 1))
    bounds = [0, *cuts.tolist(), n]
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def combine_split(leaves: list[np.ndarray], shares: list[list[int]]) -> np.ndarray:
    """What the workers and the server do: each share's blocks, each block summed from its leaves."""
    n = len(leaves)
    table = {}
    for ids in shares:
        for node in tree.blocks(ids, n):
            lo, hi = tree.span(node, n)
            table[node] = tree.combine({(0, i): leaves[i] for i in range(lo, hi)}, n, add, node)
    return tree.combine(table, n, add)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 16, 33])
def test_blocks_tile_the_owned_leaves_with_whole_nodes(n):
    rng = np.random.default_rng(n)
    for _ in range(50):
        owned = sorted(set(rng.integers(0, n, size=rng.integers(0, n + 1)).tolist()))
        nodes = tree.blocks(owned, n)
        covered = [i for node in nodes for i in range(*tree.span(node, n))]
        assert covered == owned  # disjoint, in order, exactly the owned leaves
        for level, i in nodes:  # maximal: the parent is not wholly owned
            lo, hi = tree.span((level + 1, i >> 1), n)
            assert level == tree.top_level(n) or not set(range(lo, hi)) <= set(owned)
    for lo in range(n):  # a contiguous range needs at most 2 log2 n nodes
        for hi in range(lo + 1, n + 1):
            assert len(tree.blocks(range(lo, hi), n)) <= max(1, 2 * tree.top_level(n))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 16, 37])
def test_any_split_gives_the_bits_of_the_full_tree(n):
    rng = np.random.default_rng(100 + n)
    leaves = make_leaves(n, rng)
    full = reference(leaves, tree.top_level(n), 0)
    for k in (1, 2, 3, 4, 5, 8, n + 3):
        for _ in range(5):
            got = combine_split(leaves, random_split(n, k, rng))
            assert np.array_equal(got, full), (n, k)
    robin = [list(range(k, n, 3)) for k in range(3)]  # not contiguous: every leaf its own block
    assert np.array_equal(combine_split(leaves, robin), full)


def test_the_leaves_are_order_sensitive():
    """The property above is not trivial: adding the same leaves shard by shard changes the bits."""
    rng = np.random.default_rng(7)
    leaves = make_leaves(37, rng)
    full = reference(leaves, tree.top_level(37), 0)
    left_to_right = leaves[0].copy()
    for leaf in leaves[1:]:
        left_to_right = left_to_right + leaf
    assert not np.array_equal(left_to_right, full)
    assert np.allclose(left_to_right, full, rtol=1e-12, atol=1e-12 * np.abs(full).max())


@pytest.mark.parametrize("nodes, n", [
    ({(0, 0): 1.0, (0, 2): 1.0}, 4),                        # leaf 1 and leaf 3 missing
    ({(0, 1): 1.0, (0, 2): 1.0, (0, 3): 1.0}, 4),           # leaf 0 missing: 1 has no left sibling
    ({(1, 0): 1.0, (0, 0): 1.0, (0, 1): 1.0}, 2),           # overlap: the root and its leaves
    ({(1, 0): 1.0, (0, 1): 1.0, (1, 1): 1.0}, 4),           # overlap: leaf 1 inside node (1, 0)
    ({(2, 0): 1.0, (0, 0): 1.0, (0, 1): 1.0, (1, 1): 1.0}, 4),  # overlap across two levels
    ({(1, 0): 1.0, (1, 1): 1.0, (0, 4): 1.0}, 4),           # a leaf past the end
    ({}, 3),                                                  # nothing at all
])
def test_nodes_that_do_not_tile_the_root_raise(nodes, n):
    with pytest.raises(ValueError, match="tile"):
        tree.combine(dict(nodes), n, add)


def test_a_subtree_root_rejects_nodes_outside_it():
    with pytest.raises(ValueError, match="tile"):
        tree.combine({(0, 0): 1.0, (0, 1): 1.0, (0, 2): 1.0}, 4, add, root=(1, 0))
