"""``csv:PATH``: a CSV file of numbers, for ``--dataset`` (read into memory) and ``distbp convert``
(read a chunk at a time), as a ``Source`` (sources.py).

The file (UTF-8, commas, fields optionally in double quotes):

- its first line names the columns.  The header is required, not guessed: a first line of numbers
  only is refused, since taking it for a header would drop a sample and taking a header for data
  would fail later.  A leading ``#`` (``numpy.savetxt(..., header=...)`` writes one) is dropped.
- every later line is one sample, a number in every column; blank lines are skipped.
- the label is the last column, or the one ``csv:PATH#label=NAME`` names; ``#label=INDEX`` counts
  from 0 (negative: from the end) and is read as an index only where no column has that name.
  ``distbp convert`` also takes ``--label-column NAME|INDEX``, as for ``parquet:PATH``.
- the label holds class ids when every value is an integer written as one (``2``, not ``2.0`` or
  ``2e0``): (N,) int64, as an ``.npz`` with integer ``y``; otherwise one float target a sample,
  (N, 1) float64, as an ``.npz`` with float ``y`` (regression: ``--loss squared``).
- every other column is a feature, read as float64 (the run casts to ``--dtype``, as it does for
  every source), so a CSV of ``repr(float)`` values trains to the ``weights_sha256`` of the same
  arrays in an ``.npz``.  There is no test split; ``--val-fraction`` holds one out.

The file is read twice, ``numpy.loadtxt`` on a chunk of lines at a time: the label column first
(the number of rows and whether they are class ids, both needed before any array is allocated or
any shard header written), then every column.  A chunk numpy refuses is read again line by line
to name the line and column at fault.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import DataError, UsageError, one_line
from . import sources
from .datasets import Dataset, check_memory, from_arrays
from .sources import Source, Split

LABEL = "#label="  # csv:PATH#label=NAME|INDEX


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``csv:PATH[#label=NAME|INDEX]`` as (PATH, the label's name or index; None for the last column)."""
    body = spec[len("csv:"):] if spec.startswith("csv:") else spec
    path, mark, label = body.rpartition(LABEL)
    if not mark:
        path, label = body, None
    elif not label.strip():
        raise UsageError(f"{spec}: give a column name or index after {LABEL}")
    if not path:
        raise UsageError(f"{spec}: give the file's path after csv:")
    return path, label


@dataclass(frozen=True)
class Table:
    """A CSV file's columns, as its header names them, and which of them is the label."""

    path: str
    names: list[str]
    label: int  # the label's column index; every other column is a feature

    def column(self, j: int) -> str:
        return f"column {self.names[j]!r}" if self.names[j] else f"column {j}"

    @property
    def features(self) -> list[int]:
        return [j for j in range(len(self.names)) if j != self.label]


def _is_number(text: str) -> bool:
    """Whether ``text`` is one number as numpy.loadtxt reads it (Python's float also takes 1_000)."""
    try:
        float(text)
    except ValueError:
        return False
    return "_" not in text


def _open(path: str):
    try:
        return open(path, encoding="utf-8-sig", newline="")  # -sig: the byte-order mark Excel writes
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from None


def _header(path: str) -> list[str]:
    """The column names of the file's first line."""
    try:
        with _open(path) as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({one_line(exc)})") from None
    text = first[1:] if first.startswith("#") else first
    if not text.strip():
        raise DataError(f"{path}: {'the first line is empty' if first else 'an empty file'}; a CSV file starts "
                        "with a header line naming its columns")
    names = [name.strip() for name in next(csv.reader([text], skipinitialspace=True))]
    if all(_is_number(name) for name in names):
        raise DataError(f"{path}: the first line holds numbers, not column names; add a header line "
                        "(such as x1,x2,label)")
    if len(names) < 2:
        raise DataError(f"{path}: the header names {len(names)} column; a sample needs features and a label")
    return names


def _label(path: str, names: list[str], label: str | None) -> int:
    """The label's column index: the last column, the column named ``label``, or ``label`` as an index."""
    if label is None:
        return len(names) - 1
    label = label.strip()
    if label in names:
        if names.count(label) > 1:
            raise DataError(f"{path}: {names.count(label)} columns are named {label!r}; choose the label by index")
        return names.index(label)
    try:
        j = int(label)
    except ValueError:
        raise DataError(f"{path}: no label column {label!r} (columns: {', '.join(names)})") from None
    if not -len(names) <= j < len(names):
        raise DataError(f"{path}: no label column {j}: the header names {len(names)} columns (0..{len(names) - 1})")
    return j % len(names)


def _lines(table: Table, rows: int) -> Iterator[tuple[list[int], list[str]]]:
    """The data lines, ``rows`` at a time, each chunk with the lines' numbers (the header is line 1)."""
    try:
        with _open(table.path) as fh:
            fh.readline()
            data = ((n, line) for n, line in enumerate(fh, start=2) if line.strip())
            while chunk := list(itertools.islice(data, rows)):
                numbers, lines = zip(*chunk)
                yield list(numbers), list(lines)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{table.path}: not a readable CSV file ({one_line(exc)})") from None


