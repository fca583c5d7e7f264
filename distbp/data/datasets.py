"""The datasets: spirals, random, Fashion-MNIST (IDX), npz, and a held-out validation split.  Pure numpy.

Every loader returns a ``Dataset`` whose arrays are validated here, at the boundary, so the
core can trust them: finite features, labels in range, matching lengths.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .idx import DEFAULT_DATA_DIR, load_fashion_mnist


@dataclass
class Dataset:
    """Training arrays and an optional test split.

    ``y`` is ``(N,)`` class ids (``n_classes`` of them) or ``(N, C)`` float targets
    (``n_classes`` is then None: squared error only).
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    n_classes: int | None = None
    test_name: str = "test"  # "test", or "validation" when held out with --val-fraction

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    @property
    def n_outputs(self) -> int:
        return self.n_classes if self.n_classes is not None else self.y.shape[1]


def spirals(n_per_class: int = 500, classes: int = 3, noise: float = 0.2, seed: int = 0) -> Dataset:
    """Interleaved 2-D spirals (the CS231n toy problem): not linearly separable, learnt in seconds."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for c in range(classes):
        r = np.linspace(0.0, 1.0, n_per_class)
        t = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + rng.standard_normal(n_per_class) * noise
        X.append(np.column_stack([r * np.sin(t), r * np.cos(t)]))
        y.append(np.full(n_per_class, c))
    return Dataset("spirals", np.concatenate(X), np.concatenate(y).astype(np.int64), n_classes=classes)


def random_data(n: int, d: int, c: int, seed: int = 0) -> Dataset:
    """``n`` seeded Gaussian samples with ``d`` features and labels from a random linear teacher."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = (X @ rng.standard_normal((d, c))).argmax(axis=1)
    return Dataset(f"random:{n},{d},{c}", X, y.astype(np.int64), n_classes=c)


def fashion_mnist(data_dir: str | None = None) -> Dataset:
    """The shipped 60k/10k split; pixels scaled to [0, 1], then standardised with the
    training set's mean and standard deviation only (one scalar each, so blank corner
    pixels cannot blow up)."""
    Xtr, ytr, Xte, yte = load_fashion_mnist(data_dir or DEFAULT_DATA_DIR)
    Xtr = Xtr.astype(np.float64) / 255.0
    Xte = Xte.astype(np.float64) / 255.0
    mean, std = Xtr.mean(), Xtr.std()
    return Dataset("fashion-mnist", (Xtr - mean) / std, ytr, (Xte - mean) / std, yte, n_classes=10)


