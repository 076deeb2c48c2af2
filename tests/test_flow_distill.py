"""Distilling an SD3-architecture flow transformer (a tiny one, random weights): the student's
Euler maths against the stock pipeline, the transformer-block backbone, a whole run whose
exported pipeline stock diffusers samples, pairs, resume, LoRA, offload, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from helpers import config, same_student, snapshot, straight_and_resumed
from safetensors.torch import load_file

from nitrofusion.cli import main
from nitrofusion.data.conditioning import TextEncoder
from nitrofusion.discriminator.backbone import TransformerBlockFeatures, feature_blocks
from nitrofusion.errors import UserError
from nitrofusion.pipelines import generate, load_pipeline
from nitrofusion.pipelines.generation import default_guidance
from nitrofusion.testing import TINY_SD3, save_tiny_sd3, tiny_sd3_pipeline
from nitrofusion.training.distill import Distiller
from nitrofusion.training.flow_student import FlowStudent


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def stock_pipeline(folder: Path) -> StableDiffusion3Pipeline:
    # SD3 without T5 (as the tiny one is) loads in stock diffusers with the T5 parts named as None.
    return StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)


def flow_config(sd3_dir: Path, out: Path, *overrides: str):
    return config(sd3_dir, out, "data.resolution=64", *overrides)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_student_maths_is_the_stock_pipelines_euler_sampler(steps):
    """Backward simulation to the last step, then x0 there, lands where StableDiffusion3Pipeline
    with the teacher's FlowMatchEulerDiscreteScheduler does (no CFG), at 1, 2 and 4 steps."""
    pipe = tiny_sd3_pipeline()
    maths = FlowStudent(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config))
    prompts = ["a red cube", "a cat"]
    cond = TextEncoder(pipe, 64, 64)(prompts)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, level = maths.simulate(pipe.transformer, noise, steps, steps - 1, cond)
        ours = maths.x0(pipe.transformer, x, level, cond)
        stock = pipe(
            prompt=prompts,
            num_inference_steps=steps,
            guidance_scale=0.0,
            height=64,
            width=64,
            latents=noise.clone(),
            output_type="latent",
        ).images
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
    assert maths.levels(1) == [1.0]  # one step starts from pure noise
    assert maths.levels(steps) == pipe.scheduler.sigmas[:steps].tolist()


def test_add_noise_is_the_flow_interpolation_at_sigma_t_over_1000():
    maths = FlowStudent(FlowMatchEulerDiscreteScheduler(shift=3.0))
    x0, eps = torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 3.0)
    torch.testing.assert_close(maths.add_noise(x0, eps, 250), 0.75 * x0 + 0.25 * eps)
    with pytest.raises(ValueError, match="fixed shift"):
        FlowStudent(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_the_backbone_reads_the_first_half_of_the_blocks_and_runs_no_later_one():
    pipe = tiny_sd3_pipeline()
    model = pipe.transformer
    assert feature_blocks(model) == 1 == (TINY_SD3.num_layers + 1) // 2
    backbone = TransformerBlockFeatures(model)
    cond = TextEncoder(pipe, 64, 64)(["a cat", "a dog"])
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([500, 500])
    seen = {}
    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[1]), prepend=True)
    maps = backbone(x, t, cond)
    assert list(seen) == [0]  # the second block never ran
    width = TINY_SD3.attention_head_dim * TINY_SD3.num_attention_heads
    assert [tuple(m.shape) for m in maps] == [(2, width, 4, 4)]  # tokens on the 8/2 x 8/2 patch grid
    # Token (row, col) of the block's output is the map's pixel (row, col).
    torch.testing.assert_close(maps[0][:, :, 1, 2], seen[0][:, 1 * 4 + 2])
    assert backbone.feature_shapes(8) == [(width, 4, 4)]
    assert not any(p.requires_grad for p in model.parameters())
    backbone.train()
    assert not model.training
    model(hidden_states=x, timestep=t.float(), encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled)
    assert len(seen) == 2  # outside the backbone's call the hooks leave the teacher alone


