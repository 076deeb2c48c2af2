"""The NitroFusion trainer on the tiny SDXL pipeline: every path, the pool's bookkeeping,
resume, faults, output format."""

import ast
import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import config, config_overrides, moved, same_student, snapshot, straight_and_resumed
from safetensors.torch import load_file, save_file

from nitrofusion.cli import main
from nitrofusion.errors import UserError
from nitrofusion.testing import save_tiny_sdxl, tiny_sdxl_pipeline
from nitrofusion.training import checkpoint
from nitrofusion.training.config import load_config, unread_keys
from nitrofusion.training.distill import Distiller, TrainingStopped
from nitrofusion.userfiles import folder_lock


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.pretrain_steps=1"],
        [],
        ["loss.kind=hinge"],
        ["loss.r1_weight=0.1"],
        ["discriminator.pool=false"],
        ["discriminator.refresh_fraction=0"],
        ["discriminator.kinds=[global_cond]"],
        ["discriminator.kinds=[global_cond,local_cond]"],
        ["discriminator.t_stars_per_step=2", "loss.d_steps_per_g=2"],
        ["optim.grad_accumulation=2"],
    ],
    ids=[
        "pretrain",
        "one-step",
        "hinge",
        "r1",
        "no-pool",
        "no-refresh",
        "no-local",
        "no-uncond",
        "2tstar-dg2",
        "accum",
    ],
)
def test_one_step_of_each_path(tiny_sdxl_dir, tmp_path, overrides):
    d = Distiller(config(tiny_sdxl_dir, tmp_path, *overrides), progress=False)
    student, pool = snapshot(d.student), snapshot(d.pool)
    judged, micro_batches = [], []  # what the step did, to check each setting took effect
    logits, batch = d.pool.logits, d.batch
    d.pool.logits = lambda ids, *a: judged.append(list(ids)) or logits(ids, *a)
    d.batch = lambda micro: micro_batches.append(micro) or batch(micro)
    logs = d.train_step()
    assert "skipped" not in logs
    assert moved(student, d.student), "the student did not move"
    assert torch.isfinite(torch.tensor(logs["g_loss"]))
    if "loss.pretrain_steps=1" not in overrides:
        assert moved(pool, d.pool), "the discriminator did not move"
    kinds = {d.pool.slots[i].kind for ids in judged for i in ids}
    groups = {d.pool.slots[i].t_star for ids in judged for i in ids}
    settings = dict(o.split("=", 1) for o in overrides)
    if settings.get("discriminator.kinds") == "[global_cond]":
        assert kinds == {"global_cond"}
    elif settings.get("discriminator.kinds") == "[global_cond,local_cond]":
        assert kinds == {"global_cond", "local_cond"}
    elif "loss.pretrain_steps=1" not in overrides:
        assert kinds == {"global_cond", "local_cond", "local_uncond"}
    if "discriminator.t_stars_per_step" in settings:
        assert len(groups) == 2  # two noise levels judged, each with its own head group
    if "discriminator.pool" in settings:
        assert groups == {-1} and len(d.pool) == 3 * d.pool.num_levels  # one static set
    refreshes = judged and not {"discriminator.refresh_fraction", "discriminator.pool"} & settings.keys()
    assert (logs.get("refreshed", 0) > 0) == bool(refreshes)  # ~1% of a dynamic pool, never a static set
    assert micro_batches == list(range(int(settings.get("optim.grad_accumulation", 1))))


def test_each_micro_batch_draws_its_own_refinement_step(tiny_sdxl_dir, tmp_path):
    """j was drawn once per iteration: the 20 micro-batches of an sdxl-preset iteration all trained
    the same step. Micro-batch 0 keeps the draw a one-micro-batch run always had."""
    d = Distiller(
        config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[0,0,0,1]", "optim.grad_accumulation=4"),
        progress=False,
    )
    js = []
    original = d.maths.simulate
    d.maths.simulate = lambda *a, **k: js.append(a[3]) or original(*a, **k)
    d.train_step()
    assert len(js) == 4 and len(set(js)) > 1, js
    first = int(torch.randint(0, 4, (1,), generator=d.rng("stepidx")))
    assert js[0] == first


@pytest.mark.parametrize("stage", [2, 3, 4])
def test_each_refinement_stage(tiny_sdxl_dir, tmp_path, stage):
    stages = [0] * (stage - 1) + [1]
    d = Distiller(
        config(tiny_sdxl_dir, tmp_path, f"refine.steps_per_stage={stages}", "refine.mix=last"), progress=False
    )
    assert d.phase(0).num_steps == stage
    calls = []
    original = d.maths.simulate
    d.maths.simulate = lambda *a, **k: calls.append(a[2:4]) or original(*a, **k)
    logs = d.train_step()
    assert calls == [(stage, stage - 1)]  # the student's own first stage-1 steps, under no_grad
    assert logs["steps"] == stage and logs["index"] == stage - 1


def spy_on_trained_heads(d: Distiller) -> dict:
    """Filled at the heads' optimizer step with the ids of the heads that have gradients."""
    captured = {}
    original_step = d.opt_d.step

    def spy():
        captured["with_grad"] = {
            i for i, h in enumerate(d.pool.heads) if any(p.grad is not None for p in h.parameters())
        }
        original_step()

    d.opt_d.step = spy
    return captured


def test_pool_bookkeeping(tiny_sdxl_dir, tmp_path):
    cfg = config(tiny_sdxl_dir, tmp_path, "discriminator.candidates=4", "discriminator.refresh_fraction=0.05")
    d = Distiller(cfg, progress=False)
    n_levels = d.pool.num_levels
    assert n_levels == 5  # tiny UNet: conv_in, 3 down residuals... + mid block
    assert len(d.pool) == 3 * 4 * n_levels * 4
    # one step: exactly one head per (kind, level) for the sampled t*, and only those get gradients
    captured = spy_on_trained_heads(d)
    refreshed_before = snapshot(d.pool)
    d.train_step()
    assert len(captured["with_grad"]) == 3 * n_levels
    slots = [d.pool.slots[i] for i in captured["with_grad"]]
    assert len({s.t_star for s in slots}) == 1
    assert len({(s.kind, s.level) for s in slots}) == 3 * n_levels
    # refresh: about 5% of heads re-initialised, with their optimizer state dropped
    d.step = 1
    ids = d.pool.refresh(0.05, d.rng("refresh"), d.opt_d)
    assert len(ids) == round(0.05 * len(d.pool))
    for i in ids:
        head = d.pool.heads[i]
        assert all(p not in d.opt_d.state for p in head.parameters())
        prefix = f"heads.{i}."
        assert any(
            not torch.equal(refreshed_before[prefix + k], v) for k, v in head.state_dict().items() if "weight" in k
        )
    trained = next(iter(captured["with_grad"] - set(ids)), None)
    if trained is not None:
        assert all(p in d.opt_d.state for p in d.pool.heads[trained].parameters())


def test_heads_are_drawn_per_micro_batch_and_all_drawn_heads_train(tiny_sdxl_dir, tmp_path):
    """A head trains only when drawn, and a 1% refresh gives it ~100 iterations: drawn once per
    iteration it trained ~6 times in its life. Each micro-batch now draws its own t* group and
    heads; micro-batch 0 keeps the one-micro-batch draw (the embedded presets train as before)."""
    d = Distiller(config(tiny_sdxl_dir, tmp_path, "optim.grad_accumulation=4"), progress=False)
    critic = d.critics["pool"]
    critic.begin_step(d)
    draws = [critic.draw(d, m) for m in range(4)]
    legacy_t = d.pool.sample_t_stars(1, d.rng("heads"))
    assert draws[0] == (legacy_t, {t: d.pool.sample_heads(t, d.rng("heads", micro=t + 1)) for t in legacy_t})
    assert len({tuple(ids) for _, heads in draws for ids in heads.values()}) == 4  # four different head sets
    assert critic.draw(d, 2) is draws[2]  # one draw per micro-batch, whatever calls it again
    captured = spy_on_trained_heads(d)
    d.train_step()
    d.step = 0  # the step's draws, as train_step made them
    critic.begin_step(d)
    assert captured["with_grad"] == {i for m in range(4) for ids in critic.draw(d, m)[1].values() for i in ids}


def test_the_students_loss_never_writes_the_heads_gradients(tiny_sdxl_dir, tmp_path):
    """The student's pass through the heads is under `frozen`: only the heads' own loss trains them.
    (ADM's check cannot show this: its student gradient never writes .grad.)"""
    d = Distiller(config(tiny_sdxl_dir, tmp_path), progress=False)
    d.critics["pool"].begin_step(d)
    cond, noise, real = d.batch(0)
    fake = (real + 0.1 * noise).requires_grad_(True)
    losses = d.objective(d, fake, real, cond, 0, True)
    losses.g_loss.backward()
    assert fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.pool.parameters())
    losses.d_loss.backward()
    assert any(p.grad is not None for p in d.pool.parameters())


def test_a_head_trained_and_refreshed_in_one_step_keeps_no_optimizer_state(tiny_sdxl_dir, tmp_path):
    """The trainer's own refresh drops the reset heads' Adam moments: a fresh head must not move by
    its predecessor's momentum."""
    d = Distiller(config(tiny_sdxl_dir, tmp_path, "discriminator.refresh_fraction=0.5"), progress=False)
    refreshed = []
    original = d.pool.refresh
    d.pool.refresh = lambda *a: refreshed.extend(original(*a)) or refreshed
    d.train_step()
    trained = {i for i, h in enumerate(d.pool.heads) if all(p in d.opt_d.state for p in h.parameters())}
    drawn = {i for ids in d.critics["pool"].draw(d, 0)[1].values() for i in ids}
    assert drawn & set(refreshed), "the test needs a head that was both trained and refreshed"
    assert trained == drawn - set(refreshed)


def test_static_head_set_is_small_and_shared(tiny_sdxl_dir, tmp_path):
    d = Distiller(config(tiny_sdxl_dir, tmp_path, "discriminator.pool=false"), progress=False)
    assert len(d.pool) == 3 * d.pool.num_levels
    assert d.pool.sample_heads(10, torch.Generator()) == d.pool.sample_heads(750, torch.Generator())
    assert d.pool.refresh(0.5, torch.Generator(), d.opt_d) == []


