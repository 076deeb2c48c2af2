"""FID with a choice of feature extractor, and reference statistics from images or a file.

Features: `inception` (the FID network, weights from --inception), `clip` (CLIP image
embeddings, "CLIP-FID"), `embedded` (the embedded world's evaluator: its domain FD).
Generated and reference images go through the same resize (PIL bicubic to the extractor's
input size), because FID moves with the resampling filter; compare only like with like.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nitrofusion.errors import UserError
from nitrofusion.evaluation.frechet import GaussianStats

if TYPE_CHECKING:
    from nitrofusion.evaluation.clip import ClipModel
    from nitrofusion.world.evaluator import Evaluator

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
Extractor = Callable[[list[Image.Image]], torch.Tensor]


def to_tensor(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> float [N, 3, H, W] in [-1, 1], resized (bicubic) to size x size if given."""
    if size is not None:
        images = [im.convert("RGB").resize((size, size), Image.BICUBIC) for im in images]
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def inception_extractor(path: str | Path, device: str = "cpu", batch_size: int = 50) -> Extractor:
    from nitrofusion.evaluation.inception import load_fid_inception

    net = load_fid_inception(path).to(device)

    @torch.no_grad()
    def extract(images: list[Image.Image]) -> torch.Tensor:
        out = [
            net(to_tensor(images[i : i + batch_size], 299).to(device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out)

    return extract


def clip_extractor(clip: ClipModel) -> Extractor:
    return clip.image_embeddings


def embedded_extractor(evaluator: Evaluator) -> Extractor:
    def extract(images: list[Image.Image]) -> torch.Tensor:
        return evaluator.features_and_logits(to_tensor(images))[0]

    return extract


def list_images(directory: str | Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def reference_stats(
    reference: str | Path, features: str, extract: Extractor, cache: Path | None = None
) -> GaussianStats:
    """Statistics of the reference set: a `.safetensors` stats file written by this function,
    or a directory of images (whose statistics are then saved to `cache` for next time)."""
    ref = Path(reference).expanduser()
    if ref.is_file():
        if ref.suffix != ".safetensors":
            raise UserError(f"--reference '{ref}' must be a directory of images or a .safetensors stats file")
        from safetensors import safe_open

        with safe_open(str(ref), "pt") as f:
            made_with = (f.metadata() or {}).get("features")
        if made_with != features:
            raise UserError(f"--reference '{ref}' holds {made_with} statistics, but FID here uses {features} features")
        return GaussianStats.from_tensors(load_file(str(ref)))
    if not ref.is_dir():
        raise UserError(f"--reference '{ref}' not found (a directory of real images or a stats .safetensors)")
    paths = list_images(ref)
    if len(paths) < 2:
        raise UserError(f"--reference '{ref}' holds {len(paths)} images; FID needs many (thousands for a stable value)")
    feats = []
    for i in range(0, len(paths), 500):
        feats.append(extract([Image.open(p).convert("RGB") for p in paths[i : i + 500]]))
    stats = GaussianStats.from_features(torch.cat(feats))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in stats.to_tensors().items()}, str(cache), metadata={"features": features}
        )
    return stats
