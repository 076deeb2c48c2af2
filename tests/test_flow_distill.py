"""Distilling an SD3-architecture flow transformer (a tiny one, random weights): the student's
Euler maths against the stock pipeline, the transformer-block backbone, a whole run whose
exported pipeline stock diffusers samples, pairs, resume, LoRA, offload, DMD2 and ADM/DMDX,
the LoRA export, and what is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from helpers import config, same_student, snapshot, straight_and_resumed
from safetensors.torch import load_file

from nitrofusion.cli import main
from nitrofusion.data.conditioning import TextEncoder
from nitrofusion.discriminator.backbone import TransformerBlockFeatures, feature_blocks
from nitrofusion.errors import UserError
from nitrofusion.objectives.scores import FlowProcess
from nitrofusion.pipelines import generate, load_pipeline
from nitrofusion.pipelines.generation import default_guidance
from nitrofusion.pipelines.loading import flow_file_sigmas
from nitrofusion.testing import TINY_SD3, save_tiny_sd3, save_tiny_sdxl, tiny_sd3_pipeline
from nitrofusion.training.config import load_config
from nitrofusion.training.distill import Distiller
from nitrofusion.training.flow_student import FlowStudent
from nitrofusion.training.lora import FLOW_TARGETS


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def stock_pipeline(folder: Path) -> StableDiffusion3Pipeline:
    # SD3 without T5 (as the tiny one is) loads in stock diffusers with the T5 parts named as None.
    return StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)


def flow_config(sd3_dir: Path, out: Path, *overrides: str):
    return config(sd3_dir, out, "data.resolution=64", *overrides)


@pytest.mark.parametrize("levels", ["trailing", "stock"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_student_maths_is_the_stock_pipelines_euler_sampler(steps, levels):
    """Backward simulation to the last step, then x0 there, lands where StableDiffusion3Pipeline
    with the teacher's FlowMatchEulerDiscreteScheduler does (no CFG), at 1, 2 and 4 steps: called
    with the student's `sigmas` (trailing levels), or without (the scheduler's own spacing)."""
    pipe = tiny_sd3_pipeline()
    maths = FlowStudent(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), levels)
    prompts = ["a red cube", "a cat"]
    cond = TextEncoder(pipe, 64, 64)(prompts)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, level = maths.simulate(pipe.transformer, noise, steps, steps - 1, cond)
        ours = maths.x0(pipe.transformer, x, level, cond)
        stock = pipe(
            prompt=prompts,
            num_inference_steps=steps,
            sigmas=maths.pipeline_sigmas(steps),
            guidance_scale=0.0,
            height=64,
            width=64,
            latents=noise.clone(),
            output_type="latent",
        ).images
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
    assert maths.levels(1) == [1.0]  # one step starts from pure noise
    assert maths.levels(steps) == pipe.scheduler.sigmas[:steps].tolist()


def test_trailing_levels_are_evenly_spaced_where_the_stock_spacing_ends_on_the_data():
    """At two steps the scheduler's own levels are 1 and ~0: the second step starts on the data
    and does nothing. Trailing ones are 1 - j/k, through the scheduler's shift s: s u / (1 + (s - 1) u)."""
    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        stock, trailing = FlowStudent(scheduler, "stock"), FlowStudent(scheduler)
        assert stock.levels(2)[1] < 0.01
        for k in (1, 2, 3, 4):
            expected = [shift * u / (1 + (shift - 1) * u) for u in (1 - j / k for j in range(k))]
            assert trailing.levels(k) == pytest.approx(expected, abs=1e-6)
            assert trailing.sigmas(k)[-1] == 0.0
    assert FlowStudent(scheduler).recorded_sigmas() == {
        1: [1.0],
        2: [1.0, 0.5],
        3: [1.0, 2 / 3, 1 / 3],
        4: [1.0, 0.75, 0.5, 0.25],
    }
    assert FlowStudent(scheduler, "stock").recorded_sigmas() == {}
    with pytest.raises(ValueError, match="levels must be one of trailing, stock"):
        FlowStudent(scheduler, "karras")


