"""Every option of ``distbp train``, with its default, in one place.

The command line and the TOML loader (options.py) are both derived from ``Config``'s fields,
so they cannot drift apart: a field's ``help`` metadata is its documentation.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from . import faults
from .errors import UsageError
from .lecture.network import ACTIVATIONS, DTYPES, LOSSES
from .lecture.optim import OPTIMIZERS, parse_betas
from .lecture.schedule import SCHEDULES, parse_milestones


def opt(default, help: str, choices=None, metavar=None, removed=None):
    """A field of Config; ``removed``: {value an earlier version took: the one that replaced it}."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar,
                                            "removed": removed or {}})


AUTO = "auto"  # --servers auto: one per node (Session resolves it once it sees the cluster)
MAX_INT = 2**53  # an integer option above this is a mistake (and past what a float holds exactly)

# --transport names of earlier versions: each was one way of the direct transport, which now
# picks sockets or shared memory for each worker-server pair by itself.
REMOVED_TRANSPORTS = {"shared-memory": "direct", "socket": "direct", "socket+shared-memory": "direct"}


@dataclass
class Config:
    dataset: str = opt("spirals", "spirals | fashion-mnist | random:N,D,C | npz:PATH | npy:DIR | "
                                  "csv:PATH[#label=NAME|INDEX] (a header line of column names; the label is the "
                                  "last column unless named)", metavar="NAME")
    data_dir: str | None = opt(None, "where the Fashion-MNIST IDX files are "
                                     "(default: /usr/share/datasets/fashion-mnist)", metavar="DIR")
    val_fraction: float = opt(0.0, "hold out this fraction of the training set for validation", metavar="F")
    layers: str | None = opt(None, "layer sizes d^0,...,d^L (default: the data's input size,64,64,its classes)",
                             metavar="D0,...,DL")
    activation: str = opt("tanh", "hidden-layer activation theta", choices=tuple(ACTIVATIONS))
    loss: str = opt("cross-entropy", "error measure e", choices=LOSSES)
    workers: int | str = opt(2, "worker actors: K, or MIN:MAX to start with MIN and grow and shrink with the "
                                "cluster, to the same bits (docs/elastic.md)", metavar="K|MIN:MAX")
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
    weight_decay: float = opt(0.0, "L2 weight decay on weights (not biases); decoupled with --optimizer adamw",
                              metavar="LAMBDA")
    adam_betas: str | None = opt(None, "Adam's and AdamW's moment decay rates (default: 0.9,0.999)",
                                 metavar="B1,B2")
    adam_eps: float | None = opt(None, "Adam's and AdamW's epsilon (default: 1e-8)", metavar="EPS")
    clip_norm: float | None = opt(None, "scale the gradient (the mean under --reduction mean) to this 2-norm when "
                                        "it is larger, as torch.nn.utils.clip_grad_norm_ (default: no clipping)",
                                  metavar="C")
    reduction: str = opt("mean", "mean: divide the summed gradient once by the global B; sum: use it as is",
                         choices=("mean", "sum"))
    dtype: str = opt("float64", "floating-point type, kept end to end", choices=DTYPES)
    seed: int = opt(0, "seed for weights, data and sampling", metavar="S")
    address: str | None = opt(None, "Ray address: 'auto' joins a running cluster "
                                    "(default: $RAY_ADDRESS, else a new local Ray on 127.0.0.1)", metavar="ADDR")
    out: str | None = opt(None, "directory for results (default: runs/<timestamp>)", metavar="DIR")
    init_from: str | None = opt(None, "start a new run from the weights of this checkpoint (a run's checkpoint.npz "
                                      "or Network.save's file; --layers default to its), with a fresh optimizer "
                                      "and step 1: a new trajectory, unlike --resume", metavar="CHECKPOINT")
    checkpoint_every: int = opt(0, "also write checkpoint.npz every N steps (it is always written at the end "
                                   "of each epoch); a lost server restarts from the latest one", metavar="N")
    keep_checkpoints: int = opt(0, "also keep the last N checkpoints as checkpoint-<step>.npz (checkpoint.npz "
                                   "is always the latest); 0: only checkpoint.npz", metavar="N")
    eval_every: int = opt(0, "also evaluate on the test (or validation) split every N steps; 0: only at the end "
                             "of each epoch", metavar="N")
    fault_injection: str | None = opt(None, "faults to inject on purpose, comma-separated: kill-worker:K@S, "
                                            "delay-worker:K@S:SECONDS, kill-server@S (see docs/reliability.md)",
                                      metavar="SPEC")
    servers: int | str = opt("auto", "parameter-server actors S, each owning a contiguous range of the weights "
                                     "(bitwise the same result for any S); auto: one on each node of the cluster "
                                     "with a CPU for it (1 on one machine), so that no link carries the whole "
                                     "gradient (docs/performance.md)", metavar="S|auto")
    server_resource: str | None = opt(None, "put the parameter servers only on nodes that offer this Ray custom "
                                            "resource, one unit a server: servers on nodes of their own (BytePS's "
                                            "layout; docs/performance.md); with --servers auto, one server a unit",
                                      metavar="NAME")
    threads_per_worker: int | None = opt(None, "threads each worker backpropagates micro-batches on, one BLAS "
                                               "thread each (default: the worker's share of its node's CPUs); "
                                               "the same bits for any T", metavar="T")
    transport: str = opt("auto", "how a step's vectors travel between the actors: direct (the actors talk to each "
                                 "other: authenticated sockets between nodes, shared memory within a node; steps go "
                                 "in windows without Ray calls) or object-store (Ray's); auto: direct; the same "
                                 "bits either way",
                         choices=("auto", "direct", "object-store"), metavar="auto|direct|object-store",
                         removed=REMOVED_TRANSPORTS)
    mode: str = opt("sync", "sync: exact, the same bits for any K and S; async (push when done, pull the latest "
                            "weights) and ssp (bounded staleness) are NOT split-invariant: for experiments",
                    choices=("sync", "async", "ssp"))
    elastic_timeout: float = opt(300.0, "with fewer workers than the MIN of --workers MIN:MAX, wait this long for "
                                        "more, then checkpoint and stop; also how long servers lost with their node "
                                        "wait for a CPU to restart on, and how long the actors wait on each other "
                                        "within a window of steps (at least 30 s)", metavar="SECONDS")
    staleness: int | None = opt(None, "with --mode ssp: how many steps a worker may run ahead of the slowest, "
                                      "as in Ho et al. 2013 (default: 2)", metavar="s")
    report_to: str | None = opt(None, "also send each step's metrics and each evaluation to: tensorboard "
                                      "(<out>/tensorboard/), mlflow ($MLFLOW_TRACKING_URI, else ./mlruns); "
                                      "comma-separated", metavar="NAMES")
    timeline: bool = opt(False, "record each step's spans (worker compute, transfer, server sum and update, "
                                "waiting) in <out>/timeline.jsonl, for distbp timeline")

    def validate(self) -> None:
        """Raise UsageError naming the first bad option; checks that need the data come later."""
        self.workers = canonical_workers(self.workers)
        check_sizes(self)
        if not (self.elastic_timeout >= 0 and math.isfinite(self.elastic_timeout)):
            raise UsageError(f"--elastic-timeout must be a finite number of seconds >= 0, got {self.elastic_timeout}")
        for name in ("batch_size", "micro_batch", "threads_per_worker"):
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
        for name in ("keep_checkpoints", "eval_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{flag(name)} must be >= 0, got {getattr(self, name)}")
        self._check_optimizer()
        faults.parse(self.fault_injection, self.max_workers)
        self._check_modes()
        self.reporters()
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
            gone = f.metadata["removed"].get(getattr(self, f.name))
            if gone is not None:
                raise UsageError(f"--{flag(f.name)} {getattr(self, f.name)} was removed: use {gone}, which "
                                 "takes its place (the same bits)")
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UsageError(f"--{flag(f.name)}: unknown value {getattr(self, f.name)!r}; "
                                 f"choose one of {', '.join(choices)}")
        self.layer_sizes()

    def _check_optimizer(self) -> None:
        """--adam-betas, --adam-eps, --clip-norm: in range, and only where they do something."""
        try:
            parse_betas(self.adam_betas)
        except ValueError:
            raise UsageError(f"--adam-betas must be two numbers in [0, 1) like 0.9,0.999, "
                             f"got {self.adam_betas!r}") from None
        for name in ("adam_eps", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"--{flag(name)} must be a finite number > 0, got {value}")
        for name in ("adam_betas", "adam_eps"):
            if getattr(self, name) is not None and self.optimizer not in ("adam", "adamw"):
                raise UsageError(f"--{flag(name)} works only with --optimizer adam or adamw "
                                 f"(--optimizer {self.optimizer} has no use for it)")

    def _check_modes(self) -> None:
        """--servers, --mode, --staleness: what the asynchronous loop (async_train.py) cannot do is refused."""
        if self.servers != AUTO and (type(self.servers) is not int or self.servers < 1):
            raise UsageError(f"--servers must be at least 1, or auto, got {self.servers}")
        if self.staleness is not None and (self.mode != "ssp" or self.staleness < 0):
            raise UsageError(f"--staleness goes with --mode ssp and must be >= 0, got {self.staleness} "
                             f"with --mode {self.mode}")
        if self.mode == "sync":
            return
        if self.min_workers < self.max_workers:
            raise UsageError(f"--workers {self.workers}: a range works only with --mode sync (--mode {self.mode} "
                             "keeps its K workers)")
        if self.servers == AUTO:  # the asynchronous loop has one server
            self.servers = 1
        for name, default in (("servers", 1), ("server_resource", None), ("fault_injection", None),
                              ("checkpoint_every", 0), ("keep_checkpoints", 0), ("eval_every", 0),
                              ("report_to", None), ("timeline", False), ("transport", "auto")):
            if getattr(self, name) != default:
                raise UsageError(f"--{flag(name)} works only with --mode sync (--mode {self.mode} has one "
                                 "server, no fault handling, no per-step record and one checkpoint and "
                                 "evaluation, at the end)")

    def reporters(self) -> tuple[str, ...]:
        """The names in --report-to; UsageError for an unknown one or one whose extra is not
        installed (checked here, before anything of the run is created)."""
        names = tuple(n.strip() for n in (self.report_to or "").split(",") if n.strip())
        for name in names:
            if name not in REPORTERS:
                raise UsageError(f"--report-to: unknown value {name!r}; choose from {', '.join(REPORTERS)}")
            need_extra(REPORTERS[name], name, f"--report-to {name}")
        return names

    @property
    def min_workers(self) -> int:
        """MIN of --workers MIN:MAX (K for a plain K): fewer, and the run waits, then stops."""
        return worker_range(self.workers)[0]

    @property
    def max_workers(self) -> int:
        """MAX of --workers MIN:MAX (K for a plain K): worker slots, filled as the cluster has CPUs."""
        return worker_range(self.workers)[1]

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


