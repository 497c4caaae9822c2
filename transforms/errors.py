"""Exceptions that the command line turns into one line and an exit status."""


class StageError(Exception):
    """Bad configuration or input: the run cannot start or cannot go on.

    The message names the thing, its value and what was expected, so that it
    can be shown to the user as it is, on one line.
    """


class InputError(StageError):
    """The input data does not fit the configuration or the stage's rules."""
