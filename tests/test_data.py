"""Datasets and the sampler: npz validation, the generated sets, hold-out splits, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distbp.cli import main
from distbp.data.datasets import fashion_mnist, hold_out, load, load_npz, random_data, spirals
from distbp.data.idx import load_fashion_mnist
from distbp.data.sampler import Sampler
from distbp.errors import DataError

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
rng = np.random.default_rng(0)
X20 = rng.standard_normal((20, 3))
Y20 = np.arange(20) % 4


def npz(tmp_path: Path, **arrays) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


# ---------------------------------------------------------------- npz: what loads


def test_npz_classification_with_test_split(tmp_path: Path) -> None:
    X_test = rng.standard_normal((5, 3))
    data = load_npz(npz(tmp_path, X=X20, y=Y20, X_test=X_test, y_test=np.array([0, 1, 2, 3, 4])))
    np.testing.assert_array_equal(data.X, X20)
    np.testing.assert_array_equal(data.X_test, X_test)
    assert data.n_classes == 5  # the largest label of either split decides
    assert data.n_features == 3 and data.n_outputs == 5


def test_npz_float_targets_are_regression(tmp_path: Path) -> None:
    data = load_npz(npz(tmp_path, X=X20, y=rng.standard_normal((20, 2))))
    assert data.n_classes is None and data.n_outputs == 2 and data.X_test is None


def test_npz_integer_features_accepted(tmp_path: Path) -> None:
    data = load_npz(npz(tmp_path, X=np.arange(40, dtype=np.uint8).reshape(20, 2), y=Y20))
    assert data.X.shape == (20, 2)


# ---------------------------------------------------------------- npz: what is refused


def bad_nan():
    X = X20.copy()
    X[7, 2] = np.nan
    return X


def bad_inf():
    X = X20.copy()
    X[2, 0] = -np.inf
    return X


@pytest.mark.parametrize("arrays, words", [
    (dict(X=X20[:, 0], y=Y20), "X must be 2-D"),
    (dict(X=X20.reshape(20, 3, 1), y=Y20), "X must be 2-D"),
    (dict(X=X20, y=Y20[:19]), "X has 20 rows but y has 19"),
    (dict(X=X20[:0], y=Y20[:0]), "X is empty"),
    (dict(X=X20.astype(str), y=Y20), "X must be numeric"),
    (dict(X=X20.astype(complex), y=Y20), "X must be numeric"),
    (dict(X=bad_nan(), y=Y20), "X contains NaN or inf (first at row 7, column 2)"),
    (dict(X=bad_inf(), y=Y20), "X contains NaN or inf (first at row 2, column 0)"),
    (dict(X=X20, y=Y20 - 1), "labels outside"),
    (dict(X=X20, y=Y20.astype(np.float64)), "y must be (N,) integer ids or (N, C) float targets"),
    (dict(X=X20, y=np.full((20, 2), np.nan)), "y contains NaN or inf"),
    (dict(X=X20, y=Y20.reshape(20, 1)), "y must be (N,) integer ids or (N, C) float targets"),
    (dict(X=X20), "missing array 'y'"),
    (dict(y=Y20), "missing array 'X'"),
    (dict(X=X20, y=Y20, X_test=X20), "X_test and y_test must be given together"),
    (dict(X=X20, y=Y20, y_test=Y20), "X_test and y_test must be given together"),
    (dict(X=X20, y=Y20, X_test=X20[:, :2], y_test=Y20), "X_test has 2 features but X has 3"),
    (dict(X=X20, y=Y20, X_test=X20, y_test=Y20[:5]), "X_test has 20 rows but y_test has 5"),
    (dict(X=X20, y=Y20, X_test=X20, y_test=-Y20), "y_test has labels outside"),
    (dict(X=X20, y=Y20, X_test=bad_nan(), y_test=Y20), "X_test contains NaN"),
    (dict(X=X20, y=Y20, weights=Y20), "unexpected arrays ['weights']"),
])
def test_npz_refused(tmp_path: Path, arrays: dict, words: str) -> None:
    path = npz(tmp_path, **arrays)
    with pytest.raises(DataError) as exc:
        load_npz(path)
    assert str(exc.value).startswith(path) and words in str(exc.value), str(exc.value)


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_npz(str(tmp_path / "nope.npz"))


@pytest.mark.parametrize("content", [b"X,y\n1,0\n", b"", b"PK\x03\x04 truncated zip"])
def test_npz_not_an_npz(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a readable .npz file"):
        load_npz(str(path))


def test_npz_pickled_objects_refused(tmp_path: Path) -> None:
    # An object array can only be stored pickled; loading it would run code, so it is refused.
    path = npz(tmp_path, X=np.array([[1.0], [2.0]], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError, match="not a readable .npz file"):
        load_npz(path)


def test_npz_error_from_the_command_line(tmp_path: Path, capsys) -> None:
    path = npz(tmp_path, X=X20, y=Y20, X_test=X20)
    out = tmp_path / "never"
    assert main(["train", "--dataset", f"npz:{path}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"distbp: error: {path}: X_test and y_test must be given together\n"
    assert not out.exists()


# ---------------------------------------------------------------- generated data


def test_spirals() -> None:
    data = spirals(n_per_class=100, classes=4, seed=3)
    assert data.X.shape == (400, 2) and data.n_classes == 4
    np.testing.assert_array_equal(np.bincount(data.y), [100] * 4)
    # Each arm's radius runs evenly from 0 to 1 whatever the angle noise.
    for c in range(4):
        radius = np.hypot(*data.X[data.y == c].T)
        np.testing.assert_allclose(radius, np.linspace(0, 1, 100), atol=1e-12)
    np.testing.assert_array_equal(spirals(100, 4, seed=3).X, data.X)
    assert not np.array_equal(spirals(100, 4, seed=4).X, data.X)


def test_random_data_is_seeded_and_shaped() -> None:
    a, b, c = random_data(50, 4, 3, seed=1), random_data(50, 4, 3, seed=1), random_data(50, 4, 3, seed=2)
    assert a.X.shape == (50, 4) and a.y.shape == (50,) and a.n_classes == 3
    assert a.y.min() >= 0 and a.y.max() < 3
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.X, c.X)
    assert load("random:50,4,3", seed=1).name == "random:50,4,3"


@pytest.mark.parametrize("spec, words", [
    ("random:10,2", "three integers"),
    ("random:a,b,c", "three integers"),
    ("random:10,2,1", "C >= 2"),
    ("random:0,2,2", "N >= 1"),
    ("mnist", "unknown dataset 'mnist'"),
])
def test_bad_dataset_spec(spec: str, words: str) -> None:
    with pytest.raises(DataError, match=words):
        load(spec)


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"Fashion-MNIST is not in {REAL_DIR}: "
                                                  "apt-get install dataset-fashion-mnist")
def test_fashion_mnist_standardised_with_training_statistics_only() -> None:
    data = fashion_mnist(str(REAL_DIR))
    raw_train, _, raw_test, _ = load_fashion_mnist(REAL_DIR)
    pixels = raw_train.astype(np.float64) / 255
    mean, std = pixels.mean(), pixels.std()
    assert abs(data.X.mean()) < 1e-9 and abs(data.X.std() - 1) < 1e-9
    np.testing.assert_allclose(data.X_test, (raw_test / 255 - mean) / std, rtol=1e-12)
    assert abs(data.X_test.mean()) > 1e-4  # the test set's own statistics were not used


# ---------------------------------------------------------------- hold-out validation


def indexed(n: int = 100):
    """A dataset whose single feature is the row number, so rows can be traced."""
    from distbp.data.datasets import Dataset

    X = np.arange(n, dtype=np.float64).reshape(n, 1)
    return Dataset("rows", X, np.arange(n) % 3, X + 1000, np.zeros(n, dtype=np.int64), n_classes=3)


def test_hold_out_partitions_the_training_set() -> None:
    data = hold_out(indexed(), 0.2, seed=5)
    train_rows, val_rows = data.X[:, 0].astype(int), data.X_test[:, 0].astype(int)
    assert len(val_rows) == 20 and len(train_rows) == 80
    assert sorted(np.concatenate([train_rows, val_rows]).tolist()) == list(range(100))
    np.testing.assert_array_equal(data.y, train_rows % 3)  # labels travel with their rows
    np.testing.assert_array_equal(data.y_test, val_rows % 3)
    assert data.test_name == "validation"  # and the original test split (rows >= 1000) is gone


def test_hold_out_is_seeded() -> None:
    a, b, c = (hold_out(indexed(), 0.2, seed=s).X_test for s in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_hold_out_leaves_both_sides_nonempty(fraction: float) -> None:
    with pytest.raises(DataError, match="both must be at least 1"):
        hold_out(indexed(), fraction, seed=0)


# ---------------------------------------------------------------- the sampler


def test_each_epoch_is_a_permutation_cut_into_batches() -> None:
    s = Sampler(103, 10, seed=0)
    assert s.steps_per_epoch == 11
    epochs = []
    for e in range(3):
        batches = [s.batch(e * 11 + j) for j in range(1, 12)]  # steps count from 1
        assert [len(b) for b in batches] == [10] * 10 + [3]
        order = np.concatenate(batches)
        assert sorted(order.tolist()) == list(range(103))
        epochs.append(order)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_sampler_is_a_pure_function_of_the_step() -> None:
    # Random access (as after a resume) gives the batches a run in order gives.
    in_order = {step: Sampler(50, 8, seed=2).batch(step) for step in range(1, 22)}  # steps count from 1
    s = Sampler(50, 8, seed=2)
    for step in [21, 4, 15, 1, 8, 21, 10]:
        np.testing.assert_array_equal(s.batch(step), in_order[step])
    assert not np.array_equal(Sampler(50, 8, seed=3).batch(1), in_order[1])


def test_batches_do_not_depend_on_the_worker_count(tmp_path: Path) -> None:
    from conftest import train_config

    from distbp.data.problem import prepare

    samplers = [prepare(train_config(tmp_path, workers=k, micro_batch=m)).sampler for k, m in ((1, 8), (3, 8), (7, 5))]
    for step in range(1, 31):
        first = samplers[0].batch(step)
        for s in samplers[1:]:
            np.testing.assert_array_equal(s.batch(step), first)
