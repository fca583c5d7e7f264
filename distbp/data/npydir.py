"""``--dataset npy:DIR``: training data larger than memory, read by global row index.

The training set is a directory of ``.npy`` files: ``X.npy`` and ``y.npy``, or shards
``X-00000.npy``, ``y-00000.npy``, ... split along the rows (optional ``X_test.npy`` and
``y_test.npy``).  Nothing is loaded: ``Rows`` maps the files (``np.load(mmap_mode="r")``)
and gathers the rows a caller asks for, by global index, across shards.  A ``Rows`` pickles
as its paths, so a worker actor that receives one maps the files itself (on a path every
node sees, or the same path on each node) and reads only its micro-batches' rows from the
page cache, where the object store would hold a copy of the whole set on every node.

Exactness does not change: the sampler picks global indices, the worker gathers exactly
those rows (cast to the run's dtype on the way into its workspace, the same values the
in-memory path casts up front), so a run on ``npy:DIR`` has the ``weights_sha256`` of the
same data in memory.

Opening a directory checks what can go wrong (shapes, dtypes and lengths across shards,
labels in range, every feature finite) once: the finiteness scan reads the whole set in
chunks, so its verdict is remembered under ``~/.cache/distbp`` by a fingerprint of the files
(paths, sizes, modification and change times, inodes, headers: the change time moves with any
write and with ``os.utime``, so a file written and given its old mtime back is scanned again).

Data that changes under a run: rows are read with ``preadv`` from the file at the offsets its
header gives, never through a mapping, so a shard truncated mid-run is a DataError naming it
(a mapping would kill the reading process with SIGBUS); and ``changed`` tells the driver which
file is no longer the one the run opened, which it checks before each checkpoint.
"""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
import re
import stat
import sys

import numpy as np

from ..errors import DataError

SCAN_ROWS_BYTES = 64 << 20  # the finiteness scan reads this much at a time
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "distbp", "checked")


