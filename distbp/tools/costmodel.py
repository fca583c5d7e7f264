"""An alpha-beta cost model of one synchronous step, fitted to measured step times.  Pure numpy.

A step of ``N`` workers, ``S`` servers, ``P`` parameters and global batch ``B`` (micro-batch
``M``, ``w`` bytes per number) costs

    T = alpha + c * rows * P + beta * bytes

- ``alpha``: per-step latency (task round trips through Ray, the driver's bookkeeping);
- ``rows * P``: the busiest worker's share of the backprop work, ``rows`` its samples; a
  dense layer costs about 6 flops per weight per sample (forward, delta, gradient), so the
  compute rate ``1 / c`` samples*weights/s is ``6 / c`` flop/s;
- ``bytes``: what the busiest server moves per step, the tree nodes it receives from the
  workers plus the weights it sends each of them, ``(nodes + N) * ceil(P / S) * w``
  (``beta`` seconds per byte: 1 / bandwidth).  The server's sum and update are linear in the
  same bytes, so on one machine ``beta`` is an effective rate that includes them.

Fitted by least squares on relative residuals (step times span orders of magnitude), with
every coefficient kept >= 0.  ``predict(..., network_bps=...)`` adds the wire time of an
assumed network on top of the fitted per-byte cost, for extrapolating to more nodes than
the measurement had.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from ..lecture import cuts
from ..lecture.tree import blocks
from ..step.worker import micro_batches

FLOPS_PER_WEIGHT_SAMPLE = 6  # 2 flops per multiply-add, three GEMMs per layer (forward, delta, gradient)


def features(N: int, S: int, P: int, B: int, M: int, itemsize: int = 8) -> np.ndarray:
    """``[1, rows * P, bytes]`` of one step, as in the module docstring (shape ``(3,)``)."""
    n = len(micro_batches(B, M))
    shares = [part for part in cuts.even(n, N) if part]
    rows = max(min(ids[-1] * M + M, B) - ids[0] * M for ids in shares)
    nodes = sum(len(blocks(ids, n)) for ids in shares)
    moved = (nodes + len(shares)) * math.ceil(P / S) * itemsize
    return np.array([1.0, float(rows * P), float(moved)])


@dataclass
class Fit:
    alpha: float  # seconds per step
    c: float  # seconds per (sample * weight) on one worker
    beta: float  # seconds per byte through the busiest server
    points: int
    median_rel_error: float
    max_rel_error: float

    @property
    def gflops(self) -> float | None:
        """Compute rate of one worker implied by ``c`` (None when the fit put no cost on compute)."""
        return FLOPS_PER_WEIGHT_SAMPLE / self.c / 1e9 if self.c > 0 else None

    @property
    def gbytes_per_s(self) -> float | None:
        """Effective bytes/s through a server implied by ``beta`` (None when the fit put no cost on bytes)."""
        return 1 / self.beta / 1e9 if self.beta > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "gflops_per_worker": self.gflops, "server_gbytes_per_s": self.gbytes_per_s}


def nonnegative_lstsq(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``argmin ||A x - y||`` over ``x >= 0``, by trying every support (A has few columns)."""
    best, best_err = np.zeros(A.shape[1]), float(np.sum(y ** 2))
    for k in range(1, A.shape[1] + 1):
        for cols in itertools.combinations(range(A.shape[1]), k):
            sol, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
            if np.all(sol >= 0):
                err = float(np.sum((A[:, cols] @ sol - y) ** 2))
                if err < best_err:
                    best, best_err = np.zeros(A.shape[1]), err
                    best[list(cols)] = sol
    return best


def fit(X: np.ndarray, T: np.ndarray) -> Fit:
    """Fit ``T ~ X @ [alpha, c, beta]`` (``X`` rows from ``features``, shape ``(n, 3)``) on relative error."""
    X, T = np.asarray(X, dtype=float), np.asarray(T, dtype=float)
    scale = X.max(axis=0)  # columns of very different magnitudes: solve in units of each column's max
    scale[scale == 0] = 1.0
    A = X / scale / T[:, None]  # divide each row by its time: residuals are relative
    coef = nonnegative_lstsq(A, np.ones(len(T))) / scale
    rel = np.abs(X @ coef / T - 1)
    return Fit(float(coef[0]), float(coef[1]), float(coef[2]), len(T), float(np.median(rel)), float(rel.max()))


def predict(model: Fit, N: int, S: int, P: int, B: int, M: int, itemsize: int = 8,
            network_bps: float | None = None) -> float:
    """Step time in seconds; with ``network_bps`` (bits/s, an assumption) each byte also crosses that wire."""
    x = features(N, S, P, B, M, itemsize)
    beta = model.beta + (8.0 / network_bps if network_bps else 0.0)
    return float(model.alpha + model.c * x[1] + beta * x[2])


