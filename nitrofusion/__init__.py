"""nitrofusion: single-step text-to-image diffusion through dynamic adversarial training."""

__version__ = "0.1.0"

from nitrofusion.pipelines import generate, load_pipeline  # noqa: E402
from nitrofusion.scheduling import TimestepShiftLCMScheduler  # noqa: E402

__all__ = ["TimestepShiftLCMScheduler", "__version__", "generate", "load_pipeline"]
