"""CPU offload of the frozen teacher: what a run calls rarely, or never, lives in host memory.

With the teacher's pairs made beforehand, NitroFusion's iteration runs only the teacher UNet's
encoder on the device (the discriminator backbone stops after the mid block; for an SD3
transformer, after the first half of its blocks). The UNet's decoder (SDXL: 1.32 B of its
2.57 B parameters) is never called; the text encoders (0.82 B) only for prompts the
conditioning cache has not met; the VAE only to draw validation grids. `HostOffload` keeps
such modules' weights in (pinned) host memory and copies them to the device for the length
of a use (`onloaded`), then drops the device copies.

Only uses without autograd can be offloaded: a module that is differentiated through keeps
its weights referenced by the graph until the backward pass, so leaving the `with` block
would not free them, and pointing them back at host memory would break that backward. Such
modules (the encoder as backbone, the VAE under a pixel discriminator) stay on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from nitrofusion.data.conditioning import is_sd3
from nitrofusion.training.host_memory import host_copies

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

GROUPS = ("text", "vae", "decoder", "safety")  # the teacher's parts that can live in host memory


Homes = list[tuple[torch.Tensor, torch.Tensor]]  # (tensor, its host copy)


def move_home(tensors: Iterable[torch.Tensor]) -> Homes:
    """Point each tensor at a host copy of itself, freeing its device copy. The copies of GPU
    tensors are pinned (packed in few blocks: host_memory.py), so the copies back (`visit`) are
    asynchronous."""
    tensors = list(tensors)
    homes = host_copies(tensors, pin=any(t.is_cuda for t in tensors))
    for t, home in zip(tensors, homes):
        t.data = home
    return list(zip(tensors, homes))


def visit(homes: Homes, device: torch.device | str) -> None:
    """Each tensor on `device`, copied from its host copy; `go_home` drops the device copies."""
    for t, home in homes:
        t.data = home.to(device, non_blocking=True)


def go_home(homes: Homes) -> None:
    for t, home in homes:
        t.data = home


def unique_tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers of `modules`, each once (tied weights are one tensor)."""
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            seen.setdefault(id(t), t)
    return list(seen.values())


class HostOffload:
    """Groups of frozen modules whose weights stay in host memory outside `onloaded(...)`.

    A module of an offloaded group called outside `onloaded`, or with autograd on, raises at
    once with its group's name, instead of a device mismatch deep inside a kernel (or, worse,
    a CPU run that silently differs from the GPU one)."""

    def __init__(self, groups: dict[str, list[nn.Module]], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._home: dict[str, Homes] = {}
        self._depth: dict[str, int] = {}
        for name, modules in groups.items():
            if name not in GROUPS:
                raise ValueError(f"unknown offload group {name!r} (groups: {', '.join(GROUPS)})")
            for module in modules:
                module.register_forward_pre_hook(partial(self._check, name))
            self._home[name], self._depth[name] = move_home(unique_tensors(modules)), 0

    def _check(self, name: str, module: nn.Module, args: tuple) -> None:
        if self._depth[name] == 0:
            raise RuntimeError(
                f"the teacher's {name} is offloaded to host memory (model.teacher_offload) and was called "
                "outside HostOffload.onloaded"
            )
        if torch.is_grad_enabled():
            raise RuntimeError(f"the teacher's {name} is offloaded to host memory and cannot be differentiated through")

    @property
    def groups(self) -> list[str]:
        return list(self._home)

    def host_bytes(self, name: str | None = None) -> int:
        """Bytes held in host memory instead of on the device (one group, or all of them)."""
        names = [name] if name else self.groups
        return sum(home.numel() * home.element_size() for n in names for _, home in self._home.get(n, []))

    @contextmanager
    def onloaded(self, *names: str) -> Iterator[None]:
        """The named groups on the device inside the block; groups not offloaded are left alone.
        Nested blocks copy a group in once and drop it when the outermost one ends."""
        unknown = [n for n in names if n not in GROUPS]
        if unknown:
            raise ValueError(f"unknown offload group {unknown[0]!r} (groups: {', '.join(GROUPS)})")
        entered = []
        try:
            for name in (n for n in names if n in self._home):
                entered.append(name)  # first: a copy that fails half-way is undone below
                self._depth[name] += 1
                if self._depth[name] == 1:
                    visit(self._home[name], self.device)
            yield
        finally:
            for name in entered:
                self._depth[name] -= 1
                if self._depth[name] == 0:
                    go_home(self._home[name])


def teacher_groups(
    pipe: DiffusionPipeline,
    whole_unet_every_step: bool,
    vae_differentiated: bool,
    transformer_blocks_read: int | None = None,
) -> dict[str, list[nn.Module]]:
    """The teacher's offloadable parts for a run: its text encoders and safety checker (if any)
    always; its VAE unless a pixel discriminator decodes through it with gradients; its UNet's
    decoder unless the whole teacher UNet runs every iteration (DMD2's and ADM's real score; a
    LoRA student sharing its weights). For a flow transformer (SD3), the "decoder" is what the
    discriminator never reads: the blocks after its first `transformer_blocks_read` (None: it
    reads none, so all of them) and the output layers."""
    encoders = (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3", None))
    groups = {"text": [m for m in encoders if m is not None]}
    if not vae_differentiated:
        # AutoencoderKL's decode() is not its forward(): the guard sits on the parts it calls.
        groups["vae"] = [m for m in pipe.vae.children() if any(True for _ in m.parameters())] or [pipe.vae]
    if not whole_unet_every_step:
        if is_sd3(pipe):
            model = pipe.transformer
            later = list(model.transformer_blocks)[transformer_blocks_read or 0 :]
            groups["decoder"] = [*later, model.norm_out, model.proj_out]
        else:
            unet = pipe.unet
            groups["decoder"] = [m for m in (*unet.up_blocks, unet.conv_norm_out, unet.conv_out) if m is not None]
    if getattr(pipe, "safety_checker", None) is not None:  # SD1.5's (1.2 GB): it judges validation grids only
        groups["safety"] = [pipe.safety_checker]
    return groups
