"""Errors caused by what the user asked for (bad options, missing files).

The CLI prints these as one line and exits with status 2 (the app answers them with a 4xx);
anything else is a bug and keeps its traceback.
"""

import math

_CONTROL = {i: f"\\x{i:02x}" for i in range(32)} | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): " "}


class UserError(Exception):
    """A problem with the user's input that a one-line message explains.

    Messages quote the user's input; control characters in it (a newline in a --set value, a
    carriage return in a path) are escaped so that the message stays one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(str(message).translate(_CONTROL))


def check_guidance_scale(value: float | None, option: str = "--guidance-scale") -> None:
    """None (the sampler's default) or a finite number >= 0: inf gave NaN images (and NaN teacher
    pairs), nan and negative values silently turned guidance off."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise UserError(f"{option} must be a finite number >= 0, got {value}")
