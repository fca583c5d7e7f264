"""``--mode async`` and ``--mode ssp``: parameter-server training without the step barrier.  NOT exact.

The synchronous loop (sync.py) waits for every micro-batch of a step and applies one
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
The weights travel through the object store (never the direct transport): a worker reads whatever
weights the server holds, and shared memory would let it read them mid-update.
metrics.jsonl has one line per push: ``step`` counts the server's updates, ``clock`` the
pushing worker's step, ``staleness`` the other workers' pushes applied between its pull and
its push, ``samples`` the samples pushed so far.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..data.datasets import Dataset
from ..data.problem import Problem, prepare
from ..data.sampler import Sampler
from ..distributed.loopback import keep_local_ray_on_loopback
from ..errors import Diverged, RunFailed, UsageError
from ..lecture import cuts, schedule
from ..lecture.network import Network
from ..lecture.tree import blocks
from ..run import resume, summary
from ..run.checkpoint import fingerprint
from ..run.outdir import RunFiles
from ..run.progress import Progress
from ..step.worker import micro_batches


@dataclass
class Job:
    """Worker ``k``'s share of step ``clock`` (from 1), computing on the weights after push ``pulled``."""

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
    ids = cuts.even(len(ranges), workers)[k]
    return batch[ranges[ids[0]].start:ranges[ids[-1]].stop] if ids else batch[:0]


class Clocks:
    """Where each worker is: the steps it has finished, and (ssp) who waits for the slowest."""

    def __init__(self, problem: Problem, config: Config, staleness: int | None):
        K, self.total, self.staleness = config.workers, problem.total_steps, staleness
        # One sampler per worker: they are at different steps, and a Sampler caches one epoch.
        self.samplers = [Sampler(len(problem.X), config.batch_size, config.seed) for _ in range(K)]
        self.done = [0] * K
        self.blocked: list[int] = []  # ssp: workers waiting for the slowest
        self.K, self.M = K, config.micro_batch

    def pushes_due(self) -> int:
        return sum(min(self.K, len(micro_batches(len(self.samplers[0].batch(c)), self.M)))
                   for c in range(1, self.total + 1))

    def next_share(self, k: int) -> tuple[int, np.ndarray, int] | None:
        """Worker ``k``'s next (step, rows, batch size), or None: finished, or (ssp) too far ahead."""
        while self.done[k] < self.total:
            if self.staleness is not None and self.done[k] - min(self.done) > self.staleness:
                self.blocked.append(k)
                return None
            clock = self.done[k] + 1
            batch = self.samplers[k].batch(clock)
            rows = share(batch, self.M, self.K, k)
            if len(rows):
                return clock, rows, len(batch)
            self.done[k] += 1  # more workers than micro-batches: this worker sits the step out
        return None

    def finished(self, k: int) -> list[int]:
        """Worker ``k`` pushed its step: it and the workers that waited may go on."""
        self.done[k] += 1
        waiting, self.blocked = [k, *self.blocked], []
        return waiting


