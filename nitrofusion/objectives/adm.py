"""ADM (Lu et al. 2025, "Adversarial Distribution Matching"), as read from its abstract.

DMD's reverse-KL gradient is replaced by an adversarial game between the two scores'
predictions, judged by diffusion-based discriminators. This reading (the abstract gives no
formulas; docs/distill.md lists the choices):

    t ~ U[min_t, max_t] T,  eps ~ N(0, I),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    real_x0 = teacher's x0 prediction at x_t with CFG                   (no grad)
    fake_x0 = fake score's x0 prediction at x_t, differentiable in x_t  (so in x0, the student)

Both are re-noised to a level t* and judged by the head pool on the frozen teacher encoder
(NitroFusion's discriminator, whatever `discriminator.*` configures):

    heads:   real_x0 -> real,  sg(fake_x0) -> fake         (plus R1 on real if loss.r1_weight)
    student: softplus(-D(fake_x0))  -- the fake score's view of the student's samples should
             look like the real score's view of them

The fake score is held fixed for the student's gradient (taken with respect to its input
only) and learns, as in DMD2, by denoising detached student samples every iteration; the
student steps every loss.d_steps_per_g-th iteration.
"""

from __future__ import annotations

import torch

from nitrofusion.data.conditioning import Conditioning
from nitrofusion.objectives.base import Losses, StepContext, input_gradient, with_gradient
from nitrofusion.objectives.nitrofusion import PoolDiscriminator
from nitrofusion.objectives.scores import FakeScore, RealScore


class ADM:
    def __init__(self, real: RealScore, fake: FakeScore, pool: PoolDiscriminator) -> None:
        self.real, self.fake, self.pool = real, fake, pool

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
        t, _, x_t = self.fake.diffuse(x0, ctx.rng("dmd", True, micro))
        real_x0 = self.real.x0(x_t, t, cond)

        if train_student:
            leaf = x_t.detach().requires_grad_(True)
            fake_x0 = self.fake.x0(leaf, t, cond)
            judged = self.pool(ctx, micro, fake_x0, real_x0, cond, train_generator=True)
            g_loss = with_gradient(judged.g_loss, x_t, input_gradient(judged.g_loss, leaf))
        else:
            with torch.no_grad():
                fake_x0 = self.fake.x0(x_t, t, cond)
            judged = self.pool(ctx, micro, fake_x0, real_x0, cond, train_generator=False)
            g_loss = judged.g_loss
        fake_loss = self.fake.denoising_loss(x0, cond, ctx.rng("critic", True, micro))
        logs = {"real_logit": judged.real_score, "fake_logit": judged.fake_score, "fake_loss": fake_loss.item()}
        return Losses(g_loss, judged.d_loss + fake_loss, logs)
