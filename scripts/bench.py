#!/usr/bin/env python3
"""Throughput of distbp beside single-process numpy and PyTorch DDP, measured in one run.

    python scripts/bench.py --out bench.json                 # K=2, the four configs of issue 6
    python scripts/bench.py --workers 1 --configs float64:256 # K=1 against numpy on 1 thread
    python scripts/bench.py --nodes 2 --out bench-2n.json     # across 2 Ray nodes, against DDP

With ``--nodes 2`` the script first starts a 2-node Ray cluster on this machine with
``cluster/local_cluster.sh`` (127.0.0.1, token auth on, a state directory and free ports of its
own), runs distbp on it with one worker per node (for each ``--transports`` path) beside DDP
over gloo (K processes on loopback), and stops exactly the processes it started (by pid,
``local_cluster.sh down``; checked) however the run ends.  No numpy column there: the question
across nodes is DDP.

For each config (dtype, global batch B) and each round, one after the other:

- ``numpy``: ``scripts/baselines/numpy_baseline.py``, the plain single-process step, with every
  core (and with K threads when K is less than the cores: each distbp worker runs BLAS on one
  thread, so with K=1 the fair comparison is numpy on one thread);
- ``ddp``: ``scripts/baselines/ddp_baseline.py``, K processes of one thread over gloo (only when
  torch imports: ``pip install -e ".[reference]"``; without it one line on stderr says the
  column is left out);
- ``distbp``: the real ``distbp.loops.sync.train`` on random data (SGD, mean reduction), its
  samples/s from the step times in ``metrics.jsonl``;
- the breakdown: the sync loop's steps on a ``Session`` (``Windows`` as ``loops/sync.py``
  drives them, without metrics and checkpoints) with wall-clock timestamps
  from the workers and the server, and the CPU time and page faults of every process per step;
- once per round, the Ray call floor: the same pattern of actor calls with no compute and no
  data (``floor_run``), the least a step costs while each step goes through Ray's task calls.

Every figure is the median over the steps after warm-up; with ``--rounds R`` the table shows
the median over rounds of each figure and of each ratio.  The machine may be shared, so only
ratios measured side by side mean much.  The baselines run at Ray's worker niceness
(``--baseline-nice``), so that on a busy machine every contender computes at the same priority.
The baselines import nothing from distbp, so that a change in distbp cannot move its yardsticks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "scripts" / "baselines"  # numpy_baseline.py and ddp_baseline.py
LAYERS = "784,1024,1024,10"
RAY_WORKER_NICENESS = 15  # Ray's default (RAY_worker_niceness): its worker processes run at nice 15
PHASES = ("compute", "broadcast", "grad_transfer", "server_sum", "update", "other")


def baseline(script: Path, nice: int, **options) -> dict:
    """Run one reference script at niceness ``nice`` and return the JSON line it prints."""
    cmd = [sys.executable, str(script)] + [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # DDP's gloo listens on loopback only, as Ray does here
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                          preexec_fn=lambda: os.nice(nice))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_config(dtype: str, batch: int, args, out: str | None, address: str | None = None,
                transport: str = "auto"):
    from distbp import Config

    # One epoch holds every step, so no evaluation or checkpoint falls inside the timed steps.
    n = batch * (args.warmup + args.steps + 2)
    config = Config(dataset=f"random:{n},{args.layers.split(',')[0]},{args.layers.split(',')[-1]}",
                    layers=args.layers, activation="tanh", loss="cross-entropy",
                    workers=args.workers, batch_size=batch, steps=args.warmup + args.steps + 1,
                    optimizer="sgd", lr=0.01, reduction="mean", dtype=dtype, seed=0, out=out, address=address,
                    transport=transport, servers=args.servers, threads_per_worker=args.threads_per_worker)
    if args.micro_batch:
        config.micro_batch = args.micro_batch
    config.validate()
    return config


def trainer_run(config, warmup: int) -> dict:
    """``distbp.loops.sync.train`` itself: samples/s from the times of metrics.jsonl, over the
    timed steps as a whole (the last, which ends the run, left out): with windows of steps
    (distributed/windows.py) the steps inside a window are closer together than the window's
    own Ray calls, so a median of step times would leave those out."""
    from distbp.loops.sync import train
    from distbp.run import metrics

    summary = train(config)
    times = [r["time"] for r in metrics.steps(metrics.read(os.path.join(config.out, metrics.NAME)))]
    step = (times[-2] - times[warmup]) / (len(times) - 2 - warmup)
    return {"step_ms": step * 1e3, "samples_per_second": config.batch_size / step,
            "micro_batch": config.micro_batch, "weights_sha256": summary["weights_sha256"],
            "transport": summary["transport"], "worker_nodes": summary["worker_nodes"],
            "server_nodes": summary.get("server_nodes"), "windows": summary.get("windows")}


@contextlib.contextmanager
def windows_of(steps: int):
    """``--transports NAME/W``: the sync loop's windows hold at most W steps (1: a window a step,
    with Ray calls each) for this run; 0 leaves distbp's own (distributed/windows.py)."""
    from distbp.distributed import windows

    default = windows.WINDOW
    windows.WINDOW = steps or default
    try:
        yield
    finally:
        windows.WINDOW = default


