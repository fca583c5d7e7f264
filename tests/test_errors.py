"""Bad input: one line on stderr, exit status 2, no traceback, nothing written, nothing lost.

Most cases run ``distbp.cli.main`` in this process (they fail before Ray is needed); a few
run the real command in a subprocess, including against a real Ray head with another token.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from distbp import cli
from distbp.lecture.network import Layout
from distbp.run import checkpoint

SMALL = ["--dataset", "spirals", "--layers", "2,16,16,3", "--batch-size", "60", "--micro-batch", "8", "--steps", "2"]


def npz(tmp_path, name="data.npz", **arrays) -> str:
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path


def fails(capsys, argv, fragment) -> str:
    """Run the CLI; it must exit 2 with exactly one line naming the problem."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("distbp: error: "), err
    assert fragment in err, err
    return err


def X_y(n=100, d=2, classes=3):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


def bad_data(tmp_path, case):
    X, y = X_y()
    if case == "nan":
        X[7, 1] = np.nan
    elif case == "inf":
        X[3, 0] = np.inf
    elif case == "labels":
        y[5] = -1
    elif case == "empty":
        X, y = X[:0], y[:0]
    return f"npz:{npz(tmp_path, X=X, y=y)}"


@pytest.mark.parametrize("case, args, fragment", [
    ("nan", [], "contains NaN or inf (first at row 7, column 1)"),
    ("inf", [], "contains NaN or inf (first at row 3, column 0)"),
    ("labels", [], "labels outside"),
    ("empty", [], "is empty"),
    (None, ["--layers", "3,16,3"], "starts with 3 inputs but spirals has 2 features"),
    (None, ["--dataset", "random:10,2,2", "--layers", "2,4,2", "--batch-size", "20"], "larger than the training set"),
    (None, ["--micro-batch", "0"], "--micro-batch must be at least 1"),
    (None, ["--micro-batch", "-3"], "--micro-batch must be at least 1"),
    (None, ["--lr", "-0.1"], "--lr must be a finite number >= 0"),
    (None, ["--lr", "nan"], "--lr must be a finite number >= 0"),
    (None, ["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (None, ["--fault-injection", "kill-worker:7@3"], "there are only 2 workers"),
    (None, ["--fault-injection", "explode@3"], "cannot read 'explode@3'"),
    (None, ["--dataset", "random:40,2,3", "--layers", "2,4,3", "--dtype", "float32", "--checkpoint-every", "-1"],
     "--checkpoint-every must be >= 0"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, args, fragment):
    out = tmp_path / "run"
    dataset = ["--dataset", bad_data(tmp_path, case), "--layers", "2,8,3"] if case else []
    fails(capsys, ["train", *SMALL, *dataset, *args, "--out", str(out)], fragment)
    assert not out.exists()


def test_data_that_overflows_the_dtype(tmp_path, capsys):
    X, y = X_y()
    X[0, 0] = 1e300  # finite in float64, inf in float32
    path = npz(tmp_path, X=X, y=y)
    fails(capsys, ["train", *SMALL, "--dataset", f"npz:{path}", "--layers", "2,8,3", "--dtype", "float32",
                   "--out", str(tmp_path / "run")], "features overflow float32")
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_a_config_file(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('workers = 2\nlearning_rate = 0.1\n')
    fails(capsys, ["train", "--config", str(toml), "--out", str(tmp_path / "run")], "unknown key 'learning_rate'")
    assert not (tmp_path / "run").exists()


def test_unwritable_out_leaves_nothing(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    fails(capsys, ["train", *SMALL, "--out", str(blocker / "deeper" / "run")], "cannot write there")
    assert blocker.read_text() == "not a directory" and sorted(os.listdir(tmp_path)) == ["a-file"]


def test_existing_results_are_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}')
    fails(capsys, ["train", *SMALL, "--out", str(out)], "already exists and is not empty")
    assert os.listdir(out) == ["summary.json"] and (out / "summary.json").read_text() == '{"mine": true}'


def saved_run(tmp_path, weights=None, config=None) -> str:
    """A run directory as training leaves it (written by hand here: no training needed)."""
    from distbp import Config

    run = tmp_path / "saved"
    run.mkdir()
    config = config or Config(dataset="spirals", layers="2,16,16,3", workers=2, batch_size=60, micro_batch=8,
                              steps=2, optimizer="sgd", out=str(run))
    size = Layout(config.layer_sizes()).size
    checkpoint.save(str(run / "checkpoint.npz"), np.zeros(size) if weights is None else weights, {}, 2,
                    config.to_dict())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "time": 0.1}\n{"step": 2, "loss": 0.9, "time": 0.2}\n')
    (run / "summary.json").write_text('{"steps": 2}\n')
    return str(run)


def contents(directory) -> dict:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("damage, fragment", [
    ("garbage", "corrupt checkpoint (not an .npz file)"),
    ("truncated", "corrupt checkpoint: not a readable .npz file"),
    ("other-architecture", "a checkpoint of another architecture"),
])
def test_bad_checkpoint_on_resume_touches_nothing(tmp_path, capsys, damage, fragment):
    run = saved_run(tmp_path, weights=np.zeros(10) if damage == "other-architecture" else None)
    path = os.path.join(run, "checkpoint.npz")
    if damage == "garbage":
        with open(path, "wb") as fh:
            fh.write(os.urandom(300))
    elif damage == "truncated":
        data = open(path, "rb").read()
        with open(path, "wb") as fh:
            fh.write(data[:len(data) // 2])
    before = contents(run)
    fails(capsys, ["train", "--resume", run, "--steps", "4"], fragment)
    assert contents(run) == before


def test_resume_of_a_missing_directory(tmp_path, capsys):
    fails(capsys, ["train", "--resume", str(tmp_path / "nowhere")], "no such directory")
    assert os.listdir(tmp_path) == []


def test_resume_of_a_directory_without_checkpoint(tmp_path, capsys):
    fails(capsys, ["train", "--resume", str(tmp_path)], "no checkpoint.npz in it")


# -- the real command, in its own process -------------------------------------------------------

def run_distbp(*args, env=None, timeout=120):
    start = time.monotonic()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "distbp", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    return proc, time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distbp: error: ") and fragment in lines[0], proc.stderr


def test_subprocess_bad_option_has_no_traceback(tmp_path):
    proc, _ = run_distbp("train", *SMALL, "--lr", "nan", "--out", str(tmp_path / "run"))
    assert_one_line(proc, "--lr must be a finite number")
    assert not (tmp_path / "run").exists()


def test_unreachable_address_fails_within_seconds(tmp_path):
    port = free_port()  # nothing listens there
    proc, seconds = run_distbp("train", *SMALL, "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "run"))
    assert_one_line(proc, f"no Ray cluster answers at 127.0.0.1:{port}")
    assert seconds < 30  # Python and Ray imports included; ray.init alone would retry for a minute
    assert not (tmp_path / "run").exists()  # made before connecting, removed when that failed


@pytest.fixture
def ray_head_with_token():
    """A Ray head on 127.0.0.1 whose token is known; stopped by its pid afterwards."""
    token = "0123456789abcdef" * 4
    port = free_port()
    temp = tempfile.mkdtemp(prefix="/tmp/distbp-head-")  # short: Ray's socket paths must fit 107 bytes
    ports = {f"--{name}": str(free_port()) for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "dashboard-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false",
         "--disable-usage-stats", "--temp-dir", temp, *[v for kv in ports.items() for v in kv]],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", token
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_cluster_with_another_token_is_refused_quickly(tmp_path, ray_head_with_token):
    address, token = ray_head_with_token
    # the same check with the right token passes: it is the token that is refused, not the address
    probe = [sys.executable, "-c", f"from distbp.distributed.runtime import probe; probe({address!r})"]
    right = subprocess.run(probe, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    assert right.returncode == 0, right.stderr

    proc, seconds = run_distbp("train", *SMALL, "--address", address, "--out", str(tmp_path / "run"),
                               env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64})
    assert_one_line(proc, "refused our token")
    assert seconds < 30  # ray.init alone retries a wrong token for about 20 s, printing a warning a second
    assert not (tmp_path / "run").exists()
