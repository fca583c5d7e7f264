"""``distbp train`` (``--mode sync``): the story of a run, top to bottom.

1. Load and check the data and the options (nothing is written before they pass).
2. Start or join Ray, place the actors: S parameter servers, each owning a range of the
   weights, and K workers, or MIN to MAX of them as the cluster allows (``Session``,
   docs/elastic.md).
3. Each step (counted from 1): the sampler picks the global batch (independent of K), it is
   cut into micro-batches, the workers backpropagate contiguous shares of them, the servers
   add their tree nodes into the batch gradient and update.  Object references flow from the
   servers to the workers and back without the driver touching the weights.  A dead or late
   worker's share is redone by the others, a lost server restarts from the latest checkpoint
   (crew.py, servers.py), workers that join take a share from the next step; the bits do not
   change.  Below MIN workers for --elastic-timeout: checkpoint and stop, to go on with --resume.
4. Every epoch: evaluate, checkpoint (also every --eval-every and --checkpoint-every steps).
   Ctrl-C or SIGTERM: checkpoint and stop, to go on with --resume.  At the end: summary.json.
"""

from __future__ import annotations

import os

import numpy as np

from .. import faults
from ..config import Config
from ..data.datasets import Dataset
from ..data.problem import Problem, prepare
from ..distributed.loopback import keep_local_ray_on_loopback
from ..errors import Diverged, Interrupted, UsageError
from ..lecture import schedule
from ..lecture.network import Network, evaluate
from ..lecture.optim import init_state
from ..run import resume, summary
from ..run.checkpoint import fingerprint
from ..run.outdir import CHECKPOINT, SUMMARY, RunFiles
from ..run.progress import Progress
from ..run.signals import StopSignals
from ..step import plan
from .steplog import Sent, StepLog


def train(config: Config, resumed: dict | None = None, data: Dataset | None = None, callbacks=()) -> dict:
    """Run ``config`` to the end and return the summary (also written to ``<out>/summary.json``).

    ``resumed`` is the checkpoint (``checkpoint.load``) of the run in ``config.out`` to continue;
    ``data`` replaces ``config.dataset`` (``distbp.fit``); ``callbacks`` get each step's record.
    """
    if config.mode != "sync":  # not split-invariant: its own loop, over the same actors
        from .async_ import train_async
        return train_async(config, resumed, data, callbacks)
    config.validate()
    start_from = resume.initial(config) if resumed is None else None  # --init-from
    problem = prepare(config, data)
    config.layers = problem.layer_list()  # what the checkpoints record: the sizes used, also when derived
    if config.eval_every and problem.test_name is None:
        raise UsageError(f"--eval-every {config.eval_every}: {problem.data.name} has no test split to evaluate "
                         "on (hold one out with --val-fraction)")
    data_id = fingerprint(problem.X, problem.Y)  # kept in each checkpoint: a resume on other data is refused
    start = _check_resume(config, problem, resumed, data_id)
    net = Network(problem.layers, config.activation, config.loss, config.dtype, config.seed)
    resume.warm_start(config, net, start_from)  # --init-from: step 0 is the checkpoint's weights
    files = RunFiles.reopen(config.out, start, data_id) if resumed else RunFiles.create(config.out, data_id)
    with files:  # the run directory is locked until the summary is written
        if start >= problem.total_steps:  # a finished run whose summary was never written: write it
            return summary.rebuilt(config, problem, files, net, resumed)
        try:
            return _run(config, problem, files, net, resumed, callbacks)
        except Diverged as exc:
            kept = f"the last good checkpoint is {files.shown(CHECKPOINT)} (step {files.saved_step})" \
                if files.saved_step else "no checkpoint was written"
            raise Diverged(f"{exc}; {kept}") from None


