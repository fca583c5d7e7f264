"""The object store's ends (transport.py): a step's vectors as arrays that Ray copies.

A worker asks a server for its range of the weights after a step with a Ray call to the server
(``ParameterServer.ask(Reached(...))``), answered once the server holds them with a reference
to the range, which the server puts in the object store once for all its workers; it hands in
its columns of a step's node values with another (``Hand``).  The first step of a window takes
the ranges the servers published (``Published``) from the call's arguments instead.  Those
calls run on the server's ``peers`` threads and meet its steps on the same board and inbox as
the direct transport's requests do (board.py, inbox.py).

The same door serves a pair of the direct transport whose server's socket the worker cannot
reach (``StoreDoor``; direct_worker.py decides that once per pair, at their first contact):
the object store is the way where the direct one is not available.

The async loop uses the object store differently: its workers get the weights as a call's
arguments and return their node values as its results (``send``, ``receive``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray
from ray.exceptions import GetTimeoutError

from ..lecture import cuts
from ..step.server import always
from .board import Board, CallOff, Sums
from .direct import PeerLost, Reached
from .inbox import Entry, Inbox, Late
from .runtime import ACTOR_LOST


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


def me():
    """The actor this runs in (None outside one: a test's end in the driver)."""
    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:
        return None


def got(refs: list, wait_s: float) -> list:
    """``ray.get`` of what servers answer a worker (``wait_s``: the servers' own deadline); PeerLost,
    as on the direct transport, if a server is gone or silent for twice that long."""
    try:
        return ray.get(refs, timeout=2 * wait_s)
    except (*ACTOR_LOST, GetTimeoutError) as exc:
        raise PeerLost(f"a server is gone or silent ({type(exc).__name__})") from None


def ask_weights(actors: list, ahead: tuple[int, int], wait_s: float) -> list[np.ndarray] | None:
    """Each server's range after ``steps`` steps of ``window`` (``ahead``), asked through Ray;
    None if a server says the window ended before; PeerLost if one is gone or silent."""
    answers = got([actor.ask.remote(Reached(*ahead, pull=False)) for actor in actors], wait_s)
    if any(r is None for r in answers):
        return None
    return got([r[0] for r in answers], wait_s)  # each server put its range once for all its workers


class StoreDoor:
    """A server end's answers to requests that come through Ray (``ParameterServer.ask``): a
    worker's ``Reached`` and ``Hand``, and the board's ``CallOff`` and ``Sums``.  ``end`` has the
    range (``weights``), its ``board`` and its ``inbox``."""

    def __init__(self, end):
        self.end = end
        self.put_at: tuple[int, object] | None = None  # (steps, ref): the range put in the store after those steps
        self.putting = threading.Lock()

    def answer(self, request: Reached | Hand | CallOff | Sums):
        if isinstance(request, Reached):
            return self._reached(request.window, request.steps)
        if isinstance(request, Hand):
            return self.end.inbox.file(request.key, Entry(request.step, request.rows, None, request.meta,
                                                          pooled=False))
        return self.end.board.answer(request)

    def _reached(self, window: int, steps: int) -> list | None:
        """``[ref]`` of the range after ``steps`` steps of ``window``, once the server holds them
        (put in the object store once, however many workers ask); None if the window ended before."""
        board = self.end.board
        if not board.reached(window, steps, pull=False):
            return None
        with self.putting:  # not the board's lock: the steps go on meanwhile
            if self.put_at is None or self.put_at[0] != board.steps:
                self.put_at = (board.steps, ray.put(self.end.weights))
            return [self.put_at[1]]


class StoreWorker:
    """A worker's end of the object store."""

    def __init__(self, transport):
        self.parts, self.dtype, self.wait_s = transport.parts, transport.dtype, transport.wait_s
        self.flat = np.empty(transport.size, transport.dtype) if len(self.parts) > 1 else None
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
            ranges = ask_weights([p.actor for p in parts], ahead, self.wait_s)
            if ranges is None:
                return None
        if self.flat is None:
            return ranges[0]
        for part, mine in zip(self.parts, ranges):  # one buffer, reused from call to call
            part.put(self.flat, mine)
        return self.flat

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
        if len(self.parts) == 1:
            return [values]
        return [part.take(values) for part in self.parts]

    def hand_in(self, values: np.ndarray, key: str, compute: Callable[[None, None], tuple]) -> tuple:
        """A window's step: ``compute(None, None)`` fills ``values`` and returns the step's ``meta`` (the
        micro-batches' ``Leaves``), which this returns; then each server gets its columns of
        ``values`` under ``key``, with ``meta``.  The answers are read at the call's end."""
        meta = compute(None, None)
        parts = self.send(values)
        self.handed += [p.actor.ask.remote(Hand(key, self.step, part, meta)) for p, part in zip(self.servers, parts)]
        return meta

    def read_answers(self) -> None:
        """Every hand-in of the call taken (PeerLost if a server is gone)."""
        handed, self.handed = self.handed, []
        got(handed, self.wait_s)


class StoreServer:
    """A server's end of the object store: its ``part`` of the flat vector."""

    def __init__(self, transport, part: cuts.Part):
        self.part = part
        self.weights: np.ndarray | None = None
        changed = threading.Condition(threading.Lock())  # one lock for both: a window's end ends their waits
        self.inbox = Inbox(len(part), transport.dtype, changed, transport.wait_s)
        self.board = Board(changed, transport.wait_s)
        self.door = StoreDoor(self)

    def own(self, weights: np.ndarray) -> np.ndarray:
        """This server's part of the starting ``weights`` (the whole vector), as an array it owns."""
        self.weights = np.array(self.part.take(weights))
        return self.weights

    def publish(self, weights: np.ndarray) -> Published:
        """What a step returns for the workers: the range itself, and where to ask for later ones."""
        return Published(me(), weights, self.board.steps)

    def applied(self, steps: int) -> None:
        self.board.applied(steps)

    def answer(self, request):
        """A peer's request (``ParameterServer.ask``)."""
        return self.door.answer(request)

    def collect(self, keys: list[str], step: int, n: int, nodes: list[list]) -> tuple | Late | None:
        """A window's step: the values and metas under ``keys`` (direct_server.DirectServer.collect)."""
        entries = self.inbox.shares(keys, n, nodes, lambda: self.board.over)
        if entries is None or isinstance(entries, Late):
            return entries
        self.inbox.recycle(entries, step)
        return [e.rows for e in entries], lambda: [e.meta for e in entries], always

    def receive(self, parts: tuple) -> list[np.ndarray]:
        """Each task's node values for this server's columns (the async loop)."""
        return list(parts)
