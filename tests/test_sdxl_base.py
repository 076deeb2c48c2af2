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
