"""The shipped embedded world: stock diffusers loads it, it samples deterministically,
and its evaluator is deterministic and tells real garments from noise."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

from nitrofusion.evaluation.fid import to_tensor
from nitrofusion.pipelines import generate, load_pipeline
from nitrofusion.pipelines.generation import default_guidance
from nitrofusion.world import data
from nitrofusion.world.evaluator import Evaluator
from nitrofusion.world.spec import choose_model, evaluator_path, flow_teacher_path, student_path, teacher_path


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.load(evaluator_path())


def test_stock_diffusers_loads_and_runs_the_world():
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher_path(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a sneaker", num_inference_steps=2, guidance_scale=5.0, output_type="np").images
    assert out.shape == (1, 32, 32, 3)
    assert len(pipe.tokenizer) == 49408


@pytest.mark.parametrize("steps,sampler", [(1, "shift-lcm"), (25, "native")])
def test_generation_shape_and_determinism(steps, sampler):
    pipe = load_pipeline(teacher_path(), sampler=sampler)
    a = generate(pipe, ["a photo of a bag", "a sandal"], steps=steps, seed=5, progress=False)
    b = generate(pipe, ["a photo of a bag", "a sandal"], steps=steps, seed=5, progress=False)
    for x, y in zip(a, b):
        assert x.image.size == (32, 32)
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))


def test_evaluator_is_deterministic_and_separates_real_from_noise(evaluator):
    images, labels = data.load_split("test")
    real = data.to_model_range(images[:500])
    noise = torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first = evaluator.score(real, labels[:500])
    again = evaluator.score(real, labels[:500])
    assert first == again
    assert first["class_accuracy"] > 0.85
    on_noise = evaluator.score(noise, labels[:500])
    assert on_noise["class_accuracy"] < 0.3
    assert on_noise["domain_fd"] > 10 * first["domain_fd"]


def test_teacher_draws_the_prompted_class(evaluator):
    """A small-sample version of docs/world.md's measurement: 25 CFG steps beat chance by far."""
    pipe = load_pipeline(teacher_path(), sampler="native")
    pairs = data.evaluation_prompts(40, seed=1)
    results = generate(pipe, [p for p, _ in pairs], steps=25, seed=1, batch_size=40, progress=False)
    score = evaluator.score(to_tensor([r.image for r in results]), torch.tensor([c for _, c in pairs]))
    assert score["class_accuracy"] >= 0.6


def test_prompts_cover_every_class():
    prompts = data.all_prompts()
    assert {c for _, c in prompts} == set(range(10))
    assert "a photo of an ankle boot" in [p for p, _ in prompts]


def test_shipped_student_is_the_default_and_draws_in_one_step(evaluator):
    """The shipped student (docs/results.md) beats the teacher's own single step by far."""
    choice = choose_model(None, None, None)
    assert choice.unet == student_path() / "unet" / "diffusion_pytorch_model.safetensors" and choice.shift == 250
    pairs = data.evaluation_prompts(100, seed=2)
    labels = torch.tensor([c for _, c in pairs])
    accuracy = {}
    for name, unet in (("student", choice.unet), ("teacher", None)):
        pipe = load_pipeline(choice.model, unet=unet, sampler="shift-lcm", shift=250)
        results = generate(pipe, [p for p, _ in pairs], steps=1, seed=2, batch_size=100, progress=False)
        accuracy[name] = evaluator.score(to_tensor([r.image for r in results]), labels)["class_accuracy"]
    assert accuracy["student"] >= 0.5 and accuracy["teacher"] <= 0.3, accuracy


def test_the_flow_world_is_a_stock_sd3_pipeline_on_the_worlds_latents():
    pipe = StableDiffusion3Pipeline.from_pretrained(
        flow_teacher_path(), text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a sneaker", num_inference_steps=2, guidance_scale=5.0, output_type="np").images
    assert out.shape == (1, 32, 32, 3)
    unet_world = StableDiffusionXLPipeline.from_pretrained(teacher_path(), torch_dtype=torch.float32).vae
    a, b = unet_world.state_dict(), pipe.vae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the two worlds share one VAE"
    assert pipe.vae.config.scaling_factor == unet_world.config.scaling_factor


def test_flow_teacher_draws_the_prompted_class(evaluator):
    """docs/world.md's flow teacher at a small sample: 28 Euler steps with CFG 5 beat chance by far."""
    pipe = load_pipeline(choose_model("embedded-flow-teacher", None, None).model, sampler="native")
    assert default_guidance("native", pipe) == 5.0  # the world's CFG, recorded in the folder (SD3's own is 7)
    pairs = data.evaluation_prompts(20, seed=1)  # two a class
    results = generate(pipe, [p for p, _ in pairs], steps=28, seed=1, batch_size=20, progress=False)
    score = evaluator.score(to_tensor([r.image for r in results]), torch.tensor([c for _, c in pairs]))
    assert score["class_accuracy"] >= 0.6


def test_embedded_model_names():
    assert choose_model("embedded-teacher", None, None).unet is None
    assert choose_model("embedded-flow-teacher", None, None).model == flow_teacher_path()
    explicit = choose_model(None, "other.safetensors", None)
    assert str(explicit.unet) == "other.safetensors" and explicit.shift is None
    assert choose_model("/some/dir", None, 500).model == Path("/some/dir")


def test_stock_diffusers_loads_the_student_nitrosd_style():
    from diffusers import UNet2DConditionModel

    from nitrofusion.scheduling import TimestepShiftLCMScheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(
        teacher_path(),
        unet=UNet2DConditionModel.from_pretrained(student_path() / "unet", torch_dtype=torch.float32),
        scheduler=TimestepShiftLCMScheduler.from_pretrained(student_path() / "scheduler"),
        torch_dtype=torch.float32,
    )
    ours = load_pipeline(teacher_path(), unet=choose_model(None, None, None).unet, shift=250)
    g = [torch.Generator().manual_seed(0)]
    a = pipe("a photo of a bag", num_inference_steps=1, guidance_scale=0, generator=g, output_type="np").images
    g = [torch.Generator().manual_seed(0)]
    b = ours("a photo of a bag", num_inference_steps=1, guidance_scale=0, generator=g, output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_shipped_students_scheduler_config_holds_only_its_own_keys(caplog):
    """It was made from the teacher's Euler config, whose keys (use_karras_sigmas, ...) stock
    diffusers warned about on every load."""
    from diffusers.utils import logging as diffusers_logging

    from nitrofusion.scheduling import TimestepShiftLCMScheduler

    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            scheduler = TimestepShiftLCMScheduler.from_pretrained(student_path() / "scheduler")
    finally:
        diffusers_logging.disable_propagation()
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]
    assert scheduler.config.shifted_timestep == 250
