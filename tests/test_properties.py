"""Whatever a user hands ``distbp train``, the contract holds (hypothesis generates the inputs).

The contract: exit 0 with a complete run directory (summary.json, metrics.jsonl and
checkpoint.npz that agree with each other, stdout exactly one JSON document), or exit 2 with
exactly one line on stderr, no traceback, and nothing created or changed: every file under
the example's directory is hashed before and after, and a new ``--out`` must not exist
afterwards.  Any other exit status, an exception escaping ``cli.main``, or a half-made
directory breaks it.

Each property generates one kind of input, valid and corrupted: option values, TOML files,
npz files, IDX files, checkpoints and metrics files (the last two then given to
``--resume``).  Inputs built to be wrong must exit 2, inputs built to be right must exit 0;
a few whose verdict is a matter of policy (marked ``EITHER``) need only keep the contract.
Every kind of value or damage in the tables below also runs once as an explicit example
(hypothesis draws some far more often than others), among them the inputs of issue 13.

Runs that pass validation start Ray: they join the session's Ray (``ray_session``) and stay
tiny (2-3 steps, batches <= 64), and few generated examples are valid.  Every property has
an explicit ``max_examples`` and hypothesis is derandomized with no example database, so CI
runs the same examples each time; the module prints how many it ran (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import traceback
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from distbp import cli
from distbp.config import Config
from distbp.data.idx import FASHION_MNIST_FILES
from distbp.lecture.network import ACTIVATIONS, DTYPES, LOSSES
from distbp.lecture.optim import OPTIMIZERS
from distbp.loops.sync import train
from distbp.run import checkpoint, metrics

VALID, INVALID, EITHER = "valid", "invalid", "either"

# The number of generated examples of each property, besides its explicit ones: with those,
# what CI executes (printed at the end).
OPTION_EXAMPLES = 40
TOML_EXAMPLES = 30
NPZ_EXAMPLES = 30
IDX_EXAMPLES = 30
CHECKPOINT_EXAMPLES = 30
METRICS_EXAMPLES = 25

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

EXAMPLES: Counter = Counter()  # property -> examples executed
EXPLICIT: Counter = Counter()  # property -> its explicit examples
RAN: Counter = Counter()  # property -> examples that trained (exit 0)
SECONDS: Counter = Counter()  # property -> seconds spent in its examples


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    lines = [f"  {name:<11}{EXAMPLES[name]:>4} examples ({min(EXPLICIT[name], EXAMPLES[name]):>3} explicit, "
             f"{max(0, EXAMPLES[name] - EXPLICIT[name]):>3} generated), {RAN[name]:>3} exit 0, {SECONDS[name]:5.1f} s"
             for name in EXAMPLES]
    print(f"\nproperty examples executed: {sum(EXAMPLES.values())} ({sum(RAN.values())} ran to exit 0)\n"
          + "\n".join(lines))


def examples(name: str, cases: list[dict]):
    """Run each of ``cases`` (the test's keyword arguments) as an explicit example, every time."""
    def decorate(test):
        for kwargs in reversed(cases):
            test = example(**kwargs)(test)
        EXPLICIT[name] += len(cases)
        return test
    return decorate


def contract_test(name: str, most: int, cases: list[dict], **strategies):
    """A property test of the contract: ``cases`` every time (``examples``), then up to ``most``
    drawn from ``strategies``."""
    def decorate(test):
        return settings(max_examples=most, **SETTINGS)(given(**strategies)(examples(name, cases)(test)))
    return decorate


# ---------------------------------------------------------------------------------------------
# The contract


def snapshot(root: str) -> dict[str, str]:
    """Every entry under ``root``: directories, symlinks (their target) and files (sha256)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        state[rel + "/"] = "dir"
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            key = os.path.join(rel, name)
            if os.path.islink(path):
                state[key] = "link -> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    state[key] = hashlib.sha256(fh.read()).hexdigest()
    return state


@contextlib.contextmanager
def workspace(tmp_path):
    """A fresh directory for one example, the working directory while it runs (so a default
    ``runs/<timestamp>`` lands in it), removed afterwards."""
    ws = str(tmp_path / f"ex{sum(EXAMPLES.values())}-{time.monotonic_ns()}")
    os.makedirs(ws)
    here = os.getcwd()
    os.chdir(ws)
    try:
        yield ws
    finally:
        os.chdir(here)
        shutil.rmtree(ws, ignore_errors=True)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``cli.main(argv)`` in this process: its status, stdout and stderr.  An exception escaping
    main is a traceback the user would see: the contract is broken.  Warnings reach stderr as
    they would in a fresh ``distbp`` process (pytest would otherwise collect them)."""
    capsys.readouterr()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)  # Python's default filters
            warnings.showwarning = _print_warning
            code = cli.main(argv)
    except BaseException as exc:  # noqa: BLE001 - whatever escapes is the failure being tested for
        out, err = capsys.readouterr()
        pytest.fail(f"cli.main raised {type(exc).__name__}: {exc}\nargv: {argv}\nstderr: {err[-2000:]}\n"
                    + "".join(traceback.format_exception(exc))[-3000:])
    out, err = capsys.readouterr()
    return code, out, err


def each_fault(faults: dict) -> list[tuple]:
    """``(k, fault, label)`` for every fault of ``faults`` (label -> its faults), numbered from 0."""
    return [(k, fault, label) for k, (fault, label) in enumerate((f, lb) for lb, fs in faults.items() for f in fs)]


def as_examples(cases: list) -> list[dict]:
    """The explicit examples of a property test whose argument is ``case``."""
    return [dict(case=case) for case in cases]


def check_contract(name: str, argv: list[str], ws: str, capsys, expect: int | None,
                   new_out: str | None = None, one_run: bool = True) -> int:
    """Run ``argv`` and assert the contract; ``expect`` 0 or 2 also pins which way it must go.

    ``new_out``: the --out directory that did not exist before (must not exist after an exit 2).
    ``one_run``: metrics.jsonl must hold steps 1..N once each (not for logs the test damaged).
    """
    EXAMPLES[name] += 1
    before = snapshot(ws)
    started = time.monotonic()
    code, out, err = run_cli(argv, capsys)
    SECONDS[name] += time.monotonic() - started
    said = f"argv: {argv}\nexit {code}\nstdout: {out[-1500:]!r}\nstderr: {err[-1500:]!r}"
    assert "Traceback" not in err, said
    if code == 0:
        RAN[name] += 1
        check_complete(ws, before, out, said, one_run)
    elif code == 2:
        lines = err.rstrip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("distbp: error: "), "not one error line\n" + said
        assert out == "", "stdout is not empty on exit 2\n" + said
        after = snapshot(ws)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"exit 2 but files were created or changed: {changed}\n" + said
        if new_out is not None:
            assert not os.path.lexists(new_out), f"exit 2 left the new --out {new_out}\n" + said
    else:
        pytest.fail(f"exit {code}: neither a finished run (0) nor refused input (2)\n" + said)
    if expect is not None:
        assert code == expect, f"expected exit {expect}\n" + said
    return code


