"""Chaos: SIGKILLs of random actors (busy workers, idle workers, servers) at random steps,
several per run, and busy workers stopped for seconds (SIGSTOP) inside windows of steps.
Every run must still end (``train`` returns) with its summary.json and the fault-free bits:
the same weights_sha256 and the same summed-gradient hash at every step.

A background thread watches metrics.jsonl (``metrics.read``) to know how far the run is, and
kills processes with ``os.kill(pid, SIGKILL)`` from outside, as an OOM killer or a lost node
would.  It tells busy from idle workers by the driver's own view (which worker slots have
work in flight: a task of a step one by one, ``Crew.running``, or a share of the window of steps
under way, ``Windows.busy``: the default transport runs most steps in windows), and finds each
actor's pid in Ray's actor table.  The plan of each run (when, and what kind of actor) comes from a seeded ``random``,
so the runs are reproducible up to timing; the weights must not depend on timing at all.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter

import pytest
import ray
from conftest import step_lines

from distbp import Config
from distbp.distributed import crew as crew_module
from distbp.distributed import windows as windows_module
from distbp.errors import DataError
from distbp.loops.sync import train
from distbp.run import metrics

STEPS = 24
# 15 micro-batches a step over the workers; a checkpoint every 3 steps for the servers to restart from
BASE = dict(dataset="spirals", layers="2,32,32,3", batch_size=120, micro_batch=8, steps=STEPS, optimizer="adam",
            checkpoint_every=3)
# one micro-batch a step (batch < micro-batch): one worker computes, the others idle
IDLE = dict(BASE, batch_size=60, micro_batch=64)
KINDS = ("busy-worker", "idle-worker", "server")
STALL_S = 4.0  # a "stall": a busy worker stopped (SIGSTOP) this long, then let go on (SIGCONT)
RUNS = [(2, 1, 11), (3, 1, 12), (2, 2, 13), (3, 2, 14), (3, 1, 15)]  # K workers, S servers, seed of the plan
FIND_S = 3.0  # how long the killer looks for an actor of the planned kind before giving the kill up

TOTALS: Counter = Counter()  # runs, and kills by kind


@pytest.fixture(scope="module", autouse=True)
def report_totals():
    yield
    kinds = ", ".join(f"{TOTALS[k]} {k}" for k in (*KINDS, "stall"))
    print(f"\nchaos: {TOTALS['runs']} runs, {TOTALS['kills']} SIGKILLs ({kinds}); "
          f"{TOTALS['at-the-end']} after the last step's line; {TOTALS['missed']} planned kills found no target")


@pytest.fixture
def crews(monkeypatch) -> list:
    """Every Crew and Windows the loop makes, as it makes them: the driver's view of which worker
    is busy (``busy_slots``)."""
    made = []
    for cls in (crew_module.Crew, windows_module.Windows):
        def init(self, *args, original=cls.__init__, **kwargs):
            original(self, *args, **kwargs)
            made.append(self)
        monkeypatch.setattr(cls, "__init__", init)
    return made


def busy_slots(made: list) -> set[int]:
    """The worker slots with work in flight: a task of a step one by one, or a share of a window."""
    busy = set()
    for seen in made:
        busy |= set(seen.busy if isinstance(seen, windows_module.Windows) else seen.running)
    return busy


@pytest.fixture(scope="module")
def clean(ray_session, tmp_path_factory):
    """The fault-free run's weights_sha256 and per-step gradient hashes, by options and S: the
    weights are the same for any K and S, a step's hash (of S ranges) for any K."""
    made = {}

    def reference(options: dict, servers: int) -> tuple[str, list[str]]:
        key = (json.dumps(options, sort_keys=True), servers)
        if key not in made:
            out = str(tmp_path_factory.mktemp("clean") / "run")
            summary = train(Config(**options, workers=2, servers=servers, out=out))
            made[key] = summary["weights_sha256"], [e["grad_xxh3"] for e in step_lines(out)]
        return made[key]

    return reference


