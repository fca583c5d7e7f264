"""Every option of ``distbp train``, with its default, in one place.

The command line and the TOML loader are both derived from ``Config``'s fields, so they
cannot drift apart: a field's ``help`` metadata is its documentation.  Precedence:
defaults < ``--config FILE.toml`` < flags.
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields

from . import faults
from .errors import DataError, UsageError, one_line
from .lecture.network import ACTIVATIONS, DTYPES, LOSSES
from .lecture.optim import OPTIMIZERS
from .lecture.schedule import SCHEDULES, parse_milestones


def opt(default, help: str, choices=None, metavar=None):
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass
class Config:
    dataset: str = opt("spirals", "spirals | fashion-mnist | random:N,D,C | npz:PATH", metavar="NAME")
    data_dir: str | None = opt(None, "where the Fashion-MNIST IDX files are "
                                     "(default: /usr/share/datasets/fashion-mnist)", metavar="DIR")
    val_fraction: float = opt(0.0, "hold out this fraction of the training set for validation", metavar="F")
    layers: str | None = opt(None, "layer sizes d^0,...,d^L (default: the data's input size,64,64,its classes)",
                             metavar="D0,...,DL")
    activation: str = opt("tanh", "hidden-layer activation theta", choices=tuple(ACTIVATIONS))
    loss: str = opt("cross-entropy", "error measure e", choices=LOSSES)
    workers: int = opt(2, "number of worker actors K", metavar="K")
    batch_size: int = opt(256, "global mini-batch size B (split over the workers)", metavar="B")
    micro_batch: int = opt(128, "fixed micro-batch size M: the unit of work, whatever K is", metavar="M")
    steps: int | None = opt(None, "number of optimizer steps (overrides --epochs)", metavar="N")
    epochs: float = opt(100.0, "passes over the training set (used when --steps is not given)", metavar="E")
    optimizer: str = opt("adam", "update rule", choices=OPTIMIZERS)
    lr: float = opt(0.01, "learning rate (the peak rate of a schedule; for --base-batch samples if given)",
                    metavar="ETA")
    lr_schedule: str = opt("constant", "learning rate after warmup: constant, step (see --lr-step-epochs) "
                           "or cosine (decays towards 0 at the last step)", choices=SCHEDULES)
    lr_step_epochs: str | None = opt(None, "with --lr-schedule step: epochs at which the rate is multiplied "
                                     "by --lr-decay", metavar="E1,E2,...")
    lr_decay: float = opt(0.1, "factor of each --lr-schedule step decay", metavar="GAMMA")
    warmup_steps: int = opt(0, "ramp the rate linearly up to --lr over the first N steps (Goyal et al. 2017)",
                            metavar="N")
    base_batch: int | None = opt(None, "linear scaling rule: --lr is tuned for this batch size, the run uses "
                                       "lr * B / base_batch (Goyal et al. 2017)", metavar="B0")
    momentum: float = opt(0.9, "momentum coefficient (optimizer momentum)", metavar="MU")
    weight_decay: float = opt(0.0, "L2 weight decay on weights (not biases)", metavar="LAMBDA")
    reduction: str = opt("mean", "mean: divide the summed gradient once by the global B; sum: use it as is",
                         choices=("mean", "sum"))
    dtype: str = opt("float64", "floating-point type, kept end to end", choices=DTYPES)
    seed: int = opt(0, "seed for weights, data and sampling", metavar="S")
    address: str | None = opt(None, "Ray address: 'auto' joins a running cluster "
                                    "(default: $RAY_ADDRESS, else a new local Ray on 127.0.0.1)", metavar="ADDR")
    out: str | None = opt(None, "directory for results (default: runs/<timestamp>)", metavar="DIR")
    checkpoint_every: int = opt(0, "also write checkpoint.npz every N steps (it is always written at the end "
                                   "of each epoch); a lost server restarts from the latest one", metavar="N")
    fault_injection: str | None = opt(None, "faults to inject on purpose, comma-separated: kill-worker:K@S, "
                                            "delay-worker:K@S:SECONDS, kill-server@S (see docs/reliability.md)",
                                      metavar="SPEC")
    servers: int = opt(1, "parameter-server actors S, each owning a contiguous range of the weights "
                          "(bitwise the same result for any S)", metavar="S")
    threads_per_worker: int | None = opt(None, "threads each worker backpropagates micro-batches on, one BLAS "
                                               "thread each (default: the worker's share of its node's CPUs); "
                                               "the same bits for any T", metavar="T")
    transport: str = opt("auto", "how a step's vectors travel between the actors: auto (shared memory when "
                                 "everything is on one Ray node, else socket), socket (authenticated "
                                 "connections between the actors), object-store (Ray's); the same bits either way",
                         choices=("auto", "shared-memory", "socket", "object-store"))
    mode: str = opt("sync", "sync: exact, the same bits for any K and S; async (push when done, pull the latest "
                            "weights) and ssp (bounded staleness) are NOT split-invariant: for experiments",
                    choices=("sync", "async", "ssp"))
    staleness: int | None = opt(None, "with --mode ssp: how many steps a worker may run ahead of the slowest, "
                                      "as in Ho et al. 2013 (default: 2)", metavar="s")

    def validate(self) -> None:
        """Raise UsageError naming the first bad option; checks that need the data come later."""
        for name in ("workers", "batch_size", "micro_batch", "threads_per_worker"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise UsageError(f"--epochs must be a positive number, got {self.epochs}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UsageError(f"--{flag(name)} must be a finite number >= 0, got {value}")
        if not 0 <= self.momentum < 1:  # v <- mu v + g grows without bound for mu >= 1 (also refuses nan)
            raise UsageError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.seed < 0:  # numpy's generators take only seeds >= 0
            raise UsageError(f"--seed must be >= 0, got {self.seed}")
        for name in ("out", "data_dir", "address"):
            if getattr(self, name) == "":  # would silently mean the default
                raise UsageError(f"--{flag(name)} must not be empty")
        if not 0 <= self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.warmup_steps < 0:
            raise UsageError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.checkpoint_every < 0:
            raise UsageError(f"--checkpoint-every must be >= 0 (0: only at the end of each epoch), "
                             f"got {self.checkpoint_every}")
        faults.parse(self.fault_injection, self.workers)
        self._check_modes()
        if self.base_batch is not None and self.base_batch < 1:
            raise UsageError(f"--base-batch must be at least 1, got {self.base_batch}")
        if not 0 < self.lr_decay <= 1:
            raise UsageError(f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        try:
            milestones = parse_milestones(self.lr_step_epochs)
        except ValueError:
            raise UsageError(f"--lr-step-epochs must be increasing positive epochs like 30,60,80, "
                             f"got {self.lr_step_epochs!r}") from None
        if (self.lr_schedule == "step") != bool(milestones):
            raise UsageError("--lr-schedule step and --lr-step-epochs go together: give both or neither")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UsageError(f"--{flag(f.name)}: unknown value {getattr(self, f.name)!r}; "
                                 f"choose one of {', '.join(choices)}")
        self.layer_sizes()

    def _check_modes(self) -> None:
        """--servers, --mode, --staleness: what the asynchronous loop (async_train.py) cannot do is refused."""
        if self.servers < 1:
            raise UsageError(f"--servers must be at least 1, got {self.servers}")
        if self.staleness is not None and (self.mode != "ssp" or self.staleness < 0):
            raise UsageError(f"--staleness goes with --mode ssp and must be >= 0, got {self.staleness} "
                             f"with --mode {self.mode}")
        if self.mode == "sync":
            return
        for name, default in (("servers", 1), ("fault_injection", None), ("checkpoint_every", 0),
                              ("transport", "auto")):
            if getattr(self, name) != default:
                raise UsageError(f"--{flag(name)} works only with --mode sync (--mode {self.mode} has one "
                                 "server and no fault handling)")

    def layer_sizes(self) -> tuple[int, ...] | None:
        if self.layers is None:
            return None
        try:
            sizes = tuple(int(v) for v in str(self.layers).split(","))
        except ValueError:
            raise UsageError(f"--layers must be comma-separated integers, got {self.layers!r}") from None
        if len(sizes) < 2 or min(sizes) < 1:
            raise UsageError(f"--layers needs at least an input and an output size, all >= 1, got {self.layers!r}")
        return sizes

    def to_dict(self) -> dict:
        return asdict(self)


def flag(name: str) -> str:
    return name.replace("_", "-")


def option_type(f) -> type:
    """The Python type of a Config field's values (None aside)."""
    default = f.default if f.default is not MISSING else None
    if f.name in ("steps", "base_batch", "staleness", "threads_per_worker"):
        return int
    return type(default) if default is not None else str


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
        parser.add_argument(f"--{flag(f.name)}", dest=f.name, type=kind, default=argparse.SUPPRESS,
                            choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
                            help=help_text(f))


