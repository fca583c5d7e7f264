"""Training from Python: ``distbp.fit(X, y, layers=...)`` returns a ``distbp.Result``.

``fit`` takes the options of ``distbp train`` as keyword arguments, with the same names and
defaults (both come from ``Config``), and the data as in-memory arrays instead of
``--dataset``.  It runs the same loop as the command line and writes the same run
directory, so ``Result.from_path`` reads a run made either way.

    import distbp
    result = distbp.fit(X, y, layers=[2, 64, 64, 3], workers=2, steps=200)
    result.network.forward(X[:5]); result.summary["weights_sha256"]; result.metrics[-1]

Callbacks are objects with ``on_step(record)`` and/or ``on_evaluation(record)``: they get a
copy of each metrics.jsonl record as it is written (``step``, ``epoch``, ``loss``, ``lr``,
``time``, timings; an evaluation's ``test_loss``/``test_accuracy`` or ``validation_*``),
enough to report to a tracker.  Returning True asks the run to stop after that step: it
checkpoints and ends with a summary (``stopped_early``: the step).

A Ray already started in this process (``ray.init(...)``) is reused; a run whose actors
cannot be placed there fails at once with a UsageError instead of waiting.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from . import config as cfg
from .config import Config
from .data.datasets import from_arrays
from .errors import DataError, UsageError
from .lecture.network import Network
from .run import metrics, remote
from .run.outdir import CHECKPOINT, SUMMARY


class Callback:
    """What ``fit`` calls as a run goes; override either method.  Return True to stop the run."""

    def on_step(self, record: dict) -> bool | None:
        """After each step's line is written to metrics.jsonl (``record`` is a copy of it)."""

    def on_evaluation(self, record: dict) -> bool | None:
        """After each evaluation of the test (or validation) split."""


@dataclass
class Result:
    """A finished run: its trained network, summary.json, metrics.jsonl and directory."""

    network: Network
    summary: dict
    metrics: list[dict]
    path: str

    @classmethod
    def from_path(cls, run_dir: str) -> Result:
        """Read a run directory written by ``distbp train`` or ``fit`` (or a URL it uploaded to)."""
        if remote.is_url(run_dir):
            local = remote.fetch(run_dir, "Result.from_path", needs=SUMMARY)
            try:
                return replace(cls.from_path(local), path=run_dir)
            finally:
                shutil.rmtree(local, ignore_errors=True)
        summary_path = os.path.join(run_dir, SUMMARY)
        if not os.path.isfile(summary_path):
            raise DataError(f"{run_dir}: no {SUMMARY} (not a finished distbp run)")
        try:
            with open(summary_path, encoding="utf-8") as fh:
                summary = json.load(fh)
        except (OSError, ValueError) as exc:
            raise DataError(f"{summary_path}: unreadable ({exc})") from None
        network = Network.from_checkpoint(os.path.join(run_dir, CHECKPOINT))
        return cls(network, summary, metrics.read(os.path.join(run_dir, metrics.NAME)), run_dir)


# fit's keyword options: every Config field but those naming the data on disk.
OPTIONS = [f for f in fields(Config) if f.name not in ("dataset", "data_dir")]


def fit(X, y, *, X_test=None, y_test=None, callbacks: Sequence = (), **options) -> Result:
    """Train on ``X`` (N, d^0) and ``y`` ((N,) class ids or (N, d^L) targets) on Ray workers.

    Keyword options are those of ``distbp train`` (see ``help(distbp.Config)``); ``layers`` may
    be a list of sizes.  Raises ``UsageError`` or ``DataError`` for bad options or data, as the
    command line does.
    """
    from .loops.sync import train

    config = _config(options)
    layers = config.layer_sizes()
    n_classes = layers[-1] if layers and np.ndim(y) == 1 and np.asarray(y).dtype.kind in "iub" else None
    if (X_test is None) != (y_test is None):
        raise UsageError("X_test and y_test go together: give both or neither")
    data = from_arrays("arrays", X, y, X_test, y_test, n_classes=n_classes)
    if remote.is_url(config.out):  # runs in a local directory, uploaded as it goes
        config.out = remote.stage(config.out)
    with remote.discarded_unless_begun(config.out):
        summary = train(config, data=data, callbacks=list(callbacks))
    return Result.from_path(summary["out"])


def _config(options: dict) -> Config:
    known = {f.name for f in OPTIONS}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"fit() got unknown options {', '.join(unknown)}; see help(distbp.Config)")
    if isinstance(options.get("layers"), Sequence) and not isinstance(options["layers"], str):
        options["layers"] = ",".join(str(int(d)) for d in options["layers"])
    if isinstance(options.get("adam_betas"), Sequence) and not isinstance(options["adam_betas"], str):
        try:  # (0.9, 0.999) as the command line's 0.9,0.999
            options["adam_betas"] = ",".join(str(float(b)) for b in options["adam_betas"])
        except (TypeError, ValueError):
            raise UsageError(f"adam_betas must be two numbers like (0.9, 0.999), got {options['adam_betas']!r}") \
                from None
    if isinstance(options.get("report_to"), Sequence) and not isinstance(options["report_to"], str):
        options["report_to"] = ",".join(options["report_to"]) or None  # report_to=("tensorboard", "mlflow")
    try:
        config = Config(**options)
    except TypeError as exc:
        raise UsageError(str(exc)) from None
    _check_types(config)
    config.validate()
    return config


def _check_types(config: Config) -> None:
    """UsageError for an option of the wrong type (the CLI's parser checks these for flags)."""
    for f in OPTIONS:
        value, kind = getattr(config, f.name), cfg.option_type(f)
        if value is None and f.default is None:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
        elif not cfg.takes(f.name, kind, value):
            raise UsageError(f"{f.name} must be {kind.__name__}, got {value!r}")


# help(distbp.fit) shows every option with its default, as ``distbp train --help`` does.
fit.__signature__ = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in ("X", "y")]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("X_test", "y_test")]
    + [inspect.Parameter("callbacks", inspect.Parameter.KEYWORD_ONLY, default=())]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=() if f.name == "report_to" else f.default)
       for f in OPTIONS])  # report_to takes a list of names, as ("tensorboard", "mlflow")
