"""--resume continues a run to exactly the weights of the run that never stopped."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import step_lines, train_config

from distbp import cli
from distbp.loops.sync import train
from distbp.run import checkpoint

SMALL = ["--dataset", "spirals", "--layers", "2,16,16,3", "--batch-size", "60", "--micro-batch", "8"]


def summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh)


def assert_one_run(run_dir, steps: int) -> None:
    """metrics.jsonl reads as one run: every step once, in order, its clock never going back."""
    lines = step_lines(run_dir)
    assert [e["step"] for e in lines] == list(range(1, steps + 1))
    times = [e["time"] for e in lines]
    assert times == sorted(times)


def signal_when(run_dir, lines: int, signum=signal.SIGTERM) -> threading.Thread:
    """Send ``signum`` to this process once ``run_dir``'s metrics.jsonl has ``lines`` step lines."""
    def watch():
        path = os.path.join(run_dir, "metrics.jsonl")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.exists(path) and sum(1 for _ in open(path)) >= lines:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.01)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def whole(ray_session, tmp_path_factory) -> dict:
    """The uninterrupted run (Adam, 12 steps) the resumed ones must reproduce."""
    return train(train_config(tmp_path_factory.mktemp("whole"), optimizer="adam", workers=2, steps=12))


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory) -> str:
    """A finished two-step run."""
    return train(train_config(tmp_path_factory.mktemp("finished"), steps=2))["out"]


def test_resume_after_n_steps_equals_uninterrupted_adam_with_more_workers(whole, tmp_path):
    part = train(train_config(tmp_path, optimizer="adam", workers=2, steps=5))
    first = checkpoint.load(os.path.join(part["out"], "checkpoint.npz"))
    assert first["step"] == 5 and set(first["optimizer"]) == {"m", "v"}  # Adam's state travels too

    # K changes from 2 to 3 on resume: the sum does not depend on K
    assert cli.main(["train", "--resume", part["out"], "--steps", "12", "--workers", "3"]) == 0
    resumed = summary(part["out"])
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    assert resumed["workers"] == 3 and resumed["steps"] == 12 and resumed["resumed_from_step"] == 5
    assert checkpoint.sha256_le(first["weights"]) != resumed["weights_sha256"]  # it did train on
    assert_one_run(part["out"], 12)
    # the steps after the checkpoint are the same sums as in the whole run
    assert [e["grad_xxh3"] for e in step_lines(part["out"])] == [e["grad_xxh3"] for e in step_lines(whole["out"])]


def test_interrupted_mid_epoch_resumes_to_the_same_weights(ray_session, tmp_path, capsys):
    whole = train(train_config(tmp_path, optimizer="momentum", workers=2, steps=40))
    run_dir = str(tmp_path / "stopped")
    # One worker, stalled 2 s at step 20: the signal surely lands mid-run; checkpoints every 4 steps.
    signal_when(run_dir, lines=15)
    capsys.readouterr()
    code = cli.main(["train", *SMALL, "--optimizer", "momentum", "--workers", "1", "--steps", "40",
                     "--checkpoint-every", "4", "--fault-injection", "delay-worker:0@20:2", "--out", run_dir])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err
    assert f"distbp train --resume {run_dir}" in err and "Traceback" not in err
    stopped_at = checkpoint.load(os.path.join(run_dir, "checkpoint.npz"))["step"]
    assert 15 <= stopped_at < 40  # a checkpoint at the step boundary where it stopped, not at a multiple of 4
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))  # the run is not finished

    assert cli.main(["train", "--resume", run_dir, "--workers", "2"]) == 0
    assert summary(run_dir)["weights_sha256"] == whole["weights_sha256"]
    assert_one_run(run_dir, 40)


