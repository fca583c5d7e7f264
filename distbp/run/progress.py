"""What a run shows while it goes: a tqdm bar on a terminal, plain log lines otherwise.

One or the other, not both: on a terminal the bar's fields carry what an evaluation's line
says (the last batch's loss, the last evaluation's accuracy, samples/s), so the lines are not
printed beside it; elsewhere (a log file, a pipe, a Ray job) there is no bar and each
evaluation (each epoch's end, and every ``--eval-every`` steps) is one line on stderr.
metrics.jsonl keeps every figure either way.

The bar is kept short enough for an 80-column terminal: ``step/total``, the bar, elapsed and
remaining time, then the fields (``loss=... test_acc=... samples/s=...``), which come last and
are not cut at 80 columns (up to 999,999 steps, 99 hours and 999,999 samples/s).  Before the
command line prints an error or "interrupted", ``close_all()`` ends any bar still open, so the
message starts on a line of its own and no stale bar is drawn after it.
"""

from __future__ import annotations

import sys
from typing import TextIO

from .remote import url_of

# No percentage, rate or description: step/total and the bar say how far, the fields say how fast.
BAR_FORMAT = "{n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}{postfix}"

SHORT = {"validation_acc": "val_acc"}  # labels shortened on the bar (log lines keep the long ones)

_open: list[Progress] = []  # bars drawn and not yet closed, for close_all()


def make_bar(total: int, initial: int = 0, file: TextIO | None = None, ncols: int | None = None):
    """The tqdm bar Progress draws; ``ncols=None`` follows the terminal's width as it changes."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=file or sys.stderr, bar_format=BAR_FORMAT,
                ncols=ncols, dynamic_ncols=ncols is None)


def postfix(fields: dict) -> str:
    """The bar's fields, compact: ``loss=0.1234 test_acc=0.8765 samples/s=1234``."""
    return " ".join(f"{SHORT.get(key, key)}={value}" for key, value in fields.items())


class Progress:
    """A tqdm bar on a terminal; plain log lines (one per evaluation) otherwise."""

    def __init__(self, total: int, initial: int = 0):
        self.total, self.initial = total, initial
        self.bar = None
        if sys.stderr.isatty():
            self.bar = make_bar(total, initial)
            _open.append(self)

    def step(self, **fields) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix(fields), refresh=False)
            self.bar.update(1)

    def note(self, **fields) -> None:
        """New values for the bar without a step (an evaluation just finished)."""
        if self.bar is not None:
            self.bar.set_postfix_str(postfix(fields))

    def log(self, line: str) -> None:
        """An evaluation's line: on stderr when there is no bar; with a bar, ``note`` shows its figures instead."""
        if self.bar is None:
            print(line, file=sys.stderr, flush=True)

    def say(self, line: str) -> None:
        """One line on stderr whatever is shown, above the bar if there is one."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def resuming(self, directory: str, step: int, total: int) -> None:
        """Say that the run in ``directory`` goes on from its checkpoint after ``step`` (of ``total``)."""
        # a run at a URL is resumed in a staging directory: name the URL
        self.say(f"resuming {url_of(directory) or directory} from step {step} of {total}")

    def close(self) -> None:
        """End the bar (it stays on screen, and the cursor goes to a new line); again does nothing."""
        bar, self.bar = self.bar, None
        if bar is not None:
            if self in _open:
                _open.remove(self)
            bar.close()


def close_all() -> bool:
    """Close every bar still open (a run stopped by an exception); True if there was one."""
    was_open = bool(_open)
    for progress in list(_open):
        progress.close()
    return was_open
