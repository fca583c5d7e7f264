"""Tests for distbp.data.idx: IDX parsing (raw and gzipped) and the Fashion-MNIST loader."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from distbp.data.idx import FASHION_MNIST_FILES, load_fashion_mnist, read_idx
from distbp.errors import DataError

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")

TYPE_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode arr as IDX, written by hand here so the tests do not trust the reader."""
    header = bytes([0, 0, TYPE_CODES[arr.dtype], arr.ndim])
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", list(TYPE_CODES), ids=lambda d: d.name)
def test_round_trip(tmp_path: Path, dtype: np.dtype, gz: bool) -> None:
    arr = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    path = write(tmp_path / "a.idx", idx_bytes(arr), gz=gz)
    out = read_idx(path)
    assert out.dtype == dtype and out.dtype.isnative
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 1  # a writable copy, not a view on the file bytes


def test_gzip_detected_by_magic_not_suffix(tmp_path: Path) -> None:
    arr = np.arange(10, dtype=np.uint8)
    gz_no_suffix = write(tmp_path / "labels-idx1-ubyte", idx_bytes(arr), gz=True)
    raw_with_suffix = write(tmp_path / "labels-idx1-ubyte.gz", idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(gz_no_suffix), arr)
    np.testing.assert_array_equal(read_idx(raw_with_suffix), arr)


def test_accepts_str_path(tmp_path: Path) -> None:
    arr = np.zeros((3, 2), dtype=np.uint8)
    path = write(tmp_path / "x", idx_bytes(arr))
    assert read_idx(str(path)).shape == (3, 2)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


def test_wrong_magic(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.idx", b"PK\x03\x04" + bytes(16))
    with pytest.raises(DataError) as exc:
        read_idx(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: ")
    assert "not an IDX file" in msg and "50 4b 03 04" in msg


def test_unsupported_type_code(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.idx", bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\0"
    )
    with pytest.raises(DataError, match=r"unsupported IDX type code 0x07"):
        read_idx(path)


@pytest.mark.parametrize(
    "data",
    [b"", b"\0\0", bytes([0, 0, 8, 3]) + struct.pack(">I", 5)],
    ids=["empty", "2B", "dims"],
)
def test_truncated_header(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path / "h.idx", data)
    with pytest.raises(DataError, match=r"too short|truncated IDX header") as exc:
        read_idx(path)
    assert str(exc.value).startswith(f"{path}: ")


def test_zero_dims(tmp_path: Path) -> None:
    path = write(tmp_path / "z.idx", bytes([0, 0, 8, 0]))
    with pytest.raises(DataError, match="0 dimensions"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_payload(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))  # 16 header + 3136 payload
    path = write(tmp_path / "images", data[:-100], gz=gz)
    with pytest.raises(DataError) as exc:
        read_idx(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: ")
    assert "truncated" in msg and "need 3136 bytes" in msg and "found 3036" in msg


def test_trailing_bytes(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros(5, dtype=np.int32))  # 20-byte payload
    path = write(tmp_path / "labels", data + b"xyz")
    with pytest.raises(DataError, match=r"trailing bytes.*need 20 bytes, found 23"):
        read_idx(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blob = gzip.compress(idx_bytes(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)))
    path = write(tmp_path / "images.gz", blob[: len(blob) // 2])
    with pytest.raises(DataError) as exc:
        read_idx(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: ") and "truncated or corrupt gzip stream" in msg


def test_corrupt_gzip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    blob = bytearray(
        gzip.compress(idx_bytes(rng.integers(0, 256, 4000, dtype=np.uint8)))
    )
    mid = len(blob) // 2
    blob[mid : mid + 8] = bytes(b ^ 0xFF for b in blob[mid : mid + 8])
    path = write(tmp_path / "labels.gz", bytes(blob))
    with pytest.raises(DataError, match="truncated or corrupt gzip stream"):
        read_idx(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.idx"
    with pytest.raises(DataError, match=r"cannot read file") as exc:
        read_idx(path)
    assert str(exc.value).startswith(f"{path}: ")


# ------------------------------------------------------ load_fashion_mnist


def make_fake_dataset(
    d: Path, n_train: int = 6, n_test: int = 4, gz_names: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(
            0, 256, (n_train, 28, 28), dtype=np.uint8
        ),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(
            0, 256, (n_test, 28, 28), dtype=np.uint8
        ),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        gz = name in gz_names
        write(d / (name + ".gz" if gz else name), idx_bytes(arr), gz=gz)
    return arrays


def test_load_fake_dataset_mixed_raw_and_gz(tmp_path: Path) -> None:
    arrays = make_fake_dataset(
        tmp_path, gz_names=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    )
    X_train, y_train, X_test, y_test = load_fashion_mnist(tmp_path)
    assert X_train.shape == (6, 784) and X_test.shape == (4, 784)
    assert X_train.dtype == np.uint8 and X_test.dtype == np.uint8
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    np.testing.assert_array_equal(
        X_train, arrays["train-images-idx3-ubyte"].reshape(6, 784)
    )
    np.testing.assert_array_equal(y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(
        X_test, arrays["t10k-images-idx3-ubyte"].reshape(4, 784)
    )
    np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])


@pytest.mark.parametrize("missing", FASHION_MNIST_FILES)
def test_missing_file_in_dataset(tmp_path: Path, missing: str) -> None:
    make_fake_dataset(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(DataError) as exc:
        load_fashion_mnist(tmp_path)
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path}: ")
    assert missing in msg and f"{missing}.gz" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "\n" not in msg


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "does-not-exist")


def test_mismatched_counts(tmp_path: Path) -> None:
    make_fake_dataset(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(
        DataError, match=r"3 labels but .*t10k-images-idx3-ubyte has 4 images"
    ):
        load_fashion_mnist(tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    make_fake_dataset(tmp_path)
    write(
        tmp_path / "train-labels-idx1-ubyte",
        idx_bytes(np.array([0, 1, 2, 3, 4, 10], np.uint8)),
    )
    with pytest.raises(
        DataError, match=r"train-labels-idx1-ubyte: labels must be in 0\.\.9"
    ):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((6, 27, 28), np.uint8),
        np.zeros((6, 784), np.uint8),
        np.zeros((6, 28, 28), np.int32),
    ],
    ids=["27x28", "2-D", "int32"],
)
def test_bad_image_shape_or_type(tmp_path: Path, images: np.ndarray) -> None:
    make_fake_dataset(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images))
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte: expected uint8 images"
    ):
        load_fashion_mnist(tmp_path)


def test_labels_not_1d(tmp_path: Path) -> None:
    make_fake_dataset(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros((4, 1), np.uint8)))
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte: expected 1-D integer labels"
    ):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"Fashion-MNIST is not in {REAL_DIR}: "
                                                  "apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist() -> None:
    X_train, y_train, X_test, y_test = load_fashion_mnist(REAL_DIR)
    assert X_train.shape == (60000, 784) and X_train.dtype == np.uint8
    assert X_test.shape == (10000, 784) and X_test.dtype == np.uint8
    assert y_train.shape == (60000,) and y_train.dtype == np.int64
    assert y_test.shape == (10000,) and y_test.dtype == np.int64
    # Fashion-MNIST is balanced: every class 0..9 present, 6000 / 1000 each.
    np.testing.assert_array_equal(np.bincount(y_train, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), [1000] * 10)
