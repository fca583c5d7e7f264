"""The cross-node path on a real 2-node Ray cluster on this machine (token auth on), and
``scripts/bench.py --nodes 2``, which starts and stops a cluster of its own.

One cluster for the module (``cluster`` in tests/conftest.py); each
run is a ``distbp train --address`` process with one worker per node, so the step's vectors
cross between Ray nodes over the actors' authenticated sockets, as between two machines.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_config

from distbp.loops.sync import train

ROOT = Path(__file__).resolve().parents[1]

TRAIN = ["--dataset", "spirals", "--layers", "2,16,16,3", "--workers", "2", "--batch-size", "60",
         "--micro-batch", "8", "--steps", "10", "--optimizer", "momentum", "--checkpoint-every", "2"]

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(sys.platform != "linux", reason="local_cluster.sh uses /proc, setsid and flock"),
]


def run_on(cluster, out: Path, *extra: str) -> dict:
    env = {k: v for k, v in cluster.env.items()} | cluster.client_env()
    proc = subprocess.run([sys.executable, "-m", "distbp", "train", "--address", cluster.address, *TRAIN,
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def local(ray_session, tmp_path_factory):
    """The reference: the same run on the session's one-node Ray, on the reference path (the object store)."""
    tmp = tmp_path_factory.mktemp("local")
    return train(train_config(tmp, workers=2, batch_size=60, micro_batch=8, steps=10, optimizer="momentum",
                              checkpoint_every=2, transport="object-store"))


@pytest.mark.parametrize("transport", ["auto", "object-store"])
def test_across_nodes_the_bits_are_those_of_one_node(cluster, local, tmp_path, transport):
    summary = run_on(cluster, tmp_path / "run", "--transport", transport)
    assert len(set(summary["worker_nodes"])) == 2, summary["worker_nodes"]  # one worker per node
    # --servers auto (the default): a server on each node, so no link carries the whole gradient
    assert summary["servers"] == 2 and summary["config"]["servers"] == 2
    assert len(set(summary["server_nodes"])) == 2, summary["server_nodes"]
    # auto: direct, sockets between the nodes, shared memory between a worker and a server of one node
    assert summary["transport"] == ("direct" if transport == "auto" else transport)
    assert summary["weights_sha256"] == local["weights_sha256"]


def test_a_worker_killed_across_nodes_changes_nothing(cluster, local, tmp_path):
    summary = run_on(cluster, tmp_path / "run", "--fault-injection", "kill-worker:1@4,kill-server@7")
    assert summary["transport"] == "direct"
    assert summary["faults"]["workers_lost"] == 1 and summary["faults"]["server_restarts"] >= 1
    # more than one when the killed worker took with it node values a server of its node had not
    # read yet (its memfd dies with it): that server fails the step its peer applied, and the
    # servers, which then disagree, restart from the checkpoint (docs/reliability.md)
    assert summary["weights_sha256"] == local["weights_sha256"]


def test_a_server_on_each_node_mixes_shared_memory_and_sockets_with_the_same_bits(cluster, local, tmp_path):
    """--servers 2 across 2 nodes: each worker has a server of its node (shared memory) and one
    of the other node (its socket); killing a worker and a server on the way changes nothing."""
    summary = run_on(cluster, tmp_path / "run", "--servers", "2",
                     "--fault-injection", "kill-worker:0@4,kill-server@7")
    assert summary["transport"] == "direct"
    assert len(set(summary["server_nodes"])) == 2  # a server on each node (a replaced worker goes where Ray puts it)
    assert summary["faults"]["workers_lost"] == 1 and summary["faults"]["server_restarts"] >= 1  # as above
    assert summary["weights_sha256"] == local["weights_sha256"]


def test_servers_on_nodes_of_their_own_keep_the_bits(cluster, local, tmp_path):
    """--server-resource: the servers go only to nodes offering the resource (here the worker
    node's ``worker_node_1``, one unit: --servers auto makes one server); the bits do not move."""
    summary = run_on(cluster, tmp_path / "run", "--server-resource", "worker_node_1")
    assert summary["servers"] == 1 and summary["config"]["server_resource"] == "worker_node_1"
    assert summary["weights_sha256"] == local["weights_sha256"]
    ask = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
           "print(*[n['NodeID'] for n in ray.nodes() if n['Alive'] and 'worker_node_1' in n['Resources']])")
    node = subprocess.run([sys.executable, "-c", ask % cluster.address], capture_output=True, text=True, timeout=120,
                          env=cluster.env | cluster.client_env()).stdout.split()
    assert summary["server_nodes"] == node, (summary["server_nodes"], node)


def test_bench_nodes_2_runs_and_stops_what_it_started(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--nodes", "2",
                           "--layers", "32,64,10", "--configs", "float32:256", "--steps", "3", "--warmup", "2",
                           "--no-ddp", "--transports", "direct", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every process it started is gone" in proc.stderr
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["distbp"]["transport"] == "direct" and len(set(run["distbp"]["worker_nodes"])) == 2
    assert run["breakdown"]["phases_ms"]["compute"] > 0
    assert "| float32 B=256 direct |" in proc.stdout