class Chaos(threading.Thread):
    """Carries out ``plan`` (``(step, kind)`` pairs, steps increasing) against the run writing to
    ``out``: once metrics.jsonl reaches ``step``, SIGKILL one actor of ``kind``."""

    def __init__(self, out: str, plan: list[tuple[int, str]], crews: list, rng: random.Random):
        super().__init__(daemon=True)
        self.out, self.plan, self.crews, self.rng = out, plan, crews, rng
        self.kills: list[tuple[int, str, int]] = []  # (step reached, kind, pid)
        self.missed: list[tuple[int, str]] = []
        self.at_the_end = 0  # kills after the last step's line was written
        self.done = threading.Event()  # set when train has returned

    def progress(self) -> int:
        """The last step in metrics.jsonl (a line still being written is skipped by ``read``)."""
        try:
            return max((r["step"] for r in metrics.read(os.path.join(self.out, "metrics.jsonl"))), default=0)
        except (DataError, FileNotFoundError):
            return 0

    def run(self) -> None:
        for step, kind in self.plan:
            while self.progress() < step and not self.done.is_set():
                time.sleep(0.003)
            pid = None if self.done.is_set() else self.victim("busy-worker" if kind == "stall" else kind)
            if pid is None:
                self.missed.append((step, kind))
                continue
            if kind == "stall":  # a straggler: its share must be backed up, not waited for
                os.kill(pid, signal.SIGSTOP)
                threading.Timer(STALL_S, go_on, (pid,)).start()
            else:
                os.kill(pid, signal.SIGKILL)
            reached = self.progress()
            self.kills.append((reached, kind, pid))
            self.at_the_end += reached >= STEPS

    def victim(self, kind: str) -> int | None:
        """The pid of a live actor of ``kind``, looked for until one turns up (a worker is busy only
        while its share is in flight), or None."""
        deadline = time.monotonic() + FIND_S
        while time.monotonic() < deadline and not self.done.is_set():
            if not self.crews:
                time.sleep(0.003)
                continue
            crew = [c for c in self.crews if isinstance(c, crew_module.Crew)][-1]
            try:
                running, starting = busy_slots(self.crews), set(crew.pool.starting)
            except RuntimeError:  # changed size while we read it: read again
                continue
            if kind == "server":
                candidates = list(crew.servers.actors)
            else:
                slots = range(len(crew.pool.actors))
                busy = kind == "busy-worker"
                candidates = [crew.pool.actors[k] for k in slots if (k in running) == busy and k not in starting]
            killed = {pid for _, _, pid in self.kills}  # Ray may not have noticed yet
            pids = [pid for pid in map(alive_pid, candidates) if pid and pid not in killed]
            if pids:
                return self.rng.choice(pids)
            time.sleep(0.001)
        return None


