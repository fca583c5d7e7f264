"""Scaling instruments: the async/ssp modes, the cost model and scripts/scaling.py --quick."""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import train_config

from distbp import Network
from distbp.cli import main as distbp_main
from distbp.data.datasets import spirals
from distbp.loops.sync import train
from distbp.run import checkpoint
from distbp.tools import costmodel

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scaling.py"


def pushes(config) -> list[dict]:
    return [json.loads(line) for line in open(f"{config.out}/metrics.jsonl")]


@pytest.mark.parametrize("mode, staleness", [("async", None), ("ssp", 1)])
def test_async_modes_train_and_say_they_are_not_exact(ray_session, tmp_path, mode, staleness):
    config = train_config(tmp_path, mode=mode, staleness=staleness, workers=2, steps=30, optimizer="sgd", lr=0.5)
    summary = train(config)
    assert summary["exact"] is False and summary["mode"] == mode
    lines = pushes(config)
    assert len(lines) == summary["pushes"] == 30 * 2  # 8 micro-batches a step: both workers push every step
    assert lines[-1]["samples"] == 30 * 60
    # the loss falls: the trained net against the same net at its initial weights, on all the data
    data = spirals(seed=config.seed)
    start = Network(config.layer_sizes(), seed=config.seed).loss(data.X, data.y) / len(data.X)
    assert summary["final_loss"] < 0.9 * start, (summary["final_loss"], start)
    assert np.mean([m["loss"] for m in lines[-10:]]) < np.mean([m["loss"] for m in lines[:10]])


def test_ssp_keeps_its_staleness_bound(ray_session, tmp_path):
    s = 1
    config = train_config(tmp_path, mode="ssp", staleness=s, workers=3, batch_size=48, micro_batch=8, steps=12)
    train(config)
    pushed = [0, 0, 0]
    for m in pushes(config):
        # worker k began step c (its clock) only once every worker had finished step c - s - 1
        others = [pushed[j] for j in range(3) if j != m["worker"]]
        assert min(others) >= m["clock"] - 1 - s, m
        pushed[m["worker"]] += 1
        assert m["clock"] == pushed[m["worker"]]


def test_ssp_with_no_staleness_is_sync_with_pushes_added_in_turn(ray_session, tmp_path):
    # With SGD each push subtracts lr * g_k / B: the K pushes of a step make the synchronous
    # update, up to the order of the additions.  A different computation of the same thing.
    common = dict(workers=3, batch_size=48, micro_batch=8, steps=6, optimizer="sgd", lr=0.3)
    sync = train(train_config(tmp_path, **common))
    ssp = train(train_config(tmp_path, mode="ssp", staleness=0, **common))
    w_sync = checkpoint.load(f"{sync['out']}/checkpoint.npz")["weights"]
    w_ssp = checkpoint.load(f"{ssp['out']}/checkpoint.npz")["weights"]
    np.testing.assert_allclose(w_ssp, w_sync, rtol=1e-10, atol=1e-12)
    assert sync["exact"] is True and ssp["exact"] is False