def test_resume_equals_uninterrupted(tiny_sdxl_dir, tmp_path):
    common = ["refine.steps_per_stage=[2,2]", "run.checkpoint_every=2", "loss.pretrain_steps=1"]
    straight, resumed = straight_and_resumed(tiny_sdxl_dir, tmp_path, *common)
    assert resumed.step == straight.step == 5
    assert same_student(tmp_path / "a", tmp_path / "b")
    for k, v in straight.pool.state_dict().items():
        assert torch.equal(v, resumed.pool.state_dict()[k])


def test_a_missing_prompt_file_is_said_before_the_teacher_loads(tiny_sdxl_dir, tmp_path, monkeypatch):
    """It was read after the teacher: minutes of loading SDXL on every process, then one line."""
    import nitrofusion.training.distill as distill
    from nitrofusion.errors import UserError

    def teacher_loaded(*args, **kwargs):
        raise AssertionError("the teacher was loaded first")

    monkeypatch.setattr(distill, "load_pipeline", teacher_loaded)
    with pytest.raises(UserError, match="nosuch.txt"):
        Distiller(config(tiny_sdxl_dir, tmp_path, f"data.prompts={tmp_path / 'nosuch.txt'}"), progress=False)


def test_a_finished_one_step_run_resumed_with_longer_stages_goes_on_to_more_steps(tiny_sdxl_dir, tmp_path):
    """docs/distill.md's recipe from 1 to 2 steps: the same run, resumed with another stage."""
    Distiller(config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[1]"), progress=False).train()
    one_step = load_file(str(tmp_path / "stages" / "1-step" / "student_unet.safetensors"))
    # Every student file records its teacher, for transfer and export-lora to check their base against.
    from nitrofusion.weights.provenance import check_teacher, recorded_teacher_samples

    recorded = recorded_teacher_samples(tmp_path / "stages" / "1-step" / "student_unet.safetensors")
    assert len(recorded) == 8
    check_teacher(recorded, UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet").state_dict(), "t")
    longer = Distiller(config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[1,1]"), progress=False)
    longer.train(resume="latest")
    assert longer.step == 2 and longer.phase(1).num_steps == 2
    log = (tmp_path / "log.txt").read_text()
    assert "resumed from step 1" in log and "refine.steps_per_stage: [1] -> [1, 1]" in log
    kept = load_file(str(tmp_path / "stages" / "1-step" / "student_unet.safetensors"))
    assert all(torch.equal(v, kept[k]) for k, v in one_step.items())  # the 1-step student is kept as it was
    two_step = load_file(str(tmp_path / "stages" / "2-step" / "student_unet.safetensors"))
    assert not all(torch.equal(v, two_step[k]) for k, v in one_step.items())


def test_resuming_with_networks_of_another_shape_is_one_clear_error(tiny_sdxl_dir, tmp_path):
    from nitrofusion.errors import UserError

    d = Distiller(
        config(tiny_sdxl_dir, tmp_path, "run.checkpoint_every=1", "refine.steps_per_stage=[1]"), progress=False
    )
    d.train()
    other = Distiller(config(tiny_sdxl_dir, tmp_path, "discriminator.candidates=3"), progress=False)
    with pytest.raises(UserError, match="made with discriminator.candidates=2, this run has 3"):
        other.resume("latest")
    # A network one config has and the other not (DMD2's classifier, from loss weights): named, one line.
    dmd2 = ["loss.objective=dmd2", "run.checkpoint_every=1", "refine.steps_per_stage=[1]"]
    Distiller(
        config(tiny_sdxl_dir, tmp_path / "dmd2", *dmd2, "dmd.gan_g_weight=0", "dmd.gan_d_weight=0"), progress=False
    ).train()
    with_classifier = Distiller(config(tiny_sdxl_dir, tmp_path / "dmd2", *dmd2), progress=False)
    with pytest.raises(
        UserError, match="checkpoint's classifier does not fit this run's .*keys missing from checkpoint"
    ) as err:
        with_classifier.resume("latest")
    assert "\n" not in str(err.value)
    # Keys that shape no network may change between runs (here: the learning rate).
    again = Distiller(config(tiny_sdxl_dir, tmp_path, "optim.lr=3e-5"), progress=False)
    again.resume("latest")
    assert again.step == 1
    # Nor what loaded weights compute: the timestep shift the student is told. It resumed quietly.
    with pytest.raises(UserError, match="made with model.shift=250, this run has 500"):
        Distiller(config(tiny_sdxl_dir, tmp_path, "model.shift=500"), progress=False).resume("latest")
    # A checkpoint from before discriminator.global_downsamples: its global heads had the local depth.
    older = again.cfg.to_dict()
    del older["discriminator"]["global_downsamples"]
    with pytest.raises(UserError, match="global_downsamples=2, this run has None: resume with --set discriminator"):
        again._check_resumable(older)
    pinned = Distiller(config(tiny_sdxl_dir, tmp_path, "discriminator.global_downsamples=2"), progress=False)
    pinned._check_resumable(older)  # as the message says


def test_a_lora_run_resumes_only_at_its_own_scale(tiny_sdxl_dir, tmp_path):
    """lora_alpha is not in the state dict (the scale alpha/r is an attribute): a resume with another
    loaded the adapters and computed another student. None means the rank, and compares as it."""
    from nitrofusion.errors import UserError

    lora = ["model.lora_rank=2", "run.checkpoint_every=1", "refine.steps_per_stage=[1]"]
    Distiller(config(tiny_sdxl_dir, tmp_path, *lora), progress=False).train()
    with pytest.raises(UserError, match="model.lora_alpha=2, this run has 16"):
        Distiller(config(tiny_sdxl_dir, tmp_path, *lora, "model.lora_alpha=16"), progress=False).resume("latest")
    same = Distiller(config(tiny_sdxl_dir, tmp_path, *lora, "model.lora_alpha=2"), progress=False)
    same.resume("latest")
    assert same.step == 1


@pytest.mark.parametrize("objective", ["nitrofusion", "dmd2", "adm"])
def test_an_sd15_architecture_teacher_distils_into_a_stock_loadable_student(tiny_sd15_dir, tmp_path, objective):
    """SD1.5's UNet has no added conditions and one text encoder (the heads' pooled text is CLIP's
    sentence embedding): every objective trains it and exports a pipeline stock diffusers loads."""
    from diffusers import StableDiffusionPipeline

    extra = ["loss.pretrain_kind=adversarial"] if objective == "adm" else []
    overrides = [f"loss.objective={objective}", "loss.pretrain_steps=1", "refine.steps_per_stage=[1,1]", *extra]
    d = Distiller(config(tiny_sd15_dir, tmp_path, *overrides), progress=False)
    before = snapshot(d.student)
    d.train()
    assert moved(before, d.student)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert type(pipe.scheduler).__name__ == "TimestepShiftLCMScheduler"
    assert pipe.config.requires_safety_checker is False  # the teacher's setting, not the class default
    image = pipe("a photo", num_inference_steps=2, guidance_scale=0, output_type="np").images[0]
    assert np.isfinite(image).all() and image.std() > 0


def test_the_sd15_preset_distils_an_sd15_teacher_in_bf16(tiny_sd15_dir, tmp_path, bf16_accelerator):
    """The preset as an SD1.5 user runs it (a 24 GB GPU): bf16, gradient checkpointing, the teacher
    and the EMA in host memory, a pool of width 64 whose local heads halve once; a distillation
    step and the export, loaded by stock diffusers."""
    from diffusers import StableDiffusionPipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red cube\n")
    small = ["data.resolution=32", "data.batch_size=2", "optim.grad_accumulation=1", "loss.pretrain_steps=0"]
    small += ["discriminator.width=4", "discriminator.candidates=2", "data.teacher_steps=2"]
    where = [f"model.teacher={tiny_sd15_dir}", f"data.prompts={prompts}", f"run.output_dir={tmp_path / 'run'}"]
    d = Distiller(load_config("sd15", None, where + small), progress=False)
    cfg = d.cfg
    assert cfg.model.teacher_offload and cfg.optim.ema_offload and cfg.model.gradient_checkpointing
    assert cfg.data.teacher_guidance == 7.5 and cfg.discriminator.downsamples == 1
    assert cfg.optim.mixed_precision == "bf16" and cfg.model.shift == 250
    logs = d.train_step()
    d.step = 1
    assert "fake_logit" in logs and all(math.isfinite(v) for v in logs.values()), logs
    out = d.export()
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    image = pipe("a cat", num_inference_steps=1, guidance_scale=0, output_type="np").images[0]
    assert np.isfinite(image).all()


def test_sd15_heads_read_clips_sentence_embedding_as_the_pooled_text(tiny_sd15_dir):
    """The conditional heads' text for SD1.5 is the text encoder's own pooled output (the final
    state at the end-of-text token); it was the mean over all 77 token states, padding included,
    which moves little between prompts. Prompts of different lengths, and the empty prompt."""
    from diffusers import StableDiffusionPipeline

    from nitrofusion.data.conditioning import TextEncoder

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, safety_checker=None)
    encoder = TextEncoder(pipe, 32, 32)
    prompts = ["a cat", "a red bag on a long wooden table by the sea", "a" * 400]
    tok = pipe.tokenizer
    with torch.no_grad():
        for prompts_, pooled in ((prompts, encoder(prompts).pooled), ([""], encoder.negative(1).pooled)):
            ids = tok(prompts_, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
            own = pipe.text_encoder(torch.tensor(ids)).pooler_output
            torch.testing.assert_close(pooled, own, rtol=1e-5, atol=1e-6)
    assert encoder.pooled_dim == own.shape[-1]


def test_distill_no_safety_checker_leaves_an_sd15_teachers_checker_out_of_the_run_and_the_export(tmp_path, capsys):
    """As diffusers' own training scripts validate: `--no-safety-checker` (model.safety_checker=false)
    does not load SD1.5's checker, so no validation grid is blacked out, and the exported pipeline
    says it has none rather than carrying one the run never had."""
    from diffusers import StableDiffusionPipeline

    from nitrofusion.testing import save_tiny_sd15

    teacher = save_tiny_sd15(tmp_path / "sd15", safety_checker=True)
    overrides = config_overrides(teacher, tmp_path / "run", "loss.pretrain_steps=0", "run.validate_every=1")
    args = ["distill", *(a for o in overrides for a in ("--set", o)), "--max-steps", "1", "--no-safety-checker"]
    assert main(args) == 0
    assert (tmp_path / "run" / "validation" / "step-00000001.png").is_file()
    index = json.loads((tmp_path / "run" / "pipeline" / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert not (tmp_path / "run" / "pipeline" / "safety_checker").exists()
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline").safety_checker is None
    kept = Distiller(config(teacher, tmp_path / "kept"), progress=False)
    assert kept.teacher.safety_checker is not None  # the default keeps it, as stock diffusers loads it


def test_make_pairs_never_loads_a_safety_checker(tmp_path, monkeypatch):
    """Pairs are latents: nothing is decoded, so SD1.5's checker (1.2 GB) is not even loaded. Without
    --guidance-scale they are drawn at the teacher pipeline's own CFG (SD1.5's 7.5, the sd15
    preset's data.teacher_guidance), not SDXL's 5, which the preset's run would then refuse."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from safetensors import safe_open

    from nitrofusion.testing import save_tiny_sd15

    teacher = save_tiny_sd15(tmp_path / "sd15", safety_checker=True)

    def refuse(*args, **kwargs):
        raise AssertionError("make-pairs loaded the safety checker")

    monkeypatch.setattr(StableDiffusionSafetyChecker, "__init__", refuse)
    args = ["make-pairs", "--model", str(teacher), "--n", "2", "--steps", "1", "--out", str(tmp_path / "pairs")]
    assert main([*args, "--device", "cpu"]) == 0
    (shard,) = (tmp_path / "pairs").glob("pairs-*.safetensors")
    with safe_open(str(shard), "pt") as f:
        assert f.metadata()["guidance_scale"] == "7.5"


def test_resuming_with_another_teacher_is_refused_wherever_it_lies(tiny_sdxl_dir, tmp_path):
    """The checkpoint records which teacher it was made with, by its weights, not its path: the same
    teacher copied elsewhere resumes; another one (same architecture) is refused in one line."""
    from nitrofusion.errors import UserError

    Distiller(config(tiny_sdxl_dir, tmp_path / "run", "refine.steps_per_stage=[1]"), progress=False).train()
    moved_teacher = shutil.copytree(tiny_sdxl_dir, tmp_path / "moved")
    again = Distiller(config(moved_teacher, tmp_path / "run", "refine.steps_per_stage=[1]"), progress=False)
    again.resume("latest")
    assert again.step == 1
    other = save_tiny_sdxl(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="made with another teacher than model.teacher=") as err:
        Distiller(config(other, tmp_path / "run"), progress=False).resume("latest")
    assert "\n" not in str(err.value)


def test_fingerprint_tells_models_apart_not_precisions():
    from nitrofusion.training.checkpoint import fingerprint

    a = tiny_sdxl_pipeline(0).unet.state_dict()
    b = tiny_sdxl_pipeline(1).unet.state_dict()
    assert fingerprint(a) == fingerprint({k: v.clone() for k, v in a.items()})
    assert fingerprint(a) == fingerprint({k: v.to(torch.bfloat16) for k, v in a.items()})
    assert fingerprint(a) != fingerprint(b)
    name = next(k for k, v in a.items() if v.numel() > 1024)
    assert fingerprint(a) != fingerprint(a | {name: a[name] + 0.1})
    assert fingerprint(a) != fingerprint(a | {name: a[name].reshape(-1)})  # same values, another shape


def test_output_loads_like_public_checkpoints(tiny_sdxl_dir, tmp_path, capsys):
    d = Distiller(config(tiny_sdxl_dir, tmp_path / "run", "run.validate_every=2", "model.shift=500"), progress=False)
    out = d.train()
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_sdxl_dir, subfolder="unet"))
    unet.load_state_dict(load_file(str(out / "student_unet.safetensors")))
    assert (out / "validation" / "step-00000002.png").is_file()
    assert list((out / "distill").glob("events.out.tfevents*")), "no TensorBoard log"
    code = main(
        ["generate", "a cat", "--model", str(out / "pipeline"), "--steps", "2", "--out", str(tmp_path / "x.png")]
    )
    assert code == 0
    from PIL import Image

    assert Image.open(tmp_path / "x.png").text["shift"] == "500"
    # The bare student file samples at its trained shift too (recorded in its header), not at 250.
    args = ["generate", "a cat", "--model", str(tiny_sdxl_dir), "--unet", str(out / "student_unet.safetensors")]
    assert main([*args, "--out", str(tmp_path / "u.png")]) == 0
    assert Image.open(tmp_path / "u.png").text["shift"] == "500"
    assert main([*args, "--shift", "250", "--out", str(tmp_path / "v.png")]) == 0  # a given --shift wins
    assert Image.open(tmp_path / "v.png").text["shift"] == "250"
    d.export()  # again over the old: swapped in whole, nothing left beside it
    assert sorted(p.name for p in out.iterdir() if "pipeline" in p.name) == ["pipeline"]
    for name in ("tokenizer", "tokenizer_2"):  # the teacher's, which encoded prompts: read back 6x faster so
        assert sorted(p.name for p in (out / "pipeline" / name).iterdir()) == [
            "merges.txt",
            "tokenizer_config.json",
            "vocab.json",
        ]
    (out / "pipeline").rename(out / ".pipeline.old")  # an export that died between its two renames,
    d.student_pipeline = lambda **kw: (_ for _ in ()).throw(OSError("disk full"))  # and the next one dies too:
    with pytest.raises(OSError):
        d.export()
    assert (out / "pipeline" / "nitrofusion.json").is_file()  # the whole old pipeline is back in place
    args = ["generate", "a cat", "--model", str(out / "pipeline"), "--steps", "5", "--out", str(tmp_path / "y.png")]
    capsys.readouterr()
    assert main(args) == 2  # refused as the shift-LCM sampler refuses 5 steps: the restored pipeline loads as one
    assert "--steps must be 1 to 4 with the shift-LCM sampler" in capsys.readouterr().err


def test_each_stage_leaves_its_student(tiny_sdxl_dir, tmp_path):
    d = Distiller(config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[2,0,1]"), progress=False)
    assert d.schedule.stage_ends() == {2: 1, 3: 3}
    out = d.train()
    stage_one = load_file(str(out / "stages" / "1-step" / "student_unet.safetensors"))
    final = load_file(str(out / "student_unet.safetensors"))
    assert load_file(str(out / "stages" / "3-step" / "student_unet.safetensors")).keys() == final.keys()
    assert all(
        torch.equal(final[k], v)
        for k, v in load_file(str(out / "stages" / "3-step" / "student_unet.safetensors")).items()
    )
    assert any(not torch.equal(final[k], v) for k, v in stage_one.items()), "stage 3 trained on from stage 1"


def test_regression_only_schedule(tiny_sdxl_dir, tmp_path):
    d = Distiller(
        config(tiny_sdxl_dir, tmp_path, "loss.pretrain_steps=2", "refine.steps_per_stage=[0]"), progress=False
    )
    assert d.schedule.max_sampling_steps() == 1 and d.schedule.stage_ends() == {}
    out = d.train()
    assert (out / "student_unet.safetensors").is_file() and d.step == 2


def test_nan_losses_are_skipped_then_stop(tiny_sdxl_dir, tmp_path):
    d = Distiller(
        config(tiny_sdxl_dir, tmp_path, "run.max_bad_steps=3", "refine.steps_per_stage=[6]", "run.checkpoint_every=1"),
        progress=False,
    )
    original = d.objective.__call__
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        judged = original(*args, **kwargs)
        if calls["n"] >= 3:  # healthy for two steps, then a NaN storm
            judged.d_loss = judged.d_loss * float("nan")
        return judged

    d.objective = poisoned
    with pytest.raises(TrainingStopped):
        d.train()
    log = (tmp_path / "log.txt").read_text()
    assert log.count("non-finite loss or gradient, step skipped") == 3
    latest = checkpoint.list_checkpoints(tmp_path / "checkpoints")[-1]
    tensors, meta = checkpoint.load(latest)
    assert meta["step"] == 2 and all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("student."))


def test_failed_checkpoint_write_keeps_previous(tiny_sdxl_dir, tmp_path, monkeypatch):
    d = Distiller(
        config(tiny_sdxl_dir, tmp_path, "run.checkpoint_every=1", "refine.steps_per_stage=[3]"), progress=False
    )
    d.train_step()
    d.step = 1
    d.save_checkpoint()
    good = checkpoint.list_checkpoints(tmp_path / "checkpoints")

    import nitrofusion.weights.io as io

    def disk_full(path, *args, **kwargs):  # some bytes written, then the disk is full
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "write_state_dict", disk_full)
    d.step = 2
    with pytest.raises(OSError):
        d.save_checkpoint()
    assert checkpoint.list_checkpoints(tmp_path / "checkpoints") == good
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    tensors, meta = checkpoint.load(good[-1])
    assert meta["step"] == 1


def test_corrupt_latest_checkpoint_falls_back(tiny_sdxl_dir, tmp_path):
    d = Distiller(
        config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[3]", "run.keep_checkpoints=3"), progress=False
    )
    for step in (1, 2):
        d.train_step()
        d.step = step
        d.save_checkpoint()
    latest = checkpoint.list_checkpoints(tmp_path / "checkpoints")[-1]
    data = (latest / "state.safetensors").read_bytes()
    (latest / "state.safetensors").write_bytes(data[: len(data) // 3])
    again = Distiller(config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[3]"), progress=False)
    again.resume("latest")
    assert again.step == 1
    assert "unreadable" in (tmp_path / "log.txt").read_text()


# --- bad input: one line, exit 2 --------------------------------------------------------


def expect_cli_error(args, capsys, *fragments):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for f in fragments:
        assert f in err[0]


def test_unknown_config_key(tmp_path, capsys):
    expect_cli_error(
        ["distill", "--preset", "embedded", "--set", "optim.learning_rate=1"],
        capsys,
        "unknown config key 'optim.learning_rate'",
    )


def test_ill_typed_config_key(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("discriminator:\n  width: wide\n")
    expect_cli_error(["distill", "--config", str(f)], capsys, "'discriminator.width'", "int")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("run.log_every=0", "'run.log_every' must be at least 1"),
        ("run.process_timeout_minutes=0", "'run.process_timeout_minutes' must be at least 1"),
        ("model.shift=5000", "'model.shift' must be a timestep in 1..1000"),
        ("model.flow_levels=even", "'model.flow_levels' must be one of ['stock', 'trailing'], got 'even'"),
        ("optim.ema_decay=2", "'optim.ema_decay' must be in [0, 1)"),
        ("optim.lr=-1e-5", "'optim.lr' must be positive"),
        ("discriminator.lr=0", "'discriminator.lr' must be positive"),
        ("data.resolution=100", "'data.resolution' must be a positive multiple of 8"),
        ("optim.mixed_precision=fp16", "use bf16"),
        ("optim.optimizer=sgd", "'optim.optimizer' must be one of ['adamw', 'adamw8bit']"),
        ("run.log_with=stdout", "'run.log_with' must be one of ['aim', 'clearml'"),
        ("optim.grad_clip=0", "'optim.grad_clip' must be a positive gradient norm"),  # 0 zeroed every gradient
        ("loss.r1_weight=.nan", "'loss.r1_weight' must be a finite number, got nan"),  # nan < 0 is False
        ("discriminator.t_stars=[10,250,10]", "'discriminator.t_stars' lists a value twice"),
        ("discriminator.kinds=[local_cond,local_cond]", "'discriminator.kinds' lists a value twice"),
        ("model.lora_rank=4 model.lora_alpha=0", "'model.lora_alpha' must be positive"),  # 0 became the rank
        ("model.lora_alpha=16", "'model.lora_alpha' is for LoRA training"),  # was ignored: the whole UNet trained
        ("model.lora_alpha=-3", "'model.lora_alpha' must be positive"),  # was accepted without a rank
        ("model.lora_targets=[to_q]", "'model.lora_targets' is for LoRA training"),
        ("loss.objective=dmd2 dmd.min_t=1", "min_t < 1"),  # sampled no timestep, a traceback after pre-training
        ("run.seed=20000000000000000", "'run.seed' must be in 0..2^32-1"),  # overflowed int64 in make-pairs
        ("loss.objective=dmd2 loss.r1_weight=1", "'loss.r1_weight' regularises the head pool"),  # was ignored
    ],
)
def test_out_of_range_config_values_stop_before_any_work(tmp_path, capsys, override, fragment):
    """Caught when the config loads, not after the teacher has loaded (or mid-run, at a division by 0)."""
    out = tmp_path / "run"
    sets = [arg for item in override.split() for arg in ("--set", item)]
    expect_cli_error(["distill", "--preset", "embedded", *sets, "--set", f"run.output_dir={out}"], capsys, fragment)
    assert not out.exists()


def test_a_tracker_that_is_not_installed_is_a_config_error_not_an_unlogged_run(tmp_path, capsys, monkeypatch):
    """accelerate would warn and train on without logging; here the config stops first."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    out = tmp_path / "run"
    args = ["distill", "--preset", "embedded", "--set", "run.log_with=wandb", "--set", f"run.output_dir={out}"]
    expect_cli_error(args, capsys, "'run.log_with' is wandb: it needs wandb (pip install wandb)")
    assert not out.exists()


def test_no_tracker_logs_nothing_but_the_curves(tiny_sdxl_dir, tmp_path):
    cfg = config(tiny_sdxl_dir, tmp_path, "run.log_with=none", "refine.steps_per_stage=[1]")
    Distiller(cfg, progress=False).train()
    assert not (tmp_path / "distill").exists() and (tmp_path / "metrics.jsonl").is_file()


def test_missing_prompts(tiny_sdxl_dir, tmp_path, capsys):
    expect_cli_error(
        ["distill", "--set", f"model.teacher={tiny_sdxl_dir}", "--set", f"data.prompts={tmp_path}/no.txt"],
        capsys,
        "prompt file",
    )


def test_a_v_prediction_teacher_trains_a_v_prediction_student(tiny_sdxl_dir, tmp_path):
    """The student's x0 was read as epsilon whatever the teacher predicts (SD 2.x-768 predicts v),
    while the exported sampler kept the teacher's prediction type: the two now agree."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sdxl_dir, teacher)
    sched = teacher / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    d = Distiller(config(teacher, tmp_path / "run", "loss.pretrain_steps=1"), progress=False)
    assert d.maths.prediction_type == d.scheduler.config.prediction_type == "v_prediction"
    assert "skipped" not in d.train_step()
    assert d.student_pipeline().scheduler.config.prediction_type == "v_prediction"
    # DMD2's scores read the teacher as epsilon: refused before any teacher pairs are made (hours at SDXL size).
    with pytest.raises(UserError, match="epsilon-prediction, it predicts v_prediction"):
        Distiller(config(teacher, tmp_path / "dmd2", "loss.objective=dmd2", f"data.pairs={tmp_path}/p"), progress=False)
    assert not (tmp_path / "p").exists()


def test_a_teacher_with_a_guidance_embedding_is_refused_before_pairs_are_made(tmp_path):
    """An LCM-distilled UNet (time_cond_proj_dim) gets a guidance embedding from its pipeline: the
    student trained without one and was sampled with one."""
    from nitrofusion.testing import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline()
    settings = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}  # _use_default_values resets
    pipe.unet = UNet2DConditionModel.from_config({**settings, "time_cond_proj_dim": 8})
    teacher = tmp_path / "lcm"
    pipe.save_pretrained(teacher)
    with pytest.raises(UserError, match="guidance embedding"):
        Distiller(config(teacher, tmp_path / "run", f"data.pairs={tmp_path}/p"), progress=False)
    assert not (tmp_path / "p").exists()


def test_a_run_resumes_with_the_safety_checker_switched(tmp_path):
    """The teacher's fingerprint held SD1.5's safety checker, which never touches training: a run
    resumed with --no-safety-checker (or without it) was refused as 'another teacher'."""
    from nitrofusion.testing import save_tiny_sd15

    teacher = save_tiny_sd15(tmp_path / "sd15", safety_checker=True)
    first = Distiller(config(teacher, tmp_path / "run"), progress=False)
    first.train_step()
    first.step += 1
    first.save_checkpoint()
    resumed = Distiller(config(teacher, tmp_path / "run", "model.safety_checker=false"), progress=False)
    assert resumed.teacher.safety_checker is None
    resumed.resume("latest")
    assert resumed.step == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        # A UNet student's levels are its shift-LCM scheduler's: the key would be ignored.
        (["model.flow_levels=stock"], "model.flow_levels is a flow student's"),
        # Its anchor is at step 0 (later steps start from fresh noise), which `last` trains in stage 1 only.
        (
            ["loss.regression_weight=1", "refine.mix=last", "refine.steps_per_stage=[0,1]"],
            "loss.regression_weight would never apply: a UNet student's anchors step index 0",
        ),
    ],
)
def test_what_a_unet_student_would_ignore_is_refused_before_any_pair(tiny_sdxl_dir, tmp_path, overrides, message):
    pairs = "data.pairs=" + str(tmp_path / "pairs")
    with pytest.raises(UserError, match=message):
        Distiller(config(tiny_sdxl_dir, tmp_path / "run", pairs, *overrides), progress=False)
    assert not (tmp_path / "pairs").exists()


def test_teacher_that_is_not_a_unet_pipeline(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"]}'
    )
    expect_cli_error(["distill", "--set", f"model.teacher={tmp_path}"], capsys, "DDPMPipeline")


TWO_RANKS = """
import hashlib, traceback, sys, torch, torch.distributed as dist
import nitrofusion.data.teacher as teacher
import nitrofusion.training.distill as distill
from nitrofusion.errors import UserError
from nitrofusion.training.config import load_config, unread_keys

out = sys.argv[1]
overrides = {overrides!r}


def write(name, text):
    with open(f"{{out}}/{{name}}{{acc.process_index}}.txt", "w") as f:
        f.write(text)


# The run's own accelerator, as `nitrofusion distill` makes it: how long a rank waits for the others.
cfg = load_config(None, None, ["run.process_timeout_minutes=7", "optim.mixed_precision=no", "run.log_with=none",
    f"run.output_dir={{out}}/timeout"])
acc = distill.make_accelerator(cfg)
backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
write("timeout", f"{{acc.num_processes}} {{backend.options._timeout.total_seconds()}}")


def identical():
    cfg = load_config(None, None, [*overrides, f"run.output_dir={{out}}/identical", "refine.steps_per_stage=[3]",
        "run.checkpoint_every=1000"])
    d = distill.Distiller(cfg, accelerator=acc, progress=False)
    seen = []
    original = d.pool.sample_heads
    d.pool.sample_heads = lambda t, g: seen.append(original(t, g)) or seen[-1]
    # The student's gradients: views into DDP's buckets (a few storages), or each its own copy.
    storages = []
    original_check = d._gradients_finite
    def check(critics, update_g):
        grads = [p.grad for p in d.student.parameters() if p.grad is not None]
        storages.append((len(grads), len({{g.untyped_storage().data_ptr() for g in grads}})))
        return original_check(critics, update_g)
    d._gradients_finite = check
    prompts = []
    original_batch = d.batch
    d.batch = lambda micro: prompts.append(d.rng("data", per_rank=True).initial_seed()) or original_batch(micro)
    for _ in range(2):
        d.train_step(); d.step += 1
    h = hashlib.sha256()
    for module in (acc.unwrap_model(d.student), d.pool):
        for k, v in sorted(module.state_dict().items()):
            h.update(v.detach().cpu().numpy().tobytes())
    write("rank", f"{{acc.num_processes}} {{h.hexdigest()}} {{seen}} {{prompts}}")
    own = [s is not p for s, p in zip(d.ema.shadow.parameters(), acc.unwrap_model(d.student).parameters())]
    write("ema", str(sum(own)))
    write("buckets", f"{{d.student.gradient_as_bucket_view}} {{storages}}")
    # A critic's loss that is NaN on rank 1 only: every rank skips the step, or the NaN is averaged in.
    objective = d.objective
    def poisoned(*args, **kwargs):
        losses = objective(*args, **kwargs)
        if acc.process_index == 1:
            losses.d_loss = losses.d_loss * float("nan")
        return losses
    d.objective = poisoned
    before = [v.clone() for m in (acc.unwrap_model(d.student), d.pool) for v in m.state_dict().values()]
    d.train_step()
    after = [v for m in (acc.unwrap_model(d.student), d.pool) for v in m.state_dict().values()]
    write("skip", f"{{d.bad_steps}} {{all(torch.equal(a, b) for a, b in zip(before, after))}}")


def accumulated():
    # Two micro-batches an iteration, the first under no_sync: the gradients after each backward.
    cfg = load_config(None, None, [*overrides, f"run.output_dir={{out}}/accumulated", "optim.grad_accumulation=2",
        "refine.steps_per_stage=[3]", "run.checkpoint_every=1000"])
    d = distill.Distiller(cfg, accelerator=acc, progress=False)
    seen, backward = [], acc.backward
    def counting(loss, **kwargs):
        backward(loss, **kwargs)
        grads = [p.grad for p in d.student.parameters() if p.grad is not None]
        seen.append((d.step, len(grads), len({{g.untyped_storage().data_ptr() for g in grads}})))
    acc.backward = counting
    try:
        for _ in range(2):
            d.train_step(); d.step += 1
    finally:
        acc.backward = backward
    write("accumulated", str(seen))


def pairs():
    written, save = [], teacher.save_state_dict
    teacher.save_state_dict = lambda state, path, **kw: written.append(path.name) or save(state, path, **kw)
    cfg = load_config(None, None, [*overrides, f"data.pairs={{out}}/pairs", "data.num_pairs=600",
        f"run.output_dir={{out}}/pairs-run"])
    d = distill.Distiller(cfg, accelerator=acc, progress=False)
    teacher.save_state_dict = save
    write("pairs", f"{{len(d.pairs)}} {{' '.join(written)}}")


def resume():
    cfg = load_config(None, None, [*overrides, f"run.output_dir={{out}}/resume", "run.checkpoint_every=1",
        "refine.steps_per_stage=[3]"])
    d = distill.Distiller(cfg, accelerator=acc, progress=False)
    load_latest = distill.checkpoint.load_latest
    if acc.process_index == 1:  # this rank's disk has no checkpoint
        distill.checkpoint.load_latest = lambda *a, **k: None
    try:
        d.train(resume="latest")
        said = "trained"
    except UserError as exc:
        said = str(exc)
    finally:
        distill.checkpoint.load_latest = load_latest
    write("resume", f"{{d.step}} {{said}}")


def make_pairs_cli():
    # `nitrofusion make-pairs` launched as two processes: each makes its share of the shards.
    import nitrofusion.cli as cli
    leave, cli._leave_process_group = cli._leave_process_group, lambda: None  # the scenarios after share it
    written, save = [], teacher.save_state_dict
    teacher.save_state_dict = lambda state, path, **kw: written.append(path.name) or save(state, path, **kw)
    model = next(o.split("=", 1)[1] for o in overrides if o.startswith("model.teacher="))
    try:
        code = cli.main(["make-pairs", "--model", model, "--n", "300", "--steps", "1", "--out", f"{{out}}/cli-pairs"])
    finally:
        teacher.save_state_dict, cli._leave_process_group = save, leave
    write("cli", f"{{code}} {{' '.join(written)}}")


def resume_together():
    cfg = load_config(None, None, [*overrides, f"run.output_dir={{out}}/resume-together", "run.checkpoint_every=1",
        "refine.steps_per_stage=[3]"])
    d = distill.Distiller(cfg, accelerator=acc, progress=False)
    d.train(resume="latest")
    write("together", f"{{d.step}}")


def locked():
    # Another run holds this folder's lock (the test does): the main process is refused, and so is
    # every other rank, at once.
    cfg = load_config(None, None, [*overrides, f"run.output_dir={{out}}/locked", "refine.steps_per_stage=[3]"])
    d = distill.Distiller(cfg, accelerator=acc, progress=False)
    try:
        d.train()
        said = "trained"
    except UserError as exc:
        said = str(exc)
    write("locked", said)


for scenario in (identical, accumulated, pairs, resume, locked, make_pairs_cli, resume_together):
    try:
        scenario()
    except Exception:  # said in its own file, for its own test; the other ranks may then wait in vain
        write(f"{{scenario.__name__}}-failed", traceback.format_exc())
        raise
# A finished run ended the process group (accelerate's end_training); the others leave together: a
# process that exits with gloo's threads still running can abort at exit.
if dist.is_initialized():
    acc.wait_for_everyone()
    dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def two_ranks(tiny_sdxl_dir, tmp_path_factory) -> Path:
    """The two-rank scenarios below in one `torchrun --nproc_per_node 2` (two gloo processes on the
    CPU, as on a machine without a GPU): each launch costs ~20 s of two processes importing torch,
    diffusers and transformers, four times that as four launches. Each scenario leaves its files."""
    out = tmp_path_factory.mktemp("two-ranks")
    # A checkpoint at step 1 for the resume scenario, which rank 1 will not find.
    overrides = ("run.checkpoint_every=1", "refine.steps_per_stage=[3]")  # as the scenario resumes it
    for folder in ("resume", "resume-together"):
        first = Distiller(config(tiny_sdxl_dir, out / folder, *overrides), progress=False)
        first.train_step()
        first.step += 1
        first.save_checkpoint()
    script = out / "two_ranks.py"
    script.write_text(TWO_RANKS.format(overrides=config_overrides(tiny_sdxl_dir, out / "unused")))
    torchrun = Path(sys.executable).with_name("torchrun")
    with folder_lock(out / "locked", "run.output_dir"):  # another run, for the `locked` scenario
        proc = subprocess.run(
            [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", str(script), str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    out.joinpath("stderr.txt").write_text(proc.stderr)
    return out


def two_rank_files(folder: Path, name: str) -> list[str]:
    failed = [folder / f"{name}-failed{rank}.txt" for rank in (0, 1)]
    assert not any(p.exists() for p in failed), next(p.read_text() for p in failed if p.exists())
    paths = [folder / f"{name}{rank}.txt" for rank in (0, 1)]
    assert all(p.exists() for p in paths), (folder / "stderr.txt").read_text()[-3000:]
    return [p.read_text() for p in paths]


def test_two_rank_run_stays_identical(two_ranks):
    r0, r1 = (text.split(" ", 2) for text in two_rank_files(two_ranks, "rank"))
    assert r0[0] == r1[0] == "2"
    assert r0[1] == r1[1], "ranks diverged"
    # The EMA: a copy on the main process only (the only one that reads it).
    ema0, ema1 = two_rank_files(two_ranks, "ema")
    assert int(ema0) > 0 and int(ema1) == 0
    heads0, data0 = r0[2].rsplit("] [", 1)
    heads1, data1 = r1[2].rsplit("] [", 1)
    # Each rank draws its own heads (the same draws on every rank trained a quarter as many heads
    # an iteration at 8 ranks of 3 micro-batches), and their averaged gradients keep them equal.
    assert heads0 != heads1, "ranks sampled the same heads"
    assert data0 != data1, "ranks saw the same data"
    # Gradients as bucket views: at SDXL size DDP's buckets were one more 10 GB copy a rank.
    for text in two_rank_files(two_ranks, "buckets"):
        flag, seen = text.split(" ", 1)
        grads, storages = ast.literal_eval(seen)[0]
        assert flag == "True" and grads > 20 and storages < grads / 10, text
    # With gradient accumulation too: the micro-batches under no_sync add into the views (set to
    # None between iterations, they were made anew beside the buckets until the last backward).
    for text in two_rank_files(two_ranks, "accumulated"):
        later = [(grads, storages) for step, grads, storages in ast.literal_eval(text) if step > 0]
        assert later and all(grads > 20 and storages < grads / 10 for grads, storages in later), text
    skips = two_rank_files(two_ranks, "skip")
    assert skips == ["1 True", "1 True"], f"a NaN on rank 1 only: {skips} (skipped steps, weights unchanged)"


def test_every_rank_makes_its_share_of_the_missing_pairs(two_ranks):
    """Rank 0 made them all while the others waited in a barrier: hours at SDXL size, past NCCL's
    10-minute timeout. Each rank now makes its shards, and waits for the others' on disk."""
    ranks = two_rank_files(two_ranks, "pairs")
    assert ranks == ["600 pairs-00000.safetensors pairs-00002.safetensors", "600 pairs-00001.safetensors"]


def test_make_pairs_launched_as_several_processes_shares_the_shards(two_ranks):
    """make-pairs ran as one process whatever the launch: under torchrun every process made every
    shard, all on the first GPU. Each now makes its share, on its own device, and waits for the rest."""
    assert two_rank_files(two_ranks, "cli") == ["0 pairs-00000.safetensors", "0 pairs-00001.safetensors"]
    assert sorted(p.name for p in (two_ranks / "cli-pairs").glob("pairs-*")) == [
        "pairs-00000.safetensors",
        "pairs-00001.safetensors",
    ]


def test_ranks_wait_for_each_other_as_long_as_the_config_says(two_ranks):
    """NCCL's default of 10 minutes aborted a run whose main process wrote a checkpoint (43 GB at
    SDXL size) while the others waited in the next all-reduce: the wait is run.process_timeout_minutes.
    Launched with torchrun on a CPU machine, as docs/distill.md says, the processes are two ranks
    (they were two separate runs, each rank 0 of 1, writing into one folder)."""
    assert two_rank_files(two_ranks, "timeout") == ["2 420.0", "2 420.0"]


def test_ranks_that_resume_from_different_checkpoints_are_stopped(two_ranks):
    """Each rank reads the checkpoint itself: on disks that are not shared, one rank resumed at step
    N and another started afresh, and they trained apart until the run hung."""
    ranks = two_rank_files(two_ranks, "resume")
    assert [r.split(" ", 1)[0] for r in ranks] == ["1", "0"]
    assert all("resumed from different checkpoints" in r for r in ranks), ranks


def test_a_folder_in_use_stops_every_rank_not_only_the_main_one(two_ranks):
    """Only the main process takes run.output_dir's lock: refused, it exited, and the other ranks
    waited in their first collective for run.process_timeout_minutes (an hour by default)."""
    main_rank, other = two_rank_files(two_ranks, "locked")
    assert "is in use by another run" in main_rank and ".lock" in main_rank
    assert "is in use by another run (see the main process)" in other


def test_ranks_that_resume_from_one_checkpoint_train_on_together_to_the_export(two_ranks):
    """accelerate's reduce summed where asked for "max" (before 1.14): two ranks resumed at step 1
    compared 1 with 2, and every multi-rank resume was refused as "from different checkpoints".
    And every multi-rank run ended in a traceback with no student: accelerate's end_training,
    called before the export, ended the process group the export waits on."""
    assert two_rank_files(two_ranks, "together") == ["3", "3"]
    log = (two_ranks / "resume-together" / "log.txt").read_text()
    assert "resumed from step 1" in log
    # Each rank runs every micro-batch: the batch an iteration is the processes' sum, said at the start.
    assert "iterations 2..3; batch 4 an iteration (2 processes x data.batch_size 2 x optim.grad_accumulation 1)" in log
    assert (two_ranks / "resume-together" / "student_unet.safetensors").is_file()
    assert (two_ranks / "resume-together" / "pipeline" / "model_index.json").is_file()


def test_every_rank_and_micro_batch_draws_its_own_random_stream():
    """Keys were rank * 31 + micro: rank 1's first micro-batch repeated rank 0's 32nd."""
    from types import SimpleNamespace

    def keys(world, accum, step=5):
        cfg = SimpleNamespace(run=SimpleNamespace(seed=0), optim=SimpleNamespace(grad_accumulation=accum))
        return [
            Distiller.rng(
                SimpleNamespace(cfg=cfg, step=step, acc=SimpleNamespace(process_index=rank, num_processes=world)),
                "data",
                True,
                micro,
            ).initial_seed()
            for rank in range(world)
            for micro in range(accum)
        ]

    for world, accum in ((2, 40), (8, 200), (1, 3)):
        assert len(set(keys(world, accum))) == world * accum
    # A single process draws what it drew before ranks were spread apart: runs repeat across versions.
    assert keys(1, 3) == [(((0 * 1_000_003 + 5) * 101 + 1) * 1009 + micro) for micro in range(3)]

    # The pool's first draw keys its t* groups by t* + 1 (up to 1000): on 3 ranks, t* 750's heads
    # shared their seed with rank 1's judging noise at micro-batch 78 (a review).
    def key(purpose, per_rank, micro, rank, world=3, accum=79):
        cfg = SimpleNamespace(run=SimpleNamespace(seed=0), optim=SimpleNamespace(grad_accumulation=accum))
        ctx = SimpleNamespace(cfg=cfg, step=5, acc=SimpleNamespace(process_index=rank, num_processes=world))
        return Distiller.rng(ctx, purpose, per_rank, micro).initial_seed()

    heads = {key("heads", False, t + 1, 0) for t in (10, 250, 500, 750)}
    others = {key(p, True, m, r) for p in ("judge", "refresh", "simulate") for m in range(79) for r in range(3)}
    assert not heads & others


def test_pairs_of_a_stochastic_teacher_repeat_whatever_the_batch_and_global_seed(tiny_sdxl_dir, tmp_path):
    """An LCM teacher (DMD2's) adds noise between steps; it came from torch's global state."""
    from diffusers import LCMScheduler

    from nitrofusion.data.teacher import PairShards, TeacherSampler, make_pairs
    from nitrofusion.pipelines import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, sampler="native")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    sampler = TeacherSampler(pipe, steps=2, guidance_scale=1.0, height=16, width=16)
    made = []
    for name, batch_size in (("a", 2), ("b", 2), ("c", 1)):
        torch.manual_seed(len(made))
        make_pairs(sampler, ["a cat", "a dog"], 4, tmp_path / name, batch_size=batch_size)
        made.append(PairShards.load(tmp_path / name).latents[:])
    assert torch.equal(made[0], made[1])
    # Per-pair generators: another batch size draws the same noise (matmuls round by batch size).
    torch.testing.assert_close(made[0], made[2], rtol=1e-4, atol=1e-4)


def test_make_pairs_resumes_and_feeds_training(tiny_sdxl_dir, tmp_path):
    from nitrofusion.data.teacher import PairShards, TeacherSampler, make_pairs, noise_for_seeds
    from nitrofusion.pipelines import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, sampler="native")
    sampler = TeacherSampler(pipe, steps=2, guidance_scale=3.0, height=16, width=16)
    prompts = ["a cat", "a dog", "a boot"]
    shards = make_pairs(sampler, prompts, 5, tmp_path / "pairs", batch_size=2, shard_size=2)
    assert len(shards) == 3
    first = PairShards.load(tmp_path / "pairs")
    shards[1].unlink()  # an interrupted run: refused as it is, the missing shard made again, the others kept
    with pytest.raises(UserError, match="incomplete: 1 shards missing, pairs-00001"):
        PairShards.load(tmp_path / "pairs")
    make_pairs(sampler, prompts, 5, tmp_path / "pairs", batch_size=2, shard_size=2)
    again = PairShards.load(tmp_path / "pairs")
    assert len(again) == 5 and torch.equal(first.latents[:], again.latents[:])
    from safetensors import safe_open

    with safe_open(str(shards[0]), "pt") as f:
        made_with = f.metadata()  # provenance: which precision, where
    assert (made_with["teacher_dtype"], made_with["device"]) == ("float32", "cpu")
    # a pair is the teacher's sample from the noise its seed gives
    i = 3
    x0 = sampler([prompts[int(again.prompt_ids[i])]], noise_for_seeds([int(again.seeds[i])], sampler.latent_shape))
    torch.testing.assert_close(x0[0], again.latents[i])
    made_so = ["data.teacher_steps=2", "data.teacher_guidance=3.0", "data.resolution=16"]  # as the pairs were
    # A run trains on the pairs' prompts: one asking for another list (here the default, embedded)
    # would have trained on these without a word.
    with pytest.raises(UserError, match=r"made from another prompt list \(3 prompts\) than data.prompts='embedded'"):
        Distiller(config(tiny_sdxl_dir, tmp_path / "run", f"data.pairs={tmp_path / 'pairs'}", *made_so), progress=False)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    made_so.append(f"data.prompts={tmp_path / 'prompts.txt'}")
    d = Distiller(config(tiny_sdxl_dir, tmp_path / "run", f"data.pairs={tmp_path / 'pairs'}", *made_so), progress=False)
    assert "skipped" not in d.train_step()


def test_a_multi_step_teacher_sampled_in_few_steps_is_warned_about(tiny_sdxl_dir, caplog):
    """Its samples are the real data: a 4-step Euler sample of SDXL base would teach the student noise."""
    from diffusers import LCMScheduler

    from nitrofusion.data.teacher import TeacherSampler
    from nitrofusion.pipelines import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, sampler="native")
    with caplog.at_level("WARNING", logger="nitrofusion.data.teacher"):
        TeacherSampler(pipe, steps=25, guidance_scale=5.0, height=16, width=16)
        assert not caplog.records
        TeacherSampler(pipe, steps=4, guidance_scale=0.0, height=16, width=16)
        assert "needs about 25" in caplog.text and type(pipe.scheduler).__name__ in caplog.text
        caplog.clear()
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)  # a DMD2-style few-step teacher
        TeacherSampler(pipe, steps=4, guidance_scale=0.0, height=16, width=16)
        assert not caplog.records


def test_a_dmd2_style_teacher_samples_at_its_own_timesteps(tiny_sdxl_dir, tmp_path, capsys):
    """A stock LCMScheduler spaces 4 steps as 999, 759, 499, 259; DMD2's 4-step SDXL was trained at
    and samples with 999, 749, 499, 249: data.teacher_timesteps (make-pairs --timesteps) gives them."""
    from diffusers import LCMScheduler

    from nitrofusion.data.teacher import TeacherSampler, make_pairs, sampler_recipe
    from nitrofusion.errors import UserError
    from nitrofusion.pipelines import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, sampler="native")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    seen: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(int(args[1])), with_kwargs=True)
    lcm = TeacherSampler(pipe, 4, 0.0, 16, 16)
    noise = torch.randn(1, *lcm.latent_shape)
    lcm(["a boot"], noise)
    assert seen == [999, 759, 499, 259]
    seen.clear()
    dmd2 = TeacherSampler(pipe, 4, 0.0, 16, 16, timesteps=[999, 749, 499, 249])
    dmd2(["a boot"], noise)
    assert seen == [999, 749, 499, 249]
    assert sampler_recipe(dmd2)["teacher_timesteps"] == "999,749,499,249"  # pairs made so say so
    assert "teacher_timesteps" not in sampler_recipe(lcm)  # pairs made before the option stay valid
    make_pairs(dmd2, ["a boot"], 1, tmp_path / "pairs")
    with pytest.raises(UserError, match="another teacher_timesteps"):
        make_pairs(
            TeacherSampler(pipe, 4, 0.0, 16, 16, timesteps=[999, 759, 499, 259]), ["a boot"], 2, tmp_path / "pairs"
        )
    with pytest.raises(UserError, match=r"timesteps must list the teacher's steps \(4\) decreasing"):
        TeacherSampler(pipe, 4, 0.0, 16, 16, timesteps=[999, 499])
    with pytest.raises(UserError, match="decreasing timesteps in 0..999, got \\[249, 499, 749, 999\\]"):
        TeacherSampler(pipe, 4, 0.0, 16, 16, timesteps=[249, 499, 749, 999])  # the library API checks it too
    capsys.readouterr()  # make_pairs' progress bars
    expect_cli_error(
        ["make-pairs", "--model", str(tiny_sdxl_dir), "--steps", "4", "--timesteps", "999", "749", "499", "--out", "x"],
        capsys,
        "--timesteps must list --steps (4) decreasing timesteps in 0..999, got [999, 749, 499]",
    )
    expect_cli_error(
        [
            "distill",
            "--preset",
            "sdxl",
            "--set",
            "data.teacher_steps=4",
            "--set",
            "data.teacher_timesteps=[999,249,499,1]",
        ],
        capsys,
        "'data.teacher_timesteps' must list data.teacher_steps (4) decreasing timesteps",
    )


def test_pairs_made_another_way_are_refused_not_mixed_in(tiny_sdxl_dir, tmp_path, capsys):
    from nitrofusion.data.teacher import TeacherSampler, make_pairs
    from nitrofusion.errors import UserError
    from nitrofusion.pipelines import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, sampler="native")
    sampler = TeacherSampler(pipe, steps=2, guidance_scale=3.0, height=16, width=16)
    pairs = tmp_path / "pairs"
    make_pairs(sampler, ["a cat", "a dog"], 3, pairs, batch_size=2, shard_size=2)
    (pairs / "pairs-00001.safetensors").unlink()  # to be resumed ...
    with pytest.raises(UserError, match="another prompt list"):  # ... with other prompts: ids would point elsewhere
        make_pairs(sampler, ["a boot", "a cat"], 3, pairs, batch_size=2, shard_size=2)
    with pytest.raises(UserError, match="another seed"):
        make_pairs(sampler, ["a cat", "a dog"], 3, pairs, seed=1, batch_size=2, shard_size=2)
    assert json.loads((pairs / "prompts.json").read_text()) == ["a cat", "a dog"]  # the refusals changed nothing
    make_pairs(sampler, ["a cat", "a dog"], 3, pairs, batch_size=2, shard_size=2)
    capsys.readouterr()
    # A run with another teacher setting reading them: one line, exit 2, before training.
    args = ["distill", "--set", f"model.teacher={tiny_sdxl_dir}", "--set", f"data.pairs={pairs}"]
    args += ["--set", "data.teacher_steps=3", "--set", "data.teacher_guidance=3.0", "--set", "data.resolution=16"]
    expect_cli_error(
        [*args, "--set", f"run.output_dir={tmp_path / 'run'}"], capsys, "another teacher_steps ('2', now '3')"
    )


