"""DMD2 (Yin et al. 2024): distribution matching against a learned fake score, plus a GAN.

For a student sample x0 (its one step, or step j of k after backward simulation):

    t ~ U[min_t, max_t] T,   eps ~ N(0, I),   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
                                               (a flow teacher's: (1 - t/T) x0 + (t/T) eps)
    real_x0 = teacher's x0 prediction at x_t, with CFG w = dmd.real_guidance     (no grad)
    fake_x0 = fake score's x0 prediction at x_t                                   (no grad)
    w       = 1 / mean_{C,H,W} |x0 - real_x0|                                     (one per sample)
    grad    = (fake_x0 - real_x0) w
    L_DM    = 0.5 mean (x0 - sg(x0 - grad))^2

so that dL_DM/dx0 = grad / N (N = all entries of x0): a descent step moves x0 towards the
real score's prediction and away from the fake score's -- the reverse-KL gradient
s_fake - s_real, normalised per sample so its scale does not depend on t or the image.

GAN (DMD2's classifier on the fake score's bottleneck): x0 and the teacher's sample each noised
at a t' and noise of their own, t' ~ U[fake_min_t, fake_max_t] T as the fake score learns
(dmd.classifier_noise=shared: both at the query's t, x0's as x_t above):

    L_G   = softplus(-D(x'_t))                                    student, weight dmd.gan_g_weight
    L_cls = softplus(-D(x'_t^real)) + softplus(D(sg(x'_t)))

The fake score follows the student: L_fake = || eps_fake(x'_t, t') - eps' ||^2 on sg(x0) with its
own t', eps'. Critic loss: L_fake + dmd.gan_d_weight L_cls. Two time scales: the critic steps
every iteration, the student every loss.d_steps_per_g-th (DMD2: 5).

With loss.pool_weight > 0, NitroFusion's head pool also judges x0 against the teacher's x0
from the same noise: pool_weight times its generator loss joins L_DM + gan_g_weight L_G, and
its heads train alongside the fake score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nitrofusion.data.conditioning import Conditioning
from nitrofusion.objectives.base import Losses, StepContext
from nitrofusion.objectives.nitrofusion import PoolDiscriminator
from nitrofusion.objectives.scores import FakeScore, RealScore


def distribution_matching_loss(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """L_DM above; its gradient with respect to x0 is (fake_x0 - real_x0) w / x0.numel()."""
    with torch.no_grad():
        dims = tuple(range(1, x0.dim()))
        # The clamp only guards the degenerate x0 == real_x0; it never binds on real samples.
        w = 1.0 / (x0 - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(1e-12)
        grad = (fake_x0 - real_x0) * w
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


class DMD2:
    def __init__(
        self,
        real: RealScore,
        fake: FakeScore,
        gan_g_weight: float,
        gan_d_weight: float,
        pool: PoolDiscriminator | None = None,
        pool_weight: float = 0.0,
        classifier_noise: str = "own",
    ) -> None:
        self.real, self.fake = real, fake
        self.gan_g_weight, self.gan_d_weight = gan_g_weight, gan_d_weight
        self.pool, self.pool_weight = pool, pool_weight
        self.classifier_noise = classifier_noise

    def __call__(
        self,
        ctx: StepContext,
        fake: torch.Tensor,
        real: torch.Tensor,
        cond: Conditioning,
        micro: int,
        train_student: bool,
    ) -> Losses:
        x0 = fake
        g = ctx.rng("dmd", True, micro)
        t, _, x_t = self.fake.diffuse(x0, g)  # x_t keeps the graph into the student (GAN term)
        eps_real = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)

        g_loss, logs = x0.new_zeros(()), {}
        if train_student:  # the scores are only needed on the student's update steps
            with torch.no_grad():
                real_x0, fake_x0 = self.real.x0(x_t, t, cond), self.fake.x0(x_t, t, cond)
            g_loss = distribution_matching_loss(x0, real_x0, fake_x0)
            logs["dm_loss"] = g_loss.item()
        d_loss = self.fake.denoising_loss(x0, cond, ctx.rng("critic", True, micro))
        logs["fake_loss"] = d_loss.item()

        if self.fake.classifier is not None:
            if self.classifier_noise == "own":  # a stream of its own: the other draws stay as they were
                gan = ctx.rng("gan", True, micro)
                t_fake, _, x_t_fake = self.fake.diffuse(x0, gan, training=True)
                t_real, _, x_t_real = self.fake.diffuse(real, gan, training=True)
            else:
                t_fake, x_t_fake = t, x_t
                t_real, x_t_real = t, self.fake.process.noisy(real, eps_real, t)
            gan_g, cls, cls_logs = self.fake.classifier_losses(
                x_t_fake, x_t_real, t_fake, cond, train_student, t_real=t_real
            )
            g_loss = g_loss + self.gan_g_weight * gan_g
            d_loss = d_loss + self.gan_d_weight * cls
            logs.update(cls_logs, cls_loss=cls.item())
        if self.pool is not None:
            judged = self.pool(ctx, micro, x0, real, cond, train_student)
            g_loss = g_loss + self.pool_weight * judged.g_loss
            d_loss = d_loss + judged.d_loss
            logs.update(real_logit=judged.real_score, fake_logit=judged.fake_score)
        return Losses(g_loss, d_loss, logs)
