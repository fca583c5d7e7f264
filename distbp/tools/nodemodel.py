"""N nodes x C cores: distbp's step beside ring all-reduce, and time to accuracy.  Pure numpy.

The fit of costmodel.py describes the machine it was measured on.  To say where the design
wins on real clusters, ``Constants`` names each per-unit cost measured here (docs/performance.md
gives the command and the load of each) and ``ps_step`` / ``ring_step`` add them up for N nodes
of C cores on a network of ``gbit`` Gbit/s.  Both designs use every core of a node for backprop
(distbp: one worker per node, --threads-per-worker C), the same global batch, the same bytes
per number.

``time_to_accuracy`` multiplies the steps a batch size B needs to reach a target
(scripts/batch_scaling.py's ``best.csv``) by the step time of B on N nodes: which B is fastest
on N nodes, and past which N more nodes stop paying.  ``python -m distbp.tools.costmodel
[time-to-accuracy]`` prints both tables (timetarget.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..lecture import cuts
from ..lecture.network import Layout

FLOPS_PER_WEIGHT_SAMPLE = 6  # 2 flops per multiply-add, three GEMMs per layer (forward, delta, gradient)
NODES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Constants:
    """Per-unit costs, each with where it comes from (docs/scaling.md, "N nodes x C cores")."""

    # backprop on one core (one BLAS thread), GFLOP/s: scripts/threads_probe.py, T = 1, 8 micro-batches
    # of 128 rows of 784-1024-1024-10 (6 flops per weight and sample), load average 3.8
    gflops_core_fp32: float = 112.0
    gflops_core_fp64: float = 57.5
    # of C threads' ideal C-fold rate, what --threads-per-worker got at T = 2 (threads_probe.py: 1.61x fp32)
    thread_efficiency: float = 0.8
    ray_step_s: float = 3.0e-3  # Ray's call floor per step, quiet machine (docs/performance.md, floor_run)
    window: int = 16  # steps per window (distributed/windows.py): a window's Ray calls are spread over them
    socket_gbytes: float = 1.0  # one pull of 7.45 MB over channel.py, GB/s: scripts/channel_probe.py, load 17
    sum_gbytes: float = 2.2  # server sum + update per byte of node values in: bench.py --nodes 2, load 16-34
    # the server's pass on its threads against one (step/server.pass_threads): 7.10 -> 4.45 ms on 2
    # threads (docs/performance.md); more threads are ASSUMED to add nothing (memory bandwidth)
    pass_speedup: float = 1.6
    # FITTED to the network lab, each design's step of a 16-8-4 network at N = 2, B = 256 (a micro-batch
    # a worker), all but nothing to compute or move: what a step costs beyond its compute, bytes and
    # (distbp) Ray's calls.  distbp: 4.4 ms (the round trips of a push and a pull, the actors' threads
    # waking); DDP: 1.5 ms, its two ring hops at ``ring_latency_s`` included
    step_latency_s: float = 4.2e-3
    ddp_latency_s: float = 1.4e-3
    ring_latency_s: float = 50e-6  # ASSUMED, not measured: one ring hop's latency (gloo); the lab bounds it by 0.7 ms
    # FITTED to the network lab (scripts/netlab.py, docs/performance.md): the share of the compute
    # DDP hides its all-reduce behind.  DDP's 25 MB buckets put all but the top layer of
    # 784-1024-1024-10 in one bucket, all-reduced after the backward pass: the lab's 0.15, not 2/3.
    overlap: float = 0.15

    def gflops(self, itemsize: int, cores: int = 1) -> float:
        """The backprop rate of ``cores`` cores, GFLOP/s."""
        one = self.gflops_core_fp32 if itemsize <= 4 else self.gflops_core_fp64
        return one * (cores if cores == 1 else cores * self.thread_efficiency)


def _wire(bytes_: float, gbit: float, c: Constants | None = None) -> float:
    """Seconds to move ``bytes_`` over one link: the wire's rate, or (``c`` given: distbp's
    Python streams) the slower of the wire and ``c.socket_gbytes``."""
    return bytes_ / min(gbit * 1e9 / 8, c.socket_gbytes * 1e9 if c is not None else math.inf)


def busiest_compute(N: int, C: int, P: int, B: int, itemsize: int, c: Constants, M: int | None = None) -> float:
    """Seconds of backprop on the busiest of N nodes of C cores.  ``M`` None: B / N rows spread
    over the cores as if they divided evenly.  With a micro-batch ``M`` the step has ceil(B / M)
    micro-batches, the busiest node ceil(that / N), which its threads take C at a time: a node
    with fewer micro-batches than cores leaves cores idle, and N past ceil(B / M) adds nothing."""
    if M is None:
        return FLOPS_PER_WEIGHT_SAMPLE * P * B / N / (c.gflops(itemsize, C) * 1e9)
    mine = math.ceil(math.ceil(B / M) / N)  # micro-batches on the busiest node
    threads = min(C, mine)
    rows = min(math.ceil(mine / threads) * M, B)  # one thread's rows: its micro-batches, one wave after another
    return FLOPS_PER_WEIGHT_SAMPLE * P * rows * threads / (c.gflops(itemsize, threads) * 1e9)


def ps_step(N: int, C: int, S: int, P: int, B: int, itemsize: int, gbit: float, c: Constants,
            colocated: bool = True, M: int | None = None, layers: tuple[int, ...] | None = None) -> dict[str, float]:
    """One synchronous distbp step on N nodes of C cores, S servers, in seconds, by phase.

    Each node runs one worker of C threads (one tree node of P values to send, when its share of
    micro-batches is a power of two).  ``colocated``: server s sits on node s (S <= N), so a
    worker's range of its own node's server never crosses the wire.  Per step a worker pushes P
    values and pulls P values, to and from every server at once; a server receives N * P / S
    values and sends as many.  The busiest link is a server node's: its worker's traffic plus its
    server's.  As the implementation runs them (windows.py, direct_server.py): the sum (half the
    server's pass) while the push comes in, the update (the other half) while the pull goes out,
    Ray's calls once a window, and between nodes a fixed ``latency``.  With ``layers`` (P is then
    theirs), a worker pushes each layer's columns as its backward pass finishes them
    (step/worker.py), so what lies above layer 1 goes while layer 1's gradient is computed
    (``hidden``: the push time that saves); a server's range in layer 1 can only go after.  The
    pull mirrors it: the weights come in the vector's order, layer 1 first, and the next forward
    pass computes layer 1 while the layers above come (``hidden_pull``; layer 1's forward pass
    is 2 of the 6 flops per weight and sample too).  With a micro-batch ``M``, nodes past
    ceil(B / M) have no share: the step is that of ceil(B / M) nodes (``busy``; co-located
    servers capped to them).
    """
    if M is not None:
        N = min(N, math.ceil(B / M))
        S = min(S, N) if colocated else S
    compute = busiest_compute(N, C, P, B, itemsize, c, M)
    shared = colocated and S <= N
    links = _links(N, S, P, shared, layers)  # (values, of them in layer 1) into a server / out of a worker
    push = max(_wire(total * itemsize, gbit, c) for total, _ in links)
    # layer 1's weight gradient: 2 of the 6 flops per weight and sample, on layer 1's weights
    last = compute * 2 * (layers[0] + 1) * layers[1] / (FLOPS_PER_WEIGHT_SAMPLE * P) if layers else 0.0
    after = max(max(_wire(total * itemsize, gbit, c) - last, _wire(low * itemsize, gbit, c)) for total, low in links)
    # the pull: the same bytes the other way, layer 1 first, the rest while layer 1's forward pass
    # runs (2 of the 6 flops as well): what it takes after that is ``after`` too
    pull, pulled = push, after
    total_sum = N * P * itemsize / S / (c.sum_gbytes * 1e9 * (c.pass_speedup if C > 1 else 1.0))
    ray = c.ray_step_s / c.window
    latency = c.step_latency_s if N > 1 else 0.0
    return {"compute": compute, "push": push, "hidden": push - after, "sum": total_sum, "pull": pull,
            "hidden_pull": pull - pulled, "ray": ray, "latency": latency, "busy": float(N),
            "step": compute + max(after, total_sum / 2) + max(pulled, total_sum / 2) + ray + latency}


def _links(N: int, S: int, P: int, shared: bool, layers: tuple[int, ...] | None) -> list[tuple[float, float]]:
    """For each server's link in and the busiest worker's link out, the values a push moves over it
    and how many of them are layer 1's (0 without ``layers``).  ``shared``: server s on node s,
    so its own node's worker reaches it without the wire."""
    edges = Layout(layers).offsets if layers else None  # where each layer starts in the flat vector
    ranges = cuts.striped(P, S, edges)  # a slice of each layer
    low = [part.local(edges[1]) for part in ranges] if edges else [0] * S  # of them in layer 1
    senders = N - 1 if shared else N
    servers = [(senders * len(r), senders * lo) for r, lo in zip(ranges, low)]
    workers = [(sum(len(r) for s, r in enumerate(ranges) if not (shared and s == k)),
                sum(lo for s, lo in enumerate(low) if not (shared and s == k))) for k in range(min(N, S + 1))]
    return servers + workers


