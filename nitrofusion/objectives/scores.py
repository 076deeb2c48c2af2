"""The two scores of score distillation (DMD2, ADM), as x0 predictions.

An epsilon-prediction UNet at noise level t reads as an x0 prediction (`EpsilonProcess`):

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,     x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)

and a flow transformer (SD3) predicting the velocity v = eps - x0 at sigma = t / T (`FlowProcess`):

    x_t = (1 - sigma) x0 + sigma eps,                   x0_hat(x_t) = x_t - sigma v_hat

* real score: the frozen teacher with classifier-free guidance,
  eps_hat = eps(x_t, empty) + w (eps(x_t, c) - eps(x_t, empty)), w = dmd.real_guidance.
  (the same on v for a flow transformer).
* fake score: a trainable copy of the teacher (no CFG) that tracks the student's current
  distribution, trained with the plain denoising loss  || eps_fake(x_t, c) - eps ||^2  on
  detached student samples x0, with t ~ U[fake_min_t, fake_max_t] T (DMD2: all of [0, T)) and
  eps ~ N(0, I) (flow matching's
  || v_fake(x_t, c) - (eps - x0) ||^2 for a flow transformer).

Both are queried at unshifted timesteps: they are diffusion models, not the shifted student.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from nitrofusion.data.conditioning import Conditioning
from nitrofusion.discriminator.backbone import TransformerBlockFeatures, UNetEncoderFeatures
from nitrofusion.discriminator.heads import DiscriminatorHead
from nitrofusion.models.denoise import denoise, is_transformer
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


class Process(Protocol):
    """A teacher's forward process, and how its network's output reads as x0."""

    T: int

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EpsilonProcess:
    """DDPM's, through an epsilon-prediction UNet."""

    alphas_cumprod: torch.Tensor

    @property
    def T(self) -> int:
        return len(self.alphas_cumprod)

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noisy(x0, eps, t, self.alphas_cumprod)

    def x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _abar(self.alphas_cumprod, t, x_t)
        return (x_t.float() - (1 - a).sqrt() * out) / a.sqrt()

    def target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return eps.float()


@dataclass
class FlowProcess:
    """Rectified flow, through a velocity-prediction transformer (SD3), at sigma = t / T."""

    T: int = 1000

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.to(like.device).float() / self.T).view(-1, *([1] * (like.dim() - 1)))

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(t, x0)
        return (1 - sigma) * x0 + sigma * eps

    def x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t.float() - self._sigma(t, x_t) * out

    def target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (eps - x0).float()


def predicted_x0(
    model: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    process: Process,
    guidance: float | None = None,
    negative: Conditioning | None = None,
) -> torch.Tensor:
    """The network's x0 prediction at x_t (fp32), with classifier-free guidance (on its raw output,
    as its pipeline guides) when `negative` is given."""
    if negative is None or guidance == 1.0:
        out = _output(model, x_t, t, cond)
    else:
        both = _output(model, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([negative, cond]))
        uncond, conditional = both.chunk(2)
        out = uncond + guidance * (conditional - uncond)
    return process.x0(out, x_t, t)


class RealScore:
    """The frozen teacher with CFG; always evaluated under no_grad."""

    def __init__(
        self,
        unet: torch.nn.Module,
        process: Process,
        guidance: float,
        negative: Callable[[int], Conditioning],
    ) -> None:
        self.unet = unet  # a UNet, or a flow transformer
        self.process = process
        self.guidance = guidance
        self.negative = negative  # n -> Conditioning of the empty prompt

    @torch.no_grad()
    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        negative = self.negative(x_t.shape[0]).to(x_t.device)
        return predicted_x0(self.unet, x_t, t, cond, self.process, self.guidance, negative)


class FakeScore(Critic):
    """DMD's fake score: a trainable teacher copy (and, for DMD2, a GAN classifier on its bottleneck).

    The classifier is DMD2's: a global head on the deepest encoder feature map of the fake
    UNet (a flow transformer's: its last block read, half-way), trained together with it (the
    denoising loss plus gan_d_weight times the classifier's loss, one optimizer for both),
    real = teacher samples, fake = student samples, each noised at a t and noise of its own (DMD2's;
    dmd.classifier_noise=shared: both at the distribution-matching query's t).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        process: Process,
        min_t: float,
        max_t: float,
        make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
        grad_clip: float,
        classifier: DiscriminatorHead | None = None,
        loss_kind: str = "non_saturating",
        train_t: tuple[float, float] | None = None,
    ) -> None:
        self.unet = unet.requires_grad_(True).train()
        self.process = process
        self.min_t, self.max_t = min_t, max_t
        # Where it learns by denoising (DMD2: the whole schedule); by default where it is queried.
        self.train_min_t, self.train_max_t = train_t or (min_t, max_t)
        self.T = process.T
        self.grad_clip = grad_clip
        self.classifier = classifier
        self.loss_kind = loss_kind
        self.modules: dict[str, torch.nn.Module] = {"fake_score": unet}
        params = list(unet.parameters())
        if classifier is not None:
            features = TransformerBlockFeatures if is_transformer(unet) else UNetEncoderFeatures
            self.encoder = features(unet, frozen=False)
            self.modules["classifier"] = classifier
            params += list(classifier.parameters())
        self.params = params
        self.opt = make_optimizer(params)
        self.optimizers = {"opt_fake": self.opt}

    def timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Where the scores are queried."""
        return sample_timesteps(n, self.min_t, self.max_t, self.T, generator).to(device)

    def training_timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Where the fake score learns by denoising (and DMD2's classifier judges, with noise of its own)."""
        return sample_timesteps(n, self.train_min_t, self.train_max_t, self.T, generator).to(device)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return predicted_x0(self.unet, x_t, t, cond, self.process)

    def diffuse(
        self, x0: torch.Tensor, generator: torch.Generator, training: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, eps, x_t): x0 noised to a random level where the scores are queried (`training`: where
        the fake score learns) (t, then eps, drawn from `generator` in that order); x_t keeps x0's graph."""
        draw = self.training_timesteps if training else self.timesteps
        t = draw(x0.shape[0], generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        return t, eps, self.process.noisy(x0, eps, t)

    def denoising_loss(self, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator) -> torch.Tensor:
        """|| eps_fake(x_t, t, c) - eps ||^2 (a flow's: || v_fake - (eps - x0) ||^2) on a detached
        student sample: the fake score learns the student."""
        x0 = x0.detach()
        t, eps, x_t = self.diffuse(x0, generator, training=True)
        return F.mse_loss(_output(self.unet, x_t, t, cond), self.process.target(x0, eps))

    def logit(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The classifier's logit on the fake UNet's deepest encoder map (the mid block's output; a flow
        transformer's last block read)."""
        dtype = self.unet.dtype
        feats = self.encoder(x_t.to(dtype), t, cond)
        return self.classifier(feats[-1]).float()

    def classifier_losses(
        self,
        x_t_fake: torch.Tensor,
        x_t_real: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        train_student: bool,
        t_real: torch.Tensor | None = None,
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
        t_real = t if t_real is None else t_real  # the real input's own level, where it has one
        both = self.logit(
            torch.cat([x_t_real.detach(), x_t_fake.detach()]), torch.cat([t_real, t]), Conditioning.cat([cond, cond])
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


def _output(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The raw prediction (epsilon, or a flow's velocity) in fp32, the network run in its own dtype."""
    return denoise(model, x_t.to(model.dtype), t, cond).float()
