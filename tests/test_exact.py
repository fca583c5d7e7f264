"""Split invariance: the batch gradient is the sum of the per-sample gradients, bit for bit,
however the batch is split over workers or accumulated over steps (issue 3)."""

import json
import math

import numpy as np
import pytest
from conftest import train_config
from threadpoolctl import threadpool_limits

from distbp import Network, cli
from distbp.data.problem import prepare
from distbp.lecture import cuts, schedule, tree
from distbp.lecture.network import encode_targets
from distbp.lecture.optim import Hyper
from distbp.loops.sync import train
from distbp.run.checkpoint import sha256_le
from distbp.step.fingerprint import grad_xxh3
from distbp.step.server import ServerState
from distbp.step.worker import WorkerState, micro_batches

# B = 61 is prime: no K > 1 divides it; M = 5 leaves a one-row last micro-batch (13 in all),
# and spirals' 1500 samples end each epoch with a batch of 36 (8 micro-batches).
B, M, STEPS = 61, 5, 50
WORKERS = (1, 2, 3, 4, 7)


def flat(grads):
    return np.concatenate([G.ravel() for G in grads])


def tree_reference(leaves, level, i):
    """Node (level, i) of the fixed tree by its definition: left + right, or left alone at the edge."""
    if level == 0:
        return leaves[i]
    left = tree_reference(leaves, level - 1, 2 * i)
    if (2 * i + 1) << (level - 1) >= len(leaves):
        return left
    return left + tree_reference(leaves, level - 1, 2 * i + 1)


def replay(config):
    """The same run in this process, without Ray: one WorkerState doing every micro-batch."""
    problem = prepare(config)
    lr_at = schedule.from_config(config, problem.total_steps, problem.sampler.steps_per_epoch)
    net = Network(problem.layers, config.activation, config.loss, config.dtype, config.seed)
    worker = WorkerState(problem.layers, config.activation, config.loss, config.dtype, problem.X, problem.Y,
                         config.micro_batch)
    server = ServerState(net.flat.copy(), Hyper(config.optimizer, config.momentum, config.weight_decay),
                         net.layout.bias_mask(net.dtype))
    grad_hashes = []
    with threadpool_limits(1):  # what the worker actors run with
        for step in range(1, problem.total_steps + 1):
            batch = problem.sampler.batch(step)
            n = math.ceil(len(batch) / config.micro_batch)
            nodes = tree.blocks(range(n), n)
            values = np.empty((len(nodes), net.layout.size), dtype=net.dtype)
            worker.compute(server.weights, batch, nodes, values)
            server.step(n, [nodes], [values], lr_at(step), step, len(batch))
            grad_hashes.append(server.report()[step]["grad_xxh3"])
    return sha256_le(server.weights), grad_hashes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_gives_the_same_bits_for_any_number_of_workers(ray_session, tmp_path, dtype, optimizer):
    lr = 0.1 if optimizer == "sgd" else 0.01
    runs = {}
    for K in WORKERS:
        config = train_config(tmp_path, workers=K, batch_size=B, micro_batch=M, steps=STEPS, dtype=dtype,
                              optimizer=optimizer, lr=lr)
        summary = train(config)
        with open(f"{config.out}/metrics.jsonl") as fh:
            grads = [r["grad_xxh3"] for r in map(json.loads, fh) if "grad_xxh3" in r]
        runs[K] = (summary["weights_sha256"], grads)
    assert len(runs[1][1]) == STEPS
    for K in WORKERS[1:]:
        assert runs[K][1] == runs[1][1], f"K={K}: a step's gradient differs from K=1"
        assert runs[K][0] == runs[1][0], f"K={K}: final weights differ from K=1"
    # The same bits as the pure-numpy computation, and the weights did move.
    assert replay(config) == runs[1]
    assert runs[1][0] != sha256_le(Network((2, 16, 16, 3), dtype=dtype, seed=0).flat)


