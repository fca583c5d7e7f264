"""``--out`` and ``--resume`` as fsspec URLs (``s3://bucket/run``, ``gs://...``, ``file://...``).

As Ray Train's ``storage_path``: the run writes its files in a local staging directory (under
``~/.cache/distbp/staging/``, with everything ``RunFiles`` guarantees there: the lock, atomic
checkpoints) and ``Upload`` copies them to the URL after each checkpoint and at the end; a
``--resume URL`` first downloads the run's top-level files into a new staging directory.

A staging directory goes once its files are at the URL.  One whose process was killed would stay
for ever, so each is made locked (``locked_tempdir``: a flock on the directory itself, held until
it goes or its process dies) and the next staging removes those no live process holds
(``sweep_stale``), except those kept on purpose: one whose upload failed and whose error named
it (``KEEP``), or one a ``distbp train --resume`` runs in.  ``distbp convert`` sweeps its own
``.DIR.*.converting`` the same way.

What a reader of the URL sees, whenever it looks:

- every object whole: an object store (S3, GCS) makes an upload visible only once it is
  complete, so a file is put straight to its key; on other filesystems (``file://``, ...) it
  is put beside its key under a temporary name and then moved over it;
- a ``checkpoint.npz`` only after the ``metrics.jsonl`` that reaches its step (what
  ``--resume`` checks), and ``summary.json`` (the run is finished) only after everything else.

The files under ``tensorboard/`` are new files that are only ever appended to, so a resumed
run does not download them: it adds its own.  Two runs on one URL at once are not refused
(an object store has no lock): give each run its own URL.  Endpoint and credentials come
from the filesystem's usual environment (for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, or ``~/.aws``).
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager

from ..errors import RunFailed, UsageError, one_line
from .checkpoint import KEPT, TMP_PREFIX, write_json

# Filesystems whose objects appear whole once uploaded (no temporary key needed), and the
# module (and pip extra) each needs.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs"}
NEEDS = {"s3": ("s3fs", 'pip install -e ".[s3]"'), "s3a": ("s3fs", 'pip install -e ".[s3]"'),
         "gs": ("gcsfs", "pip install gcsfs"), "gcs": ("gcsfs", "pip install gcsfs")}
STAGING = os.path.join(os.path.expanduser("~"), ".cache", "distbp", "staging")
STAGED = re.compile(r"run-[a-z0-9_]{8}")  # tempfile.mkdtemp's names: 8 of [a-z0-9_]
KEEP = ".kept"  # in a staging directory whose upload failed: its files are the user's now
LAST = ("checkpoint.npz", "summary.json")  # uploaded after every other file, in this order
SKIP = (".lock", TMP_PREFIX, KEEP)  # outdir.py's lock, atomic_write's temporary files, the mark: never uploaded

_uploads: dict[str, Upload] = {}  # staging directory -> its upload, for the RunFiles made there
_urls: dict[str, str] = {}  # every staging directory of this process -> its URL, for messages
_locks: dict[str, int] = {}  # staging directory -> the descriptor holding its lock (locked_tempdir)


def is_url(path: str | None) -> bool:
    """True for ``scheme://...`` (a Windows drive or a plain path is not a URL)."""
    return bool(path) and "://" in path and len(path.split("://", 1)[0]) > 1


def filesystem(url: str, flag: str):
    """The fsspec filesystem of ``url`` and the path in it; UsageError naming what to install."""
    scheme = url.split("://", 1)[0].lower()
    module, install = NEEDS.get(scheme, ("fsspec", 'pip install -e ".[s3]"'))
    if importlib.util.find_spec("fsspec") is None or importlib.util.find_spec(module) is None:
        raise UsageError(f"{flag} {url} needs {module}: {install}")
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"{flag} {url}: {one_line(exc)}") from None


def _listing(fs, path: str, flag: str, url: str) -> list[dict]:
    """The entries right under ``path`` (none if there is nothing there); UsageError if unreachable."""
    try:
        return fs.ls(path, detail=True, refresh=True) if fs.exists(path) else []
    except FileNotFoundError:
        return []
    except Exception as exc:  # no such bucket, no credentials, no endpoint: the filesystem's own words
        raise UsageError(f"{flag} {url}: cannot reach it ({one_line(exc)})") from None


def _atomic(fs) -> bool:
    """Whether ``fs`` is an object store: an object appears whole once its upload completes."""
    return bool(set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) & OBJECT_STORES)


