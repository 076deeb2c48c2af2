"""The flow student's one-step maths: FlowMatchEulerDiscreteScheduler's `step`, in fp32.

Rectified flow (SD3): x_sigma = (1 - sigma) x0 + sigma eps, and the transformer, told the
timestep 1000 sigma, predicts the velocity v = eps - x0; so x0 = x_sigma - sigma v. A k-step
student samples with the teacher's own scheduler (its shift), Euler steps: step j moves x by
(sigma_{j+1} - sigma_j) v, which for a perfect v lands on (1 - sigma_{j+1}) x0 + sigma_{j+1} eps.
The student is trained on the x0 it implies at each of its levels, and its backward simulation
runs that same Euler step, deterministically, as the sampler does.

Its levels: the scheduler's own spacing runs from sigma 1 down to 1/1000, so at two steps the
second starts at sigma 0.001, on the data, and a k-step sampler has k - 1 steps that do
anything. "trailing" levels (the default) are 1, (k-1)/k, ..., 1/k before the scheduler's shift
(as Flux's pipeline spaces them; before its shift, the UNet student's 999, 749, 499, 249 are the
same at k = 4),
passed to the pipeline as `sigmas`; "stock" keeps the scheduler's spacing, which a pipeline
called without `sigmas` samples at. Both go through the scheduler's `set_timesteps`, as the
pipeline does, so training and sampling agree to the bit.

Stock diffusers pipelines sample the exported student (StableDiffusion3Pipeline with this
scheduler, called with the `sigmas` its nitrofusion.json records): there is no scheduler of
ours to ship, and no boundary condition as in LCM. Training keeps x in fp32 between steps; a
pipeline sampling in bf16 rounds it to bf16 after each step (and takes sigma-step times v in
bf16): a rounding apart, not another sampler.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from nitrofusion.data.conditioning import Conditioning
from nitrofusion.models.denoise import denoise
from nitrofusion.objectives.scores import FlowProcess
from nitrofusion.training.config import FLOW_LEVELS, MAX_SAMPLING_STEPS


def trailing_sigmas(num_steps: int) -> list[float]:
    """1, (k-1)/k, ..., 1/k: k levels evenly spaced down to 1/k, before the scheduler's shift."""
    return [(num_steps - j) / num_steps for j in range(num_steps)]


class FlowStudent:
    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, levels: str = FLOW_LEVELS[0]) -> None:
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"a flow student samples with FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}"
            )
        cfg = scheduler.config
        if cfg.use_dynamic_shifting or cfg.invert_sigmas or cfg.stochastic_sampling:
            # Resolution-dependent shifts (Flux) need the image size at every call; inverted and
            # stochastic steps are other samplers than the Euler step trained here.
            raise ValueError("the flow student's scheduler must use a fixed shift and deterministic Euler steps")
        if levels not in FLOW_LEVELS:
            raise ValueError(f"levels must be one of {', '.join(FLOW_LEVELS)}, got {levels!r}")
        self.scheduler = scheduler
        self.flow_levels = levels
        self.T = cfg.num_train_timesteps
        self.process = FlowProcess(self.T)  # the teacher's forward process, at sigma = t / T
        # A k-step sample is a function of its starting noise alone: the teacher's sample from that
        # noise is the target of every step, not only the first (the regression anchor applies to all).
        self.deterministic = True

    def pipeline_sigmas(self, num_steps: int) -> list[float] | None:
        """What the pipeline is passed as `sigmas` to sample at these levels (None: its own spacing)."""
        return trailing_sigmas(num_steps) if self.flow_levels == "trailing" else None

    def recorded_sigmas(self) -> dict[int, list[float]]:
        """The `sigmas` per step count (1 to 4) an export's nitrofusion.json records for sampling."""
        if self.flow_levels == "stock":
            return {}
        return {k: trailing_sigmas(k) for k in range(1, MAX_SAMPLING_STEPS + 1)}

    def sigmas(self, num_steps: int) -> list[float]:
        """The num_steps noise levels the pipeline samples at, then the final 0."""
        self.scheduler.set_timesteps(num_steps, sigmas=self.pipeline_sigmas(num_steps))
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
