"""The datasets: spirals, random, Fashion-MNIST (IDX), npz, npy, CSV (csvfile.py), and a held-out
validation split.  Pure numpy.

Every loader returns a ``Dataset`` whose arrays are validated here, at the boundary, so the
core can trust them: finite features, labels in range, matching lengths.  Sizes are checked
against the memory there is before anything is allocated (``memory_available``): a size from
a flag or a file header must end in one line naming it, not in a MemoryError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import DataError, one_line, size_text
from . import npzfile
from .idx import DEFAULT_DATA_DIR, load_fashion_mnist
from .npydir import Rows, finite, lazy, open_dir


def memory_available() -> int:
    """Bytes this process can still allocate, as well as it can be known: the kernel's estimate
    of available memory (psutil, else /proc/meminfo), capped by a cgroup (container) limit; the
    physical memory where neither is known."""
    try:
        import psutil  # comes with Ray; optional
        available = int(psutil.virtual_memory().available)
    except Exception:  # not installed, or no /proc: fall back below
        available = None
    if available is None:
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            pass
    if available is None:
        try:
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return 1 << 62  # unknown: refuse nothing
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as fh, open(usage) as gh:
                text = fh.read().strip()
                if text != "max":
                    available = min(available, max(0, int(text) - int(gh.read().strip())))
            break
        except (OSError, ValueError):
            continue
    return available


def check_memory(needed: int, what: str, error: type[Exception] = DataError) -> None:
    """Raise ``error`` (one line: ``what`` needs X, Y available) unless ``needed`` bytes fit in memory."""
    available = memory_available()
    if needed > available:
        raise error(f"{what} needs about {size_text(needed)} of memory, but only {size_text(available)} "
                    "is available")


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
    # Constant images (std 0) are legitimate data, only uninformative: centre them, do not divide by 0.
    mean, std = Xtr.mean(), Xtr.std() or 1.0
    return Dataset("fashion-mnist", (Xtr - mean) / std, ytr, (Xte - mean) / std, yte, n_classes=10)


def load_npz(path: str) -> Dataset:
    """User data: ``X`` (N, D), ``y`` (N,) ints or (N, C) floats; optional ``X_test``, ``y_test``."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    check_npz(path)
    try:
        with np.load(path, allow_pickle=False, max_header_size=npzfile.MAX_HEADER) as f:
            arrays = {k: f[k] for k in f.files}
    except (*npzfile.ERRORS, MemoryError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({one_line(exc)})") from None
    check_names(path, arrays)
    return from_arrays(f"npz:{path}", arrays["X"], arrays["y"], arrays.get("X_test"), arrays.get("y_test"),
                       source=path)


def check_names(path: str, names) -> None:
    """DataError unless the arrays ``names`` of the archive ``path`` are X, y and optionally
    X_test with y_test (``--dataset npz:PATH`` and ``distbp convert npz:PATH`` alike)."""
    for key in ("X", "y"):
        if key not in names:
            raise DataError(f"{path}: missing array {key!r} (found {sorted(names) or 'none'})")
    if ("X_test" in names) != ("y_test" in names):
        raise DataError(f"{path}: X_test and y_test must be given together")
    extra = set(names) - {"X", "y", "X_test", "y_test"}
    if extra:
        raise DataError(f"{path}: unexpected arrays {sorted(extra)}; expected X, y, X_test, y_test")


def check_npz(path: str, what: str = "") -> int:
    """Read only the headers of the ``.npy`` arrays in the archive ``path`` (npzfile.py: each a
    readable array that its member really holds, without Python objects); raise DataError (one
    line) unless all of them fit in memory together.  Returns their total size in bytes.
    ``what`` names the file in messages (default: ``path``).
    """
    what = what or path
    total = sum(m.nbytes for m in npzfile.read_headers(path, what))
    check_memory(total, f"{what}: reading its arrays")
    return total


def from_arrays(name: str, X: np.ndarray, y: np.ndarray, X_test: np.ndarray | None = None,
                y_test: np.ndarray | None = None, n_classes: int | None = None, source: str | None = None) -> Dataset:
    """A validated Dataset of arrays: ``y`` (N,) integer class ids or (N, C) float targets; ``X``
    in memory, or memory-mapped (``numpy.memmap``, ``npydir.Rows``) and then read by row.

    ``n_classes`` defaults to the largest class id + 1 (of both splits).
    """
    X, y = lazy(X), np.asarray(y)  # memory-mapped features stay on disk (npydir.py)
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
    if isinstance(X, Rows):  # memory-mapped: scanned in chunks, once per version of the files
        if not finite(X, progress=f"checking {source}"):
            raise DataError(f"{source}: {x_name} contains NaN or inf")
    elif X.dtype.kind == "f" and not np.isfinite(X).all():
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
    """A dataset from its ``--dataset`` spec: spirals, fashion-mnist, random:N,D,C, npz:PATH, npy:DIR or
    csv:PATH[#label=NAME|INDEX]."""
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
        # X (N, D), the teacher's scores (N, C) and the labels (N,), all 8 bytes each
        check_memory(8 * (n * d + d * c + n * c + n), f"--dataset {spec}")
        data = random_data(n, d, c, seed=seed)
    elif spec.startswith("npz:"):
        return load_npz(spec[len("npz:"):])
    elif spec.startswith("npy:"):
        return from_arrays(spec, *open_dir(spec[len("npy:"):]), source=spec)
    elif spec.startswith("csv:"):
        from .csvfile import load_csv  # here: csvfile reads through sources.py, which imports this module

        return load_csv(spec)
    else:
        raise DataError(f"unknown dataset {spec!r}; choose spirals, fashion-mnist, random:N,D,C, npz:PATH, "
                        "npy:DIR or csv:PATH")
    validate(data)
    return data


def hold_out(data: Dataset, fraction: float, seed: int) -> Dataset:
    """Move a seeded ``fraction`` of the training set into a validation split (replaces any test split)."""
    n_val = int(round(len(data.X) * fraction))
    lazy = isinstance(data.X, Rows)  # memory-mapped rows: the split picks indices, reads nothing
    check_memory(data.y.nbytes + (len(data.X) * 8 if lazy else data.X.nbytes),
                 f"--val-fraction {fraction}: splitting {data.name}")
    if n_val < 1 or n_val >= len(data.X):
        raise DataError(f"--val-fraction {fraction} leaves {len(data.X) - n_val} training and "
                        f"{n_val} validation samples; both must be at least 1")
    perm = np.random.default_rng([seed, 0x7A1]).permutation(len(data.X))
    val, train = perm[:n_val], np.sort(perm[n_val:])
    X_train, X_val = (data.X.subset(train), data.X.subset(val)) if lazy else (data.X[train], data.X[val])
    return Dataset(data.name, X_train, data.y[train], X_val, data.y[val], data.n_classes, test_name="validation")
