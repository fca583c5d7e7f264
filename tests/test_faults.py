"""Lost workers, a lost server, stragglers and divergence: the run ends with the fault-free bits.

Each faulty run is compared with one fault-free run of the same options, step by step: the
same number of steps, the same summed-gradient hash at every step (so no sample was dropped
or counted twice), the same final weights_sha256.  Every run takes the path users get by
default (the direct transport: most steps in windows, a stalled step one by one through the
crew, where its share is backed up).
"""

import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
from conftest import step_lines, train_config

from distbp import cli
from distbp.distributed import crew, windows
from distbp.distributed.actors import ParameterServer, Worker
from distbp.distributed.servers import ServerFailed, Servers
from distbp.distributed.transport import ObjectStore
from distbp.faults import Action, parse
from distbp.lecture import tree
from distbp.lecture.network import Layout, Network
from distbp.lecture.optim import Hyper
from distbp.loops.sync import train
from distbp.run import checkpoint
from distbp.step import plan
from distbp.step.outcome import Decision, Outcome, decide
from distbp.step.server import NonFiniteGradient, ServerState

STEPS = 30


@pytest.fixture(scope="module")
def clean(ray_session, tmp_path_factory):
    """The fault-free run every faulty one must reproduce, and its per-step gradient hashes."""
    summary = train(train_config(tmp_path_factory.mktemp("clean"), steps=STEPS))
    return summary, [e["grad_xxh3"] for e in step_lines(summary["out"])]


def assert_same_run(summary, clean) -> None:
    want, grads = clean
    lines = step_lines(summary["out"])
    assert [e["step"] for e in lines] == list(range(1, STEPS + 1))
    assert [e["grad_xxh3"] for e in lines] == grads  # every step summed every sample, once
    assert summary["weights_sha256"] == want["weights_sha256"]
    assert summary["faults"]["redo_mismatches"] == 0


def test_injected_worker_kills_lose_no_sample(clean, tmp_path):
    summary = train(train_config(tmp_path, workers=3, steps=STEPS,
                                 fault_injection="kill-worker:1@5,kill-worker:2@5,kill-worker:0@17"))
    assert_same_run(summary, clean)
    assert summary["faults"]["workers_lost"] == 3
    # the kills struck inside windows of steps: each window was called off and its rest redone
    assert summary["windows"]["called_off"] >= 2


def test_the_object_store_runs_the_same_windows_through_the_same_faults(clean, tmp_path):
    """--transport object-store: a worker killed inside a window, then a server: each window is
    called off through Ray (``ParameterServer.ask``), its rest redone, to the default path's bits."""
    summary = train(train_config(tmp_path, workers=2, steps=STEPS, transport="object-store",
                                 fault_injection="kill-worker:1@5,kill-server@12", checkpoint_every=5))
    assert_same_run(summary, clean)
    assert summary["faults"]["workers_lost"] == 1 and summary["faults"]["server_restarts"] == 1
    assert summary["windows"]["called_off"] >= 2 and summary["windows"]["one_by_one"] == 0

def test_worker_process_killed_by_pid_from_outside(clean, tmp_path):
    """SIGKILL of a real worker process, found through Ray's actor table, while the run goes on."""
    config = train_config(tmp_path, workers=2, steps=STEPS, fault_injection="delay-worker:0@20:2")
    job = ray.get_runtime_context().get_job_id()
    killed = []

    def kill_one_worker():
        path = os.path.join(config.out, "metrics.jsonl")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.exists(path) and sum(1 for _ in open(path)) >= 10:
                actors = ray._private.state.actors().values()  # the only place that lists actor pids
                pids = [a["Pid"] for a in actors
                        if a["ActorClassName"] == "Worker" and a["State"] == "ALIVE" and a["JobID"] == job]
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    summary = train(config)
    killer.join()
    assert killed and summary["faults"]["workers_lost"] == 1
    assert_same_run(summary, clean)


