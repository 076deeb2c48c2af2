"""The run's schedule: optional pre-training, then bottom-up refinement, a stage per sampling-step count.

Stage k (k = 1..4) trains the student for k sampling steps for `steps_per_stage[k - 1]`
iterations; a stage of 0 iterations is skipped. Iterations are counted from 0 across the run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str  # "pretrain" or "distill" (the main objective)
    num_steps: int  # sampling steps the student is being trained for (1..4)
    start: int = 0  # its first iteration
    end: int = 0  # one past its last iteration


class Schedule:
    def __init__(self, pretrain_steps: int, steps_per_stage: list[int], pretrain_kind: str = "regression") -> None:
        self.pretrain_kind = pretrain_kind
        self.spans: list[Phase] = []  # the phases that run, in order
        if pretrain_steps > 0:
            self.spans.append(Phase("pretrain", 1, 0, pretrain_steps))
        start = pretrain_steps
        for k, n in enumerate(steps_per_stage):
            if n > 0:
                self.spans.append(Phase("distill", k + 1, start, start + n))
            start += n
        self.total = start

    def phase(self, step: int) -> Phase:
        """The phase iteration `step` belongs to (past the end: the last one)."""
        for span in self.spans:
            if step < span.end:
                return span
        # `step` past the end (no caller asks) or nothing runs: the last phase that runs, or one step.
        return self.spans[-1] if self.spans else Phase("distill", 1)

    def labels(self) -> list[tuple[int, str]]:
        """(first iteration, name) of each phase, as curves.png marks them."""
        return [(p.start, self.label(p)) for p in self.spans]

    def label(self, phase: Phase) -> str:
        if phase.name == "pretrain":
            return f"pre-training ({self.pretrain_kind})"
        return f"{phase.num_steps} step" + ("s" if phase.num_steps > 1 else "")

    def stage_ends(self) -> dict[int, int]:
        """{iteration count at which a refinement stage ends: sampling steps it trained for}."""
        return {p.end: p.num_steps for p in self.spans if p.name == "distill"}

    def max_sampling_steps(self) -> int:
        # A regression-only run (every stage 0) still trains the one-step student.
        return max((p.num_steps for p in self.spans if p.name == "distill"), default=1)