def test_a_run_exports_a_student_that_stock_diffusers_samples(sd3_dir, tmp_path):
    d = Distiller(
        flow_config(sd3_dir, tmp_path / "run", "refine.steps_per_stage=[2,2]", "run.validate_every=4"), progress=False
    )
    teacher = snapshot(d.teacher_model)
    assert isinstance(d.backbone, TransformerBlockFeatures) and isinstance(d.maths, FlowStudent)
    out = d.train()
    student = load_file(str(out / "student_transformer.safetensors"))
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # it trained
    assert all(torch.equal(teacher[k], v) for k, v in d.teacher_model.state_dict().items())  # the teacher did not
    assert (out / "stages" / "2-step" / "student_transformer.safetensors").is_file()
    assert (out / "validation" / f"step-{d.step:08d}.png").is_file() and not (out / "student_unet.safetensors").exists()
    assert json.loads((out / "pipeline" / "nitrofusion.json").read_text())["guidance_scale"] == 0.0

    stock = stock_pipeline(out / "pipeline")  # stock diffusers, nothing of ours
    assert type(stock.scheduler) is FlowMatchEulerDiscreteScheduler
    assert stock.scheduler.config.shift == TINY_SD3.scheduler_shift  # the teacher's
    assert all(torch.equal(student[k], v) for k, v in stock.transformer.state_dict().items())
    pipe = load_pipeline(out / "pipeline", device="cpu")
    assert pipe.nitro_sampler == "native" and default_guidance("native", pipe) == 0.0  # not SD3's CFG 7
    ours = generate(pipe, ["a cat"], steps=2, seed=1, progress=False)[0]
    assert ours.metadata["guidance_scale"] == "0"
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = stock(
            prompt="a cat", num_inference_steps=2, guidance_scale=0.0, latents=noise.clone(), output_type="latent"
        ).images
        cond = TextEncoder(stock, 64, 64)(["a cat"])
        x, level = d.maths.simulate(stock.transformer, noise, 2, 1, cond)
        b = d.maths.x0(stock.transformer, x, level, cond)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the exported scheduler samples as training simulated


