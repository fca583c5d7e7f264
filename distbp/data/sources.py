"""The sources ``distbp convert`` reads, each as a ``Source``: its rows read a chunk at a time.

- ``npz:PATH``: each member's ``.npy`` header is read from the zip (npzfile.py), its data
  streamed (stored or deflated members alike); nothing is loaded whole.
- ``fashion-mnist``: the gzip IDX files are streamed.  The in-memory dataset standardises with
  the training set's mean and standard deviation; two passes compute them, adding in numpy's
  pairwise order (``_pairwise_sum``), so X has exactly the bits of ``datasets.fashion_mnist()``.
- ``parquet:PATH``: parquet.py.
- ``csv:PATH``: csvfile.py.
"""

from __future__ import annotations

import gzip
import math
import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, one_line
from . import npzfile
from .datasets import check_names
from .idx import DEFAULT_DATA_DIR, FASHION_MNIST_FILES, _find, read_idx

CHUNK_BYTES = 8 << 20  # read at a time: the process's memory is a few of these


@dataclass
class Split:
    """A source's training or test rows: what they are, and how to read them in chunks."""

    rows: int
    x_dtype: np.dtype  # as written (native byte order)
    features: int
    y_dtype: np.dtype
    y_tail: tuple[int, ...]  # () for class ids, (C,) for float targets
    chunks: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]  # (X, y), about n rows at a time

    @property
    def row_bytes(self) -> int:
        return self.features * self.x_dtype.itemsize

    def chunk_rows(self) -> int:
        return max(1, CHUNK_BYTES // max(1, self.row_bytes + self.y_dtype.itemsize * math.prod(self.y_tail)))


@dataclass
class Source:
    name: str  # names the source in messages: npz:PATH, fashion-mnist, parquet:PATH, csv:PATH
    train: Split
    test: Split | None = None


# ---- npz ------------------------------------------------------------------------------------------

def npz_source(path: str) -> Source:
    """An ``.npz`` archive of X, y and optionally X_test, y_test; only the headers are read here
    (npzfile.py)."""
    name = f"npz:{path}"
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    members = {m.name: m for m in npzfile.read_headers(path)}
    for m in members.values():
        if m.dtype.fields is not None:
            raise DataError(f"{path}: array {m.name!r} has dtype {m.dtype}; only plain numeric arrays are read")
        if m.fortran and len(m.shape) > 1:
            raise DataError(f"{path}: array {m.name!r} is stored in Fortran (column) order, which cannot be "
                            "read a row at a time; save it with numpy.ascontiguousarray")
    check_names(path, members)

    def split(x_key: str, y_key: str) -> Split:
        x, y = members[x_key], members[y_key]
        _check_shapes(path, x_key, x.shape, x.dtype, y_key, y.shape, y.dtype)
        return Split(x.shape[0], x.dtype.newbyteorder("="), x.shape[1], y.dtype.newbyteorder("="), y.shape[1:],
                     lambda rows: _npz_chunks(path, x, y, rows))

    train = split("X", "y")
    test = split("X_test", "y_test") if "X_test" in members else None
    if test is not None:
        if test.features != train.features:
            raise DataError(f"{path}: X_test has {test.features} features but X has {train.features}")
        if test.y_tail != train.y_tail:
            raise DataError(f"{path}: y_test has shape {members['y_test'].shape} but y has {members['y'].shape}: "
                            "both class ids (N,) or both targets with the same number of columns")
    return Source(name, train, test)


def _check_shapes(path: str, x_key: str, xs, xd: np.dtype, y_key: str, ys, yd: np.dtype) -> None:
    if len(xs) != 2:
        raise DataError(f"{path}: {x_key} must be 2-D (samples, features), got shape {xs}")
    if xd.kind not in "iuf":
        raise DataError(f"{path}: {x_key} must be numeric, got dtype {xd}")
    if xs[0] == 0:
        raise DataError(f"{path}: {x_key} is empty (0 samples)")
    if xs[1] == 0:
        raise DataError(f"{path}: {x_key} has no features (shape {xs})")
    if not ((len(ys) == 1 and yd.kind in "iub") or (len(ys) == 2 and yd.kind == "f")):
        raise DataError(f"{path}: {y_key} must be (N,) integer class ids or (N, C) float targets, got {yd} {ys}")
    if ys[0] != xs[0]:
        raise DataError(f"{path}: {x_key} has {xs[0]} rows but {y_key} has {ys[0]}")


def _npz_chunks(path: str, x: npzfile.Member, y: npzfile.Member, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """X and y, ``rows`` at a time, each streamed from its member (decompressed as it goes)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(x.info) as xf, archive.open(y.info) as yf:
            for fh, m in ((xf, x), (yf, y)):
                read_exact(fh, m.header)  # read and checked by npz_source
            x_row, y_row = x.dtype.itemsize * x.shape[1], y.dtype.itemsize * math.prod(y.shape[1:])
            for lo in range(0, x.shape[0], rows):
                n = min(rows, x.shape[0] - lo)
                xb, yb = read_exact(xf, n * x_row), read_exact(yf, n * y_row)
                if len(xb) < n * x_row or len(yb) < n * y_row:
                    raise DataError(f"{path}: {x.name if len(xb) < n * x_row else y.name} data ends early near row "
                                    f"{lo}: truncated or corrupt")
                X = np.frombuffer(xb, dtype=x.dtype).reshape(n, x.shape[1])
                Y = np.frombuffer(yb, dtype=y.dtype).reshape(n, *y.shape[1:])
                yield X.astype(x.dtype.newbyteorder("="), copy=False), Y.astype(y.dtype.newbyteorder("="), copy=False)
                del X, Y, xb, yb
            for fh in (xf, yf):  # to the end of each member: the zip checks its CRC there
                while fh.read(CHUNK_BYTES):
                    pass
    except DataError:
        raise
    except npzfile.ERRORS as exc:
        raise DataError(f"{path}: not a readable .npz file ({one_line(exc)})") from None


# ---- Fashion-MNIST ----------------------------------------------------------------------------------

PIXELS = 28 * 28


def _open_images(path: Path):
    """The images file (raw or gzip) positioned after its header, and its number of images."""
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    gz = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    fh = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
    try:
        head = read_exact(fh, 16)
    except (EOFError, OSError, zlib.error) as exc:
        raw.close()
        raise DataError(f"{path}: truncated or corrupt gzip stream ({exc})") from None
    if len(head) < 16 or head[:4] != b"\x00\x00\x08\x03":
        raw.close()
        raise DataError(f"{path}: expected an IDX file of uint8 images of shape (N, 28, 28) "
                        f"(header {head[:4].hex(' ')})")
    n, h, w = (int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(3))
    if (h, w) != (28, 28) or n == 0:
        raw.close()
        raise DataError(f"{path}: expected uint8 images of shape (N, 28, 28) with N > 0, got ({n}, {h}, {w})")
    return fh, raw, n


def _pixels(path: Path, n: int, count: int) -> Iterator[bytes]:
    """The ``n`` images' pixels as bytes, ``count`` at a time (the last piece shorter); a short or
    overlong payload is a DataError."""
    fh, raw, _ = _open_images(path)
    total = n * PIXELS
    try:
        for lo in range(0, total, count):
            want = min(count, total - lo)
            data = read_exact(fh, want)
            if len(data) < want:
                raise DataError(f"{path}: payload size mismatch (truncated): {n} images need {total} bytes, "
                                f"found {lo + len(data)}")
            yield data
        if fh.read(1):
            raise DataError(f"{path}: payload size mismatch (trailing bytes) after {n} images")
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt gzip stream ({exc})") from None
    finally:
        if fh is not raw:
            fh.close()
        raw.close()


def _labels(path: Path, n: int, images: Path) -> np.ndarray:
    labels = read_idx(path)  # 1 byte a label: small, read whole
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: expected 1-D integer labels, got {labels.dtype} {labels.shape}")
    if len(labels) != n:
        raise DataError(f"{path}: {len(labels)} labels but {images} has {n} images")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > 9:
        raise DataError(f"{path}: labels must be in 0..9, found {lo}..{hi}")
    return labels.astype(np.int64)


def _pairwise_sum(n: int, take: Callable[[int], np.ndarray], leaf: int) -> np.float64:
    """The sum of the next ``n`` values of a stream (``take(k)`` gives the next ``k``), with the
    bits numpy's ``sum`` gives for all ``n`` in one array: numpy adds pairwise, halving a range
    (rounded down to a multiple of 8) until it is at most 128 long; a range of at most ``leaf``
    (>= 128) values is summed by numpy itself, in that same order."""
    if n <= leaf:
        return np.add.reduce(take(n))
    half = n // 2
    half -= half % 8
    return _pairwise_sum(half, take, leaf) + _pairwise_sum(n - half, take, leaf)


def _standardization(path: Path, n: int, progress: bool) -> tuple[np.float64, np.float64]:
    """``X.mean()`` and ``X.std() or 1.0`` of ``X = images / 255.0`` (float64), bit for bit as
    ``datasets.fashion_mnist`` computes them in memory, in two streaming passes."""
    count = n * PIXELS
    leaf = max(128, CHUNK_BYTES // 8)

    def pass_(desc: str, transform):
        stream = _pixels(path, n, leaf)
        pending = bytearray()
        bar = progress_bar(n, desc, progress)
        taken = 0

        def take(k: int) -> np.ndarray:
            nonlocal pending, taken
            while len(pending) < k:
                pending += next(stream)
            data, pending = bytes(pending[:k]), pending[k:]
            if bar is not None:
                bar.update((taken + k) // PIXELS - taken // PIXELS)
            taken += k
            return transform(np.frombuffer(data, dtype=np.uint8).astype(np.float64) / 255.0)

        try:
            total = _pairwise_sum(count, take, leaf)
            for _ in stream:  # to the end: a payload longer than the header says is an error
                pass
        finally:
            stream.close()
            if bar is not None:
                bar.close()
        return total

    mean = np.float64(pass_("mean", lambda x: x) / count)  # ndarray.mean: the sum divided by the count

    def squares(x: np.ndarray) -> np.ndarray:
        x -= mean
        return np.multiply(x, x, out=x)  # ndarray.var: (x - mean)**2 as x * x

    std = np.sqrt(pass_("std", squares) / count)
    return mean, std or 1.0


def fashion_source(data_dir: str | None, progress: bool = False) -> Source:
    """Fashion-MNIST from its IDX files (raw or gzip), standardised as ``datasets.fashion_mnist``."""
    d = Path(data_dir or DEFAULT_DATA_DIR)
    train_images, train_labels, test_images, test_labels = (_find(d, name) for name in FASHION_MNIST_FILES)
    splits = []
    for images, labels in ((train_images, train_labels), (test_images, test_labels)):
        fh, raw, n = _open_images(images)
        if fh is not raw:
            fh.close()
        raw.close()
        splits.append((images, n, _labels(labels, n, images)))
    mean, std = _standardization(train_images, splits[0][1], progress)

    def split(images: Path, n: int, y: np.ndarray) -> Split:
        def chunks(rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            lo = 0
            for data in _pixels(images, n, rows * PIXELS):
                X = np.frombuffer(data, dtype=np.uint8).reshape(-1, PIXELS).astype(np.float64)
                X /= 255.0
                X -= mean
                X /= std
                yield X, y[lo:lo + len(X)]
                lo += len(X)

        return Split(n, np.dtype(np.float64), PIXELS, np.dtype(np.int64), (), chunks)

    return Source("fashion-mnist", split(*splits[0]), split(*splits[1]))


# ---- Parquet ----------------------------------------------------------------------------------------

def progress_bar(total: int, desc: str, progress: bool):
    """A tqdm bar on stderr when ``progress`` is asked for and stderr is a terminal, else None."""
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, leave=False, file=sys.stderr)


def read_exact(fh, n: int) -> bytes:
    """``n`` bytes, fewer only at the end of the stream."""
    data = fh.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = fh.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
