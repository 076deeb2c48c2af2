"""What every objective shares with the trainer: losses out, critics that train themselves.

An objective turns one micro-batch -- the student's x0, the teacher's x0 from the same noise,
the prompts -- into `Losses`: the student's loss (backpropagated on the student's update
steps) and the critics' loss (backpropagated every step). A `Critic` is whatever else learns
during distillation (discriminator heads, a fake score): its modules and optimizers are saved
in checkpoints under fixed names, and the trainer calls `begin_step` before the micro-batches
and `update` after the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from nitrofusion.data.conditioning import Conditioning


class StepContext(Protocol):
    """The trainer, as objectives and critics see it."""

    def rng(self, purpose: str, per_rank: bool = False, micro: int = 0) -> torch.Generator: ...

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None: ...


class Objective(Protocol):
    """What the trainer calls each micro-batch (NitroFusion, DMD2, ADM, the pre-training ones):
    `fake` is the student's x0 (with its graph), `real` the teacher's x0 from the same noise;
    `train_student` says whether the student steps this iteration (critics step every one)."""

    def __call__(
        self,
        ctx: StepContext,
        fake: torch.Tensor,
        real: torch.Tensor,
        cond: Conditioning,
        micro: int,
        train_student: bool,
    ) -> Losses: ...


@dataclass
class Losses:
    g_loss: torch.Tensor  # the student's loss
    d_loss: torch.Tensor | None  # the critics' loss (None: nothing to train but the student)
    logs: dict[str, float] = field(default_factory=dict)


class Critic:
    """A trainable judge of the student, kept out of DDP: its gradients are averaged over ranks by hand."""

    modules: dict[str, nn.Module]  # checkpoint prefix -> module
    optimizers: dict[str, torch.optim.Optimizer]  # checkpoint prefix -> optimizer

    def begin_step(self, ctx: StepContext) -> None:
        """Choices shared by every micro-batch and rank of one iteration (none by default)."""

    def update(self, ctx: StepContext) -> dict[str, float]:
        """After the backward pass: average gradients over ranks and take an optimizer step."""
        for opt in self.optimizers.values():
            ctx.average_gradients(p for group in opt.param_groups for p in group["params"])
            opt.step()
        return {}

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)


def with_gradient(value: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar equal to `value` whose gradient with respect to x is `grad`.

    Used where the student's loss runs through a critic that also trains in the same
    iteration (the fake score): its gradient with respect to the critic's input is taken
    first with `torch.autograd.grad`, which leaves the critic's parameter gradients
    untouched. Switching the critic's requires_grad off for that pass instead would break
    gradient checkpointing, whose recomputation must see the same graph as the forward.
    """
    inner = (grad.detach() * x).sum()
    return value.detach() + (inner - inner.detach())  # exactly `value`: the bracket is 0


def input_gradient(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x (x a leaf that requires grad), without accumulating into any parameter's .grad."""
    (grad,) = torch.autograd.grad(loss, x)
    return grad