def breakdown_run(config, warmup: int) -> dict:
    """The sync loop's steps (``Windows`` on a ``Session``, as ``loops/sync.py`` drives them)
    with per-step timestamps from the actors, split into phases, and the CPU time of each process.

    For step t, with ``S_end(t-1)`` the time the server returned the weights and ``k`` the
    worker that finished last, the critical path is: broadcast ``S_end(t-1) -> start_k``
    (putting the weights, dispatching the call, joining the weight pieces), compute ``start_k ->
    end_k`` (backprop and the worker's share of the tree), grad_transfer ``end_k -> S_start(t)``
    (putting the gradients, the driver seeing them, dispatching the server's call), server_sum,
    update, and ``other`` (the rest of the server's call: waiting for the last hash).
    ``idle`` is the mean over workers of the step time not spent computing.
    """
    import ray

    from distbp.data.problem import prepare
    from distbp.distributed.crew import Crew
    from distbp.distributed.session import Session
    from distbp.distributed.windows import Windows
    from distbp.lecture.network import Network
    from distbp.step.reports import merge_reports

    problem = prepare(config)
    K, sampler, total = config.workers, problem.sampler, problem.total_steps
    net = Network(problem.layers, config.activation, config.loss, config.dtype, config.seed)
    # The CPU counters are read before step ``first`` (after warm-up) and before step ``total``,
    # each time with nothing in flight: they cover steps first..total-1.
    first = warmup + 2
    with Session(config, problem, servers=config.servers) as session:
        servers = session.start_servers(net.flat)
        pool = session.start_workers()
        pool.wait_started()
        crew = Crew(pool, servers, config.micro_batch)
        pids = {"server": ray.get([a.pid.remote() for a in servers.actors]),
                "workers": ray.get([w.pid.remote() for w in pool.actors]),
                "driver": [os.getpid()], "raylet": _ray_pids("raylet")}
        weights = servers.weights()
        pending: deque = deque()
        reports: dict[int, dict] = {}
        usage: dict[int, dict] = {}

        def drain(keep: int) -> None:
            while len(pending) > keep:
                reports.update(merge_reports(servers.get(pending.popleft())))

        windows = Windows(crew)  # as the sync loop runs the steps (windows.py)

        def scale_of(batch) -> int | None:
            return len(batch) if config.reduction == "mean" else None
        step = 1
        while step <= total:
            if step in (first, total):  # between two drains: nothing of another step is in flight
                servers.get(weights)
                drain(0)
                usage[step] = _usage(pids)
            last = windows.last_step(step, total, lambda t: t + 1 in (first, total))
            batches = [sampler.batch(t) for t in range(step, last + 1)]
            ran, weights, failure = windows.run(step, batches, lambda t: config.lr, scale_of, weights)
            if failure is not None:
                raise failure
            pending.append(servers.report())
            drain(1)  # as the sync loop does: a step's report is read one step late
            step = last + 1
        drain(0)
        spans = sorted(span for w in pool.actors for span in ray.get(w.spans.remote()))

    rows = []
    for t in range(first, total + 1):
        prev, cur = reports[t - 1], reports[t]
        T = cur["end"] - prev["end"]
        mine = [span for span in spans if prev["end"] <= span[0] and span[1] <= cur["start"]]  # step t's calls
        start, end, *_ = max(mine, key=lambda span: span[1])
        row = {"step": T, "compute": end - start, "broadcast": start - prev["end"],
               "grad_transfer": cur["start"] - end, "server_sum": cur["server_sum"], "update": cur["update"]}
        row["other"] = (cur["end"] - cur["start"]) - cur["server_sum"] - cur["update"]
        row["idle"] = T - sum(e - s for s, e, *_ in mine) / K
        rows.append(row)
    med = {key: float(np.median([r[key] for r in rows])) * 1e3 for key in rows[0]}
    # Per step: CPU milliseconds, and page faults as they are.
    cpu_ms = {role: (usage[total][role] - usage[first][role]) / (total - first) * (1 if "faults" in role else 1e3)
              for role in usage[first]}
    # Of the CPU time per step: the workers' in compute() (backprop, tree), the server's in step().
    steps = [t for t in range(first, total) if t in reports]
    cpu_ms["workers_compute"] = sum(c for s, e, c, *_ in spans if reports[steps[0] - 1]["end"] <= s
                                    and e <= reports[steps[-1]]["start"]) / len(steps) * 1e3
    cpu_ms["server_step"] = sum(reports[t]["cpu"] for t in steps) / len(steps) * 1e3
    return {"step_ms": med.pop("step"), "phases_ms": med, "cpu_ms_per_step": cpu_ms,
            "samples_per_second": config.batch_size / float(np.median([r["step"] for r in rows]))}