class Pushes:
    """The jobs in flight and the pushes applied: each finished share is pushed to the server at once."""

    def __init__(self, config: Config, problem: Problem, server, pool, files: RunFiles, progress: Progress):
        self.config, self.problem, self.server, self.pool = config, problem, server, pool
        self.files, self.progress = files, progress
        self.lr_at = schedule.from_config(config, problem.total_steps, problem.sampler.steps_per_epoch)
        self.weights = server.weights.remote()  # the newest weights: the ref of the last push sent
        self.running: dict = {}  # info ref -> Job
        self.count, self.seen, self.stale, self.last_loss = 0, 0, [], float("nan")
        self.t0 = time.perf_counter()

    def begin(self, k: int, share: tuple[int, np.ndarray, int] | None) -> None:
        """Worker ``k`` computes its ``share`` (step, rows, batch size) on the newest weights."""
        if share is not None:
            clock, rows, batch_size = share
            n = len(micro_batches(len(rows), self.config.micro_batch))
            values, info = self.pool.actors[k].compute.options(num_returns=2).remote(
                clock, rows, blocks(range(n), n), self.weights)
            self.running[info] = Job(k, clock, rows, batch_size, values, info, self.count)

    def push(self, job: Job, errors: list[float], seconds: float) -> None:
        """Send ``job``'s gradient to the server (applied as it arrives) and log the push."""
        loss = math.fsum(errors) / len(job.rows)
        if not math.isfinite(loss):
            raise Diverged(f"training diverged at push {self.count + 1}: the loss is {loss}")
        n = len(errors)
        scale = job.batch_size if self.config.reduction == "mean" else None
        self.weights = self.server.step.remote(n, [blocks(range(n), n)], self.lr_at(job.clock), self.count + 1,
                                               scale, job.values)
        self.stale.append(self.count - job.pulled)
        self.count, self.seen, self.last_loss = self.count + 1, self.seen + len(job.rows), loss
        self.files.log.write({
            "step": self.count, "epoch": self.problem.sampler.epoch_of(job.clock), "clock": job.clock,
            "worker": job.k, "loss": loss, "samples": self.seen, "staleness": self.stale[-1],
            "lr": self.lr_at(job.clock), "time": round(self.elapsed(), 6), "worker_compute": seconds})
        self.progress.step(loss=f"{loss:.4f}", stale=self.stale[-1])

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def train_async(config: Config, resumed: dict | None = None, data: Dataset | None = None, callbacks=()) -> dict:
    """Run ``config`` (``mode`` async or ssp) to the end; returns the summary, also in summary.json.

    ``callbacks`` are accepted for ``distbp.fit`` but not called: a push is not a step.
    """
    if resumed is not None:
        raise UsageError(f"--resume continues only --mode sync runs (this one is --mode {config.mode})")
    keep_local_ray_on_loopback(config.address)  # before Ray is first imported, just below
    import ray

    from ..distributed.session import Session
    from ..step.server import NonFiniteGradient

    start_from = resume.initial(config)  # --init-from
    problem = prepare(config, data)
    config.layers = problem.layer_list()  # what the checkpoints record: the sizes used, also when derived
    net = Network(problem.layers, config.activation, config.loss, config.dtype, config.seed)
    resume.warm_start(config, net, start_from)  # --init-from: the server starts from the checkpoint's weights
    staleness = (2 if config.staleness is None else config.staleness) if config.mode == "ssp" else None
    clocks = Clocks(problem, config, staleness)
    failed = f"--mode {config.mode}: a worker or the server failed (%s); this mode has no fault handling " \
             "(use --mode sync)"
    files = RunFiles.create(config.out, fingerprint(problem.X, problem.Y))  # locked until the summary is written
    try:
        with Session(config, problem, servers=1, transport="object-store") as session:
            server = session.start_servers(net.flat).actors[0]
            pool = session.start_workers()
            pool.wait_started()  # every actor up before the clock starts: one still starting would look late
            server_nodes = [ray.get(server.node_id.remote())]
            files.open_log()
            pushes = Pushes(config, problem, server, pool, files, Progress(clocks.pushes_due()))
            for k in range(config.workers):
                pushes.begin(k, clocks.next_share(k))
            while pushes.running:
                ready, _ = ray.wait(list(pushes.running), num_returns=1)
                job = pushes.running.pop(ready[0])
                try:
                    leaves = ray.get(job.info)  # its squared norms: the noise scale is the sync loop's
                except NonFiniteGradient:  # its weights came from a push the server refused
                    raise Diverged(f"training diverged at push {pushes.count}: the summed gradient has NaN or "
                                   "inf") from None
                except Exception as exc:  # noqa: BLE001 - a lost actor: this loop has no fault handling
                    raise RunFailed(failed % type(exc).__name__) from None
                pushes.push(job, leaves.errors, leaves.seconds)
                for k in clocks.finished(job.k):
                    pushes.begin(k, clocks.next_share(k))
            try:
                net.flat[:] = ray.get(pushes.weights).weights  # what the server published
            except NonFiniteGradient:
                raise Diverged(f"training diverged at push {pushes.count}: the summed gradient has NaN or inf") \
                    from None
            elapsed = pushes.elapsed()
            snap = ray.get(server.snapshot.remote())
            pushes.progress.close()
            worker_nodes = pool.nodes()
        files.save(problem.total_steps, snap, config.to_dict())
        return summary.asynchronous(config, problem, files, net, pushes, elapsed, staleness, worker_nodes,
                                    server_nodes)
    finally:
        files.close()
