"""The embedded world's architecture and where its trained parts live in the package."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from nitrofusion.models.builders import SD3Spec, SDXLSpec

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
# The teachers' own step counts (Euler, CFG 5): their sample sheets, their rows in the world's
# tables, and the default their folders record (nitrofusion.json's num_inference_steps).
TEACHER_STEPS = 25
FLOW_TEACHER_STEPS = 28  # SD3's pipeline's own default

# The flow world: SD3's architecture (an MMDiT with SD3.5's q/k RMS norms, two CLIP text
# encoders with projections, no T5) on the same VAE latents. 8x8 image tokens against 333 text
# tokens (77 CLIP, 256 of T5's zeros, which the stock pipeline always sends) is what makes the
# context stream most of the compute, so the transformer stays narrow. Shift 1: SD3's 3.0 is
# for 1024² images; the shift that a resolution wants falls with its side.
FLOW_SPEC = SD3Spec(
    sample_size=16,
    patch_size=2,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=2,
    pos_embed_max_size=16,
    dual_attention_layers=(),
    qk_norm="rms_norm",
    text_hidden=32,
    text_layers=2,
    text_heads=2,
    joint_attention_dim=64,
    latent_channels=4,
    scheduler_shift=1.0,
)


def assets_dir() -> Path:
    return Path(str(resources.files("nitrofusion.world") / "assets"))


def teacher_path() -> Path:
    return assets_dir() / "teacher"


def flow_teacher_path() -> Path:
    """The flow world's teacher: a stock SD3-architecture pipeline folder (`StableDiffusion3Pipeline`)."""
    return assets_dir() / "flow-teacher"


def student_path() -> Path:
    """The shipped student, published the way NitroSD is: a UNet (diffusers `unet/` folder)
    and a `TimestepShiftLCMScheduler` config, used with the teacher's other components."""
    return assets_dir() / "student"


def evaluator_path() -> Path:
    return assets_dir() / "evaluator.safetensors"


@dataclass(frozen=True)
class ModelChoice:
    """A pipeline directory plus, for a NitroSD-style student, its UNet weights and shift."""

    model: Path
    unet: Path | None = None
    shift: int | None = None


def embedded_model(name: str = "embedded") -> ModelChoice | None:
    """`embedded`: the shipped student (the teacher if no student is shipped);
    `embedded-teacher`: the multi-step teacher; `embedded-flow-teacher`: the flow world's
    teacher (SD3 architecture). None if not installed."""
    if name == "embedded-flow-teacher":
        flow = flow_teacher_path()
        return ModelChoice(flow) if (flow / "model_index.json").is_file() else None
    teacher = teacher_path()
    if not (teacher / "model_index.json").is_file():
        return None
    student = student_path()
    weights = student / "unet" / "diffusion_pytorch_model.safetensors"
    if name == "embedded" and weights.is_file():
        config = json.loads((student / "scheduler" / "scheduler_config.json").read_text())
        return ModelChoice(teacher, weights, int(config["shifted_timestep"]))
    return ModelChoice(teacher)


EMBEDDED_NAMES = ("embedded", "embedded-teacher", "embedded-flow-teacher")


def weights_source(name: str) -> str:
    """Where the weights commands (transfer, export-lora) read a model named as `generate` names it:
    `embedded` is the shipped student's unet/ folder (its scheduler beside it records the shift),
    the teachers their pipeline folders; any other name as given."""
    if name not in EMBEDDED_NAMES:
        return name
    from nitrofusion.errors import UserError

    found = embedded_model(name)
    if found is None:
        raise UserError(f"the {name} model is not installed (docs/world.md)")
    return str(found.unet.parent if found.unet is not None else found.model)


def choose_model(
    model: str | None, unet: str | None, shift: int | None, sampler: str = "auto", lora: str | None = None
) -> ModelChoice:
    """What `--model/--unet/--shift` mean: no model or an embedded name picks the shipped
    world (an explicit --unet or --shift still wins); anything else is taken as given. With a
    `--lora`, no model is the embedded teacher, which a LoRA of the shipped student goes on."""
    from nitrofusion.errors import UserError

    if lora is not None:
        if model == "embedded":
            raise UserError(
                "--model embedded is the shipped student; a LoRA goes on its teacher: --model embedded-teacher "
                "(the default with --lora)"
            )
        model = model or "embedded-teacher"

    if model is None or model in EMBEDDED_NAMES:
        found = embedded_model(model or "embedded")
        if found is None:
            raise UserError("no --model given and no embedded model is installed; pass --model PATH_OR_HUB_ID")
        if found.unet is not None and not unet and sampler == "native":
            # Its UNet was distilled for the shift-LCM sampler, whose shift it records: the
            # refusal of a shift the user never gave would name the wrong cause.
            raise UserError(
                "the embedded student samples with the shift-lcm sampler only; the teacher's own "
                "sampler is --model embedded-teacher --sampler native"
            )
        return ModelChoice(
            found.model,
            Path(unet) if unet else found.unet,
            shift if shift is not None else (found.shift if not unet else None),
        )
    return ModelChoice(Path(model), Path(unet) if unet else None, shift)
