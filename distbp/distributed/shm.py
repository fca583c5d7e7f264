"""Shared memory for the per-step vectors of a run whose processes share one machine.

Through Ray's object store a step copies three P-sized vectors (the new weights out of the
server, each worker's tree-node values into it): about 20 ms a step for 784-1024-1024-10
whatever the batch, measured (docs/performance.md).  When the driver, the workers and the
servers are all on one node, they share files under ``/dev/shm`` instead:

- the weights: one file, updated in place by the servers (each its range ``[lo, hi)``) and
  read in place by every worker;
- each worker's node values: a file the worker computes into and the servers read.

The actors then return a ``Block`` (a path, a shape and a dtype: a few dozen bytes, which Ray
passes inline) where they returned the array, and no vector is copied at all.

Why a read never overlaps a write that matters: Ray runs a worker's compute of step t + 1
only once the servers' results of step t (its arguments) exist, and the driver sends the
servers step t + 1 only once every worker task it uses has finished.  A task whose result is
not used (a late worker's, after its backup won: crew.py) may read weights while a server
writes them; its result is dropped.

No Ray here: files, ``mmap`` and numpy.
"""

from __future__ import annotations

import itertools
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

ROOT = "/dev/shm"  # a tmpfs on Linux: files there live in memory
PREFIX = "distbp-"


@dataclass(frozen=True)
class Block:
    """An array in a shared file: ``prod(shape)`` items of ``dtype`` from item ``offset`` on."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    offset: int = 0
    tag: str = ""  # tells apart memory that reuses a path (a memfd's /proc/<pid>/fd/<n>: Memfds)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Board:
    """The shared files of one run: a directory and, in it, the weights."""

    root: str
    weights: Block

    def new(self, prefix: str, shape: tuple[int, ...], dtype) -> Block:
        """A new zero-filled file in the board, big enough for ``shape`` items of ``dtype``.

        Its name is never used again in the board, even once it is removed: other processes
        cache their mappings by path (``Maps``).
        """
        return _new_file(self.root, prefix, shape, dtype)

    def remove(self, block: Block) -> None:
        os.unlink(block.path)


class Memfds:
    """Shared memory of one process that needs no file and no cleanup: each array is a memfd
    (``os.memfd_create``), which another process of the same user on the same machine maps
    through ``/proc/<pid>/fd/<fd>``.  Its memory is freed once no process holds it, so an
    actor that dies leaves nothing behind, on whatever node it ran (the socket transport's
    arrays shared between actors of one node: sockets.py).  The same methods as ``Board``.
    """

    def __init__(self):
        self.fds: dict[Block, int] = {}

    def new(self, prefix: str, shape: tuple[int, ...], dtype) -> Block:
        fd = os.memfd_create(f"distbp-{prefix}", os.MFD_CLOEXEC)
        block = Block(f"/proc/{os.getpid()}/fd/{fd}", tuple(int(n) for n in shape), np.dtype(dtype).str,
                      tag=f"{os.getpid()}-{next(_made)}")
        self.fds[block] = fd
        os.ftruncate(fd, max(1, block.nbytes))
        return block

    def remove(self, block: Block) -> None:
        """Close the memfd: its memory goes once the processes that map it unmap it."""
        os.close(self.fds.pop(block))


def memfd_available() -> bool:
    """Whether this system makes memfds that another process can map (Linux)."""
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


_made = itertools.count()  # files made by this process


def _new_file(root: str, prefix: str, shape: tuple[int, ...], dtype) -> Block:
    fd, path = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-{next(_made)}-", suffix=".bin", dir=root)
    block = Block(path, tuple(int(n) for n in shape), np.dtype(dtype).str)
    try:
        os.ftruncate(fd, max(1, block.nbytes))
    finally:
        os.close(fd)
    return block


def available() -> bool:
    """Whether this machine has the tmpfs the boards live on."""
    return os.path.isdir(ROOT) and os.access(ROOT, os.W_OK)


def open_board(size: int, dtype) -> Board:
    """A new board for a run whose flat weight vector has ``size`` items of ``dtype``.

    Boards of runs whose driver is gone (killed before it could clean up) are removed first.
    """
    sweep()
    root = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=ROOT)
    return Board(root, _new_file(root, "weights-", (size,), dtype))


def close_board(board: Board) -> None:
    """Remove the board's files; processes that still map them keep their memory until they unmap."""
    shutil.rmtree(board.root, ignore_errors=True)