class Rows:
    """Memory-mapped shards seen as one array of rows; ``index`` (optional) picks a subset.

    A shard is the path of an ``.npy`` file, or ``(path, dtype, offset, shape)`` of a raw
    ``numpy.memmap`` (``distbp.fit`` with memory-mapped arrays).
    """

    def __init__(self, paths: list, index: np.ndarray | None = None):
        self.paths, self.index = list(paths), index
        self.parts = [_open(p) for p in self.paths]
        first = self.parts[0]
        for path, part in zip(self.paths[1:], self.parts[1:]):
            if part.shape[1:] != first.shape[1:] or part.dtype != first.dtype:
                raise DataError(f"{path}: shape {part.shape} {part.dtype} does not match {self.paths[0]} "
                                f"({first.shape} {first.dtype})")
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # global row of each shard's first row
        self.dtype = first.dtype
        rows = int(self.starts[-1]) if index is None else len(index)
        self.shape = (rows, *first.shape[1:])
        self.identity = [_identity(_path(p)) for p in self.paths]  # what changed() compares with

    def __reduce__(self):
        return Rows, (self.paths, self.index)  # a worker opens the files itself

    def changed(self) -> str | None:
        """The first file that is no longer the one these rows were opened on (written, replaced,
        truncated or gone since), or None."""
        for source, seen in zip(self.paths, self.identity):
            try:
                now = _identity(_path(source))
            except OSError:
                return _path(source)
            if now != seen:
                return _path(source)
        return None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def from_memmap(cls, m: np.memmap) -> Rows:
        """The rows of a C-ordered ``numpy.memmap`` (what ``np.load(path, mmap_mode="r")`` gives)."""
        if not m.flags.c_contiguous or getattr(m, "_mmap", None) is None or m.filename is None:
            raise DataError("a memory-mapped X must be a C-ordered numpy.memmap backed by a file")
        # Where the rows start in the file, also for a slice of a memmap (whose .offset is its
        # parent's): numpy maps from the offset rounded down to the allocation granularity.
        mapped = np.frombuffer(m._mmap, dtype=np.uint8).ctypes.data
        offset = m.offset - m.offset % mmap.ALLOCATIONGRANULARITY + (m.ctypes.data - mapped)
        return cls([(m.filename, m.dtype.str, int(offset), tuple(m.shape))])

    def subset(self, index: np.ndarray) -> Rows:
        """The rows ``index`` of these rows (a held-out split), still read lazily."""
        return Rows(self.paths, np.asarray(index) if self.index is None else self.index[index])

    def take(self, rows, axis: int = 0, out: np.ndarray | None = None, mode: str = "raise") -> np.ndarray:
        """``ndarray.take`` along the rows: the rows ``rows``, into ``out`` (cast to its dtype) if given."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.index is not None:
            rows = self.index[rows]
        if out is None:
            out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(shard):
            mine = shard == s
            out[mine] = _read(_path(self.paths[s]), self.parts[s], rows[mine] - self.starts[s])
        return out

    def __getitem__(self, key) -> np.ndarray:
        """A slice of rows as an array in memory (evaluation reads the set in chunks this way)."""
        if not isinstance(key, slice):
            raise TypeError("Rows supports slices of rows and take()")
        return self.take(np.arange(*key.indices(len(self))))

    def chunks(self, rows: int):
        """The rows in order, ``rows`` at a time, as arrays in memory."""
        for lo in range(0, len(self), rows):
            yield self[lo:lo + rows]

    def signature(self, strong: bool = False) -> str:
        """What identifies these files without reading them: paths, sizes, modification times,
        headers, subset (the data fingerprint a resumed run is checked against: a copy put back
        with its times is the same data).  ``strong`` adds what no write can keep: inodes and
        change times (the finiteness verdict's key)."""
        h = hashlib.sha256()
        for source, part in zip(self.paths, self.parts):
            path = _path(source)
            full = _identity(path)  # device, inode, size, modification and change time
            identity = full if strong else full[2:4]
            h.update(json.dumps([os.path.abspath(path), *identity, part.shape,
                                 part.dtype.str, None if isinstance(source, str) else source[2]]).encode())
        if self.index is not None:
            h.update(np.ascontiguousarray(self.index, dtype="<i8").tobytes())
        return h.hexdigest()


def _read(path: str, part: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows ``wanted`` of the shard ``part`` mapped from ``path``, in that order, read with one
    ``preadv`` into the result per run of consecutive rows (a slice is one read): a file cut
    short is a DataError naming it, not SIGBUS."""
    row_bytes = part.dtype.itemsize * int(np.prod(part.shape[1:], dtype=np.int64))
    block = np.empty((len(wanted), *part.shape[1:]), dtype=part.dtype)
    flat = memoryview(block.reshape(-1).view(np.uint8))
    rows = wanted.tolist()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it any more ({exc.strerror}); it changed during the run") from None
    try:
        lo = 0
        while lo < len(rows):
            hi = lo + 1
            while hi < len(rows) and rows[hi] == rows[hi - 1] + 1:
                hi += 1
            got = _read_into(fd, flat[lo * row_bytes:hi * row_bytes], part.offset + rows[lo] * row_bytes)
            if got < (hi - lo) * row_bytes:
                raise DataError(f"{path}: the file ends before row {rows[lo] + got // row_bytes} "
                                f"of the {len(part)} its header declares; it was truncated during the run")
            lo = hi
    finally:
        os.close(fd)
    return block


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` of ``fd``; the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def _path(source) -> str:
    return source if isinstance(source, str) else source[0]


def _identity(path: str) -> tuple[int, ...]:
    """A file's identity without reading it: device, inode, size, modification and change times.
    ``os.utime`` can set the modification time back, but it moves the change time."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _open(source) -> np.ndarray:
    if not isinstance(source, str):
        path, dtype, offset, shape = source
        try:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot map it ({str(exc).splitlines()[0]})") from None
    path = source
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc.strerror})") from None
    if not regular:  # a FIFO or a device would block or never end
        raise DataError(f"{path}: not a regular file, not an .npy file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({str(exc).splitlines()[0]})") from None
    if not isinstance(array, np.ndarray) or array.ndim < 1:
        raise DataError(f"{path}: expected an array of rows, got shape {getattr(array, 'shape', None)}")
    return array


