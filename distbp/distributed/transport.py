"""How a step's vectors travel: the one module that knows their shape on the wire.

Per step, each server sends the workers its range of the new weights, and each worker task
sends each server that server's columns of its tree-node values (``(nodes, hi - lo)``).
Two transports carry them, with the same methods, so that actors and the crew never ask
which one runs:

- ``Direct`` (``--transport direct``, what ``auto`` picks): the workers and the servers talk
  to each other.  Each pair decides how when they first meet: between nodes over an
  authenticated socket (channel.py), within a node through shared memory (a memfd of the
  actor that owns the array, mapped by the other).  Only handles go through Ray, and the
  steps can go in windows without a Ray call each (windows.py).  direct.py and the modules it names.
- ``ObjectStore`` (``--transport object-store``): the vectors are numpy arrays that Ray copies
  through its object store; a worker joins the S weight ranges into one buffer and returns
  S column blocks of its node values.  The reference path, and the async loop's (its workers
  read whatever weights the server holds, mid-update or not).

A transport is made by the driver (``Session``, through ``choose``) and handed to every actor,
which makes its own end with ``worker_end()`` or ``server_end(s)``.  A worker end gives the
rows to compute into (``rows``) and then sends them (``send``).  The transport holds ``bounds``, the
servers' ranges of the flat vector: the one place they are decided (``cuts.aligned``).
"""

from __future__ import annotations

import numpy as np

from ..lecture import cuts
from .direct import WAIT_FLOOR_S, Direct


class ObjectStore:
    """The vectors as arrays through Ray's object store: works across nodes."""

    name = "object-store"
    windows = False  # windows of steps (windows.py) need the actors to talk directly

    def __init__(self, size: int, dtype, servers: int):
        self.size, self.dtype = size, np.dtype(dtype)
        self.bounds = cuts.aligned(size, servers)  # server s owns bounds[s] of the flat vector

    def worker_end(self) -> _StoreWorker:
        return _StoreWorker(self)

    def server_end(self, s: int) -> _StoreServer:
        return _StoreServer(self.bounds[s])


class _StoreWorker:
    def __init__(self, transport: ObjectStore):
        self.bounds, self.dtype = transport.bounds, transport.dtype
        self.flat = np.empty(transport.size, transport.dtype) if len(self.bounds) > 1 else None
        self.out = np.empty((0, transport.size), dtype=transport.dtype)

    def weights(self, parts: tuple) -> np.ndarray:
        """The whole weight vector from what the S servers returned."""
        if self.flat is None:
            return parts[0]
        return np.concatenate(parts, out=self.flat)  # one buffer, reused from call to call

    def rows(self, step: int, count: int) -> np.ndarray:
        """``count`` rows to compute node values into.

        The rows are a buffer reused from call to call: Ray copies a returned array into the
        object store when the call returns.
        """
        if len(self.out) < count:
            self.out = np.empty((count, self.out.shape[1]), dtype=self.dtype)
        return self.out[:count]

    def send(self, values: np.ndarray) -> list:
        """What to return to the S servers: each its columns of the rows."""
        if len(self.bounds) == 1:
            return [values]
        return [values[:, r.start:r.stop] for r in self.bounds]


class _StoreServer:
    def __init__(self, bounds: range):
        self.bounds = bounds

    def own(self, weights: np.ndarray) -> np.ndarray:
        """This server's range of the starting ``weights`` (the whole vector), as an array it owns."""
        return np.array(weights[self.bounds.start:self.bounds.stop])

    def publish(self, weights: np.ndarray) -> np.ndarray:
        """What a step returns for the workers: the range itself."""
        return weights

    def applied(self, steps: int) -> None:
        """Nothing to tell anyone: windows of steps (windows.py) run only on the direct transport."""

    def receive(self, parts: tuple) -> list[np.ndarray]:
        """Each task's node values for this server's columns."""
        return list(parts)


Transport = ObjectStore | Direct


def choose(name: str, size: int, dtype, servers: int, wait_s: float = WAIT_FLOOR_S) -> Transport:
    """The transport ``--transport name`` asks for (a validated Config's): ``object-store``, or
    the direct transport (``direct``, ``auto``), which reaches whichever nodes the workers land
    on, now or when they join; its actors wait on each other up to ``wait_s`` (``direct.peer_wait``)."""
    if name == "object-store":
        return ObjectStore(size, dtype, servers)
    return Direct(size, dtype, servers, wait_s)