def locked_tempdir(prefix: str, suffix: str, parent: str) -> tuple[str, int]:
    """A new directory in ``parent`` (``tempfile.mkdtemp``) and a descriptor holding an exclusive
    flock on it: while the descriptor is open (the kernel closes it when the process dies) no
    ``sweep_stale`` removes it.  OSError if it cannot be made."""
    for _ in range(100):
        path = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
        try:  # a sweep that locks it before we do removes it: then make another
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.lstat(path)):  # not removed before our lock
                return path, fd
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)
    raise OSError(errno.EAGAIN, f"cannot lock a new directory in {parent}")


def sweep_stale(parent: str, names: re.Pattern, keep=None) -> list[str]:
    """Remove the directories in ``parent`` named ``names`` whose lock (``locked_tempdir``) no
    process holds: what a killed process left.  ``keep(path)`` spares more; links are left alone."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in filter(names.fullmatch, entries):
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, a link or not a directory: not one of ours
            continue
        try:  # held to the end of the removal, so that no writer takes it meanwhile
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.lstat(path)) and not (keep and keep(path)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        except OSError:  # BlockingIOError: a live process holds it
            pass
        finally:
            os.close(fd)
    return removed


def _kept(path: str) -> bool:
    """A staging directory to keep although no staging holds it: its failed upload named it, or a
    ``distbp train --resume`` of it is running (outdir.py's lock)."""
    from .outdir import holder  # outdir imports this module

    return os.path.lexists(os.path.join(path, KEEP)) or holder(path) is not None


def _stage() -> str:
    """A new staging directory, locked, after removing those of killed runs."""
    os.makedirs(STAGING, exist_ok=True)
    sweep_stale(STAGING, STAGED, keep=_kept)
    local, fd = locked_tempdir("run-", "", STAGING)
    _locks[local] = fd
    return local


def discard(local: str) -> None:
    """Remove the staging directory ``local``, then let its lock go."""
    shutil.rmtree(local, ignore_errors=True)
    fd = _locks.pop(local, None)
    if fd is not None:
        os.close(fd)


def stage(url: str) -> str:
    """A new run to ``url``: checked to hold nothing yet; returns the local directory to run in."""
    fs, path = filesystem(url, "--out")
    if _listing(fs, path, "--out", url):
        raise UsageError(f"--out {url} already exists and is not empty; choose a new URL "
                         f"(or --resume {url} to continue it)")
    probe = f"{path.rstrip('/')}/.write-test-{os.getpid()}"
    try:  # no bucket, no credentials, no right to write: said now, not after the first checkpoint
        if not _atomic(fs):  # a filesystem with real directories (an object store has none to make)
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as exc:
        raise UsageError(f"--out {url}: cannot write there ({one_line(exc)})") from None
    local = _stage()
    _uploads[local] = Upload(url, fs, path, local)
    return local


def fetch(url: str, flag: str = "--resume", needs: str = "checkpoint.npz") -> str:
    """The top-level files of the run at ``url`` (it must hold ``needs``) in a new local directory."""
    fs, path = filesystem(url, flag)
    entries = [e for e in _listing(fs, path, flag, url) if e["type"] == "file"]
    names = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["name"] for e in entries}
    if needs not in names:
        raise UsageError(f"{flag} {url}: there is no {needs} in it" +
                         (" to continue from" if flag == "--resume" else " (not a distbp run)"))
    local = _stage()
    try:
        for name, key in names.items():
            if not name.startswith(SKIP):
                fs.get_file(key, os.path.join(local, name))
    except Exception as exc:
        discard(local)
        raise UsageError(f"{flag} {url}: cannot download it ({one_line(exc)})") from None
    return local


def download(url: str) -> str:
    """The run at ``url``, for ``--resume``: a local directory to go on in, uploading to ``url``."""
    local = fetch(url)
    fs, path = filesystem(url, "--resume")
    upload = _uploads[local] = Upload(url, fs, path, local)
    upload.mark_all()  # what was downloaded is there already
    return local


@contextmanager
def discarded_unless_begun(local: str):
    """Inside: a run in the staging directory ``local``.  If it never began (a bad option or data
    found after the staging was made), the directory goes on the way out: nothing is left."""
    try:
        yield
    finally:
        if _uploads.pop(local, None) is not None:  # Upload.closed unregisters a run that began
            discard(local)


def watchers(local: str) -> list:
    """What a RunFiles made in ``local`` tells of its checkpoints, summary and close (outdir.py)."""
    upload = _uploads.get(os.path.abspath(local)) or _uploads.get(local)
    return [upload] if upload is not None else []


