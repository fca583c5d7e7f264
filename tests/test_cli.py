"""The command line as a new user meets it: --help, --version, a bare ``distbp``, Ctrl-C, the bar."""

from __future__ import annotations

import gc
import io
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields

import pytest
from tqdm import tqdm

import distbp
from distbp import cli
from distbp.config import Config
from distbp.data.idx import DEFAULT_DATA_DIR
from distbp.errors import Interrupted, RunFailed
from distbp.run import progress
from distbp.run.progress import BAR_FORMAT, Progress, make_bar, postfix


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so Progress draws its bar into it."""

    def isatty(self) -> bool:
        return True


@contextmanager
def on_terminal() -> Iterator[Terminal]:
    """sys.stderr is a Terminal inside (set in the test itself: pytest rebinds it between phases)."""
    term, saved = Terminal(), sys.stderr
    sys.stderr = term
    try:
        yield term
    finally:
        progress.close_all()
        sys.stderr = saved


def subcommand(name: str):
    parser = cli.build_parser()
    (group,) = [a for a in parser._actions if a.dest == "command"]
    return group.choices[name]


def help_text(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


# 1. Each default once, and true.

def test_train_help_shows_each_default_once_and_truly(capsys: pytest.CaptureFixture) -> None:
    text = help_text(["train"], capsys)
    assert "None" not in text
    assert text.count(DEFAULT_DATA_DIR) == 1
    by_flag = {a.dest: a.help for a in subcommand("train")._actions if a.help}
    for f in fields(Config):
        shown = by_flag[f.name]
        assert shown.count("default") <= 1, (f.name, shown)
        if f.default is not None:
            assert shown.endswith(f"(default: {f.default})"), (f.name, shown)
    assert by_flag["data_dir"].endswith(f"(default: {DEFAULT_DATA_DIR})")


# 2. --version

def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"distbp {distbp.__version__}\n"


# 3. A bare ``distbp``

def test_bare_distbp_prints_usage_and_the_commands(capsys: pytest.CaptureFixture) -> None:
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: distbp")
    for command in ("train", "verify", "plot"):
        assert f"\n    {command} " in err
    assert err.rstrip().splitlines()[-1].startswith("distbp: error: ")


def test_bare_distbp_as_a_process_has_no_traceback() -> None:
    done = subprocess.run([sys.executable, "-m", "distbp"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "usage: distbp" in done.stderr and "Traceback" not in done.stderr


# 4. Descriptions

@pytest.mark.parametrize("name", ["train", "verify", "plot"])
def test_every_command_has_a_description(name: str, capsys: pytest.CaptureFixture) -> None:
    description = subcommand(name).description
    assert description and description.strip().endswith(".")
    assert description.split()[0] in help_text([name], capsys)


# 5. Where verify's question is

def test_verify_points_to_docs_exactness(capsys: pytest.CaptureFixture) -> None:
    from distbp.tools import verify

    assert cli.main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "docs/exactness.md" in out
    assert "background/" not in out + verify.__doc__
    assert "docs/exactness.md" in verify.__doc__


# 6. Ctrl-C and the bar

def test_close_is_idempotent_and_close_all_ends_open_bars() -> None:
    with on_terminal() as terminal:
        bar = Progress(10)
        bar.step(loss="1.0000")
        assert "0/10" in terminal.getvalue()  # drawn at once; steps within 0.1 s are not redrawn
        assert progress.close_all() is True
        assert terminal.getvalue().endswith("\n")
        drawn = terminal.getvalue()
        bar.close()
        bar.close()
        bar.step(loss="0.5000")  # after close: nothing drawn
        assert progress.close_all() is False
        assert terminal.getvalue() == drawn


# 6b. One or the other: the bar on a terminal, the evaluations' lines elsewhere (README, "Fashion-MNIST")

EVALUATION = "epoch 1 step 6/12 loss 0.4321 test_acc 0.8765 lr 0.01 samples/s 1234"


def six_steps_and_an_evaluation() -> None:
    bar = Progress(12)
    for _ in range(6):
        bar.step(loss="0.4321")
    bar.log(EVALUATION)
    bar.note(loss="0.4321", test_acc="0.8765")
    bar.close()


def test_on_a_terminal_the_bar_stands_in_for_the_evaluation_lines() -> None:
    with on_terminal() as terminal:
        six_steps_and_an_evaluation()
    out = terminal.getvalue()
    assert "epoch 1" not in out  # not beside the bar ...
    assert "test_acc=0.8765" in last_line(terminal)  # ... which shows its figures


def test_elsewhere_each_evaluation_is_one_line_and_there_is_no_bar(capsys: pytest.CaptureFixture) -> None:
    six_steps_and_an_evaluation()
    assert capsys.readouterr().err == EVALUATION + "\n"


def stopped_run(error: BaseException):
    def run(ns) -> int:
        bar = Progress(100)
        for _ in range(3):
            bar.step(loss="0.1234", **{"samples/s": "999"})
        raise error
    return run


@pytest.mark.parametrize("error, message, status", [
    (KeyboardInterrupt(), "distbp: interrupted", 130),
    (Interrupted("stopped by SIGINT after step 3 of 100", 2), "distbp: stopped by SIGINT after step 3 of 100", 130),
    (RunFailed("lost every worker"), "distbp: error: lost every worker", 1),
])
def test_a_message_after_a_live_bar_starts_on_its_own_line(error, message, status,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "train", stopped_run(error))
    with on_terminal() as terminal:
        assert cli.main(["train"]) == status
        gc.collect()  # a bar left open would redraw itself when collected
    out = terminal.getvalue()
    before, found, after = out.partition(message)
    assert found, out
    assert after == "\n", "nothing drawn after the message"
    assert "3/100" in before
    line_start = before.rstrip("\r")
    assert line_start.endswith("\n"), "the message starts on a fresh line"


# 7. The bar at 80 columns

FIELDS = {"loss": "0.1234", "test_acc": "0.8765", "samples/s": "123456"}


def last_line(buf: io.StringIO) -> str:
    return buf.getvalue().replace("\n", "\r").rstrip("\r").split("\r")[-1]


@pytest.mark.parametrize("total", [50, 2000, 100_000])
@pytest.mark.parametrize("shown", [FIELDS, {**FIELDS, "validation_acc": "0.8765"}])
def test_the_bar_fields_fit_in_80_columns(total: int, shown: dict) -> None:
    shown = dict(shown)
    if "validation_acc" in shown:
        del shown["test_acc"]
    buf = io.StringIO()
    bar = make_bar(total, initial=total // 3, file=buf, ncols=80)
    bar.set_postfix_str(postfix(shown))
    bar.update(1)
    bar.refresh()
    line = last_line(buf)
    bar.close()
    assert len(line) <= 80
    assert line.endswith(postfix(shown)), line
    assert f"{total // 3 + 1}/{total}" in line
    assert "samples/s=123456" in line and "loss=0.1234" in line


def test_the_bar_fields_fit_in_80_columns_on_a_long_run() -> None:
    text = postfix({"loss": "0.1234", "validation_acc": "0.8765", "samples/s": "123456"})
    line = tqdm.format_meter(333_333, 999_999, 45_296.0, ncols=80, bar_format=BAR_FORMAT, postfix=text,
                             rate=333_333 / 45_296.0)  # 12:34:56 elapsed, a day to go
    assert len(line) <= 80
    assert line.endswith(text), line
    assert "|" in line  # still a bar


# 8. Resuming

def test_resuming_says_from_which_step(capsys: pytest.CaptureFixture) -> None:
    bar = Progress(500, initial=120)
    bar.resuming("runs/x", 120, 500)
    bar.close()
    assert capsys.readouterr().err == "resuming runs/x from step 120 of 500\n"


def test_resuming_on_a_terminal_goes_above_the_bar() -> None:
    with on_terminal() as terminal:
        bar = Progress(500, initial=120)
        bar.resuming("runs/x", 120, 500)
        bar.close()
    assert "resuming runs/x from step 120 of 500\n" in terminal.getvalue()
    assert last_line(terminal).startswith("120/500")