def go_on(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # killed meanwhile, or its run ended
        pass


def alive_pid(handle) -> int | None:
    """The process of an actor that is up (not one still starting, nor one already dead)."""
    entry = ray._private.state.actors(actor_id=handle._actor_id.hex())  # lists actor pids (test_faults.py)
    return entry["Pid"] if entry and entry.get("State") == "ALIVE" and entry.get("Pid") else None


def plan_for(rng: random.Random) -> list[tuple[int, str]]:
    """Two to four kills at random steps at least three apart (so that each recovery is under
    way before the next kill), each of a random kind."""
    plan, step = [], 1
    for _ in range(rng.randint(2, 4)):
        step += rng.randint(3, 6)
        if step > STEPS:
            break
        plan.append((step, rng.choice(KINDS)))
    return plan


def run_with_chaos(config: Config, plan: list[tuple[int, str]], crews: list, rng: random.Random) -> tuple[dict, Chaos]:
    chaos = Chaos(config.out, plan, crews, rng)
    chaos.start()
    try:
        summary = train(config)
    finally:
        chaos.done.set()
        chaos.join(timeout=FIND_S + 5)
    TOTALS["runs"] += 1
    TOTALS["kills"] += len(chaos.kills)
    TOTALS["missed"] += len(chaos.missed)
    TOTALS["at-the-end"] += chaos.at_the_end
    TOTALS.update(kind for _, kind, _ in chaos.kills)
    print(f"\n  chaos K={config.workers} S={config.servers}: plan {plan}, kills {chaos.kills}, missed {chaos.missed}")
    return summary, chaos


def assert_fault_free(summary: dict, clean: tuple[str, list[str]]) -> None:
    """summary.json written, every step summed every sample once, the fault-free weights."""
    weights, grads = clean
    with open(os.path.join(summary["out"], "summary.json")) as fh:
        written = json.load(fh)
    assert written["weights_sha256"] == summary["weights_sha256"]
    lines = step_lines(summary["out"])
    assert [e["step"] for e in lines] == list(range(1, STEPS + 1))
    assert [e["grad_xxh3"] for e in lines] == grads
    assert summary["weights_sha256"] == weights
    assert summary["faults"].get("redo_mismatches", 0) == 0


@pytest.mark.parametrize("workers, servers, seed", RUNS)
def test_random_sigkills_of_random_actors_leave_the_fault_free_result(clean, crews, tmp_path, workers, servers, seed):
    rng = random.Random(seed)
    plan = plan_for(rng)
    config = Config(**BASE, workers=workers, servers=servers, out=str(tmp_path / "run"))
    reference = clean(BASE, servers)  # before the chaos: the fault-free run, unharmed
    summary, chaos = run_with_chaos(config, plan, crews, rng)
    assert chaos.kills, f"no kill landed (plan {plan}, missed {chaos.missed}): the test proved nothing"
    assert_fault_free(summary, reference)
    if any(kind == "busy-worker" for _, kind, _ in chaos.kills):  # a share in flight was lost: redone
        assert summary["windows"]["called_off"] + summary["faults"].get("micro_batches_redone", 0) > 0


def test_idle_workers_killed_mid_run_and_at_the_last_step_do_not_cost_the_summary(clean, crews, tmp_path):
    """Issue 13, 1a: the end of a run must not depend on any actor being alive.  One worker of
    three computes each step's single micro-batch; idle ones die mid-run, as the last step is
    finishing (its line of step STEPS - 1 is written once step STEPS is with the servers) and
    after the last step's line."""
    rng = random.Random(21)
    plan = [(STEPS // 2, "idle-worker"), (STEPS - 1, "idle-worker"), (STEPS, "idle-worker")]
    config = Config(**IDLE, workers=3, servers=1, out=str(tmp_path / "run"))
    reference = clean(IDLE, 1)
    summary, chaos = run_with_chaos(config, plan, crews, rng)
    assert chaos.kills and chaos.kills[0][0] < STEPS, f"the mid-run kill did not land: {chaos.kills}"
    assert_fault_free(summary, reference)
    # the victims were idle: no share of any step was lost with them, so nothing was redone
    assert summary["windows"]["steps"] > 0 and summary["windows"]["called_off"] == 0
    assert "micro_batches_redone" not in summary["faults"]


def test_stalls_inside_windows_are_backed_up_among_kills(clean, crews, tmp_path):
    """Busy workers stopped for STALL_S in the middle of windows of steps, and a kill between:
    the fault-free bits, and no step waits for a stopped worker."""
    rng = random.Random(31)
    plan = [(5, "stall"), (11, "busy-worker"), (17, "stall")]
    config = Config(**BASE, workers=3, servers=1, out=str(tmp_path / "run"))
    reference = clean(BASE, 1)
    summary, chaos = run_with_chaos(config, plan, crews, rng)
    assert [kind for _, kind, _ in chaos.kills].count("stall") == 2, f"the stalls did not land: {chaos.kills}"
    assert_fault_free(summary, reference)
    times = [e["time"] for e in step_lines(summary["out"])]
    slowest = max(b - a for a, b in zip(times, times[1:]))
    assert slowest < STALL_S / 2, f"a step took {slowest:.2f} s: a stopped worker's share was waited for"


def test_a_node_holding_the_server_lost_then_its_worker_killed(ray_session, tmp_path):
    """Node loss in the chaos: the node of the server goes at step 25 (tests/test_node_loss.py's
    cluster), then the worker's process is SIGKILLed twice; the fault-free bits at the end."""
    from test_node_loss import fault_free, lose_the_servers_node

    report = lose_the_servers_node(tmp_path, spare=2, wait_s=90, then=(400, 800))
    assert report["rc"] == 0, report["err"]
    assert report["restarts"] == 1 and report["kills"] == [400, 800], report
    assert report["faults"].get("workers_lost", 0) >= 1, report
    assert report["weights"] == fault_free(tmp_path)