def test_distill_makes_missing_pairs_first(tiny_sdxl_dir, tmp_path, caplog):
    def distiller(count):
        cfg = config(tiny_sdxl_dir, tmp_path / "run", f"data.pairs={tmp_path / 'auto'}", f"data.num_pairs={count}")
        return Distiller(cfg, progress=False)

    with caplog.at_level("WARNING", logger="nitrofusion"):
        assert len(distiller(3).pairs) == 3
        assert "holds" not in caplog.text
        # A finished folder is the data whatever data.num_pairs says: trained on, and said so.
        assert len(distiller(5).pairs) == 3
    assert "holds 3 pairs: the run trains on those, not on data.num_pairs 5" in caplog.text


def test_distill_completes_pairs_stopped_half_way_to_their_own_count(tiny_sdxl_dir, tmp_path):
    """A stopped `make-pairs` (or distill) left shards 0 and 2 of 3: distill trained on the two
    without a word. It now makes the missing one, to the count the folder was started for."""
    from nitrofusion.data.teacher import make_pairs

    d = Distiller(config(tiny_sdxl_dir, tmp_path / "run"), progress=False)  # its teacher and prompts
    shards = make_pairs(d.sampler, d.prompts, 600, tmp_path / "p", seed=d.cfg.run.seed, batch_size=64)
    whole = [load_file(str(s)) for s in shards]
    shards[1].unlink()
    d = Distiller(config(tiny_sdxl_dir, tmp_path / "run", f"data.pairs={tmp_path / 'p'}"), progress=False)
    assert len(d.pairs) == 600  # not the config's data.num_pairs (2048)
    for shard, want in zip(shards, whole):  # (the bytes differ: safetensors orders metadata as it likes)
        assert all(torch.equal(v, want[k]) for k, v in load_file(str(shard)).items())


