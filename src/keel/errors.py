"""The one error type keel raises for bad input."""


class KeelError(ValueError):
    """Bad input: a config key, argument, file or checkpoint that keel cannot use.

    The message names what is wrong, the value given and what is allowed. The command
    line prints it as one line and exits with code 2.
    """