def check_complete(ws: str, before: dict[str, str], out: str, said: str, one_run: bool) -> None:
    """Exit 0: stdout is one JSON document naming a run directory whose files agree with it,
    and nothing outside that directory changed."""
    try:
        doc = json.loads(out)  # exactly one document: json.loads refuses anything after it
    except ValueError as exc:
        pytest.fail(f"stdout is not exactly one JSON document ({exc})\n" + said)
    assert isinstance(doc, dict) and {"out", "steps", "weights_sha256"} <= set(doc), said
    ws = os.path.realpath(ws)
    run_dir = os.path.realpath(os.path.join(ws, doc["out"]))
    assert run_dir.startswith(ws + os.sep), f"results outside the workspace: {run_dir}\n" + said
    for name in ("summary.json", "metrics.jsonl", "checkpoint.npz"):
        assert os.path.isfile(os.path.join(run_dir, name)), f"exit 0 without {name}\n" + said
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["weights_sha256"] == doc["weights_sha256"] and summary["steps"] == doc["steps"], said
    saved = checkpoint.load(os.path.join(run_dir, "checkpoint.npz"))
    assert saved["step"] == doc["steps"], f"checkpoint of step {saved['step']}, summary of {doc['steps']}\n" + said
    assert checkpoint.sha256_le(saved["weights"]) == doc["weights_sha256"], "checkpoint is not the result\n" + said
    records = metrics.read(os.path.join(run_dir, "metrics.jsonl"))
    if one_run and summary.get("mode", "sync") == "sync":
        assert [r["step"] for r in metrics.steps(records)] == list(range(1, doc["steps"] + 1)), said
    leftovers = [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]
    assert not leftovers, f"temporary files left in the run directory: {leftovers}\n" + said
    rel = os.path.relpath(run_dir, ws)
    after = snapshot(ws)
    outside = sorted(k for k in set(before) | set(after)
                     if not (k == rel + "/" or k.startswith(rel + os.sep)) and before.get(k) != after.get(k)
                     and not rel.startswith(k.rstrip("/") + os.sep))  # parents made for a nested --out
    assert not outside, f"files outside the run directory changed: {outside}\n" + said


def pick(draw, label_values: dict[str, list]) -> tuple[object, str]:
    """One (value, label) from {label: [values or strategies]}, the label drawn first."""
    labels = [label for label, values in label_values.items() if values]
    label = draw(st.sampled_from(labels))
    value = draw(st.sampled_from(label_values[label]))
    if isinstance(value, st.SearchStrategy):
        value = draw(value)
    return value, label


def flat(table: dict[str, list]) -> st.SearchStrategy:
    """One (value, label) of the table, each value one entry (so the many faults outnumber the few
    valid variants, instead of each label being as likely as another)."""
    return st.sampled_from([(value, label) for label, values in table.items() for value in values])


def verdict(labels: list[str]) -> int | None:
    """2 if anything is invalid, else 0 unless something is a matter of policy (None)."""
    if INVALID in labels:
        return 2
    return None if EITHER in labels else 0


# ---------------------------------------------------------------------------------------------
# Option values (flags, and the same values written into TOML files)

NAN, INF = float("nan"), float("inf")

# option -> {label: values}; valid values keep a run tiny and finite (no divergence in 3 steps).
OPTION_VALUES: dict[str, dict[str, list]] = {
    "workers": {VALID: [st.integers(1, 2)], INVALID: [0, -1, -2**63, 10**6, "x", "", "1.5", "nan"]},
    "servers": {VALID: [st.integers(1, 2)], INVALID: [0, -3, 10**9, "two"]},
    "batch_size": {VALID: [st.integers(8, 64)], INVALID: [0, -1, 10**9, "", "3e2", "nan"]},
    "micro_batch": {VALID: [st.integers(1, 64)], INVALID: [0, -8, "m", "inf"], EITHER: [10**9]},
    "steps": {VALID: [st.integers(1, 3)], INVALID: [0, -1, "", "two", "1.0", "inf"]},
    "epochs": {VALID: [st.floats(0.01, 5.0)], INVALID: [0.0, -1.0, NAN, INF, "x", ""]},
    "lr": {VALID: [st.floats(0.0, 0.1)], INVALID: [-1e-3, NAN, INF, -INF, "fast", ""]},
    "momentum": {VALID: [st.floats(0.0, 0.99)], INVALID: [1.0, 5.0, -0.1, NAN, INF, "x"]},
    "weight_decay": {VALID: [st.floats(0.0, 0.1)], INVALID: [-1.0, NAN, INF, "x"]},
    "optimizer": {VALID: list(OPTIMIZERS), INVALID: ["", "Adam", "rmsprop"]},
    "activation": {VALID: list(ACTIVATIONS), INVALID: ["", "gelu", "TANH"]},
    "loss": {VALID: list(LOSSES), INVALID: ["mse", ""]},
    "reduction": {VALID: ["mean", "sum"], INVALID: ["avg", ""]},
    "dtype": {VALID: list(DTYPES), INVALID: ["float16", "int8", ""]},
    "seed": {VALID: [st.integers(0, 2**32 - 1)], INVALID: [-1, -2**70, "x", "", "1.5"], EITHER: [2**64, 10**30]},
    "val_fraction": {VALID: [0.0, 0.1, 0.25, 0.5], INVALID: [1.0, 1.5, -0.1, NAN, INF, "x"]},
    "warmup_steps": {VALID: [st.integers(0, 5)], INVALID: [-1, "x", "1.5"]},
    "checkpoint_every": {VALID: [st.integers(0, 3)], INVALID: [-1, "x"]},
    "base_batch": {VALID: [st.integers(32, 256)], INVALID: [0, -1, "x"]},
    "lr_decay": {VALID: [st.floats(0.01, 1.0)], INVALID: [0.0, -0.5, 1.5, NAN, INF]},
    "fault_injection": {
        VALID: ["", "delay-worker:0@1:0", "delay-worker:0@1:0.01"],
        INVALID: ["delay-worker:0@1:1.2.3", "delay-worker:0@1:e", "kill-worker:5@1", "kill-worker:0@0", "bogus",
                  "delay-worker:0@1:nan", "delay-worker:0@1:-1", "delay-worker:0@1:1e999", "kill-server@0"],
        EITHER: ["kill-server@99", " , "],  # past the last step; an empty list
    },
    "address": {EITHER: ["local", "127.0.0.1:", ""]},  # the session's Ray is used whatever it says
    "data_dir": {EITHER: ["{ws}/empty", ""]},  # unused by these datasets
}

# --mode with --staleness, --lr-schedule with --lr-step-epochs: each pair is drawn together.
MODES = {VALID: [{"mode": "sync"}, {"mode": "async"}, {"mode": "ssp"}, {"mode": "ssp", "staleness": 0},
                 {"mode": "ssp", "staleness": 2}],
         INVALID: [{"mode": "sync", "staleness": 1}, {"mode": "ssp", "staleness": -1}, {"mode": "bogus"},
                   {"mode": "async", "staleness": 0}, {"mode": ""}]}
SCHEDULES = {VALID: [{"lr_schedule": "constant"}, {"lr_schedule": "cosine"},
                     {"lr_schedule": "step", "lr_step_epochs": "1"}, {"lr_schedule": "step", "lr_step_epochs": "1,2"}],
             INVALID: [{"lr_schedule": "step"}, {"lr_schedule": "constant", "lr_step_epochs": "1"},
                       {"lr_schedule": "step", "lr_step_epochs": "2,1"}, {"lr_schedule": "step", "lr_step_epochs": "0"},
                       {"lr_schedule": "step", "lr_step_epochs": "x"}, {"lr_schedule": "step", "lr_step_epochs": ""},
                       {"lr_schedule": "linear"}]}
