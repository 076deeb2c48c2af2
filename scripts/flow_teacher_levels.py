"""The embedded flow teacher at few steps, at its scheduler's own levels and at trailing ones.

FlowMatchEulerDiscreteScheduler spaces k levels from sigma 1 down to 1/1000, so the teacher's
2-step sample is its 1-step one and its 4-step sample has three steps that do anything. The
trailing levels a flow student trains at (1, (k-1)/k, ..., 1/k; training/flow_student.py) are
what the same teacher gives when its few steps are spaced to be used. Scored as `evaluate`
scores (the shipped evaluator, the embedded prompts, seed 0, CFG 5):

    python scripts/flow_teacher_levels.py --n 500 --out runs/flow_teacher_levels.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nitrofusion.evaluation.embedded import score_pipeline
from nitrofusion.pipelines import load_pipeline
from nitrofusion.training.flow_student import trailing_sigmas
from nitrofusion.world.evaluator import Evaluator
from nitrofusion.world.spec import evaluator_path, flow_teacher_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--out", default="runs/flow_teacher_levels.json")
    args = p.parse_args()
    evaluator = Evaluator.load(evaluator_path())
    pipe = load_pipeline(flow_teacher_path(), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for levels in ("stock", "trailing"):
        # What `generate` passes as the pipeline's `sigmas`; none: the scheduler's own spacing.
        pipe.nitro_sigmas = {k: trailing_sigmas(k) for k in args.steps} if levels == "trailing" else {}
        for steps in args.steps:
            score, _ = score_pipeline(pipe, evaluator, steps, n=args.n, seed=0, label=f"flow teacher, {levels}")
            pipe.scheduler.set_timesteps(steps, sigmas=pipe.nitro_sigmas.get(steps))
            row = {
                "levels": levels,
                "steps": steps,
                "sigmas": [round(s, 4) for s in pipe.scheduler.sigmas.tolist()[:steps]],
                "class_accuracy": score.class_accuracy,
                "domain_fd": score.domain_fd,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    about = {"n": args.n, "guidance_scale": pipe.nitro_guidance, "rows": rows}  # its folder's recorded CFG
    Path(args.out).write_text(json.dumps(about, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
