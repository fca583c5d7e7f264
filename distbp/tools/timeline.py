"""``distbp timeline RUN_DIR``: a run's ``timeline.jsonl`` (``--timeline``) as ``RUN_DIR/timeline.json``
in the Chrome trace event format, for Perfetto (ui.perfetto.dev) or chrome://tracing.

One lane (a ``pid``/``tid`` pair, named by metadata events) per actor: the driver, each server
``s``, each worker slot ``k``.  Each lane's spans (``ph: "X"``, ``ts``/``dur`` in microseconds
from the run's first recorded moment) follow one another without overlapping:

- worker: ``compute`` (its backprop, as ``WorkerState`` timed it), then ``wait`` (for the other
  workers and the servers, and through steps it had no share of) until the servers end the step
  before its next compute, then ``transfer`` until that compute begins (the new weights reaching
  it and the Ray call);
- server: ``wait`` (for the step's workers), ``transfer`` (from the last worker's compute end to
  the server's step start: the node values reaching it and the Ray call), ``wait hash`` (the
  previous step's gradient hash, on a thread), ``sum``, ``update``;
- driver: ``workers`` (waiting for a step's workers, sending it on), ``report`` (waiting for the
  servers' report of a step), ``checkpoint`` (evaluation and checkpoint).

``transfer`` and ``wait`` are the gaps between measured spans, split at the moments that bound
them; they are exact on one machine (one clock) and as good as the nodes' clocks agree on a cluster.
"""

from __future__ import annotations

import argparse
import bisect
import os

from ..errors import DataError, UsageError, one_line, run_file
from ..run import spans
from ..run.checkpoint import write_json

