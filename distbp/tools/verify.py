"""``distbp verify``: the batch gradient is the sum of the per-sample gradients, however it is split.

The runnable answer to the question in ``docs/exactness.md`` (how do the lecture's
backpropagation equations change for mini-batches?): ``grad E = sum_n grad e_n``.  On a small
network and batch it computes that gradient several ways and prints how far apart they are:

- (a) a per-sample loop, summed left to right (Nielsen's ``update_mini_batch``);
- (b) the one-pass batch gradient ``[1, X^{l-1}]^T Delta^l`` (one GEMM over all ``B`` rows);
- (c) the exact mode's sum over ``K`` workers, for several ``K`` and shares (even, uneven, a
  worker with nothing to do, ``K`` larger than the number of micro-batches, a lost worker's
  micro-batches redone elsewhere), through the same ``WorkerState``/``ServerState`` code the
  Ray actors run;
- (d) ``N`` accumulation steps of about ``B/N`` samples (cut at micro-batch boundaries) on one
  worker, versus one batch of ``B``.

What "agree" means (the exit status):

- every (c) and (d) row must have exactly the bits of the exact mode on one worker: they all
  do the same arithmetic, only split differently;
- (a) and the exact rows compute the sum in a different order than (b), so they must agree
  with (b) within ``TOLERANCE[dtype]``, measured as ``max|g - g_b| / max|g_b|``.

The naive rows (one GEMM per shard, shard sums added left to right; a mean of shard means)
show why the exact mode exists; they are printed, not judged.  Pure numpy, no Ray: it runs
in about a second.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from ..data.datasets import check_memory
from ..errors import UsageError
from ..lecture import cuts, tree
from ..lecture.network import ACTIVATIONS, DTYPES, LOSSES, Layout, Network, encode_targets
from ..lecture.optim import Hyper
from ..run.checkpoint import sha256_le
from ..step.server import ServerState
from ..step.worker import WorkerState, micro_batches

# Largest accepted max|g - g_b| / max|g_b| between differently ordered sums: a few hundred
# units in the last place, far below any real error (a wrong row or a missing sample is O(1)).
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}

# The workers' BLAS thread count (actors.BLAS_THREADS, not imported: that module needs Ray).
BLAS_THREADS = 1


@dataclass
class Row:
    """One way of computing the batch gradient: ``g`` is the flat vector, ``kind`` how it is judged.

    ``kind``: "ref" for (b); "close" must agree with (b) within the tolerance; "exact" must also
    have the bits of the one-worker exact sum; "naive" is shown for contrast and not judged.
    """

    section: str
    label: str
    g: np.ndarray
    kind: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("On a small network and batch, compute the batch gradient as a per-sample loop, in one "
                          "pass, split over K workers and accumulated over N steps; print how far apart they are "
                          "and whether the bits match. Exit 0 if all agree, 1 if not (see docs/exactness.md).")
    parser.add_argument("--layers", default="5,16,16,3", metavar="D0,...,DL", help="layer sizes (default: 5,16,16,3)")
    parser.add_argument("--batch-size", type=int, default=37, metavar="B",
                        help="global batch size B (default: 37, not a multiple of M)")
    parser.add_argument("--micro-batch", type=int, default=4, metavar="M", help="micro-batch size M (default: 4)")
    parser.add_argument("--activation", default="tanh", choices=tuple(ACTIVATIONS), help="(default: tanh)")
    parser.add_argument("--loss", default="cross-entropy", choices=LOSSES, help="(default: cross-entropy)")
    parser.add_argument("--dtype", default="float64", choices=DTYPES, help="(default: float64)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed for weights and data (default: 0)")


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise UsageError(f"--layers needs at least an input and an output size, all >= 1, got {text!r}")
    return sizes


def flat(grads: list[np.ndarray]) -> np.ndarray:
    """Per-layer gradients as one vector in layer order (the layout of the weights)."""
    return np.concatenate([G.ravel() for G in grads])


def per_sample_loop(net: Network, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(a) Backpropagate one sample at a time and add the gradients up, in sample order."""
    total = np.zeros(net.layout.size, dtype=net.dtype)
    for n in range(len(X)):
        total += flat(net.gradient(X[n:n + 1], y[n:n + 1]))
    return total


def naive_shards(net: Network, X: np.ndarray, y: np.ndarray, shares: list[int], mean: bool = False) -> np.ndarray:
    """One GEMM per shard of ``shares[k]`` consecutive samples, shard results added left to right.

    With ``mean`` each shard sends its mean and the result is the mean of those means, times B
    (so it is comparable with the sum): what averaging per-worker means computes.
    """
    total = np.zeros(net.layout.size, dtype=net.dtype)
    lo = 0
    for size in shares:
        if size:
            g = flat(net.gradient(X[lo:lo + size], y[lo:lo + size]))
            total += g / net.dtype.type(size) if mean else g
        lo += size
    if mean:
        total *= net.dtype.type(len(X) / len(shares))
    return total


