"""Assemble diffusers pipelines of the SDXL, SD1.5 and SD3 architectures from small configs.

Both the test pipelines and the embedded world are built here, so that what the tests
exercise is exactly the structure the shipped model has: the real CLIP tokenizer (shipped
in the package), CLIP text encoders, an `AutoencoderKL` and a `UNet2DConditionModel`
(with SDXL's "text_time" added conditions for the SDXL variant). The SD3 one (a flow-matching
`SD3Transformer2DModel`) is for the tests of generate, evaluate, the app and distill;
`build_sd3_medium` is SD3-Medium's architecture at full size, for benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

CLIP_MAX_LENGTH = 77
# SDXL's micro-conditioning: original size (2), crop top-left (2), target size (2).
SDXL_TIME_IDS = 6


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49408 ids), from the files shipped in the package."""
    path = resources.files("nitrofusion.world") / "assets" / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(str(path), model_max_length=max_length)
    # transformers 5 returns a degenerate tokenizer instead of raising on missing files.
    if len(tokenizer) != 49408:
        raise RuntimeError(f"CLIP tokenizer files at {path} are incomplete ({len(tokenizer)} ids)")
    return tokenizer


def _text_config(hidden: int, layers: int, heads: int, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim or hidden,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base's own scheduler settings (scaled-linear betas, epsilon, leading spacing)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


@dataclass
class SDXLSpec:
    """Sizes of an SDXL-architecture pipeline. Defaults give a tiny one for tests."""

    block_out_channels: tuple[int, ...] = (32, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: tuple[int, ...] = (2, 4)
    transformer_layers_per_block: tuple[int, ...] = (1, 1)
    sample_size: int = 8  # latent side
    addition_time_embed_dim: int = 8
    text_hidden: tuple[int, int] = (32, 32)
    text_layers: int = 2
    text_heads: int = 2
    projection_dim: int = 32
    vae_block_out_channels: tuple[int, ...] = (32, 64)
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    vae_scaling_factor: float = 0.13025
    extra_unet: dict = field(default_factory=dict)

    def unet_config(self) -> dict:
        return dict(
            sample_size=self.sample_size,
            in_channels=self.latent_channels,
            out_channels=self.latent_channels,
            down_block_types=self.down_block_types,
            up_block_types=self.up_block_types,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            attention_head_dim=self.attention_head_dim,
            transformer_layers_per_block=self.transformer_layers_per_block,
            cross_attention_dim=sum(self.text_hidden),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=self.addition_time_embed_dim,
            projection_class_embeddings_input_dim=self.addition_time_embed_dim * SDXL_TIME_IDS + self.projection_dim,
            norm_num_groups=16 if self.block_out_channels[0] % 32 else 32,
            **self.extra_unet,
        )

    def vae_config(self) -> dict:
        return _vae_config(
            self.vae_block_out_channels,
            self.vae_layers_per_block,
            self.latent_channels,
            self.sample_size,
            self.vae_scaling_factor,
        )


def _vae_config(
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    latent_channels: int,
    latent_size: int,
    scaling_factor: float,
    **extra: object,
) -> dict:
    """An AutoencoderKL config whose latents are `latent_size` square (each block but the last halves)."""
    n = len(block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=min(32, block_out_channels[0]),
        sample_size=latent_size * 2 ** (n - 1),
        scaling_factor=scaling_factor,
        force_upcast=False,
        **extra,
    )


def build_sdxl_pipeline(spec: SDXLSpec | None = None, seed: int = 0) -> StableDiffusionXLPipeline:
    """A randomly initialised (seeded) SDXL-architecture pipeline."""
    spec = spec or SDXLSpec()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet_config())
    vae = AutoencoderKL(**spec.vae_config())
    h1, h2 = spec.text_hidden
    text_encoder = CLIPTextModel(_text_config(h1, spec.text_layers, spec.text_heads))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(h2, spec.text_layers, spec.text_heads, spec.projection_dim)
    )
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


