"""``distbp train``: the story of a run, top to bottom.

1. Load and check the data and the options (nothing is written before they pass).
2. Start or join Ray; put the data in the object store once; place one parameter server
   and K workers.
3. Each step: the sampler picks the global batch (independent of K), it is cut into
   micro-batches, the workers backpropagate contiguous shares of them, the server adds
   their tree nodes into the batch gradient and updates.  Object references flow from the
   server to the workers and back without the driver touching the weights.
4. Every epoch: evaluate, checkpoint.  At the end: summary.json.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from . import checkpoint, schedule, tree
from . import data as datasets
from .config import Config
from .errors import DataError, UsageError
from .network import Layout, Network, encode_targets
from .optim import Hyper
from .step import split_even


@dataclass
class Problem:
    """What the options and the data decide before any process starts."""

    data: datasets.Dataset
    layers: tuple[int, ...]
    X: np.ndarray  # training features in the run's dtype
    Y: np.ndarray  # training labels as backprop wants them
    sampler: datasets.Sampler
    total_steps: int


def prepare(config: Config) -> Problem:
    """Load the data and check that it fits the options; raises DataError or UsageError."""
    data = datasets.load(config.dataset, config.data_dir, config.seed)
    if config.val_fraction:
        data = datasets.hold_out(data, config.val_fraction, config.seed)
    layers = config.layer_sizes() or (data.n_features, 64, 64, data.n_outputs)
    if layers[0] != data.n_features:
        raise UsageError(f"--layers starts with {layers[0]} inputs but {data.name} has "
                         f"{data.n_features} features")
    if layers[-1] != data.n_outputs:
        raise UsageError(f"--layers ends with {layers[-1]} outputs but {data.name} has "
                         f"{data.n_outputs} {'classes' if data.n_classes else 'targets'}")
    if data.n_classes is None and config.loss == "cross-entropy":
        raise UsageError(f"{data.name} has float targets: use --loss squared")
    if config.batch_size > len(data.X):
        raise UsageError(f"--batch-size {config.batch_size} is larger than the training set "
                         f"({len(data.X)} samples)")
    dtype = np.dtype(config.dtype)
    X = np.ascontiguousarray(data.X, dtype=dtype)
    Y = encode_targets(data.y, config.loss, layers[-1], dtype)
    sampler = datasets.Sampler(len(X), config.batch_size, config.seed)
    total = config.steps or max(1, math.ceil(config.epochs * sampler.steps_per_epoch))
    return Problem(data, layers, X, Y, sampler, total)


def make_out_dir(path: str | None) -> str:
    """Create the results directory; refuse one that already holds results."""
    path = path or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"--out {path} already exists and is not empty; choose a new directory "
                         f"(or --resume {path} to continue it)")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        open(probe, "w").close()
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror})") from None
    return path


def evaluate(net: Network, X: np.ndarray, y: np.ndarray, chunk: int = 4096) -> tuple[float, float]:
    """Mean error and accuracy of ``net`` on ``(X, y)``, in chunks to bound memory."""
    total, correct = 0.0, 0
    for lo in range(0, len(X), chunk):
        Xc, yc = X[lo:lo + chunk], y[lo:lo + chunk]
        total += net.loss(Xc, yc)
        pred = net.forward(Xc).argmax(axis=1)
        correct += int(np.sum(pred == (yc.argmax(axis=1) if yc.ndim == 2 else yc)))
    return total / len(X), correct / len(X)


class Progress:
    """A tqdm bar on a terminal; plain log lines (one per epoch) otherwise."""

    def __init__(self, total: int, initial: int = 0):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step(self, **fields) -> None:
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(config: Config) -> dict:
    """Run ``config`` to the end and return the summary (also written to ``<out>/summary.json``)."""
    import ray  # the math above runs without Ray; only the run itself needs it

    from .actors import ParameterServer, Worker
    from .runtime import connect, in_bundle, place

    problem = prepare(config)
    out = make_out_dir(config.out)
    layout = Layout(problem.layers)
    dtype = np.dtype(config.dtype)
    net = Network(problem.layers, config.activation, config.loss, dtype, config.seed)
    hyper = Hyper(config.optimizer, config.momentum, config.weight_decay)
    K, M, sampler = config.workers, config.micro_batch, problem.sampler
    lr_at = schedule.from_config(config, problem.total_steps, sampler.steps_per_epoch)  # step t (from 1) -> lr

    started_ray = connect(config.address, cpus_wanted=K + 1)
    pg = place(K + 1)
    try:
        X_ref, Y_ref = ray.put(problem.X), ray.put(problem.Y)
        server = ParameterServer.options(**in_bundle(pg, 0)).remote(
            net.flat, 0, layout.size, hyper, layout.bias_mask(dtype))
        workers = [Worker.options(**in_bundle(pg, k + 1)).remote(
            problem.layers, config.activation, config.loss, dtype, X_ref, Y_ref, M) for k in range(K)]
        worker_nodes = ray.get([w.node_id.remote() for w in workers])
        server_node = ray.get(server.node_id.remote())

        metrics = open(os.path.join(out, "metrics.jsonl"), "w")
        progress = Progress(problem.total_steps)
        weights = server.weights.remote()
        pending: deque = deque()
        last = {"loss": float("nan")}
        seen = 0  # samples trained on by this process, for samples/s
        t0 = time.perf_counter()

        def record(entry) -> None:
            nonlocal seen
            t, batch_size, info_refs, report_ref = entry
            infos = ray.get(info_refs)
            report = ray.get(report_ref)[t + 1]
            loss = math.fsum(v for losses, _ in infos for v in losses) / batch_size
            seen += batch_size
            last.update(step=t + 1, epoch=sampler.epoch_of(t) + 1, loss=loss, lr=lr_at(t + 1),
                        time=round(time.perf_counter() - t0, 6), grad_sha256=report["grad_sha256"],
                        worker_compute=max(s for _, s in infos), server_sum=report["server_sum"],
                        update=report["update"])
            metrics.write(json.dumps(last) + "\n")
            shown = {"loss": f"{loss:.4f}"}
            if "test_accuracy" in last:  # the last evaluation's
                shown[f"{problem.data.test_name}_acc"] = f"{last['test_accuracy']:.4f}"
            shown["samples/s"] = f"{seen / (time.perf_counter() - t0):.0f}"
            progress.step(**shown)

        def end_of_epoch(t: int) -> None:
            while pending:
                record(pending.popleft())
            metrics.flush()
            net.flat[:] = ray.get(weights)
            line = f"epoch {sampler.epoch_of(t) + 1} step {t + 1}/{problem.total_steps} loss {last['loss']:.4f}"
            if problem.data.X_test is not None:
                test_loss, test_acc = evaluate(net, problem.data.X_test, problem.data.y_test)
                last.update(test_loss=test_loss, test_accuracy=test_acc)
                metrics.write(json.dumps({"step": t + 1, "epoch": sampler.epoch_of(t) + 1,
                                          f"{problem.data.test_name}_loss": test_loss,
                                          f"{problem.data.test_name}_accuracy": test_acc}) + "\n")
                line += f" {problem.data.test_name}_acc {test_acc:.4f}"
            progress.log(line + f" lr {last['lr']:.3g} samples/s {seen / (time.perf_counter() - t0):.0f}")
            snap = ray.get(server.snapshot.remote())
            checkpoint.save(os.path.join(out, "checkpoint.npz"), snap.pop("weights"), snap, t + 1,
                            config.to_dict())

        for t in range(problem.total_steps):
            batch = sampler.batch(t)
            n = math.ceil(len(batch) / M)
            shares = [ids for ids in split_even(n, K)]
            busy = [(w, ids) for w, ids in zip(workers, shares) if ids]
            calls = [w.compute.remote(batch, ids, weights) for w, ids in busy]
            nodes = [tree.blocks(ids, n) for _, ids in busy]
            scale = len(batch) if config.reduction == "mean" else None
            weights = server.step.remote(n, nodes, lr_at(t + 1), t + 1, scale, *[c[0] for c in calls])
            pending.append((t, len(batch), [c[1] for c in calls], server.report.remote()))
            while len(pending) > 1:
                record(pending.popleft())
            if (t + 1) % sampler.steps_per_epoch == 0 or t + 1 == problem.total_steps:
                end_of_epoch(t)
        elapsed = time.perf_counter() - t0
        progress.close()
        metrics.close()
    finally:
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(pg)
        if started_ray:
            ray.shutdown()

    train_loss, train_acc = evaluate(net, problem.data.X, problem.data.y)
    samples = sum(len(sampler.batch(t)) for t in range(problem.total_steps))
    summary = {
        "steps": problem.total_steps,
        "epochs": problem.total_steps / sampler.steps_per_epoch,
        "workers": K,
        "batch_size": config.batch_size,
        "micro_batch": M,
        "dtype": config.dtype,
        "layers": list(problem.layers),
        "dataset": problem.data.name,
        "final_loss": train_loss,
        "last_batch_loss": last["loss"],
        "train_accuracy": train_acc,
        "test_loss": last.get("test_loss"),
        "test_accuracy": last.get("test_accuracy"),
        "test_split": problem.data.test_name if problem.data.X_test is not None else None,
        "samples_per_second": samples / elapsed,
        "wall_time_s": elapsed,
        "weights_sha256": checkpoint.sha256_le(net.flat),
        "worker_nodes": worker_nodes,
        "server_nodes": [server_node],
        "out": out,
        "config": config.to_dict(),
    }
    checkpoint.write_json(os.path.join(out, "summary.json"), summary)
    return summary


__all__ = ["train", "prepare", "evaluate", "DataError", "UsageError"]
