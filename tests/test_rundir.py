"""The run directory is one run's: locked while a run holds it, its checkpoint and metrics
checked before a resume trusts them, and nothing in it changed by a run that is refused.

Most cases run ``distbp.cli.main`` or ``RunFiles`` in this process (they fail before Ray is
needed); one starts a real ``distbp train`` and tries to take its directory while it runs,
one resumes in-process (shared Ray) after a crashed run's leftovers.
"""

import gc
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
from conftest import train_config

from distbp import cli
from distbp.config import Config
from distbp.data import datasets
from distbp.data.problem import prepare
from distbp.errors import DataError, UsageError
from distbp.lecture.network import Layout
from distbp.run import checkpoint, resume
from distbp.run.outdir import LOCK, RunFiles, holder

SMALL = ["--dataset", "spirals", "--layers", "2,16,16,3", "--batch-size", "60", "--micro-batch", "8"]
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def fails(capsys, argv, fragment) -> str:
    """Run the CLI; it must exit 2 with exactly one line naming the problem, and no traceback."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("distbp: error: "), err
    assert fragment in err, err
    return err


def tree(directory) -> dict:
    """Every entry of ``directory`` (hidden ones too) with the sha256 of its bytes: 'dir' for a directory."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        out[name] = "dir" if os.path.isdir(path) else hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def config_of(run, **overrides) -> Config:
    values = dict(dataset="spirals", layers="2,16,16,3", workers=2, batch_size=60, micro_batch=8, steps=2,
                  optimizer="adam", out=str(run))
    values.update(overrides)
    return Config(**values)


def saved_run(tmp_path, arrays=None, config=None, fingerprint=None) -> str:
    """A run directory as training leaves it, written by hand (no training needed); ``arrays``
    replace or add arrays of the checkpoint as np.savez writes them (None: remove one)."""
    run = tmp_path / "saved"
    run.mkdir()
    config = config or config_of(run)
    size = Layout(config.layer_sizes()).size
    content = {"weights": np.zeros(size), "step": np.int64(2), "format": np.int64(1),
               "config_json": np.array(json.dumps(config.to_dict())), "opt_m": np.zeros(size), "opt_v": np.zeros(size)}
    if fingerprint:
        content["data_fingerprint"] = np.array(fingerprint)
    for name, value in (arrays or {}).items():
        if value is None:
            del content[name]
        else:
            content[name] = value
    np.savez(str(run / "checkpoint.npz"), **content)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "time": 0.1}\n{"step": 2, "loss": 0.9, "time": 0.2}\n')
    (run / "summary.json").write_text('{"steps": 2}\n')
    return str(run)


def refused_resume(capsys, run, fragment) -> None:
    """--resume of ``run`` exits 2 with one line containing ``fragment`` and changes nothing in it."""
    before = tree(run)
    fails(capsys, ["train", "--resume", run, "--steps", "4"], fragment)
    assert tree(run) == before


# -- the lock ------------------------------------------------------------------------------------

def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path):
    out = str(tmp_path / "run")
    first = RunFiles.create(out)
    who = f"is in use by distbp pid {os.getpid()} on {socket.gethostname()} since "
    with pytest.raises(UsageError, match=f"--out {out} {who}"):
        RunFiles.create(out)  # flock locks are per open file: one process conflicts with itself
    with pytest.raises(UsageError, match=f"--resume {out} {who}"):
        RunFiles.reopen(out, 2)
    assert holder(out).startswith(f"distbp pid {os.getpid()} on ")
    assert os.listdir(out) == [LOCK]  # the refusals left nothing
    first.close()
    first.close()  # again: nothing more happens
    assert not os.path.exists(out)  # it never began: the directory it made is gone
    RunFiles.create(out).close()


def test_of_concurrent_creates_exactly_one_wins(tmp_path):
    out = str(tmp_path / "run")
    start, results = threading.Barrier(8), []

    def create():
        start.wait()
        try:
            results.append(RunFiles.create(out))
        except UsageError as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if isinstance(r, RunFiles)]
    assert len(won) == 1, results
    assert all(f"--out {out} is in use by " in str(r) for r in results if r not in won)
    won[0].close()


def test_a_finished_run_leaves_no_lock_file(tmp_path):
    out = str(tmp_path / "run")
    files = RunFiles.create(out)
    files.open_log()
    files.log.write({"step": 1, "loss": 1.0, "time": 0.1})
    files.close()
    assert os.listdir(out) == ["metrics.jsonl"]
    assert holder(out) is None and os.listdir(out) == ["metrics.jsonl"]  # looking creates nothing