@pytest.fixture
def problem():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((2 * B, 6))
    y = rng.integers(0, 4, size=2 * B)
    batch = rng.permutation(2 * B)[:B]
    return X, y, batch


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_batch_equals_accumulated_micro_batches_bitwise(problem, dtype):
    X, y, batch = problem
    net = Network((6, 16, 16, 4), dtype=dtype, seed=1)
    X = X.astype(dtype)
    ranges = micro_batches(B, M)
    n = len(ranges)
    with threadpool_limits(1):
        leaves = [flat(net.gradient(X[batch[r.start:r.stop]], y[batch[r.start:r.stop]])) for r in ranges]
        expected = tree_reference(leaves, tree.top_level(n), 0)
        Y = encode_targets(y, "cross-entropy", 4, dtype)
        worker = WorkerState(net.layers, "tanh", "cross-entropy", dtype, X, Y, M)
        root = tree.blocks(range(n), n)
        one_batch = np.empty((len(root), net.layout.size), dtype=dtype)
        worker.compute(net.flat, batch, root, one_batch)
        assert np.array_equal(one_batch[0], expected)
        for N in (2, 3, 5, n):
            table = {}
            for ids in cuts.even(n, N):  # N steps, one after another, on the same worker
                nodes = tree.blocks(ids, n)
                values = np.empty((len(nodes), net.layout.size), dtype=dtype)
                worker.compute(net.flat, batch, nodes, values)
                table.update(zip(nodes, values))
            assert np.array_equal(tree.combine(table, n, np.add), expected), f"N={N}"
    # Not trivially so: one GEMM over the whole batch rounds differently.
    assert not np.array_equal(flat(net.gradient(X[batch], y[batch])), expected)


@pytest.mark.parametrize("activation, loss", [("tanh", "cross-entropy"), ("relu", "squared"),
                                              ("sigmoid", "cross-entropy"), ("identity", "squared")])
def test_shard_gradients_sum_to_the_single_process_gradient(problem, activation, loss):
    X, y, batch = problem
    X, y = X[batch], y[batch]
    net = Network((6, 16, 16, 4), activation, loss, "float64", seed=2)
    whole = flat(net.gradient(X, y))
    rng = np.random.default_rng(4)
    for K in range(1, 6):
        points = np.sort(rng.integers(0, B + 1, size=K - 1))
        uneven = [(a, b) for a, b in zip([0, *points], [*points, B])]
        even = [(s.start, s.stop) for s in cuts.even(B, K)]
        for shares in (even, uneven):
            total = np.zeros_like(whole)
            for lo, hi in shares:
                if hi > lo:
                    total += flat(net.gradient(X[lo:hi], y[lo:hi]))
            assert np.abs(total - whole).max() <= 1e-12 * np.abs(whole).max(), (K, shares)


def test_verify_exits_0_and_prints_the_table(capsys):
    assert cli.main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out and "FAIL" not in out
    assert out.count("(c) exact") >= 6 and "(d) exact" in out and "(a) per-sample loop" in out
    assert cli.main(["verify", "--dtype", "float32", "--activation", "relu", "--loss", "squared",
                     "--batch-size", "50", "--micro-batch", "8"]) == 0


def test_verify_exits_1_when_the_sum_depends_on_the_split(capsys, monkeypatch):
    """Replace the fixed tree by adding nodes in the order they come: verify must notice."""
    def in_arrival_order(nodes, n, add, root=None):
        values = list(nodes.values())
        total = values[0]
        for v in values[1:]:
            total = add(total, v)
        return total

    monkeypatch.setattr(tree, "combine", in_arrival_order)
    assert cli.main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "verify: FAILED" in out


def test_verify_bad_options_exit_2(capsys):
    assert cli.main(["verify", "--micro-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "distbp: error: --micro-batch must be at least 1, got 0"


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_the_server_sums_and_updates_in_chunks_as_in_one_pass(monkeypatch, optimizer):
    """ServerState works through the vector in cache-sized chunks: the weights, the optimizer
    state and the gradient hash are those of whole-vector arithmetic."""
    import distbp.step.server as server_module
    from distbp.lecture.optim import init_state, update

    monkeypatch.setattr(server_module, "CHUNK_BYTES", 8 * 7)  # 7 float64 a chunk: many chunks, ragged last one
    net = Network((2, 16, 16, 3), dtype="float64", seed=3)
    hyper, mask = Hyper(optimizer, 0.9, 0.01), net.layout.bias_mask(net.dtype)
    server = ServerState(net.flat.copy(), hyper, mask)
    assert len(server.chunks) > 20
    rng = np.random.default_rng(0)
    w, state = net.flat.copy(), init_state(optimizer, net.layout.size, net.dtype)
    n = 5  # two workers: nodes (1, 0) and (0, 2) from one, (0, 3), (0, 4) from the other
    nodes = [[(1, 0), (0, 2)], [(0, 3), (0, 4)]]
    for t in (1, 2, 3):
        values = [rng.standard_normal((len(k), net.layout.size)) for k in nodes]
        table = {node: row for k, v in zip(nodes, values) for node, row in zip(k, v)}
        g = tree.combine(table, n, lambda a, b: a + b)
        server.step(n, nodes, values, 0.05, t, 61.0)
        assert server.report()[t]["grad_xxh3"] == grad_xxh3(g)
        update(w, g.copy(), state, hyper, 0.05, t, 61.0, mask)
        assert np.array_equal(server.weights, w)
        for name in state:
            assert np.array_equal(server.state[name], state[name])
