"""Windows of steps without a Ray call each (distbp/distributed/windows.py), on the direct
transport: where they end, and failures inside them (the bits of every window length:
tests/test_equivalence.py; a diverging window: tests/test_faults.py)."""

import os
from types import SimpleNamespace

import pytest
from conftest import step_lines, train_config

from distbp.distributed import windows
from distbp.distributed.direct import Direct
from distbp.loops.sync import train
from distbp.run import checkpoint, metrics


def test_a_window_ends_where_the_driver_has_work(ray_session, tmp_path):
    """Checkpoints, evaluations and epoch ends fall between windows: each comes after its step."""
    options = dict(workers=2, steps=26, checkpoint_every=4, eval_every=6, val_fraction=0.2, optimizer="momentum")
    ref = train(train_config(tmp_path, transport="object-store", **options))  # steps one by one
    run = train(train_config(tmp_path, **options))
    assert run["weights_sha256"] == ref["weights_sha256"]
    assert run["windows"]["steps"] >= 20 and run["windows"]["windows"] >= 8
    records = metrics.read(os.path.join(run["out"], metrics.NAME))
    assert [{k: v for k, v in r.items() if k not in ("time", "worker_compute", "server_sum", "update")}
            for r in records] == \
        [{k: v for k, v in r.items() if k not in ("time", "worker_compute", "server_sum", "update")}
         for r in metrics.read(os.path.join(ref["out"], metrics.NAME))]
    assert checkpoint.load(os.path.join(run["out"], "checkpoint.npz"))["step"] == 26  # the last, as always


@pytest.mark.parametrize("within_node", [True, False], ids=["memfds", "sockets"])
def test_a_worker_and_a_server_killed_inside_windows(ray_session, tmp_path, monkeypatch, within_node):
    """kill-worker at step 3 and kill-server at step 6 strike inside their windows: each window
    is called off, its finished steps kept, the rest redone; the bits do not change.  Between
    actors of one node (memfds) and as between nodes (every vector over a socket)."""
    options = dict(workers=2, steps=12, checkpoint_every=4, optimizer="momentum")
    ref = train(train_config(tmp_path, transport="object-store", **options))
    monkeypatch.setattr(Direct, "within_node", within_node)
    run = train(train_config(tmp_path, fault_injection="kill-worker:1@3,kill-server@6", **options))
    assert run["weights_sha256"] == ref["weights_sha256"]
    assert run["windows"]["called_off"] == 2
    assert run["faults"]["workers_lost"] == 1 and run["faults"]["server_restarts"] == 1
    assert run["faults"].get("redo_mismatches", 0) == 0
    assert [r["step"] for r in step_lines(run["out"])] == list(range(1, 13))


def test_a_late_worker_sends_the_next_steps_one_by_one():
    """A share that took LATE_FACTOR times the quickest's time per micro-batch (plus LATE_MIN_S)
    is late, as the crew judges it: the next WINDOW steps go one by one, where it has backups."""
    crew = SimpleNamespace(pool=None, servers=None, pace=None)
    w = windows.Windows(crew)
    ran = [windows.Ran(5, 60, 1.0, 0.2, 2, 0.0, 0.0)]
    w._pace(ran, {5: [(0, 4), (1, 4)]}, {5: (1.0, [0.01, 0.02], 0.0, 0.0)})
    assert w.one_by_one == 0 and crew.pace == pytest.approx(0.0025)
    w._pace(ran, {5: [(0, 4), (1, 4)]}, {5: (1.0, [0.01, 0.5], 0.0, 0.0)})
    assert w.one_by_one == windows.WINDOW
