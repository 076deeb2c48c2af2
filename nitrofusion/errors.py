"""Errors caused by what the user asked for (bad options, missing files).

The CLI prints these as one line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input that a one-line message explains."""