class Exact:
    """The exact mode without Ray: a ``WorkerState`` per worker, one ``ServerState``.

    ``sum(calls)`` runs ``calls`` (``(worker, micro-batch ids)`` pairs, in order), hands the
    server what each call returns (read-only, as Ray's object store would) and returns the
    batch gradient the server forms from it.
    """

    def __init__(self, net: Network, X: np.ndarray, Y: np.ndarray, batch: np.ndarray, micro_batch: int):
        self.net, self.X, self.Y, self.batch, self.M = net, X, Y, batch, micro_batch
        self.n = len(micro_batches(len(batch), micro_batch))

    def sum(self, calls: list[tuple[int, list[int]]]) -> np.ndarray:
        net = self.net
        workers: dict[int, WorkerState] = {}
        nodes, values = [], []
        for k, ids in calls:
            if k not in workers:
                workers[k] = WorkerState(net.layers, net.activation, net.loss_name, net.dtype,
                                         self.X, self.Y, self.M)
            nodes.append(tree.blocks(ids, self.n))
            value = np.empty((len(nodes[-1]), net.layout.size), dtype=net.dtype)
            workers[k].compute(net.flat, self.batch, nodes[-1], value)
            value.setflags(write=False)  # read-only, as Ray's object store hands it over
            values.append(value)
        server = ServerState(net.flat.copy(), Hyper(), net.layout.bias_mask(net.dtype))
        return np.array(server.gradient(self.n, nodes, values))


def split_even(n: int, k: int) -> list[list[int]]:
    """``cuts.even`` as lists of micro-batch ids, which the rows below edit."""
    return [list(part) for part in cuts.even(n, k)]


def shares_text(shares: list[list[int]]) -> str:
    return "+".join(str(len(s)) for s in shares)


def exact_assignments(n: int, rng: np.random.Generator) -> list[tuple[str, list[tuple[int, list[int]]]]]:
    """(label, calls) for the (c) rows: which worker computes which micro-batches."""
    out = []
    for K in (1, 2, 3, 4, 5, 8):
        shares = split_even(n, K)
        label = f"K=1, all {n} micro-batches on one worker" if K == 1 else f"K={K}, even shares {shares_text(shares)}"
        out.append((label, list(enumerate(shares))))
    points = np.sort(rng.integers(0, n + 1, size=2))
    uneven = [list(range(0, points[0])), list(range(points[0], points[1])), list(range(points[1], n))]
    out.append((f"K=3, uneven random shares {shares_text(uneven)}", list(enumerate(uneven))))
    idle = split_even(n, 3)
    idle.insert(1, [])
    out.append((f"K=4, worker 1 has nothing to do: {shares_text(idle)}", list(enumerate(idle))))
    big = n + 3
    out.append((f"K={big} > {n} micro-batches: {sum(1 for s in split_even(n, big) if not s)} idle",
                list(enumerate(split_even(n, big)))))
    robin = [list(range(k, n, 3)) for k in range(3)]
    out.append((f"K=3, round-robin (not contiguous) {shares_text(robin)}", list(enumerate(robin))))
    lost = split_even(n, 3)
    redo = lost[1]
    half = len(redo) // 2
    calls = [(0, lost[0]), (2, lost[2]), (0, redo[:half]), (2, redo[half:])]
    out.append(("K=3, worker 1 lost, its share redone by 0 and 2", calls))
    return out


def accumulations(n: int) -> list[tuple[str, list[tuple[int, list[int]]]]]:
    """(label, calls) for the (d) rows: one worker, N sequential steps over parts of the batch."""
    out = []
    for N in sorted({2, 4, n}):
        if N > n or N < 2:
            continue
        steps = split_even(n, N)
        what = "one micro-batch" if N == n else f"{shares_text(steps)} micro-batches"
        out.append((f"N={N} accumulation steps of {what}", [(0, ids) for ids in steps]))
    return out


