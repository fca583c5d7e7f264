"""Which step a server holds, and which window of steps it runs: what its workers wait on.

A server's end of either transport answers a worker's "the weights after step v of window w,
please" once the board says it holds them, or no once that window is over or called off; while
a step is being applied, the chunks already updated can go out (``fresh``, the direct
transport's stream).  The step count is the server's own (``ServerState.t``): the state tells
the board each time it changes (``applied``), so the two cannot differ.  Under ``--clip-norm``
with S servers, each server's sums of squares of a step reach the others here (``add_sums``,
``sums``): the norm is of the whole gradient.

No Ray here: a condition variable, shared with the server's inbox (inbox.py), whose waits also
end when the window does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

# What a server's peers ask of its board outside its steps (``ParameterServer.ask``), on either transport.

@dataclass(frozen=True)
class CallOff:
    """The driver calls ``window`` off (something in it failed): the server ends its steps there."""

    window: int


@dataclass(frozen=True)
class Sums:
    """Server ``server``'s blocks' sums of squares of ``step`` of ``window`` (--clip-norm, S > 1)."""

    window: int
    step: int
    server: int
    sums: object


class Board:
    """The steps a server holds, its window, and the chunks of the step it is applying; a wait
    for them gives up after ``wait_s`` (the run's: ``Direct.wait_s``)."""

    def __init__(self, changed: threading.Condition, wait_s: float):
        self.changed, self.wait_s = changed, wait_s
        self.steps = 0  # the weights it holds are those after this many steps
        # the window it runs or ran last, whether that one is over, the highest one called off
        self.window, self.over, self.called_off = 0, True, 0
        self.fresh: dict[int, tuple[int, int]] = {}  # chunks updated since: start -> (stop, step)
        self.norms: dict[tuple[int, int], dict[int, object]] = {}  # (window, step) -> server -> its sums

    def applied(self, steps: int) -> None:
        """The server holds the weights after ``steps`` steps (a step applied, a checkpoint loaded)."""
        with self.changed:
            self.steps = steps
            self.fresh.clear()
            self.changed.notify_all()

    def updated(self, step: int, chunk: tuple[int, int]) -> None:
        """Entries ``chunk`` of the range hold the weights after ``step`` (while the rest is updated)."""
        with self.changed:
            self.fresh[chunk[0]] = (chunk[1], step)
            self.changed.notify_all()

    def begin_window(self, window: int) -> None:
        """Window ``window`` starts (windows.py): unless the driver has called it off already."""
        with self.changed:
            self.window, self.over = window, window <= self.called_off
            self.changed.notify_all()

    def end_window(self) -> None:
        """The window is over: a worker still waiting for a step it will not have is told so."""
        with self.changed:
            self.over = True
            self.changed.notify_all()

    def call_off(self, window: int) -> None:
        """The driver calls ``window`` off: the server ends its steps there."""
        with self.changed:
            self.called_off = max(self.called_off, window)
            self.over = self.over or self.window <= self.called_off
            self.changed.notify_all()

    def answer(self, request: CallOff | Sums) -> None:
        """A peer's request to the board (``ParameterServer.ask``)."""
        if isinstance(request, CallOff):
            self.call_off(request.window)
        else:
            self.add_sums(request.window, request.step, request.server, request.sums)

    def add_sums(self, window: int, step: int, server: int, sums) -> None:
        """Server ``server``'s blocks' sums of squares of step ``step`` of ``window``."""
        with self.changed:
            self.norms.setdefault((window, step), {})[server] = sums
            self.changed.notify_all()

    def sums(self, window: int, step: int, servers: int) -> list | None:
        """Every server's sums of squares of ``step`` of ``window``, in range order, once all
        ``servers`` are in; None if the window is called off (or they do not come within ``wait_s``)."""
        with self.changed:
            got = self.changed.wait_for(lambda: self.over or len(self.norms.get((window, step), ())) == servers,
                                        timeout=self.wait_s)
            parts = self.norms.pop((window, step), {})
            for key in [key for key in self.norms if key[0] < window]:  # windows called off
                del self.norms[key]
            if not got or self.over:
                return None
            return [parts[s] for s in range(servers)]

    def reached(self, window: int, steps: int, pull: bool) -> bool:
        """Whether the server comes to hold ``steps`` steps in ``window``: waits until it does
        (True), or until that window is over, called off or past without it (False).  With
        ``pull``, until it starts updating step ``steps``: ``next_chunk`` gives the chunks as
        they are done."""
        def there() -> bool:
            return self.steps >= steps or (pull and any(step >= steps for _, step in self.fresh.values()))

        def known() -> bool:
            return there() or self.window > window or self.called_off >= window or \
                (self.window == window and self.over)
        with self.changed:
            self.changed.wait_for(known, timeout=self.wait_s)
            return there()

    def next_chunk(self, at: int, steps: int, width: int) -> int:
        """Where the run of entries from ``at`` that holds the weights after ``steps`` steps ends,
        waiting until it does (the whole range's end once the step is applied); EOFError if
        that does not come within ``wait_s``."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.steps >= steps or self.fresh.get(at, (0, -1))[1] >= steps,
                                         timeout=self.wait_s):
                raise EOFError(f"the weights after step {steps} did not come within {self.wait_s:g} s "
                               "(--elastic-timeout)")  # the worker's PeerLost
            return width if self.steps >= steps else self.fresh[at][0]
