"""``--report-to tensorboard,mlflow``: each step's record and each evaluation, sent on to a tracker.

metrics.jsonl stays the source of truth (resume trims it; plot and ``Result`` read it); the
reporters are copies for the tools people already use.  ``StepLog`` hands them every record
it writes; ``RunFiles`` tells them of each checkpoint, of the summary and of the close.

What a resumed run does with what it reported before:

- TensorBoard: the new event file starts with ``purge_step`` = the checkpoint's step + 1, so
  TensorBoard drops the points the first process wrote past the checkpoint (they are redone);
  a reader sees each step once, as in metrics.jsonl.
- MLflow: the run id is kept in ``<out>/mlflow.json`` and the resumed process goes on in the
  same MLflow run.  MLflow cannot delete a point, so metrics are sent at each checkpoint (and
  at least every ``MLFLOW_FLUSH_S`` seconds for a live view): a run stopped at a step
  boundary has sent exactly its checkpointed steps; one killed between checkpoints may have
  sent some steps that the resumed run sends again (with the same loss: the same bits).

The tracker libraries are optional extras, imported only here and only when asked for
(``Config.reporters`` checks they are installed before anything is created).

MLflow talks to a server that may be slow, gone or never answer, so none of its calls is made
on the training path: one thread of its own (``Sender``) makes them in order, and the loop only
puts them on its queue.  Its bounds: starting the MLflow run takes at most ``START_S`` (else the
run is refused, exit 2, nothing created); a call that fails later drops the tracker with one
warning line (metrics.jsonl stays the record, training goes on); the end of the run waits at
most ``CLOSE_S`` for what is queued.  MLflow's own HTTP settings (``HTTP_DEFAULTS``) are lowered
from its defaults (120 s a request, 7 retries with backoff 2: 254 s at a closed port) for our
calls, where the user has not set them.  TensorBoard writes local files and stays in the loop.
"""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
import time

from ..errors import UsageError, one_line
from .checkpoint import write_json
from .remote import url_of

TENSORBOARD_DIR = "tensorboard"
MLFLOW_FILE = "mlflow.json"  # the MLflow run this directory reports to: a resumed run goes on in it
MLFLOW_EXPERIMENT = "distbp"  # unless MLFLOW_EXPERIMENT_NAME says otherwise
MLFLOW_FLUSH_S = 30.0
START_S = 10.0  # the longest a run waits for MLflow to start (or find) its run: then it is refused
CLOSE_S = 30.0  # the longest the end of a run waits for MLflow to take what is queued (artifacts included)
QUEUE_MAX = 64  # MLflow calls waiting (a batch of metrics each): more, and it is dropped as not keeping up
# For our client where the user has not set them: 10 s to connect and 10 s for each read, 2 retries
# 0 s and 2-2.5 s apart.  A closed port is refused in ~2.5 s; a hung call gives up in ~33 s.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}


NOISE = ("b_simple", "grad_sq_micro", "grad_sq_batch", "grad_sq_estimate", "grad_var_estimate")


def step_scalars(record: dict, samples_per_second: float | None) -> dict[str, float]:
    """A step's figures under the names both trackers get: loss, lr, samples/s, the slowest
    worker's compute, the server sum and update (seconds), the bytes each server received, and
    the gradient noise scale's (step/noise.py)."""
    out = {"train/loss": record["loss"]}
    if "lr" in record:
        out["train/lr"] = record["lr"]
    if samples_per_second is not None:
        out["perf/samples_per_second"] = samples_per_second
    for key in ("worker_compute", "server_sum", "update"):
        if key in record:
            out[f"perf/{key}_s"] = record[key]
    for s, nbytes in enumerate(record.get("server_bytes_in", [])):
        out[f"perf/server{s}_bytes_in"] = nbytes
    for key in NOISE:  # the gradient noise scale (sync runs; null before it is defined)
        if record.get(key) is not None:
            out[f"noise/{key}"] = record[key]
    return out


def evaluation_scalars(record: dict) -> dict[str, float]:
    """An evaluation's figures: ``test_loss``/``test_accuracy`` (or ``validation_*``) as ``eval/...``."""
    return {f"eval/{k}": v for k, v in record.items() if k not in ("step", "epoch") and isinstance(v, int | float)}


