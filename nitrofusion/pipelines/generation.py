"""Batched, seeded sampling with provenance written into every PNG."""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, LCMScheduler
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

import nitrofusion
from nitrofusion.errors import Interrupted, UserError, check_guidance_scale
from nitrofusion.pipelines.fast import fast_sampler, quantize, to_host
from nitrofusion.pipelines.loading import SHIFT_LCM_MAX_STEPS
from nitrofusion.userfiles import check_writable_folder, replacing, write_new

DEFAULT_NATIVE_STEPS = 50  # a multi-step pipeline whose call names no default (SD1.5's, SDXL's and SD3's do)


@dataclass
class GenerationResult:
    image: Image.Image
    prompt: str
    seed: int
    steps: int
    metadata: dict[str, str]


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The network that denoises: the UNet, or a flow pipeline's transformer (SD3)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def size_multiple(pipe: DiffusionPipeline) -> int:
    """Height and width must be multiples of this: the VAE's factor, and >= 8, as diffusers' own
    pipelines ask; times the patch size for a transformer (16 for SD3), whose latents are cut into
    patches. The UNet need not divide its latents evenly: it up-samples to its skip
    connections' sizes (an SDXL latent side of 65, 520 px, samples)."""
    return multiple_of(pipe.vae_scale_factor, _patch_size(denoiser(pipe).config))


def largest_side(pipe: DiffusionPipeline) -> int:
    """The largest height or width the model samples: an SD3 transformer's position embedding
    covers `pos_embed_max_size` patches a side (SD3-Medium's 192: 3072 px) and diffusers refuses
    more in a traceback; any other model up to MAX_SIDE."""
    return _largest_side(denoiser(pipe).config, pipe.vae_scale_factor)


def _largest_side(config: object, vae_factor: int) -> int:
    value = _config_value(config, "pos_embed_max_size")
    if isinstance(value, int) and value > 0:
        return min(MAX_SIDE, value * _patch_size(config) * vae_factor)
    return MAX_SIDE


def _patch_size(config: object) -> int:
    """A transformer's patch size from its config (a dict or a config object); 1 for a UNet."""
    value = _config_value(config, "patch_size")
    return int(value) if isinstance(value, int) and value > 0 else 1


def _config_value(config: object, key: str) -> object:
    """A setting of a config read as a dict (from its file) or a config object (of a loaded model)."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def multiple_of(vae_factor: int, patch_size: int = 1) -> int:
    return max(8, vae_factor * patch_size)


def sampler_of(pipe: DiffusionPipeline) -> str:
    """How `pipe` samples: as `load_pipeline` recorded it, else from its scheduler. A pipeline built
    as the public NitroSD snippet builds it (stock diffusers, the shifted LCM scheduler) is a
    shift-LCM one: 1-4 steps, no guidance; taken as native it was sampled with CFG 5."""
    recorded = getattr(pipe, "nitro_sampler", None)
    if recorded is not None:
        return recorded
    config = getattr(pipe.scheduler, "config", {})
    return "shift-lcm" if isinstance(pipe.scheduler, LCMScheduler) and "shifted_timestep" in config else "native"


def default_guidance(sampler: str, pipe: DiffusionPipeline | None = None) -> float:
    """Without --guidance-scale: none for the shift-LCM sampler (NitroSD samples without CFG); for a
    multi-step teacher, its pipeline class's own default (SDXL 5, SD1.5 7.5, SD3 7; a distilled one
    such as SD3.5-Large-Turbo needs --guidance-scale 0), except for a flow student of `distill`,
    whose folder records 0, or the embedded flow teacher, whose folder records 5."""
    if sampler == "shift-lcm":
        return 0.0
    if getattr(pipe, "nitro_guidance", None) is not None:  # a distilled flow student's, as its run recorded
        return pipe.nitro_guidance
    if pipe is not None:  # SD1.5's was 5, SDXL's, where StableDiffusionPipeline's own is 7.5
        default = call_default(pipe, "guidance_scale")
        if isinstance(default, (int, float)):
            return float(default)
    return 5.0


def call_default(pipe: DiffusionPipeline, parameter: str) -> object:
    """The default a pipeline class's `__call__` gives `parameter` (None where it gives none)."""
    found = inspect.signature(type(pipe).__call__).parameters.get(parameter)
    return None if found is None or found.default is inspect.Parameter.empty else found.default


