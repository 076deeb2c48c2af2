"""SDXL-architecture sampling latency: nitrofusion's path against the bare compute and the stock pipeline.

SDXL base 1.0's architecture with random weights (nitrofusion/models/configs/sdxl-base; speed
does not depend on the values), 1024², no CFG (as NitroSD samples), the shift-LCM scheduler
in every row. One process, one run, so the ratios compare like with like:

- stock: diffusers' StableDiffusionXLPipeline as it comes (SDPA attention), PIL output.
- stock + compile: diffusers' documented torch.compile recipe for SDXL (its guide "Accelerate
  inference of text-to-image diffusion models"): the UNet and VAE in channels-last, fused q/k/v,
  `torch.compile(unet, fullgraph=True)` and the VAE's `decode` compiled too; but in inductor's
  default mode with static shapes (`dynamic=False`), not the guide's "max-autotune" (its kernel
  search would not fit a device call), and without the guide's inductor tuning flags. Undone
  after its rows: every setting shares one pipeline.
- no SDPA: the stock pipeline with diffusers' classic attention (to see what SDPA buys).
- nitrofusion: `nitrofusion.pipelines.generate` (its FastSampler: the pipeline's modules
  without the pipeline's per-call work; uint8 quantisation on the GPU as the last op of the
  sample, copied to the host through pinned memory), eager; then with
  `--compile` (`compile_pipeline`: channels-last, fused q/k/v, the UNet and VAE decoder
  compiled with inductor, and each whole sample -- text encoders, UNet steps, VAE decode --
  replayed as one CUDA graph per batch and step count).
- bare: the same modules' UNet forwards (one per step) + VAE decode on prepared tensors:
  the compute a sample cannot avoid (in the compiled row also replayed as one CUDA graph, so it
  has no launch overhead either). Pipeline overhead = end to end / bare - 1.

End to end = text encoding (both CLIP encoders) + UNet steps + VAE decode + PIL images.
Results are written after every row (JSON, replaced whole), so a run cut short keeps what it
measured. On CUDA each end-to-end row starts with the allocator's cache emptied and its peaks
reset, and records the peak allocated, the reserved memory after the row and at its peak, and the
allocator's retries (`num_alloc_retries`: it freed its cache to satisfy a request, the sign of a
card nearly full). A compiled setting whose row failed skips its later rows (recorded as
skipped): each would compile again, minutes each, and likely fail the same way. Rows with CUDA
graphs record whether every graph was captured (a failed capture only warns and runs uncaptured).

`--profile DIR` writes a gzipped torch.profiler chrome trace of one call per setting and
batch (the first step count); the JSON gets its top host ops as text.

`--breakdown` adds, for every end-to-end row, one more timed call with the device
synchronised around each stage (tokenisation, noise, text encoding, UNet, VAE decode, image
post-processing; a replayed graph of the whole sample is one stage; the rest is "other":
scheduler, latents, Python; the stock pipeline tokenises inside its text encoding):
where a pipeline's overhead over the bare compute goes. Synchronising removes the overlap of
host and device work, so the stages add up to a little more than the plain end-to-end time.

    python benchmarks/sdxl_inference.py --out runs/sdxl_inference.json          # a CUDA machine
    python benchmarks/sdxl_inference.py --tiny --device cpu --no-compile        # the same code, tiny, CPU
    python benchmarks/sdxl_inference.py --settings stock nitrofusion+compile --breakdown --batches 1
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SETTINGS = ("stock", "nitrofusion", "nitrofusion+compile", "stock+compile", "no-sdpa")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_cached(device: torch.device) -> None:
    """Give the allocator's cached blocks back to the card, so that a later row's reserved memory
    is its own (a no-op off CUDA)."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_json(path: Path, data: dict) -> None:
    """`data` as JSON at `path`, atomically: a run killed mid-write leaves the last whole file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(data, f, indent=1)
    os.chmod(f.name, 0o644)  # a temporary file is made private
    os.replace(f.name, path)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> dict:
    """Median and min wall time of `fn` (synchronised); the first warm-up call is reported on its own
    (it includes compilation where there is any)."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "first_call_s": first}