def _run(config: Config, problem: Problem, files: RunFiles, net: Network, resumed: dict | None, callbacks) -> dict:
    """Steps ``files.saved_step + 1`` to the last on Ray; returns the summary, written to summary.json."""
    keep_local_ray_on_loopback(config.address)  # before Ray is first imported, just below
    from ..distributed.crew import Crew
    from ..distributed.session import Session
    from ..distributed.windows import Windows

    # Where the run starts: what a server lost before the first checkpoint is restarted from.
    initial = resumed or {"weights": net.flat.copy(), "step": 0,
                          "optimizer": init_state(config.optimizer, net.layout.size, net.dtype)}
    total, start = problem.total_steps, files.saved_step
    lr_at = schedule.from_config(config, total, problem.sampler.steps_per_epoch)  # step (from 1) -> lr
    with Session(config, problem, config.servers) as session:
        config.servers = session.servers  # --servers auto: the number it is on this cluster, as checkpoints record it
        servers = session.start_servers(initial["weights"])
        if resumed:
            servers.restore(*files.latest(initial))
        server_nodes = servers.node_ids()
        pool = session.start_workers()  # once --workers MIN are up, before the clock starts
        crew = Crew(pool, servers, config.micro_batch, faults.parse(config.fault_injection, config.max_workers),
                    minimum=config.min_workers, wait_s=config.elastic_timeout)
        progress = Progress(total, initial=start)
        if resumed:
            progress.resuming(config.out, start, total)
        log = StepLog(files, problem, lr_at, servers.get, progress, callbacks,
                      compare=not resumed or resumed["config"].get("servers", 1) == config.servers,
                      config=config, workers=pool)
        windows = Windows(crew)
        run = Run(config, problem, files, net, servers, log)
        steps = Steps(config, problem.sampler, windows, log, lr_at, run.after, start)
        run.go(steps, lambda: files.latest(initial))
        elapsed = log.elapsed()
        progress.close()
    out = summary.sync(config, problem, files, net, log, elapsed, start, steps.applied,
                       crew_stats={**crew.stats, "workers_lost": pool.lost, "server_restarts": servers.restarts},
                       worker_nodes=[node for node in pool.nodes() if node], server_nodes=server_nodes,
                       transport=session.transport.name, resizes=crew.resizes,
                       windows=windows.stats)
    log.ended(out)
    return out