@pytest.mark.parametrize("args, message", [
    (["--mode", "async", "--servers", "2"], "--servers works only with --mode sync"),
    (["--mode", "ssp", "--fault-injection", "kill-server@2"], "--fault-injection works only with --mode sync"),
    (["--mode", "async", "--staleness", "2"], "--staleness goes with --mode ssp"),
    (["--mode", "ssp", "--staleness", "-1"], "--staleness goes with --mode ssp and must be >= 0"),
])
def test_async_modes_refuse_what_they_cannot_keep(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert distbp_main(["train", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_an_async_run_cannot_be_resumed(ray_session, tmp_path, capsys):
    config = train_config(tmp_path, mode="async", steps=3)
    train(config)
    assert distbp_main(["train", "--resume", config.out, "--steps", "6"]) == 2
    assert "--resume continues only --mode sync runs" in capsys.readouterr().err


def test_cost_model_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    X = np.array([costmodel.features(N, S, P, B, 64) for N in (1, 2, 4) for S in (1, 2)
                  for P in (10_000, 1_000_000) for B in (64, 512)])
    true = np.array([2e-3, 3e-10, 1e-9])
    fit = costmodel.fit(X, X @ true * (1 + 0.01 * rng.standard_normal(len(X))))
    np.testing.assert_allclose([fit.alpha, fit.c, fit.beta], true, rtol=0.1)
    assert fit.median_rel_error < 0.02 and fit.loo_median_rel_error < 0.03 and fit.at_zero == ()
    # more assumed-network time can only slow a step down
    assert costmodel.predict(fit, 64, 1, 10**6, 4096, 64, network_bps=1e9) > costmodel.predict(fit, 64, 1, 10**6,
                                                                                                 4096, 64)


def load_script():
    spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def fake_row(name, K, B, S=1, step_s=0.01, sweep="strong", **extra):
    P = 85_002
    return {"sweep": sweep, "name": name, "layers": "64,256,256,10", "params": P, "workers": K, "servers": S,
            "batch_size": B, "per_worker_batch": B / K, "micro_batch": 64, "step_s": step_s, **extra}


def test_a_run_reused_by_two_sweeps_is_one_point_of_the_fit(monkeypatch):
    scaling = load_script()
    rows = [fake_row("s1", 1, 512, step_s=0.012), fake_row("s2", 2, 512, step_s=0.008),
            fake_row("w1", 1, 128, step_s=0.004, sweep="weak"), fake_row("w2", 2, 256, step_s=0.005, sweep="weak"),
            fake_row("v1", 2, 512, sweep="servers", step_s=0.008, measured_as="s2"),
            fake_row("v2", 2, 512, S=2, sweep="servers", step_s=0.009)]
    seen = []
    real = costmodel.fit
    monkeypatch.setattr(costmodel, "fit", lambda X, T: seen.append(np.array(X)) or real(X, T))
    model = scaling.fit_cost_model(rows, 10.0)
    assert model["points"] == ["s1", "s2", "w1", "w2", "v2"]  # v1 is s2's measurement
    (X,) = seen
    assert len(np.unique(X, axis=0)) == len(X) == 5
    assert [r["fit_point"] for r in rows] == [True, True, True, True, False, True]
    assert model["fit"]["points"] == 5 and "extrapolation" in model
    # the case: 4 configurations (K = 2, B = 512 listed three times) are too few, and it says so
    rows = [fake_row("s1", 1, 512), fake_row("s2", 2, 512), fake_row("w1", 1, 256, sweep="weak"),
            fake_row("w2", 2, 512, sweep="weak", measured_as="s2"),
            fake_row("v1", 2, 512, sweep="servers", measured_as="s2"), fake_row("v2", 2, 512, S=2, sweep="servers")]
    refused = scaling.fit_cost_model(rows, 10.0)
    assert refused["points"] == ["s1", "s2", "w1", "v2"]
    # and K = 1, B = 256 moves the bytes and does the rows of K = 2, B = 512, S = 2: one point in the model's terms
    assert refused["fit"] is None and refused["refused"].startswith(
        "cost model not fitted: 4 run(s) (3 distinct in the model's terms), at least 5 distinct needed")
    assert "cannot determine alpha, c, beta" in refused["refused"]


def test_the_extrapolation_gives_no_node_past_the_micro_batches_any_speed(monkeypatch):
    scaling = load_script()
    fit = costmodel.Fit(alpha=1e-3, c=1e-10, beta=1e-9, points=5, median_rel_error=0, max_rel_error=0,
                        loo_median_rel_error=0)
    points = [fake_row("s", 1, 512), fake_row("w", 1, 128, sweep="weak", per_worker_batch=32)]
    ex = scaling.extrapolate(fit, points, 10.0)
    assert ex["strong"]["micro_batches"] == 8
    for key, values in ex["strong"]["samples_per_s"].items():  # B = 512: 8 micro-batches, N = 8..64 the same
        assert values[3:] == [values[3]] * 4, key
    for key, values in ex["weak"]["samples_per_s"].items():  # b = 32 < M: N nodes have N / 2 micro-batches
        busy = [max(1, N // 2) for N in ex["nodes"]]
        expected = [32 * N / costmodel.predict(fit, k, {"S=1": 1, "S=4": 4, "S=N/4": max(1, k // 4)}[key], 85_002,
                                                32 * N, 64, network_bps=10e9) for N, k in zip(ex["nodes"], busy)]
        np.testing.assert_allclose(values, expected, err_msg=key)


def test_quick_sweep_writes_its_tables_and_plots(ray_session, tmp_path, capsys):
    out = tmp_path / "sweep"
    # --quick with a tiny net and few steps: the same code path, in seconds, on the session's Ray.  B = 128
    # and b = 32 with M = 64: weak K = 2 (B = 64) has one micro-batch, so one worker idles.
    assert load_script().main(["--quick", "--models", "4,16,3", "--batch-sizes", "128", "--per-worker", "32",
                               "--steps", "5", "--warmup", "1", "--mode-steps", "8", "--repeats", "2",
                               "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["sweep"] for r in rows] == ["strong"] * 2 + ["weak"] * 2 + ["servers"] * 2 + ["mode"] * 3
    strong = {int(r["workers"]): r for r in rows if r["sweep"] == "strong"}
    assert set(strong) == {1, 2} and float(strong[1]["speedup"]) == 1.0
    timed = [r for r in rows if r["sweep"] != "mode"]
    for r in timed:  # two runs each: the median and its range
        each = [float(t) for t in r["step_ms_each"].split(";")]
        assert r["repeats"] == "2" and len(each) == 2
        assert float(r["step_s_min"]) <= float(r["step_s"]) <= float(r["step_s_max"])
        assert float(r["step_s_min"]) * 1e3 == pytest.approx(min(each), abs=1e-3)
        assert float(r["samples_per_s_min"]) <= float(r["samples_per_s"]) <= float(r["samples_per_s_max"])
    idle = {(r["sweep"], int(r["workers"]), int(r["batch_size"])): int(r["idle_workers"]) for r in timed}
    assert idle[("weak", 2, 64)] == 1 and sum(idle.values()) == 1
    # servers S = 1 is strong K = 2: listed under both, measured once, fitted once
    servers = {int(r["servers"]): r for r in rows if r["sweep"] == "servers"}
    assert servers[1]["measured_as"] == strong[2]["name"] and servers[1]["fit_point"] == "False"
    assert len(list((out / "runs").glob("strong-*-K2-B128-S1-sync-r*"))) == 2
    assert not list((out / "runs").glob("servers-*-S1-*"))
    # bytes per server: with S=2 the busiest server receives ceil(P/2)/P of the bytes (P = 131)
    assert float(servers[1]["bytes_per_server"]) == float(servers[1]["bytes_all_servers"])
    two = servers[2]
    assert float(two["bytes_per_server"]) == pytest.approx(float(two["bytes_all_servers"]) * math.ceil(131 / 2) / 131)
    modes = {r["mode"]: r["exact"] for r in rows if r["sweep"] == "mode"}
    assert modes == {"sync": "True", "async": "False", "ssp": "False"}
    results = json.load(open(out / "results.json"))
    host = results["host"]
    assert host["cpus"] >= 1 and host["ray_cpus"] >= 4 and len(host["load_average_end"]) == 3
    assert results["machine"].startswith(f"{host['cpus']} cores, Ray ")
    model = json.load(open(out / "costmodel.json"))
    assert model["machine"] == results["machine"] and len(set(model["points"])) == len(model["points"]) == 5
    assert model["fit"] is not None or "cannot determine" in model["refused"]
    for name in ("throughput", "speedup", "efficiency", "breakdown", "servers", "modes", "costmodel"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", name
        assert b"tEXtDescription\x00machine: " + results["machine"].encode() in png, name
    printed = capsys.readouterr().out
    assert "machine: " in printed and "1 idle: K > ceil(B/M) = 1" in printed


def test_bad_options_are_one_line(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        load_script().main(["--quick", "--repeats", "0", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "scaling.py: error: --repeats must be at least 1\n" and not out.exists()
