"""Weight-delta transfer and LoRA export on the tiny SDXL UNet."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nitrofusion.cli import main
from nitrofusion.errors import UserError
from nitrofusion.testing import tiny_sdxl_pipeline
from nitrofusion.weights.lora import extract_lora, low_rank
from nitrofusion.weights.transfer import transfer_delta


@pytest.fixture(scope="module")
def teacher():
    return {k: v.clone() for k, v in tiny_sdxl_pipeline().unet.state_dict().items()}


def shifted(state, seed, rank=2, scale=0.01, biases=0.0):
    """state + a rank-`rank` delta on every Linear/Conv weight (+ optional bias deltas)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if k.endswith(".weight") and v.ndim in (2, 4):
            d = torch.randn(v.shape[0], rank, generator=g) @ torch.randn(rank, v[0].numel(), generator=g)
            out[k] = v + scale * d.reshape(v.shape)
        elif k.endswith(".bias") and biases:
            out[k] = v + biases * torch.randn(v.shape, generator=g)
        else:
            out[k] = v.clone()
    return out


def save(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_transfer_identity_and_known_delta(teacher, tmp_path):
    # Biases and norm weights move too (a transfer that skipped 1-D tensors would pass otherwise).
    student, target = shifted(teacher, 1, biases=0.01), shifted(teacher, 2, biases=0.01)
    assert all(not torch.equal(student[k], teacher[k]) for k in teacher if k.endswith(".bias"))
    # Transferring onto the base itself gives the student back.
    same = transfer_delta(teacher, student, teacher)
    assert all(torch.allclose(same[k], student[k], atol=1e-6) for k in student)
    # Onto another fine-tune: target + (student - base), exactly.
    out = tmp_path / "moved.safetensors"
    code = main(
        [
            "transfer",
            "--base",
            save(teacher, tmp_path / "b.safetensors"),
            "--student",
            save(student, tmp_path / "s.safetensors"),
            "--target",
            save(target, tmp_path / "t.safetensors"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    moved = load_file(str(out))
    for k in teacher:
        assert torch.allclose(moved[k], target[k] + (student[k] - teacher[k]), atol=1e-6)
    half = transfer_delta(teacher, student, target, scale=0.5)  # --scale multiplies the delta
    for k in teacher:
        torch.testing.assert_close(half[k], target[k] + 0.5 * (student[k] - teacher[k]), atol=1e-6, rtol=0)


def test_transfer_refuses_other_architectures(teacher, tmp_path, capsys):
    bad = dict(teacher)
    bad.pop(next(iter(bad)))
    wider = {
        k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if i == 3 else v) for i, (k, v) in enumerate(teacher.items())
    }
    with pytest.raises(UserError, match="keys missing from the student"):
        transfer_delta(teacher, bad, teacher)
    with pytest.raises(UserError, match="shape mismatches"):
        transfer_delta(teacher, teacher, wider)
    code = main(
        [
            "transfer",
            "--base",
            str(tmp_path / "none.safetensors"),
            "--student",
            "x.safetensors",
            "--target",
            "y.safetensors",
            "--out",
            str(tmp_path / "o.safetensors"),
        ]
    )
    assert code == 2 and "not found" in capsys.readouterr().err
    # A wrong --out or --dtype is said before three UNets are read.
    for extra, needle in (
        (["--out", str(tmp_path / "o.bin")], "must end in .safetensors"),
        (["--dtype", "f8"], "--dtype"),
    ):
        args = [
            "transfer",
            "--base",
            "missing",
            "--student",
            "x",
            "--target",
            "y",
            "--out",
            str(tmp_path / "o.safetensors"),
        ]
        assert main(args + extra) == 2 and needle in capsys.readouterr().err


def test_transfer_refuses_an_sd3_student_and_names_the_way_that_works(tmp_path, capsys):
    """An SD3 transformer file was moved onto the base like a UNet and written as a UNet student
    that records no levels, which nothing could sample."""
    from nitrofusion.weights.io import SD3_KEY

    sd3 = {SD3_KEY: torch.zeros(8, 4, 2, 2), "proj_out.weight": torch.zeros(16, 8)}
    files = []
    for name in ("base", "student", "target"):
        save_file(sd3, str(tmp_path / f"{name}.safetensors"))
        files += [f"--{name}", str(tmp_path / f"{name}.safetensors")]
    assert main(["transfer", *files, "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is an SD3 transformer: transfer moves UNet students" in err and "export-lora" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_a_base_the_student_was_not_distilled_from_is_refused_at_any_precision_of_its_own(teacher, tmp_path, capsys):
    """A delta against another base carries the difference of the two bases into the result: --base
    and --target swapped wrote a wrong student without a word. The student's file records a few of
    its teacher's weights (as distill writes them); the teacher stored in fp16 or bf16 still passes."""
    from nitrofusion.weights.provenance import teacher_samples_metadata, weight_samples

    student, target = shifted(teacher, 1), shifted(teacher, 2)
    s = str(tmp_path / "s.safetensors")
    save_file(
        {k: v.contiguous() for k, v in student.items()},
        s,
        metadata={"format": "pt", **teacher_samples_metadata(weight_samples(teacher))},
    )
    b, t = save(teacher, tmp_path / "b.safetensors"), save(target, tmp_path / "t.safetensors")
    out = tmp_path / "o.safetensors"
    assert main(["transfer", "--base", t, "--student", s, "--target", b, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--base '{t}' is not the model the student was distilled from" in err and not out.exists()
    assert main(["export-lora", "--student", s, "--teacher", t, "--rank", "2", "--out", str(out)]) == 2
    assert f"--teacher '{t}' is not the model the student was distilled from" in capsys.readouterr().err
    # Another base on purpose (SDXL base under a student of DMD2's SDXL, to carry DMD2's change too).
    assert main(["transfer", "--base", t, "--student", s, "--target", b, "--out", str(out), "--other-base"]) == 0
    out.unlink()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        stored = save({k: v.to(dtype) for k, v in teacher.items()}, tmp_path / f"b-{dtype}.safetensors")
        assert main(["transfer", "--base", stored, "--student", s, "--target", t, "--out", str(out)]) == 0
        out.unlink()


def test_transfer_stores_the_dtype_asked_for(teacher):
    student, target = shifted(teacher, 1), shifted(teacher, 2)
    half = transfer_delta(teacher, student, target, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    before = {k: v.clone() for k, v in target.items()}
    exact = transfer_delta(teacher, student, target)
    assert all(torch.equal(half[k], exact[k].half()) for k in exact)  # rounded once, from the fp32 sum
    assert all(torch.equal(target[k], v) for k, v in before.items())  # the inputs are left as they were


def test_transfer_stores_the_targets_dtype_by_default(teacher, tmp_path):
    """--dtype auto (the default): the dtype the target is stored in, here fp16 from fp32 inputs,
    each tensor rounded once from the fp32 sum."""
    student, target = shifted(teacher, 1), shifted(teacher, 2)
    files = [save(teacher, tmp_path / "b.safetensors"), save(student, tmp_path / "s.safetensors")]
    files.append(save({k: v.half() for k, v in target.items()}, tmp_path / "t.safetensors"))
    out = tmp_path / "moved.safetensors"
    args = ["transfer", "--base", files[0], "--student", files[1], "--target", files[2], "--out", str(out)]
    assert main(args) == 0
    moved = load_file(str(out))
    exact = transfer_delta(teacher, student, {k: v.half() for k, v in target.items()}, dtype=torch.float16)
    assert all(moved[k].dtype == torch.float16 and torch.equal(moved[k], exact[k]) for k in teacher)


def test_low_rank_is_the_svd_optimum():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 20, generator=g, dtype=torch.float64).float()
    a, b, residual = low_rank(m, 3)
    s = torch.linalg.svdvals(m.double())
    assert residual == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-6)
    assert float(((m - b @ a).double() ** 2).sum()) == pytest.approx(residual, rel=1e-4)
    conv = torch.randn(6, 4, 3, 3, generator=g)
    a, b, _ = low_rank(conv, 2)
    assert a.shape == (2, 4, 3, 3) and b.shape == (6, 2, 1, 1)


def test_lora_round_trip_through_stock_diffusers(teacher, tmp_path, capsys):
    student = shifted(teacher, 3, rank=2)
    code = main(
        [
            "export-lora",
            "--student",
            save(student, tmp_path / "s.safetensors"),
            "--teacher",
            save(teacher, tmp_path / "t.safetensors"),
            "--rank",
            "4",
            "--dtype",
            "fp32",
            "--out",
            str(tmp_path / "lora"),
        ]
    )
    assert code == 0
    assert "relative error 0.0000" in capsys.readouterr().out
    pipe = tiny_sdxl_pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    assert max((fused[k] - student[k]).abs().max().item() for k in student) < 1e-5
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert "relative_error" in f.metadata()["nitrofusion"]
        assert "nitrofusion.shift" not in f.metadata()  # a student file that records none


def test_an_exported_lora_records_the_students_shift(teacher, tmp_path):
    """The LoRA'd teacher is the student only at the student's shift: recorded as distill records it."""
    from nitrofusion.pipelines.loading import save_unet_weights, unet_file_shift

    student = tmp_path / "s.safetensors"
    unet = tiny_sdxl_pipeline().unet
    unet.load_state_dict(shifted(teacher, 3, rank=2))
    save_unet_weights(unet, student, shift=500)
    t = save(teacher, tmp_path / "t.safetensors")
    for extra, want in (([], 500), (["--shift", "250"], 250)):
        out = tmp_path / f"lora{want}.safetensors"
        assert (
            main(["export-lora", "--student", str(student), "--teacher", t, "--rank", "2", "--out", str(out), *extra])
            == 0
        )
        assert unet_file_shift(out) == want


def test_a_mixed_rank_fp16_lora_loads_into_stock_diffusers(teacher, tmp_path, capsys):
    """What a real export is: the default fp16 file, and a rank above some modules' smallest side
    (the tiny UNet's conv_out has 4 output channels), so modules get different ranks."""
    student = shifted(teacher, 3, rank=2)
    s, t = save(student, tmp_path / "s.safetensors"), save(teacher, tmp_path / "t.safetensors")
    assert main(["export-lora", "--student", s, "--teacher", t, "--rank", "8", "--out", str(tmp_path / "lora")]) == 0
    lora = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert {v.dtype for v in lora.values()} == {torch.float16}
    assert len({v.shape[0] for k, v in lora.items() if k.endswith("lora_A.weight")}) > 1, "one rank everywhere"
    # The config rides in the header, as diffusers writes it: loaders need not infer the alphas.
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == config["unet.lora_alpha"] == 8
    assert config["unet.rank_pattern"] == config["unet.alpha_pattern"] and "conv_out" in config["unet.rank_pattern"]
    pipe = tiny_sdxl_pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    (adapter,) = pipe.unet.peft_config.values()
    assert adapter.rank_pattern == config["unet.rank_pattern"]
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    for k in student:
        delta = (student[k] - teacher[k]).abs().max().item()
        assert (fused[k] - student[k]).abs().max().item() <= 2e-3 * max(delta, 1e-3), k  # fp16 factors


def test_lora_error_is_reported_when_the_rank_is_too_small(teacher):
    student = shifted(teacher, 4, rank=6, biases=0.01)
    _, report = extract_lora(student, teacher, rank=2)
    assert 0.1 < report.relative_error < 1.0 and report.uncovered_share > 0
    _, full = extract_lora(student, teacher, rank=6)
    assert full.relative_error == pytest.approx(full.uncovered_share**0.5, rel=1e-3)
    with pytest.raises(UserError, match="no delta"):
        extract_lora(teacher, teacher, rank=2)


@pytest.mark.parametrize("extra, needle", [(["--dtype", "int8"], "--dtype"), (["--rank", "0"], "--rank")])
def test_export_lora_bad_options_are_one_line(teacher, tmp_path, capsys, extra, needle):
    s, t = save(shifted(teacher, 5), tmp_path / "s.safetensors"), save(teacher, tmp_path / "t.safetensors")
    code = main(["export-lora", "--student", s, "--teacher", t, "--out", str(tmp_path / "lora"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "lora").exists()


def test_unet_folders_are_read_as_from_pretrained_reads_them(tmp_path, capsys):
    """A pipeline, its unet/ folder, a sharded folder and an fp16-variant sharded folder give the
    UNet's own state dict, in the dtype stored; a folder of another model is refused in one line."""
    from nitrofusion.weights.io import unet_state_dict

    pipe = tiny_sdxl_pipeline()
    want = pipe.unet.state_dict()
    pipe.save_pretrained(tmp_path / "pipe")
    pipe.unet.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    pipe.unet.half().save_pretrained(tmp_path / "sharded-fp16", max_shard_size="200KB", variant="fp16")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    for source, dtype in (
        ("pipe", torch.float32),
        ("pipe/unet", torch.float32),
        ("sharded", torch.float32),
        ("sharded-fp16", torch.float16),
    ):
        state = unet_state_dict(tmp_path / source, "--base")
        assert state.keys() == want.keys(), source
        assert all(torch.equal(state[k], v.to(dtype)) and state[k].dtype == dtype for k, v in want.items()), source
    with pytest.raises(UserError, match="holds a AutoencoderKL, not a UNet2DConditionModel"):
        unet_state_dict(tmp_path / "pipe" / "vae", "--base")
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="holds no diffusion_pytorch_model.safetensors"):
        unet_state_dict(tmp_path / "pipe", "--base")


def _anonymous_memory() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_transfer_holds_a_few_tensors_in_memory_not_its_inputs_or_result(tmp_path):
    """Inputs are memory-mapped and the result written as it is made, a tensor at a time: at SDXL
    size, three UNets built in fp32 held ~30 GB where the result takes 10. Peak anonymous memory
    is sampled while a 66M-parameter UNet is moved between two pipeline folders and a file."""
    import threading
    import time

    from diffusers import UNet2DConditionModel

    from nitrofusion.weights.transfer import transfer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(128, 256, 512),
        layers_per_block=1,
        cross_attention_dim=256,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    result_bytes = 4 * sum(p.numel() for p in unet.parameters())
    unet.save_pretrained(tmp_path / "target")
    save(unet.state_dict(), tmp_path / "student.safetensors")
    unet.half().save_pretrained(tmp_path / "base", variant="fp16")
    del unet
    before, peak, done = _anonymous_memory(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _anonymous_memory())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        transfer(
            str(tmp_path / "base"),
            str(tmp_path / "student.safetensors"),
            str(tmp_path / "target"),
            tmp_path / "moved.safetensors",
            dtype="fp32",
        )
    finally:
        done.set()
        watcher.join()
    # Building the two folders' UNets in fp32 as well, as `from_pretrained` did, measured 1.97x;
    # holding the result whole until it was written, 0.88x.
    assert peak[0] - before < 0.4 * result_bytes, f"{(peak[0] - before) / result_bytes:.2f}x the result"


def test_a_streamed_safetensors_file_reads_back_with_safetensors(tmp_path):
    """The writer behind transfer: header first, then a tensor at a time."""
    from nitrofusion.weights.io import write_safetensors_streaming

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.half": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "d.ids": torch.arange(5),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
        "h.strided": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "i.fp8": torch.randn(3, 2, generator=g).to(torch.float8_e4m3fn),  # was a KeyError, not a file
        "j.fp8": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "k.u16": torch.arange(6, dtype=torch.int32).to(torch.uint16),
    }
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = write_safetensors_streaming(tmp_path / "x.safetensors", layout, iter(tensors.values()), {"k": "v"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    # float64 holds every value of these dtypes exactly (torch.equal has no float8 kernel)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k].double(), v.double()) for k, v in tensors.items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
    # A tensor that is not what the header said: an error, and no file under the name.
    wrong = [*layout[:7], ("h.strided", torch.float16, (6, 4)), *layout[8:]]
    with pytest.raises(ValueError, match="h.strided"):
        write_safetensors_streaming(tmp_path / "y.safetensors", wrong, iter(tensors.values()))
    assert not (tmp_path / "y.safetensors").exists() and not list(tmp_path.glob(".y*"))


def test_save_state_dict_writes_a_tensor_at_a_time_aligned_as_save_file(tmp_path, monkeypatch):
    """Checkpoints and exports went through `save_file` with every tensor copied to host memory
    first: 43 GB at once for an SDXL checkpoint. Now a tensor at a time, the widest dtypes first
    (as `save_file` orders them), so each tensor's data starts aligned to its element size."""
    import json
    import struct

    import nitrofusion.weights.io as io
    from nitrofusion.pipelines.loading import save_state_dict

    g = torch.Generator().manual_seed(0)
    state = {
        "b.half": torch.randn(7, generator=g).half(),
        "a.weight": torch.randn(3, 5, generator=g),
        "c.ids": torch.arange(3),
        "d.mask": torch.tensor([True, False, True]),
        "e.bf16": torch.randn(5, generator=g).bfloat16(),
    }
    held = []
    monkeypatch.setattr(io, "write_safetensors_streaming", lambda p, layout, tensors, meta: held.extend(tensors))
    save_state_dict(state, tmp_path / "lazy.safetensors")
    assert [id(t) for t in held] == [id(state[k]) for k in ("c.ids", "a.weight", "b.half", "e.bf16", "d.mask")]
    monkeypatch.undo()
    path = save_state_dict(state, tmp_path / "s.safetensors", metadata={"k": "v"})
    back = load_file(str(path))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header.pop("__metadata__") == {"k": "v"} and (8 + n) % 8 == 0
    for name, entry in header.items():
        assert entry["data_offsets"][0] % state[name].dtype.itemsize == 0, name


def test_the_moved_student_records_the_students_shift_wherever_the_student_comes_from(teacher, tmp_path):
    """Only a student *file*'s shift was carried: a student given as its pipeline (whose scheduler
    records shifted_timestep 500) gave a file with none, which generate then sampled at 250."""
    from nitrofusion.pipelines.loading import unet_file_shift
    from nitrofusion.scheduling import TimestepShiftLCMScheduler
    from nitrofusion.testing import save_tiny_sdxl

    student = save_tiny_sdxl(tmp_path / "student")
    pipe_scheduler = student / "scheduler"
    TimestepShiftLCMScheduler(shifted_timestep=500).save_pretrained(pipe_scheduler)
    base, target = save(teacher, tmp_path / "b.safetensors"), save(teacher, tmp_path / "t.safetensors")
    for i, (source, extra, want) in enumerate(
        [
            (student, [], 500),  # the pipeline
            (student / "unet", [], 500),  # its unet/ folder
            (student, ["--shift", "250"], 250),  # named: wins
            (save(teacher, tmp_path / "public.safetensors"), [], None),  # a file that records none
        ]
    ):
        out = tmp_path / f"moved{i}.safetensors"
        args = ["transfer", "--base", base, "--student", str(source), "--target", target, "--out", str(out)]
        assert main(args + extra) == 0
        assert unet_file_shift(out) == want, source


@pytest.mark.parametrize(("extra", "needle"), [(["--scale", "nan"], "--scale"), (["--shift", "0"], "--shift")])
def test_transfer_refuses_a_scale_or_shift_that_would_write_a_broken_student(tmp_path, capsys, extra, needle):
    args = ["transfer", "--base", "b", "--student", "s", "--target", "t", "--out", str(tmp_path / "o.safetensors")]
    assert main(args + extra) == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_export_lora_says_a_bad_rank_before_reading_the_unets(tmp_path, capsys):
    missing = str(tmp_path / "nowhere.safetensors")  # read first, this would be the error
    assert main(["export-lora", "--student", missing, "--teacher", missing, "--rank", "0", "--out", str(tmp_path)]) == 2
    assert "--rank" in capsys.readouterr().err


def test_generate_with_the_shipped_students_lora_samples_as_the_student(tmp_path, capsys):
    """export-lora, then `generate --lora`: the LoRA fused into the embedded teacher, sampled with the
    shift-LCM scheduler at the shift the LoRA records. The LoRA holds every weight delta; the student's
    bias and norm changes it cannot hold (the export's report says how much) are the only difference."""
    import numpy as np
    from PIL import Image

    from nitrofusion.pipelines import load_pipeline
    from nitrofusion.world.spec import student_path, teacher_path

    lora = tmp_path / "student-lora.safetensors"
    export = ["export-lora", "--student", "embedded", "--teacher", "embedded-teacher"]  # generate's names
    assert main([*export, "--rank", "1024", "--dtype", "fp32", "--out", str(lora)]) == 0, capsys.readouterr().err
    pipe = load_pipeline(teacher_path(), lora=lora, device="cpu")
    student = load_file(str(student_path() / "unet" / "diffusion_pytorch_model.safetensors"))
    fused = pipe.unet.state_dict()
    assert pipe.nitro_sampler == "shift-lcm" and pipe.scheduler.config.shifted_timestep == 250
    assert not any("lora" in k for k in fused)  # fused: no adapter layers left
    for k, v in student.items():
        if k.endswith(".weight") and v.ndim in (2, 4):
            assert (fused[k] - v.float()).abs().max() < 1e-4, k
    images = {}
    for name, extra in (("student", []), ("lora", ["--lora", str(lora)]), ("teacher", ["--model", "embedded-teacher"])):
        out = tmp_path / f"{name}.png"
        args = ["generate", "a photo of a sneaker", "--out", str(out), *extra]
        assert main(args + (["--sampler", "shift-lcm"] if name == "teacher" else [])) == 0, capsys.readouterr().err
        images[name] = np.asarray(Image.open(out)).astype(int)
    assert Image.open(tmp_path / "lora.png").text["lora"] == str(lora)
    apart = {k: np.abs(images[k] - images["student"]).mean() for k in ("lora", "teacher")}
    assert apart["lora"] < apart["teacher"] / 4, apart
    ev = tmp_path / "ev"
    assert main(["evaluate", "--lora", str(lora), "--n", "2", "--out", str(ev)]) == 0, capsys.readouterr().err
    rows = json.loads((ev / "results.json").read_text())
    assert [r["steps"] for r in rows] == [1, 2, 4]  # a distilled model's rows, by default
    assert rows[0]["lora"] == str(lora) and rows[0]["model"] == "teacher + student-lora" and rows[0]["lora_file"]


def test_a_lora_that_is_not_one_is_refused_in_one_line(tmp_path, capsys):
    bin_file = tmp_path / "lora.bin"
    bin_file.write_bytes(b"not a pickle we would ever open")
    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, str(kohya))
    for lora, said in (
        (bin_file, "must be a .safetensors file"),
        (kohya, "is not a LoRA in diffusers' format for one denoiser"),
        (tmp_path, "is a folder without pytorch_lora_weights.safetensors"),
    ):
        assert main(["generate", "a cat", "--lora", str(lora), "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    assert main(["generate", "a cat", "--model", "embedded", "--lora", str(kohya)]) == 2
    assert "a LoRA goes on its teacher" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_lora_whose_pairs_do_not_make_one_or_do_not_fit_is_refused_in_one_line(tmp_path, capsys):
    """A lone lora_A was an IndexError traceback from inside PEFT; a size mismatch said only
    torch's heading ("Error(s) in loading state_dict for ...:") after diffusers' own error log."""
    from nitrofusion.world.spec import teacher_path

    with safe_open(str(teacher_path() / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        out, width = f.get_slice("time_embedding.linear_1.weight").get_shape()
    module = "unet.time_embedding.linear_1"
    for tensors, said in (
        ({f"{module}.lora_A.weight": torch.zeros(2, width)}, "lora_A without its lora_B"),
        ({f"{module}.lora_B.weight": torch.zeros(out, 2)}, "lora_B without its lora_A"),
        (
            {f"{module}.lora_A.weight": torch.zeros(2), f"{module}.lora_B.weight": torch.zeros(out)},
            "are not a linear or conv LoRA",
        ),
        (
            {f"{module}.lora_A.weight": torch.zeros(2, width), f"{module}.lora_B.weight": torch.zeros(out, 3)},
            "lora_A's rank 2 and lora_B's 3 differ",
        ),
        (
            {f"{module}.lora_A.weight": torch.zeros(2, width + 1), f"{module}.lora_B.weight": torch.zeros(out, 2)},
            "does not fit",
        ),
    ):
        lora = tmp_path / "lora.safetensors"
        save_file(tensors, str(lora))
        capsys.readouterr()
        assert main(["generate", "a cat", "--model", "embedded-teacher", "--lora", str(lora), "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    assert "size mismatch" in err[0], err  # the line that says what, not the heading


def test_a_loras_recorded_shift_is_used_and_a_plain_lora_changes_no_sampler(tmp_path, capsys):
    from nitrofusion.pipelines import load_pipeline
    from nitrofusion.pipelines.adapters import read_lora_file
    from nitrofusion.pipelines.generation import default_steps
    from nitrofusion.world.spec import student_path, teacher_path

    folder = tmp_path / "vibrant-1.0"
    export = ["export-lora", "--student", str(student_path() / "unet"), "--teacher", str(teacher_path())]
    assert main([*export, "--rank", "4", "--shift", "500", "--out", str(folder)]) == 0, capsys.readouterr().err
    assert read_lora_file(folder).name == "vibrant-1.0"  # a folder's name, whole
    assert load_pipeline(teacher_path(), lora=folder, device="cpu").scheduler.config.shifted_timestep == 500
    assert load_pipeline(teacher_path(), lora=folder, shift=300, device="cpu").scheduler.config.shifted_timestep == 300
    file = folder / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    plain = tmp_path / "style.safetensors"  # any LoRA in diffusers' format: no nitrofusion header
    save_file(tensors, str(plain), metadata={"lora_adapter_metadata": header["lora_adapter_metadata"]})
    pipe = load_pipeline(teacher_path(), lora=plain, device="cpu")
    assert pipe.nitro_sampler == "native" and default_steps(pipe) == 25 and pipe.nitro_lora == str(plain)
    with pytest.raises(UserError, match="--lora and --unet both replace"):
        load_pipeline(teacher_path(), lora=plain, unet=student_path() / "unet", device="cpu")
    other = tmp_path / "other-architecture.safetensors"
    renamed = {k.replace("unet.down_blocks.0", "unet.down_blocks.7"): v for k, v in tensors.items()}
    save_file(renamed, str(other), metadata={"lora_adapter_metadata": header["lora_adapter_metadata"]})
    with pytest.raises(UserError, match=r"changes \d+ of its \d+ modules that .* does not have, first: down_blocks.7"):
        load_pipeline(teacher_path(), lora=other, device="cpu")


def test_export_lora_refuses_an_upper_case_suffix(tmp_path, capsys):
    """x.SAFETENSORS was written, and then refused by --lora (diffusers reads a LoRA file as
    safetensors by its lower-case suffix only)."""
    from nitrofusion.world.spec import student_path, teacher_path

    out = tmp_path / "x.SAFETENSORS"
    args = ["export-lora", "--student", str(student_path() / "unet"), "--teacher", str(teacher_path())]
    assert main([*args, "--out", str(out)]) == 2
    assert "lower-case .safetensors suffix" in capsys.readouterr().err
    assert not out.exists()
