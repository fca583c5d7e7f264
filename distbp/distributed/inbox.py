"""A server's inbox of node values: pushes filed as they start, with how far each has come.

A worker hands a server its columns of a step's node values under a key: on the direct
transport pushed over a socket piece by piece from the top (``Entry.since``: from which column on
every row is in), or, from a worker of the server's node, as a handle of its shared memory
(``Entry.block``); on the object store as an array Ray delivered (``Entry.pooled`` false).  The
server's step takes the entries of its keys (``shares``) and may sum a chunk as soon as its
columns are in (``ready``).  Buffers of steps done with are reused for new
pushes, and entries of earlier steps (late copies nobody used) are dropped (``recycle``).

No Ray here: numpy and a condition variable shared with the server's board (board.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..lecture import tree
from ..step import plan
from . import shm

LATE_MIN_S = 0.5  # a window's step waits at least this long for a key before it is late


class Late:
    """What ``Inbox.wait`` gives for a window's step with a late key: the window ends there, and
    the crew hands the late share to another worker."""


def _late_at(keys: list[str], counts: list[int], came: dict[str, float]) -> float | None:
    """Seconds after the wait began at which the first key not there is late; None before any came."""
    if not came:
        return None
    size = dict(zip(keys, counts))
    pace = plan.pace_of([came[key] for key in came], [size[key] for key in came])
    return max(LATE_MIN_S, min(plan.late_after(pace, size[key]) for key in keys if key not in came))


@dataclass
class Entry:
    """Node values in a server's inbox: pushed ``rows``, or a ``block`` of a worker of its node."""

    step: int
    rows: np.ndarray | None
    block: shm.Region | None = None
    meta: tuple | None = None  # a window's step: (the micro-batches' errors, compute seconds)
    since: int = 0  # pushed rows: columns ``[since, width)`` of every row are in
    complete: bool = True  # pushed rows: all in, and the meta (until then a thread still writes ``rows``)
    pooled: bool = True  # ``rows`` is one of the inbox's buffers (``buffer``), reused once read


class Inbox:
    """The entries handed to one server (``width`` columns of ``dtype``), by key; a wait for
    them gives up after ``wait_s`` (the run's: ``Direct.wait_s``)."""

    def __init__(self, width: int, dtype, changed: threading.Condition, wait_s: float):
        self.width, self.dtype, self.changed, self.wait_s = width, np.dtype(dtype), changed, wait_s
        self.entries: dict[str, Entry] = {}
        self.spare: list[np.ndarray] = []  # buffers of steps done with, reused for new pushes
        self.taken: list[Entry] = []  # the pushed entries the last step read

    def buffer(self, rows: int) -> np.ndarray:
        """Room for a push of ``rows`` rows: a spare buffer, or a new one."""
        with self.changed:
            for i, buf in enumerate(self.spare):
                if len(buf) >= rows:
                    return self.spare.pop(i)[:rows]
        return np.empty((max(rows, 2), self.width), dtype=self.dtype)[:rows]

    def file(self, key: str, entry: Entry) -> None:
        with self.changed:
            self.entries[key] = entry
            self.changed.notify_all()

    def arrived(self, entry: Entry, since: int, meta: tuple | None = None) -> None:
        """Columns ``[since, width)`` of every row of a push are in; all of them, and its ``meta``,
        once ``since`` is 0."""
        with self.changed:
            entry.since = since
            if since == 0:
                entry.meta, entry.complete = meta, True
            self.changed.notify_all()

    def wait(self, keys: list[str], over: Callable[[], bool], counts: list[int]) -> list[Entry] | Late | None:
        """The entries of ``keys`` once each has started to come in; None if ``over()`` (the
        window is called off) or nothing came for ``wait_s`` before; ``Late`` (``counts``: each
        key's micro-batches) once a key that has not come is late by the crew's rule
        (``plan.late_after``, against the quickest key's pace since the wait began), and at
        least ``LATE_MIN_S`` after it began: arrivals carry transfer jitter a Ray call's
        compute time does not."""
        begun = time.monotonic()
        came: dict[str, float] = {}  # key -> seconds after the wait began that it was there

        def all_in() -> bool:
            return over() or all(key in self.entries for key in keys)

        with self.changed:
            while not all_in():
                now = time.monotonic()
                came.update({key: now - begun for key in keys if key in self.entries and key not in came})
                late_at = _late_at(keys, counts, came)  # None until a key has come
                if late_at is not None and now - begun >= late_at:
                    return Late()
                left = self.wait_s - (now - begun)
                if left <= 0:
                    return None
                self.changed.wait(left if late_at is None else min(left, late_at - (now - begun)))
            if over():
                return None
            return [self.entries.pop(key) for key in keys]

    def shares(self, keys: list[str], n: int, nodes: list[list], over: Callable[[], bool]) -> list[Entry] | Late | None:
        """A step's entries: those of ``keys``, the tasks' tree ``nodes`` over ``n`` micro-batches, each
        judged late against the others (``wait``)."""
        counts = [sum(hi - lo for lo, hi in (tree.span(node, n) for node in task)) for task in nodes]
        return self.wait(keys, over, counts)

    def ready(self, entries: list[Entry], over: Callable[[], bool]) -> Callable[[int, int], bool]:
        """``ready(lo, hi)`` for the server's sum (step/server.py): waits until columns ``[lo, hi)``
        of every pushed entry are in, or says no once ``over()`` (or after ``wait_s`` without them)."""
        pushed = [entry for entry in entries if not entry.complete]  # still coming in, piece by piece

        def ready(lo: int, hi: int) -> bool:
            with self.changed:
                return self.changed.wait_for(lambda: over() or all(e.since <= lo for e in pushed),
                                             timeout=self.wait_s) and not over()
        return ready

    def recycle(self, entries: list[Entry], step: int) -> None:
        """Step ``step`` reads ``entries``: the rows the step before read go back to the spare
        buffers, and entries of earlier steps (late copies nobody used) are dropped.  A buffer
        goes back only once no thread writes it (its push is complete)."""
        with self.changed:
            self.spare += [_whole(e.rows) for e in self.taken if e.complete]
            self.taken = [e for e in entries if e.block is None and e.pooled]
            for key in [k for k, e in self.entries.items() if e.step < step]:
                old = self.entries.pop(key)
                if old.rows is not None and old.complete and old.pooled:
                    self.spare.append(_whole(old.rows))


def _whole(rows: np.ndarray) -> np.ndarray:
    """The buffer ``rows`` was cut from (``Inbox.buffer``)."""
    return rows.base if rows.base is not None else rows
