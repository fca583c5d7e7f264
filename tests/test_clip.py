"""--clip-norm and --optimizer adamw keep exactness: the same bits for any K and S.

The gradient's norm is the one number of the whole vector; each server adds up its fixed
blocks' squares and the S results are added exactly (math.fsum), so neither the cut into
servers nor the order of arrival changes a bit.
"""

import json
import math

import numpy as np
import pytest
import ray
from conftest import train_config

from distbp.distributed.actors import ParameterServer
from distbp.distributed.servers import Servers
from distbp.distributed.store import Hand
from distbp.distributed.transport import ObjectStore
from distbp.lecture import cuts, tree
from distbp.lecture.optim import Hyper
from distbp.loops.sync import train
from distbp.step.outcome import Why
from distbp.step.server import NonFiniteGradient, ServerState
from distbp.step.worker import Leaves

# where each layer of a vector starts, then its end (Layout.offsets)
EDGES = {371: [0, 100, 371], 100_000: [0, 60_000, 99_000, 100_000], 200_003: [0, 150_000, 200_003]}


def test_striped_parts_are_whole_blocks_a_slice_of_every_layer_as_even_as_that_allows():
    for n, k in [(371, 3), (10, 3), (5000, 3), (100_000, 7), (3000, 1024), (1, 1), (200_003, 5)]:
        for edges in (None, EDGES.get(n)):
            parts, blocks = cuts.striped(n, k, edges), cuts.blocks(n)
            assert len(parts) == k
            runs = sorted((r for part in parts for r in part.runs), key=lambda r: r.start)  # the parts tile the vector
            assert runs[0].start == 0 and runs[-1].stop == n and all(a.stop == b.start for a, b in zip(runs, runs[1:]))
            cut_at = {b.start for b in blocks} | {n}
            assert all(r.start in cut_at and r.stop in cut_at for r in runs)  # no block is cut
            spans = [range(a, b) for a, b in zip(edges, edges[1:])] if edges else [range(n)]
            for span in spans:  # of each layer, as many blocks each, give or take one
                counts = [sum(b.start in span and any(b.start in r for r in part.runs) for b in blocks)
                          for part in parts]
                assert max(counts) - min(counts) <= 1
            assert all(list(part.runs) == sorted(part.runs, key=lambda r: r.start) for part in parts)
            counts = [sum(any(b.start in r for r in part.runs) for b in blocks) for part in parts]
            assert max(counts) - min(counts) <= 1  # and of the whole vector
            if edges is None:  # one span: contiguous parts, in order
                assert all(len(p.runs) == 1 for p in parts if len(p))
                assert [p.runs[0].start for p in parts if len(p)] == sorted(p.runs[0].start for p in parts if len(p))
            for part in parts:  # its blocks, as its own columns, tile them
                inner = cuts.within(n, part)
                assert sum(len(b) for b in inner) == len(part)
                assert all(a.stop == b.start for a, b in zip(inner, inner[1:]))
    assert len(cuts.striped(200_003, 2, EDGES[200_003])[0].runs) == 2  # a run of each layer


def test_a_part_takes_and_puts_its_entries_and_maps_its_columns():
    part = cuts.Part([range(2, 5), range(5, 6), range(9, 12), range(20, 20)])
    assert part.runs == (range(2, 6), range(9, 12)) and len(part) == 7  # adjacent runs merged, empty ones gone
    vector = np.arange(30.0).reshape(2, 15)
    mine = part.take(vector)
    np.testing.assert_array_equal(mine[0], [2, 3, 4, 5, 9, 10, 11])
    assert [part.local(c) for c in (0, 3, 6, 9, 10, 15)] == [0, 1, 4, 4, 5, 7]
    assert part.segments(2, 6) == [(range(2, 4), range(4, 6)), (range(4, 6), range(9, 11))]
    out = np.zeros_like(vector)
    part.put(out, mine)
    np.testing.assert_array_equal(out[:, [2, 3, 4, 5, 9, 10, 11]], mine)
    assert out.sum() == mine.sum()


def servers_of(n, S, hyper, w0, mask):
    """S ServerStates over ``cuts.striped(n, S, edges)``, as the actors make them."""
    parts = cuts.striped(n, S, EDGES.get(n))
    return parts, [ServerState(part.take(w0).copy(), hyper, part.take(mask), cuts.within(n, part)) for part in parts]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_norm_and_the_weights_are_the_same_bits_for_any_S(dtype):
    """Without Ray: a vector with blocks of ~200 entries (numpy's pairwise sums at work inside
    each), steps split into gather and apply over S servers against one server's step."""
    n, steps = 200_003, 4
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(n).astype(dtype)
    mask = (np.arange(n) % 7 != 0).astype(dtype)
    grads = [(rng.standard_normal((3, n)) * 50).astype(dtype) for _ in range(steps)]
    # three micro-batches, two workers' shares: the tree nodes (1, 0) and (0, 2)
    nodes = [tree.blocks(range(0, 2), 3), tree.blocks(range(2, 3), 3)]
    values = [[(g[0] + g[1])[None, :], g[2][None, :]] for g in grads]
    hyper = Hyper("adamw", weight_decay=0.01, clip_norm=1.0)
    results = {}
    for S in (1, 2, 3, 5):
        ranges, servers = servers_of(n, S, hyper, w0, mask)
        for t, v in enumerate(values, start=1):
            if S == 1:
                servers[0].step(3, nodes, v, 0.01, t, 64)
            else:
                squares = [s.gather(3, nodes, [part.take(rows) for rows in v], t)
                           for s, part in zip(servers, ranges)]
                for s in servers:
                    s.apply(0.01, t, 64, squares)
        norms = {tuple(r["grad_norm"] for _, r in sorted(s.report().items())) for s in servers}
        assert len(norms) == 1  # every server the same norm
        whole = np.empty(n, dtype)
        for s, part in zip(servers, ranges):
            part.put(whole, s.weights)
        results[S] = (whole.tobytes(), norms.pop())
    assert len({w for w, _ in results.values()}) == 1
    assert len({norm for _, norm in results.values()}) == 1
    norm = results[1][1]
    assert min(norm) > 1.0  # clipped every step: the test is about the clipped update
    summed = values[0][0][0].astype(np.float64) + values[0][1][0]  # (1, 0) + (0, 2): the batch gradient
    assert math.isclose(norm[0], float(np.linalg.norm(summed)) / 64, rel_tol=1e-5)


