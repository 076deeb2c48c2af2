"""The fast path for sampling: what measured faster at SDXL scale (docs/benchmarks.md).

Measured on an H100 at 1024², bf16 (benchmarks/sdxl_inference.py):

- `FastSampler` runs an SDXL pipeline's own modules without the pipeline's per-call work
  (extra tokenisation, a scheduler that waits for the GPU at every step); same images, used
  by `generate` wherever it applies, on any device.
- `compile_pipeline` (opt-in, `--compile`): the UNet and VAE decoder compiled with inductor in
  channels-last with fused q/k/v (eager, that layout was *slower*: 209 vs 178 ms at one step);
  where FastSampler applies, a whole sample (text encoders, UNet steps, VAE decode) is then
  captured as one CUDA graph, else the UNet and decoder get inductor's own CUDA graphs.
  Compilation costs minutes per image size and batch: worth it for the app and long runs, not
  for one image.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import warnings
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor
from transformers import BatchEncoding, PreTrainedTokenizerBase

from nitrofusion.scheduling import TimestepShiftLCMScheduler

log = logging.getLogger(__name__)

COMPILE_MODE = "reduce-overhead"  # inductor kernels + CUDA graphs (launch overhead matters at 1 step)
# Inside FastSampler's own graph of the whole sample, modules are compiled without graphs of
# their own (one capture cannot hold another), at fixed shapes: a graph is per shape anyway.
CAPTURED_COMPILE = {"mode": None, "dynamic": False}
# Text encoders the pipeline itself calls get no CUDA graphs: compiled in "reduce-overhead" they
# failed every other call with "accessing tensor output of CUDAGraphs that has been overwritten"
# (H100, 2026-11-26).
TEXT_ENCODER_MODE: str | None = None


def _adapters(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def compile_pipeline(pipe: DiffusionPipeline, mode: str = COMPILE_MODE) -> DiffusionPipeline:
    """Compile every network a few-step sample runs: the UNet and the VAE decoder, in channels-last
    memory with fused q/k/v projections (inductor picks its kernels for that layout). Where
    FastSampler applies, its whole sample is captured as one CUDA graph (the text encoders run
    inside it); elsewhere the UNet and decoder are compiled in `mode` and the text encoders
    without graphs. A CPU pipeline is returned as it is."""
    if pipe.device.type != "cuda":
        warnings.warn(f"--compile applies on CUDA only: the pipeline on {pipe.device.type} runs eagerly", stacklevel=2)
        return pipe
    for name in ("unet", "vae"):
        getattr(pipe, name).to(memory_format=torch.channels_last)
    if hasattr(pipe, "fuse_qkv_projections"):
        # Fusing copies q/k/v into one projection: LoRA adapters on them would no longer apply.
        pipe.fuse_qkv_projections(unet=not _adapters(pipe.unet), vae=True)
    if FastSampler.supports(pipe):
        # At batch 1 the host work around the networks (~500 small text-encoder kernels, guards,
        # launches) cost 10-18% over the bare compute even with every module graphed on its own.
        pipe.unet = torch.compile(pipe.unet, **CAPTURED_COMPILE)
        sampler = pipe.nitro_fast = FastSampler(pipe, graph=True)
        sampler.compile_decode(**CAPTURED_COMPILE)
        compile_text_encoders(pipe, **CAPTURED_COMPILE)  # fused kernels: less GPU time inside the graph
    else:
        # A CUDA-graphed UNet's output is overwritten by its next call. LCM's step (the shift-LCM
        # sampler's too) is done with it by then; a multistep scheduler keeps earlier outputs
        # (SD1.5's PNDM, DPM-Solver), so with one the UNet is compiled without graphs.
        unet_mode = mode if isinstance(pipe.scheduler, LCMScheduler) else None
        pipe.unet = torch.compile(pipe.unet, mode=unet_mode)
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


def compile_text_encoders(
    pipe: DiffusionPipeline, mode: str | None = None, dynamic: bool | None = None
) -> DiffusionPipeline:
    """Compile the pipeline's text encoder(s) in `mode` (None: inductor's default, no CUDA graphs).

    Compiles each encoder's own class forward, so calling this again replaces an earlier
    compilation instead of wrapping it.
    """
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.forward = torch.compile(type(encoder).forward.__get__(encoder), mode=mode, dynamic=dynamic)
    return pipe


def quantize(images: torch.Tensor) -> torch.Tensor:
    """A pipeline's "pt" images (B, 3, H, W in [0, 1]) as uint8 pixels (B, H, W, 3), on their device.

    diffusers' "pil" output does the same arithmetic (x 255, round, uint8) in numpy on the host;
    done on the GPU, a quarter of the bytes cross to the host, and inside a captured sample it is
    part of the one replay.
    """
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_host(pixels: torch.Tensor) -> torch.Tensor:
    """`pixels` on the CPU. From a GPU through page-locked memory: the copy is a DMA at full link
    speed, not a staged copy through a bounce buffer (torch caches the pinned blocks, so after the
    first call this allocates nothing)."""
    if pixels.device.type != "cuda":
        return pixels.cpu()
    host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    torch.cuda.current_stream(pixels.device).synchronize()
    return host


def warn_truncated(tokenizer: PreTrainedTokenizerBase, encoded: BatchEncoding) -> None:
    """Log the words a prompt lost to the tokenizer's length limit, as the pipeline does, from what
    the (fast) tokenizer kept aside while truncating: no second tokenisation."""
    for encoding in encoded.encodings or ():
        lost = [t for piece in encoding.overflowing for t in piece.ids]
        if lost:
            kept = tokenizer.decode(encoding.ids, skip_special_tokens=True)
            text = tokenizer.decode(lost, skip_special_tokens=True)
            limit = tokenizer.model_max_length
            # Cut short: the app renders at every keystroke, and a pasted page would fill the log each time.
            dropped = text if len(text) <= 200 else f"{text[:100]} ... {text[-100:]} ({len(lost)} tokens)"
            log.warning("prompt %r truncated to %d tokens; dropped: %r", kept[:40] + "...", limit, dropped)


# Captures run one at a time: the app samples each model on its own thread, and two captures
# at once would share the allocator's capture state. (A host sync from another thread is
# harmless: captures use the thread-local error mode.)
_CAPTURE_LOCK = threading.Lock()


class GraphedFunction:
    """A function of fixed-shape CUDA tensors replayed from a captured CUDA graph.

    One graph per input shape, captured on first use; each call copies its inputs into the
    graph's buffers, replays and returns copies of the outputs (so a later call never
    overwrites what an earlier one returned). All of one function's graphs share one memory
    pool: a graph's intermediates are dead once it has replayed and its outputs are copied out,
    so the next graph may reuse them, and n shapes cost one shape's activations, not n.

    A shape whose capture fails (code that syncs with the host, e.g. in another library
    version) runs uncaptured, with a warning; the function's own errors and running out of
    memory are raised as they are.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], name: str = "function") -> None:
        self.fn = fn
        self.name = name
        # None: the shape's capture failed and it runs uncaptured.
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple, tuple] | None] = {}
        self.pool = None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Capture, copies and replay on the inputs' GPU: torch.cuda.graph captures on a stream of
        # the *current* device, and on cuda:1 with cuda:0 current it would record nothing while
        # the kernels ran eagerly, and every replay would return the capture's outputs.
        cuda = next((x.device for x in inputs if x.is_cuda), None)
        with torch.cuda.device(cuda) if cuda is not None else contextlib.nullcontext():
            return self._call(inputs)

    def _call(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        key = tuple((x.shape, x.dtype, x.device) for x in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        entry = self.graphs[key]
        if entry is None:
            return self.fn(*inputs)
        graph, static_in, static_out = entry
        for buffer, x in zip(static_in, inputs):
            buffer.copy_(x)
        graph.replay()
        return tuple(y.clone() for y in static_out)

    def reset(self) -> None:
        """Drop every graph (they replay the memory and constants they were captured with)."""
        self.graphs.clear()
        self.pool = None

    def _capture(self, inputs: tuple[torch.Tensor, ...]):
        static_in = tuple(x.clone() for x in inputs)
        self._warm_up(static_in)
        try:
            graph, static_out = self._record(static_in)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
            message = f"{self.name} not captured as a CUDA graph for {shapes} ({exc}); running it uncaptured"
            warnings.warn(message, stacklevel=4)
            return None
        return graph, static_in, static_out

    def _warm_up(self, static_in: tuple[torch.Tensor, ...]) -> None:
        # Outside the graph, on a side stream: compilation and lazy initialisations happen here.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)

    def _record(self, static_in: tuple[torch.Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with _CAPTURE_LOCK, torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_out = self.fn(*static_in)
        finally:
            # torch.cuda.graph gives the caller's stream back only when capture_end succeeds: after
            # a failed capture the uncaptured runs and the caller would go on on the capture stream.
            torch.cuda.set_stream(stream)
        self.pool = graph.pool()
        return graph, static_out


class FastSampler:
    """Shift-LCM sampling of an SDXL pipeline's own modules without the pipeline's per-call work.

    Same images as the pipeline (tests/test_fast_path.py), but: the prompts are tokenised once
    per encoder (diffusers tokenises twice more to warn about truncation), the schedule is kept
    on the host so no scheduler step waits for the GPU, and every step's noise is drawn up front
    from the same generators in the same order, so that text encoding, the UNet steps and the VAE
    decode, down to the uint8 pixels, are one function of tensors (`sample`). Under
    `compile_pipeline` that function is captured as ONE CUDA graph per batch, step count and size
    (`graph=True`): a call is then tokenising, drawing noise, one replay and one copy out.
    """

    def __init__(self, pipe: DiffusionPipeline, graph: bool = False) -> None:
        self.pipe = pipe
        self.sample: Callable[..., tuple[torch.Tensor, ...]] = self._sample
        if graph:
            self.sample = GraphedFunction(self._sample, "sample")
        self._vae_fp32 = None
        self._decode_options: dict | None = None
        self._made_for = None
        self.reset()

    def compile_decode(self, **options) -> None:
        """torch.compile the decoding VAE's `decode` (again after a `reset` remakes the fp32 copy)."""
        self._decode_options = options
        vae = self.vae
        if "decode" not in vars(vae):  # not compiled yet (compile_pipeline's bf16 VAE is the pipeline's own)
            vae.decode = torch.compile(vae.decode, **options)

    def reset(self) -> None:
        """Start afresh from the pipeline as it is now: drop captured graphs, remake the fp32 VAE.

        Done by itself when the pipeline's scheduler, its settings, or where its networks' weights
        live change (e.g. `pipe.to(...)`); call it after changing weights in any other way, such as
        loading new VAE weights into an fp16 pipeline in place.
        """
        if isinstance(self.sample, GraphedFunction):
            self.sample.reset()
        pipe = self.pipe
        unet = getattr(pipe.unet, "_orig_mod", pipe.unet)  # under torch.compile
        if _adapters(unet) and getattr(unet, "original_attn_processors", None) is not None:
            # LoRA loaded after --compile fused q/k/v: the fused copy ignores the adapters on to_q/k/v.
            warnings.warn(
                "LoRA adapters on a UNet with fused q/k/v projections: unfused, so that they apply", stacklevel=2
            )
            unet.unfuse_qkv_projections()
            unet.original_attn_processors = None
        self._vae_fp32 = None
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            # SDXL's VAE overflows in fp16. The stock pipeline casts it to fp32 and back on every
            # call; a standing fp32 copy decodes the same numbers without moving the weights twice.
            self._vae_fp32 = copy.deepcopy(pipe.vae).to(torch.float32)
            vars(self._vae_fp32).pop("decode", None)  # a compiled decode would still be the fp16 VAE's
        if self._decode_options is not None:
            self.compile_decode(**self._decode_options)
        self._made_for = self._pipeline_state()

    def _pipeline_state(self) -> tuple:
        # What a captured graph bakes in: the schedule's numbers and the weights' addresses (the
        # first parameter of each network stands for its weights: a few microseconds per call).
        pipe = self.pipe
        modules = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
        weights = tuple((id(m), next(m.parameters()).data_ptr()) for m in modules)
        # VAE tiling/slicing switched on after first use (the fp32 copy was made without), and
        # LoRA adapters loaded or switched (the base weights stay where they were).
        vae = (getattr(pipe.vae, "use_tiling", False), getattr(pipe.vae, "use_slicing", False))
        adapters = tuple(sorted(getattr(pipe.unet, "peft_config", None) or {}))
        if adapters:
            adapters += tuple(pipe.unet.active_adapters())
        return id(pipe.scheduler), dict(pipe.scheduler.config), weights, vae, adapters

    @property
    def vae(self) -> torch.nn.Module:
        """The VAE that decodes: the pipeline's own, or its fp32 copy where fp16 would overflow."""
        return self.pipe.vae if self._vae_fp32 is None else self._vae_fp32

    @property
    def device(self) -> torch.device:
        """The UNet's device, from its first parameter: diffusers' `ModelMixin.device` walks every
        submodule looking for offloading hooks (with `pipe.device`, ~4 ms of host time per call at
        SDXL size on the H100 machine, before anything reaches the GPU)."""
        return next(self.pipe.unet.parameters()).device

    @property
    def captured(self) -> bool:
        """Whether samples replay as CUDA graphs (a shape whose capture failed runs uncaptured)."""
        return isinstance(self.sample, GraphedFunction)

    @staticmethod
    def supports(pipe: DiffusionPipeline) -> bool:
        """An SDXL pipeline with both text encoders and the shift-LCM sampler (a UNet with a
        guidance embedding, a VAE with a latent mean/std, a watermarker or offload hooks stays
        with the stock pipeline, which feeds, applies or runs them)."""
        vae = getattr(pipe, "vae", None)
        return (
            isinstance(pipe, StableDiffusionXLPipeline)
            and getattr(pipe, "nitro_sampler", None) == "shift-lcm"
            and isinstance(pipe.scheduler, TimestepShiftLCMScheduler)  # its step takes drawn noise
            and pipe.text_encoder is not None
            and pipe.text_encoder_2 is not None
            and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
            and vae is not None
            and getattr(vae.config, "latents_mean", None) is None
            and getattr(pipe, "watermark", None) is None
            # accelerate's offload hooks (enable_model_cpu_offload) move modules per call: the
            # stock pipeline runs them; this sampler reads the device from the weights once.
            and not any(hasattr(m, "_hf_hook") for m in (pipe.unet, vae, pipe.text_encoder, pipe.text_encoder_2))
        )

    def tokenize(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids for both encoders (each pads in its own way), on the device."""
        ids = []
        for tokenizer in (self.pipe.tokenizer, self.pipe.tokenizer_2):
            kwargs = dict(padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
            encoded = tokenizer(prompts, return_tensors="pt", **kwargs)
            if not ids:  # both encoders truncate the same words: say so once
                warn_truncated(tokenizer, encoded)
            ids.append(encoded.input_ids.to(device))
        return ids[0], ids[1]

    def encode_ids(self, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and pooled embeddings, in the pipeline's dtype. SDXL conditions on
        both encoders' penultimate hidden states, side by side, and on the second encoder's
        pooled projection."""
        hidden = self.pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out_2 = self.pipe.text_encoder_2(ids_2, output_hidden_states=True)
        dtype = self.pipe.text_encoder_2.dtype
        return torch.cat([hidden, out_2.hidden_states[-2]], dim=-1).to(dtype), out_2[0].to(dtype)

    def draw_noise(
        self, steps: int, generators: list[torch.Generator], height: int, width: int, device: torch.device
    ) -> torch.Tensor:
        """(steps, B, C, h, w): the initial latents and each later step's re-noising draw, drawn
        in the order the pipeline draws them from the same generators."""
        f = self.pipe.vae_scale_factor
        shape = (len(generators), self.pipe.unet.config.in_channels, height // f, width // f)
        dtype = self.pipe.text_encoder_2.dtype
        draws = [randn_tensor(shape, generator=generators, device=device, dtype=dtype) for _ in range(steps)]
        return torch.stack(draws)

    def _sample(
        self, ids: torch.Tensor, ids_2: torch.Tensor, noise: torch.Tensor, time_ids: torch.Tensor, t_unet: torch.Tensor
    ) -> tuple[torch.Tensor]:
        # Nothing here waits for the GPU or copies from the host (the schedule's scalars are host
        # numbers; every tensor is an argument), so the whole call can be captured as a graph.
        pipe, scheduler = self.pipe, self.pipe.scheduler
        embeds, pooled = self.encode_ids(ids, ids_2)
        steps = noise.shape[0]
        scheduler.set_timesteps(steps, device="cpu")
        scheduler.set_begin_index(0)
        latents = noise[0] * scheduler.init_noise_sigma
        added = {"text_embeds": pooled, "time_ids": time_ids}
        for i, (t_host, t) in enumerate(zip(scheduler.timesteps, t_unet)):
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
            step_noise = noise[i + 1] if i + 1 < steps else None
            latents = scheduler.step(eps, t_host, latents, noise=step_noise, return_dict=False)[0]
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return (quantize(pipe.image_processor.postprocess(image, output_type="pt")),)

    def __call__(
        self, prompts: list[str], steps: int, generators: list[torch.Generator], height: int, width: int
    ) -> torch.Tensor:
        """The pipeline's PIL images' pixels, (B, H, W, 3) uint8, on the CPU."""
        if self._pipeline_state() != self._made_for:
            log.info("the pipeline changed since its graphs were captured: capturing again")
            self.reset()
        device = self.device
        ids, ids_2 = self.tokenize(prompts, device)
        noise = self.draw_noise(steps, generators, height, width, device)
        self.pipe.scheduler.set_timesteps(steps, device="cpu")
        t_unet = self.pipe.scheduler.timesteps.to(device)
        dtype = self.pipe.text_encoder_2.dtype
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(prompts), dtype=dtype, device=device)
        return to_host(self.sample(ids, ids_2, noise, time_ids, t_unet)[0])
