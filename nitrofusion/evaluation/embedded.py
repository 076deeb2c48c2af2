"""Score a pipeline on the embedded world: prompted-class accuracy and domain FD.

Prompts are balanced over the ten classes and the templates; image i uses seed + i, so a
row of the table is reproducible and comparable between models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from nitrofusion.evaluation.fid import to_tensor
from nitrofusion.pipelines.generation import generate, sampler_of
from nitrofusion.world import data
from nitrofusion.world.evaluator import Evaluator


@dataclass
class EmbeddedScore:
    model: str
    sampler: str
    steps: int
    guidance_scale: float
    n: int
    class_accuracy: float
    domain_fd: float
    seconds_per_image: float


def score_pipeline(
    pipe: DiffusionPipeline,
    evaluator: Evaluator,
    steps: int,
    n: int = 2000,
    seed: int = 0,
    guidance_scale: float | None = None,
    batch_size: int = 250,
    label: str = "",
) -> tuple[EmbeddedScore, list[Image.Image]]:
    import time

    pairs = data.evaluation_prompts(n, seed)
    t0 = time.perf_counter()
    results = generate(
        pipe, [p for p, _ in pairs], steps=steps, seed=seed, batch_size=batch_size, guidance_scale=guidance_scale
    )
    elapsed = time.perf_counter() - t0
    images = [r.image for r in results]
    metrics = evaluator.score(to_tensor(images), torch.tensor([c for _, c in pairs]))
    score = EmbeddedScore(
        model=label or str(getattr(pipe, "nitro_model", "")),
        sampler=sampler_of(pipe),
        steps=steps,
        guidance_scale=float(results[0].metadata["guidance_scale"]),
        n=n,
        class_accuracy=metrics["class_accuracy"],
        domain_fd=metrics["domain_fd"],
        seconds_per_image=elapsed / n,
    )
    return score, images