def test_pairs_made_in_shares_by_several_processes_are_one_processs_pairs(tiny_sdxl_dir, tmp_path, monkeypatch):
    from nitrofusion.data.teacher import TeacherSampler, make_pairs, missing_shards
    from nitrofusion.pipelines import load_pipeline

    sampler = TeacherSampler(load_pipeline(tiny_sdxl_dir, sampler="native"), 1, 3.0, 16, 16)
    prompts = ["a cat", "a dog", "a boot"]
    one = make_pairs(sampler, prompts, 7, tmp_path / "one", batch_size=2, shard_size=2)
    made = {}
    beats = []
    real_touch = Path.touch
    monkeypatch.setattr(Path, "touch", lambda p, *a, **k: beats.append(p.name) or real_touch(p, *a, **k))
    for rank in (1, 0, 2):  # any order
        assert missing_shards(tmp_path / "three") != []  # until the last share is made
        before = set((tmp_path / "three").glob("pairs-*"))
        make_pairs(sampler, prompts, 7, tmp_path / "three", batch_size=2, shard_size=2, rank=rank, world=3)
        made[rank] = sorted(p.name for p in set((tmp_path / "three").glob("pairs-*")) - before)
    # Each process's heartbeat after every batch (what the others wait on), gone once it is done.
    assert beats.count(".making-pairs-00000") == 2 and beats.count(".making-pairs-00001") == 1
    assert not list((tmp_path / "three").glob(".making-pairs-*"))
    assert made == {
        0: ["pairs-00000.safetensors", "pairs-00003.safetensors"],
        1: ["pairs-00001.safetensors"],
        2: ["pairs-00002.safetensors"],
    }
    assert missing_shards(tmp_path / "three") == []
    for shard in one:
        made = load_file(str(tmp_path / "three" / shard.name))
        assert all(torch.equal(v, made[k]) for k, v in load_file(str(shard)).items())


