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
    assert fit.median_rel_error < 0.02
    # more assumed-network time can only slow a step down
    assert costmodel.predict(fit, 64, 1, 10**6, 4096, 64, network_bps=1e9) > costmodel.predict(fit, 64, 1, 10**6,
                                                                                                 4096, 64)


def load_script():
    spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_quick_sweep_writes_its_tables_and_plots(ray_session, tmp_path, capsys):
    out = tmp_path / "sweep"
    # --quick with a tiny net and few steps: the same code path, in seconds, on the session's Ray
    assert load_script().main(["--quick", "--models", "4,16,3", "--batch-sizes", "64", "--per-worker", "32",
                               "--steps", "5", "--warmup", "1", "--mode-steps", "8", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["sweep"] for r in rows} == {"strong", "weak", "servers", "mode"}
    strong = {int(r["workers"]): r for r in rows if r["sweep"] == "strong"}
    assert set(strong) == {1, 2} and float(strong[1]["speedup"]) == 1.0
    assert all(float(r["step_s"]) > 0 for r in rows if r["sweep"] != "mode")
    # bytes per server: with S=2 the busiest server receives ceil(P/2)/P of the bytes (P = 131)
    servers = {int(r["servers"]): r for r in rows if r["sweep"] == "servers"}
    assert float(servers[1]["bytes_per_server"]) == float(servers[1]["bytes_all_servers"])
    two = servers[2]
    assert float(two["bytes_per_server"]) == pytest.approx(float(two["bytes_all_servers"]) * math.ceil(131 / 2) / 131)
    modes = {r["mode"]: r["exact"] for r in rows if r["sweep"] == "mode"}
    assert modes == {"sync": "True", "async": "False", "ssp": "False"}
    assert json.load(open(out / "results.json"))["rows"]
    assert "fit" in json.load(open(out / "costmodel.json"))
    for name in ("throughput", "speedup", "efficiency", "breakdown", "servers", "modes", "costmodel"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "cost model:" in capsys.readouterr().out
