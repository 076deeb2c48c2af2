"""The rule for a teacher's own timestep schedule (`data.teacher_timesteps`, `make-pairs --timesteps`),
kept free of heavy imports so that configs and the command line check it before loading a model."""

from __future__ import annotations

from collections.abc import Sequence

from nitrofusion.errors import UserError


def check_teacher_timesteps(
    timesteps: Sequence[int], steps: int, what: str = "the teacher's timesteps", steps_name: str = "the teacher's steps"
) -> None:
    """As many as `steps`, strictly decreasing, within 0..999; else one UserError naming `what`."""
    ts = list(timesteps)
    decreasing = all(a > b for a, b in zip(ts, ts[1:]))
    if len(ts) != steps or not decreasing or not all(0 <= t < 1000 for t in ts):
        raise UserError(f"{what} must list {steps_name} ({steps}) decreasing timesteps in 0..999, got {ts}")
