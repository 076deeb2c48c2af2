"""Tiny SDXL-, SD1.5- and SD3-architecture pipelines with seeded random weights, for tests.

They have the real structure (two CLIP text encoders with the real tokenizer, pooled
embeddings and added time ids for SDXL; AutoencoderKL; UNet2DConditionModel) at a size that
builds in well under a second and samples 16x16 images. The SD3 one (two CLIP encoders, no T5,
an SD3Transformer2DModel, a 16-channel VAE, FlowMatchEulerDiscreteScheduler) samples 64x64.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from nitrofusion.models.builders import (
    SD3Spec,
    SD15Spec,
    SDXLSpec,
    build_sd3_pipeline,
    build_sd15_pipeline,
    build_sdxl_pipeline,
)
from nitrofusion.pipelines.saving import save_pipeline

TINY_SDXL = SDXLSpec()
TINY_SD15 = SD15Spec()
TINY_SD3 = SD3Spec()


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    return build_sdxl_pipeline(TINY_SDXL, seed=seed)


def tiny_sd15_pipeline(seed: int = 0, safety_checker: bool = False) -> StableDiffusionPipeline:
    return build_sd15_pipeline(TINY_SD15, seed=seed, safety_checker=safety_checker)


def save_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny SDXL pipeline in diffusers format; returns the directory."""
    save_pipeline(tiny_sdxl_pipeline(seed), path)
    return Path(path)


def save_tiny_sd15(path: str | Path, seed: int = 0, safety_checker: bool = False) -> Path:
    save_pipeline(tiny_sd15_pipeline(seed, safety_checker), path)
    return Path(path)


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    return build_sd3_pipeline(TINY_SD3, seed=seed)


def save_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny SD3 pipeline (flow-matching transformer) in diffusers format. Its left-out
    T5 encoder is recorded as [null, null] (diffusers' warning that None "cannot be saved" is silenced)."""
    from nitrofusion.pipelines.loading import quiet_loading

    with quiet_loading():
        save_pipeline(tiny_sd3_pipeline(seed), path)
    return Path(path)