class TensorBoard:
    """Event files in ``<out>/tensorboard/``, written with tensorboardX."""

    def __init__(self, path: str, resumed_step: int):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard forgets what an earlier process logged from this step on.
        self.writer = SummaryWriter(os.path.join(path, TENSORBOARD_DIR),
                                    purge_step=resumed_step + 1 if resumed_step else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def saved(self, files, step: int) -> None:
        self.writer.flush()  # what is checkpointed is on disk in the event file too

    def summarised(self, files, summary: dict) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", summary["steps"])
        self.writer.flush()  # on disk before the summary is uploaded (remote.py)

    def closed(self, files) -> None:
        self.writer.close()


def mlflow_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a file store ``./mlruns`` (MLflow's own default place)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.abspath("mlruns")
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store unless asked: a local store is what we ask for here.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


class Call:
    """A call queued with a ``Sender``: ``done`` is set once it has run (or was skipped)."""

    def __init__(self, fn):
        self.fn, self.result, self.done = fn, None, threading.Event()


class Sender:
    """One daemon thread making a tracker's calls in order, off the training path: the loop only
    puts calls on its queue (``put`` never waits).  The first call that raises ends its work:
    the error is raised again by every later ``put`` and ``wait``, and the calls after it are
    skipped.  ``stop`` ends the thread once its current call returns (a hung one is left behind:
    the HTTP timeouts end it)."""

    def __init__(self, what: str):
        self.what = what  # the tracker, for messages
        self.calls: queue.Queue = queue.Queue(QUEUE_MAX)
        self.error: BaseException | None = None
        self.stopped = False
        threading.Thread(target=self._serve, name=f"distbp-{what}", daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped:
            call = self.calls.get()
            if call is None:
                return
            if self.error is None and not self.stopped:
                try:
                    call.result = call.fn()
                except Exception as exc:  # the tracker's failure: said once, by the loop (Reporters)
                    self.error = exc
            call.done.set()

    def put(self, fn) -> Call:
        """Queue ``fn()``; raises the error of an earlier call, or RuntimeError if the queue is full."""
        if self.error is not None:
            raise self.error
        call = Call(fn)
        try:
            self.calls.put_nowait(call)
        except queue.Full:
            raise RuntimeError(f"{self.what} is not keeping up ({QUEUE_MAX} calls waiting)") from None
        return call

    def wait(self, fn, seconds: float):
        """``fn()``'s result once every call before it has run: TimeoutError after ``seconds``."""
        call = self.put(fn)
        if not call.done.wait(seconds):
            raise TimeoutError(f"no answer from {self.what} within {seconds:g} s")
        if self.error is not None:
            raise self.error
        return call.result

    def stop(self) -> None:
        self.stopped = True
        try:
            self.calls.put_nowait(None)  # wakes the thread if it waits for a call
        except queue.Full:
            pass


class MLflow:
    """One MLflow run per run directory: the config as params, each step's figures as metrics,
    summary.json and the last checkpoint as artifacts; every call made by a ``Sender``."""

    def __init__(self, path: str, config: dict, resumed_step: int):
        from mlflow import MlflowClient

        self.uri = mlflow_uri()
        self.client = MlflowClient(self.uri)
        self.pending: list = []
        self.flushed = time.monotonic()
        self.finished = False
        self.sender = Sender("MLflow at " + re.sub(r"//[^/@]*@", "//", self.uri))  # no password in a message
        # The user's settings win; ours are taken back at the end (fit() runs in the user's process).
        self.ours = [name for name in HTTP_DEFAULTS if name not in os.environ]
        os.environ.update({name: HTTP_DEFAULTS[name] for name in self.ours})
        stored = os.path.join(path, MLFLOW_FILE)
        try:
            self.run_id, new = self.sender.wait(lambda: self._start(stored, path, config, resumed_step), START_S)
            if new:  # written here, not by the thread: a start given up on writes nothing
                write_json(stored, {"tracking_uri": self.uri, "run_id": self.run_id})
        except BaseException:
            self._end()
            raise

    def _start(self, stored: str, path: str, config: dict, resumed_step: int) -> tuple[str, bool]:
        """In the sender's thread: the MLflow run to report to, and whether it is a new one."""
        run_id = self._stored_run(stored) if resumed_step else None
        if run_id is not None:  # the same MLflow run goes on; its params stay those it started with
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, f"distbp.resumed_from_step.{resumed_step}", json.dumps(
                {k: config[k] for k in ("steps", "epochs", "workers", "servers") if k in config}))
            return run_id, False
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        where = url_of(path) or os.path.abspath(path)  # a URL's run is staged in a local directory
        run = self.client.create_run(experiment_id, run_name=where.rstrip("/").rsplit("/", 1)[-1],
                                     tags={"distbp.out": where})
        self.run_id = run.info.run_id
        self._log_batch(params=[_param(k, v) for k, v in sorted(config.items())])
        return run.info.run_id, True

    def _stored_run(self, stored: str) -> str | None:
        """The run id in ``mlflow.json`` if it is in this tracking store; else None (a new run)."""
        try:
            with open(stored, encoding="utf-8") as fh:
                info = json.load(fh)
            if info["tracking_uri"] != self.uri:
                return None
            return self.client.get_run(info["run_id"]).info.run_id
        except Exception:  # no file, another store, a deleted run: report to a new run
            return None

    def _log_batch(self, metrics=(), params=()) -> None:
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics and 100 params a call
            self.client.log_batch(self.run_id, metrics=list(metrics[i:i + 1000]))
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=list(params[i:i + 100]))

    def _log_artifacts(self, paths: list[str]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, path)

    def _send(self, fn) -> None:
        """Queue ``fn`` with the sender; if MLflow failed, end this reporter and raise why."""
        try:
            self.sender.put(fn)
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        """Stop the sender and take back the HTTP settings we set.  Safe to call again."""
        self.sender.stop()
        for name in self.ours:
            os.environ.pop(name, None)
        self.ours = []

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if self.sender.error is not None:  # said at the next step, not at the next flush
            self._end()
            raise self.sender.error
        now = int(time.time() * 1000)
        self.pending += [Metric(tag.replace("/", "."), float(value), now, step) for tag, value in values.items()]
        if time.monotonic() - self.flushed > MLFLOW_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            batch = self.pending
            self._send(lambda: self._log_batch(metrics=batch))
        self.pending, self.flushed = [], time.monotonic()

    def saved(self, files, step: int) -> None:
        self.flush()

    def summarised(self, files, summary: dict) -> None:
        self.flush()
        paths = [os.path.join(files.path, "summary.json")] + \
            ([files.checkpoint] if os.path.exists(files.checkpoint) else [])
        self._send(lambda: self._log_artifacts(paths))
        self.finished = True

    def closed(self, files) -> None:
        """Send what is pending and end the MLflow run, waiting at most ``CLOSE_S`` for it all."""
        try:
            self.flush()
            # A run that stopped before its summary (a signal, a failure) can be resumed: KILLED, not FAILED.
            status = "FINISHED" if self.finished else "KILLED"
            self.sender.wait(lambda: self.client.set_terminated(self.run_id, status), CLOSE_S)
        finally:
            self._end()


class Reporters:
    """The trackers of ``--report-to``: each gets the figures of every step and evaluation.

    A tracker that fails mid-run (a server gone away, or MLflow not answering by the end of the
    run: ``CLOSE_S``) is dropped with one line on stderr; the run and its files go on (they are
    the record).  Failing to start one (MLflow: within ``START_S``) is a UsageError.
    """

    def __init__(self, names: tuple[str, ...], path: str, config: dict, resumed_step: int):
        self.active: dict[str, object] = {}
        for name in names:
            try:
                self.active[name] = TensorBoard(path, resumed_step) if name == "tensorboard" \
                    else MLflow(path, config, resumed_step)
            except Exception as exc:
                self.closed(None)
                raise UsageError(f"--report-to {name}: cannot start it ({one_line(exc)})") from None

    def _each(self, method: str, *args) -> None:
        for name, reporter in list(self.active.items()):
            try:
                getattr(reporter, method)(*args)
            except Exception as exc:
                del self.active[name]
                print(f"distbp: warning: --report-to {name} stopped: {one_line(exc)}; metrics.jsonl has "
                      "every step", file=sys.stderr)

    def step(self, record: dict, samples_per_second: float | None) -> None:
        self._each("scalars", record["step"], step_scalars(record, samples_per_second))

    def evaluation(self, record: dict) -> None:
        self._each("scalars", record["step"], evaluation_scalars(record))

    def saved(self, files, step: int) -> None:
        self._each("saved", files, step)

    def summarised(self, files, summary: dict) -> None:
        self._each("summarised", files, summary)

    def closed(self, files) -> None:
        self._each("closed", files)
        self.active = {}


def _param(key, value):
    from mlflow.entities import Param

    return Param(key, "" if value is None else str(value))
