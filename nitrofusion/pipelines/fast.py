"""The fast path for sampling: what measured faster at SDXL scale (docs/benchmarks.md).

Measured on an H100 at 1024², bf16 (benchmarks/sdxl_inference.py):

- `FastSampler` runs an SDXL pipeline's own modules without the pipeline's per-call work
  (extra tokenisation, a scheduler that waits for the GPU at every step); same images, used
  by `generate` wherever it applies, on any device.
- `compile_pipeline` (opt-in, `--compile`): the UNet and VAE decoder compiled with inductor
  and CUDA graphs in channels-last with fused q/k/v (eager, that layout was *slower*: 209 vs
  178 ms at one step), and both text encoders captured as one CUDA graph. Compilation costs
  minutes per image size and batch: worth it for the app and long runs, not for one image.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor

COMPILE_MODE = "reduce-overhead"  # inductor kernels + CUDA graphs (launch overhead matters at 1 step)
# Text encoders the pipeline itself calls get no CUDA graphs: compiled in "reduce-overhead" they
# failed every other call with "accessing tensor output of CUDAGraphs that has been overwritten"
# (H100, 2026-11-26). FastSampler captures them as one graph of its own instead.
TEXT_ENCODER_MODE: str | None = None


def compile_pipeline(pipe: DiffusionPipeline, mode: str = COMPILE_MODE) -> DiffusionPipeline:
    """Compile every network a few-step sample runs: the UNet and the VAE decoder, in channels-last
    memory with fused q/k/v projections (inductor picks its kernels for that layout), and the text
    encoder(s): captured as one CUDA graph where FastSampler applies, else compiled without graphs.
    A CPU pipeline is returned as it is."""
    if pipe.device.type != "cuda":
        return pipe
    for name in ("unet", "vae"):
        getattr(pipe, name).to(memory_format=torch.channels_last)
    if hasattr(pipe, "fuse_qkv_projections"):
        pipe.fuse_qkv_projections()
    pipe.unet = torch.compile(pipe.unet, mode=mode)
    if FastSampler.supports(pipe):
        # Both text encoders as one CUDA graph (FastSampler): compiled without graphs they still
        # took 22 ms of host-bound launches at batch 1, more than the one-step UNet.
        sampler = pipe.nitro_fast = FastSampler(pipe, graph_text_encoders=True)
        sampler.vae.decode = torch.compile(sampler.vae.decode, mode=mode)
    else:
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode)
        compile_text_encoders(pipe, TEXT_ENCODER_MODE)
    return pipe


def fast_sampler(pipe: DiffusionPipeline) -> FastSampler | None:
    """The pipeline's FastSampler (made on first use), or None where only the pipeline itself applies."""
    if not FastSampler.supports(pipe):
        return None
    if getattr(pipe, "nitro_fast", None) is None:
        pipe.nitro_fast = FastSampler(pipe)
    return pipe.nitro_fast


def compile_text_encoders(pipe: DiffusionPipeline, mode: str | None = None) -> DiffusionPipeline:
    """Compile the pipeline's text encoder(s) in `mode` (None: inductor's default, no CUDA graphs).

    Compiles each encoder's own class forward, so calling this again replaces an earlier
    compilation instead of wrapping it.
    """
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.forward = torch.compile(type(encoder).forward.__get__(encoder), mode=mode)
    return pipe


