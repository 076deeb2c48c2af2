"""Text conditioning for SDXL- and SD1.5-architecture UNets and SD3-architecture flow
transformers, through the pipeline's own encoder.

`Conditioning` bundles what a denoiser call needs (token embeddings, SDXL's added conditions)
and the pooled text vector that conditional discriminator heads read (SD3's transformer reads
it too, as its `pooled_projections`).
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
    pooled: torch.Tensor  # [B, P]: SDXL's and SD3's pooled CLIP output(s), SD1.5's end-of-text state
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
    unet = getattr(pipe, "unet", None)
    return (
        getattr(pipe, "text_encoder_2", None) is not None
        and unet is not None
        and unet.config.addition_embed_type == "text_time"
    )


def is_sd3(pipe: DiffusionPipeline) -> bool:
    return getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None


CACHE_BYTES = 4 * 2**30  # at most this much host memory of kept prompts, per process


class TextEncoder:
    """Encodes prompts and keeps the most recently used ones (a small prompt set repeats every
    few steps). Bounded: at SDXL size one prompt is 77 x 2048 numbers (0.6 MB in fp32), so the
    paper's million prompts, all kept, would be hundreds of GB of host memory; at SD3's (333 x
    4096, with T5) 5.5 MB, so the capacity is also bounded by CACHE_BYTES."""

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
        self.sd3 = is_sd3(pipe)
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
            first = self._cache[missing[0]]
            size = sum(t.numel() * t.element_size() for t in (first.prompt_embeds, first.pooled))
            self.capacity = min(self.capacity, max(1, CACHE_BYTES // size))
        out = Conditioning.cat([self._cache[p] for p in prompts])
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)  # the least recently used
        return out

    def _encode(self, prompts: list[str]) -> list[Conditioning]:
        device = self.pipe.text_encoder.device
        if self.sd3:  # T5 (if the pipeline has it) and both CLIPs; SD3 has no micro-conditioning
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False
            )
            time_ids = None
        elif self.sdxl:
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
        if self.sd3:  # SD3's CFG encodes the empty prompt
            _, embeds, _, pooled = self.pipe.encode_prompt(
                prompt=[""], prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True
            )
            time_ids = None
        elif self.sdxl:
            _, embeds, _, pooled = self.pipe.encode_prompt([""], device=device, do_classifier_free_guidance=True)
            h, w = self.size
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=embeds.dtype, device=device)
        else:
            _, embeds = self.pipe.encode_prompt([""], device, 1, do_classifier_free_guidance=True)
            pooled, time_ids = self._sentence_embedding([""], embeds), None
        return Conditioning(embeds, pooled, time_ids).to("cpu")

    @property
    def pooled_dim(self) -> int:
        """Width of `Conditioning.pooled`: SD3's two pooled CLIP outputs, SDXL's projected text
        embedding, else the token width."""
        if self.sd3:
            return self.pipe.transformer.config.pooled_projection_dim
        if self.sdxl:
            return self.pipe.text_encoder_2.config.projection_dim
        return self.pipe.text_encoder.config.hidden_size