class StageClock:
    """Synchronised wall time per pipeline stage, by wrapping the callables a pipeline calls.

    Each wrapper synchronises the device before and after its call, so a stage's time is the
    device work it queued plus its host work; nested stages count in the outer one only.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []
        self._depth = 0

    def wrap(self, owner: object, attr: str, stage: str) -> None:
        original = getattr(owner, attr)
        had_own = attr in vars(owner)

        def timed_call(*args, **kwargs):
            if self._depth:
                return original(*args, **kwargs)
            self._depth += 1
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
                self._depth -= 1

        object.__setattr__(owner, attr, timed_call)
        self._undo.append(
            (lambda: object.__setattr__(owner, attr, original)) if had_own else (lambda: delattr(owner, attr))
        )

    def hook(self, module: torch.nn.Module, stage: str) -> None:
        """Time every call of a module (forward hooks: the pipeline calls `self.unet(...)`)."""
        state: dict[str, float] = {}

        def before(*_):
            sync(self.device)
            state["t0"] = time.perf_counter()

        def after(*_):
            sync(self.device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - state["t0"]

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        self._undo.append(lambda: [h.remove() for h in handles])

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def stage_breakdown(pipe, call: Callable[[int], None], steps: int, device: torch.device) -> dict:
    """One synchronised end-to-end call, split into its stages (milliseconds)."""
    import nitrofusion.pipelines.fast as fast_module
    import nitrofusion.pipelines.generation as generation
    from nitrofusion.pipelines.fast import GraphedFunction

    clock = StageClock(device)
    clock.wrap(pipe, "encode_prompt", "text encoding")
    fast = getattr(pipe, "nitro_fast", None)  # nitrofusion's sampler: its own stages
    if fast is not None:
        clock.wrap(fast, "tokenize", "tokenisation")
        clock.wrap(fast, "draw_noise", "noise")
        clock.wrap(fast, "encode_ids", "text encoding")
        if isinstance(fast.sample, GraphedFunction):  # one replay: its stages cannot be told apart
            clock.wrap(fast, "sample", "text + UNet + VAE (one graph)")
    clock.hook(pipe.unet, "UNet")
    clock.wrap(pipe.vae, "decode", "VAE decode")
    clock.wrap(pipe.image_processor, "postprocess", "images")  # the stock pipeline's PIL conversion
    clock.wrap(generation, "to_pil", "images")  # nitrofusion's, from the pipeline's "pt" output
    clock.wrap(fast_module, "to_host", "images")  # FastSampler's pixels to the host (quantised in its sample)
    clock.wrap(generation, "pil_images", "images")
    try:
        sync(device)
        t0 = time.perf_counter()
        call(steps)
        sync(device)
        total = time.perf_counter() - t0
    finally:
        clock.restore()
    stages = {k: 1e3 * v for k, v in clock.seconds.items()}
    stages["other"] = 1e3 * total - sum(stages.values())
    return {"total_ms": 1e3 * total, "stages_ms": stages}


def failure(exc: Exception) -> dict:
    """An error row's payload: the exception's type and the start of its message."""
    return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def graph_capture(graphed) -> dict:
    """Whether each of a GraphedFunction's graphs was captured: one whose capture failed only warns
    and runs uncaptured (nitrofusion/pipelines/fast.py), which its timing alone would not show."""
    graphs = graphed.graphs.values()
    captured = sum(g is not None for g in graphs)
    return {
        "graphs_captured": captured,
        "graphs": len(graphs),
        "all_graphs_captured": bool(graphs) and captured == len(graphs),
    }


def replay_check(pipe, size: int) -> dict:
    """Prompts A, B, A through `generate`: the two A images must be identical and B must differ.

    A compiled path that replays CUDA graphs could otherwise hand one call the memory of an
    earlier call's outputs (e.g. stale prompt embeddings) without any error.
    """
    from nitrofusion.pipelines import generate
    from nitrofusion.pipelines.fast import FastSampler

    def image(prompt: str) -> torch.Tensor:
        result = generate(pipe, [prompt], steps=1, height=size, width=size, batch_size=1, progress=False)[0]
        return torch.from_numpy(np.array(result.image)).float()

    a1, b, a2 = image("a red apple on a table"), image("a city at night, neon lights"), image("a red apple on a table")
    result = {"A_vs_A_max_abs": float((a1 - a2).abs().max()), "A_vs_B_mean_abs": float((a1 - b).abs().mean())}
    fast = getattr(pipe, "nitro_fast", None)
    if fast is not None and fast.captured:  # the replayed graph against the same modules called plainly
        device = pipe.unet.device
        with torch.inference_mode():
            plain = FastSampler(pipe)
            args = (["a red apple on a table"], 2, size, size)
            graphed = fast(args[0], args[1], [torch.Generator(device).manual_seed(0)], *args[2:])
            uncaptured = plain(args[0], args[1], [torch.Generator(device).manual_seed(0)], *args[2:])
        result["captured_vs_plain_2_steps_max_abs"] = float((graphed.int() - uncaptured.int()).abs().max())
        result["captured"] = fast.captured
    return result


def profile_call(call: Callable[[int], None], steps: int, path: Path) -> str:
    """A gzipped chrome trace of one call (host ops and device kernels); the top host ops as text."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        call(steps)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    raw = path.with_suffix("")  # the .json beside the .json.gz
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as f, gzip.open(path, "wb") as g:
        g.write(f.read())
    raw.unlink()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from nitrofusion.models.builders import SDXLSpec, build_sdxl_base, build_sdxl_pipeline
    from nitrofusion.scheduling import TimestepShiftLCMScheduler

    if args.tiny:
        pipe = build_sdxl_pipeline(SDXLSpec()).to(device, dtype)
    else:
        pipe = build_sdxl_base(device, dtype)
    free_cached(device)  # built in fp32 then cast: the fp32 blocks would count in every row's reserved memory
    pipe.scheduler = TimestepShiftLCMScheduler.from_config(
        pipe.scheduler.config, shifted_timestep=250, original_inference_steps=4
    )
    pipe.nitro_sampler = "shift-lcm"  # what load_pipeline records; generate reads it
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bare_compute(
    pipe, batch: int, size: int, device: torch.device, dtype: torch.dtype, captured: bool = False
) -> Callable[[int], None]:
    """UNet forwards + VAE decode on prepared tensors of the pipeline's shapes (no text, no scheduler);
    `captured`: replayed as one CUDA graph per step count, as compiled nitrofusion samples are, so
    the bare figure has no launch overhead either."""
    unet_cfg = pipe.unet.config
    f = pipe.vae_scale_factor
    with torch.inference_mode():  # inference tensors, like the pipeline's (else a compiled UNet recompiles)
        latents = torch.randn(batch, unet_cfg.in_channels, size // f, size // f, device=device, dtype=dtype)
        text = torch.randn(batch, 77, unet_cfg.cross_attention_dim, device=device, dtype=dtype)
        pooled = torch.randn(batch, pipe.text_encoder_2.config.projection_dim, device=device, dtype=dtype)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)
        timesteps = [torch.tensor(t, device=device) for t in (999, 749, 499, 249)]

    def run(steps: int) -> torch.Tensor:
        with torch.inference_mode():
            x = latents
            for t in timesteps[:steps]:
                # Called exactly as the pipeline calls them, so compiled modules are not recompiled:
                # the same keywords, and contiguous inputs (a channels-last UNet returns
                # channels-last latents, which the pipeline's scheduler step makes contiguous).
                x = pipe.unet(
                    x,
                    t,
                    encoder_hidden_states=text,
                    timestep_cond=None,
                    cross_attention_kwargs=None,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                    return_dict=False,
                )[0].contiguous()
            return pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]

    return GraphedBare(run, device) if captured else run


