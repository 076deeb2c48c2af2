"""Which model a student was distilled from, recorded in its file's header.

A delta taken against another base than the student's teacher carries the difference between
the two bases into its result, and nothing in the arithmetic says so: `transfer` with --base and
--target swapped, or SDXL base named for a student of a fine-tune, writes a student that samples
wrongly. So `distill` writes a few of its teacher's weights into the student's file (16 evenly
spaced values of each of 8 tensors spread over the state dict), and `transfer` and `export-lora`
compare their --base or --teacher with them.

Values rather than a digest: the same weights stored in fp16, bf16 or fp32 agree to bf16's
precision, where a digest of them would differ; another fine-tune differs by far more.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nitrofusion.errors import UserError

TEACHER_SAMPLES = "nitrofusion.teacher_samples"  # the safetensors header key
TENSORS, VALUES = 8, 16
# bf16 rounds a weight by at most 2**-9 of it (fp16 2**-12): twice that and more is another model.
# The absolute part covers fp16's subnormals (below 6e-5, rounded to 6e-8).
RELATIVE, ABSOLUTE = 2**-7, 1e-6


def _positions(numel: int) -> torch.Tensor:
    return torch.arange(VALUES) * (numel - 1) // (VALUES - 1)


def weight_samples(state: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """VALUES evenly spaced values of each of TENSORS weight matrices spread over `state`'s names."""
    names = [k for k in sorted(state) if state[k].is_floating_point() and state[k].ndim >= 2]
    if len(names) > TENSORS:
        names = [names[i * (len(names) - 1) // (TENSORS - 1)] for i in range(TENSORS)]
    samples = {}
    for name in names:
        flat = state[name].detach().reshape(-1)
        samples[name] = flat[_positions(flat.numel()).to(flat.device)].float().cpu().tolist()
    return samples


def teacher_samples_metadata(samples: Mapping[str, list[float]]) -> dict[str, str]:
    """The header entry that records a student's teacher."""
    return {TEACHER_SAMPLES: json.dumps(samples)}


def recorded_teacher_samples(path: str | Path) -> dict[str, list[float]] | None:
    """A student file's record of its teacher (None: a folder, or a file that records none, such as
    the public NitroSD files and students written before it was recorded)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get(TEACHER_SAMPLES)
        recorded = json.loads(value) if value is not None else None
    except (SafetensorError, OSError, ValueError):
        return None  # reading the weights says what is wrong with the file

    def numbers(values: object) -> bool:
        return isinstance(values, list) and len(values) == VALUES and all(type(v) in (int, float) for v in values)

    if not isinstance(recorded, dict) or not all(numbers(v) for v in recorded.values()):
        return None  # not a record this package wrote: nothing to check against
    return recorded


def check_teacher(recorded: Mapping[str, list[float]] | None, state: Mapping[str, torch.Tensor], named: str) -> None:
    """Refuse `state` (what `named` says, e.g. "--base 'sdxl'") as the student's teacher where the
    student records its teacher's weights and these differ from them beyond any storage precision."""
    if not recorded:
        return
    worst, beyond = 0.0, False
    for name, values in recorded.items():
        if name not in state:  # the layouts are compared elsewhere, with their own message
            continue
        flat = state[name].detach().reshape(-1)
        if flat.numel() < 2:
            continue
        got = flat[_positions(flat.numel()).to(flat.device)].float().cpu()
        want = torch.tensor(values, dtype=torch.float32)
        gap = (got - want).abs()
        beyond |= bool((gap > RELATIVE * want.abs() + ABSOLUTE).any())
        worst = max(worst, float((gap / want.abs().clamp_min(ABSOLUTE)).max()))
    if beyond:
        raise UserError(
            f"{named} is not the model the student was distilled from: its weights differ from those the "
            f"student's file records of its teacher (by up to {worst:.0%} of a weight), and a delta taken "
            "against another base carries the difference between the two into the result: name the "
            "student's teacher there (was it swapped with another option?), or pass --other-base where "
            "another is meant (e.g. SDXL base under a student of DMD2's SDXL)"
        )
