"""What the options and the data decide before any process starts: checked, nothing written.

``prepare`` runs before the run directory is made and before any large allocation, so every
refusal here (a size that cannot fit in memory included) leaves nothing behind.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .. import faults
from ..config import AUTO, Config
from ..errors import DataError, UsageError
from ..lecture.network import Layout, encode_targets
from . import datasets
from .npydir import Rows, finite
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

    def check_unchanged(self, saved: int) -> None:
        """DataError naming the file if memory-mapped training data (``npy:DIR``) is no longer the
        file the run opened: the steps since may have trained on other rows (checked before each
        checkpoint, so that none is written of them)."""
        path = self.X.changed() if isinstance(self.X, Rows) else None
        if path is not None:
            raise DataError(f"{path} changed during the run (written, replaced or truncated after it was opened); "
                            f"the last checkpoint (step {saved}) is from before: put the data back as it was "
                            "and resume, or start a new run on the new data")

    def layer_list(self) -> str:
        """The layer sizes as ``--layers`` takes them (``2,64,64,3``): a run's checkpoints record
        these, also where they were derived from the data, so that every run loads back."""
        return ",".join(str(d) for d in self.layers)

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
    if config.servers != AUTO and config.servers > Layout(layers).size:
        raise UsageError(f"--servers {config.servers} is more than the {Layout(layers).size} weights to share out")
    if config.batch_size > len(data.X):
        raise UsageError(f"--batch-size {config.batch_size} is larger than the training set "
                         f"({len(data.X)} samples)")
    sampler = Sampler(len(data.X), config.batch_size, config.seed)
    steps = config.epochs * sampler.steps_per_epoch
    if config.steps is None and not math.isfinite(steps):
        raise UsageError(f"--epochs {config.epochs} is more steps than can be counted; give fewer")
    total = config.steps or max(1, math.ceil(steps))
    faults.check_steps(faults.parse(config.fault_injection, config.max_workers), total)
    _check_memory(config, data, layers)
    dtype = np.dtype(config.dtype)
    with np.errstate(over="ignore"):
        # Memory-mapped features stay on disk: each worker casts the rows it gathers (npydir.py).
        X = data.X if isinstance(data.X, Rows) else np.ascontiguousarray(data.X, dtype=dtype)
        Y = encode_targets(data.y, config.loss, layers[-1], dtype)
    if isinstance(X, Rows) and not finite(X, dtype, progress=f"checking {data.name} in {dtype}"):
        raise DataError(f"{data.name}: features overflow {dtype}; scale the data or use --dtype float64")
    for name, values in (("features", X), ("targets", Y)):
        if isinstance(values, Rows):
            continue  # checked just above, in chunks
        if not np.isfinite(values).all():  # finite in the file, but not in the run's dtype
            raise DataError(f"{data.name}: {name} overflow {dtype} (largest magnitude "
                            f"{np.nanmax(np.abs(data.X if name == 'features' else data.y)):.3g}); "
                            "scale the data or use --dtype float64")
    return Problem(data, layers, X, Y, sampler, total)


EVAL_CHUNK = 4096  # rows lecture.network.evaluate works on at once


def memory_needed(config: Config, data: datasets.Dataset, layers: tuple[int, ...]) -> int:
    """A lower bound on the bytes a run of ``config`` still allocates on this machine, the data
    already loaded aside.

    The driver holds the weights, their initial copy and up to two optimizer buffers (4 vectors)
    and evaluates in chunks; each worker holds the weights and at least one gradient node (2
    vectors) and a micro-batch's activations; the servers together at least the weights and the
    gradient sum (2 vectors).  On a cluster the actors are spread over machines: this one must
    hold the driver and at least one of them.
    """
    itemsize = np.dtype(config.dtype).itemsize
    vector = Layout(layers).size * itemsize
    per_row = (sum(d + 1 for d in layers) + 3 * sum(layers[1:]) + 1) * itemsize  # network.Workspace
    n_test = 0 if data.X_test is None else len(data.X_test)
    driver = 4 * vector + min(EVAL_CHUNK, max(len(data.X), n_test)) * per_row
    in_memory = 0 if isinstance(data.X, Rows) else data.X.size * itemsize  # memory-mapped: read by row
    if data.X.dtype != np.dtype(config.dtype):
        driver += in_memory  # the features in the run's dtype
    targets = len(data.y) * 8
    if config.loss == "squared" and data.y.ndim == 1:
        targets = len(data.y) * layers[-1] * itemsize  # one-hot rows
    driver += targets + in_memory + len(data.X) * 8  # + the object store's copy, a permutation
    worker = 2 * vector + min(config.micro_batch, config.batch_size) * per_row
    servers = 2 * vector
    local = (config.address or os.environ.get("RAY_ADDRESS") or None) in (None, "local")
    return driver + (config.max_workers * worker + servers if local else max(worker, servers))


def _check_memory(config: Config, data: datasets.Dataset, layers: tuple[int, ...]) -> None:
    """UsageError, before anything is allocated, for a network or data that cannot fit in memory."""
    size = Layout(layers).size
    what = f"--layers {','.join(map(str, layers))}"
    if config.layers is None:
        what += (f" (the default for {data.name}: its labels go up to {data.n_classes - 1}, so {data.n_classes} "
                 "outputs)" if data.n_classes else f" (the default for {data.name})")
    servers = 1 if config.servers == AUTO else config.servers  # auto: one on a machine
    actors = f"{config.max_workers} worker{'s' if config.max_workers != 1 else ''} and {servers} " \
             f"server{'s' if servers != 1 else ''}"
    datasets.check_memory(memory_needed(config, data, layers),
                          f"{what}: {size} weights in {config.dtype} with {actors}", UsageError)