def _shards(directory: str, name: str) -> list[str]:
    """``name.npy``, or ``name-00000.npy``, ``name-00001.npy``, ... numbered from 0 without gaps."""
    single = os.path.join(directory, f"{name}.npy")
    numbered = sorted(glob.glob(os.path.join(glob.escape(directory), f"{name}-[0-9]*.npy")))
    numbered = [p for p in numbered if re.fullmatch(rf"{name}-\d+\.npy", os.path.basename(p))]
    if os.path.exists(single) and numbered:
        raise DataError(f"{directory}: both {name}.npy and {name}-NNNNN.npy shards; keep one")
    if os.path.exists(single):
        return [single]
    numbers = [int(os.path.basename(p)[len(name) + 1:-4]) for p in numbered]
    if numbers != list(range(len(numbers))):
        raise DataError(f"{directory}: {name} shards must be numbered 0, 1, 2, ... without gaps, got {numbers}")
    return numbered


def lazy(X):
    """``X`` as the loaders keep it: ``Rows`` for memory-mapped data (read by row when needed),
    else an array in memory."""
    if isinstance(X, Rows):
        return X
    if isinstance(X, np.memmap):
        return Rows.from_memmap(X)
    return np.asarray(X)


def finite(rows: Rows, dtype=None, progress: str | None = None) -> bool:
    """Whether every value of ``rows`` (cast to ``dtype`` if given: a float64 file may overflow a
    float32 run) is finite; the whole set is scanned in chunks once per version of the files
    (the verdict is cached), with a progress bar labelled ``progress`` on a terminal."""
    dtype = np.dtype(dtype or rows.dtype)
    mark = os.path.join(CACHE, f"{rows.signature(strong=True)}-{dtype.str}")
    if os.path.exists(mark) or rows.dtype.kind not in "fc":
        return True  # integer features are finite in any float dtype here (2**64 < float32's max)
    step = max(1, SCAN_ROWS_BYTES // max(1, rows.dtype.itemsize * int(np.prod(rows.shape[1:]))))
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(rows), desc=progress, unit="row", unit_scale=True, leave=False, file=sys.stderr)
    try:
        with np.errstate(over="ignore"):
            for chunk in rows.chunks(step):
                if not np.isfinite(chunk.astype(dtype, copy=False)).all():
                    return False
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    try:
        os.makedirs(CACHE, exist_ok=True)
        open(mark, "w").close()
    except OSError:
        pass  # no cache: the next run scans again
    return True


def open_dir(directory: str) -> tuple[Rows, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(X, y, X_test, y_test)`` of ``npy:DIR``: X lazily, labels (small) in memory."""
    if not os.path.isdir(directory):
        raise DataError(f"npy:{directory}: no such directory")
    xs, ys = _shards(directory, "X"), _shards(directory, "y")
    if not xs or not ys:
        raise DataError(f"npy:{directory}: expected X.npy and y.npy (or X-00000.npy, y-00000.npy, ...)")
    if len(xs) != len(ys):
        raise DataError(f"npy:{directory}: {len(xs)} X shards but {len(ys)} y shards")
    X = Rows(xs)
    y_parts = [_open(p) for p in ys]
    for xp, yp, part, rows in zip(xs, ys, y_parts, X.parts):
        if len(part) != len(rows):
            raise DataError(f"{yp}: {len(part)} labels but {os.path.basename(xp)} has {len(rows)} rows")
    y = np.concatenate([np.asarray(p) for p in y_parts])
    X_test = y_test = None
    tests = [os.path.join(directory, f) for f in ("X_test.npy", "y_test.npy")]
    if any(os.path.exists(p) for p in tests):
        if not all(os.path.exists(p) for p in tests):
            raise DataError(f"npy:{directory}: X_test.npy and y_test.npy go together")
        X_test, y_test = (np.asarray(_open(p)) for p in tests)
    return X, y, X_test, y_test
