"""Shared memory between the actors of one node, for the direct transport (direct.py).

Through Ray's object store a step copies three P-sized vectors (the new weights out of the
server, each worker's tree-node values into it).  A worker and a server on the same node
share memory instead: each array is a memfd of the actor that owns it (``Memfds``), which
the other maps through ``/proc/<pid>/fd/<fd>`` (``Maps``), and only a ``Region`` (a path, a
shape and a dtype: a few dozen bytes) goes between them where the array would.

No Ray here: ``memfd_create``, ``mmap`` and numpy.
"""

from __future__ import annotations

import itertools
import mmap
import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Region:
    """An array in a shared file: ``prod(shape)`` items of ``dtype`` from item ``offset`` on."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    offset: int = 0
    tag: str = ""  # tells apart memory that reuses a path (a memfd's /proc/<pid>/fd/<n>: Memfds)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class Memfds:
    """Shared memory of one process that needs no file and no cleanup: each array is a memfd
    (``os.memfd_create``), which another process of the same user on the same machine maps
    through ``/proc/<pid>/fd/<fd>``.  Its memory is freed once no process holds it, so an
    actor that dies leaves nothing behind, on whatever node it ran.
    """

    def __init__(self):
        self.fds: dict[Region, int] = {}

    def new(self, prefix: str, shape: tuple[int, ...], dtype) -> Region:
        fd = os.memfd_create(f"distbp-{prefix}", os.MFD_CLOEXEC)
        block = Region(f"/proc/{os.getpid()}/fd/{fd}", tuple(int(n) for n in shape), np.dtype(dtype).str,
                      tag=f"{os.getpid()}-{next(_made)}")
        self.fds[block] = fd
        os.ftruncate(fd, max(1, block.nbytes))
        return block

    def remove(self, block: Region) -> None:
        """Close the memfd: its memory goes once the processes that map it unmap it."""
        os.close(self.fds.pop(block))


def memfd_available() -> bool:
    """Whether this system makes memfds that another process can map (Linux)."""
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


_made = itertools.count()  # memfds made by this process


class Maps:
    """The shared files one process has mapped: each is mapped once, however many steps read it."""

    def __init__(self):
        self.arrays: dict[tuple[str, str, bool], np.ndarray] = {}

    def view(self, block: Region, writable: bool = False) -> np.ndarray:
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

    def drop(self, block: Region) -> None:
        """Unmap ``block``'s file (both ways it may be mapped)."""
        for writable in (False, True):
            self.arrays.pop((block.path, block.tag, writable), None)


class Rows:
    """Where a worker computes its node values: rows of ``width`` items in shared memory.

    A step may give one worker several tasks (a backup, a share redone after a failure), and
    the servers read all of them once the step is complete, so each call of a step gets rows
    of its own.  A call of a new step starts again at row 0: the servers are done with the
    last step before a worker's call of the next one runs (its weights are their results).
    A file too small for a call is replaced by a new one; the old one is removed once a new
    step begins; the new one has room for twice as many rows, so that steps with backups soon
    stop making files.
    """

    def __init__(self, memory: Memfds, maps: Maps, width: int, dtype):
        self.memory, self.maps, self.width, self.dtype = memory, maps, width, np.dtype(dtype)
        self.file: Region | None = None  # the file being filled
        self.used = 0  # its rows taken in step ``self.step``
        self.step: int | None = None
        self.retired: list[Region] = []  # files filled earlier in this step: the servers may still read them

    def take(self, step: int, rows: int) -> tuple[Region, np.ndarray]:
        """``rows`` fresh rows for a call of step ``step``: their Region (what the servers read) and
        a writable view of them."""
        if step != self.step:
            self.step, self.used = step, 0
            for old in self.retired:
                self.memory.remove(old)
            self.retired = []
        if self.file is None or self.used + rows > self.file.shape[0]:
            capacity = rows
            if self.file is not None:
                self.retired.append(self.file)
                self.maps.drop(self.file)  # this process is done with it: it has sent those rows
                capacity = max(rows, 2 * self.file.shape[0])
            self.file, self.used = self.memory.new("nodes-", (capacity, self.width), self.dtype), 0
        block = Region(self.file.path, (rows, self.width), self.file.dtype, self.used * self.width, self.file.tag)
        self.used += rows
        return block, self.maps.view(block, writable=True)
