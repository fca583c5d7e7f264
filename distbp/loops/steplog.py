"""The sync loop's record of its steps: what it sent, what the servers reported, what it wrote.

A step's report (gradient hash, server timings) is fetched one step later, so that waiting
for it never stalls the workers: ``StepLog`` holds the steps sent but not yet written
(``pending``), writes their lines to metrics.jsonl in order, and passes each record to the
callbacks and the progress bar.  It also checks steps computed twice (after a failure, or
by a resumed run) against the gradient hash logged the first time: the same sum must give
the same bits (``redo``).  With ``--report-to`` it hands each record to the trackers
(run/report.py); with ``--timeline`` it records the servers' and workers' timings and its own
waits (run/spans.py).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import Config
from ..data.problem import Problem
from ..run import spans
from ..run.outdir import CHECKPOINT, RunFiles
from ..run.progress import Progress
from ..run.report import Reporters
from ..step.noise import RunNoise
from ..step.reports import merge_reports


@dataclass
class Sent:
    """A step handed to the servers whose line is not written yet."""

    step: int
    batch_size: int
    loss: float
    seconds: float  # the slowest worker task's compute time
    report: list  # refs of the servers' reports
    weights: list  # refs of the step's new weights: fetching them raises why the step failed
    workers: int  # how many workers computed it (--workers MIN:MAX: it changes as the run resizes)
    micro_squares: float  # the exact sum of its micro-batches' squared norms (step/noise.py)
    when: float | None = None  # when it was done (perf_counter), if not when its line is written (windows.py)


class StepLog:
    """Pending reports, redo checks and the lines of metrics.jsonl, in step order."""

    def __init__(self, files: RunFiles, problem: Problem, lr_at: Callable[[int], float], get: Callable,
                 progress: Progress, callbacks: Sequence = (), compare: bool = True, config: Config | None = None,
                 workers=None):
        """``get`` fetches server results (``Servers.get``); ``compare=False``: the logged hashes
        came from another number of servers, so a resumed run does not check against them.
        ``config`` says where to report (``report_to``) and whether to record a ``timeline`` of
        the servers' and the ``workers``' (a ``WorkerPool``) timings."""
        self.files, self.problem, self.lr_at, self.get = files, problem, lr_at, get
        self.progress, self.callbacks = progress, list(callbacks)
        # A callback on each step must see a step's record before the next step starts, so that
        # the run can stop with that step's weights: its line is written at once, not with the next.
        self.per_step = any(handles(c, "on_step") for c in self.callbacks)
        self.workers = workers
        self.reporters = self.timeline = None
        names = config.reporters() if config is not None else ()
        if names:  # before the log opens: a failure leaves no directory
            self.reporters = Reporters(names, files.path, config.to_dict(), files.saved_step)
            files.watchers.insert(0, self.reporters)  # before an upload (remote.py): it sends what they wrote
        if config is not None and config.timeline:
            self.timeline = spans.Timeline(os.path.join(files.path, spans.NAME))
            files.watchers.insert(0, self.timeline)
        offset, logged, kept = files.open_log()
        self.noise = RunNoise(problem.sampler.n, config.micro_batch)
        self.noise.replay(kept)  # a resumed run: the moving averages of the steps kept, as they made them
        self.logged: dict[int, str] = logged if compare else {}  # step -> grad_xxh3 of its first computation
        self.pending: deque[Sent] = deque()
        self.written = files.saved_step  # metrics.jsonl has the lines of the steps up to here
        self.evaluations = files.saved_step  # ... and the evaluations up to here (--eval-every: between checkpoints)
        self.redo = {"steps_redone": 0, "redo_mismatches": 0}
        self.last: dict = {"loss": float("nan")}  # the last step's record, and the last evaluation's figures
        self.seen = 0  # samples trained on by this process, for samples/s
        self.stop_requested = False  # a callback asked the run to end after this step
        self.t0 = time.perf_counter()
        self.offset = offset  # a resumed run's clock goes on from its last line

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def sent(self, *entries: Sent) -> None:
        """Steps ``entries`` (in order) are with the servers: write every earlier step's line.  All
        of them are pending before any line is written, so that a failure to fetch a report
        (``ServerFailed``: the loop recovers the servers) loses none of them."""
        for entry in entries:
            if self.timeline is not None:
                self.timeline.driver("workers", entry.step)  # waiting for the step's workers, and sending it on
            self.pending.append(entry)
        self.write(keep=0 if self.per_step else 1)

    def write(self, keep: int = 0) -> None:
        """Write the lines of the pending steps but the last ``keep``."""
        while len(self.pending) > keep:
            self._write(self.pending[0])
            self.pending.popleft()  # only once written: after a failure the step is still there

    def _write(self, sent: Sent) -> None:
        each = self.get(sent.report)
        reports = merge_reports(each)
        if self.timeline is not None:
            self.timeline.driver("report", sent.step)  # waiting for the servers' report of the step
            self.timeline.servers(sent.step, each)
        if sent.step not in reports:
            self.get(sent.weights)  # the step failed: raises why
        report = reports[sent.step]
        if sent.step in self.logged:  # computed before a failure or an interruption: it must be the same sum
            self.redo["steps_redone"] += 1
            self.redo["redo_mismatches"] += self.logged[sent.step] != report["grad_xxh3"]
        self.logged[sent.step] = report["grad_xxh3"]
        if sent.step <= self.written:
            return
        self.written = sent.step
        self.seen += sent.batch_size
        record = {"step": sent.step, "epoch": self.problem.sampler.epoch_of(sent.step), "loss": sent.loss,
                  "lr": self.lr_at(sent.step), "workers": sent.workers,
                  "time": round((time.perf_counter() if sent.when is None else sent.when) - self.t0 + self.offset, 6),
                  "grad_xxh3": report["grad_xxh3"], "worker_compute": sent.seconds,
                  "server_sum": report["server_sum"], "update": report["update"],
                  "server_bytes_in": report["bytes_in"]}
        if "grad_norm" in report:  # --clip-norm: the norm before clipping, as clip_grad_norm_ returns it
            record["grad_norm"] = report["grad_norm"]
        record.update(self.noise.step(sent.step, sent.batch_size, sent.micro_squares, report["grad_sq"]))
        self.last.update(record)
        self.files.log.write(record)
        self.progress.step(**self.bar())
        if self.reporters is not None:
            self.reporters.step(record, self.seen / self.elapsed())
        self._notify("on_step", record)

    def evaluated(self, step: int, loss: float, accuracy: float) -> None:
        """The evaluation after step ``step``: its line and the callbacks (unless a step redone
        after a failure already has them), the bar."""
        name = self.problem.test_name
        self.last.update(test_loss=loss, test_accuracy=accuracy)
        record = {"step": step, "epoch": self.problem.sampler.epoch_of(step), f"{name}_loss": loss,
                  f"{name}_accuracy": accuracy}
        if step > self.evaluations:
            self.evaluations = step
            self.files.log.write(record)
            if self.reporters is not None:
                self.reporters.evaluation(record)
            self._notify("on_evaluation", record)

    def _notify(self, method: str, record: dict) -> None:
        """Call ``method`` of each callback that has it with a copy of ``record``; True asks to stop."""
        for callback in self.callbacks:
            if handles(callback, method) and getattr(callback, method)(dict(record)) and method != "on_end":
                self.stop_requested = True

    def ended(self, summary: dict) -> None:
        """The run wrote its summary: each callback's ``on_end`` gets a copy of it."""
        self._notify("on_end", summary)

    def forget_after(self, step: int) -> None:
        """The servers hold ``step`` steps (after a recovery): the later ones sent are redone."""
        while self.pending and self.pending[-1].step > step:
            self.pending.pop()

    def saved(self) -> None:
        """A checkpoint is on disk: steps up to it are never redone now."""
        for step in [s for s in self.logged if s <= self.files.saved_step]:
            del self.logged[step]
        self._notify("on_checkpoint", {"step": self.files.saved_step, "path": self.files.shown(CHECKPOINT)})
        if self.timeline is not None:
            self.timeline.driver("checkpoint", self.files.saved_step)  # evaluation and checkpoint
            self.fetch_worker_spans()

    def fetch_worker_spans(self) -> None:
        """--timeline: the workers' compute spans since the last fetch (each keeps its last 4096
        calls, more than a checkpoint interval usually holds; a dead worker's are lost)."""
        import ray
        from ray.exceptions import RayActorError

        for k in self.workers.live():  # a slot still waiting for a CPU (--workers MIN:MAX) has none
            try:
                self.timeline.worker(k, ray.get(self.workers.actors[k].spans.remote()))
            except RayActorError:
                pass

    def bar(self) -> dict:
        shown = {"loss": f"{self.last['loss']:.4f}"}
        if "test_accuracy" in self.last:  # the last evaluation's
            shown[f"{self.problem.test_name}_acc"] = f"{self.last['test_accuracy']:.4f}"
        shown["samples/s"] = f"{self.seen / self.elapsed():.0f}"
        return shown


def handles(callback, method: str) -> bool:
    """Whether ``callback`` does something on ``method``: it has the method, and not as the no-op
    that ``distbp.Callback`` gives every method (marked ``noop``)."""
    hook = getattr(callback, method, None)
    return hook is not None and not getattr(hook, "noop", False)