def test_validation_draws_at_the_training_resolution(tiny_sdxl_dir, tmp_path, monkeypatch):
    import nitrofusion.training.distill as distill

    sizes = []
    real = distill.generate
    monkeypatch.setattr(distill, "generate", lambda *a, **k: sizes.append((k["height"], k["width"])) or real(*a, **k))
    cfg = config(tiny_sdxl_dir, tmp_path, "data.resolution=24", "run.validate_every=1", "refine.steps_per_stage=[1]")
    d = Distiller(cfg, progress=False)
    # The grid's images are decoded one by one (at 1024² a batch's decoder activations sat on
    # top of the whole training state), and the VAE is left as it was.
    vae, decoded = d.teacher.vae, []
    real_decode = vae._decode
    monkeypatch.setattr(vae, "_decode", lambda z, **k: decoded.append(z.shape[0]) or real_decode(z, **k))
    d.train()
    assert sizes and set(sizes) == {(24, 24)}  # the tiny model's own size is 16
    assert decoded and set(decoded) == {1} and not vae.use_slicing


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["loss.pretrain_kind=adversarial", "loss.pretrain_steps=1"],
        ["loss.objective=dmd2"],
        ["model.lora_rank=4"],
        ["model.teacher_offload=true", "optim.ema_offload=true"],
        ["data.pairs=PAIRS", "data.num_pairs=4"],
    ],
    ids=["one-step", "pixel-pretrain", "dmd2", "lora", "offload", "pairs"],
)
def test_bf16_training_keeps_the_teacher_in_bf16_and_the_student_in_fp32(
    tiny_sdxl_dir, tmp_path, overrides, bf16_accelerator
):
    """The path every GPU run takes. Validation crashed on it ("mat1 and mat2 must have the same
    dtype": the sampler's latents took the bf16 text encoders' dtype, the student is fp32), found
    by the H200 run of 2026-11-27; the CPU tests had run fp32 only. Its teacher pairs are drawn
    under bf16 autocast (in fp32 they took several times as long at SDXL size)."""
    pairs = tmp_path.parent / f"{tmp_path.name}-pairs"
    overrides = [o.replace("PAIRS", str(pairs)) for o in overrides]
    cfg = config(tiny_sdxl_dir, tmp_path, "optim.mixed_precision=bf16", "run.validate_every=1", *overrides)
    d = Distiller(cfg, progress=False)
    if cfg.data.pairs:
        from safetensors import safe_open

        with safe_open(str(next(pairs.glob("pairs-*.safetensors"))), "pt") as f:
            assert f.metadata()["autocast"] == "bfloat16" and f.metadata()["teacher_dtype"] == "float32"
    student = d.acc.unwrap_model(d.student)
    before = snapshot(student)
    d.train()
    assert next(d.teacher.unet.parameters()).dtype == torch.bfloat16
    assert next(d.teacher.text_encoder.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in student.parameters() if p.requires_grad)
    assert moved(before, student)
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "student_unet.safetensors")).values())
    assert (tmp_path / "validation" / "step-00000002.png").is_file()
    # The exported pipeline carries the teacher's own text encoders and VAE, not their bf16 rounding.
    for part in ("text_encoder", "text_encoder_2", "vae"):
        (file,) = (tmp_path / "pipeline" / part).glob("*.safetensors")
        (own,) = (tiny_sdxl_dir / part).glob("*.safetensors")
        exported, teacher = load_file(str(file)), load_file(str(own))
        assert exported.keys() == teacher.keys() and all(torch.equal(exported[k], teacher[k]) for k in teacher), part