def test_pairs_from_an_sd3_teacher_train_a_student(sd3_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    code = main(
        ["make-pairs", "--model", str(sd3_dir), "--n", "4", "--steps", "2", "--out", str(pairs), "--resolution", "64"]
    )
    assert code == 0, capsys.readouterr().err
    code = main(
        [
            "distill",
            "--set",
            f"model.teacher={sd3_dir}",
            "--set",
            f"data.pairs={pairs}",
            "--set",
            "data.teacher_steps=2",
            "--set",
            "data.resolution=64",
            "--set",
            "data.batch_size=2",
            "--set",
            "discriminator.width=4",
            "--set",
            "discriminator.candidates=2",
            "--set",
            "refine.steps_per_stage=[2]",
            "--set",
            "run.validate_every=0",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "student_transformer.safetensors").is_file()


def test_a_flow_run_resumes_as_if_uninterrupted(sd3_dir, tmp_path):
    common = ["data.resolution=64", "refine.steps_per_stage=[2,2]", "run.checkpoint_every=2", "loss.pretrain_steps=1"]
    straight, resumed = straight_and_resumed(sd3_dir, tmp_path, *common)
    assert resumed.step == straight.step == 5
    assert same_student(tmp_path / "a", tmp_path / "b", "student_transformer.safetensors")


def test_a_lora_flow_student_with_its_teacher_offloaded(sd3_dir, tmp_path):
    """LoRA adapters on the shared teacher transformer, text encoders and VAE in host memory: the
    exported transformer is a plain one (adapters folded in) that stock diffusers loads."""
    cfg = flow_config(sd3_dir, tmp_path / "run", "model.lora_rank=2", "model.teacher_offload=true")
    d = Distiller(cfg, progress=False)
    assert d.student_shares_teacher and "text" in d.offload._home
    out = d.train()
    stock = stock_pipeline(out / "pipeline")
    student = load_file(str(out / "student_transformer.safetensors"))
    assert not any("lora" in k for k in student)
    assert all(torch.equal(student[k], v) for k, v in stock.transformer.state_dict().items())


def test_the_unet_only_offload_groups_of_a_flow_teacher(sd3_dir, tmp_path):
    """Without a LoRA student, what the backbone never reads (the later blocks, the output layers)
    lives in host memory; a step runs with it there."""
    d = Distiller(flow_config(sd3_dir, tmp_path / "run", "model.teacher_offload=true"), progress=False)
    model = d.teacher_model
    later = list(model.transformer_blocks)[d.backbone.blocks :]
    assert later and {id(t) for t, _ in d.offload._home["decoder"]} == {
        id(t) for m in (*later, model.norm_out, model.proj_out) for t in (*m.parameters(), *m.buffers())
    }
    d.train_step()


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.objective=dmd2", "loss.objective dmd2 is for UNet teachers"),
        ("loss.objective=adm", "loss.objective adm is for UNet teachers"),
        ("model.shift=500", "model.shift is the UNet student's LCM timestep shift"),
        ("data.teacher_timesteps=[999]", "takes no custom timesteps"),
    ],
)
def test_what_a_flow_teacher_cannot_take_is_refused_before_any_pair(sd3_dir, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        Distiller(
            flow_config(sd3_dir, tmp_path / "run", "data.pairs=" + str(tmp_path / "pairs"), override), progress=False
        )
    assert not (tmp_path / "pairs").exists()


def test_the_pixel_discriminator_is_refused_for_a_flow_teacher(sd3_dir, tmp_path):
    cfg = flow_config(
        sd3_dir, tmp_path / "run", "loss.pretrain_kind=adversarial", "loss.pretrain_steps=1", "pretrain.pixel_weight=1"
    )
    with pytest.raises(UserError, match="pretrain.pixel_weight"):
        Distiller(cfg, progress=False)


def test_the_sd3_preset_distils_an_sd3_teacher(sd3_dir, tmp_path):
    from nitrofusion.training.config import load_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red cube\n")
    small = ["data.resolution=64", "data.batch_size=2", "optim.grad_accumulation=1", "optim.mixed_precision=no"]
    small += ["discriminator.width=4", "discriminator.candidates=2", "data.teacher_steps=2"]
    where = [f"model.teacher={sd3_dir}", f"data.prompts={prompts}", f"run.output_dir={tmp_path / 'run'}"]
    d = Distiller(load_config("sd3", None, where + small), progress=False)
    assert d.flow and d.cfg.model.teacher_offload and d.cfg.data.teacher_guidance == 7.0
    assert len(d.pool) == 3 * 4 * feature_blocks(d.teacher_model) * 2  # kinds x t* x read blocks x candidates
    logs = d.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in logs.items() if k in ("g_loss", "d_loss"))


def test_an_sd3_students_lora_loads_into_the_stock_pipeline(sd3_dir, tmp_path, capsys):
    """export-lora of a flow student: `transformer.` keys that StableDiffusion3Pipeline's
    load_lora_weights takes; fused into the teacher, it is the student (full rank here)."""
    out = Distiller(flow_config(sd3_dir, tmp_path / "run"), progress=False).train()
    student = out / "student_transformer.safetensors"
    lora = tmp_path / "lora"
    args = ["export-lora", "--student", str(student), "--teacher", str(sd3_dir), "--rank", "64", "--dtype", "fp32"]
    assert main([*args, "--out", str(lora)]) == 0, capsys.readouterr().err
    assert "relative error" in capsys.readouterr().out
    keys = load_file(str(lora / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    pipe = stock_pipeline(sd3_dir)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    want, got = load_file(str(student)), pipe.transformer.state_dict()
    teacher = stock_pipeline(sd3_dir).transformer.state_dict()
    for k, v in want.items():  # every delta a LoRA can hold (weights of linear and conv layers) is there
        if k.endswith(".weight") and v.ndim in (2, 4):
            assert (got[k] - v).abs().max() < 1e-5, k
    assert any(not torch.equal(want[k], teacher[k]) for k in want)
    assert main([*args, "--out", str(tmp_path / "x.safetensors"), "--shift", "250"]) == 2
    assert "--shift is for UNet students" in capsys.readouterr().err
