"""Data that changes under a run: a shard truncated mid-run is an error naming it (not SIGBUS in
the workers), a shard written in place stops the run at its next checkpoint, and a finiteness
verdict is not trusted for a file written and given its old modification time back."""

import os

import numpy as np
import pytest

import distbp
from distbp.data import datasets, npydir
from distbp.run import checkpoint


def memmapped(tmp_path, n=600):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 4))
    np.save(tmp_path / "X.npy", X)
    return np.load(tmp_path / "X.npy", mmap_mode="r"), (X[:, 0] + X[:, 1] > 0).astype(np.int64)


class AtStep(distbp.Callback):
    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step(self, record):
        if record["step"] == self.step:
            self.action()


OPTIONS = dict(layers=[4, 8, 2], workers=2, batch_size=60, micro_batch=10, steps=20, checkpoint_every=5)


def test_a_shard_truncated_during_the_run_is_one_error_naming_it(ray_session, tmp_path):
    X, y = memmapped(tmp_path)
    path = str(tmp_path / "X.npy")
    cut = AtStep(7, lambda: os.truncate(path, 128))  # the header only: every row is gone
    with pytest.raises(distbp.DataError, match=r"X\.npy: the file ends before row \d+ of the 600 its header declares"):
        distbp.fit(X, y, **OPTIONS, out=str(tmp_path / "run"), callbacks=[cut])
    result = distbp.Result.from_path(str(tmp_path / "run"))
    assert "truncated during the run" in result.error and "\n" not in result.error
    assert checkpoint.load(str(tmp_path / "run" / "checkpoint.npz"))["step"] == 5  # the one before is kept


def test_a_shard_written_in_place_stops_the_run_at_its_next_checkpoint(ray_session, tmp_path):
    X, y = memmapped(tmp_path)
    path = str(tmp_path / "X.npy")

    def overwrite():
        with open(path, "r+b") as fh:  # same size, other values
            fh.seek(-8 * 40, os.SEEK_END)
            fh.write(np.ones(40).tobytes())

    with pytest.raises(distbp.DataError, match=r"X\.npy changed during the run .*the last checkpoint \(step 5\)"):
        distbp.fit(X, y, **OPTIONS, out=str(tmp_path / "run"), callbacks=[AtStep(7, overwrite)])
    assert checkpoint.load(str(tmp_path / "run" / "checkpoint.npz"))["step"] == 5


def test_a_finiteness_verdict_is_not_trusted_after_a_write_with_the_old_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(npydir, "CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "data"
    directory.mkdir()
    X = np.random.default_rng(1).standard_normal((50, 3))
    np.save(directory / "X.npy", X)
    np.save(directory / "y.npy", np.arange(50) % 2)
    datasets.load(f"npy:{directory}")  # scanned: the verdict is cached
    st = os.stat(directory / "X.npy")
    X[17, 2] = np.nan
    with open(directory / "X.npy", "r+b") as fh:  # the same bytes but one value, in place
        fh.seek(-X.nbytes, os.SEEK_END)
        fh.write(X.tobytes())
    os.utime(directory / "X.npy", ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime back
    assert os.stat(directory / "X.npy").st_mtime_ns == st.st_mtime_ns
    with pytest.raises(distbp.DataError, match="contains NaN or inf"):
        datasets.load(f"npy:{directory}")


def test_rows_read_with_pread_are_the_mapped_rows(tmp_path):
    """Reading by pread gives the bytes a mapping gives, for any order, repeats and shards."""
    X = np.random.default_rng(2).standard_normal((40, 5)).astype(np.float32)
    np.save(tmp_path / "X-00000.npy", X[:25])
    np.save(tmp_path / "X-00001.npy", X[25:])
    rows = npydir.Rows([str(tmp_path / "X-00000.npy"), str(tmp_path / "X-00001.npy")])
    index = np.array([39, 0, 1, 2, 24, 25, 26, 3, 3, 38, 10])
    assert rows.take(index).tobytes() == X[index].tobytes()
    out = np.empty((len(index), 5), dtype=np.float64)
    rows.take(index, out=out)
    assert out.tobytes() == X[index].astype(np.float64).tobytes()
    assert rows[5:30].tobytes() == X[5:30].tobytes() and rows.changed() is None
