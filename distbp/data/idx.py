"""Read IDX files (the MNIST / Fashion-MNIST format) into numpy arrays.

An IDX file is a small big-endian header followed by the raw array:

    bytes 0-1   0x00 0x00
    byte  2     type code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                0x0D float32, 0x0E float64 (multi-byte types are big-endian)
    byte  3     number of dimensions, n
    4*n bytes   each dimension as a big-endian uint32
    payload     prod(dims) items, row-major (C order)

Files may be gzip-compressed; that is detected from the gzip magic bytes
(1f 8b), not from the file name. Every problem raises DataError with a
message of the form "<path>: <what is wrong>".
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Return the file's contents, decompressed if it is a gzip stream."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}: truncated or corrupt gzip stream ({e})") from None
    return data


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (raw or gzipped) and return it as a native-endian array."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{path}: not an IDX file (magic bytes {data[:4].hex(' ')}, "
            "expected 00 00 <type> <ndim>)"
        )
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise DataError(f"{path}: unsupported IDX type code 0x{code:02X}")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated IDX header (need {header_len} bytes, got {len(data)})"
        )
    dims = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype = _DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes"
        raise DataError(
            f"{path}: payload size mismatch ({what}): dims {dims} of {dtype.name} "
            f"need {expected} bytes, found {actual}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # copy: writable, native byte order


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{data_dir}: missing {name} (or {name}.gz) in this directory; "
        "install Fashion-MNIST with `apt-get install dataset-fashion-mnist` "
        "or pass --data-dir DIR"
    )


def _load_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{labels_path}: expected 1-D integer labels, got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels but {images_path} has {len(images)} images"
        )
    if len(labels) == 0:
        raise DataError(f"{labels_path}: contains no examples")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > 9:
        raise DataError(f"{labels_path}: labels must be in 0..9, found {lo}..{hi}")
    return images.reshape(len(images), 28 * 28), labels.astype(np.int64)


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load Fashion-MNIST from data_dir (each file raw or .gz).

    Returns (X_train, y_train, X_test, y_test): X uint8 of shape (N, 784),
    y int64 of shape (N,) with values in 0..9.
    """
    d = Path(data_dir)
    # Locate all four files first so a missing one is reported before any decoding.
    train_images, train_labels, test_images, test_labels = (
        _find(d, name) for name in FASHION_MNIST_FILES
    )
    X_train, y_train = _load_split(train_images, train_labels)
    X_test, y_test = _load_split(test_images, test_labels)
    return X_train, y_train, X_test, y_test