class Run:
    """What the loop does between steps, and how it stops: the driver's part of a run, with what
    it needs in plain view (the config, the data, the run's files, the driver's network, the
    servers and the step log)."""

    def __init__(self, config: Config, problem: Problem, files: RunFiles, net: Network, servers, log: StepLog):
        self.config, self.problem, self.files, self.net, self.servers, self.log = \
            config, problem, files, net, servers, log

    def go(self, steps: Steps, latest) -> None:
        """Apply steps until the last, a stop signal, a callback's stop or too few workers;
        ``latest()``: the arrays and step a lost server restarts from."""
        from ..distributed.servers import ServerFailed, ServersLost
        from ..distributed.workers import TooFewWorkers

        total, few = self.problem.total_steps, None  # TooFewWorkers: stop at a step boundary, checkpointed
        with StopSignals() as stop:
            while steps.applied < total and stop.signum is None and not self.log.stop_requested:
                try:
                    steps.next(total)
                except TooFewWorkers as exc:  # nothing of the step was applied: stop after the steps applied
                    few = exc
                    break
                except ServerFailed:
                    # Live servers say how many steps they hold; lost ones restart from the
                    # latest checkpoint.  Either way the loop goes on from there: steps are
                    # redone (to the same bits), never applied twice.
                    try:
                        steps.recover(latest)
                    except ServersLost as exc:  # no CPU for them: stop at the latest checkpoint
                        few = exc
                        break
        if stop.signum is not None:
            self.interrupted(stop, steps.applied)
        if few is not None:
            self.too_few(few, steps.applied)
        if self.log.stop_requested:  # a callback ended the run early: keep the weights it stopped at
            self.stopped_early(steps.applied)

    def after(self, step: int) -> None:
        """The driver's part after step ``step``: at an epoch's end (and the last step) evaluate
        and checkpoint; between epochs, every --eval-every steps evaluate, every
        --checkpoint-every steps checkpoint (one snapshot for both)."""
        config = self.config
        if self.problem.sampler.ends_epoch(step) or step == self.problem.total_steps:
            self.save(step, self.evaluated(step))
            return
        snapshot = self.evaluated(step) if every(config.eval_every, step) else None
        if every(config.checkpoint_every, step):
            self.save(step, snapshot or self.servers.snapshot())

    def evaluated(self, step: int) -> dict[str, np.ndarray]:
        """Evaluate the weights after ``step`` on the test (or validation) split and log it (every
        line before it written first); returns the servers' snapshot it took."""
        log, problem = self.log, self.problem
        log.write()
        snapshot = self.servers.snapshot()
        self.net.flat[:] = snapshot["weights"]
        line = f"epoch {problem.sampler.epoch_of(step)} step {step}/{problem.total_steps} loss {log.last['loss']:.4f}"
        if problem.test_name is not None:
            test_loss, test_acc = evaluate(self.net, problem.data.X_test, problem.data.y_test)
            log.evaluated(step, test_loss, test_acc)
            line += f" {problem.test_name}_acc {test_acc:.4f}"
        log.progress.log(line + f" lr {log.last['lr']:.3g} samples/s {log.seen / log.elapsed():.0f}")
        log.progress.note(**log.bar())
        return snapshot

    def save(self, step: int, snapshot: dict[str, np.ndarray]) -> None:
        """checkpoint.npz after step ``step``, every line before it written first, the data checked
        to be the files the run opened (``Problem.check_unchanged``)."""
        self.log.write()
        self.problem.check_unchanged(self.files.saved_step)
        self.files.save(step, snapshot, self.config.to_dict())
        self.log.saved()

    def checkpointed(self, step: int) -> str:
        """A run stopping after step ``step``: checkpoint it (unless it is) and close the bar.  Returns
        how to go on, naming the run where the user finds it ("" if no step was ever checkpointed)."""
        files = self.files
        if step > files.saved_step:
            self.save(step, self.servers.snapshot())
        self.log.progress.close()
        if not files.saved_step:
            return ""
        return (f"checkpoint {files.shown(CHECKPOINT)} (step {files.saved_step}); "
                f"continue with: distbp train --resume {files.shown()}")

    def stopped_early(self, step: int) -> None:
        """A callback asked to stop after ``step``: the driver's network takes those weights, checkpointed."""
        snapshot = self.servers.snapshot()
        self.net.flat[:] = snapshot["weights"]
        if step > self.files.saved_step:
            self.save(step, snapshot)

    def interrupted(self, stop: StopSignals, step: int) -> None:
        """Ctrl-C or SIGTERM after step ``step``: checkpoint it and raise Interrupted saying how to go on."""
        how = self.checkpointed(step)
        if not how:
            raise Interrupted(f"stopped by {stop.name} before the first step; nothing to resume", stop.signum)
        raise Interrupted(f"stopped by {stop.name} after step {step} of {self.problem.total_steps}; {how}",
                          stop.signum)

    def too_few(self, exc: Exception, step: int) -> None:
        """Too few workers after --elastic-timeout: checkpoint step ``step`` and raise one line saying how to go on."""
        how = self.checkpointed(step) or "no step was done, nothing to resume"
        raise type(exc)(f"stopped before step {step + 1}: {exc}; {how}") from None


