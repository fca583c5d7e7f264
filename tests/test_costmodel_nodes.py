"""The cost models of distbp/tools (costmodel.py, nodemodel.py): what they must say whatever their constants."""

import csv
import json

import numpy as np
import pytest

from distbp.tools import costmodel, nodemodel

P, W = 1_863_690, 4  # 784-1024-1024-10 in float32


def test_one_node_has_nothing_on_the_wire():
    c = costmodel.Constants()
    assert costmodel.ring_step(1, 16, P, 1024, W, 10, c)["allreduce"] == 0
    ps = costmodel.ps_step(1, 16, 1, P, 1024, W, 10, c)
    assert ps["push"] == ps["pull"] == 0


@pytest.mark.parametrize("N", [2, 4, 16, 64])
def test_sharded_servers_move_what_a_ring_moves(N):
    """S = N servers, one per node: each node's link carries (N - 1) / N of a vector each way per
    phase, twice per step, as a ring all-reduce's 2 (N - 1) / N (Patarasuk and Yuan)."""
    c = costmodel.Constants(socket_gbytes=1e9, ring_latency_s=0.0, overlap=0.0)  # the wire alone
    gbit = 10
    ps = costmodel.ps_step(N, 16, N, P, 1024 * N, W, gbit, c)
    ring = costmodel.ring_step(N, 16, P, 1024 * N, W, gbit, c)
    # the servers' parts are whole blocks of the vector (cuts.striped): equal within a block
    assert ps["push"] + ps["pull"] == pytest.approx(ring["allreduce"], rel=1e-4)


@pytest.mark.parametrize("S, colocated", [(1, True), (2, True), (2, False)])
def test_a_push_and_a_pull_layer_by_layer_hide_at_most_layer_1s_compute(S, colocated):
    """Each layer goes as the backward pass finishes it: what lies above layer 1 moves while layer
    1's gradient is computed, nothing of layer 1 before it; the weights come back layer 1 first,
    and what lies above it moves while layer 1's forward pass runs (nodemodel.ps_step with ``layers``)."""
    c, layers = costmodel.Constants(), (784, 1024, 1024, 10)
    whole = costmodel.ps_step(2, 1, S, P, 1024, W, 1, c, colocated=colocated)
    layered = costmodel.ps_step(2, 1, S, P, 1024, W, 1, c, colocated=colocated, layers=layers)
    layer_1 = whole["compute"] * 2 * 785 * 1024 / (6 * P)  # its weight gradient, or its forward pass: 2 of 6 flops
    for hidden in ("hidden", "hidden_pull"):
        assert whole[hidden] == 0 and 0 < layered[hidden] <= layer_1 * (1 + 1e-9)
    # (the parts of a cut by layers and of one over the whole vector differ by a block at most)
    assert layered["step"] == pytest.approx(whole["step"] - layered["hidden"] - layered["hidden_pull"], rel=1e-3)
    # each server holds a slice of every layer (cuts.striped): a link's slice of the layers above
    # layer 1 (57 % of the push) takes longer than layer 1's compute, which it hides whole
    assert layered["hidden"] == pytest.approx(layer_1, rel=1e-3)


def test_one_server_is_the_bottleneck_as_nodes_grow():
    c = costmodel.Constants()
    one = [costmodel.ps_step(N, 16, 1, P, 1024 * N, W, 100, c, colocated=False)["step"] for N in (2, 8, 64)]
    sharded = [costmodel.ps_step(N, 16, N, P, 1024 * N, W, 100, c)["step"] for N in (2, 8, 64)]
    assert one[0] < one[1] < one[2] and one[2] > 10 * sharded[2]


def test_the_table_has_every_row():
    rows = costmodel.compare(P, 1024, W)
    assert len(rows) == 2 * 7 and {r["nodes"] for r in rows} == {1, 2, 4, 8, 16, 32, 64}
    assert "| 100 | 64 |" in costmodel.markdown(rows)


# -- the fitted model: what it may claim ------------------------------------------------------------

