"""TimestepShiftLCMScheduler against the public NitroFusion behaviour.

The oracle below is written from the formulas (LCM boundary conditions, DDPM re-noising),
not from any scheduler code: x0 and the scalings use the shifted timestep, re-noising uses
the next unshifted noise level.
"""

import math

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline

from nitrofusion import TimestepShiftLCMScheduler

# METHOD.md section 2: unshifted noise levels and the UNet timesteps for each shift.
TABLE = {
    1: ([999], {250: [249], 500: [499]}),
    2: ([999, 499], {250: [249, 124], 500: [499, 249]}),
    4: ([999, 749, 499, 249], {250: [249, 187, 124, 62], 500: [499, 374, 249, 124]}),
}


def make(shift: int) -> TimestepShiftLCMScheduler:
    return TimestepShiftLCMScheduler(shifted_timestep=shift, original_inference_steps=4)


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("shift", [250, 500])
def test_timesteps_match_public_table(steps, shift):
    s = make(shift)
    s.set_timesteps(steps)
    levels, by_shift = TABLE[steps]
    assert s.timesteps.tolist() == by_shift[shift]
    assert s.noise_timesteps.tolist() == levels


@pytest.mark.parametrize("shift", [250, 500])
def test_three_steps_follow_lcm_spacing(shift):
    plain = LCMScheduler(original_inference_steps=4)
    plain.set_timesteps(3)
    s = make(shift)
    s.set_timesteps(3)
    assert s.noise_timesteps.tolist() == plain.timesteps.tolist() == [999, 749, 499]
    assert s.timesteps.tolist() == [t * shift // 1000 for t in plain.timesteps.tolist()]


def fake_unet(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.tanh(x * 0.7 + t / 500.0)


def oracle_sample(x: torch.Tensor, steps: int, shift: int, seed: int) -> list[torch.Tensor]:
    abar = alphas_cumprod()
    plain = LCMScheduler(original_inference_steps=4)
    plain.set_timesteps(steps)
    levels = plain.timesteps.tolist()
    gen = torch.Generator().manual_seed(seed)
    outs = []
    x = x.double()
    for i, level in enumerate(levels):
        t = level * shift // 1000
        eps = fake_unet(x.float(), t).double()
        a = abar[t]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        c_skip = 0.25 / ((10 * t) ** 2 + 0.25)
        c_out = 10 * t / math.sqrt((10 * t) ** 2 + 0.25)
        denoised = c_out * x0 + c_skip * x
        if i == len(levels) - 1:
            x = denoised
        else:
            noise = torch.randn(x.shape, generator=gen).double()
            ap = abar[levels[i + 1]]
            x = ap.sqrt() * denoised + (1 - ap).sqrt() * noise
        outs.append(x.float())
    return outs


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("shift", [250, 500])
def test_step_outputs_match_oracle(steps, shift):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    expected = oracle_sample(x, steps, shift, seed=123)
    s = make(shift)
    s.set_timesteps(steps)
    gen = torch.Generator().manual_seed(123)
    sample = x.clone()
    for i, t in enumerate(s.timesteps):
        sample = s.step(fake_unet(sample, int(t)), t, sample, generator=gen).prev_sample
        torch.testing.assert_close(sample, expected[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_given_noise_gives_the_drawn_steps_numbers(steps):
    """A caller that draws the re-noising itself (FastSampler, before replaying a CUDA graph) gets
    exactly what the step draws from the same per-image generators."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    drawn, given = make(250), make(250)
    drawn.set_timesteps(steps)
    given.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    noise_gens = [torch.Generator().manual_seed(i) for i in range(2)]
    a = b = x
    for i, t in enumerate(drawn.timesteps):
        a_out = drawn.step(fake_unet(a, int(t)), t, a, generator=gens, return_dict=False)
        noise = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in noise_gens]) if i < steps - 1 else None
        b_out = given.step(fake_unet(b, int(t)), t, b, noise=noise, return_dict=False)
        assert all(torch.equal(p, q) for p, q in zip(a_out, b_out))
        a, b = a_out[0], b_out[0]
    assert given.step_index == steps and given.num_inference_steps == steps


def test_given_noise_is_checked_and_state_survives_a_failed_step(monkeypatch):
    s = make(250)
    s.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="noise has shape"):
        s.step(fake_unet(x, 187), s.timesteps[0], x, noise=torch.randn(1, 4, 8, 8))

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    shifted, levels = s.timesteps.clone(), s.noise_timesteps.clone()
    monkeypatch.setattr(LCMScheduler, "step", fail)
    with pytest.raises(RuntimeError, match="boom"):
        s.step(fake_unet(x, 249), s.timesteps[0], x, noise=torch.randn_like(x))
    assert s.num_inference_steps == 4 and torch.equal(s.timesteps, shifted) and torch.equal(s.noise_timesteps, levels)


def test_round_trip_keeps_every_setting(tmp_path):
    settings = dict(
        shifted_timestep=500,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
        original_inference_steps=8,
        clip_sample=False,
        num_train_timesteps=800,
    )
    s = TimestepShiftLCMScheduler(**settings)
    s.save_pretrained(tmp_path)
    loaded = TimestepShiftLCMScheduler.from_pretrained(tmp_path)
    public = {k: v for k, v in s.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public
    assert {k: public[k] for k in settings} == settings  # every one set away from its default, and kept
    torch.testing.assert_close(loaded.alphas_cumprod, s.alphas_cumprod)


def test_from_sdxl_config_like_the_public_snippet():
    base = LCMScheduler(beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    s = TimestepShiftLCMScheduler.from_config(base.config, shifted_timestep=250)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [249, 187, 124, 62]


def test_rejects_bad_shift():
    with pytest.raises(ValueError, match="shifted_timestep"):
        TimestepShiftLCMScheduler(shifted_timestep=0)


def test_inside_stock_sdxl_pipeline(tiny_sdxl_dir, tmp_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.scheduler = TimestepShiftLCMScheduler.from_config(pipe.scheduler.config, shifted_timestep=250)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(int(args[1])), with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=0.0, output_type="np").images
    assert seen == [249, 187, 124, 62]
    assert out.shape == (1, 16, 16, 3)

    pipe.save_pretrained(tmp_path / "pipe")
    again = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(again.scheduler, TimestepShiftLCMScheduler)
    assert again.scheduler.config.shifted_timestep == 250
    # In a fresh process: diffusers resolves a custom component's module among those imported.
    import subprocess
    import sys

    code = (
        "from nitrofusion import TimestepShiftLCMScheduler\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r})\n"
        "print(type(pipe.scheduler).__name__, pipe.scheduler.config.shifted_timestep)"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert fresh.stdout.split() == ["TimestepShiftLCMScheduler", "250"], fresh.stderr[-2000:]


def test_a_small_shift_that_repeats_timesteps_still_runs_every_step_once():
    """Shift 2 at 4 steps gives the UNet timesteps 1, 1, 0, 0: the step index started at the
    second match, ran past the schedule, and re-noised the last output."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    s = make(2)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [1, 1, 0, 0]
    sample = x
    for i, t in enumerate(s.timesteps):
        assert s.step_index in (None, i)
        out = s.step(fake_unet(sample, int(t)), t, sample, generator=torch.Generator().manual_seed(i))
        sample = out.prev_sample
    assert s.step_index == 4
    assert torch.equal(out.prev_sample, out.denoised)  # the last step returns its estimate, not re-noised


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("shift", [250, 500])
def test_the_students_training_maths_is_the_samplers_step(prediction_type, shift):
    """Training reads the student's output through ShiftedStudent, sampling through the scheduler's
    step: for every prediction type the two give the same x0 and the same next input."""
    from types import SimpleNamespace

    from nitrofusion.data.conditioning import Conditioning
    from nitrofusion.training.student import ShiftedStudent, add_noise

    s = TimestepShiftLCMScheduler(shifted_timestep=shift, prediction_type=prediction_type)
    maths = ShiftedStudent(TimestepShiftLCMScheduler.from_config(s.config))
    unet = lambda x, t, *_, **__: SimpleNamespace(sample=fake_unet(x, int(t[0])))  # noqa: E731
    cond = Conditioning(torch.zeros(2, 1, 4), torch.zeros(2, 4))  # the fake UNet reads none of it
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    s.set_timesteps(4)
    levels = maths.levels(4)
    for i, t in enumerate(s.timesteps):
        noise = torch.randn_like(x) if i < 3 else None
        prev, denoised = s.step(fake_unet(x, int(t)), t, x, noise=noise, return_dict=False)
        x0 = maths.x0(unet, x, levels[i], cond)
        torch.testing.assert_close(x0, denoised, rtol=1e-5, atol=1e-5)
        if noise is not None:
            torch.testing.assert_close(add_noise(x0, noise, levels[i + 1], maths.alphas_cumprod), prev)
        x = prev


def test_the_student_is_never_trained_or_sampled_with_the_teachers_clipping(tiny_sdxl_dir, tmp_path):
    """A teacher whose scheduler clips its x0 (clip_sample) gave the exported student a sampler
    that clips where training did not."""
    import json
    import shutil

    from nitrofusion.pipelines import load_pipeline
    from nitrofusion.training.student import ShiftedStudent

    with pytest.raises(ValueError, match="clip or threshold"):
        ShiftedStudent(TimestepShiftLCMScheduler(clip_sample=True))
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sdxl_dir, teacher)
    config = teacher / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "clip_sample": True, "thresholding": True}))
    pipe = load_pipeline(teacher, sampler="shift-lcm")
    assert not pipe.scheduler.config.clip_sample and not pipe.scheduler.config.thresholding


