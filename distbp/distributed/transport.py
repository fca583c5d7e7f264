"""How a step's vectors travel: the one module that knows their shape on the wire.

Per step, each server gives the workers its range of the new weights, and each worker hands
each server that server's columns of its tree-node values (``(nodes, hi - lo)``) under a key the
driver chose (windows.py).  Two transports carry them, with the same methods, so that the
actors and the driver never ask which one runs:

- ``Direct`` (``--transport direct``, what ``auto`` picks): each worker-server pair decides how
  when they first meet: between nodes over an authenticated socket (channel.py), within a node
  through shared memory (a memfd of the actor that owns the array, mapped by the other).  Only
  handles go through Ray.  direct.py and the modules it names.
- ``ObjectStore`` (``--transport object-store``): the vectors are numpy arrays that Ray copies
  through its object store: a worker asks a server for its range after a step with a Ray call
  (``ParameterServer.ask(Reached(...))``; the server puts the range in the store once for all
  of them) and hands in its columns with another (``Hand``).  The reference path, and the
  async loop's (its workers read whatever weights the server holds, mid-update or not: they
  get them as arguments, ``send`` their node values as results, and the server ``receive``s them).

Both ends keep the same board (board.py: the step a server holds, its window) and inbox
(inbox.py: the node values handed in, by key), so a window's steps wait on the same things
whichever transport runs.  A transport is made by the driver (``Session``, through ``choose``)
and handed to every actor, which makes its own end with ``worker_end()`` or ``server_end(s)``.
The transport holds ``bounds``, the servers' ranges of the flat vector: the one place they are
decided (``cuts.aligned``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import ray
from ray.exceptions import GetTimeoutError

from ..lecture import cuts
from ..step.server import always
from .board import Board, CallOff, Sums
from .direct import WAIT_FLOOR_S, Direct, PeerLost, Reached
from .inbox import Entry, Inbox, Late
from .runtime import ACTOR_LOST


class ObjectStore:
    """The vectors as arrays through Ray's object store: works across nodes."""

    name = "object-store"

    def __init__(self, size: int, dtype, servers: int, wait_s: float = WAIT_FLOOR_S):
        self.size, self.dtype, self.wait_s = size, np.dtype(dtype), wait_s
        self.bounds = cuts.aligned(size, servers)  # server s owns bounds[s] of the flat vector

    def worker_end(self) -> _StoreWorker:
        return _StoreWorker(self)

    def server_end(self, s: int) -> _StoreServer:
        return _StoreServer(self, self.bounds[s])


@dataclass(frozen=True)
class Hand:
    """A worker's columns of a step's node values under ``key``, with ``meta`` (its ``Leaves``):
    the object store's hand-in (the direct transport's ``Push``)."""

    key: str
    step: int
    rows: np.ndarray
    meta: object


@dataclass(frozen=True)
class Published:
    """What a server gives out on the object store: its actor (for the steps of a window after
    the first) and its range of the weights after ``steps`` steps."""

    actor: object
    weights: np.ndarray
    steps: int


class _StoreWorker:
    def __init__(self, transport: ObjectStore):
        self.bounds, self.dtype, self.wait_s = transport.bounds, transport.dtype, transport.wait_s
        self.flat = np.empty(transport.size, transport.dtype) if len(self.bounds) > 1 else None
        self.out = np.empty((0, transport.size), dtype=transport.dtype)
        self.servers: tuple[Published, ...] = ()
        self.handed: list = []  # refs of the hand-ins of this call, read at its end (``read_answers``)
        self.step = 0

    def weights(self, parts: tuple[Published, ...], ahead: tuple[int, int] | None = None) -> np.ndarray | None:
        """The whole weight vector from the S servers' ranges: those in ``parts`` (what the
        servers published), or with ``ahead = (window, steps)`` those after ``steps`` steps of
        ``window``, asked of each server once ``parts`` are older (None if the window ended before)."""
        self.servers = parts
        ranges = [p.weights for p in parts]
        if ahead is not None and any(p.steps != ahead[1] for p in parts):
            try:
                got = ray.get([p.actor.ask.remote(Reached(*ahead, pull=False)) for p in parts],
                              timeout=2 * self.wait_s)
            except (*ACTOR_LOST, GetTimeoutError) as exc:  # as the direct transport's PeerLost
                raise PeerLost(f"a server is gone or silent ({type(exc).__name__})") from None
            if any(r is None for r in got):
                return None
            ranges = ray.get([r[0] for r in got])  # each server put its range once for all its workers
        if self.flat is None:
            return ranges[0]
        return np.concatenate(ranges, out=self.flat)  # one buffer, reused from call to call

    def rows(self, step: int, count: int) -> np.ndarray:
        """``count`` rows to compute node values into.

        The rows are a buffer reused from call to call: Ray copies an argument or a returned
        array into the object store when the call is made or returns.
        """
        self.step = step
        if len(self.out) < count:
            self.out = np.empty((count, self.out.shape[1]), dtype=self.dtype)
        return self.out[:count]

    def send(self, values: np.ndarray) -> list:
        """What to return to the S servers (the async loop): each its columns of the rows."""
        if len(self.bounds) == 1:
            return [values]
        return [values[:, r.start:r.stop] for r in self.bounds]

    def hand_in(self, values: np.ndarray, key: str, meta) -> None:
        """A window's step: each server gets its columns of ``values`` under ``key``, with ``meta``
        (the micro-batches' ``Leaves``); the answers are read at the call's end."""
        parts = self.send(values)
        self.handed += [p.actor.ask.remote(Hand(key, self.step, part, meta)) for p, part in zip(self.servers, parts)]

    def read_answers(self) -> None:
        """Every hand-in of the call taken (PeerLost if a server is gone)."""
        handed, self.handed = self.handed, []
        try:
            ray.get(handed, timeout=2 * self.wait_s)
        except (*ACTOR_LOST, GetTimeoutError) as exc:
            raise PeerLost(f"a server is gone or silent ({type(exc).__name__})") from None