def test_a_run_files_dropped_without_close_lets_the_lock_go(tmp_path):
    out = str(tmp_path / "run")
    files = RunFiles.create(out)
    del files
    gc.collect()
    assert holder(out) is None
    RunFiles.create(out).close()


def stale_lock(directory) -> int:
    """Take ``directory``'s lock in another process and SIGKILL it there: its lock file stays.
    Returns the dead holder's pid."""
    code = ("import sys, time; from distbp.run.outdir import RunFiles; "
            "held = RunFiles.reopen(sys.argv[1], 1); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert holder(str(directory)).startswith(f"distbp pid {proc.pid} ")
    finally:
        proc.kill()
        proc.wait()
    assert os.path.exists(os.path.join(directory, LOCK))
    return proc.pid


def test_a_dead_holders_lock_blocks_nothing(tmp_path):
    run = tmp_path / "crashed"
    run.mkdir()
    stale_lock(run)
    assert holder(str(run)) is None
    RunFiles.create(str(run)).close()  # only the leftover lock file in it: the directory counts as empty
    stale_lock(run)
    files = RunFiles.reopen(str(run), 1)
    assert holder(str(run)).startswith(f"distbp pid {os.getpid()} ")
    files.close()
    assert os.listdir(run) == []


def test_create_refuses_a_crashed_runs_directory_and_leaves_it_as_it_was(tmp_path, capsys):
    run = tmp_path / "crashed"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "time": 0.1}\n')
    stale_lock(run)
    before = tree(run)
    fails(capsys, ["train", *SMALL, "--steps", "2", "--out", str(run)], "already exists and is not empty")
    assert tree(run) == before


def test_a_lock_file_that_is_a_link_is_not_written_through(tmp_path):
    target = tmp_path / "precious"
    target.write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / LOCK)
    with pytest.raises(UsageError, match="cannot write there"):
        RunFiles.reopen(str(run), 1)
    assert target.read_text() == "mine"


def test_resume_sweeps_the_temporary_files_of_a_killed_writer(tmp_path):
    run = saved_run(tmp_path)
    stale = os.path.join(run, ".tmp-k3j4-checkpoint.npz")
    open(stale, "wb").close()  # what kill -9 during atomic_write leaves
    before = tree(run)
    files = RunFiles.reopen(run, 2)
    files.close()
    del before[".tmp-k3j4-checkpoint.npz"]
    assert tree(run) == before


def test_a_run_still_going_is_refused_and_its_files_kept(tmp_path):
    """A real ``distbp train``: a second run on its --out (while it starts Ray, the old window)
    and a --resume of it (while it trains) are refused naming it, and its metrics stay whole."""
    run = str(tmp_path / "live")
    proc = subprocess.Popen([sys.executable, "-m", "distbp", "train", *SMALL, "--workers", "1", "--steps", "100000",
                             "--checkpoint-every", "5", "--out", run],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    who = f"is in use by distbp pid {proc.pid} on {socket.gethostname()} since "
    try:
        deadline = time.monotonic() + 120
        while holder(run) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        second = subprocess.run([sys.executable, "-m", "distbp", "train", *SMALL, "--steps", "3", "--out", run],
                                capture_output=True, text=True, env=ENV, timeout=120)
        metrics = os.path.join(run, "metrics.jsonl")
        while not (os.path.exists(os.path.join(run, "checkpoint.npz")) and sum(1 for _ in open(metrics)) >= 8):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        again = subprocess.run([sys.executable, "-m", "distbp", "train", "--resume", run],
                               capture_output=True, text=True, env=ENV, timeout=120)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for refused, flag in ((second, "--out"), (again, "--resume")):
        assert refused.returncode == 2 and refused.stdout == "", refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"distbp: error: {flag} {run} {who}"), refused.stderr
    steps = [json.loads(line)["step"] for line in open(metrics) if '"loss"' in line]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, each step once
    assert checkpoint.load(os.path.join(run, "checkpoint.npz"))["step"] == steps[-1]
    assert LOCK not in os.listdir(run)


def test_resume_after_a_crash_ignores_its_lock_and_sweeps_its_temp_files(ray_session, tmp_path):
    from distbp.loops.sync import train

    out = train(train_config(tmp_path, steps=4))["out"]
    os.unlink(os.path.join(out, "summary.json"))
    stale_lock(out)
    open(os.path.join(out, ".tmp-x1y2-checkpoint.npz"), "wb").close()
    assert train(*resume.load(out, {"steps": 6}))["steps"] == 6
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "metrics.jsonl", "summary.json"]


# -- the data fingerprint ------------------------------------------------------------------------