class GraphedBare:
    """The bare compute replayed as one CUDA graph per step count, one step count's graph alive at a
    time: each graph has its own memory pool, and graphs kept from earlier step counts would count
    in every later row's reserved memory."""

    def __init__(self, run: Callable[[int], torch.Tensor], device: torch.device) -> None:
        self.run, self.device = run, device
        self.steps: int | None = None
        self.graphed = None  # the GraphedFunction of `steps`

    def __call__(self, steps: int) -> torch.Tensor:
        from nitrofusion.pipelines.fast import GraphedFunction

        if steps != self.steps:
            self.release()
            self.graphed = GraphedFunction(lambda: (self.run(steps),), f"bare UNet + VAE, {steps} steps")
            self.steps = steps
        with torch.inference_mode():
            return self.graphed()[0]

    def release(self) -> None:
        """Drop the graph and give its pool back to the card."""
        if self.graphed is not None:
            self.graphed.reset()
        self.graphed = self.steps = None
        free_cached(self.device)


def stock_call(pipe, prompts: list[str], size: int, device: torch.device) -> Callable[[int], None]:
    def run(steps: int) -> list:
        generators = [torch.Generator(device=device).manual_seed(i) for i in range(len(prompts))]
        with torch.inference_mode():
            return pipe(
                prompt=prompts,
                num_inference_steps=steps,
                guidance_scale=0.0,
                height=size,
                width=size,
                generator=generators,
            ).images

    return run


