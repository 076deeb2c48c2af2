"""What several test files share: the tiny distillation config and parameter snapshots."""

import torch

from nitrofusion.training.config import DistillConfig, load_config


def config(tiny_sdxl_dir, out, *overrides: str) -> DistillConfig:
    """A distillation of the tiny SDXL pipeline small enough for a step in well under a second."""
    base = [
        f"model.teacher={tiny_sdxl_dir}",
        "data.teacher_steps=1",
        "data.batch_size=2",
        "discriminator.width=4",
        "discriminator.candidates=2",
        "dmd.classifier_width=8",
        "pretrain.pixel_width=8",
        "refine.steps_per_stage=[2]",
        f"run.output_dir={out}",
        "run.validate_every=0",
        "run.checkpoint_every=1000",
    ]
    return load_config(None, None, base + list(overrides))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def moved(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())
