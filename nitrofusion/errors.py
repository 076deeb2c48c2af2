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


class Interrupted(Exception):
    """A generation stopped between two steps because its caller asked it to (the app shutting down)."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, or its class name where it has no message: what a one-line
    UserError quotes of a library's error (whose later lines are tracebacks or lists)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU's out-of-memory error, or the CPU allocator's (a plain RuntimeError)."""
    import sys

    torch = sys.modules.get("torch")  # a command that failed before importing it had no memory to fill
    if torch is None or not isinstance(exc, RuntimeError):
        return False
    gpu = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: 2.5 on
    return isinstance(exc, gpu) or "DefaultCPUAllocator: can't allocate memory" in str(exc)


MAX_GUIDANCE = 100.0


def check_guidance_scale(value: float | None, option: str = "--guidance-scale") -> None:
    """None (the sampler's default) or a number in [0, 100]: inf gave NaN images (and NaN teacher
    pairs), nan and negative values silently turned guidance off, and 1e30 black images (CFG in
    use is 1-20)."""
    if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
        raise UserError(f"{option} must be a finite number in 0..{MAX_GUIDANCE:g}, got {value}")
