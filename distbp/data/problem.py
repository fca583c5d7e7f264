"""What the options and the data decide before any process starts: checked, nothing written."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..errors import DataError, UsageError
from ..lecture.network import Layout, encode_targets
from . import datasets
from .sampler import Sampler


@dataclass
class Problem:
    """The data in the run's dtype, the layer sizes, the sampler and the number of steps."""

    data: datasets.Dataset
    layers: tuple[int, ...]
    X: np.ndarray  # training features in the run's dtype
    Y: np.ndarray  # training labels as backprop wants them
    sampler: Sampler
    total_steps: int

    @property
    def test_name(self) -> str | None:
        """``test`` or ``validation``: the split evaluated each epoch; None without one."""
        return self.data.test_name if self.data.X_test is not None else None


def prepare(config: Config, data: datasets.Dataset | None = None) -> Problem:
    """Load the data (``config.dataset``, unless ``data`` is given) and check that it fits the
    options; raises DataError or UsageError."""
    if data is None:
        data = datasets.load(config.dataset, config.data_dir, config.seed)
    if config.val_fraction:
        data = datasets.hold_out(data, config.val_fraction, config.seed)
    layers = config.layer_sizes() or (data.n_features, 64, 64, data.n_outputs)
    if layers[0] != data.n_features:
        raise UsageError(f"--layers starts with {layers[0]} inputs but {data.name} has "
                         f"{data.n_features} features")
    if layers[-1] != data.n_outputs:
        raise UsageError(f"--layers ends with {layers[-1]} outputs but {data.name} has "
                         f"{data.n_outputs} {'classes' if data.n_classes else 'targets'}")
    if data.n_classes is None and config.loss == "cross-entropy":
        raise UsageError(f"{data.name} has float targets: use --loss squared")
    if config.servers > Layout(layers).size:
        raise UsageError(f"--servers {config.servers} is more than the {Layout(layers).size} weights to share out")
    if config.batch_size > len(data.X):
        raise UsageError(f"--batch-size {config.batch_size} is larger than the training set "
                         f"({len(data.X)} samples)")
    dtype = np.dtype(config.dtype)
    with np.errstate(over="ignore"):
        X = np.ascontiguousarray(data.X, dtype=dtype)
        Y = encode_targets(data.y, config.loss, layers[-1], dtype)
    for name, values in (("features", X), ("targets", Y)):
        if not np.isfinite(values).all():  # finite in the file, but not in the run's dtype
            raise DataError(f"{data.name}: {name} overflow {dtype} (largest magnitude "
                            f"{np.nanmax(np.abs(data.X if name == 'features' else data.y)):.3g}); "
                            "scale the data or use --dtype float64")
    sampler = Sampler(len(X), config.batch_size, config.seed)
    total = config.steps or max(1, math.ceil(config.epochs * sampler.steps_per_epoch))
    return Problem(data, layers, X, Y, sampler, total)
