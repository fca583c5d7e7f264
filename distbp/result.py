"""``distbp.Result``: a run directory read back, from ``distbp.fit`` or ``distbp train``.

``metrics`` holds the step records of metrics.jsonl and ``evaluations`` the evaluation records
(``<split>_loss``, ``<split>_accuracy``), each in step order; ``metrics_dataframe`` joins them
into one pandas table (``pip install 'distbp[dataframe]'``).  ``error`` is why a run that began
did not finish (its ``network`` is then its last checkpoint's, or None before the first one, and
its ``summary`` empty), and ``best_checkpoint(metric)`` picks among the checkpoints kept with
``--keep-checkpoints``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from .errors import DataError, DistbpError, UsageError
from .lecture.network import Network
from .run import checkpoint, remote
from .run import metrics as metrics_file
from .run.outdir import CHECKPOINT, ERROR, SUMMARY, kept


@dataclass(repr=False)
class Result:
    """A run: its trained network, summary.json, metrics.jsonl's records and its directory."""

    network: Network | None
    summary: dict
    metrics: list[dict]
    path: str
    evaluations: list[dict]
    error: str | None = None

    @classmethod
    def from_path(cls, run_dir: str) -> Result:
        """Read a run directory written by ``distbp train`` or ``fit`` (or a URL it uploaded to).  A
        run that began but did not finish reads back with ``error`` set and its last checkpoint."""
        if remote.is_url(run_dir):
            local = remote.fetch(run_dir, "Result.from_path", needs=CHECKPOINT)
            try:
                return replace(cls.from_path(local), path=run_dir)
            except (DistbpError, ValueError) as exc:  # named where the user finds it: the staging is gone
                if len(exc.args) == 1 and isinstance(exc.args[0], str):
                    exc.args = (exc.args[0].replace(local, run_dir.rstrip("/")),)
                raise
            finally:
                remote.discard(local)
        summary, error = _summary(run_dir), None
        if summary is None:
            error = _error(run_dir)
        saved = os.path.join(run_dir, CHECKPOINT)  # none: a run that failed before its first checkpoint
        network = Network.from_checkpoint(saved) if summary or os.path.exists(saved) else None
        log = os.path.join(run_dir, metrics_file.NAME)
        records = metrics_file.read(log) if os.path.exists(log) else []
        evaluations = {r["step"]: r for r in records if "loss" not in r}
        return cls(network, summary or {}, metrics_file.steps(records),
                   run_dir, [evaluations[s] for s in sorted(evaluations)], error)

    def __repr__(self) -> str:
        s = self.summary
        shown = {"path": self.path, "steps": s.get("steps"), "final_loss": s.get("final_loss"),
                 f"{s.get('test_split') or 'test'}_accuracy": s.get("test_accuracy"),
                 "weights_sha256": (s.get("weights_sha256") or "")[:12] or None, "error": self.error}
        return "Result(" + ", ".join(f"{k}={v!r}" for k, v in shown.items() if v is not None) + ")"

    @property
    def metrics_dataframe(self):
        """The step records as a pandas DataFrame, one row a step, with each evaluation's columns
        on the row of its step (NaN elsewhere)."""
        try:
            import pandas as pd
        except ImportError:
            raise UsageError("Result.metrics_dataframe needs pandas: pip install 'distbp[dataframe]'") from None
        frame = pd.DataFrame(self.metrics)
        if self.evaluations:
            frame = frame.merge(pd.DataFrame(self.evaluations), on=["step", "epoch"], how="outer")
        return frame

    def best_checkpoint(self, metric: str, mode: str | None = None) -> str:
        """The path of the checkpoint whose step did best on ``metric`` (a step's ``loss`` or an
        evaluation's ``validation_accuracy``...; ``mode`` "min" or "max", as ``EarlyStopping``),
        among those kept (``--keep-checkpoints``) and the latest, checkpoint.npz."""
        mode = mode or ("max" if metric.endswith("accuracy") else "min")
        if mode not in ("min", "max"):
            raise UsageError(f"mode must be 'min' or 'max', got {mode!r}")
        values = {r["step"]: r[metric] for r in self.metrics + self.evaluations if metric in r}
        if not values:
            names = sorted({k for r in self.metrics + self.evaluations for k in r} - {"step", "epoch"})
            raise UsageError(f"{self.path}: no record has {metric!r}; the records have {', '.join(names)}")
        candidates = {s: os.path.join(self.path, f"checkpoint-{s}.npz") for s in kept(self.path)}
        latest = self.summary.get("steps") or checkpoint.load(os.path.join(self.path, CHECKPOINT))["step"]
        candidates.setdefault(latest, os.path.join(self.path, CHECKPOINT))
        scored = [(values[s], s) for s in candidates if s in values]
        if not scored:
            raise UsageError(f"{self.path}: none of its checkpoints (steps {sorted(candidates)}) is of a step with "
                             f"{metric!r}; keep more with --keep-checkpoints, at evaluation steps")
        best = min(scored) if mode == "min" else max(scored, key=lambda vs: (vs[0], -vs[1]))
        return candidates[best[1]]


def _summary(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, SUMMARY)
    if not os.path.isfile(path):
        if not any(os.path.isfile(os.path.join(run_dir, name)) for name in (CHECKPOINT, ERROR)):
            raise DataError(f"{run_dir}: no {SUMMARY}, {CHECKPOINT} or {ERROR} (not a distbp run)")
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def _error(run_dir: str) -> str:
    """Why the run in ``run_dir`` has a checkpoint and no summary."""
    try:
        with open(os.path.join(run_dir, ERROR), encoding="utf-8") as fh:
            return str(json.load(fh)["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"the run did not finish: no {SUMMARY} (its process was killed, or it is still running)"

