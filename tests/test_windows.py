"""Windows of steps without a Ray call each (distbp/distributed/windows.py), on the socket
transports: the bits, the metrics and the failures of steps run one by one (a diverging
window: tests/test_faults.py)."""

import os
from types import SimpleNamespace

import pytest
from conftest import train_config

from distbp.distributed import windows
from distbp.loops.sync import train
from distbp.run import checkpoint, metrics


def lines(summary: dict) -> list[dict]:
    return metrics.steps(metrics.read(os.path.join(summary["out"], metrics.NAME)))


@pytest.fixture(scope="module")
def one_by_one(ray_session, tmp_path_factory):
    """The reference: 20 steps one by one on shared memory (no windows there)."""
    run = train(train_config(tmp_path_factory.mktemp("ref"), workers=2, steps=20, optimizer="momentum",
                             dtype="float32", transport="shared-memory"))
    assert run["windows"] is None
    return run


@pytest.mark.parametrize("transport, workers, servers", [
    ("socket+shared-memory", 1, 1), ("socket+shared-memory", 3, 2), ("socket", 2, 1), ("socket", 2, 3)])
def test_windows_give_the_bits_and_the_lines_of_steps_one_by_one(one_by_one, tmp_path, transport, workers, servers):
    run = train(train_config(tmp_path, workers=workers, servers=servers, steps=20, optimizer="momentum",
                             dtype="float32", transport=transport))
    assert run["transport"] == transport
    assert run["windows"]["steps"] == 20 and run["windows"]["called_off"] == 0  # every step in a window
    assert run["weights_sha256"] == one_by_one["weights_sha256"]
    got, ref = lines(run), lines(one_by_one)
    assert [r["step"] for r in got] == list(range(1, 21))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # the same micro-batch errors, summed exactly
    assert [r["workers"] for r in got] == [workers] * 20
    times = [r["time"] for r in got]
    assert times == sorted(times) and len(set(times)) == 20  # each step's own time, not its window's
    if servers == 1:  # the fingerprint of a step's gradient depends on S
        assert [r["grad_xxh3"] for r in got] == [r["grad_xxh3"] for r in ref]


def test_a_window_ends_where_the_driver_has_work(ray_session, tmp_path):
    """Checkpoints, evaluations and epoch ends fall between windows: each comes after its step."""
    options = dict(workers=2, steps=26, checkpoint_every=4, eval_every=6, val_fraction=0.2, optimizer="momentum")
    ref = train(train_config(tmp_path, transport="shared-memory", **options))
    run = train(train_config(tmp_path, transport="socket+shared-memory", **options))
    assert run["weights_sha256"] == ref["weights_sha256"]
    assert run["windows"]["steps"] >= 20 and run["windows"]["windows"] >= 8
    records = metrics.read(os.path.join(run["out"], metrics.NAME))
    assert [{k: v for k, v in r.items() if k not in ("time", "worker_compute", "server_sum", "update")}
            for r in records] == \
        [{k: v for k, v in r.items() if k not in ("time", "worker_compute", "server_sum", "update")}
         for r in metrics.read(os.path.join(ref["out"], metrics.NAME))]
    assert checkpoint.load(os.path.join(run["out"], "checkpoint.npz"))["step"] == 26  # the last, as always


def test_a_worker_and_a_server_killed_inside_windows(ray_session, tmp_path):
    """kill-worker at step 3 and kill-server at step 6 strike inside their windows: each window
    is called off, its finished steps kept, the rest redone; the bits do not change."""
    options = dict(workers=2, steps=12, checkpoint_every=4, optimizer="momentum")
    ref = train(train_config(tmp_path, transport="shared-memory", **options))
    run = train(train_config(tmp_path, transport="socket+shared-memory",
                             fault_injection="kill-worker:1@3,kill-server@6", **options))
    assert run["weights_sha256"] == ref["weights_sha256"]
    assert run["windows"]["called_off"] == 2
    assert run["faults"]["workers_lost"] == 1 and run["faults"]["server_restarts"] == 1
    assert run["faults"].get("redo_mismatches", 0) == 0
    assert [r["step"] for r in lines(run)] == list(range(1, 13))


def test_a_late_worker_sends_the_next_steps_one_by_one():
    """A share that took LATE_FACTOR times the quickest's time per micro-batch (plus LATE_MIN_S)
    is late, as the crew judges it: the next WINDOW steps go one by one, where it has backups."""
    crew = SimpleNamespace(pool=None, servers=None, pace=None)
    w = windows.Windows(crew, None)
    ran = [windows.Ran(5, 60, 1.0, 0.2, 2, 0.0)]
    w._pace(ran, {5: [(0, 4), (1, 4)]}, {5: (1.0, [0.01, 0.02], 0.0)})
    assert w.calm == 0 and crew.pace == pytest.approx(0.0025)
    w._pace(ran, {5: [(0, 4), (1, 4)]}, {5: (1.0, [0.01, 0.5], 0.0)})
    assert w.calm == windows.WINDOW
