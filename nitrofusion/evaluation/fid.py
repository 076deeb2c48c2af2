"""FID with a choice of feature extractor, and reference statistics from images or a file.

Features: `inception` (the FID network, weights from --inception), `clip` (CLIP image
embeddings, "CLIP-FID"), `embedded` (the embedded world's evaluator: its domain FD).
Generated and reference images go through the same resize (PIL bicubic to the extractor's
input size), because FID moves with the resampling filter; compare only like with like.
"""

from __future__ import annotations

import hashlib
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


# How each feature set prepares an image before the network (see to_tensor and the extractors);
# recorded with reference statistics, since FID moves with the resize: change the text with the code.
PREPROCESS = {
    "inception": "centre square, PIL bicubic to 299x299 on 8-bit RGB, [-1, 1]",
    "clip": "the CLIP directory's image processor",
    "embedded": "RGB [-1, 1], grey mean, bilinear antialiased to 32x32",
}
# What in a transformers directory decides its image features (weights, config, image processor);
# a hub download's other formats (.bin, .h5, .msgpack: GBs each) are never read here.
_DIGESTED_IN_A_DIRECTORY = {".safetensors", ".json"}


def weights_identity(path: str | Path) -> str:
    """sha256 of a weights file's bytes (of a directory's .safetensors and .json files, by relative
    name). The whole contents, not the safetensors header and size: two trainings of one network
    have the same names, shapes and size and differ only in the values. sha256 runs at about
    1.8 GB/s here, a second even for CLIP ViT-L/14, against minutes of feature extraction."""
    path = Path(path).expanduser()
    if path.is_file():
        return "sha256:" + _file_sha256(path)
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix in _DIGESTED_IN_A_DIRECTORY and ".cache" not in p.relative_to(path).parts
    )
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(path).as_posix()}\0{_file_sha256(p)}\n".encode())
    return "sha256:" + digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def listing_digest(directory: Path, paths: list[Path]) -> str:
    """A digest of the reference images' (relative path, size, mtime_ns): an image added, removed
    or replaced changes it, without reading thousands of images to find out."""
    digest = hashlib.sha256()
    for p in paths:
        st = p.stat()
        digest.update(f"{p.relative_to(directory).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def stats_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"'{path}' is not a readable safetensors file (corrupt or truncated?): {exc}") from None


def _provenance(ref: Path, paths: list[Path], features: str, extractor: str) -> dict[str, str]:
    return {
        "features": features,
        "source": str(ref.resolve()),
        "images": str(len(paths)),
        "listing_sha256": listing_digest(ref, paths),
        "extractor": extractor,
        "preprocess": PREPROCESS.get(features, ""),
    }


def cached_reference_stats(cache: Path, reference: str | Path, features: str, extractor: str) -> GaussianStats | None:
    """Statistics that `reference_stats` saved to `cache` in an earlier run, if they were computed
    from the same reference images (directory, count, and each file's name, size and modification
    time) with the same feature network and image preparation (all recorded in the file); None
    otherwise, and they are computed again."""
    ref = Path(reference).expanduser()
    if not cache.is_file() or not ref.is_dir():
        return None
    meta = stats_metadata(cache)
    want = _provenance(ref, list_images(ref), features, extractor)
    if any(meta.get(k) != v for k, v in want.items()):
        return None
    return GaussianStats.from_tensors(load_file(str(cache)))


def reference_stats(
    reference: str | Path,
    features: str,
    extract: Extractor,
    cache: Path | None = None,
    extractor: str = "",
    extractor_file: str = "",
) -> GaussianStats:
    """Statistics of the reference set: a `.safetensors` stats file written by this function,
    or a directory of images (whose statistics are then saved to `cache` for next time).
    `extractor` identifies the feature network's weights (`weights_identity`), `extractor_file`
    names them for messages: a stats file made with other weights (another Inception or CLIP)
    or another image preparation is refused, since its features are not these."""
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
        theirs = meta.get("extractor", "")
        ours = extractor
        if theirs and not theirs.startswith("sha256:") and extractor_file:
            # Files of older versions name the network by its path (a CLIP one as it was given,
            # perhaps relative), not by its contents.
            theirs, ours = (str(Path(p).expanduser().resolve()) for p in (theirs, extractor_file))
        if extractor and theirs and theirs != ours:
            them, us = meta.get("extractor_file") or theirs, extractor_file or extractor
            raise UserError(
                f"--reference '{ref}' holds statistics of the features of "
                + (f"another version of '{us}' (its contents differ)" if them == us else f"'{them}', not of '{us}'")
            )
        preprocess = PREPROCESS.get(features, "")
        if meta.get("preprocess", preprocess) != preprocess:
            raise UserError(
                f"--reference '{ref}' prepared its images otherwise ({meta['preprocess']}) than this version "
                f"({preprocess}): compute it again from the images"
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
        meta = {**_provenance(ref, paths, features, extractor), "extractor_file": extractor_file}
        cache.parent.mkdir(parents=True, exist_ok=True)
        with replacing(cache) as tmp:
            save_file({k: v.contiguous() for k, v in stats.to_tensors().items()}, str(tmp), metadata=meta)
    return stats