def test_built_from_an_sd15_pndm_config_it_keeps_the_schedule_and_drops_what_it_does_not_take(tmp_path):
    """A student of SD1.5 carried PNDM's skip_prk_steps into its scheduler config: every stock
    diffusers load warned that the attribute was not expected."""
    from diffusers import PNDMScheduler

    pndm = PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    s = TimestepShiftLCMScheduler.from_base_config(pndm.config, shifted_timestep=500)
    assert "skip_prk_steps" not in s.config
    assert (s.config.steps_offset, s.config.set_alpha_to_one, s.config.shifted_timestep) == (1, False, 500)
    s.save_pretrained(tmp_path)
    import json

    assert "skip_prk_steps" not in json.loads((tmp_path / "scheduler_config.json").read_text())


def test_from_base_config_samples_as_a_student_whatever_the_base_scheduler_clips():
    """The README builds the scheduler for a stock pipeline from that pipeline's config: a DDIM
    config's clip_sample/thresholding (and LCM's 50 original steps) came along with from_config,
    clipping latents to [-1, 1] at every step."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(clip_sample=True, thresholding=True, beta_schedule="scaled_linear")
    s = TimestepShiftLCMScheduler.from_base_config(ddim.config, shifted_timestep=250)
    assert (s.config.clip_sample, s.config.thresholding, s.config.original_inference_steps) == (False, False, 4)
    assert s.config.beta_schedule == "scaled_linear"
    s.set_timesteps(4)
    assert s.noise_timesteps.tolist() == [999, 749, 499, 249]
    assert TimestepShiftLCMScheduler.from_base_config(ddim.config, clip_sample=True).config.clip_sample
