"""The embedded world's build settings (`nitrofusion train-teacher`), apart from the training
code so the CLI checks them before importing torch and diffusers."""

from __future__ import annotations

from dataclasses import dataclass

from nitrofusion.errors import UserError


@dataclass
class WorldConfig:
    seed: int = 0
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 6000
    unet_batch: int = 48
    unet_lr: float = 5e-4
    unet_warmup: int = 200
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    classifier_epochs: int = 3
    classifier_batch: int = 128
    checkpoint_every: int = 500
    train_images: int = 0  # 0: all 60,000; fewer for a quick look at the whole build (or a test)
    test_images: int = 0  # 0: all 10,000 (the evaluator's reference statistics and accuracy)
    samples_per_class: int = 8  # samples.png: the teacher's images, a row per class
    device: str = "cpu"

    def check(self) -> None:
        if not 0 <= self.seed < 2**32:  # torch's generators take at most 64 bits; derived seeds add to it
            raise UserError(f"--seed must be in 0..2^32-1, got {self.seed}")
        for name in ("vae_steps", "unet_steps", "classifier_epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name, zero in (("train_images", "all"), ("test_images", "all"), ("samples_per_class", "none")):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 ({zero}) or more, got {getattr(self, name)}")
