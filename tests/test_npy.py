"""--dataset npy:DIR and memory-mapped arrays in fit(): read by global row index, the same bits."""

import os
import pickle

import numpy as np
import pytest
from conftest import train_config

import distbp
from distbp import cli
from distbp.data import npydir
from distbp.data.datasets import spirals
from distbp.loops.sync import train


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test scans its files afresh: the finiteness verdicts go to a cache of its own."""
    monkeypatch.setattr(npydir, "CACHE", str(tmp_path / "cache"))


def write_shards(directory, X, y, cuts):
    os.makedirs(directory, exist_ok=True)
    for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        np.save(os.path.join(directory, f"X-{i:05d}.npy"), X[lo:hi])
        np.save(os.path.join(directory, f"y-{i:05d}.npy"), y[lo:hi])


@pytest.fixture
def data(tmp_path):
    d = spirals()
    X = d.X.astype(np.float32)
    write_shards(tmp_path / "shards", X, d.y, [0, 700, 701, 1500])  # uneven, one shard of a single row
    os.makedirs(tmp_path / "one")
    np.save(tmp_path / "one" / "X.npy", X)
    np.save(tmp_path / "one" / "y.npy", d.y)
    np.savez(tmp_path / "mem.npz", X=X, y=d.y)
    return tmp_path, X, d.y


def test_rows_gather_by_global_index_across_shards(data):
    tmp_path, X, _ = data
    rows = npydir.Rows(sorted(str(p) for p in (tmp_path / "shards").glob("X-*.npy")))
    picks = np.array([1499, 0, 700, 699, 701, 700, 3])
    assert np.array_equal(rows.take(picks), X[picks])
    out = np.empty((len(picks), 2), dtype=np.float64)  # cast on the way in, as a worker does
    np.take(rows, picks, axis=0, out=out, mode="clip")
    assert np.array_equal(out, X[picks].astype(np.float64))
    assert np.array_equal(rows[690:710], X[690:710])
    sub = rows.subset(np.array([5, 1400, 700]))
    assert np.array_equal(sub.take([2, 0]), X[[700, 5]])
    again = pickle.loads(pickle.dumps(sub))  # what an actor receives: paths, mapped again there
    assert len(pickle.dumps(sub)) < 2000 and np.array_equal(again.take([1]), X[[1400]])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_npy_dir_trains_to_the_bits_of_the_same_data_in_memory(ray_session, data, dtype):
    tmp_path, _, _ = data
    runs = {}
    for name, spec, K in (("memory", f"npz:{tmp_path / 'mem.npz'}", 2), ("shards-1", f"npy:{tmp_path / 'shards'}", 1),
                          ("shards-3", f"npy:{tmp_path / 'shards'}", 3), ("single", f"npy:{tmp_path / 'one'}", 2)):
        config = train_config(tmp_path, dataset=spec, workers=K, dtype=dtype, steps=12, val_fraction=0.1)
        runs[name] = train(config)
    hashes = {name: run["weights_sha256"] for name, run in runs.items()}
    assert len(set(hashes.values())) == 1, hashes
    assert runs["shards-3"]["test_accuracy"] == runs["memory"]["test_accuracy"]  # the held-out split too


def test_fit_takes_memory_mapped_arrays(ray_session, data):
    tmp_path, X, y = data
    mapped = np.load(tmp_path / "one" / "X.npy", mmap_mode="r")
    options = dict(layers=[2, 16, 16, 3], batch_size=60, micro_batch=8, steps=6)
    in_memory = distbp.fit(np.array(X[100:]), y[100:], out=str(tmp_path / "a"), **options)
    from_disk = distbp.fit(mapped[100:], y[100:], out=str(tmp_path / "b"), **options)  # a slice of a memmap
    assert from_disk.summary["weights_sha256"] == in_memory.summary["weights_sha256"]
    assert isinstance(npydir.lazy(mapped[100:]), npydir.Rows)


@pytest.mark.parametrize("make, words", [
    (lambda d: os.unlink(d / "y-00002.npy"), "3 X shards but 2 y shards"),
    (lambda d: os.rename(d / "X-00002.npy", d / "X-00005.npy"), "without gaps"),
    (lambda d: np.save(d / "X.npy", np.zeros((3, 2))), "both X.npy and X-NNNNN.npy"),
    (lambda d: np.save(d / "y-00001.npy", np.zeros(7, dtype=np.int64)), "7 labels but X-00001.npy has 1 rows"),
    (lambda d: np.save(d / "X-00001.npy", np.zeros((1, 2), dtype=np.float64)), "does not match"),
    (lambda d: np.save(d / "X-00002.npy", np.full((799, 2), np.nan, dtype=np.float32)), "contains NaN or inf"),
    (lambda d: open(d / "X-00000.npy", "wb").write(b"not npy"), "not a readable .npy file"),
])
def test_bad_shards_are_one_line_and_exit_2(data, capsys, make, words):
    tmp_path, _, _ = data
    make(tmp_path / "shards")
    out = tmp_path / "never"
    assert cli.main(["train", "--dataset", f"npy:{tmp_path / 'shards'}", "--layers", "2,8,3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_the_finiteness_scan_runs_once_per_version_of_the_files(data, monkeypatch):
    tmp_path, X, _ = data
    rows = npydir.Rows([str(tmp_path / "one" / "X.npy")])
    scans = []
    original = npydir.Rows.chunks
    monkeypatch.setattr(npydir.Rows, "chunks", lambda self, n: scans.append(n) or original(self, n))
    assert npydir.finite(rows) and npydir.finite(rows)
    assert len(scans) == 1  # the second verdict came from the cache
    X[3, 1] = np.inf
    np.save(tmp_path / "one" / "X.npy", X)  # new contents (and size or time): scanned again
    os.utime(tmp_path / "one" / "X.npy", ns=(1, 1))
    assert not npydir.finite(npydir.Rows([str(tmp_path / "one" / "X.npy")]))
    assert len(scans) == 2