@pytest.mark.parametrize(
    "overrides",
    [
        ("discriminator.downsamples=8",),
        ("loss.objective=dmd2", "dmd.classifier_downsamples=8"),
        ("loss.pretrain_kind=adversarial", "loss.pretrain_steps=1", "pretrain.pixel_downsamples=9"),
    ],
)
def test_a_head_deeper_than_its_input_is_refused_when_built(tiny_sdxl_dir, tmp_path, overrides):
    """It crashed at the first judgement ('Kernel size can't be greater than actual input size'),
    which at SDXL comes after the preset's 500 regression iterations; and it is said before any
    teacher pairs are made (hours at SDXL size), not after."""
    key = overrides[-1].split("=")[0]
    pairs = tmp_path / "pairs"
    with pytest.raises(UserError, match=rf"config key '{key}'=\d halves a \d+-pixel map below one pixel: at most \d"):
        cfg = config(tiny_sdxl_dir, tmp_path, f"data.pairs={pairs}", "data.num_pairs=4", *overrides)
        Distiller(cfg, progress=False)
    assert not pairs.exists()


def test_a_student_init_or_lora_target_that_cannot_work_is_refused_before_any_pairs(tiny_sdxl_dir, tmp_path):
    """From the file's header and the UNet's module names, before the teacher samples a single pair."""
    wrong = tmp_path / "wrong.safetensors"  # not the tiny teacher's UNet layout
    save_file({"conv_in.weight": torch.zeros(1, 1, 3, 3)}, str(wrong))
    pairs = tmp_path / "pairs"
    for overrides, message in [
        ((f"model.student_init={tmp_path / 'none.safetensors'}",), "weights file .* not found"),
        ((f"model.student_init={wrong}",), "student init .* does not fit the model .* shape mismatches"),
        (("model.lora_rank=2", "model.lora_targets=[to_q, to_kk]"), "'to_kk' matches no module"),  # to_q alone trained
        (("model.lora_rank=2", "model.lora_targets=[norm1]"), "'norm1' names GroupNorm.* LoRA cannot adapt"),
    ]:
        cfg = config(tiny_sdxl_dir, tmp_path / "run", f"data.pairs={pairs}", "data.num_pairs=4", *overrides)
        with pytest.raises(UserError, match=message):
            Distiller(cfg, progress=False)
        assert not pairs.exists()


