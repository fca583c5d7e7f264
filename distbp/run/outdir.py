"""A run's directory and the files in it, as the loops write them.

``RunFiles`` makes the directory (refusing one that already holds results), appends to
``metrics.jsonl``, writes ``checkpoint.npz`` atomically and knows the step of the one on
disk, and writes ``summary.json`` at the end.  A run that fails before its first step
leaves no directory behind (``close``).

One run at a time: ``create`` and ``reopen`` take an exclusive lock on ``<out>/.lock``
(flock, non-blocking) before anything else happens, Ray included, and ``close`` lets it go.
Without it a second run on the same ``--out`` passed the "not empty" check while the first
was still starting Ray, and a ``--resume`` of a live run trimmed its metrics.jsonl under it.
The lock file names its holder (pid, host, start time) for the refusal's message.  The
kernel drops a flock when its process dies, so a crashed run's leftover ``.lock`` blocks
nothing; ``close`` removes the file, so a finished run's directory holds only its results.

``--keep-checkpoints N`` (Ray Train's ``num_to_keep``): ``checkpoint.npz`` stays the latest
checkpoint, the one ``--resume``, ``Result.from_path`` and ``Network.from_checkpoint`` read,
and each save also leaves ``checkpoint-<step>.npz``, the same file (a hard link: no second
copy on disk), of which the newest N are kept.  Each name appears whole or not at all: the
link is made under a temporary name and renamed into place.

A run that began and then failed leaves ``error.json`` (its one line, the error's class, the
step of its last checkpoint) for ``Result.error``; a resume removes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from contextlib import suppress

import numpy as np

from ..errors import DistbpError, Diverged, RunFailed, UsageError, one_line
from . import checkpoint, metrics, remote

CHECKPOINT = "checkpoint.npz"
SUMMARY = "summary.json"
ERROR = "error.json"  # why a run that began did not finish (Result.error)
LOCK = ".lock"


def _flag(resuming: bool) -> str:
    return "--resume" if resuming else "--out"


def _holder(fd: int) -> str:
    """Who holds the lock on ``fd``, as its lock file says (a holder that has only just taken
    it writes its name a moment later: wait a little for it)."""
    for _ in range(50):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode())
            return f"distbp pid {int(info['pid'])} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            time.sleep(0.01)
    return "another distbp run"


def holder(directory: str) -> str | None:
    """Who holds the lock on the run in ``directory`` (None when no process does).  Takes
    nothing and creates nothing: a read-only look, for refusing early with the holder's name;
    ``RunFiles.reopen`` takes the lock itself."""
    try:
        fd = os.open(os.path.join(directory, LOCK), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock(directory: str, resuming: bool) -> tuple[int, bool]:
    """An exclusive lock on ``directory``'s lock file: its descriptor, and whether this call
    made the file.  UsageError naming the holder if a live process has it; OSError if the
    file cannot be made."""
    path = os.path.join(directory, LOCK)
    for _ in range(1000):  # each turn another process removed the file between our open and our lock
        try:
            fd, made = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), True
        except FileExistsError:
            try:  # O_NOFOLLOW: the holder's name is written into it, never through a link elsewhere
                fd, made = os.open(path, os.O_RDWR | os.O_NOFOLLOW), False
            except FileNotFoundError:  # its holder removed it just now: make it again
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise UsageError(f"{_flag(resuming)} {directory} is in use by {who}") from None
        except OSError:
            os.close(fd)
            raise
        # A holder removes the file (in close) before it lets go: a lock taken on the file it
        # removed locks nothing anyone else will open.  Only the file at ``path`` counts.
        try:
            current = os.lstat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            return fd, made
        os.close(fd)
    raise UsageError(f"{_flag(resuming)} {directory}: cannot lock it (its lock file keeps changing)")


def _sign(fd: int) -> None:
    """Write this process's name into the lock file it holds, for the message of those refused."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _unlock(directory: str, fd: int) -> None:
    """Remove the lock file, then let the lock go (in that order: see ``_lock``)."""
    with suppress(OSError):
        os.unlink(os.path.join(directory, LOCK))
    os.close(fd)


def sweep(directory: str) -> list[str]:
    """Remove what a writer killed mid-write left in ``directory``: ``atomic_write``'s temporary
    files.  Only with the lock held: then no live writer can own them."""
    removed = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(checkpoint.TMP_PREFIX) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
                removed.append(name)
            except OSError:
                pass
    return removed


