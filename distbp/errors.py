"""The one exception type the command line turns into a one-line message and exit status 2."""


class DataError(ValueError):
    """Bad or missing input data; the CLI prints its message on one line and exits 2."""


class UsageError(ValueError):
    """A bad option or combination of options; the CLI prints it on one line and exits 2."""
