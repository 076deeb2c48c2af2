"""What distillation buys on a CPU: images per second of the embedded student at 1, 2 and 4
steps against the embedded teacher at 25 (its own sampler, CFG 5), and the trainer's
iterations per second in each phase of NitroFusion and of the family (DMD2, ADM, DMDX's
pre-training) on the embedded presets. All in one process and one run, so the ratios compare
like with like. Prints a markdown table and writes JSON.

    python benchmarks/cpu_throughput.py [--n 500] [--batch 100] [--iterations 20] [--out runs/cpu_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path


def sampling(n: int, batch: int) -> list[dict]:
    from nitrofusion.pipelines import generate, load_pipeline
    from nitrofusion.world import data
    from nitrofusion.world.spec import choose_model

    prompts = [p for p, _ in data.evaluation_prompts(n, 0)]
    student = choose_model(None, None, None)
    settings = [
        ("teacher (Euler, CFG 5)", load_pipeline(student.model, sampler="native"), 25),
        *[
            ("student (shift-LCM)", load_pipeline(student.model, unet=student.unet, shift=student.shift), k)
            for k in (1, 2, 4)
        ],
    ]
    rows = []
    for label, pipe, steps in settings:
        generate(pipe, prompts[:batch], steps=steps, batch_size=batch, progress=False)  # warm-up
        t0 = time.perf_counter()
        generate(pipe, prompts, steps=steps, batch_size=batch, progress=False)
        seconds = time.perf_counter() - t0
        rows.append({"what": f"{label}, {steps} step(s)", "per_second": n / seconds, "unit": "images"})
    base = rows[0]["per_second"]
    for r in rows:
        r["ratio"] = r["per_second"] / base
    return rows


def training(iterations: int, pairs: str | None) -> list[dict]:
    from nitrofusion.training.config import load_config
    from nitrofusion.training.distill import Distiller

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = pairs or str(Path(tmp) / "pairs")
        # (preset, overrides): the NitroFusion phases, then the family's main stages (DMD2 and ADM
        # step their critics every iteration and the student every 5th: `iterations` a multiple of 5
        # gives their mean) and DMDX's adversarial pre-training.
        phases = {
            "regression pre-training": ("embedded", ["loss.pretrain_steps=1000"]),
            "adversarial, 1 step": ("embedded", ["loss.pretrain_steps=0"]),
            "adversarial, 4 steps (refinement)": (
                "embedded",
                ["loss.pretrain_steps=0", "refine.steps_per_stage=[0,0,0,1000]"],
            ),
            "DMD2, 1 step": ("dmd2-embedded", ["loss.pretrain_steps=0"]),
            "ADM, 1 step": ("dmdx-embedded", ["loss.pretrain_steps=0"]),
            "DMDX adversarial pre-training": ("dmdx-embedded", ["loss.pretrain_steps=1000"]),
        }
        for name, (preset, overrides) in phases.items():
            with warnings.catch_warnings():  # the ADM row leaves dmdx's pre-training keys unread, as meant
                warnings.filterwarnings("ignore", message="config keys .* are not read by this run")
                cfg = load_config(
                    preset,
                    None,
                    [
                        *overrides,
                        f"data.pairs={pairs}",
                        "data.num_pairs=256",
                        f"run.output_dir={tmp}/run",
                        "run.validate_every=0",
                    ],
                )
            d = Distiller(cfg, progress=False)
            d.train_step()  # warm-up
            t0 = time.perf_counter()
            for _ in range(iterations):
                d.train_step()
                d.step += 1
            rows.append(
                {
                    "what": f"trainer, {name}",
                    "per_second": iterations / (time.perf_counter() - t0),
                    "unit": "iterations (batch 16)",
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="images per sampling setting")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--iterations",
        type=int,
        default=20,
        help="timed trainer iterations per phase (a multiple of 5: DMD2, ADM step the student every 5th)",
    )
    parser.add_argument("--pairs", help="existing make-pairs directory (default: 256 pairs made in a temp dir)")
    parser.add_argument("--out", default="runs/cpu_throughput.json")
    args = parser.parse_args()
    import torch

    rows = sampling(args.n, args.batch) + training(args.iterations, args.pairs)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| what | per second | vs teacher 25 steps |")
    print("| --- | ---: | ---: |")
    for r in rows:
        ratio = f"×{r['ratio']:.1f}" if "ratio" in r else ""
        print(f"| {r['what']} | {r['per_second']:.2f} {r['unit']} | {ratio} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
