"""CPU offload of the teacher (model.teacher_offload) and of the EMA (optim.ema_offload): what
goes to host memory, the guards against using it there, and that training with it is the same
training."""

import pytest
import torch
from helpers import config, same_student, straight_and_resumed
from test_distill import expect_cli_error
from torch import nn

from nitrofusion.training.distill import Distiller
from nitrofusion.training.ema import EMA
from nitrofusion.training.offload import HostOffload


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).requires_grad_(False)


def test_guard_nesting_and_bytes():
    net, other = small(), small()
    x = torch.randn(3, 4)
    want = net(x)
    off = HostOffload({"text": [net]}, "cpu")
    assert off.groups == ["text"]
    assert off.host_bytes() == off.host_bytes("text") == sum(p.numel() * 4 for p in net.parameters())
    with pytest.raises(RuntimeError, match="teacher's text is offloaded.*outside"):
        net(x)
    with off.onloaded("text"), torch.no_grad():
        with off.onloaded("text", "vae"):  # nested, and a group that is not offloaded: no-op
            pass
        assert torch.equal(net(x), want), "the inner block's end must not take the outer block's weights"
    with off.onloaded("text"), pytest.raises(RuntimeError, match="cannot be differentiated through"):
        net(x)  # autograd on: the graph would keep device weights that the block's end points back home
    with pytest.raises(RuntimeError, match="outside"):
        with torch.no_grad():
            net(x)  # after the blocks: host memory again
    other(x)  # modules of no group are untouched
    with pytest.raises(ValueError, match="unknown offload group 'unet'"):
        with off.onloaded("unet"):
            pass
    with pytest.raises(ValueError, match="unknown offload group"):
        HostOffload({"everything": [other]}, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-to-device offload needs a GPU")
def test_offload_moves_weights_off_the_gpu():
    net = nn.Linear(1024, 1024).requires_grad_(False).cuda()  # 4 MiB of weights
    x = torch.randn(8, 1024, device="cuda")
    want = net(x)
    before = torch.cuda.memory_allocated()
    off = HostOffload({"decoder": [net]}, "cuda")
    assert net.weight.device.type == "cpu" and net.weight.is_pinned()
    assert before - torch.cuda.memory_allocated() >= 4 * 2**20
    with off.onloaded("decoder"), torch.no_grad():
        assert net.weight.device.type == "cuda"
        assert torch.equal(net(x), want)
    assert net.weight.device.type == "cpu"
    assert before - torch.cuda.memory_allocated() >= 4 * 2**20


CASES = {  # id: (overrides, the teacher parts offloaded)
    # NitroFusion with the pairs made beforehand: the iteration runs only the UNet's encoder.
    "pairs": (["data.pairs={pairs}"], ["text", "vae", "decoder"]),
    # Online pairs: the teacher samples every micro-batch, its decoder brought in for it.
    "online": ([], ["text", "vae", "decoder"]),
    # DMD2's real score runs the whole teacher UNet every iteration: the decoder stays.
    "dmd2": (["loss.objective=dmd2", "data.pairs={pairs}"], ["text", "vae"]),
    # A LoRA student shares the teacher's UNet weights, decoder included: it stays.
    "lora": (["model.lora_rank=4", "data.pairs={pairs}"], ["text", "vae"]),
    # The pixel discriminator decodes the student's latents through the VAE with gradients.
    "pixel": (["loss.pretrain_kind=adversarial", "loss.pretrain_steps=1", "data.pairs={pairs}"], ["text", "decoder"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_with_the_teacher_offloaded_is_the_same_training(tiny_sdxl_dir, tmp_path, case):
    overrides, groups = CASES[case]
    overrides = [o.format(pairs=tmp_path / "pairs") for o in overrides] + ["run.validate_every=2"]
    plain = Distiller(config(tiny_sdxl_dir, tmp_path / "plain", *overrides), progress=False)
    plain.train()
    assert plain.offload.groups == []
    off = Distiller(config(tiny_sdxl_dir, tmp_path / "off", *overrides, "model.teacher_offload=true"), progress=False)
    assert sorted(off.offload.groups) == sorted(groups)
    off.train()  # the guard raises if any offloaded part runs outside `onloaded`
    assert same_student(tmp_path / "plain", tmp_path / "off")
    assert (tmp_path / "off" / "validation" / "step-00000002.png").is_file()


def test_an_sd15_teachers_safety_checker_is_offloaded_and_still_judges_the_validation_grids(tmp_path):
    """SD1.5's safety checker (1.2 GB) runs only on validation images: it waits in host memory,
    and is brought in to judge each grid (the guard raises if it were called outside)."""
    from nitrofusion.testing import save_tiny_sd15

    teacher = save_tiny_sd15(tmp_path / "sd15", safety_checker=True)
    overrides = ["run.validate_every=1", "refine.steps_per_stage=[1]", "model.teacher_offload=true"]
    d = Distiller(config(teacher, tmp_path / "run", *overrides), progress=False)
    assert "safety" in d.offload.groups and d.offload.host_bytes("safety") > 0
    judged = []
    d.teacher.safety_checker.register_forward_hook(lambda *_: judged.append(d.step))
    d.train()
    # Once per validation batch (the grid's 10 prompts in batches of the training's 2), at step 1 only.
    assert judged == [1] * 5 and (tmp_path / "run" / "validation" / "step-00000001.png").is_file()


def test_ema_in_host_memory_averages_like_the_one_beside_the_model():
    torch.manual_seed(0)
    model = small().requires_grad_(True)
    resident, host = EMA(model, 0.9), EMA(model, 0.9, host=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        resident.update(model)
        host.update(model)
    for a, b in zip(resident.shadow.state_dict().values(), host.shadow.state_dict().values()):
        assert torch.equal(a, b)
    with host.on_device("cpu") as shadow:
        assert shadow is host.shadow
        with pytest.raises(RuntimeError, match="inside EMA.on_device"):
            host.update(model)  # it would average into the device copy, dropped at the block's end


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host memory against GPU memory needs a GPU")
def test_gpu_ema_in_host_memory_averages_on_the_gpu_exactly_like_the_one_beside_the_model():
    torch.manual_seed(0)
    model = small().requires_grad_(True).cuda()
    resident, host = EMA(model, 0.9), EMA(model, 0.9, host=True)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in host.shadow.parameters())
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        resident.update(model)
        expected = [a.cpu() for a in resident.shadow.parameters()]
        torch.cuda._sleep(10**8)  # the stream busy: the copies home land late unless update waits for them
        host.update(model)
        for e, b in zip(expected, host.shadow.parameters()):  # read at once, as a checkpoint would
            assert b.device.type == "cpu" and b.is_pinned()
            assert torch.equal(e, b)  # the same kernel on the same device, not the CPU's lerp
    assert torch.cuda.memory_allocated() == before  # nothing of the host EMA stays on the GPU


def test_training_with_the_ema_in_host_memory_is_the_same_training(tiny_sdxl_dir, tmp_path):
    ema = ["optim.ema_decay=0.9", "run.validate_every=2"]
    plain = Distiller(config(tiny_sdxl_dir, tmp_path / "plain", *ema), progress=False)
    plain.train()
    straight, resumed = straight_and_resumed(tiny_sdxl_dir, tmp_path, *ema, "optim.ema_offload=true")
    assert not any(p is q for p, q in zip(straight.ema.shadow.parameters(), straight.student.parameters()))
    assert same_student(tmp_path / "plain", tmp_path / "a")  # the exported EMA weights
    assert same_student(tmp_path / "a", tmp_path / "b")  # and through a checkpoint
    assert (tmp_path / "a" / "validation" / "step-00000002.png").is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.ema_decay=0"], "needs an EMA to offload"),
        (["model.lora_rank=4"], "a LoRA student's EMA is its adapters only"),
    ],
)
def test_ema_offload_without_a_whole_ema_is_refused(overrides, message, capsys):
    args = ["distill", "--preset", "embedded", "--set", "optim.ema_offload=true"]
    expect_cli_error(args + [a for o in overrides for a in ("--set", o)], capsys, message)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload to host memory needs a GPU")
@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "online"])
def test_gpu_training_with_the_teacher_and_ema_offloaded(tiny_sdxl_dir, tmp_path, pairs):
    common = ["optim.ema_decay=0.9", "optim.mixed_precision=bf16", "run.validate_every=2"]
    common += [f"data.pairs={tmp_path / 'pairs'}"] if pairs else []
    off = ["model.teacher_offload=true", "optim.ema_offload=true"]
    runs = {}
    for name, extra in (("resident", []), ("offloaded", off)):
        d = Distiller(config(tiny_sdxl_dir, tmp_path / name, *common, *extra), progress=False)
        assert d.acc.device.type == "cuda"
        d.train()
        runs[name] = d
    d = runs["offloaded"]
    assert next(d.teacher.unet.up_blocks.parameters()).device.type == "cpu"
    assert next(d.teacher.text_encoder.parameters()).is_pinned()
    assert all(p.device.type == "cpu" for p in d.ema.shadow.parameters())
    assert next(d.teacher.unet.down_blocks.parameters()).device.type == "cuda"  # the backbone stays
    assert (tmp_path / "offloaded" / "validation" / "step-00000002.png").is_file()
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "resident" / "student_unet.safetensors"))
    b = load_file(str(tmp_path / "offloaded" / "student_unet.safetensors"))
    for k in a:  # the same training up to the GPU's own non-determinism
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
