"""distbp convert SRC DIR: npz, Fashion-MNIST (IDX) and Parquet into npy:DIR shards, in chunks."""

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import train_config

from distbp import cli
from distbp.data import convert, npydir, sources
from distbp.data.datasets import fashion_mnist, spirals
from distbp.loops.sync import train

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
PYARROW = 'pyarrow is not installed: pip install -e ".[dev]" (or ".[parquet]")'


# A subprocess running ``distbp convert ARGS`` through cli.main.
SUBPROCESS = "\n".join(["import sys", "from distbp import cli", "from distbp.data import convert", "{setup}",
                        'sys.exit(cli.main(["convert", *sys.argv[1:]]))'])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(npydir, "CACHE", str(tmp_path / "cache"))  # each test scans its files afresh


def run_convert(*args) -> int:
    return cli.main(["convert", *map(str, args)])


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith(".converting")]


def read_dir(directory) -> tuple:
    X, y, X_test, y_test = npydir.open_dir(str(directory))
    return X[0:len(X)], y, X_test, y_test


# ---- npz -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("save, targets", [(np.savez, False), (np.savez_compressed, False),
                                           (np.savez_compressed, True)],
                         ids=["stored", "compressed", "float-targets"])
def test_npz_to_npy_dir_has_the_same_arrays_in_several_shards(tmp_path, monkeypatch, capsys, save, targets):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 200)  # chunks of a few rows, straddling the shards
    rng = np.random.default_rng(0)
    X, X_test = rng.standard_normal((103, 5)).astype(np.float32), rng.standard_normal((17, 5)).astype(np.float32)
    y, y_test = rng.integers(0, 4, 103), rng.integers(0, 4, 17)
    if targets:
        y, y_test = rng.standard_normal((103, 3)), rng.standard_normal((17, 3))
    save(tmp_path / "src.npz", X=X, y=y, X_test=X_test, y_test=y_test)
    (tmp_path / "out").mkdir()  # an empty DIR is accepted
    assert run_convert(f"npz:{tmp_path / 'src.npz'}", tmp_path / "out", "--rows-per-shard", 10) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "103 rows in 11 shards + 17 test rows" in out and str(tmp_path / "out") in out
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == sorted([f"{a}-{i:05d}.npy" for a in "Xy" for i in range(11)] + ["X_test.npy", "y_test.npy"])
    assert len(np.load(tmp_path / "out" / "X-00010.npy")) == 3
    got = read_dir(tmp_path / "out")
    for a, b in zip(got, (X, y, X_test, y_test)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert leftovers(tmp_path) == []


def test_default_shards_are_about_256_mib(tmp_path):
    X = np.zeros((3, 4), dtype=np.float64)
    np.savez(tmp_path / "src.npz", X=X, y=np.zeros(3, dtype=np.int64))
    done = convert.convert(f"npz:{tmp_path / 'src.npz'}", str(tmp_path / "out"))
    assert done["shards"] == 1 and sorted(os.listdir(tmp_path / "out")) == ["X-00000.npy", "y-00000.npy"]
    assert done["bytes"] == sum(os.path.getsize(p) for p in (tmp_path / "out").iterdir())


def test_npy_dir_trains_to_the_bits_of_its_npz_source(ray_session, tmp_path):
    d = spirals()
    np.savez(tmp_path / "src.npz", X=d.X, y=d.y)  # float64 data, a float32 run: cast on the way in
    assert convert.convert(f"npz:{tmp_path / 'src.npz'}", str(tmp_path / "dir"), rows_per_shard=600)["shards"] == 3
    hashes = {}
    for spec, K in ((f"npz:{tmp_path / 'src.npz'}", 2), (f"npy:{tmp_path / 'dir'}", 3)):
        hashes[spec] = train(train_config(tmp_path, dataset=spec, workers=K, dtype="float32", steps=8,
                                          val_fraction=0.1))["weights_sha256"]
    assert len(set(hashes.values())) == 1, hashes


# ---- Fashion-MNIST -------------------------------------------------------------------------------

def idx_file(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    """IDX written by hand (uint8 only), raw or gzip."""
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def synthetic_fashion(directory: Path, n: int = 150, n_test: int = 40, constant: bool = False) -> Path:
    rng = np.random.default_rng(1)
    directory.mkdir()
    for prefix, count in (("train", n), ("t10k", n_test)):
        # Skewed pixels (many zeros, some bright) so that the order of the additions shows in the bits.
        images = np.full((count, 28, 28), 7) if constant else rng.integers(0, 256, (count, 28, 28)) ** 2 // 255
        idx_file(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        labels = rng.integers(0, 10, count)
        if prefix == "train":
            idx_file(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
        else:
            idx_file(directory / f"{prefix}-labels-idx1-ubyte", labels, gz=False)  # raw works too
    return directory


def assert_same_as_in_memory(out: Path, data_dir) -> None:
    expected = fashion_mnist(str(data_dir))
    got = read_dir(out)
    for a, b in zip(got, (expected.X, expected.y, expected.X_test, expected.y_test)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("constant", [False, True], ids=["images", "constant-images"])
def test_fashion_mnist_gives_the_bits_of_the_in_memory_dataset(tmp_path, monkeypatch, constant):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)  # the pairwise sums span many streamed pieces
    data_dir = synthetic_fashion(tmp_path / "fm", constant=constant)
    assert run_convert("fashion-mnist", tmp_path / "out", "--data-dir", data_dir, "--rows-per-shard", 64) == 0
    assert len(os.listdir(tmp_path / "out")) == 2 * 3 + 2
    assert_same_as_in_memory(tmp_path / "out", data_dir)


def test_the_streamed_statistics_add_in_numpys_order():
    """What the bit-exactness rests on; a plain running sum of the same values differs."""
    rng = np.random.default_rng(2)
    values = rng.random(300_001) * rng.choice([1.0, 1e-6, 1e6], 300_001)
    pos = 0

    def take(k):
        nonlocal pos
        pos += k
        return values[pos - k:pos]

    assert sources._pairwise_sum(len(values), take, 1000) == np.sum(values)
    assert np.cumsum(values)[-1] != np.sum(values)  # the order matters for these values


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"Fashion-MNIST is not in {REAL_DIR}: "
                                                  "apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_gives_the_bits_of_the_in_memory_dataset(tmp_path):
    done = convert.convert("fashion-mnist", str(tmp_path / "out"))
    assert (done["rows"], done["test_rows"], done["shards"]) == (60000, 10000, 2)
    assert_same_as_in_memory(tmp_path / "out", REAL_DIR)


def test_fashion_mnist_npy_dir_trains_to_the_bits_of_fashion_mnist(ray_session, tmp_path):
    data_dir = synthetic_fashion(tmp_path / "fm", n=120)
    convert.convert("fashion-mnist", str(tmp_path / "dir"), data_dir=str(data_dir), rows_per_shard=50)
    hashes = {spec: train(train_config(tmp_path, dataset=spec, data_dir=str(data_dir) if spec == "fashion-mnist"
                                       else None, layers="784,8,10", workers=2, steps=4))["weights_sha256"]
              for spec in ("fashion-mnist", f"npy:{tmp_path / 'dir'}")}
    assert len(set(hashes.values())) == 1, hashes


# ---- Parquet -------------------------------------------------------------------------------------

def test_parquet_round_trip(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow", reason=PYARROW)
    pq = pytest.importorskip("pyarrow.parquet", reason=PYARROW)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 256)
    rng = np.random.default_rng(3)
    a, b, y = rng.standard_normal(90).astype(np.float32), rng.integers(-5, 5, 90).astype(np.int32), \
        rng.integers(0, 3, 90)
    table = pa.table({"a": a, "name": [f"r{i}" for i in range(90)], "b": b, "label": y})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=25)
    assert run_convert(f"parquet:{tmp_path / 't.parquet'}", tmp_path / "all", "--label-column", "label",
                       "--rows-per-shard", 40) == 0
    X, got_y, X_test, _ = read_dir(tmp_path / "all")
    assert X.dtype == np.float64 and np.array_equal(X, np.column_stack([a, b]).astype(np.float64))
    assert np.array_equal(got_y, y) and X_test is None
    assert run_convert(f"parquet:{tmp_path / 't.parquet'}", tmp_path / "b", "--label-column", "label",
                       "--feature-columns", "b") == 0
    X, _, _, _ = read_dir(tmp_path / "b")
    assert X.dtype == np.int32 and np.array_equal(X[:, 0], b)


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert run_convert(f"parquet:{tmp_path / 't.parquet'}", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install" in err and "pyarrow" in err
    assert not (tmp_path / "out").exists()


# ---- bad input -----------------------------------------------------------------------------------

def good(**changes):
    arrays = dict(X=np.ones((30, 4)), y=np.arange(30) % 3)
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def last_row_nan():
    X = np.ones((30, 4))
    X[29, 2] = np.nan  # found after the first shards are written: they must go too
    return X


def fortran():
    return np.asfortranarray(np.ones((30, 4)))


BAD_NPZ = [
    (good(X=last_row_nan()), "X contains NaN or inf (first at row 29, column 2)"),
    (good(y=np.arange(30) - 1), "y has a negative label (-1 at row 0)"),
    (good(y=None), "missing array 'y'"),
    (good(X=np.ones((30, 2, 2))), "X must be 2-D"),
    (good(y=np.arange(29)), "X has 30 rows but y has 29"),
    (good(y=np.ones(30)), "y must be (N,) integer class ids or (N, C) float targets"),
    (good(X=fortran()), "Fortran (column) order"),
    (good(X_test=np.ones((5, 4))), "X_test and y_test must be given together"),
    (good(X_test=np.ones((5, 3)), y_test=np.zeros(5, dtype=int)), "X_test has 3 features but X has 4"),
    (good(X_test=np.ones((5, 4)), y_test=np.array([0, 1, 2, -7, 0])), "y_test has a negative label"),
    (good(X=np.array([["a"] * 4] * 30)), "X must be numeric"),
]


@pytest.mark.parametrize("arrays, words", BAD_NPZ, ids=[w.split(" (")[0][:40] for _, w in BAD_NPZ])
def test_bad_npz_is_one_line_exit_2_and_no_dir(tmp_path, capsys, arrays, words):
    np.savez(tmp_path / "bad.npz", **arrays)
    assert run_convert(f"npz:{tmp_path / 'bad.npz'}", tmp_path / "sub" / "out", "--rows-per-shard", 10) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "sub").exists() and leftovers(tmp_path) == []


def truncated_npz(tmp_path):
    np.savez(tmp_path / "whole.npz", X=np.ones((300, 4)), y=np.zeros(300, dtype=int))
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "src.npz").write_bytes(data[:len(data) // 2])
    return f"npz:{tmp_path / 'src.npz'}"


def corrupt_member(tmp_path):
    """A deflated member whose bytes are damaged after the header: found while streaming it."""
    with zipfile.ZipFile(tmp_path / "src.npz", "w", zipfile.ZIP_DEFLATED) as z:
        for name, arr in (("X", np.random.default_rng(0).standard_normal((3000, 4))), ("y", np.zeros(3000, int))):
            with z.open(f"{name}.npy", "w") as fh:
                np.lib.format.write_array(fh, arr)
    data = bytearray((tmp_path / "src.npz").read_bytes())
    data[5000:5100] = bytes(100)
    (tmp_path / "src.npz").write_bytes(bytes(data))
    return f"npz:{tmp_path / 'src.npz'}"


def truncated_fashion(tmp_path):
    d = synthetic_fashion(tmp_path / "fm")
    path = d / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    return "fashion-mnist"


def nonempty_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    np.savez(tmp_path / "src.npz", **good())
    return f"npz:{tmp_path / 'src.npz'}"


def null_in_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason=PYARROW)
    pq = pytest.importorskip("pyarrow.parquet", reason=PYARROW)
    pq.write_table(pa.table({"a": [1.0, None, 3.0], "y": [0, 1, 2]}), tmp_path / "t.parquet")
    return f"parquet:{tmp_path / 't.parquet'}"


def float_label_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason=PYARROW)
    pq = pytest.importorskip("pyarrow.parquet", reason=PYARROW)
    pq.write_table(pa.table({"a": [1.0, 2.0], "y": [0.0, 1.0]}), tmp_path / "t.parquet")
    return f"parquet:{tmp_path / 't.parquet'}"


@pytest.mark.parametrize("make, extra, words", [
    (lambda p: f"npz:{p / 'missing.npz'}", [], "no such file"),
    (lambda p: "mnist", [], "unknown SRC 'mnist'"),
    (truncated_npz, [], "not a readable .npz file"),
    (corrupt_member, [], "not a readable .npz file"),
    (truncated_fashion, ["--data-dir", "fm"], "payload size mismatch (truncated)"),
    (lambda p: "fashion-mnist", ["--data-dir", "nowhere"], "missing train-images-idx3-ubyte"),
    (nonempty_dir, [], "already exists and is not empty"),
    (nonempty_dir, ["--rows-per-shard", "0"], "--rows-per-shard must be at least 1"),
    (nonempty_dir, ["--label-column", "z"], "--label-column applies to parquet:PATH and csv:PATH only"),
    (null_in_parquet, [], "column 'a' has a missing value (first at row 1)"),
    (float_label_parquet, [], "label column 'y' must hold integer class ids"),
], ids=["missing", "unknown", "truncated", "corrupt-member", "truncated-idx", "no-idx", "nonempty-dir",
        "rows-per-shard", "parquet-option", "parquet-null", "parquet-float-label"])
def test_bad_sources_are_one_line_exit_2_and_no_dir(tmp_path, capsys, make, extra, words):
    src = make(tmp_path)
    extra = [str(tmp_path / e) if e in ("fm", "nowhere") else e for e in extra]
    before = sorted(os.listdir(tmp_path / "out")) if (tmp_path / "out").exists() else None
    assert run_convert(src, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    after = sorted(os.listdir(tmp_path / "out")) if (tmp_path / "out").exists() else None
    assert after == before and leftovers(tmp_path) == []  # a user's directory is untouched, nothing new


# ---- memory, signals -----------------------------------------------------------------------------

MEASURE = """
import json
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
rss = status("VmRSS")
done = convert.convert(sys.argv[1], sys.argv[2])
print(json.dumps({"rss_before": rss, "peak": status("VmHWM"), "bytes": done["bytes"]}))
sys.exit(0)
"""


def test_converting_a_large_npz_keeps_memory_far_below_its_size(tmp_path):
    rows = 200_000
    X = np.broadcast_to(np.arange(256, dtype=np.float32), (rows, 256))  # 205 MB on disk, never in memory here
    np.savez(tmp_path / "big.npz", X=X, y=np.broadcast_to(np.int64(1), (rows,)))
    size = os.path.getsize(tmp_path / "big.npz")
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS.format(setup=MEASURE),
                           f"npz:{tmp_path / 'big.npz'}", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    growth = m["peak"] - m["rss_before"]
    print(f"npz {size / 1e6:.0f} MB: peak RSS growth {growth / 1e6:.1f} MB")
    assert m["bytes"] > 0.99 * size and growth < size / 4, (growth, size)
    Xo = np.load(tmp_path / "out" / "X-00000.npy", mmap_mode="r")
    assert Xo.shape == (rows, 256) and np.array_equal(Xo[-1], X[-1])


SLOW = """
from distbp.data import sources
sources.CHUNK_BYTES = 64  # a few rows at a time, each write slowed down: the convert takes seconds
append = convert._NpyWriter.append
def slow(self, rows):
    import time
    time.sleep(0.01)
    append(self, rows)
convert._NpyWriter.append = slow
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_convert_leaves_no_dir(tmp_path, signum):
    d = spirals()
    np.savez(tmp_path / "src.npz", X=d.X, y=d.y)
    proc = subprocess.Popen([sys.executable, "-c", SUBPROCESS.format(setup=SLOW),
                             f"npz:{tmp_path / 'src.npz'}", str(tmp_path / "out"), "--rows-per-shard", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(len(os.listdir(tmp_path / t)) > 2 for t in leftovers(tmp_path)):
        time.sleep(0.05)  # until some shards are written
    assert leftovers(tmp_path), "the convert never started writing"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert not (tmp_path / "out").exists() and out == ""
    if signum == signal.SIGTERM:
        assert proc.returncode == 128 + signum
        assert err.strip() == f"distbp: stopped by SIGTERM; {tmp_path / 'out'} was not created"
        assert leftovers(tmp_path) == []
    else:  # nothing can clean up after a SIGKILL: the hidden temporary directory stays, DIR does not appear
        assert proc.returncode == -signum and len(leftovers(tmp_path)) == 1