def is_distilled(pipe: DiffusionPipeline) -> bool:
    """Whether `pipe` samples in a few steps: the shift-LCM sampler, or a flow student of `distill`
    (its folder records the levels it trained at, or CFG 0, as its run writes them)."""
    if sampler_of(pipe) == "shift-lcm":
        return True
    return bool(getattr(pipe, "nitro_sigmas", None)) or getattr(pipe, "nitro_guidance", None) == 0


def default_steps(pipe: DiffusionPipeline) -> int:
    """Without --steps: 1 for a distilled model; for a multi-step one the count its folder's
    nitrofusion.json records (the embedded teacher's 25), else its pipeline class's own default (50
    for SD1.5 and SDXL, 28 for SD3), since at one step a teacher draws noise."""
    if is_distilled(pipe):
        return 1
    if getattr(pipe, "nitro_steps", None):
        return int(pipe.nitro_steps)
    default = call_default(pipe, "num_inference_steps")
    return int(default) if isinstance(default, int) else DEFAULT_NATIVE_STEPS


def default_size(pipe: DiffusionPipeline) -> int:
    return int(denoiser(pipe).config.sample_size) * pipe.vae_scale_factor


def check_distinct_timesteps(pipe: DiffusionPipeline, steps: int) -> None:
    """A very small shift maps two noise levels onto one UNet timestep: the student would be told
    one timestep for two different noise levels. Refused rather than sampled. Checked once per
    scheduler settings and step count (0.5 ms: a real cost per call on the compiled path)."""
    scheduler = pipe.scheduler
    # By its settings, not its id: a scheduler's config can be changed in place, and an id reused.
    key = (type(scheduler).__name__, json.dumps(dict(scheduler.config), sort_keys=True, default=str), steps)
    checked = getattr(pipe, "nitro_checked_schedules", set())
    if key in checked:
        return
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps)
    ts = [int(t) for t in probe.timesteps]
    if len(set(ts)) < len(ts):
        shift = scheduler.config.shifted_timestep
        raise UserError(f"--shift {shift} is too small for {steps} steps: the UNet timesteps {ts} repeat")
    pipe.nitro_checked_schedules = checked | {key}


def sampling_sigmas(pipe: DiffusionPipeline, steps: int) -> list[float] | None:
    """The `sigmas` a flow student's pipeline is called with at this step count, as its export records
    them (`load_pipeline`'s `nitro_sigmas`); None: its scheduler's own spacing."""
    return (getattr(pipe, "nitro_sigmas", None) or {}).get(steps)


def check_request(pipe: DiffusionPipeline, steps: int, height: int, width: int) -> None:
    sampler = sampler_of(pipe)
    check_steps(sampler, steps)
    recorded = getattr(pipe, "nitro_sigmas", None)
    if recorded and steps not in recorded:
        warnings.warn(
            f"'{getattr(pipe, 'nitro_model', 'the model')}' records the noise levels it was trained at for "
            f"{', '.join(map(str, sorted(recorded)))} steps: {steps} steps sample at its scheduler's own spacing",
            stacklevel=2,
        )
    if sampler == "shift-lcm":
        check_distinct_timesteps(pipe, steps)
    check_size(size_multiple(pipe), height, width, largest_side(pipe))


def check_steps(sampler: str, steps: int) -> None:
    if sampler == "shift-lcm" and not 1 <= steps <= SHIFT_LCM_MAX_STEPS:
        raise UserError(
            f"--steps must be 1 to {SHIFT_LCM_MAX_STEPS} with the shift-LCM sampler, got {steps} "
            "(use --sampler native for a multi-step teacher)"
        )
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")


# The largest side sampled: 8x SDXL's 1024 px. Far past it a sample only exhausts memory (a
# traceback from the allocator) or runs for hours.
MAX_SIDE = 8192


def check_side(option: str, value: int, multiple: int, largest: int = MAX_SIDE, model: str = "this model") -> None:
    """A side in pixels that `model` can sample: a positive multiple of its VAE's (and patch's)
    factor, at most its `largest_side` (MAX_SIDE said without naming the model)."""
    if value <= 0 or value % multiple:
        raise UserError(f"{option} must be a positive multiple of {multiple} for {model}, got {value}")
    if value > largest:
        whose = f" for {model}" if largest < MAX_SIDE else ""
        raise UserError(f"{option} must be at most {largest} px{whose}, got {value}")


def check_size(multiple: int, height: int | None, width: int | None, largest: int = MAX_SIDE) -> None:
    """`None`: the model's default size, which fits it. `largest`: the model's `largest_side`."""
    for name, v in (("height", height), ("width", width)):
        if v is not None:
            check_side(f"--{name}", v, multiple, largest)


