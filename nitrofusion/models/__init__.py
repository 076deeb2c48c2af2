"""Building blocks for SDXL- and SD1.5-architecture pipelines from configs."""

from nitrofusion.models.builders import (
    SD15Spec,
    SDXLSpec,
    build_sd15_pipeline,
    build_sdxl_base,
    build_sdxl_pipeline,
    clip_tokenizer,
)

__all__ = ["SD15Spec", "SDXLSpec", "build_sd15_pipeline", "build_sdxl_base", "build_sdxl_pipeline", "clip_tokenizer"]
