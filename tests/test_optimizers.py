"""The UNet-sized optimizers: bitsandbytes' 8-bit AdamW (optim.optimizer=adamw8bit) for the
student and DMD's fake score, and AdamW's fused kernel on CUDA (optim.fused)."""

import importlib.util

import bitsandbytes
import pytest
import torch
from helpers import config, same_student, straight_and_resumed
from test_distill import expect_cli_error

from nitrofusion.errors import UserError
from nitrofusion.training.distill import Distiller
from nitrofusion.training.optimizers import make_optimizer, state_bytes


def test_8bit_moments_take_a_quarter_of_the_memory_and_follow_adamw():
    """Fitted to the same target, the 8-bit moments land where fp32 AdamW does, in a quarter of its state."""
    torch.manual_seed(0)
    target = torch.randn(64, 256)
    runs = {}
    for name in ("adamw", "adamw8bit"):
        weight = torch.nn.Parameter(torch.zeros(64, 256))  # 16,384 values: above bitsandbytes' 4,096 threshold
        opt = make_optimizer([weight], name, lr=2e-2, betas=(0.0, 0.99), weight_decay=0.01)
        early = None
        for step in range(400):
            opt.zero_grad()
            (weight - target).pow(2).sum().backward()
            opt.step()
            if step == 19:
                early = weight.detach().clone()
        runs[name] = (weight.detach(), opt, early)
    (fp32, adamw, fp32_early), (eight, adamw8bit, eight_early) = runs["adamw"], runs["adamw8bit"]
    assert isinstance(adamw8bit, bitsandbytes.optim.AdamW8bit)
    assert state_bytes(adamw8bit) < 0.27 * state_bytes(adamw)  # 2 bytes + block scales vs 8 bytes a value
    start = (target - 0).norm()
    assert (fp32 - target).norm() < 0.05 * start  # both fitted...
    assert (eight - fp32).norm() < 0.05 * start  # ...to the same place
    # ...by the same path: after 20 steps, far from the target, within 5% of the distance moved
    # (any optimizer that converges would pass the end-point checks alone).
    assert (fp32_early - target).norm() > 0.3 * start
    assert (eight_early - fp32_early).norm() < 0.05 * fp32_early.norm()


def test_fused_adamw_only_on_cuda(tiny_sdxl_dir, tmp_path):
    """On the CPU every optimizer keeps torch's default kernels (the documented results are theirs)."""
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], "adamw", 1e-3, (0.9, 0.99), 0.0, fused=True)
    assert not opt.defaults["fused"]
    d = Distiller(config(tiny_sdxl_dir, tmp_path, "loss.objective=dmd2", "optim.fused=true"), progress=False)
    optimizers = [d.opt_g.optimizer] + [opt for c in d.critics.values() for opt in c.optimizers.values()]
    assert len(optimizers) == 2 and all(not opt.defaults["fused"] for opt in optimizers)


