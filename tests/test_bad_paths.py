"""Every path argument of every ``distbp`` command, handed something it cannot use, keeps the
bad-input contract: one line ``distbp: error: ...`` naming the path, status 2, no traceback,
nothing created or changed (every entry under the test's directory, FIFOs and links included,
is the same before and after), and no hang (a FIFO opened for reading would wait for ever,
/dev/zero never ends).

The commands and their paths: ``train --config``, ``--dataset npz:/csv:/npy:``, ``--data-dir``,
``--init-from``, ``--resume``, ``--out``; ``convert SRC`` (npz, csv, parquet, fashion-mnist
``--data-dir``) and ``DIR``; ``plot RUN_DIR`` and ``--out``; ``timeline RUN_DIR`` and the
``RUN_DIR/timeline.json`` it writes.  ``verify`` takes no path.  Each runs in this process
(``run_cli``); none reaches Ray (a train that would is a failure here, not a slow test).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import tempfile
from contextlib import contextmanager

import numpy as np
import pytest

from distbp.data.idx import FASHION_MNIST_FILES
from distbp.loops import sync
from tests.test_properties import run_cli

GARBAGE = bytes(range(256)) * 8  # not UTF-8, not a zip, not an IDX, .npy, Parquet or TOML file
INSIDE = {"garbage-in": "garbage", "fifo-in": "fifo", "devzero-in": "link-to-devzero"}


# ---- what a path can be --------------------------------------------------------------------------

def make(kind: str, path: str, inner: tuple[str, ...] = ()) -> str:
    """``path`` made into ``kind``, returning the path to give; ``*-in`` kinds are a directory
    whose files ``inner`` are garbage, FIFOs or links to /dev/zero."""
    if kind == "missing":
        return path
    if kind == "devzero":
        return "/dev/zero"
    if kind == "under-a-file":  # a path through a file, as in a-file/deeper.png
        make("garbage", path)
        return os.path.join(path, "deeper.png")
    if kind == "directory" or kind in INSIDE:
        os.mkdir(path)
        for name in inner if kind in INSIDE else ():
            make(INSIDE[kind], os.path.join(path, name))
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "garbage":
        with open(path, "wb") as fh:
            fh.write(GARBAGE)
    elif kind == "link-to-devzero":
        os.symlink("/dev/zero", path)
    elif kind == "dangling-link":
        os.symlink(path + ".nowhere", path)
    else:
        raise AssertionError(kind)
    return path


FILE_KINDS = ["missing", "directory", "fifo", "devzero", "empty", "garbage"]
DIR_KINDS = ["missing", "fifo", "devzero", "empty", "directory", "garbage-in", "fifo-in", "devzero-in"]

# argument -> (argv for the bad path p in workspace ws, the kinds it gets, what a directory holds)
ARGUMENTS = {
    "train --config": (lambda p, ws: ["train", "--config", p, "--out", f"{ws}/new"],
                       [k for k in FILE_KINDS if k != "empty"] + ["link-to-devzero"], None),
    "train --dataset npz:": (lambda p, ws: ["train", "--dataset", f"npz:{p}", "--out", f"{ws}/new"],
                             FILE_KINDS + ["link-to-devzero"], None),
    "train --dataset csv:": (lambda p, ws: ["train", "--dataset", f"csv:{p}", "--out", f"{ws}/new"],
                             FILE_KINDS + ["link-to-devzero"], None),
    "train --dataset npy:": (lambda p, ws: ["train", "--dataset", f"npy:{p}", "--out", f"{ws}/new"],
                             DIR_KINDS, ("X.npy", "y.npy")),
    "train --data-dir": (lambda p, ws: ["train", "--dataset", "fashion-mnist", "--data-dir", p, "--out", f"{ws}/new"],
                         DIR_KINDS, FASHION_MNIST_FILES),
    "train --init-from": (lambda p, ws: ["train", "--init-from", p, "--out", f"{ws}/new"],
                          FILE_KINDS + ["fifo-in", "garbage-in"], ("checkpoint.npz",)),
    "train --resume": (lambda p, ws: ["train", "--resume", p], DIR_KINDS, ("checkpoint.npz",)),
    "train --out": (lambda p, ws: ["train", "--out", p],
                    ["fifo", "devzero", "empty", "garbage", "garbage-in", "under-a-file", "dangling-link"],
                    ("results",)),
    "convert SRC npz:": (lambda p, ws: ["convert", f"npz:{p}", f"{ws}/new"], FILE_KINDS + ["link-to-devzero"], None),
    "convert SRC csv:": (lambda p, ws: ["convert", f"csv:{p}", f"{ws}/new"], FILE_KINDS + ["link-to-devzero"], None),
    "convert SRC parquet:": (lambda p, ws: ["convert", f"parquet:{p}", f"{ws}/new"],
                             FILE_KINDS + ["link-to-devzero"], None),
    "convert --data-dir": (lambda p, ws: ["convert", "fashion-mnist", "--data-dir", p, f"{ws}/new"],
                           DIR_KINDS, FASHION_MNIST_FILES),
    "convert DIR": (lambda p, ws: ["convert", f"npz:{ws}/ok.npz", p],
                    ["fifo", "devzero", "empty", "garbage", "garbage-in", "under-a-file", "dangling-link"], ("data",)),
    "plot RUN_DIR": (lambda p, ws: ["plot", p, "--out", f"{ws}/new.png"], DIR_KINDS, ("metrics.jsonl",)),
    "plot --out": (lambda p, ws: ["plot", f"{ws}/ok-run", "--out", p],
                   ["directory", "fifo", "dangling-link", "under-a-file", "devzero"], None),
    "timeline RUN_DIR": (lambda p, ws: ["timeline", p], DIR_KINDS, ("timeline.jsonl",)),
}


def path_cases() -> list:
    return [pytest.param(argument, kind, id=f"{argument}-{kind}".replace(" ", "_"))
            for argument, (_, kinds, _) in ARGUMENTS.items() for kind in kinds]


# ---- the contract --------------------------------------------------------------------------------

def snapshot(root: str) -> dict[str, str]:
    """Every entry under ``root`` by its type: a file's sha256, a link's target, a FIFO, a directory."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb") as fh:
                    state[path] = hashlib.sha256(fh.read()).hexdigest()
            else:
                state[path] = os.readlink(path) if stat.S_ISLNK(mode) else stat.S_IFMT(mode)
    return state


