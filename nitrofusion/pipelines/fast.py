"""The CUDA fast path for sampling: what measured faster at SDXL scale (docs/benchmarks.md).

Measured on an H100 at 1024² (benchmarks/sdxl_inference.py): eager, channels-last and fused
q/k/v projections made the UNet + VAE *slower* (209 vs 178 ms at one step), so the eager
path stays as diffusers builds it. Compiled (inductor + CUDA graphs) the same modules ran
3× faster, and then the eager text encoders were half of a one-step sample's time, so they
are compiled too. Compilation costs minutes per image size and batch, so it is opt-in
(`--compile`): worth it for the app and long generation runs, not for one image.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

COMPILE_MODE = "reduce-overhead"  # inductor kernels + CUDA graphs (launch overhead matters at 1 step)


def compile_pipeline(pipe: DiffusionPipeline, mode: str = COMPILE_MODE) -> DiffusionPipeline:
    """Compile every network a few-step sample runs: the text encoder(s), the UNet and the VAE
    decoder, with the UNet and VAE in channels-last memory and fused q/k/v projections (inductor
    picks its kernels for that layout). A CPU pipeline is returned as it is."""
    if pipe.device.type != "cuda":
        return pipe
    for name in ("unet", "vae"):
        getattr(pipe, name).to(memory_format=torch.channels_last)
    if hasattr(pipe, "fuse_qkv_projections"):
        pipe.fuse_qkv_projections()
    pipe.unet = torch.compile(pipe.unet, mode=mode)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            # Default mode (no CUDA graphs): the pipeline holds the first encoder's outputs while the
            # second runs, and graph replays may reuse output memory.
            encoder.forward = torch.compile(encoder.forward)
    return pipe
