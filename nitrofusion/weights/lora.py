"""Export the student − teacher delta as a LoRA that stock diffusers loads.

Each Linear or Conv2d weight delta ΔW (reshaped to out × in·kh·kw) is replaced by its best
rank-r approximation (truncated SVD, Eckart–Young): ΔW ≈ B·A with B = U_r·√S_r and
A = √S_r·V_rᵀ. A conv's A is a conv with the original kernel and B a 1×1 conv, PEFT's layout.
Keys follow the PEFT/diffusers naming (`unet.<module>.lora_A.weight`; `transformer.` for an SD3
student), with lora_alpha = r
so the LoRA scale is 1, and the file's header carries the adapter's config as diffusers writes
it (`lora_adapter_metadata`): a module whose rank is below --rank (its matrix is smaller) keeps
scale 1 in any loader that reads it, not only in those that infer per-module alphas. Deltas of
biases and norm weights cannot be carried by a LoRA; they are counted in the reported error.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nitrofusion.errors import UserError
from nitrofusion.pipelines.loading import DTYPES, flow_file_metadata, save_state_dict, unet_file_metadata
from nitrofusion.userfiles import check_writable_folder
from nitrofusion.weights.io import SD3_KEY, check_not_an_input, check_same_layout, unet_state_dict
from nitrofusion.weights.provenance import check_teacher, recorded_teacher_samples
from nitrofusion.weights.transfer import recorded_flow_sigmas, recorded_shift


@dataclass
class LoraReport:
    rank: int
    modules: int
    parameters: int
    relative_error: float  # ||Δ − LoRA||_F / ||Δ||_F over every UNet tensor
    uncovered_share: float  # share of ||Δ||² in tensors a LoRA cannot hold (biases, norms)

    def line(self) -> str:
        return (
            f"rank {self.rank}: {self.modules} modules, {self.parameters / 1e6:.2f}M parameters, "
            f"relative error {self.relative_error:.4f} (of which biases/norms {math.sqrt(self.uncovered_share):.4f}; "
            "in fp32, before the factors are stored in --dtype)"
        )


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, squared residual) of the best rank-`rank` approximation of a weight delta."""
    out_ch = delta.shape[0]
    m = delta.reshape(out_ch, -1).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = (u[:, :r] * root).float()
    a = (root[:, None] * vh[:r]).float()
    residual = float((s[r:] ** 2).sum())
    if delta.ndim == 4:
        a = a.reshape(r, *delta.shape[1:])
        b = b.reshape(out_ch, r, 1, 1)
    return a, b, residual


def extract_lora(
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    rank: int,
    min_norm: float = 0.0,
    prefix: str = "unet",
) -> tuple[dict[str, torch.Tensor], LoraReport]:
    """`prefix`: the pipeline component the LoRA is for, as diffusers names its keys ("unet", or an
    SD3 pipeline's "transformer")."""
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    check_same_layout(student, teacher, ("the student", "the teacher"))
    lora: dict[str, torch.Tensor] = {}
    total = residual = uncovered = 0.0
    modules = 0
    for key in tqdm(sorted(student), desc=f"LoRA rank {rank}"):
        if not student[key].is_floating_point():
            continue
        delta = student[key].float() - teacher[key].float()
        norm2 = float(delta.double().pow(2).sum())
        total += norm2
        if norm2 <= min_norm**2:
            continue
        if key.endswith(".weight") and delta.ndim in (2, 4):
            a, b, res = low_rank(delta, rank)
            module = key[: -len(".weight")]
            lora[f"{prefix}.{module}.lora_A.weight"] = a
            lora[f"{prefix}.{module}.lora_B.weight"] = b
            residual += res
            modules += 1
        else:
            residual += norm2
            uncovered += norm2
    if not lora:
        raise UserError("the student equals the teacher: there is no delta to export")
    report = LoraReport(
        rank=rank,
        modules=modules,
        parameters=sum(v.numel() for v in lora.values()),
        relative_error=math.sqrt(residual / total) if total else 0.0,
        uncovered_share=uncovered / total if total else 0.0,
    )
    return lora, report


ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' safetensors header key for a LoRA's config


