"""How the options of ``distbp train`` are read: flags, a TOML file, and a resumed run's own.

All three are derived from ``Config``'s fields (config.py), so they cannot drift apart.
Precedence: defaults < ``--config FILE.toml`` < flags; ``--resume`` takes the stored options
and lets only ``RESUMABLE`` ones change.
"""

from __future__ import annotations

import argparse
import os
import stat
import tomllib
from dataclasses import fields

from .config import Config, flag, option_type, takes
from .errors import DataError, UsageError, one_line


def workers_flag(text: str) -> int | str:
    """``--workers`` (``--servers``) on the command line: K as an int, MIN:MAX (auto) as text
    (checked by ``validate``)."""
    try:
        return int(text)
    except ValueError:
        return text


def help_text(f) -> str:
    """A field's help for ``--help``: its text, then ``(default: X)`` unless the default is None."""
    text = f.metadata["help"] if f.default is None else f"{f.metadata['help']} (default: {f.default})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field; defaults are left to Config so the file can fill them.

    Each flag's help shows its default once: ``(default: X)`` is appended from the field, except
    for a None default (unset), whose help says itself what happens then.
    """
    parser.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file; flags override it")
    for f in fields(Config):
        kind = option_type(f)
        if kind is bool:  # a switch: --timeline
            parser.add_argument(f"--{flag(f.name)}", dest=f.name, action="store_true", default=argparse.SUPPRESS,
                                help=help_text(f))
            continue
        kind = workers_flag if f.name in ("workers", "servers") else kind
        choices = f.metadata.get("choices")  # a removed value passes, for validate() to say what replaced it
        parser.add_argument(f"--{flag(f.name)}", dest=f.name, type=kind, default=argparse.SUPPRESS,
                            choices=choices and (*choices, *f.metadata["removed"]), metavar=f.metadata.get("metavar"),
                            help=help_text(f))


CONFIG_BYTES = 1 << 20  # an options file is a few hundred bytes; anything past 1 MiB is something else
INT64 = (-(1 << 63), 1 << 63)  # TOML integers are 64-bit: a larger one is an error (toml.io, "Integer")


def _read_toml(path: str) -> dict:
    """The TOML table in ``path``, read only if it is a regular file (a FIFO would block, /dev/zero
    never ends) and at most ``CONFIG_BYTES`` of it; UsageError naming what is wrong."""
    try:  # O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        raise UsageError(f"--config {path}: {what}, not a TOML file")
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(CONFIG_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > CONFIG_BYTES:
        raise UsageError(f"--config {path}: larger than {CONFIG_BYTES >> 20} MiB, not an options file")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:  # TOML is UTF-8 text
        raise UsageError(f"--config {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                         f"at offset {exc.start})") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer of more than 4300 digits
        raise UsageError(f"--config {path}: {one_line(exc)}") from None
    except RecursionError:
        raise UsageError(f"--config {path}: arrays or tables nested too deeply") from None


def load_toml(path: str) -> dict:
    """Options from a TOML file: keys are option names (dashes or underscores); unknown keys are errors."""
    raw = _read_toml(path)
    known = {f.name: f for f in fields(Config)}
    values, keys = {}, {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"--config {path}: unknown key {key!r}")
        if name in keys:  # batch-size and batch_size are one option: neither may silently win
            raise UsageError(f"--config {path}: {keys[name]!r} and {key!r} are the same option; give it once")
        keys[name] = key
        big = [v for v in (value if isinstance(value, list) else [value])
               if type(v) is int and not INT64[0] <= v < INT64[1]]
        if big:  # tomllib takes any size; TOML allows 64 bits (and float(10**400) would overflow)
            raise UsageError(f"--config {path}: {key} is an integer beyond TOML's 64 bits")
        kind = option_type(known[name])
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is str and name in ("layers", "lr_step_epochs", "adam_betas", "report_to") and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if not takes(name, kind, value):
            raise UsageError(f"--config {path}: {key} must be {kind.__name__}, got {value!r}")
        values[name] = value
    return values


def given(ns: argparse.Namespace) -> dict:
    """The options the user set: the config file's, then the flags given on the command line."""
    values = load_toml(ns.config) if getattr(ns, "config", None) else {}
    names = {f.name for f in fields(Config)}
    values.update({k: v for k, v in vars(ns).items() if k in names})
    return values


def from_args(ns: argparse.Namespace) -> Config:
    """Defaults, then the config file, then the flags given on the command line."""
    config = Config(**given(ns))
    config.validate()
    return config


# What --resume lets you change: how long, where and on how many workers and servers the run
# goes on (the sum is the same bits for any K and S), and what it records besides.  Anything
# else would make the continued run differ from the uninterrupted one.  The one list: the
# --resume help, its error and docs/reliability.md are made from it or checked against it.
RESUMABLE = ("steps", "epochs", "workers", "servers", "server_resource", "threads_per_worker", "transport",
             "address", "data_dir", "checkpoint_every", "keep_checkpoints", "eval_every", "fault_injection",
             "report_to", "timeline")


def resumable_flags() -> str:
    """``--steps, --epochs, ...``: the flags of RESUMABLE as a user types them."""
    return ", ".join("--" + flag(name) for name in RESUMABLE)


def resume_help() -> str:
    """``--resume``'s help for ``distbp train --help``, naming what a resumed run may change."""
    return ("continue the run in DIR (or at a URL like s3://bucket/run) from its checkpoint, to the same final "
            f"weights as if it had never stopped; of its options only {resumable_flags()} may be given new values")


def for_resume(stored: dict, options: dict, directory: str) -> Config:
    """The config of the run in ``directory`` (``stored`` in its checkpoint), with the ``options``
    given again on the command line; changing anything outside RESUMABLE is a UsageError."""
    known = {f.name: f for f in fields(Config)}
    unknown = sorted(set(stored) - set(known))
    if unknown:
        raise DataError(f"{directory}/checkpoint.npz: its config has options this distbp does not know "
                        f"({', '.join(unknown)}); it was written by another version")
    for name, value in stored.items():
        kind = option_type(known[name])
        if kind is float and isinstance(value, int):
            value = stored[name] = float(value)
        if not (value is None or takes(name, kind, value)):
            raise DataError(f"{directory}/checkpoint.npz: corrupt config ({name} = {value!r})")
    values = {f.name: f.default for f in fields(Config)} | stored
    for f in fields(Config):  # a run saved by an earlier version goes on on what replaced its choice
        values[f.name] = f.metadata["removed"].get(values[f.name], values[f.name])
    try:  # the stored options alone: a bad one is a damaged file, not a bad flag (a reporter whose
        # extra is missing here is no damage: the final validate below says what to install)
        Config(**(values | {"out": directory, "report_to": None})).validate()
    except UsageError as exc:
        raise DataError(f"{directory}/checkpoint.npz: corrupt config ({exc})") from None
    for name, value in options.items():
        if name == "out":
            if os.path.abspath(value) != os.path.abspath(directory):
                raise UsageError(f"--out cannot be combined with --resume: the run continues in {directory}")
        elif name in RESUMABLE:
            values[name] = value
        elif value != values[name]:
            raise UsageError(f"--{flag(name)} {value} differs from the run being resumed ({values[name]}); "
                             f"--resume may change only {resumable_flags()}")
    if "epochs" in options and "steps" not in options:
        values["steps"] = None  # --epochs counts only without --steps
    values["out"] = directory
    config = Config(**values)
    config.validate()
    return config