OUTS = {VALID: ["{ws}/out", "{ws}/a/b/out", "{ws}/empty", None],  # None: no --out, runs/<timestamp>
        INVALID: ["", "{ws}/full", "{ws}/afile", "{ws}/afile/out"]}
BAD_DATASETS = ["random:0,2,3", "random:10,2,1", "random:a,b,c", "random:1000000000,1000,10", "random:-5,2,3",
                "random:5,2", "", "mnist", "npz:", "npz:{ws}/missing.npz", "fashion-mnist"]
BAD_LAYERS = ["", "2", "2,,3", "2,0,3", "2,-8,3", "2,8,3.5", "a", " ", "{d},10000000000,{c}", "{d1},8,{c}",
              "{d},8,{c1}"]
# whole argv pieces nobody should get away with
BAD_EXTRAS = [["--bogus=1"], ["--Workers=2"], ["stray"], ["--steps"], ["--resume", ""], ["--resume", "{ws}/nope"],
              ["--resume", "{ws}/empty"], ["--config", "{ws}/nope.toml"]]
TINY = {"batch_size": 32, "micro_batch": 8, "steps": 2, "workers": 1}


@dataclass
class Options:
    """Option values with their labels; ``extras`` are argv pieces appended as they are."""

    values: dict[str, tuple[object, str]]
    extras: list[str] = field(default_factory=list)
    n_train: int = 1500

    @property
    def expect(self) -> int | None:
        labels = [label for _, label in self.values.values()]
        if self.extras:
            labels.append(INVALID)
        v = {k: value for k, (value, _) in self.values.items()}
        if v.get("mode", "sync") != "sync" and (v.get("servers", 1) != 1 or v.get("checkpoint_every", 0) != 0
                                                 or "fault_injection" in v):
            labels.append(INVALID)  # async and ssp have one server, no checkpoints and no faults
        batch, fraction = v.get("batch_size"), v.get("val_fraction", 0.0)
        if isinstance(batch, int) and isinstance(fraction, float) and 0 <= fraction < 1 \
                and batch > self.n_train - round(self.n_train * fraction):
            labels.append(INVALID)  # a batch larger than the training set
        fault = str(v.get("fault_injection", ""))
        if "@" in fault and isinstance(v.get("steps"), int) and fault.split("@")[1].split(":")[0].isdigit() \
                and int(fault.split("@")[1].split(":")[0]) > v["steps"]:
            labels.append(EITHER)  # a fault planned past the last step
        return verdict(labels)


@st.composite
def options(draw) -> Options:
    """The options of a tiny run, then some replaced: all by valid values in about one example
    of six (those train), else with at least one value built to be refused."""
    all_valid = draw(st.integers(0, 9)) == 3
    d, c, n = 2, 3, 1500
    values: dict[str, tuple[object, str]] = {k: (v, VALID) for k, v in TINY.items()}
    # the data and the layers
    if all_valid or draw(st.booleans()):
        if draw(st.booleans()):
            n, d, c = draw(st.integers(64, 128)), draw(st.integers(1, 3)), draw(st.integers(2, 3))
            values["dataset"] = (f"random:{n},{d},{c}", VALID)
        else:
            values["dataset"] = ("spirals", VALID)
        layers = draw(st.sampled_from(["{d},{c}", "{d},8,{c}", "{d},4,4,{c}", None]))
        if not all_valid and draw(st.integers(0, 3)) == 0:
            layers = draw(st.sampled_from(BAD_LAYERS))
            values["layers"] = (layers.format(d=d, c=c, d1=d + 1, c1=c + 1), INVALID)
        elif layers is not None:
            values["layers"] = (layers.format(d=d, c=c), VALID)
    else:
        values["dataset"] = (draw(st.sampled_from(BAD_DATASETS)), INVALID)
        values["layers"] = ("2,8,3", VALID)
        values["data_dir"] = ("{ws}/empty", VALID)  # fashion-mnist: not the machine's copy
    # some of the other options
    names = draw(st.lists(st.sampled_from(sorted(OPTION_VALUES)), max_size=5, unique=True))
    if values["dataset"][0] == "fashion-mnist" and "data_dir" in names:
        names.remove("data_dir")  # never the machine's own copy of Fashion-MNIST
    for name in names:
        table = OPTION_VALUES[name]
        if all_valid:
            table = {label: vals for label, vals in table.items() if label != INVALID}
        values[name] = pick(draw, table)
    for group in (MODES, SCHEDULES):
        if draw(st.booleans()):
            chosen, label = pick(draw, {VALID: group[VALID]} if all_valid else group)
            values.update({k: (v, label) for k, v in chosen.items()})
    out, out_label = pick(draw, {VALID: OUTS[VALID]} if all_valid else OUTS)
    values["out"] = (out, out_label)
    extras = []
    if not all_valid and (draw(st.integers(0, 4)) == 0 or INVALID not in [lb for _, lb in values.values()]):
        if INVALID in [lb for _, lb in values.values()] or draw(st.booleans()):
            extras = draw(st.sampled_from(BAD_EXTRAS))
        else:  # make sure: one more value built to be refused
            name = draw(st.sampled_from(sorted(k for k, t in OPTION_VALUES.items() if t.get(INVALID))))
            values[name] = (draw(st.sampled_from(OPTION_VALUES[name][INVALID])), INVALID)
    if not all_valid and INVALID not in [lb for _, lb in values.values()] and not extras:
        extras = ["--bogus=1"]
    return Options(values, list(extras), n_train=n)


