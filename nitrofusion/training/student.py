"""The student's one-step maths, identical to TimestepShiftLCMScheduler's `step`.

A student step at noise level t (unshifted) feeds the UNet timestep s = floor(t*shift/T),
reads its output as x0 by the scheduler's prediction type (epsilon: x0 = (x_t - sqrt(1-abar_s)
eps) / sqrt(abar_s); v: x0 = sqrt(abar_s) x_t - sqrt(1-abar_s) v; sample: x0 itself), and applies
the LCM boundary condition c_out(s) x0 + c_skip(s) x_t. Re-noising to the next level t' uses
abar_{t'}. Training and sampling share this code path's constants through the scheduler.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from nitrofusion.data.conditioning import Conditioning
from nitrofusion.models.denoise import denoise
from nitrofusion.objectives.scores import EpsilonProcess
from nitrofusion.scheduling import TimestepShiftLCMScheduler, shift_timesteps


class ShiftedStudent:
    def __init__(self, scheduler: TimestepShiftLCMScheduler) -> None:
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.process = EpsilonProcess(self.alphas_cumprod)  # the teacher's, as DMD2's scores read it
        self.T = scheduler.config.num_train_timesteps
        self.shift = scheduler.config.shifted_timestep
        self.prediction_type = scheduler.config.prediction_type
        # Each step after the first re-noises with fresh noise: the teacher's x0 from the starting
        # noise is the target of step 0 only.
        self.deterministic = False
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
        if scheduler.config.clip_sample or scheduler.config.thresholding:
            # The sampler would clip x0 where training does not: build it with both off.
            raise ValueError("the student's scheduler must not clip or threshold its x0 estimate")

    def levels(self, num_steps: int) -> list[int]:
        """Unshifted noise levels of a num_steps schedule (999, 749, 499, 249 for 4)."""
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.noise_timesteps.tolist()

    def x0(self, unet: UNet2DConditionModel, x_t: torch.Tensor, level: int, cond: Conditioning) -> torch.Tensor:
        s = int(shift_timesteps(torch.tensor([level]), self.shift, self.T))
        t = torch.full((x_t.shape[0],), s, device=x_t.device, dtype=torch.long)
        out = denoise(unet, x_t, t, cond).to(x_t.dtype)
        a = float(self.alphas_cumprod[s])
        if self.prediction_type == "epsilon":
            x0 = (x_t - (1 - a) ** 0.5 * out) / a**0.5
        elif self.prediction_type == "v_prediction":
            x0 = a**0.5 * x_t - (1 - a) ** 0.5 * out
        else:
            x0 = out
        c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(s)
        return c_out * x0 + c_skip * x_t

    @torch.no_grad()
    def simulate(
        self,
        unet: UNet2DConditionModel,
        x_T: torch.Tensor,
        num_steps: int,
        upto: int,
        cond: Conditioning,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Backward simulation: run the student's own first `upto` steps of a num_steps schedule.

        Returns the input of step `upto` and its noise level, as the sampler would reach them.
        """
        levels = self.levels(num_steps)
        x = x_T
        for i in range(upto):
            x0 = self.x0(unet, x, levels[i], cond)
            noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
            x = add_noise(x0, noise, levels[i + 1], self.alphas_cumprod)
        return x, levels[upto]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
        return add_noise(x0, noise, level, self.alphas_cumprod)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, level: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = float(alphas_cumprod[level])
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise
