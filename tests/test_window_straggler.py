"""A straggler inside a window of steps is backed up: a worker stopped (SIGSTOP) in the middle of
a window costs about the late rule's time, not the stop's, and the weights are the same bits."""

import os
import signal
import threading
from pathlib import Path

import numpy as np

import distbp

STOP_S = 12.0


def worker_pids() -> list[int]:
    """The live ``Worker`` actors' processes (Ray titles them ``ray::Worker``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::Worker"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return sorted(pids)


class StopAWorker(distbp.Callback):
    """At the checkpoint of step 10 (the run goes on in windows), stop one worker for STOP_S."""

    def __init__(self):
        self.stopped = None
        self.others = set(worker_pids())  # processes of earlier runs' workers, still exiting

    def on_checkpoint(self, record):
        if record["step"] == 10 and self.stopped is None:
            self.stopped = [pid for pid in worker_pids() if pid not in self.others][0]
            os.kill(self.stopped, signal.SIGSTOP)
            threading.Timer(STOP_S, go_on, (self.stopped,)).start()


def go_on(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # the run ended and its actors with it
        pass


def test_a_worker_stopped_inside_a_window_is_backed_up(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    options = dict(layers=[4, 16, 2], workers=3, batch_size=60, micro_batch=10, steps=40, checkpoint_every=10)
    stop = StopAWorker()
    result = distbp.fit(X, y, **options, out=str(tmp_path / "stopped"), callbacks=[stop])
    assert stop.stopped is not None
    times = [r["time"] for r in result.metrics]
    slowest = max(b - a for a, b in zip(times[9:], times[10:]))  # from step 10, where it stopped
    assert slowest < STOP_S / 3, f"a step took {slowest:.2f} s: the stopped worker's share was waited for"
    assert result.summary["windows"]["called_off"] >= 1 and result.summary["windows"]["steps"] > 0
    plain = distbp.fit(X, y, **options, out=str(tmp_path / "plain"))
    assert result.summary["weights_sha256"] == plain.summary["weights_sha256"]