@dataclass
class SD15Spec:
    """Sizes of an SD1.5-architecture pipeline. Defaults give a tiny one for tests."""

    block_out_channels: tuple[int, ...] = (32, 64)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 4
    sample_size: int = 8
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    vae_block_out_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4


def build_sd15_pipeline(
    spec: SD15Spec | None = None, seed: int = 0, safety_checker: bool = False
) -> StableDiffusionPipeline:
    """A randomly initialised (seeded) SD1.5-architecture pipeline; with `safety_checker`, a
    randomly initialised one of SD1.5's architecture (a CLIP vision tower) at the spec's width."""
    spec = spec or SD15Spec()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        down_block_types=spec.down_block_types,
        up_block_types=spec.up_block_types,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        attention_head_dim=spec.attention_head_dim,
        cross_attention_dim=spec.text_hidden,
        norm_num_groups=min(32, spec.block_out_channels[0]),
    )
    n = len(spec.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_block_out_channels,
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=min(32, spec.vae_block_out_channels[0]),
        sample_size=spec.sample_size * 2 ** (n - 1),
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(_text_config(spec.text_hidden, spec.text_layers, spec.text_heads))
    scheduler = sdxl_scheduler()
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=_safety_checker(spec) if safety_checker else None,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32) if safety_checker else None,
        requires_safety_checker=safety_checker,
    )


def _safety_checker(spec: SD15Spec) -> StableDiffusionSafetyChecker:
    width = spec.text_hidden
    vision = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": spec.text_layers}
    vision |= {"num_attention_heads": spec.text_heads, "image_size": 32, "patch_size": 8}
    text = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1, "num_attention_heads": 1}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)
    return StableDiffusionSafetyChecker(config).eval()


@dataclass
class SD3Spec:
    """Sizes of an SD3-architecture pipeline (SD3.5's by default: q/k RMS norms, a dual-attention
    layer). Defaults give a tiny one for tests: a 4-block VAE (factor 8, as SD3's) so that sizes
    must be multiples of 16 (factor x patch), 64x64 images by default. Without a T5 encoder, as
    diffusers allows: the pipeline fills T5's part of the prompt embedding with zeros."""

    sample_size: int = 8  # latent side
    patch_size: int = 2
    num_layers: int = 2
    attention_head_dim: int = 8
    num_attention_heads: int = 2
    pos_embed_max_size: int = 16  # latent sides up to 32 (256 px)
    dual_attention_layers: tuple[int, ...] = (0,)
    qk_norm: str | None = "rms_norm"
    text_hidden: int = 32  # each of the two CLIP encoders; their pooled outputs are concatenated
    text_layers: int = 2
    text_heads: int = 2
    joint_attention_dim: int = 64  # T5's width in SD3 (4096); the CLIP embeddings are padded to it
    vae_block_out_channels: tuple[int, ...] = (16, 16, 16, 16)
    latent_channels: int = 16
    vae_scaling_factor: float = 1.5305  # SD3's VAE
    vae_shift_factor: float = 0.0609
    scheduler_shift: float = 3.0  # SD3's FlowMatchEulerDiscreteScheduler

    def transformer_config(self) -> dict:
        return dict(
            sample_size=self.sample_size,
            patch_size=self.patch_size,
            in_channels=self.latent_channels,
            out_channels=self.latent_channels,
            num_layers=self.num_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            caption_projection_dim=self.attention_head_dim * self.num_attention_heads,
            pooled_projection_dim=2 * self.text_hidden,
            pos_embed_max_size=self.pos_embed_max_size,
            dual_attention_layers=self.dual_attention_layers,
            qk_norm=self.qk_norm,
        )

    def vae_config(self) -> dict:
        # SD3's VAE: a latent shift as well as a scale, and no quant convolutions.
        return _vae_config(
            self.vae_block_out_channels,
            1,
            self.latent_channels,
            self.sample_size,
            self.vae_scaling_factor,
            shift_factor=self.vae_shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )


