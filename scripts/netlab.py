#!/usr/bin/env python3
"""The network lab: distbp and PyTorch DDP side by side over shaped links between network namespaces.

    sudo .venv/bin/python scripts/netlab.py --nodes 2 --rate 1gbit --json lab.json
    sudo .venv/bin/python scripts/netlab.py --rate 1gbit,100mbit --no-ddp     # several rates, one lab
    sudo .venv/bin/python scripts/netlab.py --cleanup                         # what a killed run left

What it builds, every name starting with ``netlab-<run id>-``:

- a *hub* namespace, which plays the switch and holds the Ray head (0 CPUs: no actor lands
  there) and the drivers, and N *node* namespaces, each with one Ray worker node;
- one veth pair per node namespace, ``labI`` in the hub (198.18.I.1/24) and ``lab0`` in the
  node namespace (198.18.I.2/24, a route to 198.18.0.0/15 through the hub), the RFC 2544
  benchmark range; the hub forwards between its links (``ip_forward`` of the hub only);
- a token bucket on both ends of every link (``tc qdisc replace dev IF root tbf rate RATE
  burst 256kb latency 20ms``), so a byte from one node to another crosses two shaped egresses.

The head sits in a namespace of its own rather than in the root one because Ray's GCS and
raylets listen on every interface of their namespace: there they reach nothing but the lab's
links, and the root namespace is not touched at all (no interface, route, sysctl or qdisc).

distbp runs as users run it (``python -m distbp train --address HEAD``) with one worker per
node namespace (the head has no CPUs; workers go out with Ray's SPREAD) and, by default, one
server per node namespace (``--servers N``: the servers' placement group is SPREAD too), so each
worker meets one server locally (shared memory) and the others over the shaped links.  With
``--server-nodes M`` the servers go to M namespaces of their own instead, each a Ray node with no
CPU for a worker and a ``lab_server`` resource (``distbp train --server-resource lab_server``):
BytePS's layout, where each worker node's link carries P each way per step.  DDP is
``scripts/baselines/ddp_baseline.py``'s ``rank_main``, rank I in node namespace I, gloo on
``lab0`` (``GLOO_SOCKET_IFNAME``), rendezvous through the baseline's FileStore (so MASTER_ADDR,
set to rank 0's address, is not read), at Ray's worker niceness as in scripts/bench.py.

Under its table it prints what the cost model (``distbp.tools.nodemodel``) predicts for each
run, term by term, the machine's cores shared out over the lab's nodes, with this machine's
backprop rate on one core, measured before the lab is built (``probe``: distbp's worker
compute, ``distbp.tools.corerate``, and the DDP baseline's, ``ddp_baseline.core_gflops``), in
place of the constants measured on another CPU; ``--json`` keeps both.

Teardown (also after Ctrl-C, SIGTERM or a crash) stops the ``ray start --block`` processes it
started by pid, then kills by pid whatever still runs inside the lab's namespaces (``ip netns
pids``), deletes those namespaces (their veths and qdiscs go with them) and its temp dir.
Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN); without it: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from localcluster import RAY_BIN, clean_env  # noqa: E402

PREFIX = "netlab-"
NODE_IF = "lab0"  # the veth end inside every node namespace (each namespace has its own names)
SERVER_RESOURCE = "lab_server"  # what a --server-nodes namespace's Ray node offers, one unit a server
RAY_WORKER_NICENESS = 15  # Ray runs its workers at nice 15; DDP's ranks run at the same
TBF = ("burst", "256kb", "latency", "20ms")


class NoPrivileges(Exception):
    """The lab cannot be built here (not root, no ``ip``/``tc``, ``ip netns add`` refused)."""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


def free_port() -> int:
    """A free TCP port outside Ray's worker range 10002-19999 (each namespace has its own ports; the
    lab's namespaces are fresh, so a port free here is free there)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def lab_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of the network namespaces whose name starts with ``prefix``."""
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(prefix)]


def netns_pids(ns: str) -> list[int]:
    return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]


