"""Copy a distill run's EMA student into the package as the embedded default model.

    python scripts/ship_student.py runs/distill-embedded

Writes nitrofusion/world/assets/student/{unet/, scheduler/, nitrofusion.json}: the UNet in
fp16 (as the teacher is shipped) and the shift-LCM scheduler config, which together with the
teacher's text encoders and VAE form the student pipeline, NitroSD-style.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from nitrofusion.pipelines.loading import load_unet_weights
from nitrofusion.scheduling import TimestepShiftLCMScheduler
from nitrofusion.training.config import load_config
from nitrofusion.world.spec import student_path, teacher_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished distill run directory (student_unet.safetensors, config.yaml)")
    args = parser.parse_args()
    run = Path(args.run)
    cfg = load_config(None, run / "config.yaml", [])
    if cfg.model.teacher != "embedded":
        raise SystemExit(f"{run} did not distil the embedded teacher")
    # fp16 like the shipped teacher; loading copies the fp32 EMA weights into it.
    unet = UNet2DConditionModel.from_pretrained(str(teacher_path() / "unet"), torch_dtype=torch.float16)
    load_unet_weights(unet, run / "student_unet.safetensors")
    scheduler_config = json.loads((teacher_path() / "scheduler" / "scheduler_config.json").read_text())
    scheduler = TimestepShiftLCMScheduler.from_base_config(
        scheduler_config, shifted_timestep=cfg.model.shift, original_inference_steps=4
    )
    out = student_path()
    tmp = out.with_name(".student.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
    scheduler.save_pretrained(str(tmp / "scheduler"))
    provenance = {
        "teacher": "embedded",
        "shift": cfg.model.shift,
        "iterations": cfg.total_steps,
        "seed": cfg.run.seed,
        "config": cfg.to_dict(),
        "made_by": f"nitrofusion distill (run {run.name}), then scripts/ship_student.py",
    }
    (tmp / "nitrofusion.json").write_text(json.dumps(provenance, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(out)


if __name__ == "__main__":
    main()
