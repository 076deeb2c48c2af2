"""NitroFusion's judgement: sampled heads of the pool on the frozen teacher encoder.

For each sampled noise level t*, real (teacher) and fake (student) x0 are re-noised to t*
and passed once through the backbone; every sampled head reads its feature map. The
generator's pass keeps the graph into the student with the heads frozen; the
discriminator's pass reuses the fake features detached, so each t* costs one backbone
pass with gradients (fake) and one without (real).

`PoolDiscriminator` is the pool as a trainable critic (its heads drawn per micro-batch,
its optimizer, the refresh); `NitroFusion` is the objective: student x0 against the
teacher's x0, nothing else. The same pool judges ADM's score predictions, DMDX's
adversarial pre-training, and is added to DMD2 with loss.pool_weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nitrofusion.data.conditioning import Conditioning
from nitrofusion.discriminator.backbone import TransformerBlockFeatures, UNetEncoderFeatures
from nitrofusion.discriminator.pool import HeadPool
from nitrofusion.objectives.adversarial import discriminator_loss, generator_loss, r1_penalty
from nitrofusion.objectives.base import Critic, Losses, StepContext


@dataclass
class Judgement:
    g_loss: torch.Tensor
    d_loss: torch.Tensor
    real_score: float  # mean logit on real, for logging
    fake_score: float


class NitroFusionObjective:
    def __init__(
        self,
        backbone: UNetEncoderFeatures | TransformerBlockFeatures,
        pool: HeadPool,
        add_noise: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
        loss_kind: str = "non_saturating",
        r1_weight: float = 0.0,
    ) -> None:
        """`add_noise(x0, noise, t*)`: the teacher's forward process at its timestep t* (the UNet's
        abar schedule, or a flow's interpolation at sigma = t*/1000)."""
        self.backbone = backbone
        self.pool = pool
        self.add_noise = add_noise
        self.loss_kind = loss_kind
        self.r1_weight = r1_weight

    def _features(self, x0: torch.Tensor, t_star: int, noise: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        return self._features_of(self.add_noise(x0, noise, t_star), t_star, cond)

    def _features_of(self, x_t: torch.Tensor, t_star: int, cond: Conditioning) -> list[torch.Tensor]:
        x = x_t.to(self.backbone.model.dtype)
        t = torch.full((x.shape[0],), t_star, device=x.device, dtype=torch.long)
        return self.backbone(x, t, cond)

    def __call__(
        self,
        fake: torch.Tensor,
        real: torch.Tensor,
        cond: Conditioning,
        t_stars: list[int],
        head_ids: dict[int, list[int]],
        generator: torch.Generator,
        train_generator: bool = True,
    ) -> Judgement:
        g_terms, d_terms, r_scores, f_scores = [], [], [], []
        text = cond.pooled
        for t_star in t_stars:
            ids = head_ids[t_star]
            n_fake = torch.randn(fake.shape, generator=generator).to(fake.device, fake.dtype)
            n_real = torch.randn(real.shape, generator=generator).to(real.device, real.dtype)
            if train_generator:
                with self.pool.frozen(ids):
                    fake_feats = self._features(fake, t_star, n_fake, cond)
                    g_logits = [lg.float() for lg in self.pool.logits(ids, fake_feats, text)]
                    g_terms.append(generator_loss(g_logits, self.loss_kind))
                fake_feats = [f.detach() for f in fake_feats]
            else:
                with torch.no_grad():
                    fake_feats = self._features(fake.detach(), t_star, n_fake, cond)
            # R1 penalises the gradient with respect to what the heads judge, the noised x_t (with
            # respect to x0 it would be scaled by abar(t*): 18x weaker at t* 750 than at 10).
            real_in = self.add_noise(real.detach(), n_real, t_star).requires_grad_(self.r1_weight > 0)
            # R1 differentiates the gradient again; fused attention kernels have no double backward,
            # and a checkpointed block would be recomputed outside this kernel choice, so neither is used.
            kernel = sdpa_kernel(SDPBackend.MATH) if self.r1_weight > 0 else nullcontext()
            plain = _without_checkpointing(self.backbone.model) if self.r1_weight > 0 else nullcontext()
            with torch.set_grad_enabled(self.r1_weight > 0), kernel, plain:
                real_feats = self._features_of(real_in, t_star, cond)
            real_logits = [lg.float() for lg in self.pool.logits(ids, real_feats, text)]
            fake_logits = [lg.float() for lg in self.pool.logits(ids, fake_feats, text)]
            d = discriminator_loss(real_logits, fake_logits, self.loss_kind)
            if self.r1_weight > 0:
                d = d + self.r1_weight * r1_penalty(real_logits, real_in)
            d_terms.append(d)
            r_scores.append(torch.stack([x.mean() for x in real_logits]).mean().item())
            f_scores.append(torch.stack([x.mean() for x in fake_logits]).mean().item())
        zero = fake.new_zeros(())
        return Judgement(
            g_loss=torch.stack(g_terms).mean() if g_terms else zero,
            d_loss=torch.stack(d_terms).mean(),
            real_score=sum(r_scores) / len(r_scores),
            fake_score=sum(f_scores) / len(f_scores),
        )


class PoolDiscriminator(Critic):
    """The head pool as a trainable critic: its heads drawn per micro-batch (the same on every
    rank), its optimizer, and the refresh after each iteration's step."""

    def __init__(
        self,
        judgement: NitroFusionObjective,
        optimizer: torch.optim.Optimizer,
        t_stars_per_step: int,
        refresh_fraction: float,
    ) -> None:
        self.judgement = judgement
        self.pool = judgement.pool
        self.opt = optimizer
        self.t_stars_per_step = t_stars_per_step
        self.refresh_fraction = refresh_fraction
        self.modules = {"pool": self.pool}
        self.optimizers = {"opt_d": optimizer}
        self._draws: dict[int, tuple[list[int], dict[int, list[int]]]] = {}

    def begin_step(self, ctx: StepContext) -> None:
        self._draws = {}

    def draw(self, ctx: StepContext, micro: int) -> tuple[list[int], dict[int, list[int]]]:
        """The t* groups, and one head per (kind, feature level) in each, that judge a micro-batch.

        Drawn per micro-batch and per rank, not per iteration: a head trains only when drawn, and
        a 1% refresh gives it about 100 iterations, so one draw per iteration trained it about 6
        times (one t* group of 4, one candidate of 4) before it was re-initialised, while the sdxl
        preset's 20 micro-batches draw about 72% of the heads each iteration. N ranks of 20 / N
        micro-batches draw as many (the same draws on every rank drew 1 - (15/16)^3 = 18% at 8
        ranks of 3); `average_gradients` averages every head some rank drew. Micro-batch 0 of a
        single process keeps the once-per-iteration draw, so the embedded presets train as before.
        """
        if micro not in self._draws:
            if micro == 0:
                t_stars = self.pool.sample_t_stars(self.t_stars_per_step, ctx.rng("heads", True))
                heads = {t: self.pool.sample_heads(t, ctx.rng("heads", True, micro=t + 1)) for t in t_stars}
            else:
                g = ctx.rng("heads_micro", True, micro=micro)
                t_stars = self.pool.sample_t_stars(self.t_stars_per_step, g)
                heads = {t: self.pool.sample_heads(t, g) for t in t_stars}
            self._draws[micro] = (t_stars, heads)
        return self._draws[micro]

    def __call__(
        self,
        ctx: StepContext,
        micro: int,
        fake: torch.Tensor,
        real: torch.Tensor,
        cond: Conditioning,
        train_generator: bool,
    ) -> Judgement:
        t_stars, head_ids = self.draw(ctx, micro)
        return self.judgement(fake, real, cond, t_stars, head_ids, ctx.rng("judge", True, micro), train_generator)

    def update(self, ctx: StepContext) -> dict[str, float]:
        ctx.average_gradients(self.pool.parameters())
        self.opt.step()
        return {"refreshed": len(self.pool.refresh(self.refresh_fraction, ctx.rng("refresh"), self.opt))}


class NitroFusion:
    """NitroFusion's objective: the sampled heads judge the student's x0 against the teacher's."""

    def __init__(self, pool: PoolDiscriminator) -> None:
        self.pool = pool

    def __call__(
        self,
        ctx: StepContext,
        fake: torch.Tensor,
        real: torch.Tensor,
        cond: Conditioning,
        micro: int,
        train_student: bool,
    ) -> Losses:
        judged = self.pool(ctx, micro, fake, real, cond, train_student)
        return Losses(judged.g_loss, judged.d_loss, {"real_logit": judged.real_score, "fake_logit": judged.fake_score})


@contextmanager
def _without_checkpointing(unet: torch.nn.Module) -> Iterator[None]:
    """Switch a diffusers model's gradient checkpointing off for one forward pass."""
    on = getattr(unet, "is_gradient_checkpointing", False)
    if on:
        unet.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if on:
            unet.enable_gradient_checkpointing()