@pytest.mark.parametrize("spec, checkpoint_every", [
    ("kill-server@12", 5),  # back to the checkpoint of step 10; steps 11 and 12 redone
    ("kill-server@3", 0),  # before any checkpoint: back to the initial weights
])
def test_lost_server_restarts_from_the_latest_checkpoint(clean, tmp_path, spec, checkpoint_every):
    summary = train(train_config(tmp_path, workers=2, steps=STEPS, fault_injection=spec,
                                 checkpoint_every=checkpoint_every))
    assert_same_run(summary, clean)  # the steps after the checkpoint were redone, to the same hashes
    assert summary["faults"]["server_restarts"] == 1
    # the server died inside a window: the steps it had applied there died with it, unreported,
    # so none of them was logged twice
    assert summary["windows"]["called_off"] == 1 and summary["faults"]["steps_redone"] == 0


@pytest.mark.parametrize("where", ["report", "window"])
def test_lost_inputs_on_a_live_server_resume_from_its_own_step_count(clean, tmp_path, monkeypatch, where):
    """A step's inputs or report lost while the server lives (as when a node holding objects dies):
    the driver asks the server how many steps it holds and goes on from there.  Had it sent a
    step again, the server would refuse it (ServerState.step) and the run would fail."""
    calls = {"n": 0}
    # the servers' results (reports, snapshots) are fetched by Servers.get; a window of steps
    # ends with what it applied and what failed (Windows.run)
    owner, name = (Servers, "get") if where == "report" else (windows.Windows, "run")
    original = getattr(owner, name)

    def fails_once(self, *args):
        calls["n"] += 1
        if calls["n"] == 8 and where == "report":
            raise ServerFailed("simulated: report lost")
        result = original(self, *args)
        if calls["n"] == 1 and where == "window":  # the servers applied its steps, then it failed
            return result[0], result[1], ServerFailed("simulated: window's inputs lost")
        return result

    monkeypatch.setattr(owner, name, fails_once)
    summary = train(train_config(tmp_path, workers=2, steps=STEPS))
    assert calls["n"] > (8 if where == "report" else 1)
    assert_same_run(summary, clean)
    assert summary["faults"]["steps_redone"] == 0 and "server_restarts" not in summary["faults"]


def test_straggler_work_is_taken_over_without_dropping_samples(clean, tmp_path, monkeypatch):
    """Worker 1 stalls 2 s at step 4: worker 0 redoes its share at once (with stealing) or the
    step waits for it (without).  Either way every sample counts, and the bits match."""
    def longest_step(summary) -> float:
        times = [e["time"] for e in step_lines(summary["out"])]
        return max(b - a for a, b in zip(times, times[1:]))

    spec = "delay-worker:1@4:2"
    stealing = train(train_config(tmp_path, workers=2, steps=STEPS, fault_injection=spec))
    monkeypatch.setattr(plan, "LATE_FACTOR", 1e9)  # never late: no backups
    waiting = train(train_config(tmp_path, workers=2, steps=STEPS, fault_injection=spec))
    assert_same_run(stealing, clean)
    assert_same_run(waiting, clean)
    assert stealing["faults"]["backups"] >= 1 and "backups" not in waiting["faults"]
    assert longest_step(waiting) >= 2.0
    assert longest_step(stealing) < 1.0


def test_divergence_stops_at_the_step_and_keeps_the_last_good_checkpoint(ray_session, tmp_path, capsys):
    """Steps one by one (the object store) and in windows (the direct transport: windows of 2
    steps between the checkpoints) stop at the same step, with the same words."""
    stopped = []
    for transport in ("object-store", "direct"):
        out = str(tmp_path / transport)
        code = cli.main(["train", "--layers", "2,16,3", "--loss", "squared", "--activation", "identity",
                         "--optimizer", "sgd", "--lr", "100", "--reduction", "sum", "--dtype", "float32",
                         "--batch-size", "60", "--micro-batch", "8", "--steps", "40", "--checkpoint-every", "2",
                         "--transport", transport, "--out", out])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1
        assert err[-1].startswith("distbp: error: training diverged at step ")
        step = int(err[-1].split("at step ")[1].split(":")[0])
        saved = checkpoint.load(os.path.join(out, "checkpoint.npz"))
        assert saved["step"] < step and np.isfinite(saved["weights"]).all()
        assert f"(step {saved['step']})" in err[-1]
        assert not os.path.exists(os.path.join(out, "summary.json"))
        stopped.append(err[-1].replace(out, "OUT"))
    assert stopped[0] == stopped[1]