def nitro_call(pipe, prompts: list[str], size: int) -> Callable[[int], None]:
    from nitrofusion.pipelines import generate

    def run(steps: int) -> None:
        generate(pipe, prompts, steps=steps, height=size, width=size, batch_size=len(prompts), progress=False)

    return run


STOCK_COMPILE = {"fullgraph": True, "dynamic": False}  # the guide's mode="max-autotune" left out: see the top


def compile_stock(pipe) -> None:
    """diffusers' torch.compile recipe for SDXL, in place (the guide's steps, its mode left out)."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.fuse_qkv_projections()
    pipe.unet = torch.compile(pipe.unet, **STOCK_COMPILE)
    pipe.vae.decode = torch.compile(pipe.vae.decode, **STOCK_COMPILE)


def uncompile_stock(pipe, eager_unet: torch.nn.Module) -> None:
    """Undo `compile_stock` whole, for the settings after it (they share the pipeline): the eager UNet
    and decode back, the fused projections removed (diffusers' `unfuse_qkv_projections` only puts
    the attention processors back; the fused copies of the weights would stay, ~1 GiB at SDXL), the
    default memory format, and dynamo's compiled code dropped."""
    from diffusers.models.attention_processor import Attention

    pipe.unet = eager_unet
    vars(pipe.vae).pop("decode", None)  # the class's own decode again
    if getattr(pipe, "fusing_unet", False) or getattr(pipe, "fusing_vae", False):
        pipe.unfuse_qkv_projections(unet=pipe.fusing_unet, vae=pipe.fusing_vae)
    for model in (pipe.unet, pipe.vae):
        for module in model.modules():
            if isinstance(module, Attention):
                for fused in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(module, fused):
                        delattr(module, fused)
                module.fused_projections = False
        vars(model).pop("original_attn_processors", None)
        model.to(memory_format=torch.contiguous_format)
    torch._dynamo.reset()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--size", type=int, help="pixels (default 1024; the tiny model's own size with --tiny)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=list(SETTINGS),
    )
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows (e.g. on CPU)")
    p.add_argument("--tiny", action="store_true", help="the tiny test SDXL pipeline instead of SDXL base")
    p.add_argument("--breakdown", action="store_true", help="also time each stage of one synchronised call")
    p.add_argument("--profile", help="folder for a chrome trace of one call of every end-to-end row")
    p.add_argument("--out", default="runs/sdxl_inference.json")
    args = p.parse_args()

    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from nitrofusion.pipelines.fast import GraphedFunction, compile_pipeline

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    pipe = build(args, device, dtype)
    size = args.size or (pipe.unet.config.sample_size * pipe.vae_scale_factor)
    settings = [s for s in args.settings if not (args.no_compile and "compile" in s)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
        "dtype": args.dtype,
        "size": size,
        "model": "tiny SDXL (tests)" if args.tiny else "SDXL base 1.0 architecture, random weights",
        "rows": [],
    }

    failed: set[str] = set()  # compiled settings with an error row: their later rows are skipped

    def record(setting: str, batch: int | None, steps: int | None, what: str, result: dict) -> None:
        row = {"setting": setting, "batch": batch, "steps": steps, "what": what, **result}
        report["rows"].append(row)
        write_json(out, report)
        print(json.dumps(row), flush=True)
        if what == "error" and "compile" in setting:
            failed.add(setting)

    def skipped(setting: str, batch: int, steps: int) -> bool:
        """After a compiled setting's error row: each later row would compile again (minutes) and
        most likely fail the same way, so it is recorded as skipped instead."""
        if setting not in failed:
            return False
        record(setting, batch, steps, "skipped", {"skipped": "an earlier row of this compiled setting failed"})
        return True

    def measure(setting: str, e2e: Callable[[int], None], with_bare: bool, captured_bare: bool = False) -> None:
        for batch in args.batches:
            prompts = [f"a photograph of an astronaut riding a horse, {i}" for i in range(batch)]
            call = e2e(pipe, prompts, size)
            bare = bare_compute(pipe, batch, size, device, dtype, captured=captured_bare) if with_bare else None
            for steps in args.steps:
                if skipped(setting, batch, steps):
                    continue
                if isinstance(bare, GraphedBare):  # the last step count's graph: not this row's memory
                    bare.release()
                retries = 0
                if device.type == "cuda":  # this row's memory only: the cache of earlier rows given back
                    free_cached(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
                try:
                    result = timed(lambda c=call, k=steps: c(k), device, args.warmup, args.repeat)
                    if device.type == "cuda":
                        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                        # CUDA-graph pools keep their memory reserved between replays.
                        result["reserved_gib"] = torch.cuda.memory_reserved(device) / 2**30
                        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
                        stats = torch.cuda.memory_stats(device)
                        result["num_alloc_retries"] = stats.get("num_alloc_retries", 0) - retries
                    fast = getattr(pipe, "nitro_fast", None)
                    if fast is not None and isinstance(fast.sample, GraphedFunction):
                        result.update(graph_capture(fast.sample))
                    record(setting, batch, steps, "end to end", result)
                    if args.breakdown:
                        record(setting, batch, steps, "stages", stage_breakdown(pipe, call, steps, device))
                    if args.profile and steps == args.steps[0]:
                        name = re.sub(r"[^a-z0-9]+", "-", f"{setting} b{batch} s{steps}".lower())
                        folder = Path(args.profile)
                        folder.mkdir(parents=True, exist_ok=True)
                        table = profile_call(call, steps, folder / f"trace-{name}.json.gz")
                        record(setting, batch, steps, "host ops", {"table": table})
                    if bare is not None:
                        bare_result = timed(lambda b=bare, k=steps: b(k), device, 2, args.repeat)
                        if isinstance(bare, GraphedBare):
                            bare_result.update(graph_capture(bare.graphed))
                        record(setting, batch, steps, "bare UNet + VAE", bare_result)
                except Exception as exc:  # one failing row (e.g. a compiler error) must not lose the others
                    record(setting, batch, steps, "error", failure(exc))
            if isinstance(bare, GraphedBare):
                bare.release()

    def checked(setting: str) -> None:
        if skipped(setting, 1, 1):
            return
        try:
            record(setting, 1, 1, "replay check", replay_check(pipe, size))
        except Exception as exc:
            record(setting, 1, 1, "error", failure(exc))

    def stock(pipe, prompts: list[str], size: int) -> Callable[[int], None]:
        return stock_call(pipe, prompts, size, device)

    # Order matters: compile_pipeline changes the modules in place, so it comes last.
    if "stock" in settings:
        measure("stock", stock, with_bare=True)
    if "no-sdpa" in settings:
        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
        measure("no SDPA (classic attention)", stock, with_bare=False)
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    if "stock+compile" in settings:
        setting = "stock + compile (diffusers' recipe, default mode, not max-autotune)"
        eager_unet = pipe.unet
        try:
            compile_stock(pipe)
        except Exception as exc:  # its rows are then recorded as skipped
            record(setting, None, None, "error", failure(exc))
        try:
            measure(setting, stock, with_bare=True)
        finally:
            uncompile_stock(pipe, eager_unet)
            free_cached(device)
    if "nitrofusion" in settings:  # the same eager modules as "stock": its bare row applies
        measure("nitrofusion", nitro_call, with_bare=False)
    if "nitrofusion+compile" in settings and device.type == "cuda":
        setting = "nitrofusion + compile"
        try:
            compile_pipeline(pipe)
        except Exception as exc:  # its rows are then recorded as skipped
            record(setting, None, None, "error", failure(exc))
        fast = getattr(pipe, "nitro_fast", None)
        # Bare compute as the sampler runs it: one graph per call where the sampler captures the
        # whole sample (its modules then have no CUDA graphs of their own).
        measure(setting, nitro_call, with_bare=True, captured_bare=fast is not None and fast.captured)
        checked(setting)

    print(f"wrote {out}")


if __name__ == "__main__":
    main()
