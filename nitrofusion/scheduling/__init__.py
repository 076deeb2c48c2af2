"""Samplers for distilled few-step students."""

from nitrofusion.scheduling.timestep_shift_lcm import TimestepShiftLCMScheduler, shift_timesteps

__all__ = ["TimestepShiftLCMScheduler", "shift_timesteps"]
