"""Loading pipelines and students, and sampling from them."""

from nitrofusion.pipelines.generation import GenerationResult, generate, save_images
from nitrofusion.pipelines.loading import load_pipeline, load_unet_weights, resolve_model

__all__ = ["GenerationResult", "generate", "load_pipeline", "load_unet_weights", "resolve_model", "save_images"]