# ---------------------------------------------------------------------------------------------
# N nodes x C cores: the parameter-server step beside ring all-reduce (docs/scaling.md).
#
# The fit above describes the machine it was measured on.  To say where the design wins on
# real clusters, ``Constants`` names each per-unit cost measured here (docs/performance.md
# gives the command and the load of each) and ``ps_step`` / ``ring_step`` add them up for
# N nodes of C cores on a network of ``gbit`` Gbit/s.  Both designs use every core of a
# node for backprop (distbp: one worker per node, --threads-per-worker C), the same global
# batch, the same bytes per number.


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
    ring_latency_s: float = 50e-6  # ASSUMED, not measured here: one ring hop's latency (gloo)
    overlap: float = 2 / 3  # ASSUMED: share of the compute (the backward pass) DDP hides its all-reduce behind

    def gflops(self, itemsize: int, cores: int = 1) -> float:
        """The backprop rate of ``cores`` cores, GFLOP/s."""
        one = self.gflops_core_fp32 if itemsize <= 4 else self.gflops_core_fp64
        return one * (cores if cores == 1 else cores * self.thread_efficiency)


def _wire(bytes_: float, gbit: float, c: Constants | None = None) -> float:
    """Seconds to move ``bytes_`` over one link: the wire's rate, or (``c`` given: distbp's
    Python streams) the slower of the wire and ``c.socket_gbytes``."""
    return bytes_ / min(gbit * 1e9 / 8, c.socket_gbytes * 1e9 if c is not None else math.inf)


def ps_step(N: int, C: int, S: int, P: int, B: int, itemsize: int, gbit: float, c: Constants,
            colocated: bool = True) -> dict[str, float]:
    """One synchronous distbp step on N nodes of C cores, S servers, in seconds, by phase.

    Each node runs one worker of C threads (one tree node of P values to send, when its
    share of micro-batches is a power of two).  ``colocated``: server s sits on node s (S <= N),
    so a worker's range of its own node's server never crosses the wire.  Per step a worker
    pushes P values and pulls P values; a server receives N * P / S values and sends as many.
    The busiest link is a server node's: its worker's traffic plus its server's.  As the
    implementation runs them (windows.py, direct_server.py): the sum (half the server's pass) while
    the push comes in, the update (the other half) while the pull goes out, and Ray's calls
    once a window.
    """
    compute = FLOPS_PER_WEIGHT_SAMPLE * P * B / N / (c.gflops(itemsize, C) * 1e9)
    vector = P * itemsize
    remote = (S - 1) / S if colocated and S <= N else 1.0  # of a worker's vector, the share that leaves its node
    server_in = N * vector / S * ((N - 1) / N if colocated and S <= N else 1.0)  # what crosses into one server
    push = max(_wire(vector * remote, gbit, c), _wire(server_in, gbit, c))
    pull = push  # the same bytes the other way
    total_sum = N * vector / S / (c.sum_gbytes * 1e9 * (c.pass_speedup if C > 1 else 1.0))
    ray = c.ray_step_s / c.window
    return {"compute": compute, "push": push, "sum": total_sum, "pull": pull, "ray": ray,
            "step": compute + max(push, total_sum / 2) + max(pull, total_sum / 2) + ray}


def ring_step(N: int, C: int, P: int, B: int, itemsize: int, gbit: float, c: Constants) -> dict[str, float]:
    """One DDP step (ring all-reduce of the gradient, overlapped with the backward pass) on N nodes
    of C cores: each node sends and receives 2 (N - 1) / N of the vector, in 2 (N - 1) messages."""
    compute = FLOPS_PER_WEIGHT_SAMPLE * P * B / N / (c.gflops(itemsize, C) * 1e9)
    allreduce = 0.0 if N == 1 else 2 * (N - 1) * c.ring_latency_s + _wire(2 * (N - 1) / N * P * itemsize, gbit)
    hidden = min(allreduce, c.overlap * compute)
    return {"compute": compute, "allreduce": allreduce, "step": compute + allreduce - hidden}


def compare(P: int, batch_per_node: int, itemsize: int, cores: int = 16, gbits=(10, 100),
            nodes=(1, 2, 4, 8, 16, 32, 64), c: Constants | None = None) -> list[dict]:
    """Weak scaling (B = N * batch_per_node): the PS step with S = N co-located servers and with
    one dedicated server, beside ring all-reduce, for each network and node count."""
    c = c or Constants()
    rows = []
    for gbit in gbits:
        for N in nodes:
            B = N * batch_per_node
            shard = ps_step(N, cores, N, P, B, itemsize, gbit, c)
            one = ps_step(N, cores, 1, P, B, itemsize, gbit, c, colocated=False)
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


def main(argv: list[str] | None = None) -> int:
    """``python -m distbp.tools.costmodel``: the N-nodes table of docs/scaling.md."""
    import argparse

    ap = argparse.ArgumentParser(description="distbp's step beside ring all-reduce on N nodes x C cores")
    ap.add_argument("--layers", default="784,1024,1024,10")
    ap.add_argument("--batch-per-node", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--cores", type=int, default=16)
    args = ap.parse_args(argv)
    sizes = [int(v) for v in args.layers.split(",")]
    P = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    print(markdown(compare(P, args.batch_per_node, np.dtype(args.dtype).itemsize, args.cores)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
