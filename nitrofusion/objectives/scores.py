"""The two scores of score distillation (DMD2, ADM), as x0 predictions.

An epsilon-prediction UNet at noise level t reads as an x0 prediction:

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,     x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)

* real score: the frozen teacher with classifier-free guidance,
  eps_hat = eps(x_t, empty) + w (eps(x_t, c) - eps(x_t, empty)), w = dmd.real_guidance.
* fake score: a trainable copy of the teacher (no CFG) that tracks the student's current
  distribution, trained with the plain denoising loss  || eps_fake(x_t, c) - eps ||^2  on
  detached student samples x0, with t ~ U[min_t, max_t] T and eps ~ N(0, I).

Both are queried at unshifted timesteps: they are diffusion models, not the shifted student.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from nitrofusion.data.conditioning import Conditioning
from nitrofusion.discriminator.backbone import UNetEncoderFeatures
from nitrofusion.discriminator.heads import DiscriminatorHead
from nitrofusion.objectives.adversarial import discriminator_loss, generator_loss
from nitrofusion.objectives.base import Critic, StepContext, input_gradient, with_gradient


def sample_timesteps(n: int, min_t: float, max_t: float, T: int, generator: torch.Generator) -> torch.Tensor:
    """n integer timesteps uniform in [min_t T, max_t T] (clipped to the schedule's last index)."""
    lo, hi = int(min_t * T), min(int(max_t * T), T - 1)
    return torch.randint(lo, hi + 1, (n,), generator=generator)


def noisy(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, one t per sample."""
    a = _abar(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def unet_x0(
    unet: UNet2DConditionModel,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    alphas_cumprod: torch.Tensor,
    guidance: float | None = None,
    negative: Conditioning | None = None,
) -> torch.Tensor:
    """The UNet's x0 prediction at x_t (fp32), with classifier-free guidance when `negative` is given."""
    if negative is None or guidance == 1.0:
        eps = _eps(unet, x_t, t, cond)
    else:
        both = _eps(unet, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([negative, cond]))
        eps_uncond, eps_cond = both.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
    a = _abar(alphas_cumprod, t, x_t)
    return (x_t.float() - (1 - a).sqrt() * eps) / a.sqrt()


class RealScore:
    """The frozen teacher with CFG; always evaluated under no_grad."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        alphas_cumprod: torch.Tensor,
        guidance: float,
        negative: Callable[[int], Conditioning],
    ) -> None:
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod
        self.guidance = guidance
        self.negative = negative  # n -> Conditioning of the empty prompt

    @torch.no_grad()
    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        negative = self.negative(x_t.shape[0]).to(x_t.device)
        return unet_x0(self.unet, x_t, t, cond, self.alphas_cumprod, self.guidance, negative)


class FakeScore(Critic):
    """DMD's fake score: a trainable teacher copy (and, for DMD2, a GAN classifier on its bottleneck).

    The classifier is DMD2's: a global head on the deepest encoder feature map of the fake
    UNet, trained together with it (the denoising loss plus gan_d_weight times the
    classifier's loss, one optimizer for both), real = teacher samples, fake = student samples,
    both noised to the same t.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        alphas_cumprod: torch.Tensor,
        min_t: float,
        max_t: float,
        make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
        grad_clip: float,
        classifier: DiscriminatorHead | None = None,
        loss_kind: str = "non_saturating",
    ) -> None:
        self.unet = unet.requires_grad_(True).train()
        self.alphas_cumprod = alphas_cumprod
        self.min_t, self.max_t = min_t, max_t
        self.T = len(alphas_cumprod)
        self.grad_clip = grad_clip
        self.classifier = classifier
        self.loss_kind = loss_kind
        self.modules: dict[str, torch.nn.Module] = {"fake_score": unet}
        params = list(unet.parameters())
        if classifier is not None:
            self.encoder = UNetEncoderFeatures(unet, frozen=False)
            self.modules["classifier"] = classifier
            params += list(classifier.parameters())
        self.params = params
        self.opt = make_optimizer(params)
        self.optimizers = {"opt_fake": self.opt}

    def timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return sample_timesteps(n, self.min_t, self.max_t, self.T, generator).to(device)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return unet_x0(self.unet, x_t, t, cond, self.alphas_cumprod)

    def diffuse(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, eps, x_t): x0 noised to a random level where the scores are queried (t, then eps,
        drawn from `generator` in that order); x_t keeps x0's graph."""
        t = self.timesteps(x0.shape[0], generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        return t, eps, noisy(x0, eps, t, self.alphas_cumprod)

    def denoising_loss(self, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator) -> torch.Tensor:
        """|| eps_fake(x_t, t, c) - eps ||^2 on a detached student sample: the fake score learns the student."""
        t, eps, x_t = self.diffuse(x0.detach(), generator)
        return F.mse_loss(_eps(self.unet, x_t, t, cond), eps.float())

    def logit(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The classifier's logit on the fake UNet's deepest encoder map (the mid block's output)."""
        dtype = self.unet.dtype
        feats = self.encoder(x_t.to(dtype), t, cond)
        return self.classifier(feats[-1]).float()

    def classifier_losses(
        self, x_t_fake: torch.Tensor, x_t_real: torch.Tensor, t: torch.Tensor, cond: Conditioning, train_student: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(generator loss with its gradient reaching x_t_fake only, classifier loss, logs).

        Generator: softplus(-D(x_t_fake)); classifier: softplus(-D(x_t_real)) + softplus(D(x_t_fake detached))
        (or their hinge forms). The generator's gradient is taken with respect to the input
        only (see `with_gradient`), so the fake UNet and the classifier learn from the
        classifier loss alone.
        """
        g_loss = x_t_fake.new_zeros(())
        if train_student:
            leaf = x_t_fake.detach().requires_grad_(True)
            g_value = generator_loss([self.logit(leaf, t, cond)], self.loss_kind)
            g_loss = with_gradient(g_value, x_t_fake, input_gradient(g_value, leaf))
        both = self.logit(
            torch.cat([x_t_real.detach(), x_t_fake.detach()]), torch.cat([t, t]), Conditioning.cat([cond, cond])
        )
        real_logit, fake_logit = both.chunk(2)
        d_loss = discriminator_loss([real_logit], [fake_logit], self.loss_kind)
        return g_loss, d_loss, {"cls_real_logit": real_logit.mean().item(), "cls_fake_logit": fake_logit.mean().item()}

    def update(self, ctx: StepContext) -> dict[str, float]:
        ctx.average_gradients(self.params)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        return {"fake_grad_norm": float(norm)}


def _abar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod.to(like.device)[t].float().view(-1, *([1] * (like.dim() - 1)))


def _eps(unet: UNet2DConditionModel, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    dtype = unet.dtype
    embeds, added = cond.unet_inputs(dtype)
    out = unet(x_t.to(dtype), t, embeds, added_cond_kwargs=added)
    return out.sample.float()