def test_fingerprint_tells_data_apart():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((3000, 5)), np.eye(3)[rng.integers(0, 3, 3000)]
    base = checkpoint.fingerprint(X, Y)
    assert checkpoint.fingerprint(X.copy(), Y.copy()) == base
    assert checkpoint.fingerprint(np.asfortranarray(X), Y) == base  # the values, not the memory layout
    changed = X.copy()
    changed[2999, 4] = np.nextafter(changed[2999, 4], 1)
    assert checkpoint.fingerprint(changed, Y) != base
    assert checkpoint.fingerprint(X[::-1], Y) != base  # order matters: the sampler picks rows by index
    assert checkpoint.fingerprint(X.reshape(5, 3000), Y) != base
    assert checkpoint.fingerprint(X.astype(np.float32), Y) != base
    assert checkpoint.fingerprint(X, Y[:, ::-1]) != base
    big = rng.standard_normal((3, 1 << 21))  # several chunks, hashed on threads
    assert checkpoint.fingerprint(big, Y) == checkpoint.fingerprint(big.copy(), Y)


def test_checkpoints_keep_the_fingerprint_and_check_fits_compares_it(tmp_path):
    path = str(tmp_path / "c.npz")
    config = config_of(tmp_path, optimizer="sgd")
    layers = config.layer_sizes()
    checkpoint.save(path, np.zeros(Layout(layers).size), {}, 3, config.to_dict(), "ab" * 32)
    state = checkpoint.load(path)
    assert state["data"] == "ab" * 32
    resume.check_fits(state, layers, config, path, "ab" * 32)
    with pytest.raises(DataError, match=r"spirals.*fingerprint abababababab in the checkpoint, cdcdcdcdcdcd now"):
        resume.check_fits(state, layers, config, path, "cd" * 32)
    checkpoint.save(path, np.zeros(Layout(layers).size), {}, 3, config.to_dict())  # as before fingerprints
    state = checkpoint.load(path)
    assert state["data"] is None
    resume.check_fits(state, layers, config, path, "cd" * 32)


def test_run_files_write_the_fingerprint_into_every_checkpoint(tmp_path):
    files = RunFiles.create(str(tmp_path / "run"), data_fingerprint="ef" * 32)
    files.open_log()
    files.save(1, {"weights": np.zeros(4)}, {})
    files.close()
    assert checkpoint.load(files.checkpoint)["data"] == "ef" * 32


def test_resume_on_other_data_is_refused_naming_both(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = str(tmp_path / "data.npz")
    np.savez(data, X=rng.standard_normal((200, 2)), y=rng.integers(0, 3, 200))
    config = config_of(tmp_path / "saved", dataset=f"npz:{data}")
    problem = prepare(config)
    trained_on = checkpoint.fingerprint(problem.X, problem.Y)
    run = saved_run(tmp_path, config=config, fingerprint=trained_on)
    np.savez(data, X=rng.standard_normal((200, 2)), y=rng.integers(0, 3, 200))  # same shapes, other values
    now = checkpoint.fingerprint(*(lambda p: (p.X, p.Y))(prepare(config)))
    refused_resume(capsys, run, f"data fingerprint {trained_on[:12]} in the checkpoint, {now[:12]} now")


# -- what a checkpoint may hold ------------------------------------------------------------------

SIZE = Layout((2, 16, 16, 3)).size


def nan_at(i, size=SIZE):
    w = np.zeros(size)
    w[i] = np.nan
    return w


@pytest.mark.parametrize("arrays, fragment", [
    ({"weights": nan_at(7)}, "corrupt checkpoint (weights: nan at index 7 of"),
    ({"weights": np.full(SIZE, np.inf)}, "weights: inf at index 0"),
    ({"opt_v": nan_at(3)}, "the optimizer buffer 'v': nan at index 3"),
    ({"opt_m": np.zeros(SIZE - 1)}, f"the optimizer buffer 'm' is float64 of shape ({SIZE - 1},)"),
    ({"opt_m": np.zeros(SIZE, np.float32)}, "the optimizer buffer 'm' is float32"),
    ({"weights": np.zeros((SIZE, 1))}, "not a flat float32 or float64 vector"),
    ({"weights": np.zeros(SIZE, np.int64)}, "the weights are int64"),
    ({"weights": np.zeros(SIZE, np.complex128)}, "the weights are complex128"),
    ({"weights": None}, "no weights in it"),
    ({"step": np.array([2, 3])}, "step is int64 of shape (2,)"),
    ({"step": np.float64(2.0)}, "step is float64"),
    ({"step": np.int64(-1)}, "not an integer >= 0"),
    ({"step": np.bool_(True)}, "step is bool"),
    ({"config_json": np.array("5")}, "config_json holds a JSON int, not an object of options"),
    ({"config_json": np.array("[1, 2]")}, "config_json holds a JSON list"),
    ({"config_json": np.array("{")}, "config_json is not JSON"),
    ({"config_json": np.array([1, 2])}, "config_json is int64 of shape (2,), not a string"),
    ({"format": np.int64(7)}, "checkpoint format 7 was written by a newer distbp"),
    ({"data_fingerprint": np.int64(7)}, "data_fingerprint is int64"),
])
def test_a_damaged_checkpoint_is_one_line_and_changes_nothing(tmp_path, capsys, arrays, fragment):
    refused_resume(capsys, saved_run(tmp_path, arrays), fragment)


def npy_with_header(shape, dtype="<f8", data=b"\0" * 80, pad=0) -> bytes:
    """An .npy file whose header says ``shape`` whatever data follows it."""
    fh = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    if pad:
        np.lib.format.write_array_header_2_0(fh, header)
        raw = fh.getvalue()
        text = raw[12:].rstrip(b"\n") + b" " * pad + b"\n"
        return raw[:8] + len(text).to_bytes(4, "little") + text + data
    np.lib.format.write_array_header_1_0(fh, header)
    return fh.getvalue() + data


def with_member(run, name, payload: bytes) -> None:
    """Replace the member ``name`` of ``run``'s checkpoint by ``payload``."""
    path = os.path.join(run, "checkpoint.npz")
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    members[name] = payload
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)