def check_seeds(seed: int, n: int) -> None:
    if not SEEDS[0] <= seed <= seed + n - 1 <= SEEDS[1]:
        raise UserError(f"--seed must be in {SEEDS[0]}..{SEEDS[1] - n + 1} for {n} images")


def size_multiple_of_folder(folder: str | Path) -> int | None:
    """`size_multiple` from a pipeline folder's VAE config (and a transformer's, for its patch
    size), before anything is loaded (an SDXL pipeline takes tens of seconds); None where they
    cannot be read, and the check after loading stands alone."""
    limits = size_limits_of_folder(folder)
    return None if limits is None else limits[0]


def default_size_of_folder(folder: str | Path) -> int | None:
    """`default_size` from a pipeline folder's configs, before anything is loaded; None where they
    cannot be read."""
    try:
        for name in ("unet", "transformer"):
            path = Path(folder) / name / "config.json"
            if path.is_file():
                return int(json.loads(path.read_text())["sample_size"]) * _vae_factor_of_folder(folder)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def size_limits_of_folder(folder: str | Path) -> tuple[int, int] | None:
    """(`size_multiple`, `largest_side`) from a pipeline folder's configs, as `size_multiple_of_folder`."""
    try:
        factor = _vae_factor_of_folder(folder)
        path = Path(folder) / "transformer" / "config.json"
        transformer = json.loads(path.read_text()) if path.is_file() else {}
        return multiple_of(factor, _patch_size(transformer)), _largest_side(transformer, factor)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _vae_factor_of_folder(folder: str | Path) -> int:
    """diffusers' VAE scale factor, from the folder's VAE config."""
    vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1)


def _interrupter(interrupt: Callable[[], bool]) -> Callable[..., dict]:
    """A diffusers step-end callback that stops the pipeline's loop once `interrupt()` is true.
    Raising, not the pipelines' own `interrupt` flag: that one skips the remaining steps but still
    decodes and returns a half-denoised image, which a caller could take for a finished one."""

    def on_step_end(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict) -> dict:
        if interrupt():
            raise Interrupted()
        return tensors

    return on_step_end


SEEDS = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def generate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    steps: int | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    guidance_scale: float | None = None,
    progress: bool = True,
    interrupt: Callable[[], bool] | None = None,
) -> list[GenerationResult]:
    """Sample one image per prompt; image i starts from the noise of seed + i, whatever the batch
    size (on a CPU, the pixels of two batch sizes can still differ by rounding, about 1/255).
    `steps`: None is `default_steps(pipe)` (1 for a distilled model, the pipeline's own otherwise).
    `interrupt`: asked before each batch and after each denoising step of the pipeline's own loop;
    once it returns True, `Interrupted` is raised there. The fast path's 1-4 steps run as one call
    (one CUDA graph once compiled) and are asked about before it only."""
    batches = generate_batches(
        pipe, prompts, steps, seed, height, width, batch_size, guidance_scale, progress, interrupt
    )
    return [result for batch in batches for result in batch]