def ring_step(N: int, C: int, P: int, B: int, itemsize: int, gbit: float, c: Constants) -> dict[str, float]:
    """One DDP step (ring all-reduce of the gradient, overlapped with the backward pass) on N nodes
    of C cores: each node sends and receives 2 (N - 1) / N of the vector, in 2 (N - 1) messages;
    between nodes a fixed ``latency``."""
    compute = busiest_compute(N, C, P, B, itemsize, c)
    allreduce = 0.0 if N == 1 else 2 * (N - 1) * c.ring_latency_s + _wire(2 * (N - 1) / N * P * itemsize, gbit)
    hidden = min(allreduce, c.overlap * compute)
    latency = c.ddp_latency_s if N > 1 else 0.0
    return {"compute": compute, "allreduce": allreduce, "latency": latency,
            "step": compute + allreduce - hidden + latency}


def compare(P: int, batch_per_node: int, itemsize: int, cores: int = 16, gbits=(10, 100),
            nodes=NODES, c: Constants | None = None, layers: tuple[int, ...] | None = None) -> list[dict]:
    """Weak scaling (B = N * batch_per_node): the PS step with S = N co-located servers and with
    one dedicated server, beside ring all-reduce, for each network and node count (``layers``:
    the model's, for the push that overlaps the backward pass: ``ps_step``)."""
    c = c or Constants()
    rows = []
    for gbit in gbits:
        for N in nodes:
            B = N * batch_per_node
            shard = ps_step(N, cores, N, P, B, itemsize, gbit, c, layers=layers)
            one = ps_step(N, cores, 1, P, B, itemsize, gbit, c, colocated=False, layers=layers)
            ring = ring_step(N, cores, P, B, itemsize, gbit, c)
            rows.append({"gbit": gbit, "nodes": N, "batch": B, "ps_sharded_ms": shard["step"] * 1e3,
                         "ps_one_server_ms": one["step"] * 1e3, "ring_ms": ring["step"] * 1e3,
                         "compute_ms": shard["compute"] * 1e3,
                         "ps_over_ring": ring["step"] / shard["step"]})
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| Gbit/s | N | B | compute | PS, S = N co-located | PS, S = 1 | ring all-reduce | PS speed / ring |"
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['gbit']} | {r['nodes']} | {r['batch']} | {r['compute_ms']:.1f} | "
                     f"{r['ps_sharded_ms']:.1f} | {r['ps_one_server_ms']:.1f} | {r['ring_ms']:.1f} | "
                     f"{r['ps_over_ring']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Time to accuracy: steps to target (a property of B and the learning rate, not of N or M: the