@pytest.mark.parametrize("member, payload, fragment", [
    ("weights.npy", npy_with_header((10 ** 13,)), "array 'weights' declares shape (10000000000000,) of float64 "
                                                  "(72.8 TiB) but holds 80 B"),
    ("opt_v.npy", npy_with_header((10 ** 13,)), "array 'opt_v' declares shape (10000000000000,)"),
    ("weights.npy", npy_with_header((-5,)), "corrupt"),
    ("weights.npy", npy_with_header((SIZE,), pad=200_000), "array 'weights' has an unreadable header (200"),
    ("weights.npy", npy_with_header((SIZE,), dtype="|O", data=b"\x80\x04N."), "corrupt"),
    ("weights.npy", b"\x93NUMPY\x01\x00\xff", "corrupt"),
    ("config_json.npy", npy_with_header((), dtype="<U100000000", data=b""), "declares shape () of <U100000000"),
])
def test_a_checkpoint_that_claims_more_than_it_holds_is_refused_before_allocating(tmp_path, capsys, member,
                                                                                 payload, fragment):
    run = saved_run(tmp_path)
    with_member(run, member, payload)
    refused_resume(capsys, run, fragment)


def test_a_checkpoint_larger_than_memory_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets, "memory_available", lambda: 1000)
    run = saved_run(tmp_path)
    refused_resume(capsys, run, "but only 1000 B is available")


# -- metrics.jsonl on resume ---------------------------------------------------------------------

@pytest.mark.parametrize("damage, fragment", [
    ("bytes", "bytes that are not UTF-8"),
    ("time", "line 2 is not a metrics record"),
    ("step", "line 1 is not a metrics record"),
    ("hash", "line 1 is not a metrics record"),
    ("directory", "is a directory, not a metrics file"),
    ("fifo", "not a regular file"),
])
def test_a_damaged_metrics_file_is_refused_on_resume(tmp_path, capsys, damage, fragment):
    run = saved_run(tmp_path)
    path = os.path.join(run, "metrics.jsonl")
    good = '{"step": 2, "loss": 0.9, "time": 0.2}\n'
    if damage == "bytes":
        open(path, "wb").write(b'{"step": 1, "loss": 1.0, "time": 0.1}\n\xff\xfe\n' + good.encode())
    elif damage == "time":
        open(path, "w").write('{"step": 1, "loss": 1.0, "time": 0.1}\n{"step": 2, "loss": 0.9, "time": "x"}\n')
    elif damage == "step":
        open(path, "w").write('{"step": [1], "loss": 1.0, "time": 0.1}\n' + good)
    elif damage == "hash":
        open(path, "w").write('{"step": 1, "loss": 1.0, "time": 0.1, "grad_xxh3": 5}\n' + good)
    elif damage == "directory":
        os.unlink(path)
        os.mkdir(path)
    else:
        os.unlink(path)
        os.mkfifo(path)  # reading it would block: tree() cannot hash it either
        fails(capsys, ["train", "--resume", run, "--steps", "4"], fragment)
        assert sorted(os.listdir(run)) == ["checkpoint.npz", "metrics.jsonl", "summary.json"]
        return
    refused_resume(capsys, run, fragment)