def compute_rows(layers: tuple[int, ...], batch_size: int, micro_batch: int, activation: str, loss: str,
                 dtype: str, seed: int) -> list[Row]:
    """Every row of the table, in order; the first (c) row is the exact reference."""
    rng = np.random.default_rng(seed)
    net = Network(layers, activation, loss, dtype, seed)
    # Data twice the batch, and a shuffled batch, as the sampler would pick it.
    X_all = rng.standard_normal((2 * batch_size, layers[0])).astype(net.dtype)
    y_all = rng.integers(0, layers[-1], size=2 * batch_size)
    batch = rng.permutation(2 * batch_size)[:batch_size]
    X, y = X_all[batch], y_all[batch]
    exact = Exact(net, X_all, encode_targets(y_all, loss, layers[-1], net.dtype), batch, micro_batch)

    rows = [Row("a", "per-sample loop, summed (Nielsen)", per_sample_loop(net, X, y), "close"),
            Row("b", "one-pass batch gradient [1,X]^T Delta", flat(net.gradient(X, y)), "ref")]
    for i, (label, calls) in enumerate(exact_assignments(exact.n, rng)):
        rows.append(Row("c", "exact, " + label, exact.sum(calls), "close" if i == 0 else "exact"))
    for label, calls in accumulations(exact.n):
        rows.append(Row("d", "exact, " + label, exact.sum(calls), "exact"))
    for K in (1, 2, 3, 4, 5, 8):
        rows.append(Row("naive", f"K={K}, one GEMM per shard, added in order",
                        naive_shards(net, X, y, [len(s) for s in split_even(batch_size, K)]), "naive"))
    if batch_size >= 4:  # three shards of different sizes
        uneven = [1, batch_size // 2, batch_size - 1 - batch_size // 2]
        rows.append(Row("naive", f"K=3 shares {'+'.join(map(str, uneven))}: mean of shard means x B",
                        naive_shards(net, X, y, uneven, mean=True), "naive"))
    return rows


def diff(g: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """``max|g - ref|`` and that divided by ``max|ref|`` (elementwise ratios explode near 0)."""
    d = float(np.max(np.abs(g.astype(np.float64) - ref.astype(np.float64)), initial=0.0))
    scale = float(np.max(np.abs(ref), initial=0.0))
    return d, (d / scale if scale else (0.0 if d == 0 else float("inf")))


def report(rows: list[Row], dtype: str) -> tuple[list[str], bool]:
    """The table's lines and whether every judged row agrees."""
    tol = TOLERANCE[dtype]
    ref = next(r.g for r in rows if r.kind == "ref")
    exact_ref = next(r.g for r in rows if r.section == "c")
    width = max(len(r.label) for r in rows) + 4
    head = f"{'':{width}}  {'max abs':>7}  {'max rel':>7}  {'bits=(b)':>8}  {'bits=exact':>10}  {'sha256':8}  check"
    lines = ["max abs, max rel: against (b), rel = max|g - g_b| / max|g_b|; bits=exact: the same bits as the "
             "first (c) row; sha256: of the gradient's bytes", "", head, "-" * len(head)]
    ok = True
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            if section == "naive":
                lines.append("naive ways, for contrast (not checked): the bits depend on the split")
        a, rel = diff(r.g, ref)
        same_ref = np.array_equal(r.g, ref)
        same_exact = np.array_equal(r.g, exact_ref)
        if r.kind == "ref":
            verdict = "reference"
        elif r.kind == "naive":
            verdict = ""
        else:
            problems = ([f"rel > {tol:g}"] if not rel <= tol else []) + \
                (["bits differ"] if r.kind == "exact" and not same_exact else [])
            ok &= not problems
            rule = f"rel <= {tol:g}" + (", same bits" if r.kind == "exact" else "")
            verdict = f"FAIL: {', '.join(problems)}" if problems else f"ok ({rule})"
        tag = f"({r.section}) " if r.section != "naive" else "    "
        lines.append(f"{tag + r.label:{width}}  {a:7.1e}  {rel:7.1e}  {'yes' if same_ref else 'no':>8}  "
                     f"{'yes' if same_exact else 'no':>10}  {sha256_le(r.g)[:8]}  {verdict}".rstrip())
    return lines, ok


def run(ns: argparse.Namespace) -> int:
    layers = parse_layers(ns.layers)
    for name in ("batch_size", "micro_batch"):
        if getattr(ns, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(ns, name)}")
    if ns.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {ns.seed}")
    B, M = ns.batch_size, ns.micro_batch
    # The data (2B rows), a gradient per table row and a workspace per micro-batch size, roughly.
    P = Layout(layers).size
    check_memory(8 * (2 * B * layers[0] + 40 * P + 4 * B * max(layers)), "distbp verify", UsageError)
    with threadpool_limits(BLAS_THREADS):
        rows = compute_rows(layers, B, M, ns.activation, ns.loss, ns.dtype, ns.seed)
    n = len(micro_batches(B, M))
    print("distbp verify: is the mini-batch gradient the sum of the per-sample gradients, however the batch "
          "is split?\n(the question in docs/exactness.md)")
    print(f"network {'-'.join(map(str, layers))}, {ns.activation}, {ns.loss}, {ns.dtype}; B={B} random samples "
          f"in micro-batches of M={M} ({n} micro-batches); seed {ns.seed}\n")
    lines, ok = report(rows, ns.dtype)
    print("\n".join(lines))
    judged = sum(r.kind in ("close", "exact") for r in rows)
    print(f"\nAnswer: yes. grad E = sum_n grad e_n: the loop (a) and the one-pass GEMM (b) agree to rounding, and "
          f"with fixed micro-batches\nand a fixed tree every split (c) and every accumulation (d) gives the same "
          f"bits. For the mean, divide the sum once by B={B}.")
    if ok:
        print(f"verify: OK, all {judged} checks agree")
        return 0
    print("verify: FAILED, see the rows marked FAIL")
    return 1
