"""Stopping a run on SIGINT or SIGTERM: one line, status 128 + the signal, whatever it interrupts.

Two kinds of scope handle the signals (only from the main thread; elsewhere they do nothing):

- the step loop's, ``StopSignals()``: the first signal asks the loop to stop at the next step
  boundary, with a checkpoint (``signum``); a second one stops at once;
- the command's, ``StopSignals(at_once=True)``, held around a whole run (loading, Ray's start,
  the actors' start, the end): there the first signal already stops at once, since there is no
  step to finish.

Stopping at once raises ``Stopped`` (a KeyboardInterrupt: Ray lets those out of its waits) from
the handler, wherever the main thread is.  Ray may still catch or convert it (a KeyboardInterrupt
in ``ray.get`` comes out as a plain one), so what happened is also recorded here
(``stopped_at_once``) and the command reports the signal from that record whatever exception
reaches it.  Should the exception be lost altogether, or the cleanup on the way out hang, a
watchdog (armed only inside the command's scope, which owns the process) ends the process
``GRACE_S`` seconds later with the line and status; a third signal ends it at once.  What must
not be cut in the middle (Ray's start, the Ray side of a run's end: ``Session.close``) runs
``shielded()``: a signal during it is recorded, and acted on when it is done (the watchdog
gives it ``SHIELDED_GRACE_S``).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager

GRACE_S = 10.0  # from a stop at once to the end of the process, cleanup or not
SHIELDED_GRACE_S = 60.0  # ... while a shielded section runs (Ray starting or stopping: 10 s and more when busy)


class Stopped(KeyboardInterrupt):
    """Raised by a signal that stops the run at once; ``signum`` is that signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else ""


class _Record:
    """What the signals of this process's current run did (reset by the command's scope)."""

    def __init__(self):
        self.received: list[int] = []  # every stop signal, in order
        self.at_once: int | None = None  # the signal that stopped the run at once
        self.loop_began = False  # a step loop's scope was entered
        self.shield = 0  # depth of shielded() sections
        self.deferred: int | None = None  # a stop at once that waits for the shield to end
        self.said = False  # the stop's line is written
        self.lock = threading.Lock()
        self.describe: Callable[[], str] | None = None  # the line, as the command words it
        self.watchdog: threading.Event | None = None  # the command's scope is active until it is set


_record = _Record()


def stopped_at_once() -> int | None:
    """The signal that stopped the current run at once, if one did."""
    return _record.at_once


def received() -> list[int]:
    """The stop signals the current run received, in order."""
    return list(_record.received)


def loop_began() -> bool:
    """Whether the current run reached its step loop."""
    return _record.loop_began


def claim_line() -> bool:
    """True once: whoever gets it writes the stop's line (the command, or the watchdog)."""
    with _record.lock:
        first, _record.said = not _record.said, True
    return first


def _end_now() -> None:
    """Leave the process with the stop's line and status, without any more cleanup."""
    signum = (_record.received or [_record.at_once or signal.SIGTERM])[0]  # the status the command gives
    if claim_line():
        try:
            line = _record.describe() if _record.describe else f"distbp: stopped at once by {name(signum)}"
        except Exception:  # noqa: BLE001  (the line is a courtesy; the status must come out)
            line = f"distbp: stopped at once by {name(signum)}"
        try:
            os.write(2, (line + "\n").encode())
        except OSError:
            pass
    os._exit(128 + signum)


def _arm_watchdog() -> None:
    cancel = _record.watchdog
    if cancel is None:  # not inside the command's scope: a library caller's process is not ours to end
        return

    def watch():
        waited = 0.0
        while not cancel.wait(1.0):
            waited += 1.0
            if waited >= (SHIELDED_GRACE_S if _record.shield else GRACE_S):
                _end_now()

    threading.Thread(target=watch, name="distbp-stop-watchdog", daemon=True).start()


def stop_at_once(signum: int) -> None:
    """The run ends now: record it, arm the watchdog, raise ``Stopped`` (after the shield, if in one).

    Once it is ending, one more signal changes nothing (the cleanup goes on, the watchdog bounds
    it: two signals a moment apart are common), and the third signal of the run ends the
    process at once."""
    if _record.at_once is not None:
        if len(_record.received) < 3:
            return
        if _record.watchdog is not None:
            _end_now()
        raise Stopped(_record.at_once)
    _record.at_once = signum
    _arm_watchdog()
    if _record.shield:
        _record.deferred = signum
        return
    raise Stopped(signum)


@contextmanager
def shielded():
    """Run the block whole: a stop at once asked for inside it is raised when it ends."""
    _record.shield += 1
    try:
        yield
    finally:
        _record.shield -= 1
        if not _record.shield and _record.deferred is not None:
            signum, _record.deferred = _record.deferred, None
            raise Stopped(signum)


class StopSignals:
    """While active, SIGINT and SIGTERM stop the run: at the next step boundary (``signum`` is
    set; a second signal stops at once), or at once with ``at_once=True`` (the command's scope,
    whose ``describe`` words the line the watchdog writes if it has to end the process)."""

    def __init__(self, at_once: bool = False, describe: Callable[[], str] | None = None):
        self.at_once, self.describe = at_once, describe
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        _record.received.append(signum)
        if self.signum is None and not self.at_once and _record.at_once is None:
            self.signum = signum  # the loop checks it at the step boundary
            return
        stop_at_once(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        global _record
        if self.at_once or _record.watchdog is None:  # a new run: forget the last one's signals
            _record = _Record()
        if self.at_once:
            _record.watchdog, _record.describe = threading.Event(), self.describe
        else:
            _record.loop_began = True
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self.at_once and _record.watchdog is not None:
            _record.watchdog.set()  # the command has the exception: it says the line and returns
            _record.watchdog = None

    @property
    def name(self) -> str:
        return name(self.signum)


def restore_after(previous: dict[int, object]) -> None:
    """Put back handlers that a library (Ray's ``init``) replaced: ``previous`` is
    ``handlers()`` from before.  Only handlers someone chose (Python callables) are put back."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in previous.items():
        if callable(handler) and signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)


def handlers() -> dict[int, object]:
    """The current SIGINT and SIGTERM handlers."""
    return {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
