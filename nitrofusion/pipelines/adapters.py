"""A LoRA on a pipeline's denoiser, read as safetensors only: `export-lora`'s, or anyone's in diffusers' format.

`export-lora` writes a student as its teacher plus a LoRA, and records in the file's header how the
LoRA'd teacher samples as the student: a UNet student's timestep shift (`nitrofusion.shift`), a
flow student's noise levels (`nitrofusion.sigmas`), and its extraction report (`nitrofusion`). Those
are read back here, so `generate --model TEACHER --lora FILE` samples as the student did. Any other
LoRA (a style, a character) is applied as it is and changes nothing about how the pipeline samples.

The LoRA is fused into the weights and its adapter layers removed: sampling then costs what the
plain pipeline costs, and `--compile` sees plain modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open

from nitrofusion.errors import UserError
from nitrofusion.pipelines.loading import (
    SHIFT_METADATA,
    flow_file_sigmas,
    quiet_loading,
    unet_file_shift,
    unreadable_file,
)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name, as `export-lora` writes a folder
EXPORT_REPORT = "nitrofusion"  # the header key `export-lora` writes its report under
LORA_ENDS = (".lora_A.weight", ".lora_B.weight")  # PEFT's names, as diffusers saves them


@dataclass
class LoraFile:
    path: Path
    denoiser: str  # "unet" or "transformer": whose modules its keys name
    distilled: bool  # written by export-lora: the LoRA'd teacher is a few-step student
    shift: int | None = None
    sigmas: dict[int, list[float]] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)  # the denoiser's modules its lora_A/lora_B pairs change

    @property
    def name(self) -> str:
        """What the LoRA is called: its file's stem, or its folder's name for diffusers' file name."""
        return self.path.parent.name if self.path.name == LORA_WEIGHTS_NAME else self.path.stem


def read_lora_file(source: str | Path, option: str = "--lora") -> LoraFile:
    """The LoRA's file (a .safetensors file, or a folder holding diffusers' pytorch_lora_weights.safetensors)
    and what its header records; everything else is refused in one line (a .bin would be unpickled)."""
    path = Path(source).expanduser().resolve()  # recorded: the same file however it was typed
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
        if not path.is_file():
            raise UserError(f"{option} '{source}' is a folder without {LORA_WEIGHTS_NAME}")
    elif not path.is_file():
        raise UserError(f"{option} '{source}' not found")
    if path.suffix != ".safetensors":
        raise UserError(f"{option} '{source}' must be a .safetensors file: other formats are never unpickled")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            shapes = {k: f.get_slice(k).get_shape() for k in keys if k.endswith(LORA_ENDS)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise unreadable_file(path, exc) from None  # read_safetensors' one line
    prefixes = {key.split(".", 1)[0] for key in keys}
    if not keys or not prefixes <= {"unet", "transformer"} or len(prefixes) != 1:
        # Text-encoder LoRAs and kohya's layout (lora_unet_*) are not what export-lora writes: refused, not half-read.
        found = ", ".join(sorted(prefixes)[:3]) or "no tensors"
        raise UserError(
            f"{option} '{source}' is not a LoRA in diffusers' format for one denoiser "
            f"(keys 'unet.*' or 'transformer.*'; found {found})"
        )
    (denoiser,) = prefixes
    distilled = EXPORT_REPORT in metadata or SHIFT_METADATA in metadata
    modules = sorted({k[len(denoiser) + 1 : -len(end)] for k in keys for end in LORA_ENDS if k.endswith(end)})
    for module in modules:
        problem = _pair_problem(*(shapes.get(f"{denoiser}.{module}{end}") for end in LORA_ENDS))
        if problem:  # diffusers would fail deep inside PEFT (an IndexError for a lone lora_A)
            raise UserError(f"{option} '{source}': module {module}: {problem}")
    sigmas = flow_file_sigmas(path) if distilled else {}
    return LoraFile(path, denoiser, distilled, shift=unet_file_shift(path), sigmas=sigmas, modules=modules)


def _pair_problem(down: list[int] | None, up: list[int] | None) -> str | None:
    """What is wrong with one module's lora_A (rank x in, or a conv's rank x in x k x k) and lora_B
    (out x rank, or out x rank x 1 x 1) shapes; None when they make a LoRA."""
    if down is None or up is None:
        return "lora_A without its lora_B" if up is None else "lora_B without its lora_A"
    if len(down) not in (2, 4) or len(up) != len(down):
        return f"lora_A of shape {list(down)} and lora_B of shape {list(up)} are not a linear or conv LoRA"
    if down[0] != up[1] or down[0] < 1:
        return f"lora_A's rank {down[0]} and lora_B's {up[1]} differ"
    return None


def check_lora_option(lora: str | Path | None, unet: str | Path | None) -> LoraFile | None:
    """`--lora` read and checked, with `--unet`, before any model is looked for or fetched."""
    adapter = read_lora_file(lora) if lora is not None else None
    if adapter is not None and unet is not None:
        raise UserError("--lora and --unet both replace the model's weights: give one")
    return adapter


def apply_lora(pipe: DiffusionPipeline, lora: LoraFile, where: str) -> None:
    """Fuse `lora` into `pipe`'s denoiser: its weights become the LoRA'd ones, with no adapter left."""
    own = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    if lora.denoiser != own:
        raise UserError(f"--lora '{lora.path}' is for a {lora.denoiser}, and '{where}' has a {own}")
    # diffusers only logs a LoRA's modules the model lacks, and fuses the rest: a LoRA of another
    # architecture (SDXL's on a pruned SDXL) would be half applied without a word.
    network = getattr(pipe, own)
    absent = [m for m in lora.modules if not _has_module(network, m)]
    if absent:
        raise UserError(
            f"--lora '{lora.path}' changes {len(absent)} of its {len(lora.modules)} modules that '{where}''s {own} "
            f"does not have, first: {absent[0]} (a LoRA of another architecture)"
        )
    try:
        # diffusers warns of every text encoder the LoRA leaves alone, and logs a failure at length
        # before raising it: said here in one line.
        with quiet_loading(errors_too=True):
            pipe.load_lora_weights(
                str(lora.path.parent), weight_name=lora.path.name, use_safetensors=True, local_files_only=True
            )
            pipe.fuse_lora()
            pipe.unload_lora_weights()  # fused: the weights keep the LoRA, the adapter layers go
    except (ValueError, KeyError, RuntimeError, IndexError, TypeError) as exc:
        raise UserError(f"--lora '{lora.path}' does not fit '{where}': {_detail(exc)}") from None


def _detail(exc: Exception) -> str:
    """The line of a loading error that says what is wrong: torch's load_state_dict opens with a
    heading ("Error(s) in loading state_dict for ...:") and names the mismatch below it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "size mismatch" in line or "Missing key" in line or "Unexpected key" in line]
    return (named or lines or [type(exc).__name__])[0]


def _has_module(network: torch.nn.Module, name: str) -> bool:
    try:
        network.get_submodule(name)
    except AttributeError:
        return False
    return True
