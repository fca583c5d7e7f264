"""The ``distbp`` command: train, verify.  Bad input ends with one line on stderr and status 2."""

from __future__ import annotations

import argparse
import json
import sys

from . import config as cfg
from . import verify as verify_cmd
from .errors import DataError, Interrupted, RunFailed, UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``distbp: error: ...``) and status 2."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="distbp", description="Data-parallel backpropagation on Ray, exact for any worker count.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = sub.add_parser("train", help="train a network; results go to --out")
    cfg.add_arguments(train)
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint, to the same "
                       "final weights as if it had never stopped; flags may extend --steps/--epochs or change "
                       "--workers")
    verify = sub.add_parser("verify", help="show that the batch gradient is the same sum however it is split; "
                                           "exit 0 only if every check agrees")
    verify_cmd.add_arguments(verify)
    plot = sub.add_parser("plot", help="loss and accuracy curves of one or several runs, to a PNG")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by distbp train --out")
    plot.add_argument("--out", metavar="FILE.png", help="where the PNG goes (default: curves.png in the first RUN_DIR)")
    return parser


def run_train(ns: argparse.Namespace) -> int:
    from .trainer import train

    if getattr(ns, "resume", None):
        from . import resume

        summary = train(*resume.load(ns.resume, cfg.given(ns)))
    else:
        summary = train(cfg.from_args(ns))
    keys = ("steps", "epochs", "workers", "final_loss", "train_accuracy", "test_split", "test_accuracy",
            "samples_per_second", "wall_time_s", "mode", "exact", "weights_sha256", "out")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


def run_plot(ns: argparse.Namespace) -> int:
    from .plot import plot

    print(plot(ns.runs, ns.out))
    return 0


COMMANDS = {"train": run_train, "verify": verify_cmd.run, "plot": run_plot}


def main(argv: list[str] | None = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
        return COMMANDS[ns.command](ns)
    except (UsageError, DataError) as exc:
        print(f"distbp: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"distbp: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # stopped at a step boundary, checkpoint written
        print(f"distbp: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("distbp: interrupted", file=sys.stderr)
        return 130
