"""The local real-time app: a FastAPI server with a small page and a JSON API (`nitrofusion app`).

`create_app`, `load_models` and the scheduling pieces live in `nitrofusion.app.server`; they are imported
lazily so that parsing `nitrofusion app`'s options (and `nitrofusion --help`) does not need fastapi.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_SERVER_NAMES = ("create_app", "load_models", "LoadedModel", "ServerThread")


@dataclass
class ModelSpec:
    """One `--model` of the command line: what to load and the name clients pick it by."""

    model: str | None = None  # a pipeline directory, hub id in the local cache, or an embedded name
    unet: str | None = None
    lora: str | None = None  # a LoRA fused into the model (with no model: the embedded teacher)
    shift: int | None = None
    guidance_scale: float | None = None  # None: the sampler's default (generation.default_guidance)
    steps: int | None = None  # the count it samples at by default; None: its own (generation.default_steps)
    name: str | None = None


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from nitrofusion.app import server

        return getattr(server, name)
    raise AttributeError(f"module 'nitrofusion.app' has no attribute {name!r}")


__all__ = ["ModelSpec", *_SERVER_NAMES]
