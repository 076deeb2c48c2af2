"""One call for either denoiser the trainer drives: a UNet2DConditionModel (SDXL, SD1.5) or an
SD3-architecture flow transformer. Each takes the prompt through its own keywords: the UNet its
token states (and SDXL's added conditions), the transformer its token states and the pooled
text vector (`pooled_projections`), which `Conditioning.pooled` already is for SD3."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from nitrofusion.data.conditioning import Conditioning


def is_transformer(model: torch.nn.Module) -> bool:
    """Whether `model` (or the module a DDP wrapper holds) is a flow transformer."""
    return isinstance(getattr(model, "module", model), SD3Transformer2DModel)


def denoise(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The network's raw output at timestep(s) t: a UNet's by its prediction type (epsilon, v or
    x0), a flow transformer's velocity."""
    embeds, added = cond.unet_inputs(x.dtype)
    if is_transformer(model):
        return model(
            hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=cond.pooled.to(x.dtype)
        ).sample
    return model(x, t, embeds, added_cond_kwargs=added).sample
