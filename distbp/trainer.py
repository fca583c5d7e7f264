"""``distbp train``: the story of a run, top to bottom.

1. Load and check the data and the options (nothing is written before they pass).
2. Start or join Ray; put the data in the object store once; place the parameter server
   (S actors with --servers S, each owning a range of the weights: shards.py) and K workers.
3. Each step: the sampler picks the global batch (independent of K), it is cut into
   micro-batches, the workers backpropagate contiguous shares of them, the server adds
   their tree nodes into the batch gradient and updates.  Object references flow from the
   server to the workers and back without the driver touching the weights.  A dead or
   late worker's share is redone by the others, a lost server restarts from the latest
   checkpoint (crew.py); the bits do not change.
4. Every epoch (and every --checkpoint-every steps): evaluate, checkpoint.  Ctrl-C or
   SIGTERM: checkpoint and stop, to go on with --resume.  At the end: summary.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from . import checkpoint, faults, resume, schedule, shm
from . import data as datasets
from .config import Config
from .errors import DataError, Diverged, Interrupted, RunFailed, UsageError
from .network import Layout, Network, encode_targets
from .optim import Hyper, init_state


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
    if config.servers > Layout(layers).size:
        raise UsageError(f"--servers {config.servers} is more than the {Layout(layers).size} weights to share out")
    if config.batch_size > len(data.X):
        raise UsageError(f"--batch-size {config.batch_size} is larger than the training set "
                         f"({len(data.X)} samples)")
    dtype = np.dtype(config.dtype)
    with np.errstate(over="ignore"):
        X = np.ascontiguousarray(data.X, dtype=dtype)
        Y = encode_targets(data.y, config.loss, layers[-1], dtype)
    for name, values in (("features", X), ("targets", Y)):
        if not np.isfinite(values).all():  # finite in the file, but not in the run's dtype
            raise DataError(f"{data.name}: {name} overflow {dtype} (largest magnitude "
                            f"{np.nanmax(np.abs(data.X if name == 'features' else data.y)):.3g}); "
                            "scale the data or use --dtype float64")
    sampler = datasets.Sampler(len(X), config.batch_size, config.seed)
    total = config.steps or max(1, math.ceil(config.epochs * sampler.steps_per_epoch))
    return Problem(data, layers, X, Y, sampler, total)


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
    }


def make_out_dir(path: str | None) -> tuple[str, str | None]:
    """Create the results directory; refuse one that already holds results.

    Returns the path and the topmost directory created for it (None if it was there), which
    the run removes again if it fails before training begins: nothing half-made is left.
    """
    path = path or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"--out {path} already exists and is not empty; choose a new directory "
                         f"(or --resume {path} to continue it)")
    created, parent = None, os.path.abspath(path)
    while not os.path.exists(parent):
        created, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        open(probe, "w").close()
        os.unlink(probe)
    except OSError as exc:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror})") from None
    return path, created


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

    def note(self, **fields) -> None:
        """New values for the bar without a step (an evaluation just finished)."""
        if self.bar is not None:
            self.bar.set_postfix(fields)

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def keep_local_ray_on_loopback(address: str | None) -> None:
    """Call before Ray is first imported: a private local Ray (no ``address``, no
    ``$RAY_ADDRESS``) then listens on 127.0.0.1 only.

    Ray on Linux swaps 127.0.0.1 for the routable address, and then its GCS, raylet and
    actors listen on every interface; with multi-node support off (read when ray is first
    imported) all of them stay on 127.0.0.1 (measured, Ray 2.60).
    """
    if (address or os.environ.get("RAY_ADDRESS") or "local") == "local" and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def train(config: Config, resumed: dict | None = None) -> dict:
    """Run ``config`` to the end and return the summary (also written to ``<out>/summary.json``).

    ``resumed`` is the checkpoint (``checkpoint.load``) of the run in ``config.out`` to continue.
    """
    keep_local_ray_on_loopback(config.address)
    import ray  # the math above runs without Ray; only the run itself needs it

    from .actors import ParameterServer, Worker
    from .crew import Crew, ServerFailed
    from .runtime import board_for, connect, in_bundle, place
    from .shards import Servers, merge_reports

    if config.mode != "sync":  # not split-invariant: its own loop, over the same actors
        from .async_train import train_async

        return train_async(config, resumed)
    problem = prepare(config)
    start = 0 if resumed is None else resumed["step"]
    if resumed is not None:
        resume.check_fits(resumed, problem.layers, config, os.path.join(config.out, resume.CHECKPOINT))
        if start >= problem.total_steps:
            raise UsageError(f"--resume {config.out}: the run already has its {problem.total_steps} steps; "
                             "ask for more with --steps or --epochs")
    out, created = (config.out, None) if resumed is not None else make_out_dir(config.out)
    ckpt_path = os.path.join(out, resume.CHECKPOINT)
    layout = Layout(problem.layers)
    dtype = np.dtype(config.dtype)
    net = Network(problem.layers, config.activation, config.loss, dtype, config.seed)
    hyper = Hyper(config.optimizer, config.momentum, config.weight_decay)
    K, M, S, sampler = config.workers, config.micro_batch, config.servers, problem.sampler
    lr_at = schedule.from_config(config, problem.total_steps, sampler.steps_per_epoch)  # step t (from 1) -> lr
    # Where the run starts: what a server lost before the first checkpoint is restarted from.
    initial = resumed or {"weights": net.flat.copy(), "optimizer": init_state(config.optimizer, layout.size, dtype),
                         "step": 0}
    net.flat[:] = initial["weights"]

    started_ray, pg, board, begun = False, None, None, False
    try:
        started_ray = connect(config.address, cpus_wanted=K + S)
        pg = place(K + S)
        board = board_for(pg, layout.size, dtype)  # all on this machine: shared files, not the object store
        X_ref, Y_ref = ray.put(problem.X), ray.put(problem.Y)
        mask = layout.bias_mask(dtype)

        # Workers take bundles 0..K-1 and the servers K..K+S-1: SPREAD gives the first bundles
        # distinct nodes, so K workers land on min(K, nodes) nodes (servers first could leave
        # two workers on one node of a 2-node cluster: 6 of 15 placement groups, measured).
        def spawn_server() -> Servers:
            """S server actors (shards.py) in bundles K..K+S-1, server s owning [lo, hi) of the weights."""
            return Servers(lambda s, lo, hi: ParameterServer.options(**in_bundle(pg, K + s)).remote(
                net.flat[lo:hi], lo, hi, hyper, mask[lo:hi], board), layout.size, S)

        def spawn_worker(k: int):
            return Worker.options(**in_bundle(pg, k)).remote(
                problem.layers, config.activation, config.loss, dtype, X_ref, Y_ref, M, board)

        def restore(server: Servers) -> int:
            """Load the latest checkpoint (else the starting state) into ``server``; return its step."""
            saved = checkpoint.load(ckpt_path) if os.path.exists(ckpt_path) else initial
            ray.get(server.restore({"weights": saved["weights"], **saved["optimizer"]}, saved["step"]))
            return saved["step"]

        crew = Crew(spawn_server, spawn_worker, K, M, faults.parse(config.fault_injection, K))
        if resumed is not None:
            restore(crew.server)
        server_nodes = ray.get(crew.server.node_ids())

        metrics_path = os.path.join(out, "metrics.jsonl")
        # A resumed run drops the lines past its checkpoint (they are redone) and checks the
        # redone steps' gradient hashes against them.
        offset, logged = resume.trim_metrics(metrics_path, start) if resumed is not None else (0.0, {})
        if resumed is not None and resumed["config"].get("servers", 1) != S:
            logged = {}  # grad_sha256 depends on S (shards.merge_reports): no comparing steps redone with another S
        metrics = open(metrics_path, "a", buffering=1)  # line by line: a crash keeps every finished step
        begun = True
        progress = Progress(problem.total_steps, initial=start)
        weights = crew.server.weights()  # one ref per server range
        pending: deque = deque()
        last = {"loss": float("nan")}
        seen = 0  # samples trained on by this process, for samples/s
        saved_step = start  # the step of the checkpoint on disk
        written = start  # metrics.jsonl has the lines of the steps up to here
        redo = {"steps_redone": 0, "redo_mismatches": 0}  # steps computed twice, and those that differed
        t0 = time.perf_counter()

        def record(keep: int = 0) -> None:
            """Write the lines of the pending steps but the last ``keep`` (the server's report of a
            step is fetched one step later, so that waiting for it never stalls the workers)."""
            while len(pending) > keep:
                record_step(pending[0])
                pending.popleft()  # only once written: after a failure the step is still there

        def record_step(entry) -> None:
            nonlocal seen, written
            t, batch_size, loss, seconds, report_ref, step_ref = entry
            reports = merge_reports(crew.get(report_ref))
            if t + 1 not in reports:
                crew.get(step_ref)  # the step failed: raises why
            report = reports[t + 1]
            if t + 1 in logged:  # computed before a failure or an interruption: it must be the same sum
                redo["steps_redone"] += 1
                redo["redo_mismatches"] += logged[t + 1] != report["grad_sha256"]
            logged[t + 1] = report["grad_sha256"]
            if t + 1 <= written:
                return
            written = t + 1
            seen += batch_size
            last.update(step=t + 1, epoch=sampler.epoch_of(t) + 1, loss=loss, lr=lr_at(t + 1),
                        time=round(time.perf_counter() - t0 + offset, 6), grad_sha256=report["grad_sha256"],
                        worker_compute=seconds, server_sum=report["server_sum"], update=report["update"],
                        server_bytes_in=report["bytes_in"])
            metrics.write(json.dumps(last) + "\n")
            progress.step(**bar_fields())

        def bar_fields() -> dict:
            shown = {"loss": f"{last['loss']:.4f}"}
            if "test_accuracy" in last:  # the last evaluation's
                shown[f"{problem.data.test_name}_acc"] = f"{last['test_accuracy']:.4f}"
            shown["samples/s"] = f"{seen / (time.perf_counter() - t0):.0f}"
            return shown

        def snapshot() -> dict[str, np.ndarray]:
            """The weights and optimizer buffers the servers hold, as full-length arrays."""
            return Servers.join(crew.get(crew.server.snapshot()))

        def save(t: int, snap: dict[str, np.ndarray] | None = None) -> None:
            """checkpoint.npz after step ``t + 1`` (``snap``: the servers' state, if already fetched),
            atomically; never with non-finite weights."""
            nonlocal saved_step
            record()
            metrics.flush()  # every line up to the checkpoint is on disk before it
            snap = dict(snap or snapshot())
            flat = snap.pop("weights")
            if not np.isfinite(flat).all():
                raise Diverged(f"training diverged at step {t + 1}: the weights are no longer finite")
            try:
                checkpoint.save(ckpt_path, flat, snap, t + 1, config.to_dict())
            except OSError as exc:
                raise RunFailed(f"cannot write {ckpt_path} ({exc.strerror or exc}); "
                                "the previous checkpoint is intact") from None
            saved_step = t + 1
            for step in [s for s in logged if s <= saved_step]:  # never redone now
                del logged[step]

        def end_of_epoch(t: int) -> None:
            record()
            snap = snapshot()
            net.flat[:] = snap["weights"]
            line = f"epoch {sampler.epoch_of(t) + 1} step {t + 1}/{problem.total_steps} loss {last['loss']:.4f}"
            if problem.data.X_test is not None:
                test_loss, test_acc = evaluate(net, problem.data.X_test, problem.data.y_test)
                last.update(test_loss=test_loss, test_accuracy=test_acc)
                if t + 1 > saved_step:  # not an epoch redone after a failure: its line is there
                    metrics.write(json.dumps({"step": t + 1, "epoch": sampler.epoch_of(t) + 1,
                                              f"{problem.data.test_name}_loss": test_loss,
                                              f"{problem.data.test_name}_accuracy": test_acc}) + "\n")
                line += f" {problem.data.test_name}_acc {test_acc:.4f}"
            progress.log(line + f" lr {last['lr']:.3g} samples/s {seen / (time.perf_counter() - t0):.0f}")
            progress.note(**bar_fields())
            save(t, snap)

        t = start
        try:
            with resume.StopSignals() as stop:
                while t < problem.total_steps and stop.signum is None:
                    batch = sampler.batch(t)
                    try:
                        # Every micro-batch of the step, whichever workers die or lag on the way.
                        done = crew.compute(t, batch, weights)
                        loss = math.fsum(done.losses) / len(batch)
                        if not math.isfinite(loss):  # caught before the server applies anything
                            raise Diverged(f"training diverged at step {t + 1}: the loss is {loss}")
                        scale = len(batch) if config.reduction == "mean" else None
                        weights = crew.server.step(done.n, done.nodes, lr_at(t + 1), t + 1, scale, done.values)
                        pending.append((t, len(batch), loss, done.seconds, crew.server.report(), weights))
                        record(keep=1)
                        if (t + 1) % sampler.steps_per_epoch == 0 or t + 1 == problem.total_steps:
                            end_of_epoch(t)
                        elif config.checkpoint_every and (t + 1) % config.checkpoint_every == 0:
                            save(t)
                        t += 1
                    except ServerFailed:
                        # A live server says how many steps it holds; a lost one is restarted from
                        # the latest checkpoint.  Either way the loop goes on from there: steps are
                        # redone (to the same bits), never applied twice.
                        t = crew.recover(restore)
                        weights = crew.server.weights()
                        while pending and pending[-1][0] >= t:  # steps the server does not hold
                            pending.pop()
            if stop.signum is not None:
                if t > saved_step:
                    save(t - 1)
                if not saved_step:
                    raise Interrupted(f"stopped by {stop.name} before the first step; nothing to resume",
                                      stop.signum)
                raise Interrupted(f"stopped by {stop.name} after step {t} of {problem.total_steps}; "
                                  f"checkpoint {ckpt_path} (step {saved_step}); continue with: "
                                  f"distbp train --resume {out}", stop.signum)
        except Diverged as exc:
            kept = f"the last good checkpoint is {ckpt_path} (step {saved_step})" if saved_step else \
                "no checkpoint was written"
            raise Diverged(f"{exc}; {kept}") from None
        elapsed = time.perf_counter() - t0
        worker_nodes = crew.nodes()
        progress.close()
    except BaseException:
        if created and not begun:  # a run that never started leaves nothing behind
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if begun:
            metrics.close()
        if pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(pg)
        if started_ray:
            ray.shutdown()
        if board is not None:
            shm.close_board(board)

    train_loss, train_acc = evaluate(net, problem.data.X, problem.data.y)
    samples = sum(len(sampler.batch(t)) for t in range(start, problem.total_steps))
    summary = {
        **describe(config, problem, problem.total_steps),
        "final_loss": train_loss,
        "last_batch_loss": last["loss"],
        "train_accuracy": train_acc,
        "test_loss": last.get("test_loss"),
        "test_accuracy": last.get("test_accuracy"),
        "test_split": problem.data.test_name if problem.data.X_test is not None else None,
        "samples_per_second": samples / elapsed,  # of this process: a resumed run counts from its checkpoint
        "wall_time_s": elapsed,
        "weights_sha256": checkpoint.sha256_le(net.flat),
        "worker_nodes": worker_nodes,
        "servers": S,
        "server_nodes": server_nodes,
        "transport": "shared-memory" if board is not None else "object-store",  # of the per-step vectors
        "mode": "sync",
        "exact": True,  # the same weights, bit for bit, for any K and S (--mode async/ssp: false)
        "resumed_from_step": start if resumed is not None else None,
        "faults": {"injected": [str(f) for f in faults.parse(config.fault_injection, K)], **crew.stats, **redo},
        "out": out,
        "config": config.to_dict(),
    }
    checkpoint.write_json(os.path.join(out, "summary.json"), summary)
    return summary


__all__ = ["train", "prepare", "evaluate", "DataError", "UsageError"]
