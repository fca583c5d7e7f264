"""The ``distbp`` command: train, verify, plot.  Bad input ends with one line on stderr and status 2."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from . import config as cfg
from .errors import DataError, Interrupted, RunFailed, UsageError
from .run import progress
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
    cfg.add_arguments(train)
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint, to the same "
                       "final weights as if it had never stopped; flags may extend --steps/--epochs or change "
                       "--workers")
    verify = sub.add_parser("verify", help="show that the batch gradient is the same sum however it is split; "
                                           "exit 0 only if every check agrees")
    verify_cmd.add_arguments(verify)
    plot = sub.add_parser("plot", help="loss and accuracy curves of one or several runs, to a PNG",
                          description="Draw the training loss and the test (or validation) loss and accuracy of "
                                      "one or several runs, read from their metrics.jsonl, into one PNG.")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by distbp train --out")
    plot.add_argument("--out", metavar="FILE.png", help="where the PNG goes (default: curves.png in the first RUN_DIR)")
    return parser


def run_train(ns: argparse.Namespace) -> int:
    from .loops.sync import train

    if getattr(ns, "resume", None):
        from .run import resume

        summary = train(*resume.load(ns.resume, cfg.given(ns)))
    else:
        summary = train(cfg.from_args(ns))
    keys = ("steps", "epochs", "workers", "final_loss", "train_accuracy", "test_split", "test_accuracy",
            "samples_per_second", "wall_time_s", "mode", "exact", "weights_sha256", "out")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


def run_plot(ns: argparse.Namespace) -> int:
    from .tools.plot import plot

    print(plot(ns.runs, ns.out))
    return 0


COMMANDS = {"train": run_train, "verify": verify_cmd.run, "plot": run_plot}


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
    except Interrupted as exc:  # stopped at a step boundary, checkpoint written
        say(f"distbp: {exc}", interrupted=True)
        return 128 + exc.signum
    except KeyboardInterrupt:
        say("distbp: interrupted", interrupted=True)
        return 130
