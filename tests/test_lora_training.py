"""LoRA training mode (model.lora_rank > 0): only adapters train, and what is saved is a plain UNet."""

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from helpers import config, same_student, snapshot, straight_and_resumed
from safetensors.torch import load_file

from nitrofusion.errors import UserError
from nitrofusion.testing import save_tiny_sdxl
from nitrofusion.testing import tiny_sdxl_pipeline as tiny_sdxl
from nitrofusion.training import checkpoint
from nitrofusion.training.config import load_config
from nitrofusion.training.distill import Distiller
from nitrofusion.training.ema import EMA
from nitrofusion.training.lora import add_lora, merged_state_dict, plain_unet


def _unet_inputs(unet: UNet2DConditionModel):
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    text = torch.randn(2, 77, c.cross_attention_dim, generator=g)
    pooled_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled_dim, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    return x, torch.tensor([500, 20]), text, added


def test_merged_state_dict_is_a_plain_unet_computing_the_adapted_one():
    tiny_sdxl_pipeline = tiny_sdxl()
    unet = UNet2DConditionModel.from_config(tiny_sdxl_pipeline.unet.config)
    unet.load_state_dict(tiny_sdxl_pipeline.unet.state_dict())
    plain_keys = set(unet.state_dict())
    trainable = add_lora(unet, 4, 8.0, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], seed=0)
    assert trainable and all(p.requires_grad for p in trainable)
    assert sum(p.numel() for p in trainable) < sum(p.numel() for p in unet.parameters()) / 3
    with torch.no_grad():
        for p in trainable:  # B starts at zero: give the adapters a real delta
            p.add_(0.05 * torch.randn_like(p))
    state = merged_state_dict(unet)
    assert set(state) == plain_keys
    x, t, text, added = _unet_inputs(unet)
    with torch.no_grad():
        adapted = unet(x, t, text, added_cond_kwargs=added).sample
        merged = plain_unet(unet)(x, t, text, added_cond_kwargs=added).sample
        base = tiny_sdxl_pipeline.unet(x, t, text, added_cond_kwargs=added).sample
    assert not torch.allclose(adapted, base, atol=1e-3)  # the delta is real ...
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)  # ... and the merge carries it


def test_a_merge_against_full_precision_weights_keeps_a_delta_below_bf16_resolution():
    """Trained in bf16 (CUDA), the frozen base weights are rounded; the merge is done against the
    fp32 weights on disk, so a small trained change survives instead of rounding away."""
    unet = tiny_sdxl().unet
    full = {k: v.clone() for k, v in unet.state_dict().items()}
    trainable = add_lora(unet, 4, 4.0, ["to_q"], seed=0)
    with torch.no_grad():
        for p in trainable:
            p.fill_(1e-3)  # delta = B A: 4e-6 per weight, far below bf16's step at these magnitudes
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    rounded = merged_state_dict(unet)
    exact = merged_state_dict(unet, base=full)
    key = next(k for k in exact if k.endswith("to_q.weight"))
    assert exact[key].dtype == torch.float32
    torch.testing.assert_close(exact[key] - full[key], torch.full_like(full[key], 4e-6), rtol=0.05, atol=0)
    # Without the base, bf16's rounding of the teacher swamps the delta.
    true = full[key] + 4e-6
    assert (rounded[key].float() - true).abs().mean() > 20 * (exact[key] - true).abs().mean()
    untouched = next(k for k in exact if k.endswith("conv_in.weight"))
    assert torch.equal(exact[untouched], full[untouched])


def test_ema_shares_frozen_weights_and_averages_trainable_ones():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].requires_grad_(False)
    ema = EMA(model, 0.5)
    assert ema.shadow[0].weight is model[0].weight  # frozen: shared, not copied
    assert ema.shadow[1].weight is not model[1].weight
    before = ema.shadow[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow[1].weight, before + 0.5)


def test_lora_distillation_trains_only_adapters_and_exports_a_stock_loadable_student(tiny_sdxl_dir, tmp_path):
    cfg = config(tiny_sdxl_dir, tmp_path / "run", "model.lora_rank=4", "loss.pretrain_steps=1")
    d = Distiller(cfg, progress=False)
    trainable = [n for n, p in d.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    full = sum(p.numel() for p in d.student.parameters())
    assert sum(p.numel() for n, p in d.student.named_parameters() if p.requires_grad) < full / 3
    base = {k: v for k, v in snapshot(d.student).items() if "lora_" not in k}
    d.train()
    after = snapshot(d.student)
    assert all(torch.equal(base[k], after[k]) for k in base)  # frozen base weights never move

    teacher = load_file(str(tiny_sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    student = load_file(str(tmp_path / "run" / "student_unet.safetensors"))
    assert student.keys() == teacher.keys()  # a plain UNet state dict, like a NitroSD checkpoint
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)  # carrying the trained adapters
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "run" / "pipeline"))  # stock diffusers
    assert set(pipe.unet.state_dict()) == set(teacher)


