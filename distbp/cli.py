"""The ``distbp`` command: train, verify.  Bad input ends with one line on stderr and status 2."""

from __future__ import annotations

import argparse
import json
import sys

from . import config as cfg
from .errors import DataError, UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``distbp: error: ...``) and status 2."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="distbp", description="Data-parallel backpropagation on Ray, exact for any worker count.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = sub.add_parser("train", help="train a network; results go to --out")
    cfg.add_arguments(train)
    return parser


def run_train(ns: argparse.Namespace) -> int:
    from .trainer import train

    summary = train(cfg.from_args(ns))
    keys = ("steps", "epochs", "workers", "final_loss", "train_accuracy", "test_accuracy",
            "samples_per_second", "weights_sha256", "out")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


COMMANDS = {"train": run_train}


def main(argv: list[str] | None = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
        return COMMANDS[ns.command](ns)
    except (UsageError, DataError) as exc:
        print(f"distbp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distbp: interrupted", file=sys.stderr)
        return 130
