"""A real 2-node Ray cluster on this machine (cluster/local_cluster.sh), with a job through the jobs API.

One cluster for the module (``cluster`` in tests/conftest.py): a head and one worker node on
free ports and in a state directory of its own, so it cannot meet another Ray on the machine.
test_down_stops_exactly_what_up_started stops it with the script's own `down` and checks that
every process it started is gone; the fixture stops it again whatever happened (a no-op when
nothing is up).  The last test checks that distbp's own local Ray listens on loopback only.
"""

import ipaddress
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import clean_env, family, train_config

from distbp.loops.sync import train

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).parent / "ray"  # the ray of this interpreter, not whatever is on PATH
TRAIN = ["--dataset", "spirals", "--layers", "2,16,16,3", "--workers", "2", "--batch-size", "60",
         "--micro-batch", "8", "--steps", "10"]
JOB_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(sys.platform != "linux", reason="local_cluster.sh uses /proc, setsid and flock"),
]


def still_running(snapshot: dict[int, str]) -> list[int]:
    """Pids of ``snapshot`` that are still the same, non-zombie process."""
    left = []
    for pid, started in snapshot.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[19] == started and fields[0] not in "ZX":
            left.append(pid)
    return left


def listening(pids: set[int]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses on which any of ``pids`` has a listening TCP socket (from /proc/net)."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                host = fields[1].split(":")[0]  # 32-bit words, each little-endian
                raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, len(host), 8))
                found.add(ipaddress.ip_address(raw))
    return found


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def test_cluster_has_two_nodes_with_token_auth(cluster):
    proc = subprocess.run([str(RAY_BIN), "status", "--address", cluster.address], capture_output=True, text=True,
                          timeout=60, env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token))
    assert proc.returncode == 0, proc.stderr
    active = proc.stdout.split("Active:")[1].split("Pending:")[0]
    assert active.count("node_") == 2


def test_job_spreads_workers_over_both_nodes_and_matches_a_local_run(cluster, ray_session, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "job-run"  # the driver runs on the head, which is this machine
    client = JobSubmissionClient(cluster.jobs_url, headers={"Authorization": f"Bearer {cluster.token}"})
    # The repository as working_dir, as `ray job submit --working-dir .` does: .rayignore and
    # .gitignore keep .venv/ (CI makes one in the repository), runs/, data/ and .git/ behind.
    job = client.submit_job(
        entrypoint="ls -A | sed 's/^/uploaded: /' && exec python -m distbp train --address auto "
                   + " ".join(TRAIN) + f" --out {out}",
        runtime_env={"working_dir": str(ROOT)},
    )
    # The reference, in this process's own local Ray, while the job runs.
    local = train(train_config(tmp_path, workers=2, batch_size=60, micro_batch=8, steps=10, transport="object-store"))

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (status := client.get_job_status(job)).is_terminal():
        assert time.monotonic() < deadline, f"job {job} still {status} after {JOB_TIMEOUT_S} s"
        time.sleep(1)
    log = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, log

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["worker_nodes"]) == 2
    assert len(set(summary["worker_nodes"])) == 2, summary["worker_nodes"]  # one worker per node
    assert summary["weights_sha256"] == local["weights_sha256"]
    # across nodes the vectors went over the actors' authenticated sockets; locally through the object store
    assert (summary["transport"], local["transport"]) == ("direct", "object-store")
    assert local["worker_nodes"][0] not in summary["worker_nodes"]  # the job really ran elsewhere
    # The job's log ends with the summary the CLI prints, a JSON object from a line "{" on.
    lines = log.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    printed = json.loads("\n".join(lines[start:lines.index("}", start) + 1]))
    assert printed["weights_sha256"] == summary["weights_sha256"] and printed["out"] == str(out)
    uploaded = {line.removeprefix("uploaded: ") for line in lines if line.startswith("uploaded: ")}
    assert {"distbp", "pyproject.toml"} <= uploaded
    assert not uploaded & {".venv", "runs", "data", ".git", "__pycache__"}, uploaded


def test_client_without_the_token_is_refused(cluster, tmp_path):
    home = clean_env(HOME=str(tmp_path))  # no ~/.ray/auth_token either
    proc = subprocess.run([str(RAY_BIN), "status", "--address", cluster.address], capture_output=True, text=True,
                          timeout=60, env=home)
    assert proc.returncode != 0
    assert "AuthenticationError" in proc.stderr + proc.stdout

    def get_jobs(headers: dict) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{cluster.jobs_url}/api/jobs/", headers=headers),
                                        timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get_jobs({}) == 401
    assert get_jobs({"Authorization": "Bearer " + "0" * 64}) == 403
    assert get_jobs({"Authorization": f"Bearer {cluster.token}"}) == 200


@pytest.mark.parametrize("auth", [{}, {"RAY_AUTH_MODE": "token"},
                                  {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}],
                         ids=["no-auth", "token-mode-without-token", "wrong-token"])
def test_train_without_the_right_token_exits_2_with_one_line(cluster, tmp_path, auth):
    out = tmp_path / "never"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "distbp", "train", "--address", cluster.address, *TRAIN,
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env=clean_env(HOME=str(tmp_path), **auth))
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distbp: error:"), proc.stderr
    assert "RAY_AUTH_MODE=token" in lines[0] and "RAY_AUTH_TOKEN" in lines[0]
    assert seconds < 20, f"took {seconds:.1f} s; ray.init alone retries a bad token for ~25 s"
    assert not out.exists()


def test_down_stops_exactly_what_up_started(cluster, ray_session):
    sessions = cluster.node_pids()
    assert len(sessions) == 2
    started = family(sessions)
    assert len(started) > 2  # the two `ray start --block` plus the raylets, GCS, dashboard, ... they spawned
    proc = cluster.run("down", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert still_running(started) == []
    assert family(sessions) == {}
    # ... and nothing else: this process's own local Ray still answers.
    assert ray_session.get(ray_session.put(7)) == 7
    assert cluster.run("status", timeout=60).returncode == 1  # "no local cluster is up"


def test_default_local_ray_listens_on_loopback_only(tmp_path):
    """`distbp train` without an address: its private Ray (GCS, raylet, actors) keeps to 127.0.0.1."""
    out = tmp_path / "local"
    proc = subprocess.Popen([sys.executable, "-m", "distbp", "train", *TRAIN, "--steps", "1000000", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=clean_env(HOME=str(tmp_path)))  # its token goes to tmp_path/.ray
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "training did not start within 120 s"
            time.sleep(0.5)
        started = family(set(), {proc.pid})
        addresses = listening(set(started))
    finally:
        proc.terminate()  # SIGTERM: stops at the next step boundary and shuts its Ray down
        proc.communicate(timeout=60)
    assert len(addresses) >= 1, "found no listening socket of the run's Ray"
    assert all(is_loopback(a) for a in addresses), sorted(map(str, addresses))
    deadline = time.monotonic() + 30
    while still_running(started) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert still_running(started) == []  # its Ray went with it