def load_toml(path: str) -> dict:
    """Options from a TOML file: keys are option names (dashes or underscores); unknown keys are errors."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 text
        raise UsageError(f"--config {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                         f"at offset {exc.start})") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"--config {path}: {one_line(exc)}") from None
    known = {f.name: f for f in fields(Config)}
    values, keys = {}, {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"--config {path}: unknown key {key!r}")
        if name in keys:  # batch-size and batch_size are one option: neither may silently win
            raise UsageError(f"--config {path}: {keys[name]!r} and {key!r} are the same option; give it once")
        keys[name] = key
        kind = option_type(known[name])
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is str and name in ("layers", "lr_step_epochs") and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if not isinstance(value, kind) or isinstance(value, bool):
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
# goes on (the sum is the same bits for any K and S).  Anything else would make the continued
# run differ from the uninterrupted one.
RESUMABLE = ("steps", "epochs", "workers", "servers", "address", "data_dir", "checkpoint_every",
             "fault_injection", "transport", "threads_per_worker")


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
        if not (value is None or isinstance(value, kind)) or isinstance(value, bool):
            raise DataError(f"{directory}/checkpoint.npz: corrupt config ({name} = {value!r})")
    values = {f.name: f.default for f in fields(Config)} | stored
    try:  # the stored options alone: a bad one is a damaged file, not a bad flag
        Config(**(values | {"out": directory})).validate()
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
                             f"--resume may change only {', '.join('--' + flag(n) for n in RESUMABLE)}")
    if "epochs" in options and "steps" not in options:
        values["steps"] = None  # --epochs counts only without --steps
    values["out"] = directory
    config = Config(**values)
    config.validate()
    return config