class GraphedFunction:
    """A function of fixed-shape CUDA tensors replayed from a captured CUDA graph.

    One graph per input shape, captured on first use; each call copies its inputs into the
    graph's buffers, replays and returns copies of the outputs (so a later call never
    overwrites what an earlier one returned). Used for the text encoders, whose ~500 small
    kernels per call left the GPU idle while Python launched them.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((x.shape, x.dtype, x.device) for x in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, static_in, static_out = self.graphs[key]
        for buffer, x in zip(static_in, inputs):
            buffer.copy_(x)
        graph.replay()
        return tuple(y.clone() for y in static_out)

    def _capture(self, inputs: tuple[torch.Tensor, ...]):
        static_in = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy initialisations, kernel selection)
            for _ in range(2):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out


class FastSampler:
    """Shift-LCM sampling of an SDXL pipeline's own modules without the pipeline's per-call work.

    Same images as the pipeline (tests/test_fast_path.py), but: the prompts are tokenised once
    per encoder (diffusers tokenises twice more to warn about truncation), the schedule is kept
    on the host so no scheduler step waits for the GPU, and under `compile_pipeline` both text
    encoders run as one CUDA graph. At 1024², batch 1, one step, compiled, on an H100 the
    pipeline took 116 ms for 60 ms of UNet and VAE compute; this sampler 69 ms (docs/benchmarks.md).
    """

    def __init__(self, pipe: DiffusionPipeline, graph_text_encoders: bool = False) -> None:
        self.pipe = pipe
        self.encode_ids: Callable[..., tuple[torch.Tensor, ...]] = self._encode_ids
        if graph_text_encoders:
            self.encode_ids = GraphedFunction(self._encode_ids)
        self._timesteps: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._vae_fp32 = None
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            # SDXL's VAE overflows in fp16. The stock pipeline casts it to fp32 and back on every
            # call; a standing fp32 copy decodes the same numbers without moving the weights twice.
            self._vae_fp32 = copy.deepcopy(pipe.vae).to(torch.float32)

    @property
    def vae(self) -> torch.nn.Module:
        """The VAE that decodes: the pipeline's own, or its fp32 copy where fp16 would overflow."""
        return self.pipe.vae if self._vae_fp32 is None else self._vae_fp32

    @staticmethod
    def supports(pipe: DiffusionPipeline) -> bool:
        """An SDXL pipeline with both text encoders and the shift-LCM sampler (a UNet with a
        guidance embedding, a VAE with a latent mean/std, or a watermarker, stays with the stock
        pipeline, which feeds or applies them)."""
        vae = getattr(pipe, "vae", None)
        return (
            isinstance(pipe, StableDiffusionXLPipeline)
            and getattr(pipe, "nitro_sampler", None) == "shift-lcm"
            and pipe.text_encoder is not None
            and pipe.text_encoder_2 is not None
            and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
            and vae is not None
            and getattr(vae.config, "latents_mean", None) is None
            and getattr(pipe, "watermark", None) is None
        )

    def _encode_ids(self, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # SDXL conditions on both encoders' penultimate hidden states, side by side, and on the
        # second encoder's pooled projection.
        hidden = self.pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out_2 = self.pipe.text_encoder_2(ids_2, output_hidden_states=True)
        return torch.cat([hidden, out_2.hidden_states[-2]], dim=-1), out_2[0]

    def encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = []
        for tokenizer in (self.pipe.tokenizer, self.pipe.tokenizer_2):
            kwargs = dict(padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
            ids.append(tokenizer(prompts, return_tensors="pt", **kwargs).input_ids.to(device))
        try:
            embeds, pooled = self.encode_ids(*ids)
        except RuntimeError as exc:
            if not isinstance(self.encode_ids, GraphedFunction):
                raise
            # Capture needs a forward without host syncs; a transformers version with one gets the
            # plain call instead (same numbers, more launch overhead), and says so.
            warnings.warn(f"text encoders not captured as a CUDA graph ({exc}); running them uncaptured", stacklevel=2)
            self.encode_ids = self._encode_ids
            embeds, pooled = self.encode_ids(*ids)
        dtype = self.pipe.text_encoder_2.dtype
        return embeds.to(dtype), pooled.to(dtype)

    def timesteps(self, steps: int, device: torch.device) -> torch.Tensor:
        """The UNet's (shifted) timesteps on the device; the scheduler keeps its own on the host."""
        key = (steps, device)
        if key not in self._timesteps:
            self.pipe.scheduler.set_timesteps(steps, device="cpu")
            self._timesteps[key] = self.pipe.scheduler.timesteps.to(device)
        return self._timesteps[key]

    def __call__(
        self, prompts: list[str], steps: int, generators: list[torch.Generator], height: int, width: int
    ) -> torch.Tensor:
        """Images as the pipeline's `output_type="pt"`: (B, 3, H, W) in [0, 1], on the device."""
        pipe, scheduler = self.pipe, self.pipe.scheduler
        device = pipe.unet.device
        t_unet = self.timesteps(steps, device)
        scheduler.set_timesteps(steps, device="cpu")  # host-side schedule: its arithmetic never syncs
        scheduler.set_begin_index(0)
        embeds, pooled = self.encode(prompts, device)
        f = pipe.vae_scale_factor
        shape = (len(prompts), pipe.unet.config.in_channels, height // f, width // f)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype, device=device)
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
        for t_host, t in zip(scheduler.timesteps, t_unet):
            # The keywords are the pipeline's, so a compiled UNet sees the call it was compiled for.
            eps = pipe.unet(
                latents,
                t,
                encoder_hidden_states=embeds,
                timestep_cond=None,
                cross_attention_kwargs=None,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
            latents = scheduler.step(eps, t_host, latents, generator=generators, return_dict=False)[0]
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")