def test_interrupted_checkpoint_write_leaves_the_previous_one(whole, tmp_path, monkeypatch, capsys):
    part = train(train_config(tmp_path, steps=4))
    path = os.path.join(part["out"], "checkpoint.npz")
    before = open(path, "rb").read()

    def savez_dies_midway(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip file")  # what a crash mid-write leaves behind
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_dies_midway)
    capsys.readouterr()
    assert cli.main(["train", "--resume", part["out"], "--steps", "12"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("distbp: error: cannot write") and "Traceback" not in err
    assert "previous checkpoint is intact" in err
    assert open(path, "rb").read() == before  # byte for byte
    assert checkpoint.load(path)["step"] == 4
    # no temp file; error.json says why the resume stopped
    assert sorted(os.listdir(part["out"])) == ["checkpoint.npz", "error.json", "metrics.jsonl", "summary.json"]

    monkeypatch.undo()
    assert cli.main(["train", "--resume", part["out"], "--steps", "12"]) == 0
    assert summary(part["out"])["weights_sha256"] == whole["weights_sha256"]


@pytest.mark.parametrize("flag, value, name", [
    ("--layers", "2,32,3", "--layers"),
    ("--optimizer", "sgd", "--optimizer"),
    ("--dtype", "float32", "--dtype"),
    ("--micro-batch", "4", "--micro-batch"),
    ("--out", "elsewhere", "--out"),
])
def test_resume_refuses_changes_that_would_change_the_result(finished, capsys, flag, value, name):
    files = {f: open(os.path.join(finished, f), "rb").read() for f in os.listdir(finished)}
    capsys.readouterr()
    assert cli.main(["train", "--resume", finished, "--steps", "4", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"distbp: error: {name}") and len(err.splitlines()) == 1
    assert {f: open(os.path.join(finished, f), "rb").read() for f in os.listdir(finished)} == files


def test_a_run_saved_with_a_removed_transport_goes_on_on_direct(whole, tmp_path):
    """A checkpoint whose config names a transport that `direct` replaced (an earlier version's
    run) resumes on `direct`, to the bits of the uninterrupted run."""
    part = train(train_config(tmp_path, optimizer="adam", workers=2, steps=6))
    path = os.path.join(part["out"], "checkpoint.npz")
    with np.load(path, allow_pickle=False) as saved:
        arrays = dict(saved)
    config = json.loads(str(arrays["config_json"]))
    arrays["config_json"] = np.array(json.dumps(config | {"transport": "socket+shared-memory"}))
    np.savez(path, **arrays)
    assert cli.main(["train", "--resume", part["out"], "--steps", "12"]) == 0
    resumed = summary(part["out"])
    assert resumed["transport"] == "direct" and resumed["weights_sha256"] == whole["weights_sha256"]


def test_resume_of_a_finished_run_asks_for_more_steps(finished, capsys):
    capsys.readouterr()
    assert cli.main(["train", "--resume", finished]) == 2
    assert "already has its 2 steps" in capsys.readouterr().err


def test_sigterm_to_a_real_process_then_resume(whole, tmp_path):
    run_dir = str(tmp_path / "killed")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # One worker stalled 3 s at step 6: SIGTERM arrives while the run is busy with that step.
    proc = subprocess.Popen([sys.executable, "-m", "distbp", "train", *SMALL, "--workers", "1", "--steps", "12",
                             "--fault-injection", "delay-worker:0@6:3", "--out", run_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        deadline = time.monotonic() + 120
        while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 4):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and f"distbp train --resume {run_dir}" in err
    assert 4 <= checkpoint.load(os.path.join(run_dir, "checkpoint.npz"))["step"] < 12

    assert cli.main(["train", "--resume", run_dir, "--workers", "2"]) == 0
    assert summary(run_dir)["weights_sha256"] == whole["weights_sha256"]
    assert_one_run(run_dir, 12)


def test_resume_of_a_finished_run_without_its_summary_writes_it(ray_session, tmp_path, capsys):
    """A driver that dies after its last checkpoint leaves no summary.json; --resume writes it from
    the checkpoint (same weights) instead of answering that the run is done."""
    done = train(train_config(tmp_path, steps=8))
    os.unlink(os.path.join(done["out"], "summary.json"))
    assert cli.main(["train", "--resume", done["out"]]) == 0
    rebuilt = json.loads(capsys.readouterr().out)
    assert rebuilt["weights_sha256"] == done["weights_sha256"] and rebuilt["steps"] == 8
    on_disk = summary(done["out"])
    assert on_disk["summary_rebuilt"] and on_disk["final_loss"] == done["final_loss"]
    assert_one_run(done["out"], 8)
    assert cli.main(["train", "--resume", done["out"]]) == 2  # now it has its summary: nothing to do
    assert "already has its 8 steps" in capsys.readouterr().err
    assert cli.main(["train", "--resume", done["out"], "--steps", "5"]) == 2
    assert "already has 8 steps, more than the 5 asked for" in capsys.readouterr().err
