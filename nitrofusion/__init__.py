"""nitrofusion: single-step text-to-image diffusion through dynamic adversarial training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names load lazily, so `import nitrofusion` (and the CLI's start) does not pay
# for importing diffusers until something from it is used.
_LAZY = {
    "TimestepShiftLCMScheduler": "nitrofusion.scheduling",
    "generate": "nitrofusion.pipelines",
    "load_pipeline": "nitrofusion.pipelines",
}

if TYPE_CHECKING:
    from nitrofusion.pipelines import generate, load_pipeline
    from nitrofusion.scheduling import TimestepShiftLCMScheduler


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nitrofusion' has no attribute {name!r}")


__all__ = ["TimestepShiftLCMScheduler", "__version__", "generate", "load_pipeline"]