class _StoreServer:
    def __init__(self, transport: ObjectStore, bounds: range):
        self.bounds = bounds
        self.weights: np.ndarray | None = None
        changed = threading.Condition(threading.Lock())  # one lock for both: a window's end ends their waits
        self.inbox = Inbox(bounds.stop - bounds.start, transport.dtype, changed, transport.wait_s)
        self.board = Board(changed, transport.wait_s)
        self.put_at: tuple[int, object] | None = None  # (steps, ref): the range put in the store after those steps
        self.putting = threading.Lock()

    def own(self, weights: np.ndarray) -> np.ndarray:
        """This server's range of the starting ``weights`` (the whole vector), as an array it owns."""
        self.weights = np.array(weights[self.bounds.start:self.bounds.stop])
        return self.weights

    def publish(self, weights: np.ndarray) -> Published:
        """What a step returns for the workers: the range itself, and where to ask for later ones."""
        return Published(ray.get_runtime_context().current_actor, weights, self.board.steps)

    def applied(self, steps: int) -> None:
        self.board.applied(steps)

    def answer(self, request: Reached | Hand | CallOff | Sums):
        """A peer's request (``ParameterServer.ask``): a worker's, or the board's to answer."""
        if isinstance(request, Reached):
            return self._reached(request.window, request.steps)
        if isinstance(request, Hand):
            return self.inbox.file(request.key, Entry(request.step, request.rows, None, request.meta, pooled=False))
        return self.board.answer(request)

    def _reached(self, window: int, steps: int) -> list | None:
        """``[ref]`` of the range after ``steps`` steps of ``window``, once the server holds them
        (put in the object store once, however many workers ask); None if the window ended before."""
        if not self.board.reached(window, steps, pull=False):
            return None
        with self.putting:  # not the board's lock: the steps go on meanwhile
            if self.put_at is None or self.put_at[0] != self.board.steps:
                self.put_at = (self.board.steps, ray.put(self.weights))
            return [self.put_at[1]]

    def collect(self, keys: list[str], step: int, n: int, nodes: list[list]) -> tuple | Late | None:
        """A window's step: the values and metas under ``keys`` (direct_server.DirectServer.collect)."""
        entries = self.inbox.shares(keys, n, nodes, lambda: self.board.over)
        if entries is None or isinstance(entries, Late):
            return entries
        self.inbox.recycle(entries, step)
        return [e.rows for e in entries], [e.meta for e in entries], always

    def receive(self, parts: tuple) -> list[np.ndarray]:
        """Each task's node values for this server's columns (the async loop)."""
        return list(parts)


Transport = ObjectStore | Direct


def choose(name: str, size: int, dtype, servers: int, wait_s: float = WAIT_FLOOR_S) -> Transport:
    """The transport ``--transport name`` asks for (a validated Config's): ``object-store``, or
    the direct transport (``direct``, ``auto``), which reaches whichever nodes the workers land
    on, now or when they join; its actors wait on each other up to ``wait_s`` (``direct.peer_wait``)."""
    if name == "object-store":
        return ObjectStore(size, dtype, servers, wait_s)
    return Direct(size, dtype, servers, wait_s)