def test_a_half_precision_lora_run_merges_against_the_teachers_weights_on_disk(
    tiny_sdxl_dir, tmp_path, bf16_accelerator
):
    """A bf16 LoRA run holds its frozen base in bf16; the export folds the adapters into the
    teacher's fp32 weights from disk, not the bf16 copy."""
    cfg = config(tiny_sdxl_dir, tmp_path / "run", "model.lora_rank=4", "optim.mixed_precision=bf16")
    d = Distiller(cfg, progress=False)
    d.train_step()
    assert d.lora_in_half_precision
    assert {p.dtype for n, p in d.ema.shadow.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    d.export()
    student = load_file(str(tmp_path / "run" / "student_unet.safetensors"))
    teacher = load_file(str(tiny_sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    exact = merged_state_dict(d.ema.shadow, base=teacher)
    rounded = merged_state_dict(d.ema.shadow)
    assert student.keys() == exact.keys() and all(torch.equal(student[k], v) for k, v in exact.items())
    assert any(not torch.equal(student[k], rounded[k].float()) for k in student)


def test_a_lora_student_shares_the_teachers_weights_and_trains_as_a_copy_would(tiny_sdxl_dir, tmp_path):
    """Its frozen base is the teacher's own tensors (no second copy); trained, it ends where a
    student started from a copy of the same weights (`model.student_init`: not shared) ends."""
    common = ["model.lora_rank=4", "loss.pretrain_steps=1"]
    d = Distiller(config(tiny_sdxl_dir, tmp_path / "shared", *common), progress=False)
    teacher = {id(p) for p in d.teacher.unet.parameters()}
    base = [p for n, p in d.student.named_parameters() if "lora_" not in n]
    assert base and all(id(p) in teacher for p in base)
    assert not any(p.requires_grad for p in d.teacher.unet.parameters())
    d.train()
    init = f"model.student_init={tiny_sdxl_dir / 'unet' / 'diffusion_pytorch_model.safetensors'}"
    copied = Distiller(config(tiny_sdxl_dir, tmp_path / "copied", *common, init), progress=False)
    assert not {id(p) for p in copied.student.parameters()} & {id(p) for p in copied.teacher.unet.parameters()}
    copied.train()
    assert same_student(tmp_path / "shared", tmp_path / "copied")


def test_resume_never_writes_into_the_teachers_weights(tiny_sdxl_dir, tmp_path):
    """The LoRA student's base is the teacher: a checkpoint made with another teacher is refused in
    one line, and nothing is loaded into the teacher."""
    d = Distiller(config(tiny_sdxl_dir, tmp_path, "model.lora_rank=4"), progress=False)
    d.train_step()
    d.step += 1
    d.save_checkpoint()
    other = Distiller(config(tiny_sdxl_dir, tmp_path, "model.lora_rank=4"), progress=False)
    weight = next(other.teacher.unet.parameters())
    with torch.no_grad():
        weight.add_(1.0)  # as if another teacher
    changed = weight.detach().clone()
    with pytest.raises(UserError, match="made with another teacher"):
        other.resume("latest")
    assert torch.equal(weight, changed)


def test_a_lora_checkpoint_holds_the_adapters_and_a_fingerprint_of_the_frozen_base(tiny_sdxl_dir, tmp_path):
    """The frozen base is the teacher's or model.student_init's weights, which a resumed run loads
    anyway: the checkpoint keeps which weights they were, not a copy. A resume on another base is
    refused; so is one from a checkpoint that still holds a base (as they all did) other than this run's."""
    init = f"model.student_init={tiny_sdxl_dir / 'unet' / 'diffusion_pytorch_model.safetensors'}"
    d = Distiller(config(tiny_sdxl_dir, tmp_path / "run", "model.lora_rank=4", init), progress=False)
    d.train_step()
    d.step += 1
    d.save_checkpoint()
    tensors, meta = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    student = {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}
    trainable = {n for n, p in d.student.named_parameters() if p.requires_grad}
    assert student.keys() == trainable and all("lora_" in k for k in student)
    frozen = d.frozen_student_weights(d.student)
    assert frozen and meta["student_frozen_fingerprint"] == checkpoint.fingerprint(frozen)

    other_base = save_tiny_sdxl(tmp_path / "other", seed=1) / "unet" / "diffusion_pytorch_model.safetensors"
    other = Distiller(config(tiny_sdxl_dir, tmp_path / "run", "model.lora_rank=4", f"model.student_init={other_base}"))
    with pytest.raises(UserError, match="trained on other frozen weights"):
        other.resume("latest")

    # A checkpoint written with its base (as before fingerprints): that base is checked against this run's.
    base = {f"student.{k}": v for k, v in frozen.items()}
    written = ("step", "state_bytes", "state_crc32", "student_frozen_fingerprint")
    old_meta = {k: v for k, v in meta.items() if k not in written}
    checkpoint.save(tmp_path / "run" / "checkpoints", 2, tensors | base, old_meta)
    with pytest.raises(UserError, match="trained on other frozen weights"):
        other.resume("latest")
    again = Distiller(config(tiny_sdxl_dir, tmp_path / "run", "model.lora_rank=4", init), progress=False)
    again.resume("latest")
    assert again.step == 2
    assert all(torch.equal(v, again.student.state_dict()[k]) for k, v in student.items())


def test_lora_run_resumes_exactly(tiny_sdxl_dir, tmp_path):
    straight, resumed = straight_and_resumed(tiny_sdxl_dir, tmp_path, "model.lora_rank=4", "refine.steps_per_stage=[4]")
    assert same_student(tmp_path / "a", tmp_path / "b")


def test_lora_config_errors(tiny_sdxl_dir, tmp_path):
    with pytest.raises(UserError, match="lora_rank"):
        load_config(None, None, ["model.lora_rank=-1"])
    with pytest.raises(UserError, match="lora_alpha"):
        load_config(None, None, ["model.lora_rank=4", "model.lora_alpha=-2"])
    with pytest.raises(UserError, match="lora_targets"):
        load_config(None, None, ["model.lora_rank=4", "model.lora_targets=[]"])
    with pytest.raises(UserError, match="matches no module"):
        Distiller(config(tiny_sdxl_dir, tmp_path, "model.lora_rank=2", "model.lora_targets=[nothing_here]"))


def test_yaml_no_is_the_string_for_string_keys():
    """Only true/false are booleans (YAML 1.2): YAML 1.1's on/no had turned `run.output_dir=on` into
    the folder 'yes'; bool keys still take yes/no/on/off."""
    cfg = load_config(
        None,
        None,
        [
            "optim.mixed_precision=no",
            "run.output_dir=on",
            "model.teacher=No",
            "model.lora_rank=2",
            "model.lora_targets=[to_q, on]",
            "model.gradient_checkpointing=yes",
            "optim.ema_offload=off",
        ],
    )
    assert cfg.optim.mixed_precision == "no" and cfg.run.output_dir == "on" and cfg.model.teacher == "No"
    assert cfg.model.lora_targets == ["to_q", "on"]
    assert cfg.model.gradient_checkpointing is True and cfg.optim.ema_offload is False
    with pytest.raises(UserError, match="got 'off'"):  # what the user typed, not 'no'
        load_config(None, None, ["run.log_with=off"])


def test_a_config_file_section_given_twice_is_refused_with_its_line(tmp_path):
    """YAML keeps the last of two `optim:` sections: the first one's settings were lost without a word."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-5\noptim:\n  ema_decay: 0.9\n")
    with pytest.raises(UserError, match=r"key 'optim' is given twice \(line 3, column 1\)"):
        load_config(None, path)
    path.write_text("optim:\n  lr: 1\n bad: [\n")
    with pytest.raises(UserError, match=r"not valid YAML: .*\(line 3, column 2\)"):
        load_config(None, path)


def test_ema_with_decay_zero_is_the_model_itself():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, 0.0)
    assert ema.shadow.weight is model.weight and ema.own_state_dict() == {}


def test_head_init_is_drawn_on_the_cpu_whatever_the_heads_dtype():
    """Refresh re-initialises heads from a CPU generator; on CUDA weights that used to raise."""
    from nitrofusion.discriminator.heads import DiscriminatorHead

    a = DiscriminatorHead("local_cond", 8, 4, 6, 1, torch.Generator().manual_seed(3))
    b = DiscriminatorHead("local_cond", 8, 4, 6, 1, torch.Generator().manual_seed(0)).to(torch.float64)
    b.reset_parameters(torch.Generator().manual_seed(3))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert y.dtype == torch.float64 and torch.equal(x.double(), y), name