def test_sharded_training_is_refused_in_one_line(tiny_sdxl_dir, tmp_path):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(UserError, match=f"{kind.value} is not supported by distill: launch with DDP"):
            Distiller(config(tiny_sdxl_dir, tmp_path), accelerator=SimpleNamespace(distributed_type=kind))


def test_an_online_stochastic_teacher_resumes_exactly(tmp_path):
    """Sampled online, an LCM teacher's step noise came from torch's global state, which no
    checkpoint holds: the resumed run's data differed from the uninterrupted run's."""
    from diffusers import LCMScheduler

    pipe = tiny_sdxl_pipeline()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "lcm-teacher")
    straight, resumed = straight_and_resumed(tmp_path / "lcm-teacher", tmp_path, "data.teacher_steps=2")
    assert same_student(tmp_path / "a", tmp_path / "b")


def test_waiting_for_another_ranks_pairs_stops_when_none_arrive(tmp_path, monkeypatch):
    """A rank that died making its share, or a disk another machine cannot see, never delivers its
    shards: the wait went on forever, outside any collective. It stops after
    run.process_timeout_minutes without a new shard, and waits on while shards keep coming. A short
    shard (being extended by its rank) is not delivered yet. A rank still sampling its shard (an
    hour at SDXL size) touches its heartbeat after every batch, and is waited for: a rank whose
    own shards were all made before (a resumed run) gave up on it after the timeout."""
    import nitrofusion.data.teacher as teacher

    clock = [0.0]
    arrivals, beats = {}, []
    monkeypatch.setattr(teacher.time, "monotonic", lambda: clock[0])

    def write(path, n):
        save_file({"seeds": torch.arange(n), "latents": torch.zeros(n, 1)}, str(path))

    def sleep(seconds):
        clock[0] += 30 * seconds  # half a minute per poll
        for path, at in arrivals.items():
            if clock[0] >= at:
                write(path, 2)
        if beats and clock[0] < beats[0]:  # another process samples a batch every poll until then
            beat = teacher.heartbeat(tmp_path, 1)
            beat.touch()
            os.utime(beat, ns=(int(clock[0] * 1e9),) * 2)

    monkeypatch.setattr(teacher.time, "sleep", sleep)
    shards = [(tmp_path / f"pairs-{i:05d}.safetensors", 2) for i in range(3)]
    write(shards[0][0], 2)
    write(shards[2][0], 1)  # short: made for fewer pairs, being extended
    arrivals = {shards[1][0]: 100.0, shards[2][0]: 200.0}  # a new shard every 100 s: never 2 min without one
    teacher.wait_for_shards(shards, tmp_path, 2)
    assert clock[0] >= 200
    late = (tmp_path / "pairs-00003.safetensors", 2)
    with pytest.raises(
        teacher.ShardsNotDelivered, match="no new shard or batch .* for 2 min, 1 missing \\(pairs-00003"
    ):
        teacher.wait_for_shards([*shards, late], tmp_path, 2)
    assert 120 < clock[0] - 200 <= 150 + 30 * 5
    # Another process samples its shard for 100 minutes, a batch at a time, then writes it: waited for.
    start = clock[0]
    beats[:] = [start + 6000]
    arrivals = {late[0]: start + 6000}
    teacher.wait_for_shards([*shards, late], tmp_path, 2)
    assert start + 6000 <= clock[0] < start + 6300
    # Its heartbeat stops (the process died): the wait stops 2 minutes later, and says so.
    never = (tmp_path / "pairs-00004.safetensors", 2)
    start = clock[0]
    beats[:] = [start + 600]
    with pytest.raises(teacher.ShardsNotDelivered, match="no new shard or batch"):
        teacher.wait_for_shards([*shards, late, never], tmp_path, 2)
    assert start + 600 <= clock[0] <= start + 600 + 2 * 30 * 5  # a poll (150 s here) after the limit


