"""The embedded world's build settings (`nitrofusion train-teacher`), apart from the training
code so the CLI checks them before importing torch and diffusers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nitrofusion.errors import UserError

WORLD_STAGES = ("unet", "flow", "classifier")  # built after the VAE (the teachers train on its latents)
# A plain build reproduces the UNet world; the shipped flow teacher is built on that world's VAE
# (`--stages flow --vae nitrofusion/world/assets/teacher`, docs/world.md).
DEFAULT_STAGES = ("unet", "classifier")


@dataclass
class WorldConfig:
    seed: int = 0
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae: str = ""  # a trained VAE folder to use instead of training one (e.g. the shipped world's)
    unet_steps: int = 6000
    unet_batch: int = 48
    unet_lr: float = 5e-4
    unet_warmup: int = 200
    flow_steps: int = 5000
    flow_batch: int = 48
    flow_lr: float = 5e-4
    flow_warmup: int = 200
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    classifier_epochs: int = 3
    classifier_batch: int = 128
    checkpoint_every: int = 500
    train_images: int = 0  # 0: all 60,000; fewer for a quick look at the whole build (or a test)
    test_images: int = 0  # 0: all 10,000 (the evaluator's reference statistics and accuracy)
    samples_per_class: int = 8  # samples.png: the teacher's images, a row per class
    device: str = "cpu"

    def vae_folder(self) -> Path:
        """`vae`'s AutoencoderKL folder: the folder itself, or a pipeline's `vae/`."""
        folder = Path(self.vae)
        if (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        if not (folder / "config.json").is_file():
            raise UserError(f"--vae '{self.vae}' is not a diffusers AutoencoderKL folder (no config.json)")
        return folder

    def check(self) -> None:
        if not 0 <= self.seed < 2**32:  # torch's generators take at most 64 bits; derived seeds add to it
            raise UserError(f"--seed must be in 0..2^32-1, got {self.seed}")
        for name in ("vae_steps", "unet_steps", "flow_steps", "classifier_epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name, zero in (("train_images", "all"), ("test_images", "all"), ("samples_per_class", "none")):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 ({zero}) or more, got {getattr(self, name)}")
        if self.test_images == 1:  # the evaluator's reference statistics need a covariance: 2 images or more
            raise UserError("--test-images must be 0 (all) or at least 2, got 1")
        if self.vae:
            self.vae_folder()