class Hangs(BaseException):
    """No answer in time: not an OSError (TimeoutError is one), so no ``except OSError`` turns it
    into a tidy error line."""


@contextmanager
def deadline(seconds: int):
    """A hang (a FIFO opened for reading, /dev/zero read to the end) fails the test instead."""
    def stop(signum, frame):
        raise Hangs(f"no answer in {seconds} s: distbp hangs on this input")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """The working directory of one case (a default output would land in it), with a valid npz
    and a valid run directory for the arguments beside the one under test; Ray is off limits."""
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "ok.npz", X=np.ones((4, 2)), y=np.array([0, 1, 0, 1]))
    os.mkdir(tmp_path / "ok-run")
    with open(tmp_path / "ok-run" / "metrics.jsonl", "w") as fh:
        fh.write('{"step": 1, "epoch": 1, "loss": 0.5, "time": 0.1}\n')

    def no_ray(*args, **kwargs):
        raise AssertionError("the bad input passed and the run reached Ray")

    monkeypatch.setattr(sync, "_run", no_ray)
    return str(tmp_path)


def fails(argv: list[str], ws: str, capsys, names: str | None = None) -> str:
    """Run ``argv``: one line, status 2, ``names`` in the line, nothing under ``ws`` changed."""
    before = snapshot(ws)
    with deadline(30):
        code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("distbp: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    if names is not None:
        assert names in err, err
    assert snapshot(ws) == before, "the failed command created or changed something"
    return err


@pytest.mark.parametrize("argument, kind", path_cases())
def test_a_path_it_cannot_use_is_one_line_and_changes_nothing(argument, kind, ws, capsys):
    argv, _, inner = ARGUMENTS[argument]
    path = make(kind, os.path.join(ws, "bad.png" if argument == "plot --out" else "bad"), inner or ())
    # The line names the path, or (a file inside a directory) the directory's name at least.
    fails(argv(path, ws), ws, capsys, names="/dev/zero" if kind == "devzero" else "bad")


# ---- outputs that cannot be written --------------------------------------------------------------

TIMELINE = [{"lane": "worker", "id": 0, "step": 1, "start": 10.0, "end": 11.0, "cpu": 1.0},
            {"lane": "server", "id": 0, "step": 1, "start": 12.0, "end": 13.0, "sum": 0.5, "update": 0.25, "cpu": 1},
            {"lane": "driver", "id": 0, "step": 1, "name": "workers", "start": 10.0, "end": 13.0}]


def timeline_run(ws: str, records: list | str = TIMELINE) -> str:
    run = os.path.join(ws, "run")
    os.mkdir(run)
    with open(os.path.join(run, "timeline.jsonl"), "w") as fh:
        fh.write(records if isinstance(records, str) else "".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.fixture
def unwritable(monkeypatch):
    """``unwritable(folder)``: no new file can be made in it (mode 0555; as root, whom modes do
    not stop, the temporary file that every result is written through is refused there)."""
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) in made:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    made: list[str] = []
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    yield lambda folder: (made.append(os.path.abspath(folder)), os.chmod(folder, 0o555))
    for folder in made:
        os.chmod(folder, 0o755)


@pytest.mark.parametrize("kind", ["directory", "fifo", "dangling-link", "unwritable"])
def test_a_timeline_it_cannot_write_is_one_line(kind, ws, capsys, unwritable):
    run = timeline_run(ws)
    out = os.path.join(run, "timeline.json")
    if kind == "unwritable":
        unwritable(run)
    else:
        make(kind, out)
    fails(["timeline", run], ws, capsys, names=out if kind != "unwritable" else run)


@pytest.mark.parametrize("kind", ["unwritable", "empty-name", "not-png"])
def test_a_plot_it_cannot_write_is_one_line(kind, ws, capsys, unwritable):
    out = {"unwritable": os.path.join(ws, "ro", "curves.png"), "empty-name": "", "not-png": f"{ws}/c.svg"}[kind]
    if kind == "unwritable":
        os.mkdir(os.path.join(ws, "ro"))
        unwritable(os.path.join(ws, "ro"))
    pytest.importorskip("matplotlib", reason="pip install -e '.[plot]'")
    fails(["plot", f"{ws}/ok-run", "--out", out], ws, capsys, names="--out")


def test_an_existing_timeline_json_is_replaced(ws, capsys):
    """What ``distbp timeline`` wrote before is its own output: a second run replaces it."""
    run = timeline_run(ws)
    with open(os.path.join(run, "timeline.json"), "w") as fh:
        fh.write("old")
    assert run_cli(["timeline", run], capsys)[0] == 0
    with open(os.path.join(run, "timeline.json")) as fh:
        assert json.load(fh)["traceEvents"]


# ---- numbers no float holds, and other damage inside the files -----------------------------------

BIG = "1" + "0" * 400  # 10**400: JSON and TOML read it as an int no float holds


def damaged(record: int, field: str, value: str) -> str:
    """TIMELINE as text with ``field`` of record ``record`` replaced by the JSON text ``value``."""
    lines = [json.dumps(r) for r in TIMELINE]
    entry = dict(TIMELINE[record])
    if value == "<missing>":
        del entry[field]
        lines[record] = json.dumps(entry)
    else:
        entry[field] = "@@"
        lines[record] = json.dumps(entry).replace('"@@"', value)
    return "\n".join(lines) + "\n"


# name -> (record, field, the JSON text put there); "<missing>" removes the field
FIELD_DAMAGE = {
    "end 1e400": (0, "end", "1e400"), "end 10**400": (0, "end", BIG), "start NaN": (0, "start", "NaN"),
    "start -1e300": (0, "start", "-1e300"), "start 1e308": (0, "start", "1e308"), "start true": (0, "start", "true"),
    "end Infinity": (1, "end", "Infinity"), "ends before it starts": (0, "end", "5.0"),
    "sum 10**400": (1, "sum", BIG), "sum text": (1, "sum", '"x"'), "no sum": (1, "sum", "<missing>"),
    "no cpu": (0, "cpu", "<missing>"), "id list": (0, "id", "[1]"), "id 10**400": (0, "id", BIG),
    "id -1": (0, "id", "-1"),
    "step text": (1, "step", '"a"'), "step true": (1, "step", "true"), "step -1": (2, "step", "-1"),
    "server step null": (1, "step", "null"), "step of 5000 digits": (0, "step", "9" * 5000),
    "name 5": (2, "name", "5"), "unknown lane": (0, "lane", '"gpu"'),
}
TIMELINE_DAMAGE = {name: damaged(*where) for name, where in FIELD_DAMAGE.items()} | {
    "a list": "[1, 2]\n" + damaged(0, "cpu", "1"),
    "nested 100000 deep": "[" * 100000 + "]" * 100000 + "\n" + damaged(0, "cpu", "1"),
}


@pytest.mark.parametrize("damage", TIMELINE_DAMAGE)
def test_a_damaged_timeline_is_one_line_and_writes_nothing(damage, ws, capsys):
    run = timeline_run(ws, TIMELINE_DAMAGE[damage])
    fails(["timeline", run], ws, capsys, names="timeline.jsonl: not a timeline")


METRICS = '{"step": 1, "epoch": 1, "loss": 0.5, "time": 0.1}\n{"step": 2, "epoch": 2, "loss": 0.4, "time": 0.2}\n'
PLOT_DAMAGE = {
    "step 10**400": METRICS.replace('"step": 2', f'"step": {BIG}'),
    "step 2**70": METRICS.replace('"step": 2', f'"step": {2 ** 70}'),
    "epoch text": METRICS.replace('"epoch": 2', '"epoch": "two"'),
    "loss a list": METRICS.replace('"loss": 0.4', '"loss": [0.4]') + METRICS.replace('"step": 1', '"step": 3'),
    "accuracy text": METRICS + '{"step": 2, "epoch": 2, "test_loss": 0.4, "test_accuracy": "x"}\n',
    "nested 100000 deep": "[" * 100000 + "]" * 100000 + "\n" + METRICS,
}


@pytest.mark.parametrize("damage", PLOT_DAMAGE)
def test_damaged_metrics_are_one_line_for_plot(damage, ws, capsys):
    run = os.path.join(ws, "run")
    os.mkdir(run)
    with open(os.path.join(run, "metrics.jsonl"), "w") as fh:
        fh.write(PLOT_DAMAGE[damage])
    fails(["plot", run, "--out", f"{ws}/new.png"], ws, capsys, names="metrics.jsonl")


@pytest.mark.parametrize("summary", ["fifo", "link-to-devzero", "directory", f'{{"steps": {BIG}, "epochs": 1}}',
                                     '{"steps": 1e400, "epochs": 1}', '{"steps": 5, "epochs": 1e-320}',
                                     "[" * 100000 + "]" * 100000],
                         ids=["fifo", "devzero", "directory", "10**400", "1e400", "epochs-tiny", "nested"])
def test_plot_reads_past_a_summary_it_cannot_use(summary, ws, capsys):
    """summary.json only tells plot the steps per epoch: one it cannot use (it would block, never
    end, overflow) is passed over, and the curves come from metrics.jsonl alone."""
    pytest.importorskip("matplotlib", reason="pip install -e '.[plot]'")
    run = os.path.join(ws, "run")
    os.mkdir(run)
    with open(os.path.join(run, "metrics.jsonl"), "w") as fh:
        fh.write(METRICS)
    path = os.path.join(run, "summary.json")
    if summary in ("fifo", "link-to-devzero", "directory"):
        make(summary, path)
    else:
        with open(path, "w") as fh:
            fh.write(summary)
    with deadline(60):
        code, out, err = run_cli(["plot", run, "--out", f"{ws}/c.png"], capsys)
    assert code == 0 and out.strip() == f"{ws}/c.png", err
    assert os.path.isfile(f"{ws}/c.png")


TOML_DAMAGE = {
    "int 10**400": f"steps = {BIG}\n", "int 2**63": f"steps = {2 ** 63}\n",
    "float option given 10**400": f"lr = {BIG}\n",
    "epochs 10**400": f"epochs = {BIG}\n", "int of 5000 digits": "steps = " + "9" * 5000 + "\n",
    "list holding 10**400": f"layers = [2, {BIG}, 3]\n", "float 1e400 for an int": "steps = 1e400\n",
    "nested 5000 deep": "layers = " + "[" * 5000 + "]" * 5000 + "\n", "larger than 1 MiB": "#" * (2 << 20) + "\n",
}


@pytest.mark.parametrize("damage", TOML_DAMAGE)
def test_a_damaged_config_is_one_line(damage, ws, capsys):
    path = os.path.join(ws, "bad.toml")
    with open(path, "w") as fh:
        fh.write(TOML_DAMAGE[damage])
    fails(["train", "--config", path, "--out", f"{ws}/new"], ws, capsys, names=f"--config {path}: ")