def _loadtxt(table: Table, numbers: list[int], lines: list[str], **kwargs) -> np.ndarray:
    """``numpy.loadtxt`` of the lines; the first bad line (wrong number of fields, a field that is
    not a number) named in a DataError where numpy refuses them."""
    try:
        return np.loadtxt(lines, delimiter=",", quotechar='"', ndmin=2, **kwargs)
    except ValueError as exc:
        problem = exc
    for n, fields in zip(numbers, csv.reader(lines)):
        if len(fields) != len(table.names):
            raise DataError(f"{table.path}: line {n} has {len(fields)} fields but the header names "
                            f"{len(table.names)} columns")
        for j, field in enumerate(fields):
            if not _is_number(field):
                what = "is empty" if not field.strip() else f"{field.strip()!r} is not a number"
                raise DataError(f"{table.path}: line {n}, {table.column(j)}: {what}")
    raise DataError(f"{table.path}: lines {numbers[0]}-{numbers[-1]} are not readable as numbers "
                    f"({one_line(problem)})")


def _class_ids(texts: np.ndarray) -> bool:
    """Whether every label is an integer written as one (``2``; not ``2.0``)."""
    try:
        texts.astype(np.int64)
    except (ValueError, OverflowError):
        return False
    return True


def _scan(table: Table, rows: int) -> tuple[int, bool]:
    """The number of data lines, and whether the label column holds class ids, reading only it."""
    count, ids = 0, True
    for numbers, lines in _lines(table, rows):
        texts = _loadtxt(table, numbers, lines, dtype=str, usecols=[table.label])[:, 0]
        ids = ids and _class_ids(texts)
        count += len(lines)
    return count, ids


def _read(table: Table, numbers: list[int], lines: list[str], ids: bool) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's features (n, D) float64 and labels: (n,) int64 class ids or (n, 1) float64 targets."""
    values = _loadtxt(table, numbers, lines, dtype=np.float64)
    if values.shape[1] != len(table.names):  # numpy compares the lines with each other, not with the header
        raise DataError(f"{table.path}: line {numbers[0]} has {values.shape[1]} fields but the header names "
                        f"{len(table.names)} columns")
    bad = ~np.isfinite(values)
    if bad.any():
        row, j = np.argwhere(bad)[0]
        raise DataError(f"{table.path}: {table.column(j)} contains NaN or inf (first at line {numbers[row]})")
    y = values[:, table.label]
    if ids:
        y = y.astype(np.int64)
        if y.min() < 0:
            row = int(np.argmax(y < 0))
            raise DataError(f"{table.path}: {table.column(table.label)} has a negative class id ({y[row]} at line "
                            f"{numbers[row]}); class ids are 0, 1, 2, ...")
    else:
        y = y.reshape(-1, 1)
    return np.ascontiguousarray(values[:, table.features]), y


def csv_source(path: str, label: str | None = None) -> Source:
    """The CSV file ``path`` with its label column ``label`` (name or index; None: the last one),
    its header read and its label column scanned here, its rows read a chunk at a time."""
    if not os.path.isfile(path):
        hint = f" (the label is chosen with csv:PATH{LABEL}NAME)" if "#" in path else ""
        raise DataError(f"{path}: no such file{hint}")
    names = _header(path)
    table = Table(path, names, _label(path, names, label))
    per_chunk = max(1, sources.CHUNK_BYTES // (8 * len(names)))
    rows, ids = _scan(table, per_chunk)
    if rows == 0:
        raise DataError(f"{path}: no data lines after the header")

    def chunks(n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for numbers, lines in _lines(table, n):
            yield _read(table, numbers, lines, ids)

    y_dtype, y_tail = (np.dtype(np.int64), ()) if ids else (np.dtype(np.float64), (1,))
    train = Split(rows, np.dtype(np.float64), len(names) - 1, y_dtype, y_tail, chunks)
    return Source(f"csv:{path}", train)


def load_csv(spec: str) -> Dataset:
    """``--dataset csv:PATH[#label=NAME|INDEX]``: the whole file in memory, validated as any dataset."""
    path, label = parse_spec(spec)
    split = csv_source(path, label).train
    check_memory(split.rows * (split.row_bytes + 8), f"{path}: reading its {split.rows} rows")
    X = np.empty((split.rows, split.features), dtype=split.x_dtype)
    y = np.empty((split.rows, *split.y_tail), dtype=split.y_dtype)
    lo = 0
    for X_chunk, y_chunk in split.chunks(split.chunk_rows()):
        hi = lo + len(X_chunk)
        if hi > split.rows:
            raise DataError(f"{path}: the file changed while it was read (more than {split.rows} data lines)")
        X[lo:hi], y[lo:hi] = X_chunk, y_chunk
        lo = hi
    if lo != split.rows:
        raise DataError(f"{path}: the file changed while it was read ({lo} data lines, {split.rows} before)")
    return from_arrays(spec, X, y, source=path)
