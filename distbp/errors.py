"""The errors the command line turns into one line on stderr: bad input exits 2, a failed run 1.

All are ``DistbpError``s, so Python callers (``distbp.fit``) can catch them in one clause.
"""


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