def render(value) -> str:
    """A value as the user types it."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == INF else "-inf" if value == -INF else repr(value))
    return str(value)


def option_argv(opts: Options, ws: str, flags_as: str = "=") -> list[str]:
    argv = ["train"]
    for name, (value, _) in opts.values.items():
        if value is None:
            continue
        text = render(value).replace("{ws}", ws)
        flag = "--" + name.replace("_", "-")
        argv += [f"{flag}={text}"] if flags_as == "=" else [flag, text]
    return argv + [piece.replace("{ws}", ws) for piece in opts.extras]


def prepare_workspace(ws: str) -> None:
    """What the generated paths point at: an empty dir, a non-empty one, a plain file."""
    os.makedirs(os.path.join(ws, "empty"))
    os.makedirs(os.path.join(ws, "full"))
    with open(os.path.join(ws, "full", "keep.txt"), "w") as fh:
        fh.write("results someone saved\n")
    with open(os.path.join(ws, "afile"), "w") as fh:
        fh.write("not a directory\n")


def out_of(opts: Options, ws: str) -> str | None:
    out = opts.values.get("out", (None, VALID))[0]
    if out in ("{ws}/out", "{ws}/a/b/out"):
        return os.path.join(ws, "a" if "/a/" in out else "out")
    return None


def tiny(label: str = INVALID, extras=(), **changed) -> Options:
    """The tiny valid run with ``changed`` options (labelled ``label``): the explicit examples."""
    values = {k: (v, VALID) for k, v in {**TINY, "dataset": "spirals", "layers": "2,8,3", "out": "{ws}/out"}.items()}
    values.update({k: (v, label) for k, v in changed.items()})
    return Options(values, list(extras))


def option_examples() -> list[dict]:
    """Every value of the tables that is refused, each on its own in the tiny run, and the policy
    values of the issue (a fault past the last step, huge seeds); the issue's sizes that do not
    fit in memory; the tiny run itself.  (The other policy values, which train, are left to
    the generated examples: each costs a run.)"""
    cases = [tiny(VALID), tiny(dataset="random:1000000000,1000,10", layers="1000,8,10"),
             tiny(dataset="random:100,4,3", layers="4,10000000000,3")]
    for name, table in OPTION_VALUES.items():
        cases += [tiny(INVALID, **{name: value}) for value in table.get(INVALID, [])]
        if name in ("fault_injection", "seed"):
            cases += [tiny(EITHER, **{name: value}) for value in table[EITHER]]
    cases += [tiny(INVALID, **chosen) for group in (MODES, SCHEDULES) for chosen in group[INVALID]]
    cases += [tiny(INVALID, out=out) for out in OUTS[INVALID]]
    cases += [tiny(INVALID, dataset=spec, data_dir="{ws}/empty") for spec in BAD_DATASETS]
    cases += [tiny(INVALID, layers=layers.format(d=2, c=3, d1=3, c1=4)) for layers in BAD_LAYERS]
    cases += [tiny(VALID, extras=extras) for extras in BAD_EXTRAS]  # extras are refused whatever the rest
    return [dict(opts=opts, flags_as="= "[k % 2]) for k, opts in enumerate(cases)]


@contract_test("options", OPTION_EXAMPLES, option_examples(), opts=options(), flags_as=st.sampled_from(["=", " "]))
def test_any_option_values_keep_the_contract(ray_session, tmp_path, capsys, opts, flags_as):
    with workspace(tmp_path) as ws:
        prepare_workspace(ws)
        argv = option_argv(opts, ws, flags_as)
        check_contract("options", argv, ws, capsys, opts.expect, new_out=out_of(opts, ws))


# ---------------------------------------------------------------------------------------------
# TOML files

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return render(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return value.isoformat()  # a date


@dataclass
class TomlFile:
    """Options, each written into the TOML file (``in_file``) or given as a flag."""

    opts: Options
    in_file: dict[str, str]  # option -> the key it has in the file ("batch-size" or "batch_size")
    more_lines: list[str]  # extra lines (duplicates, unknown keys, wrong types)
    file_fault: str | None
    cut: float
    label: str  # of the extra lines and the file fault

    @property
    def expect(self) -> int | None:
        return verdict([self.label, {0: VALID, 2: INVALID, None: EITHER}[self.opts.expect]])


WRONG_TYPES = {"workers": [True, [1, 2], {"a": 1}, 2.0], "lr": ["0.1", [0.1], True], "layers": [[2, "x", 3], 7],
               "dataset": [5, ["spirals"]], "steps": [1.5, "2"], "seed": [False, "0"]}
UNKNOWN_KEYS = ["bogus", "Workers", "resume", "config", "batch__size", '""', "lr.rate"]
FILE_FAULTS = {INVALID: ["non-utf8", "missing", "directory", "nul"], EITHER: ["truncated", "bom"],
               VALID: ["empty-lines"]}


@st.composite
def toml_files(draw) -> TomlFile:
    opts = draw(options())
    in_file = {}
    for name in opts.values:
        if draw(st.booleans()):
            in_file[name] = draw(st.sampled_from([name, name.replace("_", "-")]))
    more, label = [], VALID
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["duplicate", "exact-duplicate", "unknown", "wrong-type", "list-layers"]))
        if kind == "duplicate":  # both spellings of one option: which one counts?
            name = draw(st.sampled_from(["batch_size", "micro_batch", "checkpoint_every", "weight_decay"]))
            value = draw(st.integers(1, 64))
            in_file.pop(name, None)
            opts.values.pop(name, None)
            more += [f"{name} = {value}", f"{name.replace('_', '-')} = {value}"]
            label = INVALID
        elif kind == "exact-duplicate":
            more += ["workers = 1", "workers = 1"]
            in_file.pop("workers", None)
            label = INVALID
        elif kind == "unknown":
            more.append(f"{draw(st.sampled_from(UNKNOWN_KEYS))} = 1")
            label = INVALID
        elif kind == "wrong-type":
            name = draw(st.sampled_from(sorted(WRONG_TYPES)))
            in_file.pop(name, None)
            opts.values.pop(name, None)
            more.append(f"{name} = {toml_value(draw(st.sampled_from(WRONG_TYPES[name])))}")
            label = INVALID
        elif "layers" in opts.values and opts.values["layers"][1] == VALID and opts.values["layers"][0]:
            layers = [int(x) for x in str(opts.values["layers"][0]).split(",")]
            in_file.pop("layers", None)
            opts.values.pop("layers")
            more.append(f"layers = {toml_value(layers)}")  # a list of sizes is read as D0,...,DL
    fault, fault_label = None, VALID
    if draw(st.integers(0, 3)) == 0:
        fault, fault_label = draw(flat(FILE_FAULTS))
    labels = [label, fault_label]
    return TomlFile(opts, in_file, more, fault, draw(st.floats(0.0, 1.0)),
                    INVALID if INVALID in labels else EITHER if EITHER in labels else VALID)


def write_toml(case: TomlFile, ws: str) -> tuple[str, list[str]]:
    """The file and the flags that go with it."""
    lines, flags = [], []
    for name, (value, _) in case.opts.values.items():
        if value is None:
            continue
        if name in case.in_file:
            text = toml_value(value)
            lines.append(f"{case.in_file[name]} = {text.replace('{ws}', ws)}")
        else:
            flags.append(f"--{name.replace('_', '-')}={render(value).replace('{ws}', ws)}")
    text = "\n".join(lines + case.more_lines) + "\n"
    path = os.path.join(ws, "options.toml")
    data = text.encode()
    at = int(case.cut * len(data))
    if case.file_fault == "non-utf8":
        data = data[:at] + b"\xff\xfe" + data[at:]
    elif case.file_fault == "nul":
        data = data[:at] + b"\x00" + data[at:]
    elif case.file_fault == "truncated":
        data = data[:at]
    elif case.file_fault == "bom":
        data = b"\xef\xbb\xbf" + data
    elif case.file_fault == "empty-lines":
        data = b"\n\n# options\n" + data.replace(b"\n", b"\n\n")
    if case.file_fault == "directory":
        os.makedirs(path)
    elif case.file_fault != "missing":
        with open(path, "wb") as fh:
            fh.write(data)
    return path, flags


def toml_of(opts: Options, more_lines=(), fault=None, label=VALID) -> TomlFile:
    return TomlFile(opts, {name: name.replace("_", "-") for name in opts.values}, list(more_lines), fault, 0.5, label)


def without(name: str) -> Options:
    opts = tiny(VALID)
    opts.values.pop(name)
    return opts


def toml_examples() -> list[dict]:
    """The tiny run written into a file, with each file fault, each kind of bad line."""
    cases = [toml_of(tiny(VALID)), toml_of(tiny(seed=-1)),
             toml_of(tiny(VALID), ["batch_size = 16"], label=INVALID),  # beside batch-size = 32
             toml_of(tiny(VALID), ["workers = 1"], label=INVALID),  # the same key twice
             toml_of(without("layers"), ["layers = [2, 8, 3]"])]
    cases += [toml_of(tiny(VALID), fault=fault, label=label) for label, faults in FILE_FAULTS.items()
              for fault in faults]
    cases += [toml_of(tiny(VALID), [f"{key} = 1"], label=INVALID) for key in UNKNOWN_KEYS]
    cases += [toml_of(without(name) if name in TINY or name in ("layers", "dataset") else tiny(VALID),
                      [f"{name} = {toml_value(value)}"], label=INVALID)
              for name, values in WRONG_TYPES.items() for value in values]
    return as_examples(cases)


@contract_test("toml", TOML_EXAMPLES, toml_examples(), case=toml_files())
def test_any_toml_file_keeps_the_contract(ray_session, tmp_path, capsys, case):
    with workspace(tmp_path) as ws:
        prepare_workspace(ws)
        path, flags = write_toml(case, ws)
        argv = ["train", "--config", path, *flags, *[p.replace("{ws}", ws) for p in case.opts.extras]]
        check_contract("toml", argv, ws, capsys, case.expect, new_out=out_of(case.opts, ws))


# ---------------------------------------------------------------------------------------------
# npz files

NPZ_ARRAY_FAULTS = {
    INVALID: ["x-nan", "x-inf", "x-1d", "x-3d", "x-empty", "y-short", "y-negative", "y-2**40", "y-2**31",
              "y-float-1d", "y-int-2d", "missing-X", "missing-y", "extra-array", "x-test-alone",
              "x-test-features", "x-complex", "x-str", "x-object", "x-bool", "x-overflows-float32",
              "ce-on-float-targets"],
    EITHER: ["y-bool"],
    VALID: ["y-test-beyond-train"],
}
NPZ_FILE_FAULTS = {INVALID: ["npy-renamed", "truncated", "empty", "garbage", "directory", "missing",
                             "header-1e13", "zip-of-text"],
                   EITHER: ["flip-byte"]}


@dataclass
class NpzFile:
    n: int
    d: int
    c: int
    floats: bool  # (N, C) float targets instead of class ids
    x_dtype: str
    test: bool
    seed: int
    array_faults: tuple[str, ...]
    file_fault: str | None
    where: float
    expect: int | None


@st.composite
def npz_files(draw) -> NpzFile:
    good = draw(st.integers(0, 19)) == 7  # each valid example trains (seconds): few
    array_faults, file_fault, labels = [], None, []
    if not good:
        for _ in range(draw(st.integers(0, 2))):
            fault, label = draw(flat(NPZ_ARRAY_FAULTS))
            array_faults.append(fault)
            labels.append(label)
        if not array_faults or draw(st.integers(0, 2)) == 0:
            file_fault, label = draw(flat(NPZ_FILE_FAULTS))
            labels.append(label)
    return NpzFile(draw(st.integers(40, 100)), draw(st.integers(1, 4)), draw(st.integers(2, 4)), draw(st.booleans()),
                   draw(st.sampled_from(["float64", "float32", "int64", "uint8"])), draw(st.booleans()),
                   draw(st.integers(0, 2**16)), tuple(array_faults), file_fault, draw(st.floats(0.0, 1.0)),
                   verdict(labels))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True)
    return buf.getvalue()


def claims_1e13_items(dtype: str = "<f8", shape=(10**13,)) -> bytes:
    """An .npy member whose header promises far more data than any machine holds."""
    buf = io.BytesIO()
    buf.write(np.lib.format.magic(1, 0))
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


def write_zip(path: str, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def file_fault(path: str, fault: str | None, where: float, arrays: dict[str, np.ndarray]) -> None:
    """Damage the file at ``path`` (written from ``arrays``) the way ``fault`` says."""
    if fault is None:
        return
    data = open(path, "rb").read() if os.path.isfile(path) else b""
    at = min(max(1, int(where * len(data))), max(len(data) - 1, 1))
    if fault in ("directory", "missing"):
        os.unlink(path)
        if fault == "directory":
            os.makedirs(path)
        return
    if fault == "npy-renamed":
        data = npy_bytes(next(iter(arrays.values())))
    elif fault == "truncated":
        data = data[:at]
    elif fault == "empty":
        data = b""
    elif fault == "garbage":
        data = b"PK\x03\x04" + bytes(range(256)) * 4
    elif fault == "flip-byte":
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    elif fault == "header-1e13":
        first = next(iter(arrays))
        write_zip(path, {f"{k}.npy": claims_1e13_items() if k == first else npy_bytes(v) for k, v in arrays.items()})
        return
    elif fault == "zip-of-text":
        write_zip(path, {f"{k}.npy": b"these are not the arrays\n" for k in arrays})
        return
    with open(path, "wb") as fh:
        fh.write(data)


def build_npz(case: NpzFile, ws: str) -> tuple[str, list[str]]:
    """The npz file in ``ws`` and the flags that fit its data (D, C, loss, batch)."""
    rng = np.random.default_rng(case.seed)
    n, d, c = case.n, case.d, case.c
    X = rng.standard_normal((n, d)) * 3
    X = X.astype(case.x_dtype) if case.x_dtype.startswith("float") else np.abs(X).astype(case.x_dtype)
    y = rng.standard_normal((n, c)) if case.floats else rng.integers(0, c, n)
    arrays = {"X": X, "y": y}
    if case.test:
        arrays["X_test"], arrays["y_test"] = X[:10].copy(), y[:10].copy()
    loss = "squared" if case.floats else "cross-entropy"
    dtype = "float64"
    # the faults that replace y whole go first, so that they cannot undo another fault
    for fault in sorted(case.array_faults, key=lambda f: f not in ("y-bool", "y-test-beyond-train")):
        X, y = arrays.get("X", X), arrays.get("y", y)
        if fault in ("x-nan", "x-inf") and X.size:
            arrays["X"] = X.astype(np.float64)
            arrays["X"].flat[X.size // 2] = np.nan if fault == "x-nan" else -np.inf
        elif fault == "x-1d":
            arrays["X"] = X.reshape(-1)
        elif fault == "x-3d":
            arrays["X"] = X.reshape(X.shape[0], int(np.prod(X.shape[1:])), 1)
        elif fault == "x-empty":
            arrays["X"], arrays["y"] = X[:0], y[:0]
        elif fault == "y-short":
            arrays["y"] = y[:-1]
        elif fault in ("y-negative", "y-2**40", "y-2**31"):
            arrays["y"] = np.asarray(y).astype(np.int64) if y.ndim == 1 and y.size else rng.integers(0, c, n)
            arrays["y"][0] = {"y-negative": -1, "y-2**40": 2**40, "y-2**31": 2**31}[fault]
            loss = "cross-entropy"
        elif fault == "y-float-1d":
            arrays["y"] = rng.standard_normal(n)
        elif fault == "y-int-2d":
            arrays["y"] = rng.integers(0, c, (n, c))
        elif fault == "missing-X":
            arrays.pop("X", None)
        elif fault == "missing-y":
            arrays.pop("y", None)
        elif fault == "extra-array":
            arrays["weights"] = np.zeros(3)
        elif fault == "x-test-alone":
            arrays.pop("y_test", None)
            arrays["X_test"] = X[:5].copy()
        elif fault == "x-test-features":
            arrays["X_test"], arrays["y_test"] = np.zeros((4, d + 1)), y[:4].copy()
        elif fault == "x-complex":
            arrays["X"] = X.astype(np.complex128)
        elif fault == "x-str":
            arrays["X"] = X.astype(str)
        elif fault == "x-object":
            arrays["X"] = X.astype(object)
        elif fault == "x-bool":
            arrays["X"] = X > 0
        elif fault == "x-overflows-float32":
            arrays["X"] = X.astype(np.float64) if X.size else rng.standard_normal((n, d))
            arrays["X"].flat[0] = 1e300
            dtype = "float32"
        elif fault == "ce-on-float-targets":
            arrays["y"] = rng.standard_normal((n, c))
            loss = "cross-entropy"
        elif fault == "y-bool":
            arrays["y"] = rng.integers(0, 2, n).astype(bool)
            arrays.pop("y_test", None)
            arrays.pop("X_test", None)
        elif fault == "y-test-beyond-train" and y.ndim == 1:
            arrays["y"] = np.asarray(y) % c
            arrays["X_test"], arrays["y_test"] = X[:4].copy(), np.full(4, c)
    if not arrays:
        arrays["notes"] = np.zeros(3)
    path = os.path.join(ws, "data.npz")
    np.savez(path, **arrays)
    file_fault(path, case.file_fault, case.where, arrays)
    # the layers the data asks for, whatever it holds
    Xa, ya = arrays.get("X"), arrays.get("y")
    d_in = Xa.shape[1] if Xa is not None and Xa.ndim == 2 else 2
    if ya is not None and ya.ndim == 2 and ya.dtype.kind == "f":
        d_out = ya.shape[1]
        loss = "cross-entropy" if "ce-on-float-targets" in case.array_faults else "squared"
    elif ya is not None and ya.ndim == 1 and ya.size and ya.dtype.kind in "iub":
        d_out = int(max(int(a.max()) for a in (ya, arrays.get("y_test")) if a is not None and a.size)) + 1
    else:
        d_out = 3
    rows = len(Xa) if Xa is not None and Xa.ndim >= 1 and len(Xa) else 8
    return path, ["--layers", f"{d_in},8,{d_out}", "--loss", loss, "--dtype", dtype,
                  "--batch-size", str(min(32, rows)), "--micro-batch", "8", "--steps", "2"]


def npz_examples() -> list[dict]:
    """Class ids and float targets, then each fault of the arrays, each of the file, alone."""
    expect = {VALID: 0, INVALID: 2, EITHER: None}
    cases = [NpzFile(60, 2, 3, False, "float64", True, 1, (), None, 0.5, 0),
             NpzFile(50, 3, 2, True, "float32", False, 2, (), None, 0.5, 0)]
    cases += [NpzFile(60, 2, 3, False, "float64", k % 2 == 0, k, (fault,), None, 0.5, expect[label])
              for k, fault, label in each_fault(NPZ_ARRAY_FAULTS)]
    cases += [NpzFile(60, 2, 3, False, "float64", k % 2 == 0, k, (), fault, 0.5, expect[label])
              for k, fault, label in each_fault(NPZ_FILE_FAULTS)]
    return as_examples(cases)


@contract_test("npz", NPZ_EXAMPLES, npz_examples(), case=npz_files())
def test_any_npz_file_keeps_the_contract(ray_session, tmp_path, capsys, case):
    with workspace(tmp_path) as ws:
        path, flags = build_npz(case, ws)
        out = os.path.join(ws, "out")
        argv = ["train", "--dataset", f"npz:{path}", *flags, "--workers", "1", "--out", out]
        check_contract("npz", argv, ws, capsys, case.expect, new_out=out)


# ---------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST's format)

IDX_FAULTS = {
    INVALID: ["magic", "type-unsupported", "images-int8", "labels-float", "ndim-0", "images-2d", "dims-27",
              "header-truncated", "payload-truncated", "trailing-bytes", "dims-huge", "labels-10", "count-mismatch",
              "zero-examples", "gzip-truncated", "gzip-garbage", "missing", "directory", "garbage", "too-short"],
    # constant images (standard deviation 0) are data, only uninformative: centred, not divided by 0
    VALID: ["labels-int16", "all-zero-test-images", "all-zero-images", "constant-images"],
}
CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D, "float64": 0x0E}


@dataclass
class IdxFiles:
    n_train: int
    n_test: int
    seed: int
    gzipped: tuple[bool, bool, bool, bool]
    target: int  # which of FASHION_MNIST_FILES the fault hits
    fault: str | None
    where: float
    layers: str
    expect: int | None


@st.composite
def idx_files(draw) -> IdxFiles:
    good = draw(st.integers(0, 19)) == 7  # each valid example trains (seconds): few
    fault, label = (None, VALID) if good else draw(flat({INVALID: IDX_FAULTS[INVALID]}))
    return IdxFiles(draw(st.integers(16, 48)), draw(st.integers(4, 12)), draw(st.integers(0, 2**16)),
                    tuple(draw(st.lists(st.booleans(), min_size=4, max_size=4))), draw(st.integers(0, 3)),
                    fault, draw(st.floats(0.0, 1.0)), draw(st.sampled_from(["784,8,10", "784,10"])),
                    verdict([label]))


def idx_bytes(array: np.ndarray, code: int | None = None, dims: tuple | None = None) -> bytes:
    dims = array.shape if dims is None else dims
    code = CODES[array.dtype.name] if code is None else code
    header = bytes([0, 0, code, len(dims)]) + b"".join(int(v).to_bytes(4, "big") for v in dims)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def build_idx(case: IdxFiles, ws: str) -> str:
    rng = np.random.default_rng(case.seed)
    folder = os.path.join(ws, "fashion")
    os.makedirs(folder)
    arrays = [rng.integers(0, 256, (case.n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, case.n_train,
                                                                                          dtype=np.uint8),
              rng.integers(0, 256, (case.n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, case.n_test,
                                                                                         dtype=np.uint8)]
    fault, t = case.fault, case.target
    images = t if t in (0, 2) else t - 1  # the image file of the target's split
    if fault in ("images-int8", "dims-27", "images-2d", "all-zero-images", "constant-images"):
        t = 0 if fault in ("all-zero-images", "constant-images") else images
    elif fault in ("labels-int16", "labels-float", "labels-10"):
        t = images + 1
    elif fault == "all-zero-test-images":
        t = 2
    if fault == "count-mismatch":
        arrays[images + 1] = arrays[images + 1][:-1]
    elif fault == "zero-examples":
        arrays[0], arrays[1] = arrays[0][:0], arrays[1][:0]
    elif fault == "labels-10":
        arrays[t][0] = 10
    elif fault in ("all-zero-images", "all-zero-test-images"):
        arrays[t][:] = 0
    elif fault == "constant-images":
        arrays[t][:] = 255
    blobs = [idx_bytes(a) for a in arrays]
    a, data = arrays[t], blobs[t]
    at = int(case.where * len(data))
    if fault == "magic":
        data = b"\x01\x08" + data[2:]
    elif fault == "type-unsupported":
        data = data[:2] + b"\x07" + data[3:]
    elif fault == "images-int8":
        data = idx_bytes(a.astype(np.int8))
    elif fault == "labels-int16":
        data = idx_bytes(a.astype(np.int16))
    elif fault == "labels-float":
        data = idx_bytes(a.astype(np.float32))
    elif fault == "ndim-0":
        data = data[:3] + b"\x00"
    elif fault == "images-2d":
        data = idx_bytes(a.reshape(len(a), 784))
    elif fault == "dims-27":
        data = idx_bytes(a[:, :27, :].copy())
    elif fault == "header-truncated":
        data = data[:4 + 4 * a.ndim - 2]
    elif fault == "payload-truncated":
        data = data[:max(4 + 4 * a.ndim, min(at, len(data) - 1))]
    elif fault == "trailing-bytes":
        data = data + b"\x00" * 7
    elif fault == "dims-huge":
        data = idx_bytes(a, dims=(2**32 - 1,) + a.shape[1:])
    elif fault == "garbage":
        data = bytes(range(256)) * 3
    elif fault == "too-short":
        data = b"\x00\x00"
    blobs[t] = data
    for k, (name, blob) in enumerate(zip(FASHION_MNIST_FILES, blobs)):
        path = os.path.join(folder, name)
        if case.gzipped[k] or (k == t and fault in ("gzip-truncated", "gzip-garbage")):
            blob, path = gzip.compress(blob, mtime=0), path + ".gz"
            if k == t and fault == "gzip-truncated":
                blob = blob[:max(2, int(case.where * (len(blob) - 1)))]
            elif k == t and fault == "gzip-garbage":
                blob = b"\x1f\x8b" + bytes(range(200))
        if k == t and fault == "missing":
            continue
        if k == t and fault == "directory":
            os.makedirs(path)
            continue
        with open(path, "wb") as fh:
            fh.write(blob)
    return folder


def idx_examples() -> list[dict]:
    """The four files as they should be (two gzipped), then each fault, on one file each."""
    expect = {VALID: 0, INVALID: 2}
    cases = [IdxFiles(20, 6, 1, (False, True, False, True), 0, None, 0.5, "784,8,10", 0)]
    cases += [IdxFiles(20, 6, k, (False,) * 4, k % 4, fault, 0.5, "784,8,10", expect[label])
              for k, fault, label in each_fault(IDX_FAULTS)]
    return as_examples(cases)


@contract_test("idx", IDX_EXAMPLES, idx_examples(), case=idx_files())
def test_any_idx_files_keep_the_contract(ray_session, tmp_path, capsys, case):
    with workspace(tmp_path) as ws:
        folder = build_idx(case, ws)
        out = os.path.join(ws, "out")
        argv = ["train", "--dataset", "fashion-mnist", "--data-dir", folder, "--layers", case.layers,
                "--batch-size", "16", "--micro-batch", "8", "--steps", "2", "--workers", "1", "--out", out]
        check_contract("idx", argv, ws, capsys, case.expect, new_out=out)


# ---------------------------------------------------------------------------------------------
# Checkpoints and metrics files, given to --resume

BASE_RUN = dict(dataset="spirals", layers="2,8,3", batch_size=32, micro_batch=8, steps=2, workers=1,
                optimizer="adam")


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory) -> str:
    """A real two-step Adam run (its checkpoint has weights, m, v, step, format, config_json)."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    train(Config(**BASE_RUN, out=out))
    return out


