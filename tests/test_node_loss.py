"""A lost node that held the parameter server: the server comes back on another node from the
latest checkpoint, to the fault-free bits; with no CPU for it anywhere the run waits
--elastic-timeout, then stops at its checkpoint with one line, and --resume finishes it.

The cluster is Ray's own ``ray.cluster_utils.Cluster`` (a head without CPUs and nodes added and
removed in one process), driven from a child process: the test session's Ray is another one.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    out, spare, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3]  # spare: CPUs left for a server on the workers' node
    then = [int(step) for step in sys.argv[4].split(",") if step]  # also SIGKILL the worker at these steps
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 4))
    np.savez(f"{out}/d.npz", X=X, y=(X[:, 0] + X[:, 1] > 0).astype(np.int64))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    server_node = cluster.add_node(num_cpus=1)  # the only CPU when the run places its server
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    # 1500 steps: the run is still going when the node goes (kill at step 25), whatever the timing
    args = ["--dataset", f"npz:{out}/d.npz", "--layers", "4,16,2", "--workers", "1", "--batch-size", "60",
            "--micro-batch", "10", "--steps", "1500", "--checkpoint-every", "100", "--elastic-timeout", wait,
            "--servers", "1", "--address", cluster.address]

    def train(name, *more):
        return subprocess.Popen([sys.executable, "-m", "distbp", "train", *args, "--out", f"{out}/{name}", *more],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    begun, run = time.time(), train("killed")
    while not any(p["state"] == "CREATED" for p in ray.util.placement_group_table().values()):
        assert time.time() - begun < 60, run.poll()
        time.sleep(0.2)
    cluster.add_node(num_cpus=1 + spare)  # the worker's node
    log = f"{out}/killed/metrics.jsonl"
    while not (os.path.exists(log) and sum(1 for _ in open(log)) >= 25):
        assert time.time() - begun < 120, run.poll()
        time.sleep(0.05)
    cluster.remove_node(server_node, allow_graceful=False)
    kills = []
    for step in then:  # more faults after the node's loss: the worker's process, as chaos would
        while run.poll() is None and sum(1 for _ in open(log)) < step:
            time.sleep(0.02)
        pids = [a["Pid"] for a in ray._private.state.actors().values()
                if a.get("State") == "ALIVE" and a.get("ActorClassName") == "Worker" and a.get("Pid")]
        if pids:
            os.kill(pids[0], 9)
            kills.append(step)
    _, err = run.communicate(timeout=200)
    report = {"rc": run.returncode, "err": err.strip().splitlines()[-1] if err.strip() else ""}
    if run.returncode != 0:  # no CPU for the server: a node comes, and --resume goes on
        cluster.add_node(num_cpus=1)
        resumed = subprocess.run([sys.executable, "-m", "distbp", "train", "--resume", f"{out}/killed"],
                                 capture_output=True, text=True, timeout=200)
        report["resume_rc"] = resumed.returncode
    summary = json.load(open(f"{out}/killed/summary.json"))
    report.update(weights=summary["weights_sha256"], restarts=summary["faults"].get("server_restarts", 0),
                  faults=summary["faults"], resizes=summary["resizes"], kills=kills)
    print("REPORT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()
""")


def lose_the_servers_node(tmp_path, spare: int, wait_s: int, then: tuple[int, ...] = ()) -> dict:
    """``wait_s``: --elastic-timeout (Ray notices a lost node and places its bundle again within
    about 10-20 s here); ``then``: steps at which the worker's process is killed after that."""
    child = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), str(spare), str(wait_s),
                              ",".join(map(str, then))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                                  "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})  # every node on 127.0.0.1
    try:
        out, err = child.communicate(timeout=540)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 0, err[-3000:]
    return json.loads([line for line in out.splitlines() if line.startswith("REPORT ")][-1][len("REPORT "):])


def fault_free(tmp_path) -> str:
    """The weights of the same run without a fault (the same bits on any cluster: one node here)."""
    from distbp import Config
    from distbp.loops.sync import train

    return train(Config(dataset=f"npz:{tmp_path}/d.npz", layers="4,16,2", workers=1, batch_size=60, micro_batch=10,
                        steps=1500, checkpoint_every=100, out=str(tmp_path / "ref")))["weights_sha256"]


def test_a_server_lost_with_its_node_comes_back_on_another_node(ray_session, tmp_path):
    report = lose_the_servers_node(tmp_path, spare=1, wait_s=90)
    assert report["rc"] == 0, report["err"]
    assert report["restarts"] == 1 and report["weights"] == fault_free(tmp_path)


def test_with_no_cpu_for_the_server_the_run_stops_at_its_checkpoint_in_one_line(ray_session, tmp_path):
    report = lose_the_servers_node(tmp_path, spare=0, wait_s=8)
    assert report["rc"] != 0 and "could not be restarted within 8 s" in report["err"], report
    assert "continue with: distbp train --resume" in report["err"] and report["err"].startswith("distbp: error:")
    assert report["resume_rc"] == 0 and report["weights"] == fault_free(tmp_path)
