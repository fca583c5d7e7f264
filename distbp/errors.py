"""The errors the command line turns into one line on stderr: bad input exits 2, a failed run 1.

All are ``DistbpError``s, so Python callers (``distbp.fit``) can catch them in one clause.
``one_line`` and ``size_text`` word the messages, for every module that raises them;
``run_file`` finds a file of a run directory or says what is missing.
"""

import os


class DistbpError(Exception):
    """Anything distbp reports as a problem of the run, its options or its data."""


class DataError(DistbpError, ValueError):
    """Bad or missing input data; the CLI prints its message on one line and exits 2."""


class UsageError(DistbpError, ValueError):
    """A bad option or combination of options; the CLI prints it on one line and exits 2."""


class RunFailed(DistbpError, RuntimeError):
    """Training began but cannot go on; the CLI prints one line and exits 1.  Whatever the
    run saved before (checkpoint, metrics) stays on disk."""


class Diverged(RunFailed):
    """A non-finite loss, gradient or weight vector; the message names the step."""


class Interrupted(DistbpError):
    """SIGINT or SIGTERM stopped the run at a step boundary after writing a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def one_line(exc: BaseException) -> str:
    """An exception's message for an error line, which is one line: its first non-empty line
    with the whitespace collapsed (numpy's and tomllib's messages can run to several), or the
    exception's type where the message is empty."""
    for line in str(exc).splitlines():
        if line.strip():
            return " ".join(line.split())
    return type(exc).__name__


def size_text(nbytes: float) -> str:
    """``7.3 TiB``: a byte count for a message."""
    if nbytes >= 1024 ** 6:  # beyond PiB (and maybe beyond a float): the order of magnitude says it
        return f"10^{len(str(int(nbytes))) - 1} bytes"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def run_file(run_dir: str, name: str, missing: str, error: type[DistbpError]) -> str:
    """The path of ``name`` in the run directory ``run_dir``; ``error`` with one line if the
    directory is not there, or ``missing`` (what to say) if the file is not."""
    if not os.path.isdir(run_dir):
        raise error(f"{run_dir}: no such run directory" + " (not a directory)" * os.path.lexists(run_dir))
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        raise error(f"{run_dir}: {missing}")
    return path
