"""Exponential moving average of a model's weights, kept as a module for checkpointing.

At SDXL size the EMA's fp32 copy is 10.3 GB of GPU memory. `host=True` keeps it in (pinned)
host memory instead: each update brings it through the GPU a tensor at a time (10.3 GB each
way), once per student update (the `sdxl` preset updates once per 20 micro-batches, so the
copies' cost is spread over all of them). Sampling from the EMA brings it
to the device for the length of a block (`on_device`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from nitrofusion.training.offload import go_home, move_home, visit


class EMA(nn.Module):
    """Shadow copy of `model` updated as shadow <- decay * shadow + (1 - decay) * param.

    Frozen parameters (requires_grad False, e.g. the base weights under LoRA) are shared with
    `model`, not copied: they never change, and at SDXL scale a copy costs 10 GB. With decay 0
    (no averaging) every parameter is shared: the "EMA" is the model, at no memory cost.
    `host`: the weights it owns live in host memory (module docstring). `keep=False`: this process
    never reads the EMA (another rank writes the checkpoints, grids and exports), so it keeps no
    copy at all: under DDP only the main process pays for one.
    """

    def __init__(self, model: nn.Module, decay: float, host: bool = False, keep: bool = True) -> None:
        super().__init__()
        self.decay = decay
        self.kept = keep
        shared = {id(p): p for p in model.parameters() if decay == 0 or not keep or not p.requires_grad}
        self.shadow = copy.deepcopy(model, shared).eval()
        self.shared = {k for k, v in self.shadow.state_dict(keep_vars=True).items() if id(v) in shared}
        for p in self.shadow.parameters():
            if id(p) not in shared:  # a shared one is the model's own: leave it trainable
                p.requires_grad_(False)
        own = [p for p in self.shadow.parameters() if id(p) not in shared] + list(self.shadow.buffers())
        self._home = move_home(own) if host and keep else []
        self._on_device = False

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._on_device:
            raise RuntimeError("EMA.update inside EMA.on_device: the update would be lost with the device copy")
        if not self.kept:
            return
        weight, pending = 1.0 - self.decay, None
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            if s is p:
                continue
            if s.device == p.device:
                s.lerp_(p.detach().to(s.dtype), weight)
            else:
                # A host shadow of a GPU model: averaged on the GPU, a tensor at a time, both ways
                # through pinned memory. Averaging on the CPU instead reads the student out into
                # fresh pageable memory and runs a 2.6 B-value lerp on the host's cores at SDXL size.
                there = s.to(p.device, non_blocking=True)
                there.lerp_(p.detach().to(s.dtype), weight)
                s.copy_(there, non_blocking=True)
                pending = p.device
                del there  # its block is free for the next tensor's (stream order keeps the copy safe)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)
        if pending is not None and pending.type == "cuda":
            torch.cuda.synchronize(pending)  # the copies home are asynchronous: done before anyone reads them

    @contextmanager
    def on_device(self, device: torch.device | str) -> Iterator[nn.Module]:
        """The shadow, on `device` inside the block (read-only there); a no-op unless `host`."""
        if not self._home or self._on_device:
            yield self.shadow
            return
        self._on_device = True
        try:
            visit(self._home, device)
            yield self.shadow
        finally:
            go_home(self._home)
            self._on_device = False

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow's state without the weights it shares with the model (a checkpoint holds those once)."""
        return {k: v for k, v in self.shadow.state_dict().items() if k not in self.shared}

    def load_own_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> bool:
        """Load a checkpoint's EMA; False where it has none to load (a run without averaging), and
        the average starts from `model` as resumed. The weights this EMA shares with the model (all
        of them with decay 0) are the model's: a checkpoint's averages must not overwrite them."""
        if not self.kept:  # another rank's EMA: this one shares every weight with the model
            return True
        state = {k: v for k, v in state.items() if k not in self.shared}
        own = {k for k, _ in self.shadow.named_parameters() if k not in self.shared}
        if own and not own & state.keys():
            with torch.no_grad():
                for s, p in zip(self.shadow.parameters(), model.parameters()):
                    if s is not p:
                        s.copy_(p.detach())
            return False
        missing, unexpected = self.shadow.load_state_dict(state, strict=False)
        if unexpected or set(missing) - self.shared:
            raise RuntimeError(
                f"EMA state does not fit: missing {sorted(set(missing) - self.shared)[:3]}, unexpected {unexpected[:3]}"
            )
        return True

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            p.copy_(s.to(p.dtype))
