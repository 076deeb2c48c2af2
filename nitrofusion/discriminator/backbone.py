"""The frozen teacher UNet's encoder as the discriminator's feature network.

Features are read with forward hooks on diffusers' public modules (`conv_in`, each of
`down_blocks`, `mid_block`); after the mid block the forward pass is cut short, so the
decoder is never run. For SDXL this yields 10 maps: conv_in, 8 down-block residuals and
the mid-block output (the embedded world has the same count).

The teacher's encoder is frozen (NitroFusion, ADM); DMD2's classifier reads the bottleneck
of the trainable fake score instead, so `frozen=False` leaves the UNet's parameters alone.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn


class _StopAfterMidBlock(Exception):
    """Raised by the mid-block hook to skip the UNet's decoder."""


class UNetEncoderFeatures(nn.Module):
    """features(x_t, t, text) -> list of feature maps [B, C_i, H_i, W_i], shallow to deep."""

    def __init__(self, unet: UNet2DConditionModel, frozen: bool = True) -> None:
        super().__init__()
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"the discriminator backbone must be a UNet2DConditionModel, got {type(unet).__name__}")
        self.frozen = frozen
        self.unet = unet.requires_grad_(False).eval() if frozen else unet
        self._maps: list[torch.Tensor] = []
        # The same UNet also samples as the teacher: the hooks act only inside forward().
        self._active = False
        unet.conv_in.register_forward_hook(self._keep_output)
        for block in unet.down_blocks:
            block.register_forward_hook(self._keep_residuals)
        unet.mid_block.register_forward_hook(self._stop)

    def _keep_output(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if self._active:
            self._maps.append(output)

    def _keep_residuals(self, module: nn.Module, args, output) -> None:
        # A down block returns (hidden_states, residuals); conv_in's output is not among them.
        if self._active:
            self._maps.extend(output[1])

    def _stop(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if self._active:
            self._maps.append(output)
            raise _StopAfterMidBlock

    def train(self, mode: bool = True) -> UNetEncoderFeatures:
        # Frozen: stays in eval mode whatever the trainer does.
        return super().train(mode and not self.frozen)

    def feature_shapes(self, sample_size: int, device: torch.device | str = "cpu") -> list[tuple[int, int, int]]:
        """(channels, height, width) of each map for a square latent of side sample_size."""
        cfg = self.unet.config
        x = torch.zeros(1, cfg.in_channels, sample_size, sample_size, device=device, dtype=self.unet.dtype)
        text = torch.zeros(1, 1, cfg.cross_attention_dim, device=device, dtype=self.unet.dtype)
        added = None
        if cfg.addition_embed_type == "text_time":
            pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {
                "text_embeds": torch.zeros(1, pooled_dim, device=device, dtype=self.unet.dtype),
                "time_ids": torch.zeros(1, 6, device=device, dtype=self.unet.dtype),
            }
        with torch.no_grad():
            maps = self(x, torch.zeros(1, device=device), text, added)
        return [tuple(m.shape[1:]) for m in maps]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        self._maps, self._active = [], True
        try:
            self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
            raise RuntimeError("the UNet forward finished without reaching its mid block")
        except _StopAfterMidBlock:
            pass
        finally:
            self._active = False
        maps, self._maps = self._maps, []
        return maps
