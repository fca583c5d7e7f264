"""--servers S: the weights split over S server actors, each receiving only its range."""

import json

import numpy as np
import pytest
from conftest import train_config

from distbp.errors import UsageError
from distbp.lecture import cuts
from distbp.lecture.network import Layout
from distbp.lecture.tree import blocks
from distbp.loops.sync import train
from distbp.run import checkpoint
from distbp.step.worker import micro_batches


def test_ranges_tile_the_vector():
    for size, count in [(10, 1), (10, 3), (7, 7), (1000, 4)]:
        got = cuts.even(size, count)
        assert got[0].start == 0 and got[-1].stop == size and len(got) == count
        assert all(a.stop == b.start for a, b in zip(got, got[1:]))
        assert max(len(r) for r in got) - min(len(r) for r in got) <= 1


def test_any_number_of_servers_gives_the_same_bits(ray_session, tmp_path):
    # Adam with weight decay: per-range optimizer state and decay mask; 3 servers cut inside layers.
    common = dict(batch_size=60, micro_batch=8, steps=4, optimizer="adam", weight_decay=0.01)
    runs = {(k, s): train(train_config(tmp_path, workers=k, servers=s, **common))
            for k, s in [(2, 1), (2, 2), (2, 3), (3, 2)]}
    hashes = {key: run["weights_sha256"] for key, run in runs.items()}
    assert len(set(hashes.values())) == 1, hashes
    assert runs[(2, 3)]["servers"] == 3 and len(runs[(2, 3)]["server_nodes"]) == 3
    # the checkpoint, joined from three servers' snapshots, holds those weights and Adam's state
    one = checkpoint.load(f"{runs[(2, 1)]['out']}/checkpoint.npz")
    three = checkpoint.load(f"{runs[(2, 3)]['out']}/checkpoint.npz")
    assert checkpoint.sha256_le(three["weights"]) == hashes[(2, 1)]
    for name in ("m", "v"):
        np.testing.assert_array_equal(one["optimizer"][name], three["optimizer"][name])


def test_each_server_receives_only_its_range(ray_session, tmp_path):
    K, B, M, S = 3, 60, 8, 3
    config = train_config(tmp_path, workers=K, batch_size=B, micro_batch=M, servers=S, steps=3)
    summary = train(config)
    lines = [json.loads(line) for line in open(f"{config.out}/metrics.jsonl")]
    got = [m["server_bytes_in"] for m in lines if "loss" in m]
    # Independently: each worker sends the tree nodes covering its share, restricted to the range.
    n = len(micro_batches(B, M))
    nodes = sum(len(blocks(share, n)) for share in cuts.even(n, K) if share)
    edges = Layout(config.layer_sizes()).offsets
    size = edges[-1]
    bounds = cuts.striped(size, S, edges)  # a slice of every layer each
    assert all(len(part.runs) == len(edges) - 1 for part in bounds)
    want = [nodes * len(r) * 8 for r in bounds]  # float64
    assert sum(want) == nodes * size * 8  # together: what one server would receive
    if not summary["faults"].get("backups"):
        assert got == [want] * 3
    else:  # a late share was redone in other pieces on a loaded machine: other nodes, still only the range
        for step in got:
            sent = step[0] // (len(bounds[0]) * 8)  # nodes sent this step
            assert step == [sent * len(r) * 8 for r in bounds]


def test_a_killed_server_among_several_recovers_to_the_same_bits(ray_session, tmp_path):
    plain = train(train_config(tmp_path, servers=2, steps=5))
    hit = train(train_config(tmp_path, servers=2, steps=5, checkpoint_every=2, fault_injection="kill-server@4"))
    assert hit["faults"]["server_restarts"] == 1
    assert hit["weights_sha256"] == plain["weights_sha256"]


def test_servers_auto_is_one_server_on_one_machine_and_is_recorded_as_a_number(ray_session, tmp_path, capsys):
    """The default: one server a node (tests/test_bench_nodes.py: 2 on 2 nodes); the checkpoint and
    the summary hold the number it chose, so a resume elsewhere keeps it."""
    from distbp.cli import main

    summary = train(train_config(tmp_path, steps=3))
    assert summary["config"]["servers"] == summary["servers"] == 1
    assert checkpoint.load(f"{summary['out']}/checkpoint.npz")["config"]["servers"] == 1
    with pytest.raises(UsageError, match="--server-resource works only with --mode sync"):
        train_config(tmp_path, mode="async", server_resource="server_node")
    for bad in ("0", "two", "1.5"):
        assert main(["train", "--servers", bad, "--out", str(tmp_path / "bad")]) == 2
        assert capsys.readouterr().err.strip().endswith(f"--servers must be at least 1, or auto, got {bad}")
        assert not (tmp_path / "bad").exists()


