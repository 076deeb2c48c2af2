"""Fashion-MNIST, as installed by Debian's `dataset-fashion-mnist`, with text prompts.

The embedded world is trained on these real photographs of clothing (Zalando product
shots, 28x28 greyscale). Images are zero-padded to 32x32 and repeated to three channels
so that the pipeline is an ordinary RGB text-to-image pipeline.
"""

from __future__ import annotations

import gzip
import os
import random
import zlib
from pathlib import Path

import numpy as np
import torch

from nitrofusion.errors import UserError, first_line

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "NITROFUSION_FASHION_MNIST"
IMAGE_SIZE = 32

CLASS_NAMES = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# Several phrasings per class, so the text encoders see varied token sequences; the
# class word is what the teacher has to attend to.
TEMPLATES = (
    "a photo of a {}",
    "a {}",
    "a picture of a {}",
    "a {}, product shot",
    "a black and white photo of a {}",
    "a {} on a black background",
    "an image of a {}",
    "a small photo of a {}",
)


def article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def prompt_for(label: int, template: int = 0) -> str:
    """The prompt for a class with one of the templates ('a photo of an ankle boot')."""
    text = TEMPLATES[template % len(TEMPLATES)].format(CLASS_NAMES[label])
    # Fix the article in front of the class name ("a ankle boot" -> "an ankle boot").
    name = CLASS_NAMES[label]
    wrong = f"a {name}"
    return text.replace(wrong, f"{article(name)} {name}") if wrong in text else text


def all_prompts() -> list[tuple[str, int]]:
    """Every (prompt, class) pair of the world."""
    return [(prompt_for(c, t), c) for c in range(len(CLASS_NAMES)) for t in range(len(TEMPLATES))]


def evaluation_prompts(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """n prompts with balanced classes and templates, in a seeded order."""
    pairs = [(prompt_for(i % 10, (i // 10) % len(TEMPLATES)), i % 10) for i in range(n)]
    random.Random(seed).shuffle(pairs)
    return pairs


def data_dir() -> Path:
    return Path(os.environ.get(ENV_VAR, DEFAULT_DIR))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped), its header checked against its length: a truncated
    download or another file under the name is one line, not an EOFError or reshape traceback."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"Fashion-MNIST file {path} is damaged ({first_line(exc)}): install it again") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    if raw[:3] != b"\x00\x00\x08" or not 1 <= ndim <= 3 or len(raw) < 4 + 4 * ndim:
        raise UserError(f"Fashion-MNIST file {path} is not an IDX file of bytes: install it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
        raise UserError(f"Fashion-MNIST file {path} is not the length its header says: install it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str = "train", root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 32, 32] (zero-padded) and labels as int64 [N]."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = Path(root) if root else data_dir()
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (images_path, labels_path):
        if not p.is_file():
            raise UserError(
                f"Fashion-MNIST file {p} not found: install it with "
                f"'apt-get install dataset-fashion-mnist' or set {ENV_VAR} to its directory"
            )
    images = torch.from_numpy(_read_idx(images_path).copy())
    labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"Fashion-MNIST files in {root}: {tuple(images.shape)} images for {tuple(labels.shape)} labels")
    pad = (IMAGE_SIZE - images.shape[-1]) // 2
    images = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    return images, labels


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, 3, H, W] in [-1, 1], the range VAEs work in."""
    x = images_u8.float().div(127.5).sub(1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()
