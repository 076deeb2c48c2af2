"""A resumable on-disk cache of generated evaluation images.

One directory per setting (model, sampler, steps, ...), holding `00000.png`, `00001.png`, ...
and a manifest of the settings. Image i is always prompt i with seed `seed + i`, so an
interrupted evaluation continues with the missing indices and gives the same images it
would have given in one go. A manifest that does not match the request is refused rather
than mixed into the results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from nitrofusion.errors import UserError
from nitrofusion.pipelines.generation import generate
from nitrofusion.userfiles import replacing, write_text_replacing


class ImageCache:
    def __init__(self, directory: str | Path, settings: dict) -> None:
        self.dir = Path(directory)
        self.settings = settings
        self.manifest = self.dir / "manifest.json"

    def path(self, i: int) -> Path:
        return self.dir / f"{i:05d}.png"

    def _check_manifest(self) -> dict:
        if not self.manifest.is_file():
            return {"settings": self.settings, "seconds": 0.0, "generated": 0}
        try:
            found = json.loads(self.manifest.read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"image cache manifest '{self.manifest}' is unreadable; delete the directory") from None
        if found.get("settings") != self.settings:
            diff = sorted(
                k
                for k in {**self.settings, **found.get("settings", {})}
                if found.get("settings", {}).get(k) != self.settings.get(k)
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
    ) -> tuple[list[Image.Image], float]:
        """Generate the images not yet on disk; return all images and the seconds per image
        measured over every image this cache has generated."""
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self._check_manifest()
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
        if not self.manifest.is_file():
            self._write_manifest(state)
        images = [Image.open(self.path(i)).convert("RGB") for i in range(len(prompts))]
        per_image = state["seconds"] / state["generated"] if state["generated"] else float("nan")
        return images, per_image


def _contiguous(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] + 1 == i:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
