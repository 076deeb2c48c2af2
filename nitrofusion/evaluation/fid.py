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
from nitrofusion.userfiles import replacing

if TYPE_CHECKING:
    from nitrofusion.evaluation.clip import ClipModel
    from nitrofusion.world.evaluator import Evaluator

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
Extractor = Callable[[list[Image.Image]], torch.Tensor]


def center_square(im: Image.Image) -> Image.Image:
    """The largest centred square: a non-square photo (COCO's references) is cropped, not squashed."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im if w == h else im.crop((left, top, left + side, top + side))


def to_tensor(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> float [N, 3, H, W] in [-1, 1]; if `size` is given, centre-cropped to a square and
    resized to size x size with PIL's bicubic filter on the 8-bit image (clean-fid resizes each
    channel as floats with PIL bicubic, pytorch-fid bilinearly in torch: FID compares only with
    FIDs computed the same way, docs/evaluate.md)."""
    if size is not None:
        images = [center_square(im.convert("RGB")).resize((size, size), Image.BICUBIC) for im in images]
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


def stats_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"'{path}' is not a readable safetensors file (corrupt or truncated?): {exc}") from None


def cached_reference_stats(cache: Path, reference: str | Path, extractor: str) -> GaussianStats | None:
    """Statistics that `reference_stats` saved to `cache` in an earlier run, if they were computed
    from the same reference directory with the same feature network (both recorded in the file);
    None otherwise, and they are computed again."""
    if not cache.is_file() or not Path(reference).is_dir():
        return None
    meta = stats_metadata(cache)
    if meta.get("source") != str(Path(reference).resolve()) or meta.get("extractor", "") != extractor:
        return None
    return GaussianStats.from_tensors(load_file(str(cache)))


def reference_stats(
    reference: str | Path, features: str, extract: Extractor, cache: Path | None = None, extractor: str = ""
) -> GaussianStats:
    """Statistics of the reference set: a `.safetensors` stats file written by this function,
    or a directory of images (whose statistics are then saved to `cache` for next time).
    `extractor` names the feature network's weights: a stats file made with other weights
    (another Inception or CLIP) is refused, since its features are not these."""
    ref = Path(reference).expanduser()
    if ref.is_file():
        if ref.suffix != ".safetensors":
            raise UserError(f"--reference '{ref}' must be a directory of images or a .safetensors stats file")
        meta = stats_metadata(ref)
        if "features" not in meta:  # e.g. a network's weights, not statistics
            raise UserError(f"--reference '{ref}' is not a statistics file written by evaluate (no features recorded)")
        if meta.get("features") != features:
            raise UserError(
                f"--reference '{ref}' holds {meta.get('features')} statistics, but FID here uses {features} features"
            )
        if extractor and meta.get("extractor") and meta["extractor"] != extractor:
            raise UserError(
                f"--reference '{ref}' holds statistics of the features of '{meta['extractor']}', not of '{extractor}'"
            )
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
        # The provenance in the file itself, written whole or not at all: an interrupted run never
        # leaves statistics that claim another source.
        meta = {"features": features, "source": str(ref.resolve()), "images": str(len(paths)), "extractor": extractor}
        cache.parent.mkdir(parents=True, exist_ok=True)
        with replacing(cache) as tmp:
            save_file({k: v.contiguous() for k, v in stats.to_tensors().items()}, str(tmp), metadata=meta)
    return stats
