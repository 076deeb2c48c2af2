"""Carry a distilled student onto another fine-tune of the same base model.

    θ_new = θ_target + α · (θ_student − θ_base)

The distillation delta is added to the target fine-tune (the paper's result: a NitroFusion
student of SDXL moved onto anime and oil-painting fine-tunes of SDXL). Arithmetic is done in
float32, one tensor at a time from memory-mapped inputs, and each result tensor is written as it
is made, so RAM holds a few tensors, not three UNets and a result (SDXL: 25-35 GB before);
the result is stored in `dtype` ("auto": the dtype the target's weights are stored in).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nitrofusion.errors import UserError
from nitrofusion.pipelines.loading import (
    DTYPES,
    flow_file_sigmas,
    recorded_sigmas,
    resolve_model,
    unet_file_metadata,
    unet_file_shift,
)
from nitrofusion.weights.io import (
    SD3_KEY,
    check_not_an_input,
    check_same_layout,
    unet_state_dict,
    write_safetensors_streaming,
)
from nitrofusion.weights.provenance import check_teacher, recorded_teacher_samples


def moved(
    base: torch.Tensor, student: torch.Tensor, target: torch.Tensor, scale: float, dtype: torch.dtype | None
) -> torch.Tensor:
    """One tensor of θ_target + scale · (θ_student − θ_base), summed in fp32 and rounded once."""
    if not target.is_floating_point():
        return target.clone()
    delta = student.float() - base.float()
    # Out of place: .float() of an fp32 tensor is that tensor, the caller's (or a mapped file's).
    result = (target.float() + delta * scale).to(dtype or target.dtype)
    if not bool(torch.isfinite(result).all()):  # a huge --scale: inf or NaN weights, a black student
        raise UserError(f"--scale {scale:g} takes weights past the range of {dtype or target.dtype}: use a smaller one")
    return result


def transfer_delta(
    base: dict[str, torch.Tensor],
    student: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    check_layouts(base, student, target)
    return {k: moved(base[k], student[k], t, scale, dtype) for k, t in target.items()}


def check_layouts(
    base: dict[str, torch.Tensor], student: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> None:
    check_same_layout(student, base, ("the student", "the base"))
    check_same_layout(target, base, ("the target", "the base"))


def recorded_shift(student: str | Path) -> int | None:
    """The timestep shift a student samples at, where its source records one: a student file's
    header (`distill` writes it), or the TimestepShiftLCMScheduler of the pipeline the student is
    (or whose `unet/` folder it is); the public NitroSD files, which record none, by their
    published names. None otherwise."""
    path = Path(student).expanduser()
    if path.is_file():
        return unet_file_shift(path)
    if (path / "config.json").is_file():  # a unet/ folder: its pipeline's scheduler, if it has one
        path = path.parent
    elif not (path / "model_index.json").is_file():
        try:
            path = resolve_model(student, option="--student")  # a hub id in the local cache
        except UserError:
            return None
    try:
        config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("shifted_timestep") if isinstance(config, dict) else None
    recorded = isinstance(config, dict) and config.get("_class_name") == "TimestepShiftLCMScheduler"
    return value if recorded and isinstance(value, int) and not isinstance(value, bool) else None


def recorded_flow_sigmas(student: str | Path) -> dict[int, list[float]]:
    """A flow student's levels per step count, where its source records them: a student file's
    header, or the nitrofusion.json of the pipeline it is (or whose `transformer/` folder it is)."""
    path = Path(student).expanduser()
    if path.is_file():
        return flow_file_sigmas(path)
    if (path / "config.json").is_file():  # a transformer/ folder: its pipeline's record
        path = path.parent
    return recorded_sigmas(path) if (path / "model_index.json").is_file() else {}


def transfer(
    base: str,
    student: str,
    target: str,
    out: str | Path,
    scale: float = 1.0,
    dtype: str = "auto",
    shift: int | None = None,
    other_base: bool = False,
) -> Path:
    """`shift`: the timestep shift recorded in the result (default: the student's, where recorded).
    `other_base`: a base that is not the teacher the student's file records is meant (else refused)."""
    # Checked before three UNets are read (minutes and tens of GB at SDXL size).
    if Path(out).suffix != ".safetensors":
        raise UserError(f"--out '{out}' must end in .safetensors: generate --unet reads only safetensors files")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype must be auto, fp32, fp16 or bf16; got {dtype}")
    if not (math.isfinite(scale) and abs(scale) <= 1000):  # a multiplier of the delta; in use about 0-2
        raise UserError(f"--scale must be a finite number in -1000..1000, got {scale}")
    if shift is not None and not 1 <= shift <= 1000:
        raise UserError(f"--shift must be a timestep in 1..1000, got {shift}")
    check_not_an_input(out, {"--base": base, "--student": student, "--target": target})
    b, s, t = (
        unet_state_dict(src, what) for src, what in ((base, "--base"), (student, "--student"), (target, "--target"))
    )
    if SD3_KEY in s:  # a file: a folder or pipeline was read as a UNet already
        raise UserError(
            f"--student '{student}' is an SD3 transformer: transfer moves UNet students; for an SD3 student, "
            "export-lora --student STUDENT --teacher ITS_TEACHER, then generate --model OTHER_BASE --lora FILE"
        )
    check_layouts(b, s, t)
    if not other_base:
        check_teacher(recorded_teacher_samples(student), b, f"--base '{base}'")
    cast = None if dtype == "auto" else DTYPES[dtype]
    # Inputs are memory-mapped and the result is written as it is made: RAM holds a few tensors.
    layout = [(k, (cast or v.dtype) if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in t.items()]
    tensors = (moved(b[k], s[k], t[k], scale, cast) for k in tqdm(t, desc="transfer"))
    # The moved student samples at the student's shift: recorded in the result, as distill records it.
    shift = recorded_shift(student) if shift is None else shift
    return write_safetensors_streaming(out, layout, tensors, metadata=unet_file_metadata(shift))
