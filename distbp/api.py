"""Training from Python: ``distbp.fit(X, y, layers=...)`` returns a ``distbp.Result`` (result.py).

``fit`` takes the options of ``distbp train`` as keyword arguments, with the same names and
defaults (both come from ``Config``), and the data as in-memory arrays instead of
``--dataset``.  It runs the same loop as the command line and writes the same run
directory, so ``Result.from_path`` reads a run made either way.

    import distbp
    result = distbp.fit(X, y, layers=[2, 64, 64, 3], workers=2, steps=200)
    result.network.predict(X[:5]); result.summary["weights_sha256"]; result.metrics[-1]["loss"]

``resume=`` continues a run exactly as ``--resume`` does (on the same arrays: the data's
fingerprint is checked); ``init_from=`` starts a new run from a checkpoint's weights.
Callbacks (callbacks.py) see each record as it is written and may stop the run after a step.

A Ray already started in this process (``ray.init(...)``) is reused; a run whose actors
cannot be placed there fails at once with a UsageError instead of waiting.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import fields

import numpy as np

from . import config as cfg
from .callbacks import Callback, EarlyStopping
from .config import Config
from .data.datasets import from_arrays
from .errors import DistbpError, UsageError
from .result import Result
from .run import remote
from .run.resume import ARRAYS

__all__ = ["Callback", "EarlyStopping", "Result", "fit"]

# fit's keyword options: every Config field but those naming the data on disk.
OPTIONS = [f for f in fields(Config) if f.name not in ("dataset", "data_dir")]


def fit(X, y, *, X_test=None, y_test=None, callbacks: Sequence = (), resume: str | None = None,
        **options) -> Result:
    """Train on ``X`` (N, d^0) and ``y`` ((N,) class ids or (N, d^L) targets) on Ray workers.

    Keyword options are those of ``distbp train`` (see ``help(distbp.Config)``); ``layers`` may
    be a list of sizes, and without it the layers are (d^0, 64, 64, classes) as on the command
    line.  ``resume`` (a run directory or URL) continues that run on the same arrays, as
    ``--resume``: only the options ``--resume`` lets change may be given.  Raises
    ``UsageError`` or ``DataError`` for bad options or data, as the command line does, and
    ``RunFailed`` for a run that began and failed (``Result.from_path(out).error`` says why).
    """
    from .loops.sync import train

    if (X_test is None) != (y_test is None):
        raise UsageError("X_test and y_test go together: give both or neither")
    try:
        if resume is not None:
            return _resumed(train, resume, X, y, X_test, y_test, list(callbacks), options)
        config = _config(options)
        data = _arrays(config, X, y, X_test, y_test)
        _check_callbacks(callbacks, config, data)
        if remote.is_url(config.out):  # runs in a local directory, uploaded as it goes
            config.out = remote.stage(config.out)
        with remote.discarded_unless_begun(config.out):
            summary = train(config, data=data, callbacks=list(callbacks))
    except DistbpError as exc:
        raise _in_python(exc, {"resume": resume, "out": options.get("out"), "init_from": options.get("init_from")}) \
            from None
    return Result.from_path(summary["out"])


def _resumed(train, where: str, X, y, X_test, y_test, callbacks: list, options: dict) -> Result:
    """``fit(resume=where)``: the run in ``where`` goes on, as ``distbp train --resume``."""
    from .run import resume

    local = remote.download(where) if remote.is_url(where) else where
    with remote.discarded_unless_begun(local):
        config, state = resume.load(local, _normalised(dict(options)), arrays=True)
        data = _arrays(config, X, y, X_test, y_test, new=False)
        _check_callbacks(callbacks, config, data)
        summary = train(config, state, data=data, callbacks=callbacks)
    return Result.from_path(summary["out"])


def _arrays(config: Config, X, y, X_test, y_test, new: bool = True):
    """The arrays as a dataset for ``config``; a ``new`` run's ``config.dataset`` says it trained on arrays
    (a resume from the command line is told to come back to Python)."""
    if new:
        config.dataset = ARRAYS
    layers = config.layer_sizes()
    n_classes = layers[-1] if layers and np.ndim(y) == 1 and np.asarray(y).dtype.kind in "iub" else None
    return from_arrays(ARRAYS, X, y, X_test, y_test, n_classes=n_classes)


def _check_callbacks(callbacks: Sequence, config: Config, data) -> None:
    """Each callback's ``check`` with the names the run's records will have (``EarlyStopping``'s metric)."""
    names = {"loss", "lr"} | ({"grad_norm"} if config.clip_norm else set())
    split = "test" if data.X_test is not None else "validation" if config.val_fraction else None
    if split:
        names |= {f"{split}_loss", f"{split}_accuracy"}
    for callback in callbacks:
        check = getattr(callback, "check", None)
        if check is not None:
            check(names)


def _in_python(exc: DistbpError, paths: dict[str, str | None]) -> DistbpError:
    """``exc`` with the command line's ways to go on said as ``fit``'s arguments: ``distbp train
    --resume DIR`` and ``--resume``/``--out``/``--init-from`` followed by the ``paths`` given."""
    text = re.sub(r"distbp train --resume (\S+)", r"distbp.fit(X, y, resume='\1')", str(exc))
    for name, path in paths.items():
        if path:
            text = text.replace(f"--{name.replace('_', '-')} {path}", f"{name}={path!r}")
            text = text.replace(f"--resume {path}", f"resume={path!r}")  # "(or --resume OUT to continue it)"
    if text == str(exc):
        return exc
    new = type(exc).__new__(type(exc))
    new.args = (text,) if len(exc.args) <= 1 else (text, *exc.args[1:])
    new.__dict__.update(exc.__dict__)
    return new


def _config(options: dict) -> Config:
    options = _normalised(options)
    try:
        config = Config(**options)
    except TypeError as exc:
        raise UsageError(str(exc)) from None
    _check_types(config)
    config.validate()
    return config


def _normalised(options: dict) -> dict:
    """fit's keyword options as the command line gives them (lists as comma-separated text)."""
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
    return options


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
    + [inspect.Parameter("callbacks", inspect.Parameter.KEYWORD_ONLY, default=()),
       inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None)]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=() if f.name == "report_to" else f.default)
       for f in OPTIONS])  # report_to takes a list of names, as ("tensorboard", "mlflow")