def test_the_kernels_are_the_runs_choice_not_the_checkpoints():
    """A checkpoint made with fused AdamW (on a GPU) resumed on the CPU runs the CPU's kernels."""
    from nitrofusion.training import checkpoint

    made = make_optimizer([torch.nn.Parameter(torch.ones(3))], "adamw", 1e-3, (0.9, 0.99), 0.0)
    made.param_groups[0]["params"][0].grad = torch.ones(3)
    made.step()
    tensors, meta = checkpoint.optimizer_tensors(made, "opt")
    meta["param_groups"][0]["fused"] = True  # as a CUDA run with optim.fused writes it
    resumed = make_optimizer([torch.nn.Parameter(torch.ones(3))], "adamw", 1e-3, (0.9, 0.99), 0.0)
    checkpoint.load_optimizer(resumed, tensors, meta, "opt")
    assert not resumed.param_groups[0]["fused"]
    assert torch.equal(resumed.state[resumed.param_groups[0]["params"][0]]["exp_avg"], torch.full((3,), 0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW is used on CUDA only")
@pytest.mark.parametrize("made_fused", [False, True])
def test_gpu_resume_into_either_kernel(made_fused):
    """A checkpoint from either kernel resumes into the other: the fused kernel reads `step` on
    the GPU, the foreach one on the host; resumed, both go on as the uninterrupted run."""
    from nitrofusion.training import checkpoint

    def run(fused: bool, steps: int, weight=None, state=None):
        weight = torch.nn.Parameter(torch.zeros(64, 256, device="cuda") if weight is None else weight.clone())
        opt = make_optimizer([weight], "adamw", lr=2e-2, betas=(0.0, 0.99), weight_decay=0.01, fused=fused)
        if state is not None:
            checkpoint.load_optimizer(opt, *state, "opt")
        for _ in range(steps):
            opt.zero_grad()
            (weight - torch.ones_like(weight)).pow(2).sum().backward()
            opt.step()
        return weight.detach(), opt

    straight, _ = run(not made_fused, 20)
    half, opt = run(made_fused, 10)
    resumed, opt = run(not made_fused, 10, half, checkpoint.optimizer_tensors(opt, "opt"))
    step = opt.state[opt.param_groups[0]["params"][0]]["step"]
    assert step.device.type == ("cpu" if made_fused else "cuda") and float(step) == 20
    torch.testing.assert_close(resumed, straight, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW is used on CUDA only")
def test_fused_adamw_on_gpu_steps_like_the_default():
    # The target lies beyond where 20 steps can reach, so no weight crosses it: at a crossing the
    # gradient's sign is a rounding's, and the two kernels' last-bit differences grew to 0.09 on
    # 55 of 16,384 weights (the H200 run of 2026-11-27, with a target inside reach and beta1=0).
    torch.manual_seed(0)
    target = 5 + torch.randn(64, 256, device="cuda")
    weights = {}
    for fused in (False, True):
        weight = torch.nn.Parameter(torch.zeros(64, 256, device="cuda"))
        opt = make_optimizer([weight], "adamw", lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, fused=fused)
        assert bool(opt.defaults["fused"]) == fused
        for _ in range(20):
            opt.zero_grad()
            (weight - target).pow(2).sum().backward()
            opt.step()
        weights[fused] = weight.detach()
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-5, atol=1e-5)


def test_an_8bit_dmd2_run_trains_both_unets_in_8bit_and_resumes_exactly(tiny_sdxl_dir, tmp_path):
    """The quantised moments, their block scales and bitsandbytes' integer step survive the
    pickle-free checkpoint: a resumed run ends on the same student, bit for bit."""
    common = ["optim.optimizer=adamw8bit", "loss.objective=dmd2", "refine.steps_per_stage=[4]"]
    straight, resumed = straight_and_resumed(tiny_sdxl_dir, tmp_path, *common)
    assert resumed.step == straight.step == 4
    assert same_student(tmp_path / "a", tmp_path / "b")
    for opt in (resumed.opt_g.optimizer, resumed.critics["fake"].opt):
        assert isinstance(opt, bitsandbytes.optim.AdamW8bit)
        params = [p for group in opt.param_groups for p in group["params"]]
        large = [opt.state[p]["state1"] for p in params if p.numel() >= 4096]
        assert large and all(m.dtype == torch.uint8 for m in large)  # smaller tensors keep fp32 moments


def test_resuming_with_the_other_optimizer_is_refused(tiny_sdxl_dir, tmp_path):
    Distiller(
        config(tiny_sdxl_dir, tmp_path, "run.checkpoint_every=1", "refine.steps_per_stage=[1]"), progress=False
    ).train()
    eight = Distiller(config(tiny_sdxl_dir, tmp_path, "optim.optimizer=adamw8bit"), progress=False)
    with pytest.raises(UserError, match="made with optim.optimizer='adamw', this run has 'adamw8bit'"):
        eight.resume("latest")


def test_8bit_without_bitsandbytes_stops_before_any_work(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    out = tmp_path / "run"
    expect_cli_error(
        ["distill", "--preset", "embedded", "--set", "optim.optimizer=adamw8bit", "--set", f"run.output_dir={out}"],
        capsys,
        "needs bitsandbytes",
        "nitrofusion[8bit]",
    )
    assert not out.exists()