def test_a_non_finite_norm_or_gradient_is_refused_by_every_server():
    n = 50
    hyper = Hyper("sgd", clip_norm=1.0)
    w0, mask = np.ones(n), np.ones(n)
    ranges, servers = servers_of(n, 2, hyper, w0, mask)
    node = tree.blocks(range(1), 1)
    for s, r in zip(servers, ranges):  # finite entries whose squares overflow: diverged, on each server
        with pytest.raises(NonFiniteGradient, match="non-finite"):
            s.gather(1, [node], [r.take(np.full((1, n), 1e200))], 1)
    # each server's squares add up to a finite 1.2e308, all of them to more than the largest float
    huge = np.full((1, n), 2.2e153)
    squares = [s.gather(1, [node], [r.take(huge)], 1) for s, r in zip(servers, ranges)]
    assert all(np.isfinite(part.sum()) for part in squares)
    for s in servers:
        with pytest.raises(NonFiniteGradient, match="norm"):
            s.apply(0.1, 1, None, squares)
        np.testing.assert_array_equal(s.weights, 1.0)
        assert s.t == 0
    bad = np.ones((1, n))
    bad[0, 3] = np.nan
    with pytest.raises(NonFiniteGradient):
        servers[0].gather(1, [node], [bad[:, :25]], 1)
    squares = [s.gather(1, [node], [np.ones((1, 25))], 1) for s in servers]  # then a good step goes through
    for s in servers:
        s.apply(0.1, 1, None, squares)
    assert all(s.t == 1 for s in servers)


def test_a_server_that_refuses_stops_the_step_on_every_server(ray_session):
    """Through Ray, in windows: under --clip-norm each server's update waits for every server's
    sums of squares, so one refusal stops the step; the driver calls the window off and no
    server has updated.  The next window's step goes through, clipped by the whole norm."""
    n, S = 40, 2
    transport = ObjectStore(n, np.float64, S)
    hyper = Hyper("sgd", clip_norm=1.0)
    servers = Servers(lambda s: ParameterServer.remote(s, np.ones(n), hyper, np.ones(n), transport),
                      transport.parts)
    node = tree.blocks(range(1), 1)
    meta = Leaves([0.0], [0.0], 0.0)

    def window(w: int, rows: np.ndarray):
        ray.get([a.ask.remote(Hand(f"k{w}", 1, part.take(rows), meta))
                 for a, part in zip(servers.actors, transport.parts)])
        return servers.steps(w, [(1, 1, [node], [f"k{w}"], 0.1, None, 1, None)])

    bad = np.ones((1, n))
    bad[0, 30] = np.inf  # in the second server's range
    outcomes, _ = window(1, bad)
    done, stopped = ray.get(outcomes[1])
    assert done == {} and (stopped.why, stopped.step) == (Why.GRADIENT, 1)
    servers.call_off(1)  # as the driver does once a server stops
    done, stopped = ray.get(outcomes[0])
    assert done == {} and (stopped.why, stopped.step) == (Why.CALLED_OFF, 1)
    assert ray.get([a.step_count.remote() for a in servers.actors]) == [0, 0]
    outcomes, published = window(2, np.ones((1, n)))
    assert [ray.get(o)[1] for o in outcomes] == [None, None]
    # the norm of a vector of 40 ones is sqrt(40): clipped to 1, each entry moves by 0.1 / sqrt(40)
    np.testing.assert_allclose(np.concatenate([p.weights for p in ray.get(published)]),
                               1 - 0.1 / (math.sqrt(40) + 1e-6))
    for actor in servers.actors:
        ray.kill(actor)


@pytest.mark.parametrize("options", [dict(optimizer="sgd", lr=0.5, clip_norm=0.05),
                                     dict(optimizer="adamw", weight_decay=0.1, clip_norm=0.05,
                                          adam_betas="0.8,0.99", adam_eps=1e-6)])
def test_clipping_and_adamw_give_the_same_bits_for_any_K_and_S(ray_session, tmp_path, options):
    runs = {}
    for K, S in [(1, 1), (2, 2), (3, 3), (1, 3), (3, 1), (2, 1)]:
        config = train_config(tmp_path, workers=K, servers=S, batch_size=61, micro_batch=5, steps=6, **options)
        summary = train(config)
        with open(f"{config.out}/metrics.jsonl") as fh:
            norms = [r["grad_norm"] for r in map(json.loads, fh) if "loss" in r]
        runs[(K, S)] = (summary["weights_sha256"], tuple(norms))
    assert len(set(runs.values())) == 1, runs
    norms = runs[(1, 1)][1]
    assert len(norms) == 6 and min(norms) > options["clip_norm"]  # clipping was at work on every step
