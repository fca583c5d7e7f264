"""A run's directory and the files in it, as the loops write them.

``RunFiles`` makes the directory (refusing one that already holds results), appends to
``metrics.jsonl``, writes ``checkpoint.npz`` atomically and knows the step of the one on
disk, and writes ``summary.json`` at the end.  A run that fails before its first step
leaves no directory behind (``discard``).
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from ..errors import Diverged, RunFailed, UsageError
from . import checkpoint, metrics

CHECKPOINT = "checkpoint.npz"
SUMMARY = "summary.json"


def make_out_dir(path: str | None) -> tuple[str, str | None]:
    """Create the results directory; refuse one that already holds results.

    Returns the path and the topmost directory created for it (None if it was there), which
    the run removes again if it fails before training begins: nothing half-made is left.
    """
    path = path or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"--out {path} already exists and is not empty; choose a new directory "
                         f"(or --resume {path} to continue it)")
    created, parent = None, os.path.abspath(path)
    while not os.path.exists(parent):
        created, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        open(probe, "w").close()
        os.unlink(probe)
    except OSError as exc:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror})") from None
    return path, created


class RunFiles:
    """The files of one run in ``path``: ``saved_step`` is the step of the checkpoint on disk."""

    def __init__(self, path: str, created: str | None, saved_step: int):
        self.path, self.created, self.saved_step = path, created, saved_step
        self.checkpoint = os.path.join(path, CHECKPOINT)
        self.metrics_path = os.path.join(path, metrics.NAME)
        self.log: metrics.Writer | None = None

    @classmethod
    def create(cls, path: str | None) -> RunFiles:
        """A new run's directory (``runs/<timestamp>`` when ``path`` is None)."""
        return cls(*make_out_dir(path), saved_step=0)

    @classmethod
    def reopen(cls, path: str, step: int) -> RunFiles:
        """The directory of a run being resumed from its checkpoint of step ``step``."""
        return cls(path, None, saved_step=step)

    def open_log(self) -> tuple[float, dict[int, str]]:
        """Start appending to metrics.jsonl: the run has begun.  A resumed run first drops the
        lines past its checkpoint (they are redone); returns their ``time`` offset and hashes."""
        offset, dropped = (0.0, {})
        if self.saved_step:
            offset, dropped = metrics.trim(self.metrics_path, self.saved_step)
        self.log = metrics.Writer(self.metrics_path)
        return offset, dropped

    def save(self, step: int, arrays: dict[str, np.ndarray], config: dict) -> None:
        """checkpoint.npz after step ``step`` from the servers' ``arrays`` (weights and optimizer
        buffers), atomically, every metrics line up to it on disk first; never non-finite weights."""
        self.log.flush()
        optimizer = dict(arrays)
        flat = optimizer.pop("weights")
        if not np.isfinite(flat).all():
            raise Diverged(f"training diverged at step {step}: the weights are no longer finite")
        try:
            checkpoint.save(self.checkpoint, flat, optimizer, step, config)
        except OSError as exc:
            raise RunFailed(f"cannot write {self.checkpoint} ({exc.strerror or exc}); "
                            "the previous checkpoint is intact") from None
        self.saved_step = step

    def latest(self, initial: dict) -> tuple[dict[str, np.ndarray], int]:
        """The arrays and step of the checkpoint on disk, else of ``initial`` (the run's start)."""
        saved = checkpoint.load(self.checkpoint) if os.path.exists(self.checkpoint) else initial
        return {"weights": saved["weights"], **saved["optimizer"]}, saved["step"]

    def write_summary(self, summary: dict) -> None:
        checkpoint.write_json(os.path.join(self.path, SUMMARY), summary)

    def close(self) -> None:
        """Close the log; a run that never began (no log opened) removes the directory it made."""
        if self.log is not None:
            self.log.close()
        elif self.created:
            shutil.rmtree(self.created, ignore_errors=True)