def test_seconds_per_step_counts_the_iterations_of_its_window_and_only_training(tiny_sdxl_dir, tmp_path, monkeypatch):
    """It divided the window's wall time by log_every: a resumed run's first window and the last
    window (shorter ones) were under-reported, and checkpoints and validation grids were counted
    as iterations."""
    import nitrofusion.training.distill as distill

    d = Distiller(
        config(
            tiny_sdxl_dir,
            tmp_path,
            "refine.steps_per_stage=[3]",
            "run.log_every=2",
            "run.checkpoint_every=1",
            "run.validate_every=1",
        ),
        progress=False,
    )
    clock = [0.0]
    monkeypatch.setattr(distill.time, "perf_counter", lambda: clock[0])
    step, save, validate = d.train_step, d.save_checkpoint, d.validate

    def timed(fn, seconds):
        def run(*a, **k):
            out = fn(*a, **k)
            clock[0] += seconds
            return out

        return run

    d.train_step, d.save_checkpoint, d.validate = timed(step, 3.0), timed(save, 100.0), timed(validate, 100.0)
    logged = []
    d.acc.log = lambda logs, step: logged.append((step, logs["seconds_per_step"]))
    d.train()
    total = d.cfg.total_steps
    assert total % 2 == 1 and logged[-1][0] == total  # the last window holds one iteration
    assert all(value == pytest.approx(3.0) for _, value in logged), logged


def test_settings_of_a_section_the_run_never_reads_are_warned_about():
    """dmd.* under NitroFusion's objective and pretrain.* without adversarial pre-training were
    accepted and did nothing; the presets set none such."""
    import warnings

    from nitrofusion.training.config import load_config

    with pytest.warns(UserWarning, match=r"config keys dmd.min_t are not read .* loss.objective dmd2 and adm"):
        load_config("embedded", None, ["dmd.min_t=0.1"])
    with pytest.warns(
        UserWarning,
        match=r"keys pretrain.pixel_width, pretrain.regression_weight are not read .*pretrain_kind=adversarial",
    ):
        load_config("dmdx-embedded", None, ["loss.pretrain_steps=0"])
    with pytest.warns(UserWarning, match=r"keys dmd.gan_g_weight are not read .*DMD2's classifier's: .*adm has none"):
        load_config("dmdx-embedded", None, ["dmd.gan_g_weight=0.5"])
    with pytest.warns(UserWarning, match=r"keys discriminator.refresh_fraction are not read .*static head set"):
        load_config("embedded", None, ["discriminator.pool=false", "discriminator.refresh_fraction=0.05"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for preset in ("embedded", "demo", "dmd2-embedded", "dmdx-embedded", "flow-embedded", "sdxl", "sd3", "sd15"):
            load_config(preset, None, [])
        load_config("dmd2-embedded", None, ["dmd.min_t=0.1"])  # read there
        load_config("embedded", None, ["discriminator.pool=false"])  # reproduce's static ablation


def test_settings_of_networks_a_run_never_builds_stop_neither_a_resume_nor_a_reused_run():
    """dmd.classifier_downsamples' default became null (down to 1x1): runs saved with 2 were refused
    on resume and by reproduce, under objectives that build no classifier at all."""
    import copy

    from nitrofusion.evaluation.reproduce import _config_difference
    from nitrofusion.training.config import as_trained

    want = load_config("embedded", None, []).to_dict()
    old = copy.deepcopy(want)
    old["dmd"]["classifier_downsamples"] = 2
    del old["discriminator"]["global_downsamples"]  # saved before the key: the local heads' depth, 2
    assert _config_difference(old, want) is None
    old["discriminator"]["downsamples"] = 1
    assert as_trained(old)["discriminator"]["global_downsamples"] == 1
    no_gan = load_config("dmd2-embedded", None, ["dmd.gan_g_weight=0", "dmd.gan_d_weight=0"]).to_dict()
    unread = unread_keys(no_gan)
    assert {"dmd.classifier_downsamples", "discriminator.width"} <= unread and "dmd.real_guidance" not in unread
    assert "dmd.classifier_downsamples" not in unread_keys(load_config("dmd2-embedded", None, []).to_dict())
