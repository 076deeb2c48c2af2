"""Read a UNet state dict from a safetensors file, a `unet/` folder or a pipeline directory."""

from __future__ import annotations

from pathlib import Path

import torch

from nitrofusion.errors import UserError
from nitrofusion.pipelines.loading import (
    layout_problems,
    quiet_loading,
    read_safetensors,
    resolve_model,
    weights_variant,
)


def unet_state_dict(source: str | Path, what: str) -> dict[str, torch.Tensor]:
    """`source`: a .safetensors state dict, a diffusers UNet folder, or a pipeline directory
    (or hub id in the local cache) whose `unet/` is read (sharded and fp16 variants included)."""
    path = Path(source).expanduser()
    if path.is_file() or path.suffix == ".safetensors":
        return read_safetensors(path)
    from diffusers import UNet2DConditionModel

    folder = path if (path / "config.json").is_file() else resolve_model(source) / "unet"
    if not (folder / "config.json").is_file():
        raise UserError(f"{what} '{source}' is neither a .safetensors file nor a pipeline with a unet/ folder")
    try:
        with quiet_loading():
            unet = UNet2DConditionModel.from_pretrained(
                str(folder), use_safetensors=True, local_files_only=True, variant=weights_variant(folder)
            )
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read the UNet of {what} '{source}': {first}") from None
    return unet.state_dict()


def check_same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: tuple[str, str]) -> None:
    """One line naming the first keys or shapes on which two state dicts disagree."""
    problems = layout_problems(a, b, names)
    if problems:
        raise UserError(f"{names[0]} and {names[1]} are not the same architecture: " + "; ".join(problems))