def load_npz(path: str) -> Dataset:
    """User data: ``X`` (N, D), ``y`` (N,) ints or (N, C) floats; optional ``X_test``, ``y_test``."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    for key in ("X", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (found {sorted(arrays) or 'none'})")
    if ("X_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: X_test and y_test must be given together")
    extra = set(arrays) - {"X", "y", "X_test", "y_test"}
    if extra:
        raise DataError(f"{path}: unexpected arrays {sorted(extra)}; expected X, y, X_test, y_test")
    return from_arrays(f"npz:{path}", arrays["X"], arrays["y"], arrays.get("X_test"), arrays.get("y_test"),
                       source=path)


def from_arrays(name: str, X: np.ndarray, y: np.ndarray, X_test: np.ndarray | None = None,
                y_test: np.ndarray | None = None, n_classes: int | None = None, source: str | None = None) -> Dataset:
    """A validated Dataset of in-memory arrays: ``y`` (N,) integer class ids or (N, C) float targets.

    ``n_classes`` defaults to the largest class id + 1 (of both splits).
    """
    X, y = np.asarray(X), np.asarray(y)
    X_test, y_test = (None, None) if X_test is None else (np.asarray(X_test), np.asarray(y_test))
    if n_classes is None and y.ndim == 1 and y.dtype.kind in "iub":
        labels = [y] + ([y_test] if y_test is not None else [])
        n_classes = int(max(int(v.max()) for v in labels if v.size)) + 1 if y.size else 0
    data = Dataset(name, X, y, X_test, y_test, n_classes=n_classes)
    validate(data, source=source)
    return data


def _check_split(X, y, n_classes, source: str, which: str) -> None:
    x_name, y_name = ("X", "y") if which == "train" else ("X_test", "y_test")
    if X.ndim != 2:
        raise DataError(f"{source}: {x_name} must be 2-D (samples, features), got shape {X.shape}")
    if X.dtype.kind not in "iuf":
        raise DataError(f"{source}: {x_name} must be numeric, got dtype {X.dtype}")
    if len(X) == 0:
        raise DataError(f"{source}: {x_name} is empty (0 samples)")
    if len(y) != len(X):
        raise DataError(f"{source}: {x_name} has {len(X)} rows but {y_name} has {len(y)}")
    if X.dtype.kind == "f" and not np.isfinite(X).all():
        bad = np.argwhere(~np.isfinite(X))[0]
        raise DataError(f"{source}: {x_name} contains NaN or inf (first at row {bad[0]}, column {bad[1]})")
    if n_classes is not None:
        if y.ndim != 1 or y.dtype.kind not in "iub":
            raise DataError(f"{source}: {y_name} must be 1-D integer class ids, got {y.dtype} {y.shape}")
        if y.min() < 0 or y.max() >= n_classes:
            raise DataError(f"{source}: {y_name} has labels outside 0..{n_classes - 1} "
                            f"(min {y.min()}, max {y.max()})")
    else:
        if y.ndim != 2 or y.dtype.kind != "f":
            raise DataError(f"{source}: {y_name} must be (N,) integer ids or (N, C) float targets, "
                            f"got {y.dtype} {y.shape}")
        if not np.isfinite(y).all():
            raise DataError(f"{source}: {y_name} contains NaN or inf")


def validate(data: Dataset, source: str | None = None) -> None:
    """Raise DataError naming the first problem; the core trusts data that passes."""
    source = source or data.name
    _check_split(data.X, data.y, data.n_classes, source, "train")
    if data.X_test is not None:
        _check_split(data.X_test, data.y_test, data.n_classes, source, "test")
        if data.X_test.shape[1] != data.X.shape[1]:
            raise DataError(f"{source}: X_test has {data.X_test.shape[1]} features but X has {data.X.shape[1]}")
        if data.n_classes is None and data.y_test.shape[1] != data.y.shape[1]:
            raise DataError(f"{source}: y_test has {data.y_test.shape[1]} outputs but y has {data.y.shape[1]}")


def load(spec: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """A dataset from its ``--dataset`` spec: spirals, fashion-mnist, random:N,D,C or npz:PATH."""
    if spec == "spirals":
        data = spirals(seed=seed)
    elif spec == "fashion-mnist":
        data = fashion_mnist(data_dir)
    elif spec.startswith("random:"):
        try:
            n, d, c = (int(v) for v in spec[len("random:"):].split(","))
        except ValueError:
            raise DataError(f"--dataset {spec}: expected random:N,D,C with three integers") from None
        if n < 1 or d < 1 or c < 2:
            raise DataError(f"--dataset {spec}: need N >= 1 samples, D >= 1 features, C >= 2 classes")
        data = random_data(n, d, c, seed=seed)
    elif spec.startswith("npz:"):
        return load_npz(spec[len("npz:"):])
    else:
        raise DataError(f"unknown dataset {spec!r}; choose spirals, fashion-mnist, random:N,D,C or npz:PATH")
    validate(data)
    return data


def hold_out(data: Dataset, fraction: float, seed: int) -> Dataset:
    """Move a seeded ``fraction`` of the training set into a validation split (replaces any test split)."""
    n_val = int(round(len(data.X) * fraction))
    if n_val < 1 or n_val >= len(data.X):
        raise DataError(f"--val-fraction {fraction} leaves {len(data.X) - n_val} training and "
                        f"{n_val} validation samples; both must be at least 1")
    perm = np.random.default_rng([seed, 0x7A1]).permutation(len(data.X))
    val, train = perm[:n_val], np.sort(perm[n_val:])
    return Dataset(data.name, data.X[train], data.y[train], data.X[val], data.y[val],
                   data.n_classes, test_name="validation")