OUT = "timeline.json"
PIDS = {"driver": 0, "server": 1, "worker": 2}
NAMES = {"driver": "driver", "server": "servers", "worker": "workers"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory written with distbp train --timeline")


def run(ns: argparse.Namespace) -> int:
    print(write(ns.run))
    return 0


# What a record's fields may hold: times are time.time() seconds (so below MAX_TIME: year 5138),
# ids and steps fit the int32/int64 of a trace viewer; anything else is damage, said in one line
# rather than an overflow (1e400 reads as inf, 10**400 as an int no float holds) or a KeyError.
MAX_TIME = 1e11
FIELDS = {"driver": ("step", "name"), "server": ("step", "sum", "update", "cpu"), "worker": ("cpu",)}


def _real(value) -> bool:
    """A number in [0, MAX_TIME): finite (JSON's bools are ints to Python: not numbers here)."""
    return type(value) in (int, float) and 0 <= value < MAX_TIME


def _check(r) -> None:
    """ValueError naming the first field of record ``r`` that is missing or out of range."""
    if not isinstance(r, dict) or r.get("lane") not in PIDS:
        raise ValueError("a record without a lane of " + "/".join(PIDS))
    missing = [k for k in ("id", "start", "end", *FIELDS[r["lane"]]) if k not in r]
    if missing:
        raise ValueError(f"a {r['lane']} record without {missing[0]!r}")
    bad = [k for k in ("start", "end", "sum", "update", "cpu") if k in r and not _real(r[k])]
    for k, limit in (("id", 1 << 31), ("step", 1 << 63)):
        if k == "step" and r["lane"] == "worker" and r.get(k) is None:
            continue  # a timeline written before workers recorded their step
        if not (type(r.get(k)) is int and 0 <= r[k] < limit):
            bad.append(k)
    if r["lane"] == "driver" and not isinstance(r["name"], str):
        bad.append("name")
    if bad:
        raise ValueError(f"a {r['lane']} record whose {bad[0]!r} is {repr(r.get(bad[0]))[:40]}")
    if r["start"] > r["end"]:
        raise ValueError(f"a {r['lane']} record that ends before it starts")


def load(run_dir: str) -> list[dict]:
    """The records of ``run_dir/timeline.jsonl``; UsageError/DataError naming what is wrong."""
    path = run_file(run_dir, spans.NAME, f"no {spans.NAME} (train with --timeline to record one)", UsageError)
    try:
        records = spans.read(path)
        for r in records:
            _check(r)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a timeline ({one_line(exc)})") from None
    except RecursionError:
        raise DataError(f"{path}: not a timeline (a line nested too deeply)") from None
    if not records:
        raise DataError(f"{path}: empty (the run recorded no step)")
    return records


def write(run_dir: str) -> str:
    """``run_dir/timeline.json`` from ``run_dir/timeline.jsonl``; returns its path.  An earlier
    timeline.json is replaced; anything else at that name (a directory, a FIFO, a link) is refused."""
    events = trace(load(run_dir))
    path = os.path.join(run_dir, OUT)
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
        raise UsageError(f"{path}: exists and is not a regular file; move it away to write the timeline")
    try:
        write_json(path, {"traceEvents": events, "displayTimeUnit": "ms"})
    except OSError as exc:
        raise UsageError(f"{path}: cannot write there ({exc.strerror or exc})") from None
    return path


def trace(records: list[dict]) -> list[dict]:
    """Chrome trace events (metadata first, then spans) of a timeline's records."""
    t0 = min(r["start"] for r in records)
    lanes: dict[tuple[str, int], list[tuple[float, float, str, dict]]] = {}
    servers = sorted((r for r in records if r["lane"] == "server"), key=lambda r: r["start"])
    workers = sorted((r for r in records if r["lane"] == "worker"), key=lambda r: r["start"])
    step_of = _steps(servers)
    ends: dict[int, float] = {}  # per step, the last server's end (the latest such step)
    for r in servers:
        ends[r["step"]] = max(ends.get(r["step"], r["end"]), r["end"])
    computed: dict[int, float] = {}  # per step, the last worker's compute end
    for r in workers:  # the step a worker recorded with its span (a timeline of before: inferred)
        r["step"] = r.get("step") or step_of(r["end"])
        if r["step"] is not None:
            computed[r["step"]] = max(computed.get(r["step"], r["end"]), r["end"])

    for r in records:
        if r["lane"] == "driver":
            lanes.setdefault(("driver", 0), []).append((r["start"], r["end"], r["name"], {"step": r["step"]}))
    for r in workers:
        lanes.setdefault(("worker", r["id"]), []).append(
            (r["start"], r["end"], "compute", {"step": r["step"], "cpu_s": r["cpu"]}))
    for r in servers:
        waited = r["end"] - r["start"] - r["sum"] - r["update"]
        a, b = r["start"] + max(waited, 0.0), r["end"] - r["update"]
        lane = lanes.setdefault(("server", r["id"]), [])
        lane += [(r["start"], a, "wait hash", {"step": r["step"]}),
                 (a, b, "sum", {"step": r["step"], "step_cpu_s": r["cpu"]}),
                 (b, r["end"], "update", {"step": r["step"]})]
    for (kind, _), lane in lanes.items():
        lane.sort(key=lambda span: span[0])
        if kind == "worker":
            # waiting (for the rest of its step, and through any step it had no share of), then the
            # weights of the step before its next compute reaching it
            lane[:] = _gaps(lane, lambda prev, nxt: ends.get((nxt[3]["step"] or 0) - 1, ends.get(prev[3]["step"])),
                            ("wait", "transfer"), (0, 1))
        elif kind == "server":
            # waiting for the next step's workers, then their node values reaching it
            lane[:] = _gaps(lane, lambda prev, nxt: computed.get(nxt[3]["step"]), ("wait", "transfer"), (1, 1))

    events = []
    for kind, pid in PIDS.items():
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": NAMES[kind]}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
    for (kind, tid) in sorted(lanes, key=lambda lane: (PIDS[lane[0]], lane[1])):
        name = "driver" if kind == "driver" else f"{kind} {tid}"
        events.append({"ph": "M", "name": "thread_name", "pid": PIDS[kind], "tid": tid, "args": {"name": name}})
    for (kind, tid), lane in lanes.items():
        for start, end, name, args in lane:
            ts, te = round((start - t0) * 1e6), round((end - t0) * 1e6)
            if te > ts:  # a zero-length span draws nothing
                events.append({"ph": "X", "name": name, "cat": kind, "pid": PIDS[kind], "tid": tid, "ts": ts,
                               "dur": te - ts, "args": args})
    return events


def _steps(servers: list[dict]):
    """``end -> step``: a worker's compute that ended at ``end`` was for the step of the first server
    span to start after it (the servers cannot start a step before its workers are done)."""
    starts = [r["start"] for r in servers]

    def step_of(end: float) -> int | None:
        i = bisect.bisect_left(starts, end)
        return servers[i]["step"] if i < len(servers) else None

    return step_of


def _gaps(lane: list, split, names: tuple[str, str], of: tuple[int, int]) -> list:
    """``lane`` with its gaps filled: ``names[0]`` up to ``split(prev, next)`` (when it falls inside
    the gap), ``names[1]`` after it, each of the step of the span before (``of`` 0) or after (1);
    spans are clipped so that none overlaps the one before."""
    out, end = [], None
    for span in lane:
        start, stop, name, args = span
        if end is not None:
            start = max(start, end)
            stop = max(stop, start)
            if start > end:
                cut = split(out[-1], span)
                cut = end if cut is None else min(max(cut, end), start)
                steps = (out[-1][3].get("step"), args.get("step"))
                out.append((end, cut, names[0], {"step": steps[of[0]]}))
                out.append((cut, start, names[1], {"step": steps[of[1]]}))
        out.append((start, stop, name, args))
        end = stop
    return out
