"""The distributed trainer against a single process doing the same arithmetic plainly."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import train_config

from distbp import Network
from distbp.data.datasets import spirals
from distbp.data.sampler import Sampler
from distbp.distributed.transport import ObjectStore
from distbp.lecture.optim import Hyper, init_state, update
from distbp.lecture.tree import blocks
from distbp.loops.sync import train
from distbp.run import checkpoint
from distbp.step.server import ServerState
from distbp.step.worker import WorkerState


def single_process(config, steps):
    """Weights after ``steps`` steps computed in one process: one-pass gradient, plain update."""
    data = spirals(seed=config.seed)
    net = Network(config.layer_sizes(), config.activation, config.loss, config.dtype, config.seed)
    X = data.X.astype(config.dtype)
    hyper = Hyper(config.optimizer, config.momentum, config.weight_decay)
    state = init_state(config.optimizer, net.flat.size, net.dtype)
    sampler = Sampler(len(X), config.batch_size, config.seed)
    mask = net.layout.bias_mask(net.dtype)
    for step in range(1, steps + 1):
        batch = sampler.batch(step)
        g = np.concatenate([G.ravel() for G in net.gradient(X[batch], data.y[batch])])
        scale = len(batch) if config.reduction == "mean" else None
        update(net.flat, g, state, hyper, config.lr, step, scale, mask)
    return net.flat


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ray_steps_equal_single_process_steps(ray_session, tmp_path, optimizer, reduction):
    lr = 0.05 if reduction == "mean" else 0.002
    config = train_config(tmp_path, workers=3, batch_size=50, micro_batch=8, steps=3, optimizer=optimizer,
                          reduction=reduction, lr=lr, weight_decay=0.01)
    train(config)
    got = checkpoint.load(f"{config.out}/checkpoint.npz")["weights"]
    want = single_process(config, 3)
    # same arithmetic up to the order of additions: micro-batch tree vs one GEMM over the batch
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not np.allclose(got, Network(config.layer_sizes(), seed=config.seed).flat)  # it moved


def test_float32_end_to_end(ray_session, tmp_path):
    config = train_config(tmp_path, dtype="float32", optimizer="adam", steps=2)
    summary = train(config)
    ckpt = checkpoint.load(f"{config.out}/checkpoint.npz")
    assert summary["dtype"] == "float32"
    assert ckpt["weights"].dtype == np.float32
    assert all(buf.dtype == np.float32 for buf in ckpt["optimizer"].values()) and ckpt["optimizer"]
    # what a worker sends and what the server sums and keeps
    data = spirals()
    worker = WorkerState((2, 16, 16, 3), "tanh", "cross-entropy", "float32", data.X.astype(np.float32),
                         data.y, micro_batch=8)
    end = ObjectStore(ckpt["weights"].size, "float32", servers=1).worker_end()  # rows as the actor takes them
    nodes = [blocks([0, 1, 2], 5), blocks([3, 4], 5)]
    first = end.rows(1, len(nodes[0]))
    worker.compute(ckpt["weights"], np.arange(40), nodes[0], first)
    assert all(p.dtype == np.float32 for p in end.send(first))  # what goes to the server
    first = first.copy()  # the transport reuses its output buffer
    second = end.rows(1, len(nodes[1]))
    leaves = worker.compute(ckpt["weights"], np.arange(40), nodes[1], second)
    assert first.dtype == second.dtype == np.float32 and len(leaves.errors) == len(leaves.squares) == 2
    server = ServerState(ckpt["weights"].copy(), Hyper("adam"), np.ones(ckpt["weights"].size, np.float32))
    new = server.step(5, nodes, [first, second], 0.01, 1, 40)
    assert new.dtype == np.float32 and all(b.dtype == np.float32 for b in server.state.values())


def test_outputs_follow_the_contract(ray_session, tmp_path):
    config = train_config(tmp_path, steps=4)
    summary = train(config)
    on_disk = json.load(open(f"{config.out}/summary.json"))
    for key in ("steps", "epochs", "workers", "batch_size", "dtype", "final_loss", "test_accuracy",
                "samples_per_second", "weights_sha256", "worker_nodes"):
        assert key in on_disk, key
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["test_accuracy"] is None  # spirals has no test split
    assert len(on_disk["worker_nodes"]) == 2
    lines = [json.loads(line) for line in open(f"{config.out}/metrics.jsonl")]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all({"step", "epoch", "loss", "time", "grad_xxh3"} <= m.keys() and math.isfinite(m["loss"])
               for m in steps)
    weights = checkpoint.load(f"{config.out}/checkpoint.npz")["weights"]
    assert checkpoint.sha256_le(weights) == on_disk["weights_sha256"]
    with np.load(f"{config.out}/checkpoint.npz", allow_pickle=False) as f:
        assert {"weights", "step", "config_json"} <= set(f.files)


def test_uneven_shares_and_idle_workers(ray_session, tmp_path):
    # 3 micro-batches (8, 8, 4 rows) over 5 workers: two sit each step out
    a = train(train_config(tmp_path, workers=5, batch_size=20, micro_batch=8, steps=6))
    b = train(train_config(tmp_path, workers=1, batch_size=20, micro_batch=8, steps=6))
    assert a["weights_sha256"] == b["weights_sha256"]


def test_default_train_learns_spirals(ray_session, tmp_path):
    from distbp.cli import main

    assert main(["train", "--out", str(tmp_path / "default")]) == 0
    summary = json.load(open(tmp_path / "default" / "summary.json"))
    assert summary["workers"] == 2 and summary["dataset"] == "spirals"
    assert summary["train_accuracy"] >= 0.97, summary["train_accuracy"]


@pytest.mark.parametrize("args, message", [
    (["--activation", "swish"], "--activation"),
    (["--layers", "3,8,3"], "--layers starts with 3 inputs"),
    (["--layers", "2,8,4"], "--layers ends with 4 outputs"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, args, message):
    from distbp.cli import main

    out = tmp_path / "never"
    assert main(["train", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distbp: error:") and message in err, err
    assert not out.exists()


def test_nan_in_data_from_a_real_process(tmp_path):
    X = np.random.default_rng(0).standard_normal((20, 2))
    X[3, 1] = np.nan
    np.savez(tmp_path / "bad.npz", X=X, y=np.arange(20) % 3)
    proc = subprocess.run([sys.executable, "-m", "distbp", "train", "--dataset", f"npz:{tmp_path}/bad.npz",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "NaN" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