def test_add_noise_is_the_flow_interpolation_at_sigma_t_over_1000():
    maths = FlowStudent(FlowMatchEulerDiscreteScheduler(shift=3.0))
    x0, eps = torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 3.0)
    torch.testing.assert_close(maths.add_noise(x0, eps, 250), 0.75 * x0 + 0.25 * eps)
    with pytest.raises(ValueError, match="fixed shift"):
        FlowStudent(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_the_backbone_reads_the_first_half_of_the_blocks_and_runs_no_later_one():
    from nitrofusion.models.builders import SD3Spec, build_sd3_pipeline

    pipe = build_sd3_pipeline(SD3Spec(num_layers=4))
    model = pipe.transformer
    assert feature_blocks(model) == 2 and feature_blocks(tiny_sd3_pipeline().transformer) == 1  # 4 // 2, 2 // 2
    backbone = TransformerBlockFeatures(model)
    cond = TextEncoder(pipe, 64, 64)(["a cat", "a dog"])
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([500, 500])
    seen = {}
    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[1]), prepend=True)
    maps = backbone(x, t, cond)
    assert list(seen) == [0, 1]  # blocks 2 and 3 never ran
    width = TINY_SD3.attention_head_dim * TINY_SD3.num_attention_heads
    assert [tuple(m.shape) for m in maps] == [(2, width, 4, 4)] * 2  # tokens on the 8/2 x 8/2 patch grid
    for i in (0, 1):  # shallow to deep; token (row, col) of a block's output is its map's pixel (row, col)
        torch.testing.assert_close(maps[i].flatten(2).transpose(1, 2), seen[i])
        torch.testing.assert_close(maps[i][:, :, 1, 2], seen[i][:, 1 * 4 + 2])
    assert backbone.feature_shapes(8) == [(width, 4, 4)] * 2
    assert not any(p.requires_grad for p in model.parameters())
    backbone.train()
    assert not model.training
    model(hidden_states=x, timestep=t.float(), encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled)
    assert len(seen) == 4  # outside the backbone's call the hooks leave the teacher alone


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
    about = json.loads((out / "pipeline" / "nitrofusion.json").read_text())
    assert about["guidance_scale"] == 0.0 and about["sigmas"]["2"] == [1.0, 0.5]  # trailing levels, recorded
    # The resolved config.yaml loads back (it recorded the transformer's LoRA targets without LoRA, refused)
    assert load_config(path=out / "config.yaml").to_dict() == d.cfg.to_dict()

    stock = stock_pipeline(out / "pipeline")  # stock diffusers, nothing of ours
    assert type(stock.scheduler) is FlowMatchEulerDiscreteScheduler
    assert stock.scheduler.config.shift == TINY_SD3.scheduler_shift  # the teacher's
    assert all(torch.equal(student[k], v) for k, v in stock.transformer.state_dict().items())
    pipe = load_pipeline(out / "pipeline", device="cpu")
    assert pipe.nitro_sampler == "native" and default_guidance("native", pipe) == 0.0  # not SD3's CFG 7
    assert pipe.nitro_sigmas[2] == [1.0, 0.5]
    ours = generate(pipe, ["a cat"], steps=2, seed=1, progress=False)[0]
    assert ours.metadata["guidance_scale"] == "0" and ours.metadata["sigmas"] == "[1.0, 0.5]"
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():

        def sample(**levels):
            return stock(
                prompt="a cat",
                num_inference_steps=2,
                guidance_scale=0.0,
                latents=noise.clone(),
                output_type="latent",
                **levels,
            ).images

        a = sample(sigmas=about["sigmas"]["2"])
        cond = TextEncoder(stock, 64, 64)(["a cat"])
        x, level = d.maths.simulate(stock.transformer, noise, 2, 1, cond)
        b = d.maths.x0(stock.transformer, x, level, cond)
        without = sample()  # the scheduler's own levels: not what the student trained at
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the exported scheduler samples as training simulated
    assert not torch.allclose(a, without, rtol=1e-4, atol=1e-5)
    # Our sampler passes the recorded levels: its image is the stock call's with them.
    image = generate(pipe, ["a cat"], steps=2, seed=3, progress=False)[0].image
    with torch.no_grad():
        a_image = stock(
            prompt="a cat",
            num_inference_steps=2,
            sigmas=[1.0, 0.5],
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images[0]
    assert np.abs(np.asarray(image, dtype=np.float64) - np.round(a_image * 255)).max() <= 1


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
    # Other levels would train the checkpoint's student at other noise levels: refused, as a new shift is.
    stock = Distiller(config(sd3_dir, tmp_path / "b", *common, "model.flow_levels=stock"), progress=False)
    with pytest.raises(UserError, match="made with model.flow_levels='trailing', this run has 'stock'"):
        stock.resume("latest")
    # A checkpoint from before the key trained at the stock levels: the message says how to go on.
    older = resumed.cfg.to_dict()
    del older["model"]["flow_levels"]
    with pytest.raises(UserError, match="flow_levels='stock', this run has 'trailing': resume with --set model"):
        resumed._check_resumable(older)
    stock._check_resumable(older)


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
    assert load_config(path=out / "config.yaml").model.lora_targets == list(FLOW_TARGETS)  # the transformer's own


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


def test_a_flow_students_anchor_applies_at_every_step(sd3_dir, tmp_path):
    """Its Euler steps draw no noise: the k-step sample depends on the pair's noise alone, so the
    teacher's x0 is the target of step 1 too (a UNet student's fresh noise makes it step 0's only;
    there, this config is refused as an anchor that would never apply)."""
    stages = ["refine.steps_per_stage=[0,1]", "refine.mix=last"]  # the two-step stage at its second step
    plain = Distiller(flow_config(sd3_dir, tmp_path / "a", *stages), progress=False)
    anchored = Distiller(flow_config(sd3_dir, tmp_path / "b", *stages, "loss.regression_weight=3"), progress=False)
    seen, objective = [], anchored.objective
    anchored.objective = lambda d, fake, real, *rest: (
        seen.append((fake.detach(), real.detach())) or objective(d, fake, real, *rest)
    )
    p, a = plain.train_step(), anchored.train_step()
    assert a["index"] == p["index"] == 1 and a["regression"] > 0 and "regression" not in p
    ((fake, real),) = seen  # the target: the pair's teacher x0, at the second step too
    assert a["regression"] == pytest.approx(torch.nn.functional.mse_loss(fake, real).item(), rel=1e-5)
    assert a["g_loss"] == pytest.approx(p["g_loss"] + 3 * a["regression"], rel=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.shift=500", "model.shift is the UNet student's LCM timestep shift"),
        ("data.teacher_timesteps=[999]", "takes no custom timesteps"),
    ],
)
def test_what_a_flow_teacher_cannot_take_is_refused_before_any_pair(sd3_dir, tmp_path, override, message):
    pairs = "data.pairs=" + str(tmp_path / "pairs")
    with pytest.raises(UserError, match=message):
        Distiller(flow_config(sd3_dir, tmp_path / "run", pairs, override), progress=False)
    assert not (tmp_path / "pairs").exists()


