"""Workers join and leave a run on a local multi-node Ray cluster; the weights stay the same bits.

    python scripts/elastic_demo.py [--steps 40]
    python scripts/elastic_demo.py --scenario grow|shrink|below-min --out DIR --json   (tests/test_elastic.py)

The cluster is real Ray nodes on this machine (``ray.cluster_utils.Cluster``): a head with one
CPU (the parameter server's) and worker nodes of one CPU each, all on 127.0.0.1, token
authentication on with a token made for the cluster.  The run is ``--workers MIN:MAX`` on it;
at chosen steps a callback adds nodes, or kills one (its raylet and every process of it, as
a crashed machine), and waits until Ray has seen the change, so that what follows does not
depend on timing.  The demo prints the worker count of each step (from metrics.jsonl), the
resizes (summary.json) and the final weights_sha256 beside a fixed-K run's on the same cluster.

Scenarios (each prints one JSON object with ``--json``):

- ``grow``: one worker node, --workers 1:3; two nodes join after step 3;
- ``shrink``: three worker nodes, --workers 1:3; one is killed after step 3;
- ``below-min``: two worker nodes, --workers 2:3, --elastic-timeout 2; one is killed after
  step 3: the run stops with a checkpoint; a node joins and ``distbp train --resume`` finishes.

Everything the script starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

# Before Ray is imported: token auth on, with a token of this cluster's own, and Ray's
# addresses kept on 127.0.0.1 (on Linux Ray otherwise swaps 127.0.0.1 for the routable
# address, where a node started on 127.0.0.1 does not listen).
TOKEN = secrets.token_hex(32)
ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(ENV)
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)

import ray  # noqa: E402
import ray._common.utils  # noqa: E402
import ray._private.utils  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from distbp import Config  # noqa: E402
from distbp.cli import stdout_to_stderr  # noqa: E402
from distbp.errors import RunFailed  # noqa: E402
from distbp.loops.sync import train  # noqa: E402
from distbp.run import metrics  # noqa: E402

NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}
# A lost node is known to the cluster after 3 missed health checks 0.5 s apart (Ray's default: 5 x 3 s).
FAST_FAILURE = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                "health_check_initial_delay_ms": 0}
RUN = dict(dataset="spirals", layers="2,16,16,3", batch_size=60, micro_batch=8, optimizer="adam")
WAIT_S = 60
SETTLE_S = 1.0  # after new workers show alive in Ray, before the run's next step (Events)


class LocalCluster:
    """A head (one CPU: the server's) and one-CPU worker nodes, in a temp dir of their own.

    ``ray.cluster_utils.Cluster`` writes the head's address to Ray's default temp dir, where
    any ``ray.init()`` on this machine would find and join it; that write (and the removal at
    shutdown, which could remove another cluster's) is turned off here.
    """

    def __init__(self, worker_nodes: int):
        self.temp = tempfile.mkdtemp(prefix="distbp-el-", dir="/tmp")  # short: Ray's socket paths live in it
        self.nodes = []
        with _no_address_file():
            self.cluster = Cluster(initialize_head=True, head_node_args={
                **NODE, "include_dashboard": False, "temp_dir": self.temp, "_system_config": FAST_FAILURE})
        self.address = self.cluster.address
        try:
            for _ in range(worker_nodes):
                self.add()
        except BaseException:
            self.shutdown()
            raise

    def add(self) -> None:
        self.nodes.append(self.cluster.add_node(**NODE, temp_dir=self.temp))

    def kill(self) -> None:
        """Kill a worker node that runs a worker and no server (a lost server is another story:
        docs/reliability.md): its raylet and every process of it, at once (SIGKILL)."""
        hosts = {}
        for actor in ray._private.state.actors().values():
            if actor.get("State") == "ALIVE":
                hosts.setdefault(actor.get("Address", {}).get("NodeID"), set()).add(actor.get("ActorClassName"))
        driver = ray.get_runtime_context().get_node_id()  # several raylets share 127.0.0.1: keep the driver's
        node = next(n for n in reversed(self.nodes) if hosts.get(n.node_id) == {"Worker"} and n.node_id != driver)
        self.nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)
        deadline = time.monotonic() + WAIT_S
        while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):  # the cluster saw it go
            assert time.monotonic() < deadline, "the killed node still shows as alive"
            time.sleep(0.1)

    def shutdown(self) -> None:
        try:
            ray.shutdown()  # the runs' driver connection (distbp leaves a Ray it did not start connected)
            with _no_address_file():
                self.cluster.shutdown()
        finally:
            shutil.rmtree(self.temp, ignore_errors=True)


class _no_address_file:
    def __enter__(self):
        self.saved = ray._private.utils.write_ray_address, ray._common.utils.reset_ray_address
        ray._private.utils.write_ray_address = lambda *args, **kwargs: None
        ray._common.utils.reset_ray_address = lambda *args, **kwargs: None

    def __exit__(self, *exc):
        ray._private.utils.write_ray_address, ray._common.utils.reset_ray_address = self.saved


def live_workers() -> int:
    """Worker actors alive in the cluster now (Ray's own table, not the run's)."""
    actors = ray._private.state.actors().values()  # lists actor states without the dashboard
    return sum(1 for a in actors if a.get("ActorClassName") == "Worker" and a.get("State") == "ALIVE")


class Events:
    """A callback: after step ``s``'s line is written, ``plan[s] = (what, want)`` changes the cluster
    (``add N`` nodes, ``kill`` one, or ``wait``), then waits until Ray shows ``want`` live workers
    (the run takes in new ones at its next step boundary; a lost one fails its next task)."""

    def __init__(self, cluster: LocalCluster, plan: dict[int, tuple[str, int]]):
        self.cluster, self.plan, self.log = cluster, dict(plan), []

    def on_step(self, record: dict) -> None:
        event = self.plan.pop(record["step"], None)
        if event is None:
            return
        what, want = event
        if what.startswith("add"):
            for _ in range(int(what.split()[1])):
                self.cluster.add()
        elif what == "kill":
            self.cluster.kill()
        deadline = time.monotonic() + WAIT_S
        while live_workers() != want:
            if time.monotonic() > deadline:
                table = [(a.get("ActorClassName"), a.get("State"), a.get("Address", {}).get("NodeID", "")[:8])
                         for a in ray._private.state.actors().values()]
                raise RuntimeError(f"after '{what}': {live_workers()} live workers, not {want}: {table}")
            time.sleep(0.05)
        if what != "kill":  # the run takes a new worker in once its first call is answered, a moment
            time.sleep(SETTLE_S)  # after Ray shows it alive: give it that moment before the next step
        self.log.append({"after_step": record["step"], "event": what, "live_workers": want})


def run(cluster: LocalCluster, out: str, steps: int, workers, plan: dict, **extra) -> dict:
    """One run on the cluster; returns what the run left in ``out`` (or how it stopped)."""
    config = Config(**RUN, steps=steps, workers=workers, address=cluster.address, out=out, **extra)
    config.validate()
    events = Events(cluster, plan)
    result = {"events": events.log, "out": out}
    try:
        summary = train(config, callbacks=[events])
        result.update(summary={k: summary[k] for k in ("weights_sha256", "resizes", "transport", "steps")})
    except RunFailed as exc:
        result["stopped"] = str(exc)
    result["workers_per_step"] = [r["workers"] for r in metrics.steps(metrics.read(os.path.join(out, metrics.NAME)))]
    return result


def resume_cli(cluster: LocalCluster, out: str) -> dict:
    """``distbp train --resume OUT`` as a user types it, on the cluster: its exit status, stderr, summary."""
    env = {**os.environ, **ENV}
    proc = subprocess.run([sys.executable, "-m", "distbp", "train", "--resume", out, "--address", cluster.address],
                          capture_output=True, text=True, timeout=300, env=env)
    summary = json.loads(proc.stdout) if proc.returncode == 0 else None
    return {"returncode": proc.returncode, "stderr_tail": proc.stderr.strip().splitlines()[-3:],
            "weights_sha256": summary and summary["weights_sha256"]}


def scenario(name: str, out: str, steps: int) -> dict:
    if name == "grow":
        cluster = LocalCluster(worker_nodes=1)
        try:
            return run(cluster, out, steps, "1:3", {3: ("add 2", 3)})
        finally:
            cluster.shutdown()
    if name == "shrink":
        cluster = LocalCluster(worker_nodes=3)
        try:
            return run(cluster, out, steps, "1:3", {1: ("wait", 3), 3: ("kill", 2)})
        finally:
            cluster.shutdown()
    if name == "below-min":
        cluster = LocalCluster(worker_nodes=2)
        try:
            result = run(cluster, out, steps, "2:3", {3: ("kill", 1)}, elastic_timeout=2.0)
            cluster.add()
            result["resumed"] = resume_cli(cluster, out)
            return result
        finally:
            cluster.shutdown()
    raise SystemExit(f"unknown scenario {name!r}")


def demo(root: str, steps: int) -> None:
    with stdout_to_stderr():  # Ray's log lines (a killed raylet's last words) go to stderr, the report to stdout
        cluster = LocalCluster(worker_nodes=1)
        try:
            t0 = time.monotonic()
            plan = {5: ("add 2", 3), 15: ("kill", 2), 25: ("add 1", 3)}
            elastic = run(cluster, os.path.join(root, "elastic"), steps, "1:4", plan)
            fixed = run(cluster, os.path.join(root, "fixed"), steps, 1, {})
            seconds = time.monotonic() - t0
        finally:
            cluster.shutdown()
    print(f"local cluster: a head (the server) and one-CPU worker nodes on 127.0.0.1, token auth on; {steps} steps")
    for event in elastic["events"]:
        print(f"  after step {event['after_step']:>2}: {event['event']:<6} -> {event['live_workers']} live workers")
    counts = elastic["workers_per_step"]
    print("workers per step (--workers 1:4):")
    for i in range(0, len(counts), 20):
        print(f"  steps {i + 1:>2}-{min(i + 20, len(counts)):>2}: {' '.join(map(str, counts[i:i + 20]))}")
    print("resizes:")
    for r in elastic["summary"]["resizes"]:
        print(f"  step {r['step']:>2}: {r['from']} -> {r['to']}  ({r['why']})")
    a, b = elastic["summary"]["weights_sha256"], fixed["summary"]["weights_sha256"]
    print(f"weights_sha256, --workers 1:4 with resizes: {a}")
    print(f"weights_sha256, --workers 1 (fixed):         {b}")
    print(f"same bits: {a == b}   (the two runs and the node changes: {seconds:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--scenario", choices=("grow", "shrink", "below-min"))
    parser.add_argument("--out", help="run directory (--scenario) or root of the runs (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="--scenario: print the result as one JSON object")
    args = parser.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="distbp-elastic-")
    if args.scenario:
        with stdout_to_stderr():
            result = scenario(args.scenario, args.out or os.path.join(root, "run"), args.steps)
        print(json.dumps(result, indent=None if args.json else 2))
    else:
        demo(root, args.steps)


if __name__ == "__main__":
    main()
