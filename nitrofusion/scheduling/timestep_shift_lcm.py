"""The NitroFusion sampler: LCM steps whose UNet timesteps are shifted.

NitroSD students denoise from the usual LCM noise levels (999, 749, 499, 249 for four
steps) but are *told* a smaller timestep, t * shifted_timestep / num_train_timesteps
(floored), e.g. 999 -> 249 with shift 250. The shift is only a conditioning signal:
the x0 estimate and the boundary-condition scalings use the shifted timestep (it is what
the UNet was told), while re-noising the x0 estimate to the next level uses the
unshifted schedule (it is the real noise level of the next input).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from diffusers import LCMScheduler, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

# A saved pipeline records this scheduler as ["nitrofusion.scheduling.timestep_shift_lcm",
# "TimestepShiftLCMScheduler"]; diffusers' loader then looks up the loadable base classes
# (SchedulerMixin) by name in this module, so it must be importable from here.
__all__ = ["SchedulerMixin", "TimestepShiftLCMScheduler", "shift_timesteps"]


def shift_timesteps(timesteps: torch.Tensor, shift: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Map noise levels to the timesteps the student is conditioned on (floor division)."""
    return torch.div(timesteps.long() * int(shift), int(num_train_timesteps), rounding_mode="floor")


class TimestepShiftLCMScheduler(LCMScheduler):
    """`LCMScheduler` with NitroFusion's timestep shift (a `shifted_timestep` config entry).

    `timesteps` (what a pipeline feeds the UNet) are the shifted ones; `noise_timesteps`
    holds the unshifted noise levels. `original_inference_steps` defaults to 4, the value the
    public NitroSD checkpoints are sampled with.
    """

    # Every argument is spelled out (rather than *args/**kwargs) because diffusers builds a
    # scheduler from a config by reading this signature: a key missing here would be
    # silently dropped when loading, e.g. a non-default beta schedule.
    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 4,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
        shifted_timestep: int = 250,
    ) -> None:
        if not 0 < int(shifted_timestep) <= num_train_timesteps:
            raise ValueError(f"shifted_timestep must be in 1..{num_train_timesteps}, got {shifted_timestep}")
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            original_inference_steps=original_inference_steps,
            clip_sample=clip_sample,
            clip_sample_range=clip_sample_range,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            timestep_scaling=timestep_scaling,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.noise_timesteps = self.timesteps.clone()

    @classmethod
    def from_base_config(cls, config: Mapping[str, Any], **overrides: Any) -> TimestepShiftLCMScheduler:
        """A student's sampler from another scheduler's config (the teacher's, or any stock
        pipeline's): its noise schedule and prediction type, sampled as NitroSD students are
        (`original_inference_steps` 4, no clipping or thresholding of the x0 estimate) unless
        `overrides` say otherwise.

        Only the settings this class takes are kept: a PNDM config's `skip_prk_steps` would
        otherwise be written into the student's scheduler config, and stock diffusers warns on
        every load. A DDIM config's `clip_sample: true` would clip latents, which are not in
        [-1, 1], and the student is never trained with it."""
        own = inspect.signature(cls.__init__).parameters
        sampling = {"original_inference_steps": 4, "clip_sample": False, "thresholding": False}
        return cls.from_config({k: v for k, v in config.items() if k in own}, **{**sampling, **overrides})

    def set_timesteps(self, *args, **kwargs) -> None:  # noqa: D102 - same contract as LCMScheduler
        super().set_timesteps(*args, **kwargs)
        self.noise_timesteps = self.timesteps.clone()
        self.timesteps = shift_timesteps(
            self.noise_timesteps, self.config.shifted_timestep, self.config.num_train_timesteps
        )
        # A small shift repeats timesteps (shift 2, 4 steps: 1, 1, 0, 0), and diffusers would locate
        # the first step at the second match: the sampler starts at step 0, whatever the values
        # (a pipeline that starts later, img2img, sets its own begin index after this).
        self.set_begin_index(0)

    @contextmanager
    def _unshifted(self) -> Iterator[None]:
        shifted = self.timesteps
        self.timesteps = self.noise_timesteps
        try:
            yield
        finally:
            self.timesteps = shifted

    @contextmanager
    def _as_last_step(self) -> Iterator[None]:
        count = self.num_inference_steps
        self.num_inference_steps = self.step_index + 1
        try:
            yield
        finally:
            self.num_inference_steps = count

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        noise: torch.Tensor | None = None,
    ) -> LCMSchedulerOutput | tuple:
        """One LCM step; `timestep` is the shifted timestep the UNet was given.

        `noise`, where given, is the draw that re-noises the estimate to the next level, in place
        of one from `generator`: a captured CUDA graph cannot draw from per-image generators, so
        FastSampler draws every step's noise before it replays (same numbers as drawing here).
        """
        if noise is not None and noise.shape != model_output.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, the model output {tuple(model_output.shape)}")
        if self.step_index is None:
            # Locate the step among the shifted timesteps, which is what callers pass in.
            self._init_step_index(timestep)
        last = self.step_index == self.num_inference_steps - 1
        # LCMScheduler takes the next noise level from `self.timesteps`; it must be the
        # real (unshifted) one, while `timestep` itself stays shifted.
        with self._unshifted():
            if noise is None or last:
                return super().step(model_output, timestep, sample, generator, return_dict)
            next_level = self.noise_timesteps[self.step_index + 1]
            # On its last step LCMScheduler returns the denoised estimate without drawing: take
            # it that way, then re-noise it to the next level as the drawing step would.
            with self._as_last_step():
                _, denoised = super().step(model_output, timestep, sample, None, return_dict=False)
        alpha_next = self.alphas_cumprod[next_level]
        prev_sample = alpha_next.sqrt() * denoised + (1 - alpha_next).sqrt() * noise
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
