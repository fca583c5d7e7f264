"""``summary.json``: what was trained, how, and what came out; the same first keys for every mode."""

from __future__ import annotations

import os

import numpy as np

from .. import faults
from ..config import Config
from ..data.problem import Problem
from ..lecture.network import Network, evaluate
from ..step import noise
from . import metrics
from .checkpoint import sha256_le
from .outdir import RunFiles


def describe(config: Config, problem: Problem, steps: int) -> dict:
    """The first keys of summary.json, the same for every mode: what was trained, how."""
    return {
        "steps": steps,
        "epochs": steps / problem.sampler.steps_per_epoch,
        "workers": config.workers,
        "batch_size": config.batch_size,
        "micro_batch": config.micro_batch,
        "dtype": config.dtype,
        "layers": list(problem.layers),
        "dataset": problem.data.name,
        "init_from": config.init_from,  # --init-from: a new trajectory from that checkpoint's weights
    }


def results(net: Network, problem: Problem, last: dict) -> dict:
    """The trained network on the training set, and the last evaluation of the test split."""
    train_loss, train_acc = evaluate(net, problem.data.X, problem.data.y)
    return {
        "final_loss": train_loss,
        "last_batch_loss": last.get("loss"),
        "train_accuracy": train_acc,
        "test_loss": last.get("test_loss"),
        "test_accuracy": last.get("test_accuracy"),
        "test_split": problem.test_name,
    }


def sync(config: Config, problem: Problem, files: RunFiles, net: Network, log, elapsed: float, start: int,
         steps: int, crew_stats: dict, worker_nodes: list, server_nodes: list, transport: str,
         resizes: list = (), windows: dict | None = None) -> dict:
    """The summary of a sync run that went from step ``start`` to ``steps``; written to summary.json."""
    samples = problem.sampler.samples(start + 1, steps)
    out = {
        **describe(config, problem, steps),
        **results(net, problem, log.last),
        "samples_per_second": samples / elapsed,  # of this process: a resumed run counts from its checkpoint
        "wall_time_s": elapsed,
        "weights_sha256": sha256_le(net.flat),
        "worker_nodes": worker_nodes,
        # --workers MIN:MAX: each change of the live workers, {"step", "from", "to", "why"}
        "resizes": list(resizes),
        "servers": config.servers,
        "server_nodes": server_nodes,
        "transport": transport,  # of the per-step vectors: direct or object-store
        # the windows the steps ran in (distributed/windows.py): {"windows", "steps", "called_off", "one_by_one"}
        "windows": dict(windows) if windows is not None else None,
        **log.noise.summary(),  # the gradient noise scale: the last B_simple and its trajectory
        "mode": "sync",
        "exact": True,  # the same weights, bit for bit, for any K and S (--mode async/ssp: false)
        "resumed_from_step": start if start else None,
        "stopped_early": steps if steps < problem.total_steps else None,  # by a callback (distbp.fit)
        "faults": {"injected": [str(f) for f in faults.parse(config.fault_injection, config.max_workers)],
                   **{k: v for k, v in crew_stats.items() if v}, **log.redo},
        "out": files.path,
        "config": config.to_dict(),
    }
    files.write_summary(out)
    return out


def asynchronous(config: Config, problem: Problem, files: RunFiles, net: Network, pushes, elapsed: float,
                 staleness: int | None, worker_nodes: list, server_nodes: list) -> dict:
    """The summary of an async or ssp run (``pushes``: its ``loops.async_.Pushes``); written to summary.json."""
    last = {"loss": pushes.last_loss}
    if problem.test_name is not None:
        last["test_loss"], last["test_accuracy"] = evaluate(net, problem.data.X_test, problem.data.y_test)
    out = {
        **describe(config, problem, problem.total_steps),
        "mode": config.mode,
        "transport": "object-store",  # workers pull whatever weights the server holds, mid-update or not
        "staleness": staleness,
        # Timing decides which pushes each gradient saw: another run, or another K, gives other bits.
        "exact": False,
        "pushes": pushes.count,
        "mean_staleness": float(np.mean(pushes.stale)) if pushes.stale else 0.0,
        "max_staleness": max(pushes.stale, default=0),
        **results(net, problem, last),
        "samples_per_second": pushes.seen / elapsed,
        "wall_time_s": elapsed,
        "weights_sha256": sha256_le(net.flat),  # of this run's weights; not reproducible
        "worker_nodes": worker_nodes,
        "resizes": [],  # --workers MIN:MAX is sync only
        "servers": 1,
        "server_nodes": server_nodes,
        "out": files.path,
        "config": config.to_dict(),
    }
    files.write_summary(out)
    return out


def rebuilt(config: Config, problem: Problem, files: RunFiles, net: Network, state: dict) -> dict:
    """The summary of a sync run that has all its steps in the checkpoint ``state`` but whose
    summary.json was never written (the driver died after the last checkpoint): from the
    checkpoint and metrics.jsonl, with no Ray.  What only the run's processes knew (its
    nodes, its faults) is left empty."""
    net.flat[:] = state["weights"]
    records = metrics.read(files.metrics_path) if os.path.exists(files.metrics_path) else []
    steps = state["step"]
    last = {"loss": next((r["loss"] for r in reversed(records) if "loss" in r), None)}
    name = problem.test_name
    if name is not None:
        last["test_loss"], last["test_accuracy"] = evaluate(net, problem.data.X_test, problem.data.y_test)
    wall = max((r["time"] for r in records), default=None)
    samples = problem.sampler.samples(1, steps)
    out = {
        **describe(config, problem, steps),
        **results(net, problem, last),
        "samples_per_second": samples / wall if wall else None,
        "wall_time_s": wall,
        "weights_sha256": sha256_le(net.flat),
        "worker_nodes": [],
        "resizes": [],
        "servers": config.servers,
        "server_nodes": [],
        "transport": None,
        "mode": "sync",
        "exact": True,
        "resumed_from_step": steps,
        "stopped_early": None,
        **noise.replayed(records, problem.sampler.n, config.micro_batch),
        "summary_rebuilt": True,  # from checkpoint.npz and metrics.jsonl after the run had ended
        "faults": {"injected": [str(f) for f in faults.parse(config.fault_injection, config.max_workers)]},
        "out": files.path,
        "config": config.to_dict(),
    }
    files.write_summary(out)
    return out