def kept(directory: str, up_to: int | None = None) -> list[int]:
    """The steps of the ``checkpoint-<step>.npz`` files in ``directory`` (up to step ``up_to``), in order."""
    steps = [int(m.group(1)) for m in map(checkpoint.KEPT.fullmatch, os.listdir(directory)) if m]
    return sorted(s for s in steps if up_to is None or s <= up_to)


def make_out_dir(path: str | None) -> tuple[str, str | None, int]:
    """Create the results directory and lock it; refuse one that already holds results.

    Returns the path, the topmost directory created for it (None if it was there), which the
    run removes again if it fails before training begins (nothing half-made is left), and the
    lock's descriptor.  The lock is taken before the directory is checked for emptiness, so of
    two runs started on one directory at once only one can pass.
    """
    path = path or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} already exists and is not empty; choose a new directory "
                         f"(or --resume {path} to continue it)")
    created, parent = None, os.path.abspath(path)
    while not os.path.exists(parent):
        created, parent = parent, os.path.dirname(parent)
    fd = None
    try:
        os.makedirs(path, exist_ok=True)
        fd, made = _lock(path, resuming=False)
        # The lock file of a run that crashed is no result: a directory holding only it is empty.
        if [name for name in os.listdir(path) if name != LOCK]:
            if made:
                _unlock(path, fd)
            else:  # someone's crashed run: leave its directory exactly as it was
                os.close(fd)
            fd = None
            raise UsageError(f"--out {path} already exists and is not empty; choose a new directory "
                             f"(or --resume {path} to continue it)")
        probe = os.path.join(path, ".write-test")
        open(probe, "w").close()
        os.unlink(probe)
        _sign(fd)
    except OSError as exc:
        if fd is not None:
            _unlock(path, fd)
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None
    return path, created, fd


def write_failed(files: RunFiles, exc: OSError, name: str = metrics.NAME) -> RunFailed:
    """The one line for a failed write of ``name`` in the run of ``files``: the file, the error,
    the checkpoint kept."""
    kept = (f"the checkpoint of step {files.saved_step} is intact: continue with: distbp train --resume "
            f"{files.shown()}") if files.saved_step else "no checkpoint was written"
    return RunFailed(f"cannot write {files.shown(name)} ({exc.strerror or exc}); {kept}")


def record_error(path: str, exc: DistbpError, step: int) -> None:
    """error.json: the run in ``path`` stops on ``exc``; best effort (a full disk must not hide ``exc``)."""
    try:
        checkpoint.write_json(os.path.join(path, ERROR), {"error": one_line(exc), "kind": type(exc).__name__,
                                                          "step": step})
    except OSError:
        pass


