"""Nothing lost, nothing hung: a tracker that never answers, or a metrics.jsonl that cannot be written.

- An MLflow server that cannot be reached at the start (a listener that accepts and never answers,
  a closed port) is refused in bounded time: one line, exit 2, nothing created.  Refusing is the
  choice because a tracker the user asked for and cannot reach at the start is almost always a
  wrong URI or a server not up yet, and the contract's answer to an unreachable service is one
  line and exit 2 before anything is made (as for an unreachable cluster).
- One that stops answering mid-run costs one warning line: training goes on to the same bits,
  and the end of the run waits for it only ``report.CLOSE_S``.
- A failed write of metrics.jsonl (a full disk: a real one on a small tmpfs where this machine
  lets us mount one, a simulated one always) is one line and exit 1, the checkpoint before it
  intact, no traceback.
"""

import errno
import os
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from distbp.errors import RunFailed
from distbp.run import checkpoint, metrics, report
from tests.test_properties import run_cli

pytest.importorskip("mlflow", reason='mlflow is not installed: pip install -e ".[dev]"')

# Where the old code hung (300 s) or went silent (254 s), the broken tracker below answers HTTP 400
# after ANSWER_AFTER seconds, so that a client without bounds fails these tests in about a minute
# rather than hanging the suite; a bounded client has given up long before.
ANSWER_AFTER = 60.0
REFUSED_WITHIN = report.START_S + 15.0  # the tracker's bound, plus Ray's actors starting and stopping on 2 cores
TINY = ["--dataset", "spirals", "--layers", "2,16,3", "--workers", "2", "--batch-size", "60", "--micro-batch", "15"]


class BrokenTracker:
    """A port on 127.0.0.1 that no tracker answers on.  ``silent``: it accepts every connection
    and says nothing; ``closed``: it refuses every connection (bound, not listening).  After
    ``ANSWER_AFTER`` seconds either answers HTTP 400 (see above)."""

    def __init__(self, kind: str):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.gone = threading.Event()
        self.answer_at = time.monotonic() + ANSWER_AFTER
        if kind == "silent":
            self.sock.listen(16)
        threading.Thread(target=self._serve, args=(kind,), daemon=True).start()

    def _serve(self, kind: str) -> None:
        if kind == "closed" and self.gone.wait(ANSWER_AFTER):
            return
        if kind == "closed":
            self.sock.listen(16)
        self.sock.settimeout(0.2)
        while not self.gone.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            threading.Thread(target=self._answer_late, args=(conn,), daemon=True).start()

    def _answer_late(self, conn: socket.socket) -> None:
        if self.gone.wait(max(0.0, self.answer_at - time.monotonic())):
            return
        try:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()
        except OSError:
            pass

    def close(self) -> None:
        self.gone.set()
        for conn in self.conns + [self.sock]:
            conn.close()


@pytest.fixture
def tracker_at(monkeypatch):
    """``tracker_at(kind)``: a BrokenTracker as MLFLOW_TRACKING_URI, closed after the test."""
    made = []

    def make(kind: str) -> BrokenTracker:
        made.append(BrokenTracker(kind))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", made[-1].uri)
        return made[-1]

    yield make
    for tracker in made:
        tracker.close()


