"""Exponential moving average of a model's weights, kept as a module for checkpointing."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copy of `model` updated as shadow <- decay * shadow + (1 - decay) * param.

    Frozen parameters (requires_grad False, e.g. the base weights under LoRA) are shared with
    `model`, not copied: they never change, and at SDXL scale a copy costs 10 GB. With decay 0
    (no averaging) every parameter is shared: the "EMA" is the model, at no memory cost.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        shared = {id(p): p for p in model.parameters() if decay == 0 or not p.requires_grad}
        self.shadow = copy.deepcopy(model, shared).eval()
        self.shared = {k for k, v in self.shadow.state_dict(keep_vars=True).items() if id(v) in shared}
        for p in self.shadow.parameters():
            if id(p) not in shared:  # a shared one is the model's own: leave it trainable
                p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            if s is not p:
                s.lerp_(p.detach().to(s.dtype), 1.0 - self.decay)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow's state without the weights it shares with the model (a checkpoint holds those once)."""
        return {k: v for k, v in self.shadow.state_dict().items() if k not in self.shared}

    def load_own_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.shadow.load_state_dict(state, strict=False)
        if unexpected or set(missing) - self.shared:
            raise RuntimeError(
                f"EMA state does not fit: missing {sorted(set(missing) - self.shared)[:3]}, unexpected {unexpected[:3]}"
            )

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            p.copy_(s.to(p.dtype))
