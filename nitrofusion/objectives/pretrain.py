"""Pre-training on teacher noise -> sample pairs (the first loss.pretrain_steps iterations).

mse (the default; regression as DMD2 pre-trains, but on latents, not LPIPS on decoded images):
    L = mean (x0_student(x_T) - x0_teacher(x_T))^2

adversarial (DMDX's first stage, read from the ADM abstract: "adversarial distillation with
hybrid discriminators in both latent and pixel spaces", a distributional loss on the ODE
pairs instead of MSE):

* latent space: the head pool on the frozen teacher encoder judges the student's x0 against
  the teacher's x0 from the same noise, text-conditional heads included (NitroFusion's
  judgement; weight pretrain.latent_weight);
* pixel space: a small conv discriminator (a local, text-conditional head) on VAE-decoded
  images; the decode is differentiable, the VAE frozen (weight pretrain.pixel_weight). To
  stay cheap at SDXL size, pretrain.pixel_crop decodes only a random latent crop (the same
  window for student and teacher).

Both discriminators step every iteration, and so does the student (as in regression).
`pretrain.regression_weight` > 0 adds the regression to the teacher's x0 to the student's
loss (ADD's distillation term): without it, on the embedded world, the student collapsed
into texture within 100 iterations (docs/results.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from nitrofusion.data.conditioning import Conditioning
from nitrofusion.discriminator.heads import DiscriminatorHead
from nitrofusion.objectives.adversarial import discriminator_loss, generator_loss
from nitrofusion.objectives.base import Critic, Losses, StepContext
from nitrofusion.objectives.nitrofusion import PoolDiscriminator


class Regression:
    def __call__(
        self,
        ctx: StepContext,
        fake: torch.Tensor,
        real: torch.Tensor,
        cond: Conditioning,
        micro: int,
        train_student: bool,
    ) -> Losses:
        return Losses(F.mse_loss(fake, real), None)


class PixelDiscriminator(Critic):
    """A local, text-conditional conv head on decoded images in [-1, 1]."""

    def __init__(
        self,
        vae: AutoencoderKL,
        head: DiscriminatorHead,
        optimizer: torch.optim.Optimizer,
        crop: int = 0,
        loss_kind: str = "non_saturating",
    ) -> None:
        self.vae = vae.requires_grad_(False)
        self.head = head
        self.crop = crop
        self.loss_kind = loss_kind
        self.modules = {"pixel": head}
        self.optimizers = {"opt_pixel": optimizer}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images, undoing the VAE's scaling as its pipelines do."""
        cfg = self.vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean, device=latents.device).view(shape)
            std = torch.tensor(std, device=latents.device).view(shape)
            latents = latents * std / cfg.scaling_factor + mean
        else:  # SD3's VAE also shifts its latents
            latents = latents / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()

    def window(
        self, fake: torch.Tensor, real: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = fake.shape[-2:]
        if not 0 < self.crop < max(h, w):
            return fake, real
        c_h, c_w = min(self.crop, h), min(self.crop, w)
        i = int(torch.randint(0, h - c_h + 1, (1,), generator=generator))
        j = int(torch.randint(0, w - c_w + 1, (1,), generator=generator))
        return fake[..., i : i + c_h, j : j + c_w], real[..., i : i + c_h, j : j + c_w]

    def __call__(
        self,
        fake: torch.Tensor,
        real: torch.Tensor,
        cond: Conditioning,
        generator: torch.Generator,
        train_generator: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(generator loss, discriminator loss, logs) on decoded student vs teacher images."""
        fake, real = self.window(fake, real, generator)
        with torch.set_grad_enabled(train_generator):
            fake_img = self.decode(fake)
        with torch.no_grad():
            real_img = self.decode(real)
        g_loss = fake.new_zeros(())
        if train_generator:
            self.head.requires_grad_(False)  # the head is not checkpointed: toggling is safe here
            g_loss = generator_loss([self.head(fake_img, cond.pooled).float()], self.loss_kind)
            self.head.requires_grad_(True)
        real_logit = self.head(real_img, cond.pooled).float()
        fake_logit = self.head(fake_img.detach(), cond.pooled).float()
        d_loss = discriminator_loss([real_logit], [fake_logit], self.loss_kind)
        return (
            g_loss,
            d_loss,
            {"pixel_real_logit": real_logit.mean().item(), "pixel_fake_logit": fake_logit.mean().item()},
        )


class AdversarialPretraining:
    def __init__(
        self,
        pool: PoolDiscriminator | None,
        pixel: PixelDiscriminator | None,
        latent_weight: float,
        pixel_weight: float,
        regression_weight: float = 0.0,
    ) -> None:
        self.pool, self.pixel = pool, pixel
        self.latent_weight, self.pixel_weight = latent_weight, pixel_weight
        self.regression_weight = regression_weight

    def __call__(
        self,
        ctx: StepContext,
        fake: torch.Tensor,
        real: torch.Tensor,
        cond: Conditioning,
        micro: int,
        train_student: bool,
    ) -> Losses:
        g_loss, d_loss, logs = fake.new_zeros(()), fake.new_zeros(()), {}
        if self.pool is not None:
            judged = self.pool(ctx, micro, fake, real, cond, train_student)
            g_loss = g_loss + self.latent_weight * judged.g_loss
            d_loss = d_loss + judged.d_loss
            logs.update(real_logit=judged.real_score, fake_logit=judged.fake_score)
        if self.pixel is not None:
            pixel_g, pixel_d, pixel_logs = self.pixel(fake, real, cond, ctx.rng("pixel", True, micro), train_student)
            g_loss = g_loss + self.pixel_weight * pixel_g
            d_loss = d_loss + pixel_d
            logs.update(pixel_logs)
        if self.regression_weight > 0:  # an anchor to the teacher's sample from the same noise (ADD-style)
            mse = F.mse_loss(fake, real)
            g_loss = g_loss + self.regression_weight * mse
            logs["regression"] = mse.item()
        return Losses(g_loss, d_loss, logs)
