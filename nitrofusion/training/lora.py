"""LoRA training mode: the student is the teacher's UNet plus trainable low-rank adapters (PEFT).

Only the adapters get gradients and optimizer state, so the student's trainable memory is
the adapters' (tens of MB at SDXL scale instead of 2.6B parameters' gradients and AdamW
moments). B starts at zero, so the student starts as the teacher, as in full fine-tuning.
What is saved is always a plain UNet state dict with the adapters folded into the weights
(`merged_state_dict`), which loads like any other student.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nitrofusion.errors import UserError

if TYPE_CHECKING:  # diffusers is imported where it is used: the config module reads DEFAULT_TARGETS
    from diffusers import UNet2DConditionModel

# Attention and feed-forward projections, the transformer blocks' in/out projections and the
# ResNet convolutions: the layers a few-step LoRA (e.g. LCM-LoRA) adapts.
DEFAULT_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
]

# An SD3 transformer's: the joint attention's image and text projections and both feed-forwards.
FLOW_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


def check_lora_targets(unet: torch.nn.Module, targets: list[str]) -> None:
    """Every target must name layers LoRA can adapt. PEFT matches a module whose name is the target
    or ends with "." + target, and raises only where nothing matches at all: `[to_q, to_kk]` would
    train `to_q` alone without a word, and a GroupNorm (`norm1`) fails as "not supported"."""
    from torch import nn

    adaptable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
    for target in targets:
        found = [m for n, m in unet.named_modules() if n == target or n.endswith("." + target)]
        if not found:
            raise UserError(f"model.lora_targets: '{target}' matches no module of the {type(unet).__name__}")
        other = sorted({type(m).__name__ for m in found if not isinstance(m, adaptable)})
        if other:
            raise UserError(
                f"model.lora_targets: '{target}' names {', '.join(other)} modules, which LoRA cannot adapt "
                "(linear, convolution and embedding layers only)"
            )


def add_lora(
    unet: UNet2DConditionModel, rank: int, alpha: float | None, targets: list[str], seed: int
) -> list[torch.nn.Parameter]:
    """Freeze `unet` and add a LoRA adapter of this rank to every module named in `targets`;
    returns the adapter's parameters (the only trainable ones). Seeded, so runs repeat."""
    from peft import LoraConfig

    check_lora_targets(unet, targets)
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=targets, init_lora_weights=True
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    return [p for p in unet.parameters() if p.requires_grad]


def has_lora(unet: torch.nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in unet.modules())


@torch.no_grad()
def merged_state_dict(unet: torch.nn.Module, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The UNet's plain state dict (the keys of a UNet without adapters), adapters folded in:
    W + (alpha / r) B A for every adapted layer, on the host. A UNet without adapters gives its own.

    `base`: the frozen weights at full precision, where the UNet's own were cast to bf16 for
    training; the merge is then W_fp32 + delta in fp32 (folded into bf16 weights, a change below
    bf16's resolution, ~0.4% of a weight, would vanish and the student would be a rounded teacher).
    """
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in module.active_adapters)
    state = {}
    for key, value in unet.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        # Merged on the host: the merged weights are only written to disk, and at SDXL size they are
        # 10 GB in fp32 that the training device would otherwise hold twice (state dict and UNet).
        value = value.cpu()
        if base is not None and value.is_floating_point():
            value = base[plain].to("cpu", torch.float32)
        if plain in deltas:
            value = (value.float() + deltas[plain].float().cpu()).to(value.dtype)
        state[plain] = value
    return state


def plain_unet(unet: UNet2DConditionModel, base: dict[str, torch.Tensor] | None = None) -> UNet2DConditionModel:
    """A UNet (or flow transformer) without adapters holding `unet`'s merged weights, on the host
    (the same object if it has none); `base` as in `merged_state_dict`."""
    if not has_lora(unet):
        return unet
    from accelerate import init_empty_weights

    state = merged_state_dict(unet, base)
    with init_empty_weights():  # no random init of weights that are replaced at once (minutes at SDXL size)
        plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state, assign=True)
    return plain.eval().requires_grad_(False)
