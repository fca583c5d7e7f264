"""Continuing a run later with ``--resume DIR`` (stopping one cleanly: signals.py).

A checkpoint holds everything the rest of the run depends on: the weights, the optimizer
buffers, the step counter (the sampler is a pure function of the seed and the step, so the
step is its whole state) and the config.  Continuing from it replays exactly the arithmetic
the uninterrupted run would have done, so both end with the same ``weights_sha256``.
"""

from __future__ import annotations

import os

import numpy as np

from ..config import Config
from ..errors import DataError, UsageError
from ..lecture.network import Layout
from ..lecture.optim import init_state
from ..options import for_resume
from . import checkpoint, metrics
from .outdir import CHECKPOINT, holder

ARRAYS = "arrays"  # the dataset of a distbp.fit run: in-memory arrays, which only Python can give again


def load(directory: str, options: dict, arrays: bool = False) -> tuple[Config, dict]:
    """The config (stored, plus the ``options`` given again) and the checkpoint of the run in
    ``directory``; ``arrays``: the caller (``distbp.fit``) gives the data as arrays again."""
    if not os.path.isdir(directory):
        raise UsageError(f"--resume {directory}: no such directory")
    live = holder(directory)  # a run still going: say so, whatever else its files would say now
    if live:
        raise UsageError(f"--resume {directory} is in use by {live}")
    path = os.path.join(directory, CHECKPOINT)
    if not os.path.isfile(path):
        raise UsageError(f"--resume {directory}: there is no {CHECKPOINT} in it to continue from")
    state = checkpoint.load(path)
    # The log is checked before anything starts (resume trims it).  Every step up to a checkpoint
    # is in it (RunFiles.save flushes the log first): a log that is gone or ends earlier is damage.
    log = os.path.join(directory, metrics.NAME)
    if not os.path.lexists(log):
        raise DataError(f"--resume {directory}: its {metrics.NAME} is missing")
    logged = max((r["step"] for r in metrics.steps(metrics.read(log))), default=0)
    if logged < state["step"]:
        raise DataError(f"--resume {directory}: {CHECKPOINT} is of step {state['step']} but {metrics.NAME} "
                        f"ends at step {logged}")
    if state["config"].get("dataset") == ARRAYS and not arrays:
        raise UsageError(f"--resume {directory}: the run was trained by distbp.fit on in-memory arrays; continue it "
                         f"from Python with the same arrays: distbp.fit(X, y, resume={directory!r})")
    return for_resume(state["config"], options, directory), state


def check_fits(state: dict, layers: tuple[int, ...], config: Config, path: str,
               data_fingerprint: str | None = None) -> None:
    """DataError unless the checkpoint's arrays are those of ``layers`` with ``config``'s dtype and
    optimizer, and it was trained on the data whose ``checkpoint.fingerprint`` is ``data_fingerprint``
    (a checkpoint from before fingerprints were kept is taken on trust)."""
    weights, dtype = state["weights"], np.dtype(config.dtype)
    size = Layout(layers).size
    if weights.size != size:
        raise DataError(f"{path}: holds {weights.size} weights but a {','.join(map(str, layers))} network has "
                        f"{size}: a checkpoint of another architecture")
    if weights.dtype != dtype:
        raise DataError(f"{path}: weights are {weights.dtype} but the run uses {dtype}")
    wanted = init_state(config.optimizer, size, dtype)
    buffers = state["optimizer"]
    if set(buffers) != set(wanted) or any(b.shape != (size,) or b.dtype != dtype for b in buffers.values()):
        raise DataError(f"{path}: optimizer buffers {sorted(buffers)} do not fit {config.optimizer} "
                        f"(expected {sorted(wanted)} of {size} {dtype})")
    if state["step"] < 1:
        raise DataError(f"{path}: corrupt checkpoint (step {state['step']})")
    stored = state.get("data")
    if stored is not None and data_fingerprint is not None and stored != data_fingerprint:
        # Same shapes, other values: the run would go on without a word and end elsewhere.
        raise DataError(f"{path}: the run was trained on other data than {config.dataset} holds now "
                        f"(data fingerprint {stored[:12]} in the checkpoint, {data_fingerprint[:12]} now); "
                        "resume it on the data it was trained on")


def initial(config: Config) -> dict | None:
    """``--init-from``: the checkpoint to start from (None without it).  Without ``--layers`` the run
    takes its layers, before the data's defaults are derived, so that a mismatch with the data is
    the usual --layers error."""
    if not config.init_from:
        return None
    path = config.init_from
    if os.path.isdir(path):  # a run directory: its latest checkpoint
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise UsageError(f"--init-from {config.init_from}: no such checkpoint")
    saved = checkpoint.load(path)
    if config.layers is None:
        config.layers = saved["config"].get("layers")
    return saved


def warm_start(config: Config, net, saved: dict | None) -> None:
    """``--init-from``: ``net`` (the run's step 0) takes the weights of ``saved`` (``initial``); the
    optimizer and the step start afresh.  DataError where it is of another network or dtype."""
    if saved is None:
        return
    weights = saved["weights"]
    if weights.size != net.layout.size:
        raise DataError(f"--init-from {config.init_from}: holds {weights.size} weights but a "
                        f"{','.join(map(str, net.layers))} network has {net.layout.size}: another architecture")
    if weights.dtype.newbyteorder("=") != net.dtype:
        raise DataError(f"--init-from {config.init_from}: its weights are {weights.dtype} but the run uses "
                        f"{net.dtype} (--dtype {weights.dtype.name} starts from them unchanged)")
    net.flat[:] = weights
