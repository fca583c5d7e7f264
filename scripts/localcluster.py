"""A 2-node (or N-node) Ray cluster on this machine for scripts/bench.py --nodes, started and
stopped through ``cluster/local_cluster.sh`` so that the benchmark runs on exactly what users
run: real ``ray start`` nodes on 127.0.0.1 with token authentication on.

The cluster gets a state directory and free ports of its own, so it cannot meet another Ray on
the machine; ``stop`` is the script's ``down`` (it signals the recorded pids and their
descendants, never a kill by name) and then checks that every process the nodes had is gone.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local_cluster.sh"
RAY_BIN = Path(sys.executable).parent / "ray"  # the ray of this interpreter


def free_port() -> int:
    """A free TCP port outside Ray's worker port range 10002-19999 (which the script refuses)."""
    while True:
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))  # the GCS binds every interface: test the same
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def clean_env(**extra: str) -> dict:
    """This process's environment without any RAY_* setting (a Ray started in this process sets
    RAY_AUTH_MODE), with this interpreter's ``ray`` first on PATH, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{RAY_BIN.parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _stat(pid: int) -> tuple[str, int, int, str] | None:
    """(state, ppid, session id, start time) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[3]), fields[19]


def family(sessions: set[int], roots: set[int] = frozenset()) -> dict[int, str]:
    """pid -> start time of every live process in ``sessions`` or among ``roots``, and their descendants."""
    procs = {int(e.name): st for e in Path("/proc").iterdir() if e.name.isdigit() and (st := _stat(int(e.name)))}
    mine = {pid for pid, (_, _, sid, _) in procs.items() if sid in sessions or pid in roots}
    grew = True
    while grew:
        more = {pid for pid, (_, ppid, _, _) in procs.items() if ppid in mine and pid not in mine}
        mine |= more
        grew = bool(more)
    return {pid: procs[pid][3] for pid in mine if procs[pid][0] not in "ZX"}


class LocalCluster:
    """``workers`` worker nodes plus a head, ``cpus`` logical CPUs each; a context manager."""

    def __init__(self, workers: int = 1, cpus: int = 2, object_store_bytes: int = 500_000_000):
        self.state = Path(tempfile.mkdtemp(prefix="distbp-bn-", dir="/tmp"))  # short: unix socket paths
        self.workers = workers
        self.gcs_port, dashboard_port = free_port(), free_port()
        self.env = clean_env(DISTBP_CLUSTER_DIR=str(self.state), DISTBP_RAY=str(RAY_BIN),
                             DISTBP_RAY_PORT=str(self.gcs_port), DISTBP_DASHBOARD_PORT=str(dashboard_port),
                             DISTBP_CLIENT_PORT=str(free_port()), DISTBP_HEAD_CPUS=str(cpus),
                             DISTBP_WORKER_CPUS=str(cpus), DISTBP_OBJECT_STORE_BYTES=str(object_store_bytes))
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.jobs_url = f"http://127.0.0.1:{dashboard_port}"  # the dashboard's jobs API
        self.token = ""
        self.started: dict[int, str] = {}

    def run(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """``local_cluster.sh ARGS`` on this cluster (``status``, ``down``, ...)."""
        return subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        done = self.run("up", str(self.workers), timeout=300)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"local_cluster.sh up failed:\n{done.stdout}\n{done.stderr}")
        self.token = (self.state / "auth_token").read_text()
        self.started = family(self.node_pids())

    def node_pids(self) -> set[int]:
        nodes = self.state / "nodes"
        return {int(line.split()[1]) for line in nodes.read_text().splitlines()} if nodes.exists() else set()

    def client_env(self) -> dict[str, str]:
        """What a driver needs in its environment to join: token auth on, this cluster's token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def stop(self) -> list[int]:
        """``down``; returns the pids of the started processes still running (none, normally)."""
        started = {**self.started, **family(self.node_pids())}  # including what the nodes spawned since
        self.run("down", timeout=120)
        left = [pid for pid, start in started.items() if (st := _stat(pid)) and st[3] == start and st[0] not in "ZX"]
        shutil.rmtree(self.state, ignore_errors=True)
        return left

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        left = self.stop()
        if left:
            print(f"warning: processes of the benchmark's cluster survived `down`: {left}", file=sys.stderr)
