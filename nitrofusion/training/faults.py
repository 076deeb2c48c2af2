"""Named fault points, armed from the environment, for the fault-injection tests and `make soak`.

The trainer calls `kill_point(name, step)` at the places where a crash is most likely to lose
work (mid-step, mid-checkpoint-write, mid-validation) and `fires("loss.nan", step)` where a
non-finite loss can be injected. Unarmed (the normal case) each call is one dictionary lookup.

    NITROFUSION_FAULTS="checkpoint@4"          SIGKILL this process inside the checkpoint write of step 4
    NITROFUSION_FAULTS="step@3,loss.nan@5-7"   die mid-step 3; (a resumed run) NaN losses at steps 5..7

A killed process gets no chance to clean up, exactly like `kill -9` or a power cut, which is the
point: what it leaves behind is what the next `--resume latest` must cope with.
"""

from __future__ import annotations

import os
import signal
from functools import cache

ENV = "NITROFUSION_FAULTS"
POINTS = ("step", "checkpoint", "validation", "loss.nan")


@cache
def _armed(spec: str) -> dict[str, list[tuple[int, int]]]:
    armed: dict[str, list[tuple[int, int]]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, _, steps = entry.partition("@")
        if name not in POINTS or not steps:
            raise ValueError(f"{ENV}: '{entry}' is not <point>@<step>[-<last step>] with a point in {POINTS}")
        first, _, last = steps.partition("-")
        armed.setdefault(name, []).append((int(first), int(last or first)))
    return armed


def fires(name: str, step: int) -> bool:
    """Whether fault `name` is armed for this (0-based) training step."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    return any(first <= step <= last for first, last in _armed(spec).get(name, ()))


def kill_point(name: str, step: int) -> None:
    """SIGKILL this process if fault `name` is armed for `step` (nothing is flushed or cleaned)."""
    if fires(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