def floor_run(K: int, steps: int, warmup: int) -> float:
    """Milliseconds per step of the sync loop's pattern of Ray calls with nothing in them: K worker
    actors each answering a compute call that waits on the server's last result, the driver
    waiting for every answer, then one server call and one report call.  No computation and
    no data (what shared memory leaves of the transfers: a few dozen bytes a call).  The
    least a step costs while each step goes through Ray's task calls."""
    import ray

    @ray.remote(num_cpus=1)
    class Echo:
        """The signatures of ``Worker`` and ``ParameterServer`` (one server range), doing nothing."""

        @ray.method(num_returns=2)
        def compute(self, step, batch, nodes, *weights):
            return ("values", step), (np.zeros(len(nodes)), 0.0)

        def step(self, n, nodes, lr, t, scale, *values):
            return ("weights", t)

        def report(self):
            return {}

    workers, server = [Echo.remote() for _ in range(K)], Echo.remote()
    batch, weights, pending, times = np.arange(256), ray.put(("weights", 0)), deque(), []
    for t in range(1, warmup + steps + 1):  # steps count from 1, as everywhere in distbp
        start = time.perf_counter()
        tasks = [w.compute.remote(t, batch, [k], weights) for k, w in enumerate(workers)]
        waiting = [info for _, info in tasks]
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            ray.get(ready)
        weights = server.step.remote(K, None, 0.01, t, len(batch), *(values for values, _ in tasks))
        pending.append(server.report.remote())
        while len(pending) > 1:  # reports are read one step late, as the sync loop does
            ray.get(pending.popleft())
        times.append(time.perf_counter() - start)
    ray.get(weights)
    for actor in (*workers, server):
        ray.kill(actor)
    return float(np.median(times[warmup:])) * 1e3


