"""The one error type keel raises for bad input, and the file name an OSError of a write should carry."""

import os


class KeelError(ValueError):
    """Bad input: a config key, argument, file or checkpoint that keel cannot use.

    The message names what is wrong, the value given and what is allowed. The command
    line prints it as one line and exits with code 2.
    """


class TrainingUnstableError(KeelError):
    """Training stopped because it could not be kept stable (too many skipped updates or loss-spike rollbacks).

    The message says what happened, at which step, and which checkpoint holds the last good state. The command
    line exits with code 1 for it (the input was fine; the run diverged).
    """


class naming_the_file:  # noqa: N801 (used as a context manager, like a function)
    """An OSError raised inside without a file name (a buffered write or flush refused by a full disk) gets ``path``,
    so the one line the command prints says which file could not be written. A class, not a generator: it wraps
    every metrics write, so entering it costs no more than an attribute store."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(self.path)
        return False