CHECKPOINT_FAULTS = {
    INVALID: ["weights-nan", "weights-inf", "weights-2d", "weights-short", "weights-float32", "weights-int64",
              "weights-complex", "weights-str", "weights-0d", "opt-nan", "opt-short", "opt-missing", "opt-extra",
              "step-shape-2", "step--1", "step-0", "step-huge", "config-5", "config-list", "config-null",
              "config-not-json", "config-unknown-key", "config-seed--1", "config-workers-str", "config-layers",
              "config-2d", "missing-weights", "missing-step", "missing-config", "header-1e13", "truncated", "empty",
              "npy-renamed", "garbage", "directory", "zip-of-text"],
    EITHER: ["step-1.5", "step-str", "format-2", "missing-format", "extra-array", "flip-byte", "step-1"],
    VALID: [None, "rewritten"],
}


@dataclass
class Resume:
    fault: str | None
    how: str  # "more-steps": --steps 3; "rebuild": summary.json removed, no --steps; "again": neither
    where: float
    expect: int | None


@st.composite
def damaged_checkpoints(draw) -> Resume:
    good = draw(st.integers(0, 9)) == 3
    fault, label = (draw(st.sampled_from(CHECKPOINT_FAULTS[VALID])), VALID) if good else draw(flat(CHECKPOINT_FAULTS))
    how = draw(st.sampled_from(["rebuild", "more-steps", "again"]))
    if fault == "step-1":  # step 1 has a step left to do
        how = "more-steps"
    if how == "again" and label == VALID:  # a finished run asked for nothing more
        label = INVALID
    return Resume(fault, how, draw(st.floats(0.0, 1.0)), verdict([label]))


