"""``--mode async`` and ``--mode ssp``: parameter-server training without the step barrier.  NOT exact.

The synchronous loop (trainer.py) waits for every micro-batch of a step and applies one
update: the same bits for any K.  Here each worker goes through the steps at its own pace,
on the same actors and the same data:

- step ``c``'s global batch (the sampler of sync) is shared out over the K workers as in
  sync; worker ``k`` backpropagates its share on the newest weights it has pulled and pushes
  the summed gradient; the server applies each push as it arrives, one optimizer update per
  push (under ``--reduction mean`` the sum is divided by the global B, so with SGD and no
  delay the K pushes of a step add up to the synchronous step);
- async: after its push a worker pulls the weights the server holds just after that push
  and goes on at once (Downpour-style, Dean et al. 2012);
- ssp (Ho et al. 2013, stale synchronous parallel): worker ``k`` may begin step ``c`` only
  once the slowest worker has finished step ``c - s - 1`` (``s = --staleness``), so no worker
  is more than ``s`` steps ahead and the weights it reads hold every push of the steps before
  ``c - s``.  ``s = 0`` is bulk-synchronous with the K pushes applied one after another.

Which pushes a worker's weights hold depends on timing, so the result changes from run to run
and with K: summary.json says ``"exact": false``, and its ``weights_sha256`` describes this run
only.  One server, no fault handling, no --resume (config.py and ``train_async`` refuse them).
metrics.jsonl has one line per push: ``step`` counts the server's updates, ``clock`` the
pushing worker's step, ``staleness`` the other workers' pushes applied between its pull and
its push, ``samples`` the samples pushed so far.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from . import checkpoint, schedule
from .config import Config
from .data import Sampler
from .errors import Diverged, RunFailed, UsageError
from .network import Layout, Network
from .optim import Hyper
from .step import NonFiniteGradient, micro_batches, split_even
from .trainer import Progress, describe, evaluate, make_out_dir, prepare
from .tree import blocks


@dataclass
class Job:
    """Worker ``k``'s share of step ``clock`` (from 0), computing on the weights after push ``pulled``."""

    k: int
    clock: int
    rows: np.ndarray  # the sample indices of its share
    batch_size: int  # of the whole step, for --reduction mean
    values: object  # ObjectRef of its node values
    info: object  # ObjectRef of (per-micro-batch errors, seconds)
    pulled: int


def share(batch: np.ndarray, micro_batch: int, workers: int, k: int) -> np.ndarray:
    """Worker ``k``'s rows of ``batch``: its contiguous micro-batches, as in the synchronous split."""
    ranges = micro_batches(len(batch), micro_batch)
    ids = split_even(len(ranges), workers)[k]
    return batch[ranges[ids[0]][0]:ranges[ids[-1]][1]] if ids else batch[:0]


