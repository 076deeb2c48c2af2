"""Text conditioning for SDXL- and SD1.5-architecture UNets, through the pipeline's own encoder.

`Conditioning` bundles what a UNet call needs (token embeddings, SDXL's added conditions)
and the pooled text vector that conditional discriminator heads read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, P]
    time_ids: torch.Tensor | None = None  # [B, 6] for SDXL

    @property
    def added_cond_kwargs(self) -> dict[str, torch.Tensor] | None:
        if self.time_ids is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}

    def unet_inputs(self, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(encoder_hidden_states, added_cond_kwargs) in `dtype`, as a UNet in that dtype takes them."""
        added = self.added_cond_kwargs
        return self.prompt_embeds.to(dtype), None if added is None else {k: v.to(dtype) for k, v in added.items()}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        return Conditioning(mv(self.prompt_embeds), mv(self.pooled), mv(self.time_ids))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        return Conditioning(
            torch.cat([c.prompt_embeds for c in items]),
            torch.cat([c.pooled for c in items]),
            None if items[0].time_ids is None else torch.cat([c.time_ids for c in items]),
        )


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None and pipe.unet.config.addition_embed_type == "text_time"


class TextEncoder:
    """Encodes prompts and keeps the most recently used ones (a small prompt set repeats every
    few steps). Bounded: at SDXL size one prompt is 77 x 2048 numbers (0.6 MB in fp32), so the
    paper's million prompts, all kept, would be hundreds of GB of host memory."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        height: int,
        width: int,
        capacity: int = 4096,
        onload: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.pipe = pipe
        self.onload = onload  # brings offloaded text encoders to the device for an encoding
        self.sdxl = is_sdxl(pipe)
        self.size = (height, width)
        self.capacity = capacity
        self._cache: OrderedDict[str, Conditioning] = OrderedDict()
        self._negative: Conditioning | None = None

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Conditioning:
        # One prompt per encoder call: batched matmuls round differently with the batch's size and
        # contents, and a prompt's embedding must not depend on which batch first met it, or a
        # resumed run (empty cache) would drift from an uninterrupted one.
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            with self.onload():
                for p in missing:
                    (self._cache[p],) = self._encode([p])
        out = Conditioning.cat([self._cache[p] for p in prompts])
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)  # the least recently used
        return out

    def _encode(self, prompts: list[str]) -> list[Conditioning]:
        device = self.pipe.text_encoder.device
        if self.sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
            h, w = self.size
            # SDXL micro-conditioning as the pipeline builds it: original size, crop (0, 0), target size.
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=embeds.dtype, device=device).expand(len(prompts), -1)
        else:
            embeds, _ = self.pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
            pooled, time_ids = self._sentence_embedding(prompts, embeds), None
        return [
            Conditioning(
                embeds[i : i + 1].cpu(),
                pooled[i : i + 1].cpu(),
                None if time_ids is None else time_ids[i : i + 1].cpu(),
            )
            for i in range(len(prompts))
        ]

    def _sentence_embedding(self, prompts: list[str], embeds: torch.Tensor) -> torch.Tensor:
        """SD1.5's pooled text: the final token states at each prompt's end-of-text token, CLIP's
        own sentence embedding (its `pooler_output`; SD1.5's UNet never reads it). A mean over
        the 77 states would weigh the constant start token and the padding with the words."""
        tok = self.pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        ends = [row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row) - 1 for row in ids]
        return embeds[torch.arange(len(prompts)), torch.tensor(ends)]

    @torch.no_grad()
    def negative(self, n: int) -> Conditioning:
        """The unconditional side of classifier-free guidance, as the pipeline's own CFG builds it
        (SDXL with force_zeros_for_empty_prompt: zeros; otherwise the encoded empty prompt), n times."""
        if self._negative is None:
            with self.onload():
                self._negative = self._encode_negative()
        return Conditioning.cat([self._negative] * n)

    def _encode_negative(self) -> Conditioning:
        device = self.pipe.text_encoder.device
        if self.sdxl:
            _, embeds, _, pooled = self.pipe.encode_prompt([""], device=device, do_classifier_free_guidance=True)
            h, w = self.size
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=embeds.dtype, device=device)
        else:
            _, embeds = self.pipe.encode_prompt([""], device, 1, do_classifier_free_guidance=True)
            pooled, time_ids = self._sentence_embedding([""], embeds), None
        return Conditioning(embeds, pooled, time_ids).to("cpu")

    @property
    def pooled_dim(self) -> int:
        """Width of `Conditioning.pooled`: SDXL's projected text embedding, else the token width."""
        if self.sdxl:
            return self.pipe.text_encoder_2.config.projection_dim
        return self.pipe.text_encoder.config.hidden_size
