"""Carry a distilled student onto another fine-tune of the same base model.

    θ_new = θ_target + α · (θ_student − θ_base)

The distillation delta is added to the target fine-tune (the paper's result: a NitroFusion
student of SDXL moved onto anime and oil-painting fine-tunes of SDXL). Arithmetic is done in
float32, one tensor at a time on memory-mapped inputs, so RAM holds little more than the result;
the result is stored in `dtype` ("auto": the dtype the target's weights are stored in).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from nitrofusion.errors import UserError
from nitrofusion.pipelines.loading import DTYPES, save_state_dict, unet_file_metadata, unet_file_shift
from nitrofusion.weights.io import check_same_layout, unet_state_dict


def transfer_delta(
    base: dict[str, torch.Tensor],
    student: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    check_same_layout(student, base, ("the student", "the base"))
    check_same_layout(target, base, ("the target", "the base"))
    out = {}
    for k, t in tqdm(target.items(), total=len(target), desc="transfer"):
        delta = student[k].float() - base[k].float()
        out[k] = (t.float() + scale * delta).to(dtype or t.dtype) if t.is_floating_point() else t.clone()
    return out


def transfer(base: str, student: str, target: str, out: str | Path, scale: float = 1.0, dtype: str = "auto") -> Path:
    # Checked before three UNets are read (minutes and tens of GB at SDXL size).
    if Path(out).suffix != ".safetensors":
        raise UserError(f"--out '{out}' must end in .safetensors: generate --unet reads only safetensors files")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype must be auto, fp32, fp16 or bf16; got {dtype}")
    new = transfer_delta(
        unet_state_dict(base, "--base"),
        unet_state_dict(student, "--student"),
        unet_state_dict(target, "--target"),
        scale,
        None if dtype == "auto" else DTYPES[dtype],
    )
    # The moved student samples at the student's shift: keep it where the student file recorded it.
    shift = unet_file_shift(student) if Path(student).suffix == ".safetensors" else None
    return save_state_dict(new, out, metadata=unet_file_metadata(shift))