def sweep() -> None:
    """Remove the boards of this user's drivers that no longer run."""
    try:
        names = os.listdir(ROOT)
    except OSError:
        return
    for name in names:
        pid = name[len(PREFIX):].split("-")[0]
        path = os.path.join(ROOT, name)
        if not name.startswith(PREFIX) or not pid.isdigit() or not os.path.isdir(path):
            continue
        try:
            mine = os.stat(path).st_uid == os.getuid()
        except OSError:
            continue
        if mine and not alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (as any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Maps:
    """The shared files one process has mapped: each is mapped once, however many steps read it."""

    def __init__(self):
        self.arrays: dict[tuple[str, str, bool], np.ndarray] = {}

    def view(self, block: Block, writable: bool = False) -> np.ndarray:
        """``block`` as an array backed by its file: read-only unless ``writable``."""
        key = (block.path, block.tag, writable)
        flat = self.arrays.get(key)
        end = block.offset + int(np.prod(block.shape))
        if flat is None or flat.dtype != np.dtype(block.dtype) or len(flat) < end:
            with open(block.path, "r+b" if writable else "rb") as f:
                mem = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
            flat = self.arrays[key] = np.frombuffer(mem, dtype=block.dtype)
        return flat[block.offset:end].reshape(block.shape)

    def retain(self, blocks) -> None:
        """Unmap every file but those of ``blocks`` (a worker's file of node values changes when
        it grows or the worker is replaced): the memory of a removed file is freed once nobody
        maps it."""
        keep = {(block.path, block.tag) for block in blocks}
        for key in [key for key in self.arrays if key[:2] not in keep]:
            del self.arrays[key]

    def drop(self, block: Block) -> None:
        """Unmap ``block``'s file (both ways it may be mapped)."""
        for writable in (False, True):
            self.arrays.pop((block.path, block.tag, writable), None)


class Rows:
    """Where a worker computes its node values: rows of ``width`` items in shared files.

    A step may give one worker several tasks (a backup, a share redone after a failure), and
    the servers read all of them once the step is complete, so each call of a step gets rows
    of its own.  A call of a new step starts again at row 0: the servers are done with the
    last step before a worker's call of the next one runs (its weights are their results).
    A file too small for a call is replaced by a new one; the old one is removed once a new
    step begins; the new one has room for twice as many rows, so that steps with backups soon
    stop making files.
    """

    def __init__(self, board: Board | Memfds, maps: Maps, width: int, dtype):
        self.board, self.maps, self.width, self.dtype = board, maps, width, np.dtype(dtype)
        self.file: Block | None = None  # the file being filled
        self.used = 0  # its rows taken in step ``self.step``
        self.step: int | None = None
        self.retired: list[Block] = []  # files filled earlier in this step: the servers may still read them

    def take(self, step: int, rows: int) -> tuple[Block, np.ndarray]:
        """``rows`` fresh rows for a call of step ``step``: their Block (what the servers read) and
        a writable view of them."""
        if step != self.step:
            self.step, self.used = step, 0
            for old in self.retired:
                self.board.remove(old)
            self.retired = []
        if self.file is None or self.used + rows > self.file.shape[0]:
            capacity = rows
            if self.file is not None:
                self.retired.append(self.file)
                self.maps.drop(self.file)  # this process is done with it: it has sent those rows
                capacity = max(rows, 2 * self.file.shape[0])
            self.file, self.used = self.board.new("nodes-", (capacity, self.width), self.dtype), 0
        block = Block(self.file.path, (rows, self.width), self.file.dtype, self.used * self.width, self.file.tag)
        self.used += rows
        return block, self.maps.view(block, writable=True)