# --report-to's names, and the module each needs (an optional extra of the same name).
REPORTERS = {"tensorboard": "tensorboardX", "mlflow": "mlflow"}


def need_extra(module: str, extra: str, what: str) -> None:
    """UsageError naming the pip command unless ``module`` is importable (looked up, not imported)."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs {module}: pip install -e \".[{extra}]\"")


def worker_range(value: int | str) -> tuple[int, int]:
    """``--workers`` as (MIN, MAX): ``K`` (an int or its text) is ``(K, K)``; UsageError if malformed."""
    text = str(value).strip() if not isinstance(value, bool) else "?"
    parts = text.split(":")
    if len(parts) > 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise UsageError(f"--workers must be K or MIN:MAX (whole numbers), got {value!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo < 1:
        raise UsageError(f"--workers must be at least 1, got {value}")
    if hi < lo:
        raise UsageError(f"--workers {value}: MAX must be at least MIN")
    return lo, hi


def canonical_workers(value: int | str) -> int | str:
    """``K`` and ``K:K`` as the int K; a true range as the text ``MIN:MAX``."""
    lo, hi = worker_range(value)
    return lo if lo == hi else f"{lo}:{hi}"


def flag(name: str) -> str:
    return name.replace("_", "-")


def check_sizes(config: Config) -> None:
    """UsageError for an integer option past ``MAX_INT``: 10**400 steps would pass every other
    check and reach Ray."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            shown = str(value) if len(str(value)) <= 20 else f"{str(value)[:12]}... ({len(str(value))} digits)"
            raise UsageError(f"--{flag(f.name)} {shown} is too large (at most {MAX_INT})")


def option_type(f) -> type:
    """The Python type of a Config field's values (None aside)."""
    default = f.default if f.default is not MISSING else None
    if f.name in ("steps", "base_batch", "staleness", "threads_per_worker", "servers"):
        return int
    if f.name in ("adam_eps", "clip_norm"):
        return float
    return type(default) if default is not None else str


def takes(name: str, kind: type, value) -> bool:
    """Whether ``value`` fits option ``name`` of type ``kind``: ``workers`` is an int K, or the text "MIN:MAX"."""
    if isinstance(value, bool):  # an int, to isinstance: only a switch takes True or False
        return kind is bool
    return isinstance(value, kind) or (name == "workers" and isinstance(value, str) and ":" in value) \
        or (name == "servers" and value == AUTO)
