"""Stopping a run cleanly and continuing it later with ``--resume DIR``.

A checkpoint holds everything the rest of the run depends on: the weights, the optimizer
buffers, the step counter (the sampler is a pure function of the seed and the step, so the
step is its whole state) and the config.  Continuing from it replays exactly the arithmetic
the uninterrupted run would have done, so both end with the same ``weights_sha256``.
"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np

from .. import config as cfg
from ..config import Config
from ..errors import DataError, UsageError
from ..lecture.network import Layout
from ..lecture.optim import init_state
from . import checkpoint, metrics
from .outdir import CHECKPOINT


def load(directory: str, options: dict) -> tuple[Config, dict]:
    """The config (stored, plus the ``options`` given again) and the checkpoint of the run in ``directory``."""
    if not os.path.isdir(directory):
        raise UsageError(f"--resume {directory}: no such directory")
    path = os.path.join(directory, CHECKPOINT)
    if not os.path.isfile(path):
        raise UsageError(f"--resume {directory}: there is no {CHECKPOINT} in it to continue from")
    state = checkpoint.load(path)
    log = os.path.join(directory, metrics.NAME)
    if os.path.lexists(log):
        metrics.read(log)  # a damaged log is refused before anything starts (resume trims it)
    return cfg.for_resume(state["config"], options, directory), state


def check_fits(state: dict, layers: tuple[int, ...], config: Config, path: str) -> None:
    """DataError unless the checkpoint's arrays are those of ``layers`` with ``config``'s dtype and optimizer."""
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


class StopSignals:
    """While active, SIGINT and SIGTERM ask the training loop to stop at the next step boundary.

    ``signum`` is the first signal received.  A second one stops at once (KeyboardInterrupt).
    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
