"""How many threads a worker computes on by default: its share of its node's CPUs.

A worker runs BLAS on one thread (actors.py), so K workers on a 16-core node use 16 cores
only if K = 16, and the servers then take 16 vectors a step.  ``--threads-per-worker T``
lets one worker use T cores instead (step/worker.py).  Left unset, T is the CPUs of the
worker's node divided by the workers placed there, the fewest over the workers' nodes (one
T for the run), at least 1.  On this machine's own node the CPUs are the cores the system
has, not the logical CPUs a local Ray may have been started with (the test suite starts one
with 16 on 2 cores): a 2-core laptop with K = 2 gets T = 1, with K = 1 T = 2.
"""

from __future__ import annotations

import os
from collections import Counter

import ray
from ray.util.placement_group import placement_group_table


def share(pg, workers: int) -> int:
    """The default T for ``workers`` workers in bundles ``0..workers-1`` of placement group ``pg``."""
    placed = placement_group_table(pg)["bundles_to_node_id"]
    per_node = Counter(placed[k] for k in range(workers))
    here = ray.get_runtime_context().get_node_id()
    cpus = {node["NodeID"]: node["Resources"].get("CPU", 1) for node in ray.nodes() if node["Alive"]}
    shares = []
    for node, count in per_node.items():
        have = cpus.get(node, 1)
        if node == here:
            have = min(have, os.cpu_count() or 1)
        shares.append(int(have) // count)
    return max(1, min(shares, default=1))
