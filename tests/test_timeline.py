"""--timeline and ``distbp timeline``: Chrome trace events, a lane per actor, no two spans overlapping in a lane."""

import json
import os
from collections import defaultdict

import pytest

from distbp import cli
from distbp.tools.timeline import trace
from tests.conftest import train_config

NAMES = {"compute", "wait", "transfer", "wait hash", "sum", "update", "workers", "report", "checkpoint"}


def lanes(events: list[dict]) -> tuple[dict, dict]:
    """The named lanes ((pid, tid) -> name) and each lane's spans, in time order."""
    named = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            spans[(e["pid"], e["tid"])].append(e)
    for lane in spans.values():
        lane.sort(key=lambda e: e["ts"])
    return named, spans


def assert_no_overlap(spans: dict) -> None:
    for lane, events in spans.items():
        for a, b in zip(events, events[1:]):
            assert a["ts"] + a["dur"] <= b["ts"], (lane, a, b)


def test_timeline_has_a_lane_per_actor_and_spans_that_do_not_overlap(ray_session, tmp_path):
    from distbp.loops.sync import train

    config = train_config(tmp_path, timeline=True, servers=2, steps=8, checkpoint_every=3)
    summary = train(config)
    plain = train(train_config(tmp_path, workers=1, steps=8))
    assert summary["weights_sha256"] == plain["weights_sha256"]  # recording spans changes no bit
    assert cli.main(["timeline", config.out]) == 0
    with open(os.path.join(config.out, "timeline.json")) as fh:
        events = json.load(fh)["traceEvents"]
    named, spans = lanes(events)
    assert sorted(named.values()) == ["driver", "server 0", "server 1", "worker 0", "worker 1"]
    assert set(spans) == set(named)  # every span is in a named lane, every lane has spans
    assert_no_overlap(spans)
    assert {e["name"] for lane in spans.values() for e in lane} == NAMES
    by_name = {name: lane for lane, name in named.items()}
    for name in ("worker 0", "worker 1"):  # 8 micro-batches over 2 workers: both compute every step
        assert [e["args"]["step"] for e in spans[by_name[name]] if e["name"] == "compute"] == list(range(1, 9))
    for name in ("server 0", "server 1"):
        for kind in ("sum", "update"):
            assert [e["args"]["step"] for e in spans[by_name[name]] if e["name"] == kind] == list(range(1, 9))
    assert all(e["ts"] >= 0 and e["dur"] > 0 for lane in spans.values() for e in lane)


def test_gaps_are_split_where_the_other_side_ended():
    """Worker: compute of step 1 in [0, 1] s, the server's step 1 in [2, 3], the worker's step 2
    in [4, 5], the server's step 2 in [6, 7] (each: 0.5 s sum, 0.25 s update, 0.25 s hash wait)."""
    records = [{"lane": "worker", "id": 0, "start": 0.0, "end": 1.0, "cpu": 1.0},
               {"lane": "worker", "id": 0, "start": 4.0, "end": 5.0, "cpu": 1.0},
               {"lane": "server", "id": 0, "step": 1, "start": 2.0, "end": 3.0, "sum": 0.5, "update": 0.25, "cpu": 1},
               {"lane": "server", "id": 0, "step": 2, "start": 6.0, "end": 7.0, "sum": 0.5, "update": 0.25, "cpu": 1}]
    _, spans = lanes(trace(records))
    got = {lane: [(e["name"], e["args"]["step"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in events]
           for lane, events in spans.items()}
    assert got[(2, 0)] == [("compute", 1, 0, 1), ("wait", 1, 1, 3), ("transfer", 2, 3, 4), ("compute", 2, 4, 5)]
    assert got[(1, 0)] == [("wait hash", 1, 2, 2.25), ("sum", 1, 2.25, 2.75), ("update", 1, 2.75, 3),
                           ("wait", 2, 3, 5), ("transfer", 2, 5, 6),
                           ("wait hash", 2, 6, 6.25), ("sum", 2, 6.25, 6.75), ("update", 2, 6.75, 7)]


def test_a_worker_idle_for_a_step_waits_through_it():
    """Worker 1 computes steps 1 and 3 only (worker 0, not drawn here, had step 2): it waits until
    the server ends step 2, then the weights travel."""
    server = dict(lane="server", id=0, sum=0.5, update=0.25, cpu=1)
    records = [{"lane": "worker", "id": 1, "start": 0.0, "end": 1.0, "cpu": 1.0},
               {"lane": "worker", "id": 1, "start": 8.0, "end": 9.0, "cpu": 1.0},
               server | {"step": 1, "start": 2.0, "end": 3.0}, server | {"step": 2, "start": 6.0, "end": 7.0},
               server | {"step": 3, "start": 10.0, "end": 11.0}]
    _, spans = lanes(trace(records))
    got = [(e["name"], e["args"]["step"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in spans[(2, 1)]]
    assert got == [("compute", 1, 0, 1), ("wait", 1, 1, 7), ("transfer", 3, 7, 8), ("compute", 3, 8, 9)]


@pytest.mark.parametrize("case", ["missing", "no-timeline", "damaged"])
def test_bad_run_dir_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
        (run / "metrics.jsonl").write_text("")
    if case == "damaged":
        (run / "timeline.jsonl").write_text('{"lane": "nobody"}\n{}\n')
    assert cli.main(["timeline", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distbp: error: ") and err.count("\n") == 1
    assert {"missing": "no such run directory", "no-timeline": "train with --timeline",
            "damaged": "not a timeline"}[case] in err
    assert not (run / "timeline.json").exists()


def test_a_resumed_run_appends_and_its_redone_steps_show_twice(ray_session, tmp_path):
    """Died after step 8 with its checkpoint at 4 (test_report.crashed_after_checkpoint), resumed to 10."""
    from tests.test_report import crashed_after_checkpoint

    config = train_config(tmp_path, timeline=True, steps=8, checkpoint_every=4)
    crashed_after_checkpoint(tmp_path, config, at=4)
    assert cli.main(["train", "--resume", config.out, "--steps", "10"]) == 0
    assert cli.main(["timeline", config.out]) == 0
    with open(os.path.join(config.out, "timeline.json")) as fh:
        named, spans = lanes(json.load(fh)["traceEvents"])
    assert_no_overlap(spans)
    server = {name: lane for lane, name in named.items()}["server 0"]
    assert [e["args"]["step"] for e in spans[server] if e["name"] == "sum"] == [*range(1, 9), *range(5, 11)]