def _usage(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds and minor page faults so far of each role's processes."""
    usage = {role: sum(_cpu_seconds(p) for p in ps) for role, ps in pids.items()}
    usage.update({f"{role}_faults": sum(_minor_faults(p) for p in ps) for role, ps in pids.items()})
    return usage


def _cpu_seconds(pid: int) -> float:
    import psutil  # a dependency of Ray

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def _minor_faults(pid: int) -> int:
    """Minor page faults of a process so far: each first touch of a fresh object-store page is one."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[7])
    except OSError:
        return 0


def _ray_pids(name: str) -> list[int]:
    """Pids of the Ray processes called ``name`` that this driver started (none when it joined a cluster)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    infos = getattr(node, "all_processes", {}).get(name, []) if node is not None else []
    return [info.process.pid for info in infos]


def blas_info() -> dict:
    """Which BLAS kernel runs, here and (same interpreter, same environment) in the baselines."""
    from threadpoolctl import threadpool_info

    info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "openblas_l2_size": os.environ.get("OPENBLAS_L2_SIZE"),
            "blas": [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                     for i in info]}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def median_of(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None,
                    help="comma-separated DTYPE:B pairs (default: float64:256,float64:1024,float32:256,float32:1024)")
    ap.add_argument("--workers", type=int, default=2, help="K")
    ap.add_argument("--servers", type=int, default=1, help="S (with --nodes 2, S=2 puts a server on each node)")
    ap.add_argument("--threads-per-worker", type=int, default=1,
                    help="T (1, the default here: one core per worker, as DDP's processes have)")
    ap.add_argument("--micro-batch", type=int, default=None, help="M (default: distbp's default)")
    ap.add_argument("--layers", default=LAYERS)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=40,
                    help="untimed steps first: until Ray's processes have touched the object-store pages "
                         "that steps reuse, every step takes thousands of page faults (docs/performance.md)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every measurement, report medians")
    ap.add_argument("--nodes", type=int, default=1, choices=(1, 2),
                    help="2: start a 2-node local Ray cluster (token auth) and run one worker per node")
    ap.add_argument("--transports", default=None,
                    help="comma-separated --transport values to run distbp with, side by side; NAME/W: with "
                         "windows of at most W steps (NAME/1: a window a step, each through Ray's calls) "
                         "(default: auto; with --nodes 2: direct,direct/1,object-store)")
    ap.add_argument("--no-ddp", action="store_true", help="skip the PyTorch DDP baseline")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-step breakdown runs (halves the time)")
    ap.add_argument("--baseline-nice", type=int, default=RAY_WORKER_NICENESS,
                    help="run the baselines at this niceness: Ray runs its workers at 15, so on a busy "
                         "machine every contender computes at the same priority")
    ap.add_argument("--out", metavar="FILE.json", help="write every figure here")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2: the breakdown times the steps between two readings")
    if not args.no_ddp and not torch_available():
        print('bench.py: the DDP column is left out: torch is not installed (pip install -e ".[reference]"; '
              "a CPU build is enough)", file=sys.stderr, flush=True)
        args.no_ddp = True
    transports = (args.transports or ("direct,direct/1,object-store" if args.nodes > 1
                                      else "auto")).split(",")
    pairs = (args.configs or "float64:256,float64:1024,float32:256,float32:1024").split(",")
    configs = [(d, int(b)) for d, b in (c.split(":") for c in pairs)]
    cluster = None
    if args.nodes > 1:
        from localcluster import LocalCluster

        # every actor fits on each node: K workers of T CPUs and S servers
        cluster = LocalCluster(workers=args.nodes - 1, cpus=args.workers * args.threads_per_worker + args.servers)
        print(f"starting a {args.nodes}-node Ray cluster on 127.0.0.1 ...", file=sys.stderr, flush=True)
        cluster.start()
    try:
        return measure(args, configs, transports, cluster)
    finally:
        if cluster is not None:
            left = cluster.stop()
            print(f"stopped the cluster: {'every process it started is gone' if not left else f'LEFT: {left}'}",
                  file=sys.stderr, flush=True)


def measure(args, configs, transports, cluster) -> int:
    """Every contender, config by config, round by round; prints the tables, writes ``--out``."""
    from distbp.distributed.loopback import keep_local_ray_on_loopback

    address = None
    if cluster is not None:
        address = cluster.address
        os.environ.update(cluster.client_env())  # before Ray is imported: token auth on
    keep_local_ray_on_loopback(address)  # without a cluster this script starts its own local Ray
    import ray

    from distbp.distributed.runtime import connect

    cores = os.cpu_count() or 1
    K = args.workers
    numpy_threads = [] if cluster is not None else sorted({cores, min(K, cores)}, reverse=True)
    ddp = not args.no_ddp  # main() turned it off, with a line, where torch does not import

    # Ray once for the whole run: each Session (train's and the breakdown's) finds it
    # initialized, so it places its actors in it and leaves it up when it closes.
    started = connect(address, cpus_wanted=K * args.threads_per_worker + args.servers)

    @ray.remote(num_cpus=0)
    def worker_blas():
        import numpy  # noqa: F401  (threadpoolctl sees only loaded libraries)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            return blas_info()

    env = {"cores": cores, "driver": blas_info(), "ray_worker": ray.get(worker_blas.remote()),
           "numpy": np.__version__, "ray": ray.__version__, "argv": sys.argv, "nodes": args.nodes,
           "load_average": os.getloadavg()}
    results, floors = [], []
    try:
        for r in range(args.rounds):
            floors.append(floor_run(K, 200, 50))
            print(f"round {r}: Ray call floor {floors[-1]:.2f} ms per step", file=sys.stderr, flush=True)
            for dtype, batch in configs:
                common = dict(layers=args.layers, batch_size=batch, dtype=dtype, steps=args.steps)
                nice = args.baseline_nice
                numpy_runs = {str(n): baseline(BASELINES / "numpy_baseline.py", nice, threads=n, **common)
                              for n in numpy_threads}
                ddp_run = baseline(BASELINES / "ddp_baseline.py", nice, workers=K, **common) if ddp else None
                for transport in transports:
                    run = {"round": r, "dtype": dtype, "batch_size": batch, "workers": K, "transport": transport,
                           "numpy": numpy_runs, "ddp": ddp_run}
                    name, _, window = transport.partition("/")
                    with tempfile.TemporaryDirectory() as tmp, windows_of(int(window or 0)):
                        config = make_config(dtype, batch, args, os.path.join(tmp, "run"), address, name)
                        run["distbp"] = trainer_run(config, args.warmup)
                        if not args.no_breakdown:
                            run["breakdown"] = breakdown_run(make_config(dtype, batch, args, None, address, name),
                                                             args.warmup)
                    if cluster is not None and len(set(run["distbp"]["worker_nodes"])) < min(K, args.nodes):
                        raise RuntimeError(f"workers not on distinct nodes: {run['distbp']['worker_nodes']}")
                    sps = run["distbp"]["samples_per_second"]
                    run["ratios"] = {f"numpy_{n}t": sps / v["samples_per_second"] for n, v in numpy_runs.items()}
                    if ddp_run:
                        run["ratios"]["ddp"] = sps / ddp_run["samples_per_second"]
                    results.append(run)
                    print(f"round {r} {dtype} B={batch} {transport}: distbp {sps:.0f}/s " +
                          " ".join(f"{k} {v:.2f}" for k, v in run["ratios"].items()), file=sys.stderr, flush=True)
    finally:
        if started or cluster is not None:  # ours, or the benchmark's cluster: leave it before it stops
            ray.shutdown()

    summary = table(results, configs, transports, numpy_threads, K, ddp, breakdown=not args.no_breakdown)
    summary += (f"\n\nRay call floor (the step's calls with no compute and no data, floor_run): "
                f"{median_of(floors):.1f} ms per step; load average at the start {env['load_average'][0]:.2f}")
    print(summary)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": env, "args": vars(args), "runs": results, "ray_floor_ms": floors, "table": summary},
                      fh, indent=1)
    return 0