def test_server_refuses_a_non_finite_gradient_and_a_replayed_step():
    net = Network((2, 3, 2), seed=0)
    server = ServerState(net.flat.copy(), Hyper("adam"), net.layout.bias_mask(net.dtype))
    good = np.ones((1, net.flat.size))
    server.step(1, [[(0, 0)]], [good], 0.1, 1, None)
    after_one = server.weights.copy()
    bad = good.copy()
    bad[0, 3] = np.nan
    with pytest.raises(NonFiniteGradient, match="step 2"):
        server.step(1, [[(0, 0)]], [bad], 0.1, 2, None)
    with pytest.raises(ValueError, match="has applied 1 steps"):
        server.step(1, [[(0, 0)]], [good], 0.1, 1, None)  # step 1 again: never applied twice
    assert server.t == 1 and np.array_equal(server.weights, after_one)
    assert all(np.isfinite(buf).all() for buf in server.state.values())


def test_a_refused_step_reaches_the_workers_as_divergence(ray_session):
    """Ray hands a task whose argument failed that failure (a RayTaskError that is also the
    server's NonFiniteGradient); the actor task itself never runs, so nothing is applied."""
    layers = (2, 3, 2)
    net = Network(layers, seed=0)
    layout = Layout(layers)
    transport = ObjectStore(layout.size, net.dtype, servers=1)
    server = ParameterServer.remote(0, net.flat, Hyper("sgd"), layout.bias_mask(net.dtype), transport)
    X = np.zeros((4, 2))
    worker = Worker.remote(layers, "tanh", "cross-entropy", net.dtype, X, np.zeros(4, dtype=np.int64), 2,
                           transport)
    nan = np.full((1, layout.size), np.nan)
    refused = server.step.remote(1, [[(0, 0)]], 0.1, 1, None, nan)
    nodes = tree.blocks([0, 1], 2)
    values, info = worker.compute.options(num_returns=2).remote(2, np.arange(4), nodes, refused)
    with pytest.raises(Exception) as caught:
        ray.get(info)
    assert crew.outcome_of(caught.value, worker=True) is Outcome.DIVERGED
    assert decide(Outcome.DIVERGED) is Decision.STOP_DIVERGED
    after = server.step.remote(2, [nodes], 0.1, 1, None, values)  # depends on the failure
    with pytest.raises(NonFiniteGradient):
        ray.get(after)
    assert ray.get(server.step_count.remote()) == 0
    assert np.array_equal(ray.get(server.weights.remote()).weights, net.flat)
    ray.kill(server)
    ray.kill(worker)


def test_an_actor_killed_by_rays_memory_monitor_is_a_lost_actor():
    """Ray's memory monitor kills the process of a call with OutOfMemoryError, which is no
    RayActorError: the crew takes it as the loss of that actor (a worker's share is redone, a
    server is recovered), not as a bug that ends the run with a traceback."""
    from ray.exceptions import OutOfMemoryError

    killed = OutOfMemoryError("Task was killed due to the node running low on memory.")
    assert crew.outcome_of(killed, worker=True) is Outcome.WORKER_LOST
    assert crew.outcome_of(killed, worker=False) is Outcome.SERVER_LOST
    assert decide(Outcome.WORKER_LOST) is Decision.REDO_SHARE


def test_fault_spec():
    faults = parse("kill-worker:1@5, delay-worker:0@7:2.5,kill-server@9", workers=2)
    assert [str(f) for f in faults] == ["kill-worker:1@5", "delay-worker:0@7:2.5", "kill-server@9"]
    assert [f.action for f in faults] == [Action.KILL, Action.DELAY, Action.KILL]
    assert parse(None, 2) == [] and parse("", 2) == []