@pytest.mark.parametrize(
    "objective",
    [
        ["loss.objective=dmd2", "dmd.gan_g_weight=0.1", "dmd.gan_d_weight=0.1", "loss.d_steps_per_g=1"],
        ["loss.objective=adm", "loss.d_steps_per_g=1", "loss.pretrain_kind=adversarial", "loss.pretrain_steps=1"],
    ],
    ids=["dmd2", "adm-dmdx"],
)
def test_dmd2_and_adm_distil_an_sd3_teacher(sd3_dir, tmp_path, objective):
    """The family's objectives on a flow teacher: its scores read as x0 through the velocity, the
    DMD2 classifier on the fake transformer's tokens, DMDX's latent and pixel pre-training."""
    d = Distiller(flow_config(sd3_dir, tmp_path / "run", *objective), progress=False)
    fake = d.critics["fake"]
    assert isinstance(fake.process, FlowProcess) and fake.unet is not d.teacher_model
    if "loss.objective=dmd2" in objective:
        assert isinstance(fake.encoder, TransformerBlockFeatures) and not fake.encoder.frozen
    else:
        assert "pixel" in d.critics
    before = snapshot(d.student)
    for _ in range(3):
        logs = d.train_step()
        d.step += 1
        assert all(math.isfinite(v) for v in logs.values()), logs
    assert any(not torch.equal(before[k], v) for k, v in d.student.state_dict().items())
    assert "fake_loss" in logs and ("dm_loss" in logs) == ("loss.objective=dmd2" in objective)


