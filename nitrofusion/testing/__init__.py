"""Tiny SDXL- and SD1.5-architecture pipelines with seeded random weights, for tests.

They have the real structure (two CLIP text encoders with the real tokenizer, pooled
embeddings and added time ids for SDXL; AutoencoderKL; UNet2DConditionModel) at a size that
builds in well under a second and samples 16x16 images.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from nitrofusion.models.builders import SD15Spec, SDXLSpec, build_sd15_pipeline, build_sdxl_pipeline

TINY_SDXL = SDXLSpec()
TINY_SD15 = SD15Spec()


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    return build_sdxl_pipeline(TINY_SDXL, seed=seed)


def tiny_sd15_pipeline(seed: int = 0, safety_checker: bool = False) -> StableDiffusionPipeline:
    return build_sd15_pipeline(TINY_SD15, seed=seed, safety_checker=safety_checker)


def save_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny SDXL pipeline in diffusers format; returns the directory."""
    tiny_sdxl_pipeline(seed).save_pretrained(str(path))
    return Path(path)


def save_tiny_sd15(path: str | Path, seed: int = 0, safety_checker: bool = False) -> Path:
    tiny_sd15_pipeline(seed, safety_checker).save_pretrained(str(path))
    return Path(path)