# same sum with other rounding) times the step time of B on N nodes (a property of the machine).


def time_to_accuracy(steps_by_batch: dict[int, float], P: int, itemsize: int, nodes=NODES, gbits=(1, 10, 100),
                     constants: Constants | None = None, cores: int = 16, micro_batch=64,
                     gain: float = 0.10) -> dict:
    """For each network (Gbit/s) and node count N, the time to target of each batch size B:
    ``steps_by_batch[B]`` x ``ps_step`` of B on N nodes (S = N servers co-located, one worker
    of ``cores`` threads a node, micro-batch ``micro_batch``, or ``micro_batch(B)``, at most B).

    Returns ``rows`` (every gbit, N, B), ``best`` (the fastest B of each gbit and N), ``gain`` and
    ``stops_paying`` (``stops_paying(best, gain)``): all times in seconds.
    """
    c = constants or Constants()
    rows, best = [], []
    for gbit in gbits:
        for N in nodes:
            here = []
            for B, steps in sorted(steps_by_batch.items()):
                M = min(micro_batch(B) if callable(micro_batch) else micro_batch, B)
                step = ps_step(N, cores, N, P, B, itemsize, gbit, c, M=M)
                here.append({"gbit": gbit, "nodes": N, "batch_size": B, "micro_batch": M,
                             "busy_nodes": int(step["busy"]), "steps_to_target": steps, "step_s": step["step"],
                             "compute_s": step["compute"], "wire_s": step["push"] + step["pull"],
                             "time_s": steps * step["step"]})
            rows += here
            best.append(min(here, key=lambda r: r["time_s"]))
    return {"rows": rows, "best": best, "gain": gain, "stops_paying": stops_paying(best, gain)}


def stops_paying(best: list[dict], gain: float = 0.10) -> list[dict]:
    """For each network, in ``best``'s order of N: the last N from which the next N in the list
    still cuts the time to target by at least ``gain`` (``worth_nodes``; the largest N if every
    step pays), what the next one would save, and the fastest N overall."""
    out = []
    for gbit in dict.fromkeys(r["gbit"] for r in best):
        line = [r for r in best if r["gbit"] == gbit]
        worth, saves = line[-1], None
        for here, after in zip(line, line[1:]):
            if after["time_s"] > (1 - gain) * here["time_s"]:
                worth, saves = here, 1 - after["time_s"] / here["time_s"]
                break
        fastest = min(line, key=lambda r: r["time_s"])
        out.append({"gbit": gbit, "worth_nodes": worth["nodes"], "worth_batch_size": worth["batch_size"],
                    "worth_time_s": worth["time_s"], "next_saves": saves, "fastest_nodes": fastest["nodes"],
                    "fastest_batch_size": fastest["batch_size"], "fastest_time_s": fastest["time_s"]})
    return out