def test_the_flow_real_score_is_guided_velocity_read_as_x0(sd3_dir, tmp_path):
    d = Distiller(flow_config(sd3_dir, tmp_path / "run", "loss.objective=dmd2", "dmd.real_guidance=3"), progress=False)
    cond, noise, _ = d.batch(0)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        guided = d.objective.real.x0(noise, t, cond)
        model = d.teacher_model  # the oracle from the transformer itself, written out here

        def v(c, x, t):
            return model(
                hidden_states=x, timestep=t, encoder_hidden_states=c.prompt_embeds, pooled_projections=c.pooled
            ).sample

        negative = d.text.negative(2)
        velocity = v(negative, noise, t) + 3 * (v(cond, noise, t) - v(negative, noise, t))
        sigma = (t.float() / 1000)[:, None, None, None]
        torch.testing.assert_close(guided, noise - sigma * velocity, rtol=1e-4, atol=1e-5)
        # The fake score learns flow matching's target: v = eps - x0 at x_t = (1 - sigma) x0 + sigma eps.
        fake = d.critics["fake"]
        x0 = torch.randn_like(noise)
        loss = fake.denoising_loss(x0, cond, torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        t2 = fake.training_timesteps(2, g, noise.device)  # all of [0, T), as DMD2 trains it
        eps = torch.randn(x0.shape, generator=g)
        s2 = (t2.float() / 1000)[:, None, None, None]
        out = fake.unet(
            hidden_states=(1 - s2) * x0 + s2 * eps,
            timestep=t2,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled,
        ).sample
        torch.testing.assert_close(loss, torch.nn.functional.mse_loss(out, eps - x0))


def test_the_pixel_critic_decodes_as_the_sd3_pipeline_does(sd3_dir, tmp_path):
    """SD3's VAE shifts its latents as well as scaling them: decode(x / scale + shift)."""
    cfg = flow_config(sd3_dir, tmp_path / "run", "loss.pretrain_kind=adversarial", "loss.pretrain_steps=1")
    d = Distiller(cfg, progress=False)
    vae = d.teacher.vae
    latents = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        want = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
        torch.testing.assert_close(d.critics["pixel"].decode(latents), want)


def hub_cache(folder: Path, monkeypatch, repo: str = "org/tiny-sd3") -> str:
    """`folder` as what the local Hugging Face cache holds for `repo`, offline."""
    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):
        assert repo_id == repo and kwargs.get("local_files_only")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_the_sd3_preset_distils_a_cached_hub_teacher_in_bf16(sd3_dir, tmp_path, monkeypatch, bf16_accelerator):
    """The preset as a user runs it: a hub id in the cache, bf16, gradient checkpointing, the teacher
    offloaded; a distillation step (the pool judging) and the export, whose frozen parts are re-read
    from the cache at full precision (an SD3 index was refused there once, after all the training)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red cube\n")
    small = ["data.resolution=64", "data.batch_size=2", "optim.grad_accumulation=1", "loss.pretrain_steps=0"]
    small += ["discriminator.width=4", "discriminator.candidates=2", "data.teacher_steps=2"]
    repo = hub_cache(sd3_dir, monkeypatch)
    where = [f"model.teacher={repo}", f"data.prompts={prompts}", f"run.output_dir={tmp_path / 'run'}"]
    d = Distiller(load_config("sd3", None, where + small), progress=False)
    assert d.flow and d.cfg.model.teacher_offload and d.cfg.data.teacher_guidance == 7.0
    assert d.cfg.optim.mixed_precision == "bf16" and d.cfg.model.gradient_checkpointing
    assert len(d.pool) == 3 * 4 * feature_blocks(d.teacher_model) * 2  # kinds x t* x read blocks x candidates
    logs = d.train_step()
    d.step = 1
    assert "fake_logit" in logs and all(math.isfinite(v) for v in logs.values()), logs
    out = d.export()
    stock = stock_pipeline(out / "pipeline")
    assert stock.text_encoder.dtype == torch.float32  # the teacher's own, not their bf16 rounding
    assert torch.equal(
        stock.text_encoder.state_dict()["text_model.final_layer_norm.weight"],
        stock_pipeline(sd3_dir).text_encoder.state_dict()["text_model.final_layer_norm.weight"],
    )


def test_a_resolution_the_transformer_cannot_patch_is_refused_before_any_pair(sd3_dir, tmp_path):
    with pytest.raises(UserError, match="data.resolution must be a positive multiple of 16 for this teacher, got 72"):
        Distiller(config(sd3_dir, tmp_path / "run", "data.resolution=72"), progress=False)
    # Past its position embedding (16 patches a side of 2x2 latents of 8x8 pixels), not a traceback.
    with pytest.raises(UserError, match="data.resolution must be at most 256 px for this teacher, got 272"):
        Distiller(config(sd3_dir, tmp_path / "run", "data.resolution=272"), progress=False)


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
    # The levels the LoRA'd teacher samples at as the student: the student file's, in both headers.
    levels = {1: [1.0], 2: [1.0, 0.5], 3: [1.0, 2 / 3, 1 / 3], 4: [1.0, 0.75, 0.5, 0.25]}
    assert flow_file_sigmas(student) == flow_file_sigmas(lora / "pytorch_lora_weights.safetensors") == levels
    # From the exported pipeline folder (its transformer/ written by diffusers): its nitrofusion.json's.
    from_pipeline = tmp_path / "from-pipeline.safetensors"
    assert main(["export-lora", "--student", str(out / "pipeline"), *args[3:], "--out", str(from_pipeline)]) == 0
    assert flow_file_sigmas(from_pipeline) == levels
    capsys.readouterr()
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
    # Our loading of it (generate/evaluate/app --lora): fused, and sampled as the student is, at its
    # recorded levels without CFG, as the exported pipeline folder is.
    ours, exported = load_pipeline(sd3_dir, lora=lora, device="cpu"), load_pipeline(out / "pipeline", device="cpu")
    assert (ours.nitro_guidance, ours.nitro_sigmas) == (exported.nitro_guidance, exported.nitro_sigmas) == (0, levels)
    got = ours.transformer.state_dict()
    assert all((got[k] - v).abs().max() < 1e-5 for k, v in want.items() if k.endswith(".weight") and v.ndim in (2, 4))
    with pytest.raises(UserError, match="is for a transformer, and .* has a unet"):
        load_pipeline(save_tiny_sdxl(tmp_path / "sdxl"), lora=lora, device="cpu")
    assert main([*args, "--out", str(tmp_path / "x.safetensors"), "--shift", "250"]) == 2
    assert "--shift is for UNet students" in capsys.readouterr().err


@pytest.mark.parametrize(
    "scheduler, message",
    [
        ("FlowMatchLCMScheduler", "the SD3 teacher's scheduler is a FlowMatchLCMScheduler"),
        ("dynamic", "must use a fixed shift and deterministic Euler steps"),
    ],
)
def test_a_teacher_scheduler_the_flow_student_cannot_follow_is_refused(sd3_dir, tmp_path, scheduler, message):
    """Another scheduler class, or resolution-dependent shifting (Flux's): one line, before any pair."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(sd3_dir, teacher)
    path = teacher / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    if scheduler == "dynamic":
        config["use_dynamic_shifting"] = True
    else:
        config["_class_name"] = scheduler
        index = json.loads((teacher / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", scheduler]
        (teacher / "model_index.json").write_text(json.dumps(index))
    path.write_text(json.dumps(config))
    pairs = "data.pairs=" + str(tmp_path / "pairs")
    with pytest.raises(UserError, match=message):
        Distiller(flow_config(teacher, tmp_path / "run", pairs), progress=False)
    assert not (tmp_path / "pairs").exists()


def test_the_flow_embedded_preset_is_the_demos_budget_and_distils_the_shipped_flow_teacher(tmp_path):
    """The flow world's preset differs from `demo` only where the teacher does (docs/results.md
    compares the two students), and runs from the shipped SD3-architecture teacher to an export
    that stock diffusers samples in one step."""
    flow, demo = load_config("flow-embedded"), load_config("demo")
    for part in ("loss", "optim", "refine", "discriminator"):
        assert getattr(flow, part) == getattr(demo, part), part
    assert flow.data.num_pairs == demo.data.num_pairs and flow.data.teacher_guidance == demo.data.teacher_guidance
    assert (flow.model.teacher, flow.data.teacher_steps) == ("embedded-flow-teacher", 28)  # SD3's pipeline default
    small = ["data.num_pairs=4", "data.batch_size=2", "data.teacher_steps=2", "loss.pretrain_steps=1"]
    small += ["refine.steps_per_stage=[1]", "discriminator.width=4", "run.validate_every=0"]
    where = [f"run.output_dir={tmp_path / 'run'}", f"data.pairs={tmp_path / 'pairs'}"]
    d = Distiller(load_config("flow-embedded", None, where + small), progress=False)
    assert d.flow and len(d.pool) == 3 * 4 * 2 * 4  # kinds x t* x the 2 of 4 blocks read x candidates
    out = d.train()
    stock = stock_pipeline(out / "pipeline")
    stock.set_progress_bar_config(disable=True)
    image = stock("a photo of a bag", num_inference_steps=1, guidance_scale=0.0, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_a_missing_embedded_flow_teacher_says_how_to_build_it(tmp_path, monkeypatch):
    import nitrofusion.world.spec as spec
    from nitrofusion.training.distill import resolve_teacher

    monkeypatch.setattr(spec, "flow_teacher_path", lambda: tmp_path / "not-built")
    with pytest.raises(UserError, match="embedded-flow-teacher teacher is not installed .*--stages flow --vae"):
        resolve_teacher("embedded-flow-teacher")