def adapter_config(lora: dict[str, torch.Tensor], prefix: str = "unet") -> dict:
    """The PEFT LoraConfig of an exported LoRA: the commonest rank as r, the others by module in
    rank_pattern, and alpha equal to rank everywhere (scale 1)."""
    ranks = {
        k[len(prefix) + 1 : -len(".lora_A.weight")]: v.shape[0] for k, v in lora.items() if k.endswith("lora_A.weight")
    }
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {module: rank for module, rank in sorted(ranks.items()) if rank != r}
    return {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": others,
        "alpha_pattern": others,
        "target_modules": sorted(ranks),
        "use_dora": False,
        "lora_bias": False,
    }


def export_lora(
    student: str,
    teacher: str,
    out: str | Path,
    rank: int = 64,
    dtype: str = "fp16",
    shift: int | None = None,
    other_base: bool = False,
) -> LoraReport:
    """`shift`: the timestep shift recorded in the file (default: the student's, where recorded). The
    LoRA makes the teacher the student, which samples with TimestepShiftLCMScheduler at that shift:
    loaded beside the teacher's own multi-step scheduler, it is not the student. An SD3 student
    (a flow transformer) gives a LoRA of the pipeline's `transformer`, with no shift: it samples
    with the teacher's own scheduler, in 1-4 steps without CFG, called with the `sigmas` the
    student file records (copied into the LoRA's header as `nitrofusion.sigmas`)."""
    if rank < 1:  # said before two UNets are read and their deltas decomposed
        raise UserError(f"--rank must be at least 1, got {rank}")
    if shift is not None and not 1 <= shift <= 1000:
        raise UserError(f"--shift must be a timestep in 1..1000, got {shift}")
    out = Path(out)
    if out.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt", ".pkl") and not out.is_dir():  # it became a folder
        raise UserError(
            f"--out '{out}' names a {out.suffix} file: a LoRA is written as safetensors (a file or a folder)"
        )
    if out.suffix.lower() == ".safetensors" and out.suffix != ".safetensors" and not out.is_dir():
        # diffusers reads a LoRA file as safetensors by its lower-case suffix only (and --lora refuses another)
        raise UserError(f"--out '{out}': name the file with a lower-case .safetensors suffix")
    if out.suffix.lower() != ".safetensors":
        out = out / "pytorch_lora_weights.safetensors"  # the file name diffusers looks for in a folder
    check_not_an_input(out, {"--student": student, "--teacher": teacher})
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder: name a .safetensors file or a folder to write into")
    check_writable_folder(out.parent, "--out")  # before the SVDs (minutes at SDXL size)
    student_state = unet_state_dict(student, "--student", component=None)
    flow = SD3_KEY in student_state  # an SD3 transformer (distill's student_transformer.safetensors)
    if not flow and "conv_in.weight" not in student_state:
        raise UserError(
            f"--student '{student}' is neither a UNet's state dict (no conv_in.weight) nor an SD3 transformer's"
        )
    if flow and shift is not None:
        raise UserError("--shift is for UNet students: an SD3 student samples with its pipeline's own scheduler")
    prefix = "transformer" if flow else "unet"
    teacher_state = unet_state_dict(teacher, "--teacher", prefix)
    if not other_base:
        check_teacher(recorded_teacher_samples(student), teacher_state, f"--teacher '{teacher}'")
    lora, report = extract_lora(student_state, teacher_state, rank, prefix=prefix)
    cast = DTYPES[dtype]
    config = {f"{prefix}.{k}": v for k, v in adapter_config(lora, prefix).items()}  # diffusers' per-component prefix
    if shift is None and not flow:  # a flow student has none to record
        shift = recorded_shift(student)
    sigmas = recorded_flow_sigmas(student) if flow else {}
    if flow and not sigmas:
        warnings.warn(
            f"--student '{student}' records no noise levels (a run at model.flow_levels=stock, or a file "
            "written elsewhere): the LoRA records none, and the LoRA'd teacher samples at its scheduler's own",
            stacklevel=2,
        )
    # How the LoRA'd teacher samples as the student: at the student's shift, or a flow student's sigmas.
    metadata = {
        **(flow_file_metadata(sigmas) if flow else unet_file_metadata(shift)),
        ADAPTER_METADATA: json.dumps(config, sort_keys=True),
        "nitrofusion": json.dumps(vars(report)),
    }
    save_state_dict({k: v.to(cast) for k, v in lora.items()}, out, metadata=metadata)
    return report
