"""The flow student's one-step maths: FlowMatchEulerDiscreteScheduler's `step`, in fp32.

Rectified flow (SD3): x_sigma = (1 - sigma) x0 + sigma eps, and the transformer, told the
timestep 1000 sigma, predicts the velocity v = eps - x0; so x0 = x_sigma - sigma v. A k-step
student samples with the teacher's own scheduler (its shift and spacing), unchanged: step j
moves x by (sigma_{j+1} - sigma_j) v, which for a perfect v lands on (1 - sigma_{j+1}) x0 +
sigma_{j+1} eps. The student is trained on the x0 it implies at each of its levels, and its
backward simulation runs that same Euler step, deterministically, as the sampler does.

Stock diffusers pipelines sample the exported student (StableDiffusion3Pipeline with this
scheduler): there is no scheduler of ours to ship, and no boundary condition as in LCM.
Training keeps x in fp32 between steps; a pipeline sampling in bf16 rounds it to bf16 after
each step (and takes sigma-step times v in bf16): a rounding apart, not another sampler.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from nitrofusion.data.conditioning import Conditioning
from nitrofusion.models.denoise import denoise
from nitrofusion.objectives.scores import FlowProcess


class FlowStudent:
    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"a flow student samples with FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}"
            )
        cfg = scheduler.config
        if cfg.use_dynamic_shifting or cfg.invert_sigmas or cfg.stochastic_sampling:
            # Resolution-dependent shifts (Flux) need the image size at every call; inverted and
            # stochastic steps are other samplers than the Euler step trained here.
            raise ValueError("the flow student's scheduler must use a fixed shift and deterministic Euler steps")
        self.scheduler = scheduler
        self.T = cfg.num_train_timesteps
        self.process = FlowProcess(self.T)  # the teacher's forward process, at sigma = t / T

    def sigmas(self, num_steps: int) -> list[float]:
        """The num_steps noise levels the pipeline samples at, then the final 0."""
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.sigmas.tolist()

    def levels(self, num_steps: int) -> list[float]:
        return self.sigmas(num_steps)[:num_steps]

    def velocity(self, model: torch.nn.Module, x_t: torch.Tensor, sigma: float, cond: Conditioning) -> torch.Tensor:
        # The pipeline's timestep: its float32 sigma times T, as the scheduler stores it.
        t = torch.full((x_t.shape[0],), sigma, dtype=torch.float32) * self.T
        return denoise(model, x_t, t.to(x_t.device), cond).to(x_t.dtype)

    def x0(self, model: torch.nn.Module, x_t: torch.Tensor, level: float, cond: Conditioning) -> torch.Tensor:
        return x_t - level * self.velocity(model, x_t, level, cond)

    @torch.no_grad()
    def simulate(
        self,
        model: torch.nn.Module,
        x_T: torch.Tensor,
        num_steps: int,
        upto: int,
        cond: Conditioning,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Backward simulation: the student's own first `upto` Euler steps of a num_steps schedule.

        Returns the input of step `upto` and its sigma, as the sampler reaches them. `generator`
        is unused (the Euler step adds no noise); it keeps the UNet student's signature."""
        sigmas = self.sigmas(num_steps)
        x = x_T
        for i in range(upto):
            v = self.velocity(model, x, sigmas[i], cond)
            # In float32, as the scheduler steps, then back in the model's dtype.
            x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
        return x, sigmas[upto]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """x0 at the transformer's timestep t (sigma = t / T), where the discriminator judges it."""
        return self.process.noisy(x0, noise, torch.full((x0.shape[0],), t))