def test_more_servers_than_weights_is_refused(tmp_path):
    with pytest.raises(UsageError, match="--servers 100"):
        train(train_config(tmp_path, layers="2,3,3", servers=100))
    with pytest.raises(UsageError, match="--servers must be at least 1"):
        train_config(tmp_path, servers=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_large_vector_whose_chunks_differ_in_length_is_summed_and_updated(dtype):
    """784-1024-1024-10 (1,863,690 weights): the server's cache-sized chunks are whole blocks
    (for --clip-norm), so they are not all of one length; every chunk gets its scratch."""
    from distbp.lecture.optim import Hyper
    from distbp.step.server import ServerState

    n = Layout((784, 1024, 1024, 10)).size
    rng = np.random.default_rng(1)
    w0, a, b = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    for hyper in (Hyper("sgd"), Hyper("sgd", clip_norm=1e9)):
        server = ServerState(w0.copy(), hyper, None)
        assert len({hi - lo for lo, hi in server.chunks}) > 1  # what the test is about
        server.step(2, [blocks(range(0, 1), 2), blocks(range(1, 2), 2)], [a[None, :], b[None, :]], 0.5, 1, None)
        assert server.weights.tobytes() == (w0 - dtype(0.5) * (a + b)).tobytes()


def _pass_case(dtype):
    """A 784-1024-1024-10 vector and the nodes of 3 workers over 5 micro-batches."""
    n = Layout((784, 1024, 1024, 10)).size
    rng = np.random.default_rng(2)
    shares = [range(0, 2), range(2, 3), range(3, 5)]
    nodes = [blocks(share, 5) for share in shares]
    values = [rng.standard_normal((len(node_list), n)).astype(dtype) for node_list in nodes]
    return rng.standard_normal(n).astype(dtype), nodes, values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_servers_pass_gives_the_same_bits_on_any_number_of_threads(dtype):
    """The sum, its check, the hash and the update run over the chunks on T threads: elementwise,
    so every T gives the bits of one thread (weights, optimizer state, grad_xxh3, norm)."""
    from distbp.lecture.optim import Hyper
    from distbp.step.server import ServerState

    w0, nodes, values = _pass_case(dtype)
    mask = np.ones_like(w0)
    mask[::7] = 0
    for hyper, scale in ((Hyper("sgd"), 256.0), (Hyper("adamw", weight_decay=0.01), None),
                         (Hyper("momentum", clip_norm=1.0), 256.0)):
        runs = []
        for threads in (1, 2, 3):
            server = ServerState(w0.copy(), hyper, mask, threads=threads)
            assert server.threads == threads
            for t in (1, 2):
                server.step(5, nodes, values, 0.1, t, scale)
            report = server.report()
            runs.append((server.weights.tobytes(), [buf.tobytes() for buf in server.state.values()],
                         [(r["grad_xxh3"], r.get("grad_norm")) for r in report.values()]))
        assert runs[1] == runs[0] and runs[2] == runs[0], hyper


def test_a_step_whose_inputs_stop_coming_is_abandoned_and_changes_nothing():
    """``ready`` says no for a late chunk (a window called off while a push was under way): the
    step raises Abandoned, nothing is applied or hashed, and the same step then goes through
    with the bits of a server that never saw it; ``updated`` names every chunk once."""
    from distbp.lecture.optim import Hyper
    from distbp.step.server import Abandoned, ServerState

    w0, nodes, values = _pass_case(np.float32)
    server = ServerState(w0.copy(), Hyper("adam"), None, threads=2)
    last = server.chunks[-1]
    with pytest.raises(Abandoned):
        server.step(5, nodes, values, 0.1, 1, None, ready=lambda lo, hi: (lo, hi) != last)
    assert server.t == 0 and server.report() == {}
    assert server.weights.tobytes() == w0.tobytes() and not server.state["m"].any()
    done: list[int] = []
    server.step(5, nodes, values, 0.1, 1, None, updated=done.append)
    assert sorted(done) == list(range(len(server.chunks)))
    fresh = ServerState(w0.copy(), Hyper("adam"), None)
    fresh.step(5, nodes, values, 0.1, 1, None)
    assert server.weights.tobytes() == fresh.weights.tobytes()
    assert server.report()[1]["grad_xxh3"] == fresh.report()[1]["grad_xxh3"]
