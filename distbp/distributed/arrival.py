"""How far a step's weights are in, at a worker of the direct transport (direct_worker.py).

A worker asks each server for the weights after the step before, on a thread of its own per
server: a server of another node answers as it starts its update and sends its part chunk by
chunk as each holds its new weights; one of the worker's node answers once its update is done,
and the worker copies the part from its memory.  ``Arrival`` is what those threads tell and the
step's compute reads (step/worker.py): the compute starts its forward pass on layer 1 as soon as
layer 1's weights are in, and waits for each layer above until it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..lecture.cuts import Part
from .direct import PeerLost


class Arrival:
    """How far the weights of a step are in, server by server, as the link threads take them in
    (``DirectWorker._pull``): the compute waits for the columns it reads next (step/worker.py).
    A wait ends with PeerLost when a pull failed, or after twice the servers' deadline."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.changed = threading.Condition(threading.RLock())
        self.upto: dict[range, int] = {}  # a run of a server's part -> the end of what is in
        self.answers: list[bool] = []  # each server's yes or no, as they come
        self.parts = 0  # the servers the weights come from
        self.error: BaseException | None = None
        self.wanted = 0  # the columns the compute waits for (0: it does not): only their coming wakes it

    def expect(self, parts: list[Part]) -> None:
        """A step's weights start to come, in the runs of ``parts`` (the others are in already)."""
        with self.changed:
            self.upto, self.answers, self.error = {r: r.start for part in parts for r in part.runs}, [], None
            self.parts = len(parts)

    def answer(self, yes: bool) -> None:
        """One server's answer."""
        with self.changed:
            self.answers.append(yes)
            self.changed.notify_all()

    def came(self, r: range, stop: int) -> None:
        with self.changed:
            self.upto[r] = stop
            if self.wanted and self._in(self.wanted):
                self.changed.notify_all()

    def into(self, r: range) -> Callable[[int], None]:
        """What a receive into run ``r`` calls with the entries in so far (``channel.recv_array``)."""
        return lambda n: self.came(r, r.start + n)

    def fail(self, error: BaseException) -> None:
        with self.changed:
            self.error = error
            self.changed.notify_all()

    def answered(self) -> bool:
        """Whether every server said yes, once all have answered."""
        self._wait(lambda: len(self.answers) == self.parts, "the servers' answers")
        return all(self.answers)

    def has(self, columns: int) -> bool:
        """Whether columns ``[0, columns)`` are in."""
        with self.changed:
            return self._in(columns)

    def wait(self, columns: int) -> None:
        """Until columns ``[0, columns)`` are in."""
        with self.changed:  # reentrant: ``_wait`` takes it again
            self.wanted = columns
            try:
                self._wait(lambda: self._in(columns), f"the weights' first {columns} entries")
            finally:
                self.wanted = 0

    def _in(self, columns: int) -> bool:
        return all(stop >= min(columns, r.stop) for r, stop in self.upto.items() if r.start < columns)

    def _wait(self, there: Callable[[], bool], what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.error is not None or there(), timeout=2 * self.wait_s):
                raise PeerLost(f"{what} did not come within {2 * self.wait_s:g} s")
            if self.error is not None:
                raise PeerLost(f"the weights cannot be had: {self.error}")
