"""How a step's vectors travel: the one module that knows their shape on the wire.

Per step, each server sends the workers its range of the new weights, and each worker task
sends each server that server's columns of its tree-node values (``(nodes, hi - lo)``).
Three transports carry them, with the same methods, so that actors and the crew never ask
which one runs:

- ``ObjectStore`` (the actors span nodes): the vectors are numpy arrays that Ray copies
  through its object store; a worker joins the S weight ranges into one buffer and returns
  S column blocks of its node values.
- ``SharedMemory`` (driver and actors on one node): the vectors live in files under
  ``/dev/shm`` (shm.py); the servers update their ranges of one weights file in place, the
  workers compute into rows of their own files, and only ``shm.Block`` handles (a path, a
  shape, a dtype) go through Ray.  No vector is copied.
- ``Sockets`` (across nodes): each server listens on its node's Ray
  address (channel.py: authenticated TCP); a worker pulls each server's weight range straight
  into its weight buffer and, once its nodes are computed, pushes each server its columns of
  them, waiting for the server to have them all before the call returns.  Only ``Handle``s
  (an address, a key) go through Ray.  Why push and not pull: once the worker's call has
  returned, the server holds its values, so a worker dying afterwards loses nothing (with
  the object store the values survive in the node's store too).
- ``socket+shared-memory`` (what ``auto`` picks on Linux): ``Sockets`` between nodes, and
  between a worker and a server of one node shared memory (a memfd of the actor that owns
  the array, mapped by the other: sockets.py), so that only the bytes between nodes are
  copied.  A worker that dies after its call returned takes its node values with it: the
  server's step then fails with the step's inputs lost, and the driver redoes the step.

A transport is made by the driver (``Session``, through ``choose``) and handed to every actor,
which makes its own end with ``worker_end()`` or ``server_end(s)``.  A worker end gives the
rows to compute into (``rows``) and then sends them (``send``).  The transport holds ``bounds``, the
servers' ranges of the flat vector: the one place they are decided (``cuts.aligned``).
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..lecture import cuts
from . import shm
from .sockets import Sockets


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

    def close(self) -> None:
        pass


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

    def hold(self, weights: np.ndarray) -> np.ndarray:
        """This server's range of the starting ``weights`` (the whole vector), as an array it owns."""
        return np.array(weights[self.bounds.start:self.bounds.stop])

    def publish(self, held: np.ndarray) -> np.ndarray:
        """What a step returns for the workers: the range itself."""
        return held

    def holds(self, steps: int) -> None:
        """Nothing to tell anyone: windows of steps (windows.py) run only on sockets."""

    def receive(self, parts: tuple) -> list[np.ndarray]:
        """Each task's node values for this server's columns."""
        return list(parts)


class SharedMemory:
    """The vectors in shared files under ``/dev/shm``: only when every process is on one node."""

    name = "shared-memory"
    windows = False

    def __init__(self, size: int, dtype, servers: int):
        self.size, self.dtype = size, np.dtype(dtype)
        self.bounds = cuts.aligned(size, servers)
        self.board = shm.open_board(size, dtype)

    def worker_end(self) -> _SharedWorker:
        return _SharedWorker(self)

    def server_end(self, s: int) -> _SharedServer:
        return _SharedServer(self.board, self.bounds[s])

    def close(self) -> None:
        """Remove the run's files (the driver calls it at the end of the run)."""
        shm.close_board(self.board)


class _SharedWorker:
    def __init__(self, transport: SharedMemory):
        self.maps = shm.Maps()
        self.servers = len(transport.bounds)
        self.out = shm.Rows(transport.board, self.maps, transport.size, transport.dtype)

    def weights(self, parts: tuple) -> np.ndarray:
        """The shared weights file, read in place: every server updates its range of it."""
        return self.maps.view(parts[0])

    def rows(self, step: int, count: int) -> np.ndarray:
        """Rows of a shared file of this worker's; each server reads its columns of them in place."""
        self.block, values = self.out.take(step, count)
        return values

    def send(self, values: np.ndarray) -> list:
        """The rows' handle, for every server."""
        return [self.block] * self.servers


class _SharedServer:
    def __init__(self, board: shm.Board, bounds: range):
        self.board, self.bounds, self.maps = board, bounds, shm.Maps()

    def hold(self, weights: np.ndarray) -> np.ndarray:
        """This server's range of the shared weights file, filled from ``weights`` (the whole vector)."""
        held = self.maps.view(self.board.weights, writable=True)[self.bounds.start:self.bounds.stop]
        np.copyto(held, weights[self.bounds.start:self.bounds.stop])
        return held

    def publish(self, held: np.ndarray) -> shm.Block:
        """The weights file's handle: the workers read every range of it in place."""
        return self.board.weights

    def holds(self, steps: int) -> None:
        """Nothing to tell anyone: windows of steps (windows.py) run only on sockets."""

    def receive(self, parts: tuple) -> list[np.ndarray]:
        """Each task's rows, this server's columns of them, read in place."""
        self.maps.retain({*parts, self.board.weights})
        return [self.maps.view(block)[:, self.bounds.start:self.bounds.stop] for block in parts]


Transport = ObjectStore | SharedMemory | Sockets


def choose(name: str, one_node: bool, size: int, dtype, servers: int) -> Transport:
    """The transport ``--transport name`` asks for; ``one_node``: the driver and every actor
    share one Ray node (only then can they share files).  ``auto``: where the system has memfds
    (Linux), ``socket+shared-memory`` on one node and across nodes, whose sockets let the steps
    go in windows without Ray calls (windows.py; measured faster on one node too, docs/performance.md);
    else shared files on one node, sockets across nodes."""
    if name == "auto":
        if shm.memfd_available():
            name = "socket+shared-memory"
        else:
            name = "shared-memory" if one_node and shm.available() else "socket"
    if name == "shared-memory":
        if not one_node:
            raise UsageError("--transport shared-memory needs the driver and every actor on one Ray node; "
                             "across nodes use socket or object-store")
        if not shm.available():
            raise UsageError(f"--transport shared-memory: {shm.ROOT} is not there or not writable")
        return SharedMemory(size, dtype, servers)
    if name == "socket+shared-memory":
        if not shm.memfd_available():
            raise UsageError("--transport socket+shared-memory needs memfds (Linux); use socket")
        return Sockets(size, dtype, servers, share_node=True)
    if name == "socket":
        return Sockets(size, dtype, servers)
    return ObjectStore(size, dtype, servers)