class RunFiles:
    """The files of one run in ``path``: ``saved_step`` is the step of the checkpoint on disk.

    Holds the directory's lock from ``create``/``reopen`` to ``close``; ``data_fingerprint``
    (``checkpoint.fingerprint`` of the training data) goes into every checkpoint it saves.
    """

    def __init__(self, path: str, created: str | None, saved_step: int, lock_fd: int | None = None,
                 data_fingerprint: str | None = None):
        self.path, self.created, self.saved_step = path, created, saved_step
        self.checkpoint = os.path.join(path, CHECKPOINT)
        self.metrics_path = os.path.join(path, metrics.NAME)
        self.data_fingerprint = data_fingerprint
        self.log: metrics.Writer | None = None
        # Told of each checkpoint, of the summary and of the close, in that order: the reporters
        # (report.py), the timeline (spans.py) and, last, the upload to a URL (remote.py).
        self.watchers: list = remote.watchers(path)
        # A file object, not a bare descriptor: should the loop drop a RunFiles without closing
        # it, the garbage collector still lets the lock go.
        self._lock = os.fdopen(lock_fd, "rb", buffering=0) if lock_fd is not None else None
        self._closed = False

    @classmethod
    def create(cls, path: str | None, data_fingerprint: str | None = None) -> RunFiles:
        """A new run's directory (``runs/<timestamp>`` when ``path`` is None), locked."""
        path, created, fd = make_out_dir(path)
        return cls(path, created, 0, fd, data_fingerprint)

    @classmethod
    def reopen(cls, path: str, step: int, data_fingerprint: str | None = None) -> RunFiles:
        """The directory of a run being resumed from its checkpoint of step ``step``, locked, and
        rid of the temporary files of a writer killed mid-write."""
        fd = None
        try:
            fd, _ = _lock(path, resuming=True)
            _sign(fd)
        except OSError as exc:
            if fd is not None:
                _unlock(path, fd)
            raise UsageError(f"--resume {path}: cannot write there ({exc.strerror or exc})") from None
        sweep(path)
        with suppress(FileNotFoundError):  # the run goes on: what stopped it before is past
            os.unlink(os.path.join(path, ERROR))
        return cls(path, None, step, fd, data_fingerprint)

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if isinstance(exc, DistbpError) and self.log is not None:  # the run began: say why it stops
            record_error(self.path, exc, self.saved_step)
        self.close()

    def open_log(self) -> tuple[float, dict[int, str], list[dict]]:
        """Start appending to metrics.jsonl: the run has begun.  A resumed run first drops the
        lines past its checkpoint (they are redone); returns ``metrics.trim``'s ``time`` offset,
        hashes of the lines dropped and records kept."""
        offset, dropped, kept = 0.0, {}, []
        if self.saved_step:
            try:
                offset, dropped, kept = metrics.trim(self.metrics_path, self.saved_step)
            except OSError as exc:  # written aside and renamed (atomic_write): the file is as it was
                raise write_failed(self, exc) from None
        self.log = metrics.Writer(self.metrics_path, failed=lambda exc: write_failed(self, exc))
        return offset, dropped, kept

    def save(self, step: int, arrays: dict[str, np.ndarray], config: dict) -> None:
        """checkpoint.npz after step ``step`` from the servers' ``arrays`` (weights and optimizer
        buffers), atomically, every metrics line up to it on disk first; never non-finite weights."""
        self.log.flush()
        optimizer = dict(arrays)
        flat = optimizer.pop("weights")
        if not np.isfinite(flat).all():
            raise Diverged(f"training diverged at step {step}: the weights are no longer finite")
        try:
            checkpoint.save(self.checkpoint, flat, optimizer, step, config, self.data_fingerprint)
        except OSError as exc:
            raise RunFailed(f"cannot write {self.checkpoint} ({exc.strerror or exc}); "
                            "the previous checkpoint is intact") from None
        self.saved_step = step
        if config.get("keep_checkpoints"):
            self._keep(step, config["keep_checkpoints"])
        for watcher in self.watchers:
            watcher.saved(self, step)

    def _keep(self, step: int, count: int) -> None:
        """checkpoint-<step>.npz: checkpoint.npz under its step's name; then only the newest
        ``count`` such files of steps up to ``step`` are left.  Later steps' files (from a run
        resumed from an older checkpoint put back as checkpoint.npz) stay until redone."""
        path = os.path.join(self.path, f"checkpoint-{step}.npz")
        try:
            checkpoint.link_or_copy(self.checkpoint, path)
        except OSError as exc:
            raise RunFailed(f"cannot write {path} ({exc.strerror or exc}); {self.checkpoint} of step {step} "
                            "is intact") from None
        for old in kept(self.path, up_to=step)[:-count]:
            try:
                os.unlink(os.path.join(self.path, f"checkpoint-{old}.npz"))
            except FileNotFoundError:
                pass

    def shown(self, name: str = "") -> str:
        """``name`` in the run as the user finds it: under the URL the run is staged here for
        (remote.py), else under this directory; the run itself with no name."""
        where = remote.url_of(self.path) or self.path
        return f"{where.rstrip('/')}/{name}" if name else where

    def latest(self, initial: dict) -> tuple[dict[str, np.ndarray], int]:
        """The arrays and step of the checkpoint on disk, else of ``initial`` (the run's start)."""
        saved = checkpoint.load(self.checkpoint) if os.path.exists(self.checkpoint) else initial
        return {"weights": saved["weights"], **saved["optimizer"]}, saved["step"]

    def write_summary(self, summary: dict) -> None:
        try:
            checkpoint.write_json(os.path.join(self.path, SUMMARY), summary)
        except OSError as exc:
            raise write_failed(self, exc, SUMMARY) from None
        for watcher in self.watchers:
            watcher.summarised(self, summary)

    def close(self) -> None:
        """Close the log and let the directory's lock go; a run that never began (no log opened)
        removes the directory it made.  Safe to call again."""
        if self._closed:
            return
        self._closed = True
        if self.log is not None:
            self.log.close()
        for watcher in self.watchers:
            watcher.closed(self)
        if self.log is None and self.created:
            shutil.rmtree(self.created, ignore_errors=True)
        if self._lock is not None:
            try:  # the file first, then the lock: see _lock
                os.unlink(os.path.join(self.path, LOCK))
            except OSError:
                pass
            self._lock.close()
            self._lock = None