def kill_namespace(ns: str, grace: float = 0.0) -> None:
    """SIGTERM (after ``grace`` seconds of waiting for them to end by themselves), then SIGKILL,
    every process inside ``ns``, by pid; then delete the namespace (its links go with it)."""
    deadline = time.monotonic() + grace
    while netns_pids(ns) and time.monotonic() < deadline:
        time.sleep(0.25)
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        pids = [p for p in netns_pids(ns) if p != os.getpid()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while netns_pids(ns) and time.monotonic() < end:
            time.sleep(0.1)
    sh("ip", "netns", "del", ns, check=False)


def cleanup(prefix: str = PREFIX) -> list[str]:
    """``--cleanup``: remove every namespace (and its processes) and temp dir a lab run left."""
    gone = lab_namespaces(prefix)
    for ns in gone:
        kill_namespace(ns)
    for d in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        shutil.rmtree(d, ignore_errors=True)
    return gone


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise NoPrivileges("needs root (network namespaces, veths, tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NoPrivileges(f"'{tool}' is not installed")


class Lab:
    """N node namespaces joined by shaped veths to a hub namespace, a Ray node in each; a context manager."""

    def __init__(self, nodes: int, object_store_bytes: int = 300_000_000, cpus_per_node: int = 2,
                 server_nodes: int = 0, servers_per_server_node: int = 1):
        """``server_nodes``: namespaces of their own for the servers (--server-nodes): each a Ray node of
        ``servers_per_server_node`` CPUs offering as many units of ``SERVER_RESOURCE``, and no worker."""
        self.run_id = secrets.token_hex(3)
        self.name = f"{PREFIX}{self.run_id}"
        self.hub = f"{self.name}-hub"
        self.nodes = [f"{self.name}-n{i}" for i in range(1, nodes + 1)]
        self.server_nodes = [f"{self.name}-s{i}" for i in range(1, server_nodes + 1)]
        self.servers_per_server_node = servers_per_server_node
        self.made: list[str] = []  # namespaces that exist, in the order made
        self.procs: list[tuple[int, str, str]] = []  # (pid, start time, namespace) of each `ray start --block`
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))  # short: Ray's unix socket paths
        self.token = secrets.token_hex(32)
        self.gcs_port = free_port()
        self.address = f"{self.hub_ip(1)}:{self.gcs_port}"
        self.object_store_bytes = object_store_bytes
        self.cpus_per_node = cpus_per_node
        self.rate: str | None = None

    @staticmethod
    def hub_ip(i: int) -> str:
        return f"198.18.{i}.1"

    @staticmethod
    def node_ip(i: int) -> str:
        return f"198.18.{i}.2"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every Ray process of the lab: token auth on, this lab's token."""
        return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                         RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5", **extra)

    # ------------------------------------------------------------ links
    def build(self) -> None:
        done = sh("ip", "netns", "add", self.hub, check=False)
        if done.returncode != 0:
            raise NoPrivileges(f"'ip netns add' failed: {done.stderr.strip() or 'no permission'}")
        self.made.append(self.hub)
        sh("ip", "-n", self.hub, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", self.hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")  # the hub's own
        for i, ns in enumerate(self.nodes + self.server_nodes, start=1):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # both ends made straight inside their namespaces: nothing of the lab ever sits in the root one
            sh("ip", "link", "add", f"lab{i}", "netns", self.hub, "type", "veth", "peer", "name", NODE_IF,
               "netns", ns)
            sh("ip", "-n", self.hub, "addr", "add", f"{self.hub_ip(i)}/24", "dev", f"lab{i}")
            sh("ip", "-n", ns, "addr", "add", f"{self.node_ip(i)}/24", "dev", NODE_IF)
            sh("ip", "-n", self.hub, "link", "set", f"lab{i}", "up")
            sh("ip", "-n", ns, "link", "set", NODE_IF, "up")
            sh("ip", "-n", ns, "route", "add", "198.18.0.0/15", "via", self.hub_ip(i))

    def links(self) -> list[tuple[str, str]]:
        """(namespace, interface) of both ends of every link."""
        return [end for i, ns in enumerate(self.nodes + self.server_nodes, start=1)
                for end in ((self.hub, f"lab{i}"), (ns, NODE_IF))]

    def shape(self, rate: str) -> None:
        """Both ends of every link: a token bucket of ``rate`` (any tc rate: 1gbit, 100mbit, ...)."""
        for ns, dev in self.links():
            sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, *TBF)
        self.rate = rate

    def bytes_sent(self) -> int:
        """Bytes through the token buckets of every link end so far (proof that a run used the links)."""
        total = 0
        for ns, dev in self.links():
            out = sh("tc", "-n", ns, "-s", "qdisc", "show", "dev", dev, check=False).stdout
            total += sum(int(line.split()[1]) for line in out.splitlines() if line.strip().startswith("Sent "))
        return total

    # ------------------------------------------------------------ Ray
    def start_node(self, ns: str, name: str, *options: str) -> None:
        log = open(self.tmp / f"{name}.log", "w")
        cmd = ["ip", "netns", "exec", ns, str(RAY_BIN), "start", "--block", "--disable-usage-stats",
               "--object-store-memory", str(self.object_store_bytes), "--temp-dir", str(self.tmp / name),
               "--dashboard-agent-listen-port", str(free_port()), *options]
        # `ip netns exec` execs the command: the pid is the `ray start` process, leader of its own session
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env(), start_new_session=True)
        log.close()
        self.procs.append((proc.pid, start_time(proc.pid), ns))
        deadline = time.monotonic() + 120
        while "block forever" not in (self.tmp / f"{name}.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.tmp / f"{name}.log").read_text()[-1500:]
                raise RuntimeError(f"Ray node {name} did not start; its log ends:\n{tail}")
            time.sleep(0.25)

    def start_ray(self) -> None:
        """The head in the hub (no CPUs, no dashboard), then one worker node per node namespace,
        one after the other (several at once on a small machine can starve Ray's start-up timeouts)."""
        self.start_node(self.hub, "head", "--head", "--node-ip-address", self.hub_ip(1), "--port",
                        str(self.gcs_port), "--num-cpus", "0", "--include-dashboard", "false")
        for i, ns in enumerate(self.nodes, start=1):
            self.start_node(ns, f"n{i}", "--address", self.address, "--node-ip-address", self.node_ip(i),
                            "--num-cpus", str(self.cpus_per_node), "--resources", json.dumps({f"lab_node_{i}": 1}))
        k = self.servers_per_server_node
        for i, ns in enumerate(self.server_nodes, start=len(self.nodes) + 1):
            self.start_node(ns, f"s{i}", "--address", self.address, "--node-ip-address", self.node_ip(i),
                            "--num-cpus", str(k), "--resources", json.dumps({SERVER_RESOURCE: k}))
        want = len(self.nodes) + len(self.server_nodes) + 1
        deadline = time.monotonic() + 60
        while (alive := self.alive_nodes()) < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {alive} of {want} Ray nodes registered; logs in {self.tmp}")
            time.sleep(1)

    def alive_nodes(self) -> int:
        done = subprocess.run(["ip", "netns", "exec", self.hub, str(RAY_BIN), "status", "--address", self.address],
                              capture_output=True, text=True, env=self.env(), timeout=60)
        active = done.stdout.partition("Active:")[2].partition("Pending:")[0]
        return sum(" node_" in line for line in active.splitlines())

    # ------------------------------------------------------------ teardown
    def stop(self) -> dict:
        """Stop what this lab started and remove what it made; returns what is left (nothing, normally)."""
        for pid, st, _ in self.procs:
            if start_time(pid) == st:
                os.kill(pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
        for ns in reversed(self.made):
            kill_namespace(ns, grace=15.0 if ns == self.hub else 5.0)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.leftovers()

    def leftovers(self) -> dict:
        return {"namespaces": [ns for ns in lab_namespaces(self.name)],
                "pids": [pid for pid, st, _ in self.procs if start_time(pid) == st],
                "temp_dir": self.tmp.exists()}


def start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


# ---------------------------------------------------------------- the two contenders
def train_args(args, address: str | None, out: str) -> list[str]:
    """``distbp train`` options of a lab run; without ``address``, the same run on a local Ray (same bits)."""
    d_in, d_out = args.layers.split(",")[0], args.layers.split(",")[-1]
    n = args.batch_size * (args.warmup + args.steps + 2)  # one epoch holds every step: no evaluation inside
    argv = ["--dataset", f"random:{n},{d_in},{d_out}", "--layers", args.layers, "--activation", "tanh",
            "--loss", "cross-entropy", "--workers", str(args.nodes),
            "--servers", str(args.servers or args.server_nodes or args.nodes),
            "--batch-size", str(args.batch_size), "--steps", str(args.warmup + args.steps + 1),
            "--optimizer", "sgd", "--lr", "0.01", "--reduction", "mean", "--dtype", args.dtype, "--seed", "0",
            "--threads-per-worker", "1", "--out", out]
    if args.server_nodes:  # BytePS's layout: the servers on namespaces of their own
        argv += ["--server-resource", SERVER_RESOURCE]
    if args.micro_batch:
        argv += ["--micro-batch", str(args.micro_batch)]
    return argv + (["--address", address] if address else [])


def run_distbp(lab: Lab, args) -> dict:
    """``python -m distbp train --address HEAD`` from the hub; samples/s from metrics.jsonl's times over
    the timed steps as a whole (as scripts/bench.py's ``trainer_run``: windows of steps make single step
    times uneven), the last step left out."""
    out = str(lab.tmp / f"distbp-{lab.rate}")
    cmd = ["ip", "netns", "exec", lab.hub, sys.executable, "-m", "distbp", "train", *train_args(args, lab.address, out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=lab.env(PYTHONPATH=str(REPO)),
                          timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"distbp train failed ({done.returncode}):\n{done.stderr[-2000:]}")
    summary = json.loads(Path(out, "summary.json").read_text())
    times = [r["time"] for r in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines())
             if "loss" in r and "step" in r]
    step = (times[-2] - times[args.warmup]) / (len(times) - 2 - args.warmup)
    if len(set(summary["worker_nodes"])) < args.nodes:
        raise RuntimeError(f"distbp's workers are not on distinct nodes: {summary['worker_nodes']}")
    return {"step_ms": step * 1e3, "samples_per_second": args.batch_size / step,
            "weights_sha256": summary["weights_sha256"], "transport": summary.get("transport"),
            "worker_nodes": summary["worker_nodes"], "server_nodes": summary.get("server_nodes"),
            "micro_batch": summary.get("micro_batch")}


DDP_RANK = """
import argparse, json, sys
sys.path.insert(0, sys.argv[1])
import ddp_baseline
class Result:
    def put(self, median):
        print(json.dumps({"median_s": median}), flush=True)
a = json.loads(sys.argv[2])
ddp_baseline.rank_main(a.pop("rank"), argparse.Namespace(**a), a["store"], Result())
"""


def run_ddp(lab: Lab, args) -> dict:
    """``ddp_baseline.rank_main``: rank I in node namespace I, gloo on its veth, the same network and batch."""
    store = str(lab.tmp / f"ddp-store-{lab.rate}")
    procs = []
    for rank, ns in enumerate(lab.nodes):
        options = {"rank": rank, "workers": len(lab.nodes), "layers": args.layers, "batch_size": args.batch_size,
                   "dtype": args.dtype, "threads": 1, "steps": args.steps, "warmup": args.warmup, "store": store}
        env = {**os.environ, "GLOO_SOCKET_IFNAME": NODE_IF, "MASTER_ADDR": lab.node_ip(1), "MASTER_PORT": "29500"}
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-c", DDP_RANK, str(REPO / "scripts" / "baselines"),
               json.dumps(options)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      preexec_fn=lambda: os.nice(RAY_WORKER_NICENESS)))
    outs = [p.communicate(timeout=args.timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"a DDP rank failed ({p.returncode}):\n{err[-2000:]}")
    median = json.loads(outs[0][0].strip().splitlines()[-1])["median_s"]
    return {"step_ms": median * 1e3, "samples_per_second": args.batch_size / median}


# ---------------------------------------------------------------- the model beside the measurement
def gbit_of(rate: str) -> float | None:
    """A tc rate in bits (``1gbit``, ``100mbit``, ``500kbit``) in Gbit/s; None for another unit."""
    match = re.fullmatch(r"([0-9.]+)([kmg]?)bit", rate.strip().lower())
    if match is None:
        return None
    return float(match.group(1)) * {"k": 1e-6, "m": 1e-3, "g": 1.0, "": 1e-9}[match.group(2)]


def probe(args) -> dict[str, float]:
    """This machine's backprop rate on one core, GFLOP/s, as each contender computes a worker's
    rows of a step (B / N): distbp's worker (micro-batches of M, one BLAS thread) and, unless
    ``--no-ddp``, the DDP baseline's torch on one thread.  Measured before the lab starts, on an
    idle machine: the model's compute (``model``)."""
    from distbp.config import Config
    from distbp.tools.corerate import core_gflops

    layers = tuple(int(x) for x in args.layers.split(","))
    rows = -(-args.batch_size // args.nodes)
    rates = {"distbp": core_gflops(layers, args.dtype, rows, args.micro_batch or Config.micro_batch)}
    if not args.no_ddp:
        sys.path.insert(0, str(REPO / "scripts" / "baselines"))
        import ddp_baseline
        rates["ddp"] = ddp_baseline.core_gflops(list(layers), args.dtype, rows)
    return rates


def model(args, rate: str, micro_batch: int | None, rates: dict[str, float]) -> dict | None:
    """What ``distbp.tools.nodemodel`` predicts for this lab run, term by term, in ms: distbp's
    step (``ps_step``: the servers on the worker nodes, or on ``--server-nodes`` of their own) and
    DDP's (``ring_step``), each with its own backprop rate on this machine (``probe``).  The lab's
    nodes share this machine's cores: each gets its share."""
    from dataclasses import replace

    from distbp.lecture.network import Layout
    from distbp.tools.nodemodel import Constants, ps_step, ring_step

    gbit = gbit_of(rate)
    if gbit is None:
        return None
    layers = [int(x) for x in args.layers.split(",")]
    P, N, itemsize = Layout(layers).size, args.nodes, 4 if args.dtype == "float32" else 8
    cores = max(1, (os.cpu_count() or 1) // (N + args.server_nodes))
    S = args.servers or args.server_nodes or N
    rate = f"gflops_core_{'fp32' if itemsize == 4 else 'fp64'}"
    c = replace(Constants(), **{rate: rates["distbp"]})
    ps = ps_step(N, cores, S, P, args.batch_size, itemsize, gbit, c, colocated=not args.server_nodes, M=micro_batch,
                 layers=tuple(layers))
    ring = ring_step(N, cores, P, args.batch_size, itemsize, gbit,
                     replace(Constants(), **{rate: rates.get("ddp", rates["distbp"])}))
    ms = {key: value * 1e3 for key, value in ps.items() if key != "busy"}
    return {"distbp": ms, "ddp": {key: value * 1e3 for key, value in ring.items()}, "cores_per_node": cores,
            "gflops_core": rates}


# ---------------------------------------------------------------- main
def table(results: list[dict], args) -> str:
    ddp = not args.no_ddp
    head = ["rate", "distbp step ms", "model ms", "distbp samples/s"] + \
        (["DDP step ms", "model ms", "DDP samples/s", "distbp/DDP"] if ddp else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        predicted = r.get("model") or {}
        guess = {who: f"{predicted[who]['step']:.1f}" if who in predicted else "-" for who in ("distbp", "ddp")}
        cells = [r["rate"], f"{r['distbp']['step_ms']:.1f}", guess["distbp"],
                 f"{r['distbp']['samples_per_second']:.0f}"]
        if ddp:
            cells += [f"{r['ddp']['step_ms']:.1f}", guess["ddp"], f"{r['ddp']['samples_per_second']:.0f}",
                      f"{r['ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    terms = [f"{r['rate']}: distbp " + ", ".join(f"{k} {v:.1f}" for k, v in r["model"]["distbp"].items()) +
             "; DDP " + ", ".join(f"{k} {v:.1f}" for k, v in r["model"]["ddp"].items())
             for r in results if r.get("model")]
    if terms:
        lines += ["", f"model (distbp.tools.nodemodel, ms, {results[0]['model']['cores_per_node']} core(s) a node): " +
                  " | ".join(terms)]
    return "\n".join(lines)


def on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: teardown runs


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2, help="node namespaces, one Ray worker node and one worker each")
    ap.add_argument("--rate", default="1gbit", help="tc rate of every link; a comma-separated list runs each")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--layers", default="784,1024,1024,10", help="layer sizes (scripts/bench.py's default model)")
    ap.add_argument("--batch-size", type=int, default=1024, help="the global batch B")
    ap.add_argument("--micro-batch", type=int, default=None, help="M (default: distbp's)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--servers", type=int, default=None,
                    help="S (default: one per node namespace, or one per --server-nodes namespace)")
    ap.add_argument("--server-nodes", type=int, default=0, metavar="M",
                    help="M namespaces of their own for the servers, their links shaped alike (BytePS's layout: "
                         "distbp train --server-resource); DDP runs on the N worker namespaces only")
    ap.add_argument("--no-ddp", action="store_true", help="distbp only")
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    ap.add_argument("--timeout", type=float, default=600, help="seconds each contender may take")
    ap.add_argument("--cleanup", action="store_true",
                    help=f"remove what killed runs left (namespaces {PREFIX}*, their processes, temp dirs) and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.nodes < 2:
        ap.error("--nodes must be at least 2")
    if args.server_nodes < 0 or (args.servers is not None and args.servers < max(1, args.server_nodes)):
        ap.error("--server-nodes must be at least 0, and --servers at least 1 and at least --server-nodes")
    if args.steps < 2:
        ap.error("--steps must be at least 2")
    try:
        check_privileges()
        if args.cleanup:
            gone = cleanup()
            print(f"netlab: removed {len(gone)} namespace(s){': ' + ' '.join(gone) if gone else ''}")
            return 0
        if not args.no_ddp:
            try:
                import torch  # noqa: F401
            except ImportError:
                print("netlab: torch is not installed: DDP is left out", file=sys.stderr, flush=True)
                args.no_ddp = True
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
        servers = args.servers or args.server_nodes or args.nodes
        if args.server_nodes:  # the worker namespaces hold their worker only; the servers spread over theirs
            lab = Lab(args.nodes, cpus_per_node=1, server_nodes=args.server_nodes,
                      servers_per_server_node=-(-servers // args.server_nodes))
        else:
            lab = Lab(args.nodes, cpus_per_node=1 + -(-servers // args.nodes))  # its worker and its share of servers
        try:
            return measure(lab, args)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
            left = lab.stop()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for s, h in previous.items():
                signal.signal(s, h)
            print(f"netlab: teardown: {'everything it made is gone' if not any(left.values()) else f'LEFT {left}'}",
                  file=sys.stderr, flush=True)
    except NoPrivileges as exc:
        print(f"netlab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netlab: interrupted", file=sys.stderr)
        return 130


def measure(lab: Lab, args) -> int:
    rates = probe(args)
    print("netlab: backprop on one core here: " + ", ".join(f"{who} {v:.0f} GFLOP/s" for who, v in rates.items()),
          file=sys.stderr, flush=True)
    t0 = time.monotonic()
    lab.build()
    lab.start_ray()
    servers = f" + {len(lab.server_nodes)} server namespaces" if lab.server_nodes else ""
    print(f"netlab: {lab.name}: hub + {len(lab.nodes)} node namespaces{servers}, Ray up in "
          f"{time.monotonic() - t0:.1f}s (head {lab.address})", file=sys.stderr, flush=True)
    results = []
    for rate in args.rate.split(","):
        lab.shape(rate)
        sent = lab.bytes_sent()
        run = {"rate": rate, "distbp": run_distbp(lab, args)}
        run["model"] = model(args, rate, run["distbp"]["micro_batch"], rates)
        run["distbp"]["link_bytes"], sent = lab.bytes_sent() - sent, lab.bytes_sent()
        if not args.no_ddp:
            run["ddp"] = run_ddp(lab, args)
            run["ddp"]["link_bytes"] = lab.bytes_sent() - sent
            run["ratio"] = run["distbp"]["samples_per_second"] / run["ddp"]["samples_per_second"]
        results.append(run)
        print(f"netlab: {rate}: distbp {run['distbp']['samples_per_second']:.0f}/s" +
              (f", DDP {run['ddp']['samples_per_second']:.0f}/s, ratio {run['ratio']:.2f}" if "ddp" in run else ""),
              file=sys.stderr, flush=True)
    text = table(results, args)
    print(text)
    if args.json:
        made = {"run_id": lab.run_id, "namespaces": list(lab.made), "links": lab.links(),
                "procs": [[pid, st] for pid, st, _ in lab.procs], "temp_dir": str(lab.tmp)}
        Path(args.json).write_text(json.dumps({"args": vars(args), "cores": os.cpu_count(), "lab": made,
                                               "runs": results, "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
