"""``--servers S``: the flat parameter vector cut into S contiguous ranges, one server actor each.

Li et al. (OSDI 2014) shard a parameter server by key range, so that the bytes each server
receives per step fall as servers are added.  Here a key range is ``[lo, hi)`` of the flat
vector.  A worker sends server ``s`` only the columns ``lo:hi`` of its tree-node values
(``Worker.compute`` returns them as S separate objects) and reads the S weight ranges back
into one buffer.  The tree sum and the optimizer are elementwise (optim.py), so every entry
goes through the same additions and the same update whichever server owns it: the weights
are bitwise identical for any S.

``Servers`` is the driver's handle on the S actors: each method starts the same call on
every server and returns one ObjectRef per server, in range order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np


def ranges(size: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ranges ``[lo, hi)`` tiling ``range(size)``, lengths differing by at most one."""
    bounds = [s * size // count for s in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def merge_reports(reports: list[dict[int, dict]]) -> dict[int, dict]:
    """One report per step from the S servers' ``report()``: the steps every server has.

    The servers run side by side, so a step's ``server_sum`` and ``update`` are the slowest
    server's.  ``bytes_in`` becomes the list of each server's received bytes.  With S > 1 the
    ``grad_sha256`` is the sha256 of the S range digests joined: stable for a given S, but not
    the same string as with one server (the weights hash is the same for every S).
    """
    if len(reports) == 1:
        return {t: {**entry, "bytes_in": [entry["bytes_in"]]} for t, entry in reports[0].items()}
    merged = {}
    for t in set.intersection(*(set(r) for r in reports)):
        entries = [r[t] for r in reports]
        timings = set(entries[0]) - {"grad_sha256", "bytes_in", "start"}  # durations and end times
        merged[t] = {
            **{key: max(e[key] for e in entries) for key in timings},
            "start": min(e["start"] for e in entries),
            "grad_sha256": hashlib.sha256("".join(e["grad_sha256"] for e in entries).encode()).hexdigest(),
            "bytes_in": [e["bytes_in"] for e in entries],
        }
    return merged


class Servers:
    """The S ``ParameterServer`` actors of a run; server ``s`` owns ``bounds[s]`` of the flat vector."""

    def __init__(self, spawn: Callable[[int, int, int], object], size: int, count: int):
        """``spawn(s, lo, hi)`` starts the actor owning ``[lo, hi)``."""
        self.bounds = ranges(size, count)
        self.actors = [spawn(s, lo, hi) for s, (lo, hi) in enumerate(self.bounds)]

    def __len__(self) -> int:
        return len(self.actors)

    def weights(self) -> list:
        """The current weights, one ref per range: pass them on as ``Worker.compute(..., *refs)``."""
        return [a.weights.remote() for a in self.actors]

    def step(self, n: int, nodes: list, lr: float, t: int, scale: float | None, values: list[list]) -> list:
        """Step ``t`` on every server; ``values[task][s]`` is that task's columns for server ``s``.

        Returns the refs of the new weight ranges.
        """
        return [a.step.remote(n, nodes, lr, t, scale, *[v[s] for v in values]) for s, a in enumerate(self.actors)]

    def report(self) -> list:
        return [a.report.remote() for a in self.actors]

    def snapshot(self) -> list:
        return [a.snapshot.remote() for a in self.actors]

    @staticmethod
    def join(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The S snapshots as one: each buffer's ranges concatenated."""
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def restore(self, arrays: dict[str, np.ndarray], t: int) -> list:
        """Load full-length buffers (weights, optimizer state) of step ``t``: each server its range."""
        return [a.restore.remote({k: v[lo:hi] for k, v in arrays.items()}, t)
                for a, (lo, hi) in zip(self.actors, self.bounds)]

    def step_count(self) -> list:
        return [a.step_count.remote() for a in self.actors]

    def node_ids(self) -> list:
        return [a.node_id.remote() for a in self.actors]

    def arm(self, action: str) -> None:
        """--fault-injection kill-server: the first server dies; the run recovers them all."""
        self.actors[0].arm.remote(action)

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