def train_async(config: Config, resumed: dict | None = None) -> dict:
    """Run ``config`` (``mode`` async or ssp) to the end; returns the summary, also in summary.json."""
    import ray

    from .actors import ParameterServer, Worker
    from .runtime import connect, in_bundle, place

    if resumed is not None:
        raise UsageError(f"--resume continues only --mode sync runs (this one is --mode {config.mode})")
    problem = prepare(config)
    out, created = make_out_dir(config.out)
    layout = Layout(problem.layers)
    dtype = np.dtype(config.dtype)
    net = Network(problem.layers, config.activation, config.loss, dtype, config.seed)
    hyper = Hyper(config.optimizer, config.momentum, config.weight_decay)
    K, M, total = config.workers, config.micro_batch, problem.total_steps
    staleness = (2 if config.staleness is None else config.staleness) if config.mode == "ssp" else None
    steps_per_epoch = problem.sampler.steps_per_epoch
    lr_at = schedule.from_config(config, total, steps_per_epoch)
    # One sampler per worker: they are at different steps, and a Sampler caches one epoch.
    samplers = [Sampler(len(problem.X), config.batch_size, config.seed) for _ in range(K)]
    pushes_due = sum(min(K, len(micro_batches(len(samplers[0].batch(c)), M))) for c in range(total))

    started_ray, pg, metrics = False, None, None
    try:
        started_ray = connect(config.address, cpus_wanted=K + 1)
        pg = place(K + 1)
        X_ref, Y_ref = ray.put(problem.X), ray.put(problem.Y)
        # Workers in bundles 0..K-1, the server last: SPREAD gives the first bundles distinct nodes.
        server = ParameterServer.options(**in_bundle(pg, K)).remote(
            net.flat, 0, layout.size, hyper, layout.bias_mask(dtype))
        workers = [Worker.options(**in_bundle(pg, k)).remote(
            problem.layers, config.activation, config.loss, dtype, X_ref, Y_ref, M) for k in range(K)]
        # Every actor up before the clock starts: a worker still starting would look like a straggler.
        worker_nodes = ray.get([w.node_id.remote() for w in workers])
        server_nodes = [ray.get(server.node_id.remote())]
        metrics = open(os.path.join(out, "metrics.jsonl"), "w")
        progress = Progress(pushes_due)
        weights = server.weights.remote()  # the newest weights: the ref of the last push sent
        pushes, seen = 0, 0  # pushes sent to the server, samples in them
        done = [0] * K  # steps each worker has finished
        running: dict = {}  # info ref -> Job
        blocked: list[int] = []  # ssp: workers waiting for the slowest
        last_loss, stale = float("nan"), []
        t0 = time.perf_counter()

        def begin(k: int) -> None:
            """Worker ``k`` starts its next step, if it has one and the staleness bound allows it."""
            while done[k] < total:
                if staleness is not None and done[k] - min(done) > staleness:
                    blocked.append(k)
                    return
                batch = samplers[k].batch(done[k])
                rows = share(batch, M, K, k)
                if len(rows) == 0:  # more workers than micro-batches: this worker sits the step out
                    done[k] += 1
                    continue
                n = len(micro_batches(len(rows), M))
                values, info = workers[k].compute.remote(rows, list(range(n)), weights)
                job = Job(k, done[k], rows, len(batch), values, info, pushes)
                running[info] = job
                return

        for k in range(K):
            begin(k)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ready[0])
            try:
                errors, seconds = ray.get(job.info)
            except NonFiniteGradient:
                raise Diverged(f"training diverged at push {pushes}: the summed gradient has NaN or inf") from None
            except Exception as exc:  # noqa: BLE001 - a lost actor: this loop has no fault handling
                raise RunFailed(f"--mode {config.mode}: a worker or the server failed ({type(exc).__name__}); "
                                "this mode has no fault handling (use --mode sync)") from None
            loss = math.fsum(errors) / len(job.rows)
            if not math.isfinite(loss):
                raise Diverged(f"training diverged at push {pushes + 1}: the loss is {loss}")
            n = len(errors)
            scale = job.batch_size if config.reduction == "mean" else None
            weights = server.step.remote(n, [blocks(range(n), n)], lr_at(job.clock + 1), pushes + 1, scale,
                                         job.values)
            stale.append(pushes - job.pulled)
            pushes += 1
            seen += len(job.rows)
            last_loss = loss
            metrics.write(json.dumps({
                "step": pushes, "epoch": job.clock // steps_per_epoch + 1, "clock": job.clock + 1,
                "worker": job.k, "loss": loss, "samples": seen, "staleness": stale[-1],
                "lr": lr_at(job.clock + 1), "time": round(time.perf_counter() - t0, 6),
                "worker_compute": seconds}) + "\n")
            progress.step(loss=f"{loss:.4f}", stale=stale[-1])
            done[job.k] += 1
            waiting, blocked[:] = [job.k, *blocked], []
            for k in waiting:
                begin(k)
        try:
            net.flat[:] = ray.get(weights)
        except NonFiniteGradient:
            raise Diverged(f"training diverged at push {pushes}: the summed gradient has NaN or inf") from None
        elapsed = time.perf_counter() - t0
        snap = ray.get(server.snapshot.remote())
        progress.close()
    except BaseException:
        if created and metrics is None:  # a run that never started leaves nothing behind
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if metrics is not None:
            metrics.close()
        if pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(pg)
        if started_ray:
            ray.shutdown()

    snap.pop("weights")
    if not np.isfinite(net.flat).all():
        raise Diverged(f"training diverged: the weights after {pushes} pushes are not finite")
    checkpoint.save(os.path.join(out, "checkpoint.npz"), net.flat, snap, total, config.to_dict())
    train_loss, train_acc = evaluate(net, problem.data.X, problem.data.y)
    test_loss = test_acc = None
    if problem.data.X_test is not None:
        test_loss, test_acc = evaluate(net, problem.data.X_test, problem.data.y_test)
    summary = {
        **describe(config, problem, total),
        "mode": config.mode,
        "transport": "object-store",  # workers pull whatever weights the server holds: no shared rows (shm.py)
        "staleness": staleness,
        # Timing decides which pushes each gradient saw: another run, or another K, gives other bits.
        "exact": False,
        "pushes": pushes,
        "mean_staleness": float(np.mean(stale)) if stale else 0.0,
        "max_staleness": max(stale, default=0),
        "final_loss": train_loss,
        "last_batch_loss": last_loss,
        "train_accuracy": train_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "test_split": problem.data.test_name if problem.data.X_test is not None else None,
        "samples_per_second": seen / elapsed,
        "wall_time_s": elapsed,
        "weights_sha256": checkpoint.sha256_le(net.flat),  # of this run's weights; not reproducible
        "worker_nodes": worker_nodes,
        "servers": 1,
        "server_nodes": server_nodes,
        "out": out,
        "config": config.to_dict(),
    }
    checkpoint.write_json(os.path.join(out, "summary.json"), summary)
    return summary
