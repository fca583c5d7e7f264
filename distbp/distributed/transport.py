"""How a step's vectors travel: the one module that knows their shape on the wire.

Per step, each server gives the workers its range of the new weights, and each worker hands
each server that server's columns of its tree-node values (``(nodes, hi - lo)``) under a key the
driver chose (windows.py).  Two transports carry them, with the same methods, so that the
actors and the driver never ask which one runs:

- ``Direct`` (``--transport direct``, what ``auto`` picks): each worker-server pair decides how
  when they first meet: between nodes over an authenticated socket (channel.py), within a node
  through shared memory (a memfd of the actor that owns the array, mapped by the other), and
  through the object store where the worker cannot reach the server's socket.  Only handles go
  through Ray.  direct.py and the modules it names.
- ``ObjectStore`` (``--transport object-store``): the vectors are numpy arrays that Ray copies
  through its object store, every pair (store.py).  The reference path, and the async loop's
  (its workers read whatever weights the server holds, mid-update or not).

Both ends keep the same board (board.py: the step a server holds, its window) and inbox
(inbox.py: the node values handed in, by key), so a window's steps wait on the same things
whichever transport runs.  A transport is made by the driver (``Session``, through ``choose``)
and handed to every actor, which makes its own end with ``worker_end()`` or ``server_end(s)``.
The transport holds ``parts``, the servers' parts of the flat vector: the one place they are
decided (``cuts.striped``: a slice of every layer each, so that every link's push starts with
the top layer and its pull with layer 1).
"""

from __future__ import annotations

import numpy as np

from ..lecture import cuts
from .direct import WAIT_FLOOR_S, Direct


class ObjectStore:
    """The vectors as arrays through Ray's object store: works across nodes."""

    name = "object-store"

    def __init__(self, size: int, dtype, servers: int, wait_s: float = WAIT_FLOOR_S,
                 edges: list[int] | None = None):
        self.size, self.dtype, self.wait_s = size, np.dtype(dtype), wait_s
        self.parts = cuts.striped(size, servers, edges)  # server s owns parts[s] of the flat vector

    def worker_end(self):
        from .store import StoreWorker
        return StoreWorker(self)

    def server_end(self, s: int):
        from .store import StoreServer
        return StoreServer(self, self.parts[s])


Transport = ObjectStore | Direct


def choose(name: str, size: int, dtype, servers: int, wait_s: float = WAIT_FLOOR_S,
           edges: list[int] | None = None) -> Transport:
    """The transport ``--transport name`` asks for (a validated Config's): ``object-store``, or
    the direct transport (``direct``, ``auto``), which reaches whichever nodes the workers land
    on, now or when they join; its actors wait on each other up to ``wait_s`` (``direct.peer_wait``).
    ``edges``: where each layer's range of the flat vector starts, then its end (``Layout.offsets``):
    each server gets a slice of every layer."""
    if name == "object-store":
        return ObjectStore(size, dtype, servers, wait_s, edges)
    return Direct(size, dtype, servers, wait_s, edges)
