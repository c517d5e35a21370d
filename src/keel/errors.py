"""The one error type keel raises for bad input."""


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