def damage_checkpoint(path: str, fault: str | None, where: float) -> None:
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    w = arrays["weights"]
    config = json.loads(str(arrays["config_json"]))
    edits = {
        "weights-nan": lambda: arrays.__setitem__("weights", np.where(np.arange(w.size) == w.size // 2, np.nan, w)),
        "weights-inf": lambda: arrays.__setitem__("weights", np.where(np.arange(w.size) == 0, np.inf, w)),
        "weights-2d": lambda: arrays.__setitem__("weights", w.reshape(1, -1)),
        "weights-short": lambda: arrays.__setitem__("weights", w[:-1]),
        "weights-float32": lambda: arrays.__setitem__("weights", w.astype(np.float32)),
        "weights-int64": lambda: arrays.__setitem__("weights", w.astype(np.int64)),
        "weights-complex": lambda: arrays.__setitem__("weights", w.astype(np.complex128)),
        "weights-str": lambda: arrays.__setitem__("weights", w.astype(str)),
        "weights-0d": lambda: arrays.__setitem__("weights", np.float64(1.0)),
        "opt-nan": lambda: arrays.__setitem__("opt_m", np.full_like(arrays["opt_m"], np.nan)),
        "opt-short": lambda: arrays.__setitem__("opt_v", arrays["opt_v"][:3]),
        "opt-missing": lambda: arrays.pop("opt_v"),
        "opt-extra": lambda: arrays.__setitem__("opt_velocity", np.zeros_like(w)),
        "step-shape-2": lambda: arrays.__setitem__("step", np.array([2, 2])),
        "step--1": lambda: arrays.__setitem__("step", np.int64(-1)),
        "step-0": lambda: arrays.__setitem__("step", np.int64(0)),
        "step-1": lambda: arrays.__setitem__("step", np.int64(1)),
        "step-huge": lambda: arrays.__setitem__("step", np.int64(10**12)),
        "step-1.5": lambda: arrays.__setitem__("step", np.float64(1.5)),
        "step-str": lambda: arrays.__setitem__("step", np.array("2")),
        "config-5": lambda: arrays.__setitem__("config_json", np.array("5")),
        "config-list": lambda: arrays.__setitem__("config_json", np.array("[1, 2]")),
        "config-null": lambda: arrays.__setitem__("config_json", np.array("null")),
        "config-not-json": lambda: arrays.__setitem__("config_json", np.array("{'steps': 2")),
        "config-unknown-key": lambda: arrays.__setitem__("config_json", np.array(json.dumps({**config, "bogus": 1}))),
        "config-seed--1": lambda: arrays.__setitem__("config_json", np.array(json.dumps({**config, "seed": -1}))),
        "config-workers-str": lambda: arrays.__setitem__("config_json",
                                                         np.array(json.dumps({**config, "workers": "x"}))),
        "config-layers": lambda: arrays.__setitem__("config_json",
                                                    np.array(json.dumps({**config, "layers": "2,9,3"}))),
        "config-2d": lambda: arrays.__setitem__("config_json", np.array([[json.dumps(config)]])),
        "format-2": lambda: arrays.__setitem__("format", np.int64(2)),
        "missing-format": lambda: arrays.pop("format"),
        "missing-weights": lambda: arrays.pop("weights"),
        "missing-step": lambda: arrays.pop("step"),
        "missing-config": lambda: arrays.pop("config_json"),
        "extra-array": lambda: arrays.__setitem__("notes", np.zeros(2)),
        "rewritten": lambda: None,
    }
    if fault in edits:
        edits[fault]()
        np.savez(path, **arrays)
    elif fault == "header-1e13":
        write_zip(path, {f"{k}.npy": claims_1e13_items() if k == "weights" else npy_bytes(v)
                         for k, v in arrays.items()})
    else:
        file_fault(path, fault, where, arrays)


def checkpoint_examples() -> list[dict]:
    """The checkpoint as written (continued, and its summary rebuilt), a finished run asked for
    nothing more, then each damage, alternately continued and rebuilt."""
    cases = [Resume(None, "more-steps", 0.5, 0), Resume(None, "rebuild", 0.5, 0), Resume(None, "again", 0.5, 2),
             Resume("rewritten", "rebuild", 0.5, 0)]
    cases += [Resume(fault, "more-steps" if k % 2 or fault in ("step-1", "step-huge") else "rebuild", 0.5, 2)
              for k, fault in enumerate(CHECKPOINT_FAULTS[INVALID])]
    cases += [Resume(fault, "more-steps" if fault == "step-1" else "rebuild", 0.5, None)
              for fault in CHECKPOINT_FAULTS[EITHER]]
    return as_examples(cases)


@contract_test("checkpoint", CHECKPOINT_EXAMPLES, checkpoint_examples(), case=damaged_checkpoints())
def test_any_checkpoint_given_to_resume_keeps_the_contract(finished_run, tmp_path, capsys, case):
    with workspace(tmp_path) as ws:
        argv = resume_argv(finished_run, ws, case.how,
                           lambda run: damage_checkpoint(os.path.join(run, "checkpoint.npz"), case.fault, case.where))
        check_contract("checkpoint", argv, ws, capsys, case.expect)


def resume_argv(finished_run: str, ws: str, how: str, damage) -> list[str]:
    """A copy of the finished run in ``ws``, ``damage(run_dir)`` done to it, and the argv that
    resumes it ``how``: "more-steps" (--steps 3), "rebuild" (summary.json removed) or "again"."""
    run = os.path.join(ws, "run")
    shutil.copytree(finished_run, run)
    damage(run)
    argv = ["train", "--resume", run]
    if how == "more-steps":
        argv += ["--steps", "3"]
    elif how == "rebuild":
        os.unlink(os.path.join(run, "summary.json"))
    return argv


METRICS_FAULTS = {
    INVALID: ["garbage-line", "non-utf8", "time-str", "time-nan", "time-inf", "step-0", "step-str", "step-float",
              "no-step", "loss-str", "directory", "array-line", "null-line"],
    EITHER: ["empty", "missing", "extra-steps", "time-negative"],
    VALID: [None, "cut-last-line", "blank-lines"],
}


@dataclass
class DamagedMetrics:
    fault: str | None
    line: int  # which line the fault hits
    rebuild: bool  # summary.json removed and no --steps: the summary is rebuilt from the files
    expect: int | None


@st.composite
def damaged_metrics(draw) -> DamagedMetrics:
    good = draw(st.integers(0, 9)) == 3
    fault, label = (draw(st.sampled_from(METRICS_FAULTS[VALID])), VALID) if good else draw(flat(METRICS_FAULTS))
    return DamagedMetrics(fault, draw(st.integers(0, 1)), draw(st.booleans()), verdict([label]))


def damage_metrics(path: str, case: DamagedMetrics) -> None:
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")[:-1]
    k = case.line % len(lines)
    record = json.loads(lines[k])
    edits = {"time-str": ("time", "x"), "time-nan": ("time", NAN), "time-inf": ("time", INF),
             "step-0": ("step", 0), "step-str": ("step", "1"), "step-float": ("step", 1.5),
             "loss-str": ("loss", "low"), "time-negative": ("time", -5.0)}
    fault = case.fault
    if fault in edits:
        key, value = edits[fault]
        lines[k] = json.dumps({**record, key: value}).encode()
    elif fault == "no-step":
        lines[k] = json.dumps({k2: v for k2, v in record.items() if k2 != "step"}).encode()
    elif fault == "garbage-line":
        lines.insert(k, b"{not json")
    elif fault == "non-utf8":
        lines[k] = lines[k][:10] + b"\xff\xfe" + lines[k][10:]
    elif fault == "array-line":
        lines.insert(k, b"[1, 2]")
    elif fault == "null-line":
        lines.insert(k, b"null")
    elif fault == "extra-steps":
        lines += [json.dumps({**record, "step": s}).encode() for s in (3, 4)]
    elif fault == "blank-lines":
        lines = [b""] + [x for line in lines for x in (line, b"   ")]
    data = b"\n".join(lines) + b"\n"
    if fault == "cut-last-line":
        data = data + data.split(b"\n")[-2][: len(data.split(b"\n")[-2]) // 2]
    if fault in ("directory", "missing"):
        os.unlink(path)
        if fault == "directory":
            os.makedirs(path)
        return
    with open(path, "wb") as fh:
        fh.write(b"" if fault == "empty" else data)


def metrics_examples() -> list[dict]:
    """The log as written (continued), then each damage, on either line, continued or rebuilt."""
    expect = {VALID: 0, INVALID: 2, EITHER: None}
    cases = [DamagedMetrics(None, 0, False, 0)]
    cases += [DamagedMetrics(fault, k % 2, k % 3 != 0, expect[label])
              for k, fault, label in each_fault({lb: [f for f in fs if f] for lb, fs in METRICS_FAULTS.items()})]
    return as_examples(cases)


@contract_test("metrics", METRICS_EXAMPLES, metrics_examples(), case=damaged_metrics())
def test_any_metrics_file_given_to_resume_keeps_the_contract(finished_run, tmp_path, capsys, case):
    with workspace(tmp_path) as ws:
        argv = resume_argv(finished_run, ws, "rebuild" if case.rebuild else "more-steps",
                           lambda run: damage_metrics(os.path.join(run, "metrics.jsonl"), case))
        check_contract("metrics", argv, ws, capsys, case.expect, one_run=case.fault in METRICS_FAULTS[VALID])
