"""``parquet:PATH`` for ``distbp convert`` (pyarrow, an optional extra): a Parquet table read a
batch of rows at a time, as a ``Source`` (sources.py); the features are numeric columns, the
label an integer column.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from ..errors import DataError, UsageError, one_line
from .sources import Source, Split

PARQUET_EXTRA = "pip install 'distbp[parquet]' (or: pip install pyarrow)"


def _parquet_features(path: str, schema, label: str, features: str | None) -> list[str]:
    """The feature columns of a Parquet table of ``schema`` (pyarrow's), checked with its label
    column: ``--feature-columns``, or every numeric column but the label."""
    import pyarrow as pa

    names = list(schema.names)

    def numeric(t) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t)

    if label not in names:
        raise DataError(f"{path}: no label column {label!r} (columns: {', '.join(names)}); choose one with "
                        "--label-column")
    if not pa.types.is_integer(schema.field(label).type):
        raise DataError(f"{path}: label column {label!r} must hold integer class ids, got {schema.field(label).type}")
    if features is None:
        cols = [c for c in names if c != label and numeric(schema.field(c).type)]
        if not cols:
            raise DataError(f"{path}: no numeric column besides the label {label!r}; name the features with "
                            "--feature-columns")
        return cols
    cols = [c.strip() for c in features.split(",")]
    if not all(cols) or len(set(cols)) != len(cols):
        raise UsageError(f"--feature-columns {features!r}: give distinct column names separated by commas")
    for c in cols:
        if c not in names:
            raise DataError(f"{path}: no column {c!r} (columns: {', '.join(names)})")
        if c == label:
            raise UsageError(f"--feature-columns: {c!r} is the label column")
        if not numeric(schema.field(c).type):
            raise DataError(f"{path}: feature column {c!r} is {schema.field(c).type}, not numeric")
    return cols


def parquet_source(path: str, label: str, features: str | None) -> Source:
    """A Parquet table: numeric feature columns and an integer label column, read a batch at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"parquet:{path} needs pyarrow, which is not installed: {PARQUET_EXTRA}") from None
    name = f"parquet:{path}"
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with pq.ParquetFile(path) as table:
            schema, rows = table.schema_arrow, table.metadata.num_rows
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({one_line(exc)})") from None
    cols = _parquet_features(path, schema, label, features)
    if rows == 0:
        raise DataError(f"{path}: no rows")
    x_dtype = np.result_type(*(np.dtype(schema.field(c).type.to_pandas_dtype()) for c in cols))
    y_dtype = np.dtype(schema.field(label).type.to_pandas_dtype())

    def chunks(n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        lo = 0
        try:
            with pq.ParquetFile(path) as f:
                for batch in f.iter_batches(batch_size=n, columns=cols + [label]):
                    X = np.empty((batch.num_rows, len(cols)), dtype=x_dtype)
                    for j, c in enumerate(cols + [label]):
                        column = batch.column(j)
                        if column.null_count:
                            at = lo + int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
                            raise DataError(f"{path}: column {c!r} has a missing value (first at row {at})")
                        if j < len(cols):
                            X[:, j] = column.to_numpy(zero_copy_only=False)
                    yield X, batch.column(len(cols)).to_numpy(zero_copy_only=False).astype(y_dtype, copy=False)
                    lo += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({one_line(exc)})") from None

    return Source(name, Split(rows, x_dtype, len(cols), y_dtype, (), chunks))