def said(err: str) -> list[str]:
    """stderr's lines but the evaluation lines a run logs (``epoch E step S/N ...``)."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("epoch ")]


@pytest.mark.parametrize("kind", ["silent", "closed"])
def test_an_unreachable_tracker_is_refused_at_once_with_one_line(kind, ray_session, tmp_path, tracker_at, capsys):
    tracker_at(kind)
    http_settings = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP")}
    out = tmp_path / "run"
    started = time.monotonic()
    code, stdout, err = run_cli(["train", *TINY, "--steps", "3", "--report-to", "mlflow", "--out", str(out)], capsys)
    took = time.monotonic() - started
    assert code == 2, err
    [line] = said(err)
    assert line.startswith("distbp: error: --report-to mlflow: cannot start it ("), err
    assert "Traceback" not in err and stdout == ""
    if kind == "silent":
        assert f"within {report.START_S:g} s" in err
    else:
        assert "refused" in err.lower()
    assert took < REFUSED_WITHIN, f"refused after {took:.1f} s"
    assert not out.exists()  # nothing created
    # our HTTP settings are taken back
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP")} == http_settings


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    uri = "file:" + str(tmp_path / "mlruns")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


@pytest.mark.parametrize("fault", ["hangs", "fails"])
def test_a_tracker_lost_mid_run_costs_one_warning_and_no_bit(fault, ray_session, tmp_path, mlflow_store,
                                                             monkeypatch, capsys):
    """MLflow takes the run and its params, then each batch of metrics hangs (answers only after
    ANSWER_AFTER seconds) or fails: the steps go on at their pace, the run ends (waiting
    CLOSE_S for the tracker, here 2 s) with the bits of a run without a tracker."""
    import json

    from mlflow import MlflowClient

    released = threading.Event()
    real = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            if fault == "hangs":
                released.wait(ANSWER_AFTER)
            raise ConnectionError("the tracker went away")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    monkeypatch.setattr(report, "CLOSE_S", 2.0)
    argv = ["train", *TINY, "--steps", "12", "--checkpoint-every", "4"]
    try:
        started = time.monotonic()
        code, stdout, err = run_cli([*argv, "--report-to", "mlflow", "--out", str(tmp_path / "tracked")], capsys)
        took = time.monotonic() - started
    finally:
        released.set()
    assert code == 0, err
    [warning] = said(err)
    assert warning.startswith("distbp: warning: --report-to mlflow stopped: ") and "metrics.jsonl has every step" \
        in warning, err
    assert took < ANSWER_AFTER / 2, f"the run took {took:.1f} s"
    code, plain, err = run_cli([*argv, "--out", str(tmp_path / "plain")], capsys)
    assert code == 0, err
    assert json.loads(stdout)["weights_sha256"] == json.loads(plain)["weights_sha256"]
    assert [r["step"] for r in metrics.steps(metrics.read(str(tmp_path / "tracked" / metrics.NAME)))] == \
        list(range(1, 13))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EPERM, errno.EIO])
def test_a_failed_write_of_metrics_jsonl_is_a_run_failed_naming_the_file(code, tmp_path):
    writer = metrics.Writer(str(tmp_path / metrics.NAME))
    writer.write({"step": 1, "loss": 0.5})

    class Failing:
        def write(self, *text):
            raise OSError(code, os.strerror(code))

        flush = close = write

    writer.fh.close()
    writer.fh = Failing()
    with pytest.raises(RunFailed) as failed:
        writer.write({"step": 2, "loss": 0.25})
    assert str(failed.value) == f"cannot write {tmp_path / metrics.NAME} ({os.strerror(code)})"
    with pytest.raises(RunFailed):
        writer.flush()
    writer.close()  # never raises
    assert metrics.read(str(tmp_path / metrics.NAME)) == [{"step": 1, "loss": 0.5}]


class FullAfter:
    """metrics.jsonl as a file on a disk that fills up after ``lines`` lines: then each write and
    the close raise ENOSPC, as a line-buffered file on a full disk does."""

    def __init__(self, fh, lines: int):
        self.fh, self.left = fh, lines

    def write(self, text: str) -> int:
        if self.left == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= 1
        return self.fh.write(text)

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()
        if self.left == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def check_one_line_and_checkpoint(code: int, stdout: str, err: str, run_dir, step: int) -> None:
    """Exit 1, one error line naming metrics.jsonl and the full disk, the checkpoint of ``step`` intact."""
    assert code == 1, err
    assert "Traceback" not in err and stdout == ""
    [line] = said(err)
    assert line.startswith(f"distbp: error: cannot write {run_dir / metrics.NAME} (No space left on device)"), err
    assert f"the checkpoint of step {step} is intact" in line, err
    saved = checkpoint.load(str(run_dir / "checkpoint.npz"))
    assert saved["step"] == step and np.isfinite(saved["weights"]).all()
    assert [r["step"] for r in metrics.steps(metrics.read(str(run_dir / metrics.NAME)))][:step] == \
        list(range(1, step + 1))


def test_a_full_disk_under_metrics_jsonl_is_one_line_exit_1(ray_session, tmp_path, monkeypatch, capsys):
    """Simulated: the fifth line of metrics.jsonl meets a full disk (the checkpoint of step 4 is written)."""
    real_open = open

    def opened(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return FullAfter(fh, 4) if str(path).endswith(metrics.NAME) and mode.startswith("a") else fh

    monkeypatch.setattr(metrics, "open", opened, raising=False)
    run_dir = tmp_path / "run"
    code, stdout, err = run_cli(["train", *TINY, "--steps", "8", "--checkpoint-every", "4", "--out", str(run_dir)],
                                capsys)
    check_one_line_and_checkpoint(code, stdout, err, run_dir, 4)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted on a directory of tmp_path (as root), unmounted after the test."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk_under_metrics_jsonl_is_one_line_exit_1(ray_session, small_disk, monkeypatch, capsys):
    """A real ENOSPC: once the checkpoint of step 20 is written, a file fills the tmpfs the run is
    on.  tmpfs counts whole pages: the lines after it fill metrics.jsonl's last page (20 lines of
    over 205 bytes are more than the 4 KiB of a page), and the line that needs a new one fails,
    before the next checkpoint (step 40; one epoch is 100 steps)."""
    from distbp.run.outdir import RunFiles

    real_save = RunFiles.save

    def save(self, step, arrays, config):
        real_save(self, step, arrays, config)
        if step == 20:
            fd = os.open(os.path.join(str(small_disk), "filler"), os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)

    monkeypatch.setattr(RunFiles, "save", save)
    run_dir = small_disk / "run"
    tiny = [*TINY[2:], "--dataset", "random:6000,2,3"]
    code, stdout, err = run_cli(["train", *tiny, "--steps", "40", "--checkpoint-every", "20", "--out", str(run_dir)],
                                capsys)
    check_one_line_and_checkpoint(code, stdout, err, run_dir, 20)