def build_sd3_pipeline(spec: SD3Spec | None = None, seed: int = 0) -> StableDiffusion3Pipeline:
    """A randomly initialised (seeded) SD3-architecture pipeline, without the T5 encoder."""
    spec = spec or SD3Spec()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**spec.transformer_config())
    vae = AutoencoderKL(**spec.vae_config())
    config = _text_config(spec.text_hidden, spec.text_layers, spec.text_heads, spec.text_hidden)
    text_encoder = CLIPTextModelWithProjection(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    modules = [m.eval() for m in (transformer, vae, text_encoder, text_encoder_2)]
    return _sd3_pipeline(*modules, spec.scheduler_shift)


def _sd3_pipeline(
    transformer: SD3Transformer2DModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModelWithProjection,
    text_encoder_2: CLIPTextModelWithProjection,
    shift: float,
) -> StableDiffusion3Pipeline:
    """An SD3 pipeline of these modules, with the real CLIP tokenizer and without T5."""
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def sdxl_base_configs() -> dict[str, dict]:
    """SDXL base 1.0's component configs (shipped in the package: models/configs/sdxl-base)."""
    import json

    root = resources.files("nitrofusion.models") / "configs" / "sdxl-base"
    configs = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        config = json.loads((root / f"{name}.json").read_text())
        config.pop("_class_name")
        configs[name] = config
    return configs


def build_sdxl_base(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionXLPipeline:
    """SDXL base 1.0's architecture with random weights, made directly on `device`.

    For speed and memory measurements (they do not depend on the weight values). On the
    meta device nothing is allocated, which is how the tests count parameters.
    """
    c = sdxl_base_configs()
    with torch.device(device):
        unet = UNet2DConditionModel(**c["unet"])
        vae = AutoencoderKL(**c["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**c["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"]))
    unet, vae, text_encoder, text_encoder_2 = _frozen([unet, vae, text_encoder, text_encoder_2], device, dtype)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


# SD3-Medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json).
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)


def sd3_medium_configs() -> dict[str, dict]:
    """SD3-Medium's component configs but T5: its two CLIP text encoders are SDXL base's (CLIP ViT-L
    and OpenCLIP bigG, both with their projections here), its VAE SDXL's with 16 latent channels,
    a latent shift and no quant convolutions."""
    base = sdxl_base_configs()
    vae = base["vae"] | dict(
        latent_channels=16,
        scaling_factor=SD3Spec.vae_scaling_factor,
        shift_factor=SD3Spec.vae_shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.pop("force_upcast", None)
    text = {k: base[k] for k in ("text_encoder", "text_encoder_2")}
    return {"transformer": dict(SD3_MEDIUM_TRANSFORMER), "vae": vae, **text}


def build_sd3_medium(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusion3Pipeline:
    """SD3-Medium's architecture (2.03 B-parameter transformer) with random weights, without T5 (its
    4.8 B parameters only encode prompts; the pipeline fills T5's part with zeros), made on `device`."""
    c = sd3_medium_configs()
    with torch.device(device):
        transformer = SD3Transformer2DModel(**c["transformer"])
        vae = AutoencoderKL(**c["vae"])
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"]))
    modules = _frozen([transformer, vae, text_encoder, text_encoder_2], device, dtype)
    return _sd3_pipeline(*modules, SD3Spec.scheduler_shift)


def _frozen(modules: list[torch.nn.Module], device: str | torch.device, dtype: torch.dtype) -> list[torch.nn.Module]:
    """Built modules in `dtype` (left alone on the meta device, where nothing is allocated), in eval
    mode without gradients."""
    if torch.device(device).type != "meta":
        modules = [m.to(dtype) for m in modules]
    return [m.eval().requires_grad_(False) for m in modules]
