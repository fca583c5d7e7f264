#!/usr/bin/env python3
"""Would Ray's Compiled Graphs make distbp's steps cheaper?  A probe, not part of distbp.

    python scripts/cgraph_probe.py

With the vectors in shared memory (distbp/distributed/shm.py), what is left of a step's
transport is Ray's task-call latency.  Compiled Graphs replace task calls by shared-memory
channels with "less than 50us system overhead" (Ray's docs).  This script runs the shape of a
distbp step, K worker actors then one server actor that takes their results, three ways over
the same actors: plain Ray task calls, and a compiled graph, each with no compute and with each
worker doing a fixed single-thread matrix product per step (about 15 ms here).  It prints the
median milliseconds per step and the CPU the actors burn while the graph sits idle.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="K")
    ap.add_argument("--steps", type=int, default=150, help="timed steps, after 30 untimed ones")
    ap.add_argument("--size", type=int, default=600, help="the workers' matrices are size x size")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from distbp.distributed.loopback import keep_local_ray_on_loopback
    from distbp.distributed.shm import alive  # no Ray in it: still before Ray's first import

    keep_local_ray_on_loopback(None)
    import ray
    from ray.dag import InputNode

    shm_before = set(os.listdir("/dev/shm"))
    ray.init(num_cpus=args.workers + 2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, size):
            from threadpoolctl import threadpool_limits

            threadpool_limits(1)
            self.x = np.random.default_rng(0).random((size, size))

        def compute(self, step):
            t, work = step
            for _ in range(3 if work else 0):
                self.x @ self.x
            return t

        def pid(self):
            return os.getpid()

    @ray.remote(num_cpus=1)
    class Server:
        def step(self, *values):
            return values[0]

        def pid(self):
            return os.getpid()

    workers, server = [Worker.remote(args.size) for _ in range(args.workers)], Server.remote()
    pids = ray.get([a.pid.remote() for a in (*workers, server)])

    def plain(work: bool) -> float:
        times = []
        for t in range(30 + args.steps):
            start = time.perf_counter()
            values = [w.compute.remote((t, work)) for w in workers]
            ray.wait(values, num_returns=len(values))
            ray.get(server.step.remote(*values))
            times.append(time.perf_counter() - start)
        return float(np.median(times[30:])) * 1e3

    with InputNode() as inp:
        dag = server.step.bind(*[w.compute.bind(inp) for w in workers])
    graph = dag.experimental_compile()

    def compiled(work: bool) -> float:
        times = []
        for t in range(30 + args.steps):
            start = time.perf_counter()
            ray.get(graph.execute((t, work)))
            times.append(time.perf_counter() - start)
        return float(np.median(times[30:])) * 1e3

    def idle_cpu(seconds: float = 3.0) -> float:
        import psutil  # Ray's copy: importing ray put it on the path

        procs = [psutil.Process(p) for p in pids]
        before = sum(sum(p.cpu_times()[:2]) for p in procs)
        time.sleep(seconds)
        return (sum(sum(p.cpu_times()[:2]) for p in procs) - before) / seconds

    rows = [("compiled graph", compiled(False), compiled(True), idle_cpu())]
    graph.teardown()
    rows.insert(0, ("task calls", plain(False), plain(True), idle_cpu()))
    print(f"K = {args.workers} workers and a server, ms per step (medians of {args.steps} steps)")
    print("| transport | no compute | with compute | actors' CPU while idle (cores) |")
    print("|---|---|---|---|")
    for name, bare, work, cpu in rows:
        print(f"| {name} | {bare:.2f} | {work:.1f} | {cpu:.2f} |")
    ray.shutdown()
    # The graph's channels leave named semaphores behind (/dev/shm/sem.hdr<pid>-*, sem.obj<pid>-*,
    # Ray 2.60, even after teardown and shutdown): remove the ones this run made, now that the
    # process named in them is gone.
    for name in set(os.listdir("/dev/shm")) - shm_before:
        pid = name[len("sem.hdr"):].split("-")[0]
        if name.startswith(("sem.hdr", "sem.obj")) and pid.isdigit() and not alive(int(pid)):
            os.unlink(os.path.join("/dev/shm", name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