def table(results, configs, transports, numpy_threads, K, ddp, breakdown=True) -> str:
    """Markdown tables: samples/s and ratios, then the distbp step breakdown (medians over rounds)."""
    rows = [(d, b, t) for d, b in configs for t in transports]

    def runs(d, b, t):
        return [r for r in results if (r["dtype"], r["batch_size"], r["transport"]) == (d, b, t)]

    def label(d, b, t):
        name = f"{d} B={b}"
        return name if len(transports) == 1 and t == "auto" else f"{name} {t}"

    head = ["config"] + [f"numpy {n}t" for n in numpy_threads] + ([f"DDP K={K}"] if ddp else []) + \
        [f"distbp K={K}"] + [f"distbp/numpy {n}t" for n in numpy_threads] + (["distbp/DDP"] if ddp else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, b, t in rows:
        rs = runs(d, b, t)
        cells = [label(d, b, t)]
        cells += [f"{median_of(r['numpy'][str(n)]['samples_per_second'] for r in rs):.0f}" for n in numpy_threads]
        if ddp:
            cells.append(f"{median_of(r['ddp']['samples_per_second'] for r in rs):.0f}")
        cells.append(f"{median_of(r['distbp']['samples_per_second'] for r in rs):.0f}")
        cells += [f"{median_of(r['ratios'][f'numpy_{n}t'] for r in rs):.2f}" for n in numpy_threads]
        if ddp:
            cells.append(f"{median_of(r['ratios']['ddp'] for r in rs):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if not breakdown:
        return "\n".join(lines)
    names = ("compute", "transfer in", "transfer out", "sum", "update", "other")
    lines += ["", "| config (ms per step) | step | " + " | ".join(names) + " | phases summed | worker idle |",
              "|" + "---|" * (len(PHASES) + 4)]
    for d, b, t in rows:
        rs = runs(d, b, t)
        phases = [median_of(r["breakdown"]["phases_ms"][p] for r in rs) for p in (*PHASES, "idle")]
        cells = [label(d, b, t), f"{median_of(r['breakdown']['step_ms'] for r in rs):.1f}"]
        cells += [f"{v:.1f}" for v in phases[:-1]] + [f"{sum(phases[:-1]):.1f}", f"{phases[-1]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    roles = ("workers", "workers_compute", "server", "server_step", "driver", "raylet")
    lines += ["", "| config (CPU ms per step) | " + " | ".join(roles) + " | total |", "|" + "---|" * (len(roles) + 2)]
    for d, b, t in rows:
        rs = runs(d, b, t)
        cpu = {role: median_of(r["breakdown"]["cpu_ms_per_step"][role] for r in rs) for role in roles}
        total = sum(cpu[role] for role in ("workers", "server", "driver", "raylet"))
        lines.append(f"| {label(d, b, t)} | " + " | ".join(f"{c:.1f}" for c in cpu.values()) + f" | {total:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