def test_nodes_past_the_micro_batches_change_nothing():
    """B = 512, M = 64: 8 micro-batches; a 9th or 64th worker gets none (features), and neither
    does a 9th node in the N-nodes model."""
    eight = costmodel.features(8, 2, 85_002, 512, 64)
    for N in (9, 16, 64):
        np.testing.assert_array_equal(costmodel.features(N, 2, 85_002, 512, 64), eight)
    c = costmodel.Constants()
    step = costmodel.ps_step(8, 16, 8, P, 512, W, 10, c, M=64)
    assert costmodel.ps_step(64, 16, 64, P, 512, W, 10, c, M=64) == step and step["busy"] == 8


def test_one_node_with_fewer_micro_batches_than_cores_uses_only_those():
    """4 micro-batches on a 16-core node: 4 threads, one micro-batch each, at the rate of 4 threads."""
    c = costmodel.Constants()
    got = nodemodel.busiest_compute(1, 16, P, 256, W, c, M=64)
    assert got == pytest.approx(6 * P * 64 * 4 / (c.gflops(W, 4) * 1e9))
    assert got > nodemodel.busiest_compute(1, 16, P, 256, W, c)  # B / N spread over all 16 cores


def test_a_worker_moves_all_the_weights_however_many_servers():
    """K = 1 with S = 4 servers: each server moves a quarter, the worker all P weights (and its node)."""
    assert costmodel.features(1, 4, 1000, 128, 64)[2] == 2 * 1000 * 8


def test_the_fit_refuses_too_few_runs_and_names_what_it_cannot_determine():
    X = np.array([costmodel.features(K, 1, 85_002, B, 64) for K, B in ((1, 512), (2, 512), (1, 128), (2, 256))])
    with pytest.raises(costmodel.Underdetermined, match=r"4 run\(s\), at least 5 distinct needed .* "
                                                        r"cannot determine alpha, c, beta"):
        costmodel.fit(X, np.ones(4))
    # the same run twice is one point
    with pytest.raises(costmodel.Underdetermined, match=r"5 run\(s\) \(4 distinct in the model's terms\)"):
        costmodel.fit(np.vstack([X, X[:1]]), np.ones(5))
    # one worker, one server, one model: the bytes never change, so they and the latency are one column
    X = np.array([costmodel.features(1, 1, 85_002, B, 64) for B in (64, 128, 256, 512, 1024)])
    with pytest.raises(costmodel.Underdetermined) as exc:
        costmodel.fit(X, np.ones(5))
    assert "cannot determine alpha (vary" in str(exc.value) and "beta (vary K, S" in str(exc.value)
    assert " c (vary" not in str(exc.value)
    assert costmodel.undetermined(X) == ["alpha", "beta"]


def test_leave_one_out_sees_what_the_fit_hides():
    """Five runs, one of them off by 2x: the fit's own median error stays small, the error of each
    run predicted from the others does not."""
    X = np.array([costmodel.features(K, S, 85_002, B, 64) for K, S, B in
                  ((1, 1, 512), (2, 1, 512), (1, 1, 128), (2, 1, 256), (2, 2, 512))])
    T = X @ np.array([2e-3, 3e-10, 1e-9])
    T[1] *= 2
    fit = costmodel.fit(X, T)
    assert fit.points == 5 and fit.loo_median_rel_error > fit.median_rel_error


# -- time to accuracy --------------------------------------------------------------------------------

STEPS = {B: 300 * (1 + 1000 / B) for B in (64, 256, 1024, 4096)}  # S = S_min (1 + B_crit / B)


