"""How many threads a worker computes on by default: its share of its node's CPUs.

A worker runs BLAS on one thread (actors.py), so K workers on a 16-core node use 16 cores
only if K = 16, and the servers then take 16 vectors a step.  ``--threads-per-worker T``
lets one worker use T cores instead (step/worker.py); a worker reserves T CPUs from Ray.
Left unset, T is a worker's share of its node's CPUs, one T for the run, at least 1:

- a private local Ray (this machine): the cores the system has over the K workers (MAX of
  ``--workers MIN:MAX``); the Ray is started with enough CPUs for them and the servers.  A
  2-core laptop with K = 2 gets T = 1, with K = 1 T = 2.
- a running Ray (a cluster, or one started by the caller): workers are placed one by one
  (workers.py), so T is what fits on the smallest live node when the workers and servers
  are spread evenly over the live nodes.  On the driver's node the CPUs are the cores the
  system has, not the logical CPUs its Ray may have been started with (the test suite
  starts one with 16 on 2 cores).
"""

from __future__ import annotations

import math
import os

import ray


def default(address: str | None, workers: int, servers: int) -> int | None:
    """T for a private local Ray (None when the run joins a running Ray: ``share`` after connecting)."""
    if address in (None, "local") and not ray.is_initialized():
        return max(1, (os.cpu_count() or 1) // workers)
    return None


def share(workers: int, servers: int) -> int:
    """T for ``workers`` workers and ``servers`` servers spread over the live nodes of the Ray
    this process is connected to."""
    here = ray.get_runtime_context().get_node_id()
    cpus = []
    for node in ray.nodes():
        have = node["Resources"].get("CPU", 0) if node["Alive"] else 0
        if have:
            cpus.append(min(have, os.cpu_count() or 1) if node["NodeID"] == here else have)
    if not cpus:
        return 1
    nodes = len(cpus)
    return max(1, int(min(cpus) - math.ceil(servers / nodes)) // math.ceil(workers / nodes))


def servers_per_node(workers_cpus: int, resource: str | None = None) -> int:
    """``--servers auto``: one server on each live node with a CPU, so that every node's link
    carries its share of the gradient and of the weights (with one server, its node's link carries
    all of both: docs/performance.md); at most the CPUs the cluster has now beyond the workers'
    (``workers_cpus``: MAX workers' of ``--workers MIN:MAX``), at least 1.  On one machine, 1.
    With ``--server-resource R``: one a unit of R (at least 1)."""
    live = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if resource:
        return max(1, int(sum(have.get(resource, 0) for have in live)))
    cpus = [have.get("CPU", 0) for have in live]
    nodes = sum(1 for have in cpus if have >= 1)
    return max(1, min(nodes, int(sum(cpus)) - workers_cpus))
