"""``metrics.jsonl``: one JSON object a line, written as steps finish, read back by resume,
plot and the scripts.  The one module that knows the file.

A training step's line has ``step``, ``epoch``, ``loss`` and ``time`` (plus ``lr``,
``grad_xxh3`` and timings in sync mode); an evaluation's line has ``step``, ``epoch`` and
``<split>_loss``/``<split>_accuracy``.  Lines are written whole and flushed one by one, so a
run that dies keeps every finished step; its last line may be cut short.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable

from ..errors import DataError, RunFailed
from .checkpoint import atomic_write

NAME = "metrics.jsonl"


def read(path: str) -> list[dict]:
    """Every record of ``path``, in order.  A last line without its newline (cut short by a run
    that died, or still being written) is skipped; any other bad line is a DataError."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a metrics file")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            raise DataError(f"{path}: not a regular file, not a metrics file")
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a metrics file (bytes that are not UTF-8)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    records = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
            _check(entry)
        except (ValueError, KeyError, TypeError, RecursionError):
            if number == len(lines):  # no newline yet: a line cut short or still being written
                break
            raise DataError(f"{path}: line {number} is not a metrics record") from None
        records.append(entry)
    return records


def _check(entry: dict) -> None:
    """ValueError/TypeError/KeyError unless ``entry`` is a record: an integer step >= 1, a finite time."""
    if not isinstance(entry, dict) or type(entry["step"]) is not int or entry["step"] < 1:
        raise ValueError("no step")
    time = entry.get("time", 0.0)
    if isinstance(time, bool) or not isinstance(time, int | float) or not math.isfinite(time):
        raise ValueError("bad time")
    if "loss" in entry and (isinstance(entry["loss"], bool) or not isinstance(entry["loss"], int | float)):
        raise ValueError("bad loss")
    if not isinstance(entry.get("grad_xxh3", ""), str):  # a resumed run compares its redone steps with it
        raise ValueError("bad grad_xxh3")


def steps(records: list[dict]) -> list[dict]:
    """The training steps' records (not the evaluations'), a step logged twice keeping its last line."""
    by_step = {r["step"]: r for r in records if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def trim(path: str, step: int) -> tuple[float, dict[int, str], list[dict]]:
    """Keep the records of ``path`` up to ``step``, so that the file reads as one run (a resumed
    run redoes the steps after its checkpoint).

    Returns the ``time`` of the last record kept (the resumed run's clock goes on from there),
    the gradient hashes of the steps dropped, to check the redone steps against, and the records
    kept (what a resumed run's noise scale is replayed from).
    """
    records = read(path) if os.path.exists(path) else []
    kept = [r for r in records if r["step"] <= step]
    dropped = {r["step"]: r["grad_xxh3"] for r in records if r["step"] > step and "grad_xxh3" in r}
    offset = max((float(r.get("time", 0.0)) for r in kept), default=0.0)
    atomic_write(path, lambda fh: fh.writelines(json.dumps(r) + "\n" for r in kept), mode="w")
    return offset, dropped, kept


class Writer:
    """Appends records to ``metrics.jsonl`` line by line: a crash keeps every finished step.

    A write that fails (a full disk, a read-only or immutable file, an I/O error) raises
    ``failed(exc)`` (by default a RunFailed naming the file and the error) and the run stops;
    the line may be cut short, and ``read`` skips such a last line.  ``close`` never raises:
    each line is flushed as it is written, so all it could fail on is the line already said.
    """

    def __init__(self, path: str, mode: str = "a", failed: Callable[[OSError], Exception] | None = None):
        self.path = path
        self.failed = failed or (lambda exc: RunFailed(f"cannot write {path} ({exc.strerror or exc})"))
        try:
            self.fh = open(path, mode, buffering=1)
        except OSError as exc:
            raise self.failed(exc) from None

    def write(self, record: dict) -> None:
        try:
            self.fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise self.failed(exc) from None

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as exc:
            raise self.failed(exc) from None

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:  # the failed line again (already said), or nothing of ours
            pass