def test_time_to_accuracy_is_steps_times_the_step_of_b_on_n_nodes():
    c = costmodel.Constants()
    got = costmodel.time_to_accuracy(STEPS, 269_322, 4, nodes=(1, 2, 4), gbits=(1, 100), constants=c, cores=1,
                                     micro_batch=64)
    assert len(got["rows"]) == 2 * 3 * 4 and len(got["best"]) == 2 * 3
    one = next(r for r in got["rows"] if r["gbit"] == 1 and r["nodes"] == 1 and r["batch_size"] == 256)
    # one node of one core: 4 micro-batches one after another, no wire, the server's pass, Ray once a window
    step = 6 * 269_322 * 256 / 112e9 + 269_322 * 4 / 2.2e9 + 3e-3 / 16
    assert one["step_s"] == pytest.approx(step) and one["time_s"] == pytest.approx(STEPS[256] * step)
    for best in got["best"]:
        here = [r for r in got["rows"] if (r["gbit"], r["nodes"]) == (best["gbit"], best["nodes"])]
        assert best["time_s"] == min(r["time_s"] for r in here)
    b64 = [r for r in got["rows"] if r["batch_size"] == 64]  # one micro-batch: one node works, the others idle
    assert {r["busy_nodes"] for r in b64} == {1} and len({r["time_s"] for r in b64}) == 1
    fast, slow = ([r["time_s"] for r in got["best"] if r["gbit"] == g] for g in (100, 1))
    assert all(f <= s for f, s in zip(fast, slow))


def test_stops_paying_is_the_first_n_whose_next_saves_less_than_the_gain():
    best = [{"gbit": 10, "nodes": N, "batch_size": 256 * N, "time_s": t}
            for N, t in ((1, 100.0), (2, 60.0), (4, 50.0), (8, 20.0))]
    (got,) = costmodel.stops_paying(best, gain=0.2)
    assert (got["worth_nodes"], got["next_saves"]) == (2, pytest.approx(1 / 6))
    assert (got["fastest_nodes"], got["fastest_time_s"]) == (8, 20.0)
    (every,) = costmodel.stops_paying(best, gain=0.1)  # 2 -> 4 saves 17 %: every N pays
    assert every["worth_nodes"] == 8 and every["next_saves"] is None


def write_best(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["batch_size", "best_lr", "steps_to_target", "samples_to_target", "lr_at_edge", "b_simple"])
        writer.writerows(rows)


def test_the_time_to_accuracy_command_writes_its_table_and_files(tmp_path, capsys):
    best = tmp_path / "best.csv"
    write_best(best, [[B, 0.1, round(s), round(s) * B, False, 900] for B, s in STEPS.items()] + [[8192, "", "", "",
                                                                                                   "", ""]])
    out = tmp_path / "tta"
    assert costmodel.main(["time-to-accuracy", "--steps", str(best), "--gbits", "1,10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "never reached the target: B = [8192]" in printed and "| 64 | B = " in printed
    assert "- 10 Gbit/s: more nodes pay up to N = " in printed
    rows = list(csv.DictReader(open(out / "time_to_accuracy.csv")))
    assert len(rows) == 2 * 7 * 4 and sum(r["best"] == "True" for r in rows) == 2 * 7
    doc = json.load(open(out / "time_to_accuracy.json"))
    assert doc["unreached"] == [8192] and doc["model"]["params"] == 269_322 and len(doc["stops_paying"]) == 2
    assert (out / "time_to_accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("content, args, message", [
    (None, [], "cannot read"),
    ("batch_size,steps\n64,10\n", [], "has no column steps_to_target"),
    ("batch_size,steps_to_target\n64,ten\n", [], "line 2: batch_size '64', steps_to_target 'ten' are not numbers"),
    ("batch_size,steps_to_target\n64,\n", [], "no batch size reached the target"),
    ("batch_size,steps_to_target\n64,10\n", ["--cores", "0"], "--cores: need numbers >= 1"),
    ("batch_size,steps_to_target\n64,10\n", ["--nodes", "4,2"], "--nodes: ascending, got '4,2'"),
    ("batch_size,steps_to_target\n64,10\n", ["--micro-batch", "6.5"], "--micro-batch: need one integer"),
    ("batch_size,steps_to_target\n64,10\n", ["--bogus"], "unrecognized arguments: --bogus"),
])
def test_the_time_to_accuracy_command_refuses_bad_input_in_one_line(tmp_path, capsys, content, args, message):
    best = tmp_path / "best.csv"
    if content is not None:
        best.write_text(content)
    out = tmp_path / "never"
    assert costmodel.main(["time-to-accuracy", "--steps", str(best), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("costmodel time-to-accuracy: error: ") and message in err, err
    assert not out.exists()
