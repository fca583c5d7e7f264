"""The ``distbp`` command: train, verify, plot, convert, timeline.  Bad input: one line on stderr, status 2."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from contextlib import contextmanager

from . import __version__, options
from .data import convert as convert_cmd
from .errors import DataError, Interrupted, RunFailed, UsageError
from .run import progress, remote, signals
from .tools import timeline as timeline_cmd
from .tools import verify as verify_cmd


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``distbp: error: ...``) and status 2."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="distbp", description="Data-parallel backpropagation on Ray, exact for any worker count.")
    parser.add_argument("--version", action="version", version=f"distbp {__version__}")
    # Not required=True: a bare ``distbp`` gets the full help (main), not argparse's one line.
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=Parser)
    train = sub.add_parser("train", help="train a network; results go to --out",
                           description="Train a network with data-parallel backpropagation on Ray workers. "
                                       "The results (metrics.jsonl, checkpoint.npz, summary.json) go to --out; "
                                       "the summary is also printed as JSON on stdout.")
    options.add_arguments(train)
    train.add_argument("--resume", metavar="DIR", help=options.resume_help())
    verify = sub.add_parser("verify", help="show that the batch gradient is the same sum however it is split; "
                                           "exit 0 only if every check agrees")
    verify_cmd.add_arguments(verify)
    convert = sub.add_parser("convert", help="a dataset (npz, fashion-mnist, parquet, csv) into npy:DIR shards, "
                                             "read in chunks")
    convert_cmd.add_arguments(convert)
    plot = sub.add_parser("plot", help="loss and accuracy curves of one or several runs, to a PNG",
                          description="Draw the training loss and the test (or validation) loss and accuracy of "
                                      "one or several runs, read from their metrics.jsonl, into one PNG.")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by distbp train --out")
    plot.add_argument("--out", metavar="FILE.png", help="where the PNG goes (default: curves.png in the first RUN_DIR)")
    timeline = sub.add_parser("timeline", help="a run's --timeline spans as RUN_DIR/timeline.json (Chrome trace "
                                               "events, for Perfetto or chrome://tracing)")
    timeline_cmd.add_arguments(timeline)
    return parser


def run_train(ns: argparse.Namespace) -> int:
    from .loops.sync import train

    if getattr(ns, "resume", None) == "":  # would silently start a new run instead
        raise UsageError("--resume must not be empty: give the directory of the run to continue")
    # The whole run under the command's signal scope (a signal stops it at once outside the step
    # loop, with one line and 128 + its number), and with file descriptor 1 on stderr: stdout is
    # the summary's JSON, whatever Ray, its C++ core or a library prints meanwhile.
    with signals.StopSignals(at_once=True, describe=lambda: stop_line(ns)), stdout_to_stderr():
        try:
            if getattr(ns, "resume", None):
                from .run import resume

                where = remote.download(ns.resume) if remote.is_url(ns.resume) else ns.resume
                with remote.discarded_unless_begun(where):
                    summary = train(*resume.load(where, options.given(ns)))
            else:
                config = options.from_args(ns)
                if remote.is_url(config.out):  # runs in a local directory, uploaded as it goes
                    config.out = remote.stage(config.out)
                with remote.discarded_unless_begun(config.out):
                    summary = train(config)
        except BaseException as exc:
            if signals.stopped_at_once() is None:
                raise
            # A signal stopped the run at once: whatever exception that became on its way out
            # of Ray (a KeyboardInterrupt, a failed task, SystemExit), it is reported as the stop.
            raise Interrupted(stop_line(ns, exc).removeprefix("distbp: "), first_signal()) from None
    keys = ("steps", "epochs", "workers", "final_loss", "train_accuracy", "test_split", "test_accuracy",
            "samples_per_second", "wall_time_s", "b_simple", "mode", "exact", "weights_sha256", "out")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))  # b_simple: sync runs
    return 0


def first_signal() -> int:
    return (signals.received() or [signals.stopped_at_once()])[0]


def stop_line(ns: argparse.Namespace, exc: BaseException | None = None) -> str:
    """The one line for a run a signal stopped at once: the message of the step boundary's stop
    if the run got that far (``Interrupted`` in ``exc``'s chain), else what is known of where
    it stopped and how to go on."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Interrupted):  # the checkpoint it names was written
            return f"distbp: {exc}"
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    sig = signals.name(first_signal())
    if not signals.loop_began():
        if getattr(ns, "resume", None):
            return f"distbp: stopped by {sig} before resuming; the run is as it was: continue with: " \
                   f"distbp train --resume {ns.resume}"
        return f"distbp: stopped by {sig} before the first step; nothing to resume"
    line = f"distbp: stopped at once by a second {sig}" if len(signals.received()) > 1 \
        else f"distbp: stopped by {sig} while the run was ending"
    where = getattr(ns, "resume", None) or getattr(ns, "out", None)
    if where and os.path.isfile(os.path.join(where, "checkpoint.npz")):
        line += f"; its last checkpoint is kept: continue with: distbp train --resume {where}"
    return line


@contextmanager
def stdout_to_stderr():
    """File descriptor 1 and ``sys.stdout`` point at stderr inside; both are put back after."""
    sys.stdout.flush()
    python_stdout, saved = sys.stdout, None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 (closed) or 2: nothing to protect, or nowhere else to send it
        saved = None
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = python_stdout
        try:  # what went into the buffers meanwhile goes out while fd 1 is still stderr
            python_stdout.flush()
            ctypes.CDLL(None).fflush(None)
        except (OSError, ValueError):
            pass
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def run_plot(ns: argparse.Namespace) -> int:
    from .tools.plot import plot

    print(plot(ns.runs, ns.out))
    return 0


COMMANDS = {"train": run_train, "verify": verify_cmd.run, "plot": run_plot, "convert": convert_cmd.run,
            "timeline": timeline_cmd.run}


def say(message: str, interrupted: bool = False) -> None:
    """``message`` on stderr on a line of its own: any progress bar still open is closed first
    (ending its line, so it is not redrawn later), and on a terminal an interruption's message
    starts at column 0, over the ``^C`` the terminal echoed."""
    progress.close_all()
    if interrupted and sys.stderr.isatty():
        message = "\r" + message
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        ns = parser.parse_args(argv)
        if ns.command is None:
            parser.print_help(sys.stderr)
            print(f"\ndistbp: error: no command given; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return COMMANDS[ns.command](ns)
    except (UsageError, DataError) as exc:
        say(f"distbp: error: {exc}")
        return 2
    except RunFailed as exc:
        say(f"distbp: error: {exc}")
        return 1
    except Interrupted as exc:  # stopped at a step boundary (checkpoint written) or at once
        if signals.claim_line():  # not already written by the stop's watchdog
            say(f"distbp: {remote.in_words(str(exc))}", interrupted=True)
        return 128 + exc.signum
    except KeyboardInterrupt:
        say("distbp: interrupted", interrupted=True)
        return 130
