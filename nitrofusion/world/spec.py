"""The embedded world's architecture and where its trained parts live in the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from nitrofusion.models.builders import SDXLSpec

# SDXL's shape at a small size: three resolution levels (16, 8, 4 on 16x16x4 latents),
# plain first level then cross-attention levels, two resnets per level, "text_time"
# added conditions. Like SDXL its encoder yields 10 feature maps (conv_in, 9 down-block
# residuals incl. the mid block output), which is what the discriminator heads read.
WORLD_SPEC = SDXLSpec(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=(2, 2, 2),
    transformer_layers_per_block=(1, 1, 1),
    sample_size=16,
    addition_time_embed_dim=8,
    text_hidden=(32, 32),
    text_layers=2,
    text_heads=2,
    projection_dim=32,
    vae_block_out_channels=(32, 64),
    vae_layers_per_block=1,
    latent_channels=4,
)
IMAGE_SIZE = 32
TEXT_ENCODER_SEED = 0


def assets_dir() -> Path:
    return Path(str(resources.files("nitrofusion.world") / "assets"))


def teacher_path() -> Path:
    return assets_dir() / "teacher"


def student_path() -> Path:
    return assets_dir() / "student"


def evaluator_path() -> Path:
    return assets_dir() / "evaluator.safetensors"


def default_model() -> Path | None:
    """The embedded student if shipped, else the embedded teacher, else None."""
    for path in (student_path(), teacher_path()):
        if (path / "model_index.json").is_file():
            return path
    return None
