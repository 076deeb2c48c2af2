"""The frozen teacher UNet's encoder as the discriminator's feature network.

Features are read with forward hooks on diffusers' public modules (`conv_in`, each of
`down_blocks`, `mid_block`); after the mid block the forward pass is cut short, so the
decoder is never run. For SDXL this yields 10 maps: conv_in, 8 down-block residuals and
the mid-block output (the embedded world has the same count).

The teacher's encoder is frozen (NitroFusion, ADM); DMD2's classifier reads the bottleneck
of the trainable fake score instead, so `frozen=False` leaves the UNet's parameters alone.

A flow transformer (SD3) has no encoder: `TransformerBlockFeatures` reads the image tokens
after each of its first half of joint blocks, as maps, and cuts the pass short after them
(as LADD reads its teacher's transformer blocks). Both take (x_t, timestep, Conditioning).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

from nitrofusion.data.conditioning import Conditioning


class _StopReading(Exception):
    """Raised by the last hook read to skip the rest of the network's pass."""


class _HookedReader(nn.Module):
    """Maps kept by forward hooks while `_read` runs the network, whose last read layer's hook stops
    the pass. The same network also runs as the teacher (or the fake score): the hooks act only
    inside `_read`."""

    def __init__(self) -> None:
        super().__init__()
        self._maps: list[torch.Tensor] = []
        self._active = False

    def _read(self, run: Callable[[], object], what: str) -> list[torch.Tensor]:
        self._maps, self._active = [], True
        try:
            run()
            raise RuntimeError(f"the {what} forward finished without reaching its last read layer")
        except _StopReading:
            pass
        finally:
            self._active = False
        maps, self._maps = self._maps, []
        return maps


class UNetEncoderFeatures(_HookedReader):
    """features(x_t, t, cond) -> list of feature maps [B, C_i, H_i, W_i], shallow to deep."""

    def __init__(self, unet: UNet2DConditionModel, frozen: bool = True) -> None:
        super().__init__()
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"the discriminator backbone must be a UNet2DConditionModel, got {type(unet).__name__}")
        self.frozen = frozen
        self.unet = unet.requires_grad_(False).eval() if frozen else unet
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
            raise _StopReading

    @property
    def model(self) -> UNet2DConditionModel:
        return self.unet

    def train(self, mode: bool = True) -> UNetEncoderFeatures:
        # Frozen: stays in eval mode whatever the trainer does.
        return super().train(mode and not self.frozen)

    def feature_shapes(self, sample_size: int, device: torch.device | str = "cpu") -> list[tuple[int, int, int]]:
        """(channels, height, width) of each map for a square latent of side sample_size."""
        cfg = self.unet.config
        pooled, time_ids = None, None
        if cfg.addition_embed_type == "text_time":
            pooled = torch.zeros(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
            time_ids = torch.zeros(1, 6)
        cond = Conditioning(torch.zeros(1, 1, cfg.cross_attention_dim), pooled, time_ids)
        return _shapes(self, cfg.in_channels, sample_size, cond, self.unet, device)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        embeds, added = cond.unet_inputs(sample.dtype)
        return self._read(lambda: self.unet(sample, timestep, embeds, added_cond_kwargs=added), "UNet")


def feature_blocks(transformer: SD3Transformer2DModel) -> int:
    """How many of the transformer's joint blocks the discriminator reads: the first half (rounded
    up), the part that, like a UNet's encoder, sees the noisy image before it is decoded
    (SD3-Medium: 12 of 24 blocks, SD3.5-Large: 19 of 38)."""
    return (len(transformer.transformer_blocks) + 1) // 2


class TransformerBlockFeatures(_HookedReader):
    """features(x_t, t, cond) -> the image tokens after each read block, as maps [B, D, H/p, W/p].

    Its later blocks and output layers are never run here. Frozen (the teacher) or not (DMD2's
    classifier on the trainable fake score, which leaves its parameters alone)."""

    def __init__(self, transformer: SD3Transformer2DModel, frozen: bool = True) -> None:
        super().__init__()
        if not isinstance(transformer, SD3Transformer2DModel):
            raise TypeError(f"expected an SD3Transformer2DModel, got {type(transformer).__name__}")
        self.frozen = frozen
        self.transformer = transformer.requires_grad_(False).eval() if frozen else transformer
        self.blocks = feature_blocks(transformer)
        self._grid: tuple[int, int] = (0, 0)
        for i, block in enumerate(transformer.transformer_blocks[: self.blocks]):
            block.register_forward_hook(partial(self._keep_tokens, last=i == self.blocks - 1))

    @property
    def model(self) -> SD3Transformer2DModel:
        return self.transformer

    def _keep_tokens(self, module: nn.Module, args, output, last: bool) -> None:
        if not self._active:
            return
        tokens = output[1]  # a joint block returns (text tokens, image tokens)
        h, w = self._grid
        self._maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w))
        if last:
            raise _StopReading

    def train(self, mode: bool = True) -> TransformerBlockFeatures:
        return super().train(mode and not self.frozen)  # frozen: in eval mode whatever the trainer does

    def feature_shapes(self, sample_size: int, device: torch.device | str = "cpu") -> list[tuple[int, int, int]]:
        cfg = self.transformer.config
        cond = Conditioning(torch.zeros(1, 1, cfg.joint_attention_dim), torch.zeros(1, cfg.pooled_projection_dim))
        return _shapes(self, cfg.in_channels, sample_size, cond, self.transformer, device)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        embeds, _ = cond.unet_inputs(sample.dtype)
        p = self.transformer.config.patch_size
        self._grid = (sample.shape[-2] // p, sample.shape[-1] // p)
        return self._read(
            lambda: self.transformer(
                hidden_states=sample,
                timestep=timestep.float(),  # SD3 is told 1000 sigma, a float
                encoder_hidden_states=embeds,
                pooled_projections=cond.pooled.to(sample.dtype),
            ),
            "transformer",
        )


def _shapes(
    backbone: nn.Module, channels: int, side: int, cond: Conditioning, model: nn.Module, device: torch.device | str
) -> list[tuple[int, int, int]]:
    x = torch.zeros(1, channels, side, side, device=device, dtype=model.dtype)
    with torch.no_grad():
        maps = backbone(x, torch.zeros(1, device=device), cond.to(device, model.dtype))
    return [tuple(m.shape[1:]) for m in maps]
