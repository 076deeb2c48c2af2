"""The shipped SDXL base 1.0 configs build the published architecture (benchmarks use them)."""

from nitrofusion.models import build_sdxl_base

# Parameter counts of stabilityai/stable-diffusion-xl-base-1.0's components.
PUBLISHED = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def test_sdxl_base_configs_have_the_published_parameter_counts():
    pipe = build_sdxl_base("meta")  # nothing allocated
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in PUBLISHED}
    assert counts == PUBLISHED
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * pipe.vae_scale_factor == 1024


def test_sd3_medium_builds_its_architecture():
    """SD3-Medium's transformer (2.03 B parameters), its CLIP-L and bigG with projections whose pooled
    outputs together are the transformer's pooled input, a 16-channel VAE with a latent shift."""
    from nitrofusion.models.builders import build_sd3_medium

    pipe = build_sd3_medium("meta")
    assert sum(p.numel() for p in pipe.transformer.parameters()) == 2_028_328_000
    assert sum(p.numel() for p in pipe.text_encoder.parameters()) == 123_650_304  # CLIP-L with its projection
    assert sum(p.numel() for p in pipe.text_encoder_2.parameters()) == PUBLISHED["text_encoder_2"]
    pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert pooled == pipe.transformer.config.pooled_projection_dim == 2048
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 16
    assert pipe.vae.config.shift_factor == 0.0609 and pipe.text_encoder_3 is None
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == 1024
