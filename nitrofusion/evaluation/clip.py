"""CLIP from a local directory: CLIP score, and the image embeddings that the LAION
aesthetic predictor and CLIP-FID read.

CLIP score is max(cos(E_image, E_text), 0) averaged over the images (Hessel et al. 2021) on
the paper's scale (Table 1: 0.320 for 25-step SDXL base). torchmetrics' CLIPScore is
max(100 * mean cos, 0), which is 100 times this wherever no pair's cosine is negative (the
clamp per pair is Hessel et al.'s). The numbers depend on the CLIP model: the paper's is openai/clip-vit-base-patch32
(ViT-B/32); the aesthetic predictor reads ViT-L/14 embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from nitrofusion.errors import UserError, first_line

CLIP_HINT = (
    "a transformers CLIP directory (config.json, model.safetensors, tokenizer and preprocessor files), e.g. "
    "openai/clip-vit-base-patch32 (CLIP score) or openai/clip-vit-large-patch14 (aesthetic score), fetched "
    "with 'hf download openai/clip-vit-base-patch32 --local-dir DIR' "
    "on a machine with hub access"
)


class ClipModel:
    """A transformers CLIPModel with its tokenizer and image processor, all read locally."""

    def __init__(self, path: str | Path, device: str = "cpu", option: str = "--clip-model") -> None:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # the PIL one: no torchvision here
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"CLIP model not found at '{path}': {option} must point at {CLIP_HINT}")
        try:
            self.model, info = CLIPModel.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True, output_loading_info=True
            )
            self.tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"could not load the CLIP model in '{path}' ({option}): {first_line(exc)}") from None
        # transformers fills weights a file lacks with random ones, with a log line: a text encoder
        # alone (no vision tower) scored with an untrained half would give a number that means nothing.
        missing = sorted(info.get("missing_keys", []))
        if missing:
            raise UserError(
                f"'{path}' ({option}) is not a whole CLIPModel: {len(missing)} of its weights are missing "
                f"(first: {missing[0]}); it must point at {CLIP_HINT}"
            )
        # transformers returns a 2-token stand-in instead of failing when the vocabulary is absent.
        if len(self.tokenizer) < 1000:
            raise UserError(f"the CLIP directory '{path}' ({option}) has no tokenizer (vocab.json, merges.txt)")
        size = self.model.config.vision_config.image_size
        if (path / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
        else:
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        # A tokenizer saved without its config reports an unbounded length; the positions are the limit.
        self.max_tokens = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.device = device
        self.model.to(device).eval()

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised projected image embeddings, float32 [N, D] on the CPU."""
        out = []
        for i in range(0, len(images), batch_size):
            pixels = self.processor(
                images=[im.convert("RGB") for im in images[i : i + batch_size]], return_tensors="pt"
            )
            emb = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
            emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised projected text embeddings (prompts truncated to CLIP's 77 tokens)."""
        out = []
        for i in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(
                prompts[i : i + batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            emb = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)


def clip_score(clip: ClipModel, images: list[Image.Image], prompts: list[str]) -> float:
    """Mean of max(cos(image, prompt), 0) over image-prompt pairs: the paper's scale (Table 1:
    0.320 for 25-step SDXL base with ViT-B/32); torchmetrics' CLIPScore clamps the mean instead,
    100 times this wherever no pair's cosine is negative."""
    if len(images) != len(prompts):
        raise ValueError("one prompt per image is needed")
    cos = (clip.image_embeddings(images) * clip.text_embeddings(prompts)).sum(-1)
    return float(cos.clamp(min=0).mean())
