"""FID with a choice of feature extractor, and reference statistics from images or a file.

Features: `inception` (the FID network, weights from --inception), `clip` (CLIP image
embeddings, "CLIP-FID"), `embedded` (the embedded world's evaluator: its domain FD).
Generated and reference images go through the same resize, because FID moves with the
resampling filter; compare only like with like. For Inception features the resize is a choice
(`FID_RESIZES`, `evaluate --fid-resize`): PIL bicubic on the 8-bit image (the default), clean-fid's
"clean" resize, or pytorch-fid's bilinear one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from nitrofusion.errors import UserError
from nitrofusion.evaluation.frechet import GaussianStats
from nitrofusion.userfiles import read_user_image, replacing

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


# How an image is resized to Inception's 299x299 (`to_tensor`), by `--fid-resize` value.
FID_RESIZES = ("pil-bicubic-8bit", "clean", "pytorch-fid")
DEFAULT_FID_RESIZE = "pil-bicubic-8bit"


def to_tensor(images: list[Image.Image], size: int | None = None, resize: str = DEFAULT_FID_RESIZE) -> torch.Tensor:
    """PIL images -> float [N, 3, H, W] in [-1, 1]. Without `size`, at their own (shared) size. With
    `size`, each is centre-cropped to a square and resized to size x size by `resize`:

    * `pil-bicubic-8bit`: PIL's bicubic filter on the 8-bit image (the result is 8-bit again);
    * `clean`: clean-fid's "clean" resize: PIL's bicubic filter on each channel as a float32
      image (mode "F"), clipped to [0, 255] and not rounded to 8 bits; then clean-fid's scaling,
      (x - 128) / 128 (its network's, the TF graph's), where the others take x / 127.5 - 1;
    * `pytorch-fid`: pytorch-fid's: the 8-bit image as floats in [0, 1], torch's bilinear
      interpolation (align_corners=False, no antialiasing), then [-1, 1].

    FID compares only with FIDs computed the same way (docs/evaluate.md)."""
    if resize not in FID_RESIZES:
        raise ValueError(f"resize must be one of {', '.join(FID_RESIZES)}, got {resize!r}")
    if size is None:
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
        return _to_unit_range(arr)
    squares = [center_square(im.convert("RGB")) for im in images]
    if resize == "pytorch-fid":
        return torch.cat([_bilinear_resize(im, size) for im in squares]).mul(2.0).sub(1.0)
    if resize == "clean":
        arr = np.stack([_float_bicubic_resize(im, size) for im in squares])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).sub(128.0).div(128.0)
    arr = np.stack([np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) for im in squares])
    return _to_unit_range(arr)


def _to_unit_range(arr: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] floats in [0, 255] -> [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def _float_bicubic_resize(im: Image.Image, size: int) -> np.ndarray:
    """An RGB image -> [size, size, 3] float32 in [0, 255]: each channel resized by PIL's bicubic
    filter as a 32-bit float image, so the result keeps its fractions (clean-fid's "clean" mode)."""
    arr = np.asarray(im, dtype=np.float32)
    channels = []
    for c in range(arr.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(arr[:, :, c]))  # float32 2-D: mode "F"
        channels.append(np.asarray(plane.resize((size, size), Image.BICUBIC), dtype=np.float32))
    return np.clip(np.stack(channels, axis=2), 0.0, 255.0)


def _bilinear_resize(im: Image.Image, size: int) -> torch.Tensor:
    """An RGB image -> [1, 3, size, size] in [0, 1], resized as pytorch-fid does: torch's bilinear
    interpolation with align_corners=False and no antialiasing (also what `FIDInceptionV3` does to
    input of another size). One image at a time: the crops of a batch may differ in size."""
    x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0).div(255.0)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def inception_extractor(
    path: str | Path, device: str = "cpu", batch_size: int = 50, resize: str = DEFAULT_FID_RESIZE
) -> Extractor:
    """Inception's pool3 features of images resized to 299x299 by `resize` (one of `FID_RESIZES`)."""
    from nitrofusion.evaluation.inception import INPUT_SIZE, load_fid_inception

    if resize not in FID_RESIZES:
        raise UserError(f"--fid-resize must be one of {', '.join(FID_RESIZES)}, got {resize!r}")
    net = load_fid_inception(path).to(device)

    @torch.no_grad()
    def extract(images: list[Image.Image]) -> torch.Tensor:
        out = [
            net(to_tensor(images[i : i + batch_size], INPUT_SIZE, resize).to(device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out)

    return extract


def clip_extractor(clip: ClipModel) -> Extractor:
    return clip.image_embeddings


def embedded_extractor(evaluator: Evaluator) -> Extractor:
    """The evaluator's features, each image prepared as the evaluator prepares its input
    (`PREPROCESS['embedded']`: grey mean, bilinear antialiased to 32x32, not cropped). Images of
    one size (generated ones) go as one batch; a reference folder may mix sizes and modes, and each
    size is then prepared on its own, which gives every image the features it has in a batch of its
    own size."""

    def extract(images: list[Image.Image]) -> torch.Tensor:
        if len({im.size for im in images}) <= 1:
            return evaluator.features_and_logits(to_tensor(images))[0]
        from nitrofusion.world.evaluator import to_classifier_input

        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        order = [i for idx in by_size.values() for i in idx]
        prepared = torch.cat([to_classifier_input(to_tensor([images[i] for i in idx])) for idx in by_size.values()])
        return evaluator.features_and_logits(prepared[torch.tensor(order).argsort()])[0]

    return extract


def list_images(directory: str | Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


# How each feature set prepares an image before the network (see to_tensor and the extractors);
# recorded with reference statistics, since FID moves with the resize: change the text with the code.
# Inception's by --fid-resize; the default's text is that of versions before the choice, so their
# statistics stay valid for it.
INCEPTION_PREPROCESS = {
    "pil-bicubic-8bit": "centre square, PIL bicubic to 299x299 on 8-bit RGB, [-1, 1]",
    "clean": "clean (clean-fid): centre square, PIL bicubic to 299x299 on each RGB channel as float32, "
    "clipped to [0, 255], not rounded, (x - 128) / 128",
    "pytorch-fid": "pytorch-fid: centre square, 8-bit RGB to [0, 1], torch bilinear to 299x299 "
    "(align_corners=False, no antialias), [-1, 1]",
}
PREPROCESS = {
    "inception": INCEPTION_PREPROCESS[DEFAULT_FID_RESIZE],
    "clip": "the CLIP directory's image processor",
    "embedded": "RGB [-1, 1], grey mean, bilinear antialiased to 32x32",
}


def preprocess_text(features: str, resize: str = DEFAULT_FID_RESIZE) -> str:
    """How `features` prepare an image, as recorded with reference statistics; `resize` (one of
    `FID_RESIZES`) counts for Inception features only."""
    if features == "inception":
        return INCEPTION_PREPROCESS[resize]
    return PREPROCESS.get(features, "")


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


def _provenance(
    ref: Path, paths: list[Path], features: str, extractor: str, resize: str = DEFAULT_FID_RESIZE
) -> dict[str, str]:
    return {
        "features": features,
        "source": str(ref.resolve()),
        "images": str(len(paths)),
        "listing_sha256": listing_digest(ref, paths),
        "extractor": extractor,
        "preprocess": preprocess_text(features, resize),
    }


def cached_reference_stats(
    cache: Path, reference: str | Path, features: str, extractor: str, resize: str = DEFAULT_FID_RESIZE
) -> GaussianStats | None:
    """Statistics that `reference_stats` saved to `cache` in an earlier run, if they were computed
    from the same reference images (directory, count, and each file's name, size and modification
    time) with the same feature network and image preparation (Inception's: the same `resize`; all
    recorded in the file); None otherwise, and they are computed again."""
    ref = Path(reference).expanduser()
    if not cache.is_file() or not ref.is_dir():
        return None
    meta = stats_metadata(cache)
    want = _provenance(ref, list_images(ref), features, extractor, resize)
    if any(meta.get(k) != v for k, v in want.items()):
        return None
    return GaussianStats.from_tensors(load_file(str(cache)))


def reference_images(reference: str | Path) -> list[Path]:
    """The images of a reference folder; a folder that is not there or holds fewer than two is refused."""
    ref = Path(reference).expanduser()
    if not ref.is_dir():
        raise UserError(f"--reference '{ref}' not found (a directory of real images or a stats .safetensors)")
    paths = list_images(ref)
    if len(paths) < 2:
        raise UserError(f"--reference '{ref}' holds {len(paths)} images; FID needs many (thousands for a stable value)")
    return paths


def reference_stats(
    reference: str | Path,
    features: str,
    extract: Extractor,
    cache: Path | None = None,
    extractor: str = "",
    extractor_file: str = "",
    resize: str = DEFAULT_FID_RESIZE,
) -> GaussianStats:
    """Statistics of the reference set: a `.safetensors` stats file written by this function,
    or a directory of images (whose statistics are then saved to `cache` for next time).
    `extractor` identifies the feature network's weights (`weights_identity`), `extractor_file`
    names them for messages: a stats file made with other weights (another Inception or CLIP)
    or another image preparation (for Inception, another `resize`, which `extract` must use) is
    refused, since its features are not these."""
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
        preprocess = preprocess_text(features, resize)
        # A file of a version that recorded no preparation was made before the resize was a choice.
        recorded = meta.get("preprocess", PREPROCESS.get(features, ""))
        if recorded != preprocess:
            made_with = next((k for k, v in INCEPTION_PREPROCESS.items() if v == recorded), None)
            hint = (
                f"pass --fid-resize {made_with} to use it, or compute it again from the images"
                if features == "inception" and made_with
                else "compute it again from the images"
            )
            raise UserError(
                f"--reference '{ref}' prepared its images otherwise ({recorded}) than this run ({preprocess}): {hint}"
            )
        return GaussianStats.from_tensors(load_file(str(ref)))
    paths = reference_images(ref)
    feats = []
    with tqdm(total=len(paths), desc=f"reference features ({features})", unit="image") as bar:
        for i in range(0, len(paths), 500):
            feats.append(extract([read_user_image(p, "reference image") for p in paths[i : i + 500]]))
            bar.update(len(feats[-1]))
    stats = GaussianStats.from_features(torch.cat(feats))
    if cache is not None:
        # The provenance in the file itself, written whole or not at all: an interrupted run never
        # leaves statistics that claim another source.
        meta = {**_provenance(ref, paths, features, extractor, resize), "extractor_file": extractor_file}
        cache.parent.mkdir(parents=True, exist_ok=True)
        with replacing(cache) as tmp:
            save_file({k: v.contiguous() for k, v in stats.to_tensors().items()}, str(tmp), metadata=meta)
    return stats
