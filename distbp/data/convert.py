"""``distbp convert SRC DIR``: a dataset into the ``.npy`` shards of ``--dataset npy:DIR``, in chunks.

``npy:DIR`` trains on data larger than memory because each worker maps the files and reads only
its rows (npydir.py); but the sources users have, an ``.npz`` archive, Fashion-MNIST's IDX files,
a Parquet table or a CSV file, are read whole by their loaders.  Convert reads a source a chunk of about
``CHUNK_BYTES`` at a time and writes each chunk straight into its shard file, so its memory stays
at a few chunks whatever the size of the data:

- ``npz:PATH``: each member's ``.npy`` header is read from the zip, its data streamed (stored or
  deflated members alike); nothing is loaded whole.  The arrays are written as they are (X, y,
  X_test, y_test), so ``npy:DIR`` holds the same values.
- ``fashion-mnist``: the gzip IDX files are streamed.  The in-memory dataset standardises with
  the training set's mean and standard deviation; two passes before writing compute them, adding
  in numpy's pairwise order (``_pairwise_sum``), so X has exactly the bits of
  ``datasets.fashion_mnist()`` and trains to the same ``weights_sha256``.
- ``parquet:PATH`` (pyarrow, an optional extra): read a batch of rows at a time; the features
  are numeric columns, the label an integer column.
- ``csv:PATH``: read a chunk of lines at a time (csvfile.py); the label column chosen as for
  ``--dataset csv:PATH#label=NAME`` or with ``--label-column``, every other column a feature.

Shards are written with plain writes (a ``.npy`` header, then the rows), not through a memory
map: the pages of a mapped file count in the process's resident memory, which would grow to a
whole shard.

Nothing half-made is ever left at DIR: the shards go into a hidden temporary directory beside it
(``.DIR.*.converting``, locked while it is written), renamed into place only when every file is
written and synced; an error or a signal removes it.  Only a SIGKILL can leave it behind, never
DIR, and the next convert to DIR removes it (one whose lock no live process holds:
run/remote.py ``sweep_stale``).  Bad input (headers, shapes, dtypes, lengths, non-finite
features, negative or non-integer labels) ends in one line and exit 2, with DIR not created.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager

import numpy as np

from ..errors import DataError, Interrupted, UsageError, size_text
from ..run.remote import locked_tempdir, sweep_stale
from . import csvfile
from .idx import DEFAULT_DATA_DIR
from .parquet import parquet_source
from .sources import Source, Split, fashion_source, npz_source, progress_bar

SHARD_BYTES = 256 << 20  # the default shard size (X's bytes per shard)
MAX_SHARDS = 100_000  # X-00000 ... X-99999: more would not sort by name (npydir numbers them in order)
SOURCES = "npz:PATH, fashion-mnist, parquet:PATH or csv:PATH[#label=NAME|INDEX]"


# ---- the command ----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Convert a dataset into a directory of .npy shards for --dataset npy:DIR, reading it in "
                          "chunks (never whole): X-00000.npy, y-00000.npy, ... and X_test.npy, y_test.npy when "
                          "the source has a test split. DIR must not exist (or be empty); it appears only when "
                          "complete.")
    parser.add_argument("src", metavar="SRC", help=f"the dataset: {SOURCES}")
    parser.add_argument("dir", metavar="DIR", help="the directory to create (npy:DIR is accepted too)")
    parser.add_argument("--rows-per-shard", type=int, metavar="N",
                        help=f"rows per shard (default: about {SHARD_BYTES >> 20} MiB of X per shard)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help=f"fashion-mnist: where the IDX files are (default: {DEFAULT_DATA_DIR})")
    parser.add_argument("--label-column", metavar="NAME", help="parquet: the integer label column (default: y); "
                        "csv: the label column's name or index (default: the last column)")
    parser.add_argument("--feature-columns", metavar="A,B,...",
                        help="parquet: the feature columns (default: every other numeric column)")


def run(ns: argparse.Namespace) -> int:
    done = convert(ns.src, ns.dir, rows_per_shard=ns.rows_per_shard, data_dir=ns.data_dir,
                   label_column=ns.label_column, feature_columns=ns.feature_columns, progress=True)
    test = f" + {done['test_rows']} test rows" if done["test_rows"] else ""
    print(f"distbp convert: {done['rows']} rows in {done['shards']} shard{'s' * (done['shards'] != 1)}{test}, "
          f"{done['bytes']} bytes ({size_text(done['bytes'])}) -> npy:{done['dir']}")
    return 0


def convert(src: str, directory: str, rows_per_shard: int | None = None, data_dir: str | None = None,
            label_column: str | None = None, feature_columns: str | None = None, progress: bool = False) -> dict:
    """Write ``src`` as ``npy:directory``; returns ``{dir, rows, test_rows, shards, bytes}``.

    Raises UsageError or DataError (one line) on bad options or data, with ``directory`` not
    created; an error or a signal while writing removes what was written."""
    kind = _kind(src)
    if data_dir is not None and kind != "fashion-mnist":
        raise UsageError("--data-dir applies to fashion-mnist only")
    if label_column is not None and kind not in ("parquet", "csv"):
        raise UsageError("--label-column applies to parquet:PATH and csv:PATH only")
    if feature_columns is not None and kind != "parquet":
        raise UsageError("--feature-columns applies to parquet:PATH only")
    if rows_per_shard is not None and rows_per_shard < 1:
        raise UsageError(f"--rows-per-shard must be at least 1, got {rows_per_shard}")
    target = _target(directory)
    with _signals_raise(f"{target} was not created"):
        source = _source(kind, src, data_dir, label_column, feature_columns, progress)
        train = source.train
        per_shard = rows_per_shard or max(1, SHARD_BYTES // max(1, train.row_bytes))
        shards = -(-train.rows // per_shard)
        if shards > MAX_SHARDS:
            raise UsageError(f"--rows-per-shard {per_shard} makes {shards} shards of {train.rows} rows; "
                             f"at most {MAX_SHARDS} are allowed")
        parent = os.path.dirname(target)
        needed = sum(s.rows * (s.row_bytes + s.y_dtype.itemsize * math.prod(s.y_tail)) + 2 * 128 * n
                     for s, n in ((train, shards), (source.test, 1)) if s is not None)
        # a killed convert's leftovers (their writer gone) first: they take space too
        sweep_stale(parent, re.compile(re.escape(f".{os.path.basename(target)}.") + r"[a-z0-9_]{8}\.converting"))
        _check_space(_existing(parent), needed, target)
        return _write(source, target, per_shard, shards, progress)


def _source(kind: str, src: str, data_dir: str | None, label_column: str | None, feature_columns: str | None,
            progress: bool) -> Source:
    """SRC opened: its headers read and checked, its rows not yet."""
    if kind == "npz":
        return npz_source(src[len("npz:"):])
    if kind == "parquet":
        return parquet_source(src[len("parquet:"):], label_column or "y", feature_columns)
    if kind == "csv":
        path, label = csvfile.parse_spec(src)
        if label is not None and label_column is not None:
            raise UsageError(f"SRC {src!r} names the label column and so does --label-column; give one of them")
        return csvfile.csv_source(path, label_column if label is None else label)
    return fashion_source(data_dir, progress)


def _kind(src: str) -> str:
    if src == "fashion-mnist":
        return src
    for kind in ("npz", "parquet", "csv"):
        if src.startswith(f"{kind}:"):
            if not src[len(kind) + 1:]:
                raise UsageError(f"SRC {src!r}: give the file's path after {kind}:")
            return kind
    hint = " (a file is named with its format: npz:PATH, parquet:PATH or csv:PATH)" if os.path.exists(src) else ""
    raise UsageError(f"unknown SRC {src!r}; choose {SOURCES}{hint}")


def _target(directory: str) -> str:
    """DIR as an absolute path, refused (one line) unless it is new or an empty directory."""
    path = directory[len("npy:"):] if directory.startswith("npy:") else directory
    if not path:
        raise UsageError("DIR must not be empty")
    path = os.path.abspath(path)
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        raise DataError(f"{path}: already exists and is not a directory; give a new DIR")
    if os.path.isdir(path) and os.listdir(path):
        raise DataError(f"{path}: already exists and is not empty; give a new DIR (convert never writes "
                        "into existing data)")
    return path


def _existing(path: str) -> str:
    while not os.path.isdir(path):
        if os.path.lexists(path):
            raise DataError(f"{path}: not a directory, so DIR cannot be made under it")
        path = os.path.dirname(path)
    return path


def _check_space(where: str, needed: int, target: str) -> None:
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # unknown: a full disk still ends in one line, when the write fails
    if needed > free:
        raise DataError(f"{target}: the shards need about {size_text(needed)} but only {size_text(free)} is free "
                        f"on {where}")


@contextmanager
def _signals_raise(outcome: str):
    """SIGINT and SIGTERM raise Interrupted (exit 128 + the signal), so the temporary directory is
    removed on the way out; a second signal meanwhile is ignored (the cleanup is short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []

    def handle(signum, frame):
        seen.append(signum)
        if len(seen) == 1:
            raise Interrupted(f"stopped by {signal.Signals(signum).name}; {outcome}", signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- writing ----------------------------------------------------------------------------------------

class _NpyWriter:
    """One ``.npy`` file written front to back: the header for ``shape``, then rows appended."""

    def __init__(self, path: str, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape, self.rows = path, np.dtype(dtype), shape, 0
        self.fh = open(path, "xb")
        np.lib.format.write_array_header_1_0(self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                       "fortran_order": False, "shape": shape})

    def append(self, rows: np.ndarray) -> None:
        self.fh.write(memoryview(np.ascontiguousarray(rows, dtype=self.dtype)).cast("B"))
        self.rows += len(rows)

    def close(self) -> None:
        assert self.rows == self.shape[0], (self.path, self.rows, self.shape)  # the plan counted them
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def _write(source: Source, target: str, per_shard: int, shards: int, progress: bool) -> dict:
    parent = os.path.dirname(target)
    made = _make_parents(parent)
    tmp = lock = None
    bar = progress_bar(source.train.rows + (source.test.rows if source.test else 0), "converting", progress)
    try:
        tmp, lock = locked_tempdir(f".{os.path.basename(target)}.", ".converting", parent)
        train = source.train
        sizes = [min(per_shard, train.rows - i * per_shard) for i in range(shards)]
        names = [(f"X-{i:05d}.npy", f"y-{i:05d}.npy") for i in range(shards)]
        _write_split(source.name, train, tmp, names, sizes, bar, ("X", "y"))
        if source.test is not None:
            _write_split(source.name, source.test, tmp, [("X_test.npy", "y_test.npy")], [source.test.rows], bar,
                         ("X_test", "y_test"))
        total = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> what a plain mkdir would give
        _fsync_dir(tmp)
        os.rename(tmp, target)  # atomic: DIR appears complete or not at all
        tmp = None
        _fsync_dir(parent)
    except OSError as exc:
        raise DataError(f"{target}: cannot write the shards ({exc.strerror or exc})") from None
    finally:
        if bar is not None:
            bar.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            for d in reversed(made):
                try:
                    os.rmdir(d)
                except OSError:
                    break
        if lock is not None:  # after the rename or the removal: never a directory there unlocked
            os.close(lock)
    return {"dir": target, "rows": source.train.rows, "test_rows": source.test.rows if source.test else 0,
            "shards": shards, "bytes": total}


def _write_split(name: str, split: Split, tmp: str, names: list[tuple[str, str]], sizes: list[int], bar,
                 labels: tuple[str, str]) -> None:
    shard, writers, row = -1, None, 0
    left = 0  # rows still to write into the open shard
    for X, y in split.chunks(split.chunk_rows()):
        if row + len(X) > split.rows:
            raise DataError(f"{name}: {labels[0]} has more rows than its header declares ({split.rows})")
        _check_chunk(name, split, X, y, row, labels)
        lo = 0
        while lo < len(X):
            if left == 0:
                if writers is not None:
                    for w in writers:
                        w.close()
                shard += 1
                left = sizes[shard]
                writers = (_NpyWriter(os.path.join(tmp, names[shard][0]), split.x_dtype, (left, split.features)),
                           _NpyWriter(os.path.join(tmp, names[shard][1]), split.y_dtype, (left, *split.y_tail)))
            n = min(left, len(X) - lo)
            writers[0].append(X[lo:lo + n])
            writers[1].append(y[lo:lo + n])
            lo, left = lo + n, left - n
        row += len(X)
        if bar is not None:
            bar.update(len(X))
    if row != split.rows:
        raise DataError(f"{name}: {labels[0]} ends after {row} rows but its header declares {split.rows}")
    for w in writers or ():
        w.close()


def _check_chunk(name: str, split: Split, X: np.ndarray, y: np.ndarray, row: int, labels: tuple[str, str]) -> None:
    """The checks that need the data: finite features and targets, class ids >= 0."""
    x_name, y_name = labels
    if len(y) != len(X):
        raise DataError(f"{name}: {x_name} and {y_name} chunks differ in length at row {row}")
    if X.dtype.kind == "f" and not np.isfinite(X).all():
        bad = np.argwhere(~np.isfinite(X))[0]
        raise DataError(f"{name}: {x_name} contains NaN or inf (first at row {row + bad[0]}, column {bad[1]})")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        at = row + int(np.argwhere(~np.isfinite(y))[0][0])
        raise DataError(f"{name}: {y_name} contains NaN or inf (first at row {at})")
    if y.dtype.kind == "i" and len(y) and y.min() < 0:
        at = int(np.argmax(y < 0))
        raise DataError(f"{name}: {y_name} has a negative label ({y[at]} at row {row + at}); class ids are "
                        "0, 1, 2, ...")


def _make_parents(parent: str) -> list[str]:
    """Create DIR's missing parents; the list (outermost first) is removed again if the convert fails."""
    missing = []
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(missing):
        os.mkdir(d)
    return list(reversed(missing))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the files themselves are synced
    finally:
        os.close(fd)
