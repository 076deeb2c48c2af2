"""A resumable on-disk cache of generated evaluation images.

One directory per setting (model, sampler, steps, ...), holding `00000.png`, `00001.png`, ...
and a manifest of the settings. Image i is always prompt i with seed `seed + i`, so an
interrupted evaluation continues with the missing indices and gives the same images it
would have given in one go. A manifest that does not match the request is refused rather
than mixed into the results; the manifest is written before the first image, so images with
no manifest beside them have unknown settings and are refused too.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import overload

from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from nitrofusion.errors import UserError
from nitrofusion.pipelines.generation import generate
from nitrofusion.userfiles import read_user_image, replacing, write_text_replacing

IMAGE_NAME = re.compile(r"\d{5}\.png")
# Settings first recorded on 2026-11-29 (the model folder's weights files): a cache made before
# records none, and is compared without them rather than refused.
LATER_KEYS = frozenset({"model_files"})


class ImageCache:
    def __init__(self, directory: str | Path, settings: dict) -> None:
        self.dir = Path(directory)
        self.settings = settings
        self.manifest = self.dir / "manifest.json"

    def path(self, i: int) -> Path:
        return self.dir / f"{i:05d}.png"

    def check(self) -> None:
        """Refuse now, before anything is sampled, a directory that `fill` would refuse."""
        self._check_manifest()

    def _check_manifest(self) -> dict:
        if not self.manifest.is_file():
            # Images without a manifest were made with settings nobody recorded (older versions wrote
            # it after the first batch, so an interrupted one left images alone): never resumed.
            if self.dir.is_dir() and any(IMAGE_NAME.fullmatch(p.name) for p in self.dir.iterdir()):
                raise UserError(
                    f"image cache '{self.dir}' holds images but no manifest.json, so their settings are unknown: "
                    "use another --out or delete it"
                )
            return {"settings": self.settings, "seconds": 0.0, "generated": 0}
        try:
            found = json.loads(self.manifest.read_text())
        except (OSError, ValueError, RecursionError):
            found = None
        if not isinstance(found, dict) or not isinstance(found.get("settings", {}), dict):
            raise UserError(f"image cache manifest '{self.manifest}' is unreadable; delete the directory")
        # Settings recorded since a version, absent from a cache made before it: compared where recorded.
        settings = {k: v for k, v in self.settings.items() if k not in LATER_KEYS or k in found.get("settings", {})}
        if found.get("settings") != settings:
            diff = sorted(
                k
                for k in {**settings, **found.get("settings", {})}
                if found.get("settings", {}).get(k) != settings.get(k)
            )
            raise UserError(
                f"image cache '{self.dir}' was made with other settings ({', '.join(diff)}); "
                "use another --out or delete it"
            )
        return found

    def _write_manifest(self, state: dict) -> None:
        write_text_replacing(self.manifest, json.dumps(state, indent=1))

    def fill(
        self,
        pipe: DiffusionPipeline,
        prompts: Sequence[str],
        steps: int,
        seed: int,
        batch_size: int,
        guidance_scale: float | None,
        desc: str = "generate",
    ) -> tuple[CachedImages, float]:
        """Generate the images not yet on disk; return all images (read from disk when used) and
        the seconds per image measured over every image this cache has generated."""
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self._check_manifest()
        if not self.manifest.is_file():  # before the first image, so that no image is ever without its settings
            self._write_manifest(state)
        missing = [i for i in range(len(prompts)) if not self.path(i).is_file()]
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(missing), desc=desc)
        # Contiguous runs of missing indices keep image i at seed + i whatever was cached before.
        for start in range(0, len(missing), batch_size):
            idx = missing[start : start + batch_size]
            t0 = time.perf_counter()
            results = []
            for run in _contiguous(idx):
                results += generate(
                    pipe,
                    [prompts[i] for i in run],
                    steps=steps,
                    seed=seed + run[0],
                    batch_size=len(run),
                    guidance_scale=guidance_scale,
                    progress=False,
                )
            state["seconds"] += time.perf_counter() - t0
            state["generated"] += len(idx)
            for i, r in zip(idx, results):
                with replacing(self.path(i)) as tmp:
                    r.image.save(tmp, format="PNG")
            self._write_manifest(state)
            bar.update(len(idx))
        bar.close()
        per_image = state["seconds"] / state["generated"] if state["generated"] else float("nan")
        return CachedImages([self.path(i) for i in range(len(prompts))]), per_image


class CachedImages(Sequence[Image.Image]):
    """A cache's images, each read from its PNG when asked for. Held decoded, a 5,000-image SDXL
    evaluation at 1024x1024 is 15.7 GB per step count; the scorers take them a batch at a time."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...
    @overload
    def __getitem__(self, index: slice) -> list[Image.Image]: ...
    def __getitem__(self, index: int | slice) -> Image.Image | list[Image.Image]:
        if isinstance(index, slice):
            return [_read(p) for p in self.paths[index]]
        return _read(self.paths[index])


def _read(path: Path) -> Image.Image:
    # A file damaged after it was written (its cache entry only records that it exists).
    return read_user_image(path, "cached image", hint=": delete it, and evaluate draws it again")


def _contiguous(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] + 1 == i:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
