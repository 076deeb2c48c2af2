"""nitrofusion: single-step text-to-image diffusion through dynamic adversarial training."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# diffusers imports bitsandbytes where it is installed, and on CPUs with AVX512-BF16 that import
# warns "Failed to load CPU gemm_4bit_forward" before every command: a 4-bit inference kernel
# that nitrofusion never calls (it uses bitsandbytes' 8-bit optimizers only).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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