class Steps:
    """How the loop applies its steps: in windows (windows.py), each as long as the driver has
    nothing to do in between.  ``applied`` counts the steps the servers hold, ``weights`` are
    the references to what they published then."""

    def __init__(self, config: Config, sampler, windows, log: StepLog, lr_at, after, applied: int):
        self.config, self.sampler, self.windows = config, sampler, windows
        self.crew, self.servers = windows.crew, windows.servers
        self.log, self.lr_at, self.after = log, lr_at, after  # after(step): the driver's part after a step
        self.applied, self.weights = applied, self.servers.weights()
        self.idle_said: set[int] = set()  # the numbers of live workers said to leave some idle (say_idle)

    def scale_of(self, batch) -> int | None:
        """What the servers divide the summed gradient by: B under --reduction mean."""
        return len(batch) if self.config.reduction == "mean" else None

    def next(self, total: int) -> None:
        """Apply the next step, or a window of steps from it (of at most ``total``).  A failure is
        raised once the steps applied before it are logged."""
        step = self.applied + 1
        self.say_idle(len(self.crew.pool.live()))
        per_step = self.log.per_step  # a callback on each step may stop the run after any step
        last = self.windows.last_step(step, total, lambda t: per_step or busy(t, self.config, self.sampler))
        self._window(step, last)

    def say_idle(self, live: int) -> None:
        """Say on stderr, once for each number of ``live`` workers, when some will idle: a step
        has only ceil(B/M) micro-batches to share out (a fixed K, or each elastic resize)."""
        config = self.config
        shares = plan.count(config.batch_size, config.micro_batch)
        if live <= shares or live in self.idle_said:
            return
        self.idle_said.add(live)
        idle = live - shares
        self.log.progress.say(f"distbp: {live} workers but a step has only {shares} micro-batch"
                              f"{'es' if shares != 1 else ''} (--batch-size {config.batch_size} / --micro-batch "
                              f"{config.micro_batch}), so {idle} worker{'s idle' if idle != 1 else ' idles'} each "
                              f"step; --micro-batch {max(1, config.batch_size // live)} keeps all {live} busy "
                              "(the same bits either way)")

    def _window(self, step: int, last: int) -> None:
        """Steps ``step`` to ``last`` in one window (windows.py), logged as steps one by one."""
        ran, published, failure = self.windows.run(step, [self.sampler.batch(t) for t in range(step, last + 1)],
                                                    self.lr_at, self.scale_of, self.weights)
        reports, self.weights = self.servers.report(), published
        if ran:
            self.log.sent(*(Sent(r.step, r.batch_size, r.loss, r.seconds, reports, self.weights, r.workers,
                                 r.micro_squares, r.when) for r in ran))
            self.after(ran[-1].step)  # a window ends where the driver has work (Windows.last_step): after its last step
            self.applied = ran[-1].step
        if failure is not None:
            raise failure

    def recover(self, latest) -> None:
        """A server failed: go on from the steps the servers hold after ``Servers.recover``
        (``latest()``: the checkpoint a lost one restarts from).  ServersLost if they cannot be
        restarted: the run holds the checkpoint's steps then."""
        from ..distributed.servers import ServersLost

        try:
            self.applied = self.servers.recover(latest)
        except ServersLost:
            self.applied = latest()[1]
            self.log.forget_after(self.applied)
            raise
        self.weights = self.servers.weights()
        self.log.forget_after(self.applied)


def busy(step: int, config: Config, sampler) -> bool:
    """Whether the driver has something to do after ``step`` (a window ends there): what
    ``end_of_epoch`` and ``between_epochs`` do after it."""
    return sampler.ends_epoch(step) or every(config.eval_every, step) or every(config.checkpoint_every, step)


def every(n: int, step: int) -> bool:
    """--eval-every / --checkpoint-every ``n`` (0: never): whether ``step`` is one of them."""
    return bool(n) and step % n == 0


def _check_resume(config: Config, problem: Problem, resumed: dict | None, data_id: str) -> int:
    """The step a resumed run goes on from (0 for a new run); UsageError if it has nothing to do.

    A run that has all its steps but no summary.json (it died after its last checkpoint) is
    not refused: the loop writes its summary.
    """
    if resumed is None:
        return 0
    resume.check_fits(resumed, problem.layers, config, os.path.join(config.out, CHECKPOINT), data_id)
    done, total = resumed["step"], problem.total_steps
    if done >= total and os.path.exists(os.path.join(config.out, SUMMARY)):
        asked = f"it already has {done} steps, more than the {total} asked for" if done > total else \
            f"it already has its {total} steps"
        raise UsageError(f"--resume {config.out}: {asked}; ask for more with --steps or --epochs")
    return done