def url_of(local: str) -> str | None:
    """The URL a staging directory uploads to (None for an ordinary directory)."""
    return _urls.get(os.path.abspath(local))


def in_words(message: str) -> str:
    """``message`` with each staging directory named by its URL (a stopped run's "continue with")."""
    for local, url in _urls.items():
        message = message.replace(local, url)
    return message


class Upload:
    """Copies a staging directory's files to the URL, each changed file once, in a safe order."""

    def __init__(self, url: str, fs, path: str, local: str):
        self.url, self.fs, self.root, self.local = url, fs, path.rstrip("/"), local
        _urls[local] = url
        self.sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) uploaded
        self.atomic = _atomic(fs)
        self.finished = False
        self.failed = False  # an upload failed: the run ends with that error; close does not retry

    def _files(self) -> list[str]:
        out = []
        for folder, _, names in os.walk(self.local):
            for name in names:
                if not name.startswith(SKIP):
                    out.append(os.path.relpath(os.path.join(folder, name), self.local))
        # the checkpoint, then the summary, after everything else
        return sorted(out, key=lambda rel: (LAST.index(rel) + 1 if rel in LAST else 0, rel))

    def _stamp(self, rel: str) -> tuple[int, int]:
        st = os.stat(os.path.join(self.local, rel))
        return st.st_size, st.st_mtime_ns

    def mark_all(self) -> None:
        for rel in self._files():
            self.sent[rel] = self._stamp(rel)

    def _put(self, rel: str) -> None:
        source, key = os.path.join(self.local, rel), f"{self.root}/{rel}"
        if self.atomic:  # the object appears whole when its upload completes
            self.fs.put_file(source, key)
            return
        parent, name = key.rsplit("/", 1)
        tmp = f"{parent}/.{name}.tmp-{os.getpid()}"
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.put_file(source, tmp)
        self.fs.mv(tmp, key)

    def sync(self, but: tuple[str, ...] = ()) -> None:
        """Upload every file changed since its last upload (except ``but``), in the safe order."""
        for rel in self._files():
            if rel in but:
                continue
            stamp = self._stamp(rel)
            if self.sent.get(rel) != stamp:
                try:
                    self._put(rel)
                except Exception as exc:
                    self.failed = True
                    self._keep()
                    raise RunFailed(f"cannot upload {rel} to {self.url} ({one_line(exc)}); the run's files are "
                                    f"kept in {self.local}") from None
                self.sent[rel] = stamp

    def _keep(self) -> None:
        """Mark the staging directory as the user's: the error names it, no sweep removes it."""
        try:
            open(os.path.join(self.local, KEEP), "w").close()
        except OSError:
            pass

    def prune(self) -> None:
        """Remove at the URL the ``checkpoint-<step>.npz`` that ``--keep-checkpoints`` removed here
        (after the newer ones are up), so the URL keeps the same N as the directory."""
        gone = [rel for rel in self.sent if KEPT.fullmatch(rel) and not os.path.exists(os.path.join(self.local, rel))]
        for rel in gone:
            try:
                self.fs.rm_file(f"{self.root}/{rel}")
            except FileNotFoundError:
                pass
            except Exception as exc:
                self.failed = True
                raise RunFailed(f"cannot remove {rel} at {self.url} ({one_line(exc)})") from None
            del self.sent[rel]

    # RunFiles tells it of each checkpoint, of the summary and of the close (outdir.py).
    def saved(self, files, step: int) -> None:
        self.sync(but=("summary.json",))
        self.prune()

    def summarised(self, files, summary: dict) -> None:
        # The summary names where the results are: the URL, not the staging directory.
        summary["out"] = self.url
        if "config" in summary:
            summary["config"]["out"] = self.url
        write_json(os.path.join(self.local, "summary.json"), summary)
        self.sync()
        self.finished = True

    def closed(self, files) -> None:
        """The last uploads; the staging directory goes once everything is at the URL."""
        if files.log is None:  # never began: discarded_unless_begun removes the directory
            return
        _uploads.pop(self.local, None)
        if self.failed:  # the run ends with that error, naming the local copy
            return
        try:
            self.sync(but=() if self.finished else ("summary.json",))
        except RunFailed as exc:
            print(f"distbp: error: {exc}", file=sys.stderr)
            return
        # Everything is at the URL (a stopped run's last checkpoint too: in_words names it there).
        discard(self.local)