def generate_batches(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    steps: int | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    guidance_scale: float | None = None,
    progress: bool = True,
    interrupt: Callable[[], bool] | None = None,
) -> Iterator[list[GenerationResult]]:
    """`generate`, a batch at a time: a caller can write each batch before the next is drawn."""
    if isinstance(prompts, str):  # one prompt, not one image per character
        prompts = [prompts]
    if not prompts:
        raise UserError("no prompts given")
    check_seeds(seed, len(prompts))
    check_guidance_scale(guidance_scale)
    steps = default_steps(pipe) if steps is None else steps
    height = default_size(pipe) if height is None else height
    width = default_size(pipe) if width is None else width
    check_request(pipe, steps, height, width)
    sampler = sampler_of(pipe)
    if guidance_scale is None:
        guidance_scale = default_guidance(sampler, pipe)
    sigmas = sampling_sigmas(pipe, steps)
    levels = {} if sigmas is None else {"sigmas": sigmas}
    if interrupt is not None:
        levels["callback_on_step_end"] = _interrupter(interrupt)
    # The pipeline's own modules without its per-call work, where it applies (same images).
    fast = fast_sampler(pipe) if guidance_scale <= 1 else None
    device = fast.device if fast is not None else pipe.device  # pipe.device walks every submodule
    bar = tqdm(total=len(prompts), desc=f"generate ({steps} step{'s' if steps > 1 else ''})", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        seeds = [seed + start + i for i in range(len(chunk))]
        if interrupt is not None and interrupt():
            raise Interrupted()
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        with torch.inference_mode():
            if fast is not None:
                fill = batch_size - len(chunk) if fast.captured and start else 0
                # A compiled sampler compiles again (minutes) for a new batch size: a short last
                # batch is filled up with its last prompt, whose extra images are dropped. Each
                # image has its own generator, so the filler changes no other image's noise.
                filler = [torch.Generator(device=device).manual_seed(seeds[-1]) for _ in range(fill)]
                pixels = fast(chunk + chunk[-1:] * fill, steps, generators + filler, height, width)
                images = pil_images(pixels[: len(chunk)])
            else:
                output = pipe(
                    prompt=chunk,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    generator=generators,
                    output_type="pt",
                    **levels,
                )
                images = to_pil(output.images)
        results = []
        for prompt, s, image in zip(chunk, seeds, images):
            meta = {
                "prompt": prompt,
                "seed": str(s),
                "steps": str(steps),
                "model": str(getattr(pipe, "nitro_model", "")),
                "sampler": sampler,
                "guidance_scale": f"{guidance_scale:g}",
                "software": f"nitrofusion {nitrofusion.__version__}",
            }
            if getattr(pipe, "nitro_unet", ""):  # the model's UNet was replaced: the student is this file
                meta["unet"] = pipe.nitro_unet
            if getattr(pipe, "nitro_lora", ""):  # a LoRA fused into the model's denoiser
                meta["lora"] = pipe.nitro_lora
            if sampler == "shift-lcm":
                meta["shift"] = str(pipe.scheduler.config.shifted_timestep)
            if sigmas is not None:
                meta["sigmas"] = json.dumps(sigmas)
            results.append(GenerationResult(image, prompt, s, steps, meta))
        bar.update(len(chunk))
        yield results
    bar.close()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """A pipeline's "pt" output (B, 3, H, W in [0, 1]) as PIL images: diffusers' "pil" output,
    quantised on the images' device before the copy to the host (`quantize`)."""
    return pil_images(to_host(quantize(images)))


def pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """uint8 pixels (B, H, W, 3) on the CPU as RGB PIL images."""
    return [Image.fromarray(p) for p in pixels.numpy()]


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "image"


OTHER_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def prepare_output(out: str | Path, count: int) -> tuple[Path, bool]:
    """Check that `out` can be written before any work is done. Returns (path, is_single_file)."""
    if not str(out).strip():  # Path("") is the current folder
        raise UserError("--out is empty: name a .png file or a folder")
    out = Path(out)
    single = out.suffix.lower() == ".png"
    if out.suffix.lower() in OTHER_IMAGE_SUFFIXES and not out.is_dir():  # it became a folder named foo.jpg
        raise UserError(f"--out {out} names a {out.suffix} file: images are written as PNG (a .png file or a folder)")
    if single and count != 1:
        raise UserError(f"--out {out} names one PNG file but {count} images will be written; give a directory")
    if single and out.is_dir():
        raise UserError(f"--out {out} is a directory: name a new .png file, or give the directory without .png")
    check_writable_folder(out.parent if single else out, "output directory")
    if single and out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"output location '{out}' is not writable")
    return out, single


def save_images(results: Sequence[GenerationResult], out: str | Path, first: int = 0) -> list[Path]:
    """Write PNGs (with prompt, seed, steps, model... as text chunks) and return their paths;
    `first`: the number of the first image (for a run saved a batch at a time). Into a folder,
    an image never replaces an earlier run's (the names say prompt and seed, not steps, model or
    size): it takes the next free name. A file named with --out is written as asked."""
    out, single = prepare_output(out, first + len(results))
    directory = out.parent if single else out
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory '{directory}': {exc.strerror}") from None
    paths = []
    for i, r in enumerate(results, start=first):
        info = PngInfo()
        for k, v in r.metadata.items():
            info.add_text(k, v)

        def write(tmp: Path, image: Image.Image = r.image, info: PngInfo = info) -> None:
            image.save(tmp, format="PNG", pnginfo=info)

        if single:
            with replacing(out) as tmp:
                write(tmp)
            paths.append(out)
        else:
            paths.append(write_new(out / f"{i:04d}-{_slug(r.prompt)}-s{r.seed}.png", write))
    return paths
