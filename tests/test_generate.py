"""`nitrofusion generate` end to end on the tiny SDXL and SD1.5 pipelines, and its errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file

from nitrofusion.cli import main
from nitrofusion.errors import Interrupted, UserError
from nitrofusion.pipelines import generate, load_pipeline
from nitrofusion.pipelines.loading import save_unet_weights


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def student_file(tiny_sdxl_dir, tmp_path_factory):
    """A 'student': the tiny UNet with perturbed weights, written the project's way."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("student") / "student_unet.safetensors"
    save_unet_weights(unet, path)
    return path


@pytest.mark.parametrize("pipeline", ["tiny_sdxl_dir", "tiny_sd15_dir"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_generate_writes_pngs(pipeline, steps, request, tmp_path, capsys):
    model = request.getfixturevalue(pipeline)
    out = tmp_path / "out"
    code, stdout, _ = run(
        [
            "generate",
            "a photo of a cat",
            "a red bag",
            "--model",
            str(model),
            "--sampler",
            "shift-lcm",
            "--steps",
            str(steps),
            "--seed",
            "7",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert [Path(line) for line in stdout.split()] == files and len(files) == 2
    img = Image.open(files[1])
    assert img.size == (16, 16) and img.mode == "RGB"
    assert img.text["prompt"] == "a red bag"
    assert img.text["seed"] == "8"
    assert img.text["steps"] == str(steps)
    assert img.text["model"] == str(model)
    assert img.text["shift"] == "250"
    assert np.asarray(img).std() > 0


def test_student_unet_and_determinism(tiny_sdxl_dir, student_file, tmp_path, capsys):
    args = ["generate", "a shoe", "--model", str(tiny_sdxl_dir), "--unet", str(student_file), "--steps", "2"]
    code, _, err = run(args + ["--out", str(tmp_path / "a.png")], capsys)
    # The file records no shift: said in one line (Python's format added the source line that warned).
    warned = [line for line in err.splitlines() if "records no timestep shift" in line]
    assert code == 0 and len(warned) == 1 and warned[0].startswith("nitrofusion generate: warning: '")
    assert "UserWarning" not in err and "load_pipeline(" not in err
    assert Image.open(tmp_path / "a.png").text["unet"] == str(student_file)  # not only the base it was loaded into
    assert run(args + ["--out", str(tmp_path / "b.png")], capsys)[0] == 0
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png"))
    assert np.array_equal(a, b)
    assert (
        run(
            [
                "generate",
                "a shoe",
                "--model",
                str(tiny_sdxl_dir),
                "--sampler",
                "shift-lcm",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "c.png"),
            ],
            capsys,
        )[0]
        == 0
    )
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "c.png"))), "student weights were not used"


def test_seed_per_image_independent_of_batch_size(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm")
    prompts = ["a cat", "a dog", "a boot"]
    one = generate(pipe, prompts, steps=2, seed=3, batch_size=1, progress=False)
    three = generate(pipe, prompts, steps=2, seed=3, batch_size=3, progress=False)
    for x, y in zip(one, three):
        np.testing.assert_allclose(np.asarray(x.image, float), np.asarray(y.image, float), atol=1)
    # A prompt given as a string is one prompt (it was one image per character)
    (alone,) = generate(pipe, "a dog", steps=2, seed=4, progress=False)
    assert alone.prompt == "a dog" and np.array_equal(np.asarray(alone.image), np.asarray(one[1].image))


def test_native_sampler_keeps_pipeline_scheduler(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir)
    assert pipe.nitro_sampler == "native"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    (res,) = generate(pipe, ["a cat"], steps=6, guidance_scale=3.0, progress=False)
    assert res.image.size == (16, 16)


def test_an_interrupt_stops_the_pipelines_loop_at_the_next_step_and_returns_no_image(tiny_sdxl_dir, monkeypatch):
    """The app's shutdown: a teacher's image (the pipeline's own step loop) stops between two steps,
    raising, where diffusers' own interrupt flag would decode and return a half-denoised image."""
    pipe = load_pipeline(tiny_sdxl_dir)
    calls = []
    steps_run = []
    unet_forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: steps_run.append(1) or unet_forward(*a, **k))
    decoded = []
    vae_decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: decoded.append(1) or vae_decode(*a, **k))

    def interrupt() -> bool:
        calls.append(1)
        return len(calls) > 3  # asked before the batch, then after each step: stop after step 3

    with pytest.raises(Interrupted):
        generate(pipe, ["a cat"], steps=6, guidance_scale=3.0, progress=False, interrupt=interrupt)
    assert len(steps_run) == 3 and not decoded
    # Never asked to stop: the same call draws the whole image.
    (whole,) = generate(pipe, ["a cat"], steps=6, guidance_scale=3.0, progress=False, interrupt=lambda: False)
    assert len(steps_run) == 3 + 6 and decoded and whole.image.size == (16, 16)
    # The fast path (a distilled model without CFG) is asked before it samples.
    student = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm")
    with pytest.raises(Interrupted):
        generate(student, ["a cat"], steps=2, progress=False, interrupt=lambda: True)


@pytest.mark.parametrize("steps", [1, 4])
def test_generate_draws_what_the_public_readme_recipe_draws(tiny_sdxl_dir, student_file, steps):
    """The authors' recipe with stock diffusers parts: the base config's UNet with the student's
    state dict, the base pipeline, the shift-LCM scheduler (original_inference_steps 4, shift 250),
    guidance 0, a seeded generator. `load_pipeline` + `generate` must give the same pixels."""
    from diffusers import StableDiffusionXLPipeline

    from nitrofusion import TimestepShiftLCMScheduler

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_sdxl_dir, subfolder="unet"))
    unet.load_state_dict(load_file(str(student_file)))
    readme = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, unet=unet)
    readme.scheduler = TimestepShiftLCMScheduler.from_config(
        readme.scheduler.config, original_inference_steps=4, shifted_timestep=250
    )
    want = readme("a cat", num_inference_steps=steps, guidance_scale=0, generator=torch.Generator().manual_seed(7))
    pipe = load_pipeline(tiny_sdxl_dir, unet=str(student_file), shift=250, device="cpu", dtype="fp32")
    (got,) = generate(pipe, ["a cat"], steps=steps, seed=7)
    assert np.array_equal(np.asarray(got.image), np.asarray(want.images[0]))


def test_a_native_teacher_samples_at_its_pipelines_own_guidance(tiny_sdxl_dir, tiny_sd15_dir):
    """SD1.5 was given SDXL's 5 where StableDiffusionPipeline's own default is 7.5."""
    from nitrofusion.pipelines.generation import default_guidance

    sdxl = load_pipeline(tiny_sdxl_dir, sampler="native", device="cpu")
    sd15 = load_pipeline(tiny_sd15_dir, sampler="native", device="cpu")
    assert (default_guidance("native", sdxl), default_guidance("native", sd15)) == (5.0, 7.5)
    assert default_guidance("shift-lcm", sd15) == 0.0


def test_prompts_file(tiny_sd15_dir, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    code, stdout, _ = run(
        [
            "generate",
            "--prompts",
            str(f),
            "--model",
            str(tiny_sd15_dir),
            "--sampler",
            "shift-lcm",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 0 and len(stdout.split()) == 2


# --- errors: one line, exit code 2 ---------------------------------------------------------


def expect_error(args, capsys, *fragments):
    code, _, err = run(args, capsys)
    assert code == 2
    # One error line; a warning said while loading (a student file that records no shift) is a line of its own.
    lines = [line for line in err.strip().splitlines() if not line.startswith("nitrofusion generate: warning: ")]
    assert len(lines) == 1, err
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("steps", ["0", "5"])
def test_bad_steps(tiny_sdxl_dir, student_file, steps, tmp_path, capsys):
    expect_error(
        [
            "generate",
            "x",
            "--model",
            str(tiny_sdxl_dir),
            "--unet",
            str(student_file),
            "--steps",
            steps,
            "--out",
            str(tmp_path),
        ],
        capsys,
        "--steps",
    )


@pytest.mark.parametrize("shift", ["0", "-5", "5000"])
def test_bad_shift(tiny_sdxl_dir, shift, tmp_path, capsys):
    """0 once fell back to 250 without a word; a negative or too large one was a traceback."""
    args = ["generate", "x", "--model", str(tiny_sdxl_dir), "--shift", shift, "--out", str(tmp_path)]
    expect_error(args, capsys, "--shift must be a timestep in 1..1000")


def test_bad_size(tiny_sdxl_dir, tmp_path, capsys):
    expect_error(
        ["generate", "x", "--model", str(tiny_sdxl_dir), "--height", "12", "--out", str(tmp_path)],
        capsys,
        "--height",
        "multiple of 8",
    )


def test_empty_prompt_file(tiny_sdxl_dir, tmp_path, capsys):
    f = tmp_path / "empty.txt"
    f.write_text("\n  \n")
    expect_error(
        ["generate", "--prompts", str(f), "--model", str(tiny_sdxl_dir), "--out", str(tmp_path)], capsys, "no prompts"
    )


def test_missing_model_directory(tmp_path, capsys):
    expect_error(["generate", "x", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)], capsys, "not found")


def test_missing_hub_model_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    line = expect_error(
        ["generate", "x", "--model", "someone/some-model", "--out", str(tmp_path)],
        capsys,
        "someone/some-model",
        "HF_HUB_OFFLINE",
    )
    assert "--model" in line


def test_corrupt_safetensors(tiny_sdxl_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    expect_error(
        ["generate", "x", "--model", str(tiny_sdxl_dir), "--unet", str(bad), "--out", str(tmp_path)],
        capsys,
        "bad.safetensors",
        "not a readable safetensors",
    )


def test_a_pipeline_with_pickled_weights_only_says_so(tiny_sdxl_dir, tmp_path, capsys):
    """An older fine-tune saved as .bin files: diffusers' "no file named
    diffusion_pytorch_model.safetensors" said nothing of why, or what to do."""
    old = tmp_path / "old"
    shutil.copytree(tiny_sdxl_dir, old)
    for weights in old.glob("vae/*.safetensors"):
        weights.unlink()
    (old / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    expect_error(
        ["generate", "x", "--model", str(old), "--out", str(tmp_path / "out")],
        capsys,
        "vae/diffusion_pytorch_model.bin",
        "never unpickled",
    )


def test_truncated_safetensors(tiny_sdxl_dir, student_file, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    data = Path(student_file).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    expect_error(
        ["generate", "x", "--model", str(tiny_sdxl_dir), "--unet", str(cut), "--out", str(tmp_path)],
        capsys,
        "cut.safetensors",
    )


def test_a_damaged_text_encoder_or_tokenizer_is_refused(tiny_sdxl_dir, tmp_path, capsys):
    """transformers fills a text encoder's missing weights with random values and a tokenizer folder
    without its vocabulary loads as two special tokens; both only logged (and the log was hidden), so
    such a copy sampled from a wrong prompt embedding without a word. A truncated text encoder file
    was a SafetensorError traceback."""

    def damaged(name, damage):
        folder = tmp_path / name
        shutil.copytree(tiny_sdxl_dir, folder)
        damage(folder)
        return ["generate", "x", "--model", str(folder), "--out", str(tmp_path / "out")]

    def drop_a_layer(folder):
        path = folder / "text_encoder_2" / "model.safetensors"
        state = load_file(str(path))
        save_file({k: v for k, v in state.items() if ".layers.1." not in k}, str(path), metadata={"format": "pt"})

    def truncate(folder):
        path = folder / "text_encoder" / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def no_vocabulary(folder):
        for name in ("vocab.json", "merges.txt", "tokenizer.json"):
            (folder / "tokenizer" / name).unlink(missing_ok=True)

    expect_error(
        damaged("layer", drop_a_layer), capsys, "'text_encoder_2' lacks the weights text_model.encoder.layers.1."
    )
    expect_error(damaged("cut", truncate), capsys, "could not load the pipeline", "cut")
    expect_error(damaged("vocab", no_vocabulary), capsys, "'tokenizer' holds", "vocabulary files are missing")
    assert not (tmp_path / "out").exists()
    code, _, err = run(["generate", "x", "--model", str(tiny_sdxl_dir), "--out", str(tmp_path / "out")], capsys)
    assert code == 0 and "error" not in err  # the intact copy, for contrast


def test_unet_that_does_not_fit(tiny_sdxl_dir, tiny_sd15_dir, tmp_path, capsys):
    other = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
    path = tmp_path / "sd15_unet.safetensors"
    save_file(other.state_dict(), str(path))
    line = expect_error(
        ["generate", "x", "--model", str(tiny_sdxl_dir), "--unet", str(path), "--out", str(tmp_path)],
        capsys,
        "does not fit",
    )
    assert "first:" in line and "." in line.split("first:")[1]


def test_a_unet_without_its_model_names_the_embedded_one_it_was_put_in(student_file, tmp_path, capsys, monkeypatch):
    """Without --model a --unet goes into the embedded 32-px model: an SDXL student said only that
    its shapes did not fit, after reading the whole file (5 GB at SDXL size)."""
    import nitrofusion.pipelines.loading as loading

    monkeypatch.setattr(loading, "load_file", lambda *a, **k: pytest.fail("read before its header was checked"))
    line = expect_error(["generate", "x", "--unet", str(student_file), "--out", str(tmp_path / "o")], capsys, "fit")
    assert "for the embedded model (a student of another base needs --model <its base pipeline>)" in line


def test_pickle_weights_refused(tiny_sdxl_dir, tmp_path, capsys):
    f = tmp_path / "unet.bin"
    f.write_bytes(b"not even a pickle")
    expect_error(
        ["generate", "x", "--model", str(tiny_sdxl_dir), "--unet", str(f), "--out", str(tmp_path)],
        capsys,
        "only safetensors",
    )


def test_unwritable_out(tiny_sdxl_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    expect_error(
        ["generate", "x", "--model", str(tiny_sdxl_dir), "--out", str(blocker / "sub")],
        capsys,
        "cannot create output directory",
    )


def test_console_script_exit_code(tmp_path):
    """The installed `nitrofusion` script exits 2 with one line, at once: input that needs no model
    is checked before diffusers is imported."""
    exe = Path(sys.executable).with_name("nitrofusion")
    proc = subprocess.run(
        [str(exe), "generate", "x", "--steps", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--steps" in proc.stderr
    code = (
        "import sys; from nitrofusion.cli import main; "
        f"code = main(['generate', 'x', '--steps', '0', '--out', {str(tmp_path)!r}]); "
        "print(code, 'diffusers' in sys.modules, 'torch' in sys.modules)"
    )
    checked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert checked.stdout.split() == ["2", "False", "False"], checked.stdout + checked.stderr


@pytest.mark.parametrize("device", ["embedded", "cuda:x", "tpu"])
def test_unknown_device_is_one_line(device, tmp_path, capsys):
    assert main(["generate", "a sneaker", "--device", device, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device" in err[0], err


@pytest.mark.parametrize("device", ["cuda", "mps", "xpu"])
def test_a_device_this_machine_lacks_is_one_line(device, tmp_path, capsys):
    from nitrofusion.pipelines.loading import resolve_device

    try:
        resolve_device(device)
        pytest.skip(f"this machine has {device}")
    except UserError:
        pass
    assert main(["generate", "a sneaker", "--device", device, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available on this machine" in err[0], err
    assert not any(tmp_path.iterdir())


def test_prompt_file_that_is_a_device_is_one_line(tmp_path, capsys):
    assert main(["generate", "--prompts", "/dev/zero", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a regular file" in err[0], err


def test_an_sd15_directory_with_its_safety_checker_loads_and_filters(tmp_path, capsys):
    """Stock SD1.5 directories name their safety checker ["stable_diffusion", ...], a diffusers
    pipeline package: it loads (it was refused as foreign code before), and it judges every image."""
    from nitrofusion.testing import save_tiny_sd15

    model = save_tiny_sd15(tmp_path / "sd15", safety_checker=True)
    index = json.loads((model / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    pipe = load_pipeline(model, sampler="shift-lcm", device="cpu")
    judged = []
    pipe.safety_checker.register_forward_hook(lambda module, args, out: judged.append(len(out[1])))
    generate(pipe, ["a cat", "a dog", "a bag"], steps=1, batch_size=2, progress=False)
    assert judged == [2, 1]
    code, stdout, _ = run(["generate", "a cat", "--model", str(model), "--out", str(tmp_path / "cat.png")], capsys)
    assert code == 0 and (tmp_path / "cat.png").is_file()


def test_no_safety_checker_leaves_it_out_and_evaluations_keep_the_two_apart(tmp_path, capsys):
    from nitrofusion.testing import save_tiny_sd15

    model = save_tiny_sd15(tmp_path / "sd15", safety_checker=True)
    pipe = load_pipeline(model, sampler="shift-lcm", device="cpu", safety_checker=False)
    assert pipe.safety_checker is None and pipe.nitro_unfiltered and not pipe.config.requires_safety_checker
    assert not load_pipeline(model, sampler="shift-lcm", device="cpu").nitro_unfiltered
    args = ["generate", "a cat", "--model", str(model), "--no-safety-checker", "--out", str(tmp_path / "cat.png")]
    assert run(args, capsys)[0] == 0
    # Unfiltered images are other images: an evaluation does not mix them into a filtered cache.
    evaluate = ["evaluate", "--model", str(model), "--steps", "1", "--n", "2", "--out", str(tmp_path / "eval")]
    code, stdout, _ = run([*evaluate, "--no-safety-checker"], capsys)
    assert code == 0 and "(unfiltered)" in stdout
    code, _, err = run(evaluate, capsys)
    assert code == 2 and "other settings (safety_checker)" in err


def test_a_pipeline_cached_with_fp16_files_only_loads(tmp_path, student_file):
    """The public snippet loads SDXL base with variant="fp16": a cache holding only the
    `*.fp16.safetensors` files must load for generate, transfer and export-lora alike."""
    from nitrofusion.testing import tiny_sdxl_pipeline
    from nitrofusion.weights.io import unet_state_dict

    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "fp16-only", variant="fp16")
    files = [p.name for p in (tmp_path / "fp16-only").rglob("*.safetensors")]
    assert files and all(".fp16." in f for f in files)
    loaded = load_pipeline(tmp_path / "fp16-only", sampler="shift-lcm", device="cpu")
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v)
    state = unet_state_dict(tmp_path / "fp16-only", "the base")
    assert state.keys() == pipe.unet.state_dict().keys()
    assert generate(loaded, ["a cat"], steps=1, seed=0)[0].image.size == (16, 16)
    # Sharded fp16 files are named name.fp16-00001-of-0000N.safetensors.
    pipe.save_pretrained(tmp_path / "fp16-shards", variant="fp16", max_shard_size="200KB")
    assert len(list((tmp_path / "fp16-shards" / "unet").glob("*.fp16-0*.safetensors"))) > 1
    sharded = load_pipeline(tmp_path / "fp16-shards", sampler="shift-lcm", device="cpu")
    assert all(torch.equal(sharded.unet.state_dict()[k], v) for k, v in pipe.unet.state_dict().items())


def test_a_student_file_without_a_recorded_shift_says_which_it_samples_at(tiny_sdxl_dir, student_file, tmp_path):
    """The public NitroSD files record none, and Realism (250) and Vibrant (500) differ."""
    with pytest.warns(UserWarning, match="records no timestep shift: sampling at 250.*--shift 500"):
        load_pipeline(tiny_sdxl_dir, unet=str(student_file), device="cpu")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pipeline(tiny_sdxl_dir, unet=str(student_file), shift=500, device="cpu")  # named: nothing to say
        # The public files by their published names: Vibrant sampled at Realism's 250 (a warning only).
        for name, shift in (("nitrosd-vibrant_unet.safetensors", 500), ("nitrosd-realism_unet.safetensors", 250)):
            public = shutil.copy(student_file, tmp_path / name)
            assert load_pipeline(tiny_sdxl_dir, unet=public, device="cpu").scheduler.config.shifted_timestep == shift
    # A pipeline with a shift scheduler of its own keeps its shift: the warning names that one.
    from nitrofusion import TimestepShiftLCMScheduler

    pipe = load_pipeline(tiny_sdxl_dir, device="cpu")
    pipe.scheduler = TimestepShiftLCMScheduler.from_config(pipe.scheduler.config, shifted_timestep=500)
    pipe.save_pretrained(tmp_path / "own-shift")
    with pytest.warns(UserWarning, match=r"sampling at 500 \(the pipeline's scheduler's\)"):
        loaded = load_pipeline(tmp_path / "own-shift", unet=str(student_file), device="cpu")
    assert loaded.scheduler.config.shifted_timestep == 500


def test_cpu_weights_are_aligned_whatever_the_file_layout(tiny_sdxl_dir):
    """Weights mapped from a safetensors file sat at its 8-byte offsets, and AVX-512 matmul kernels
    round by alignment: the teacher's pooled text embedding differed by 2e-7 from an offloaded
    (aligned) copy of the same weights, and a run with the teacher offloaded drifted."""
    from nitrofusion.pipelines.loading import CPU_ALIGN

    pipe = load_pipeline(tiny_sdxl_dir, device="cpu")
    tensors = [t for m in pipe.components.values() if isinstance(m, torch.nn.Module) for t in m.state_dict().values()]
    assert tensors and all(t.data_ptr() % CPU_ALIGN == 0 for t in tensors)


def test_a_hub_pipeline_downloads_its_components_in_one_precision_only(tmp_path):
    """SDXL base's repo: model_index, component folders in fp32 and fp16, two single-file
    checkpoints and a VAE variant at the root. Only the named folders' configs and plain weights
    are fetched; a repo of fp16 files only gets those."""
    from huggingface_hub.utils import filter_repo_objects

    from nitrofusion.pipelines.loading import download_pipeline

    def repo(files: list[str]) -> Path:
        root = tmp_path / f"repo{len(list(tmp_path.iterdir()))}"
        index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
        index |= {"vae": ["diffusers", "AutoencoderKL"], "feature_extractor": [None, None]}
        for f in ["model_index.json", *files]:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_text(json.dumps(index) if f == "model_index.json" else "x")
        return root

    def fake_download(root: Path):
        fetched: list[str] = []

        def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None):
            names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
            fetched.extend(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
            cache = tmp_path / f"cache-{root.name}"
            for f in fetched:
                (cache / f).parent.mkdir(parents=True, exist_ok=True)
                (cache / f).write_text((root / f).read_text())
            return str(cache)

        return snapshot_download, fetched

    weights = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    sdxl = repo(
        [
            "unet/config.json",
            "vae/config.json",
            *weights,
            *(w.replace(".safetensors", ".fp16.safetensors") for w in weights),
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",  # an fp16 shard: not fetched either
            "sd_xl_base_1.0.safetensors",
            "sd_xl_offset_example-lora_1.0.safetensors",
            "vae_1_0/diffusion_pytorch_model.safetensors",
        ]
    )
    snapshot, fetched = fake_download(sdxl)
    download_pipeline("stabilityai/stable-diffusion-xl-base-1.0", snapshot)
    assert sorted(set(fetched)) == sorted(["model_index.json", "unet/config.json", "vae/config.json", *weights])
    # With a student UNet (--unet) the base UNet's 10 GB are not fetched, only its config.
    snapshot, fetched = fake_download(sdxl)
    download_pipeline("stabilityai/stable-diffusion-xl-base-1.0", snapshot, unet_weights=False)
    assert sorted(set(fetched)) == sorted(["model_index.json", "unet/config.json", "vae/config.json", weights[1]])
    # The weights commands (transfer, export-lora) read the UNet alone: the VAE's weights are not fetched,
    # and such a cache is not taken as whole by a later generate, which fetches the rest.
    from nitrofusion.pipelines.loading import _cached_in_full, check_model_index

    shutil.rmtree(tmp_path / f"cache-{sdxl.name}")  # the earlier downloads' files
    snapshot, fetched = fake_download(sdxl)
    got = download_pipeline("stabilityai/stable-diffusion-xl-base-1.0", snapshot, weights_of=["unet"])
    assert sorted(set(fetched)) == sorted(["model_index.json", "unet/config.json", "vae/config.json", weights[0]])
    index = check_model_index(got)
    assert _cached_in_full(got, index, True, weights_of=["unet"]) and not _cached_in_full(got, index, True)
    fp16_only = repo(
        ["unet/config.json", "vae/config.json", *(w.replace(".safetensors", ".fp16.safetensors") for w in weights)]
    )
    snapshot, fetched = fake_download(fp16_only)
    got = download_pipeline("someone/fp16-only", snapshot)
    assert sorted(p.name for p in got.rglob("*.safetensors")) == ["diffusion_pytorch_model.fp16.safetensors"] * 2


def test_a_shift_too_small_for_the_steps_is_refused_not_sampled_wrongly(tiny_sdxl_dir, capsys):
    """Shift 3 maps 4 steps' noise levels 999, 749, 499, 249 onto UNet timesteps 2, 2, 1, 0: the
    scheduler would skip one. Refused in one line; shift 250 (and shift 3 at 1-2 steps) samples."""
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", shift=3, device="cpu")
    assert len(generate(pipe, ["a cat"], steps=2)) == 1
    with pytest.raises(UserError, match="--shift 3 is too small for 4 steps: the UNet timesteps"):
        generate(pipe, ["a cat"], steps=4)
    code, _, err = run(["generate", "a cat", "--model", str(tiny_sdxl_dir), "--shift", "3", "--steps", "3"], capsys)
    assert code == 2 and "too small for 3 steps" in err
    # The check follows the scheduler's settings, not its identity: a shift changed in place is seen.
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", shift=250, device="cpu")
    assert len(generate(pipe, ["a cat"], steps=4)) == 1
    pipe.scheduler.register_to_config(shifted_timestep=3)
    with pytest.raises(UserError, match="too small for 4 steps"):
        generate(pipe, ["a cat"], steps=4)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--seed", str(2**64)], "--seed must be in"),  # a torch overflow traceback, after the model loaded
        (["--seed", str(2**64 - 1)], None),  # two images: the second would take seed 2**64
        (["--height", "0"], "--height must be a positive multiple"),  # 0 meant the default size
        (["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),  # an all-black image, exit 0
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
        (["--steps", "9", "--sampler", "shift-lcm"], "--steps must be 1 to 4"),
    ],
)
def test_bad_requests_are_one_line_and_leave_nothing(tiny_sdxl_dir, tmp_path, capsys, extra, fragment):
    """Refused after the model loads, they used to leave the output folder behind, empty."""
    prompts = ["a", "b"] if fragment is None else ["a"]
    fragment = fragment or "--seed must be in"
    out = tmp_path / "new" / "images"
    expect_error(["generate", *prompts, "--model", str(tiny_sdxl_dir), "--out", str(out), *extra], capsys, fragment)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--height", "12"], "--height must be a positive multiple of 8"),
        (["--width", "0"], "--width must be a positive multiple of 8"),
        (["--seed", str(2**64)], "--seed must be in"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
        (["--steps", "9", "--sampler", "shift-lcm"], "--steps must be 1 to 4"),
    ],
)
def test_what_a_request_asks_of_the_model_is_checked_before_it_loads(
    tiny_sdxl_dir, tmp_path, capsys, monkeypatch, extra, fragment
):
    """Each was refused only after the pipeline had loaded: tens of seconds at SDXL size."""
    import nitrofusion.pipelines as pipelines

    def load_pipeline(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipelines, "load_pipeline", load_pipeline)
    args = ["generate", "x", "--model", str(tiny_sdxl_dir), "--out", str(tmp_path / "o"), *extra]
    expect_error(args, capsys, fragment)


def test_the_size_multiple_read_before_loading_is_the_loaded_pipelines(tiny_sdxl_dir, tiny_sd15_dir, tmp_path):
    from nitrofusion.pipelines.generation import size_multiple, size_multiple_of_folder
    from nitrofusion.world.spec import embedded_model

    for folder in (tiny_sdxl_dir, tiny_sd15_dir, embedded_model("embedded").model):
        assert size_multiple_of_folder(folder) == size_multiple(load_pipeline(folder, device="cpu"))
    configs = Path(__file__).parents[1] / "nitrofusion" / "models" / "configs" / "sdxl-base"
    for part in ("unet", "vae"):  # SDXL base's own: a VAE factor of 8
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text((configs / f"{part}.json").read_text())
    assert size_multiple_of_folder(tmp_path) == 8
    assert size_multiple_of_folder(tmp_path / "missing") is None


def test_a_size_whose_latents_the_unet_cannot_halve_evenly_samples_as_stock_diffusers_does(tmp_path, capsys):
    """SDXL's UNet halves its latents twice, SD1.5's three times, but diffusers samples any multiple
    of 8 px (a 520 px SDXL latent is 65 wide: the UNet up-samples to its skips' sizes). generate
    refused those sizes (multiples of 32 and 64 only). A VAE factor of 8 and three halvings, as SD1.5."""
    from diffusers import StableDiffusionPipeline

    from nitrofusion.models.builders import SD15Spec, build_sd15_pipeline

    spec = SD15Spec(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        vae_block_out_channels=(32, 32, 32, 32),
    )
    model = tmp_path / "sd15"
    build_sd15_pipeline(spec).save_pretrained(str(model))
    out = tmp_path / "out.png"
    args = ["generate", "a cat", "--model", str(model), "--out", str(out)]
    code, _, err = run([*args, "--height", "72", "--width", "40"], capsys)
    assert code == 0, err
    image = np.asarray(Image.open(out))
    assert image.shape == (72, 40, 3) and image.std() > 0
    pipe = load_pipeline(model, sampler="shift-lcm", device="cpu")
    ours = generate(pipe, ["a cat"], steps=1, height=72, width=40, progress=False)[0].image
    stock = StableDiffusionPipeline.from_pretrained(str(model))
    stock.scheduler = pipe.scheduler
    seed = torch.Generator().manual_seed(0)
    theirs = stock("a cat", height=72, width=40, num_inference_steps=1, guidance_scale=0, generator=seed).images[0]
    # The same images, up to rounding: on an AVX2-only CPU (torch's cpu capability "AVX2") one value
    # in 8,640 differs by 1/255, where earlier machines gave equal bits; a size handled otherwise
    # would differ everywhere.
    diff = np.abs(np.asarray(ours).astype(int) - np.asarray(theirs).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    code, _, err = run([*args, "--height", "76"], capsys)
    assert code == 2 and "multiple of 8" in err


def test_an_out_png_that_is_a_directory_is_refused_before_any_work(tiny_sdxl_dir, tmp_path, capsys):
    (tmp_path / "x.png").mkdir()
    args = ["generate", "a", "--model", str(tiny_sdxl_dir), "--out", str(tmp_path / "x.png")]
    expect_error(args, capsys, "is a directory")


def test_images_are_written_a_batch_at_a_time(tiny_sdxl_dir, tmp_path, monkeypatch, capsys):
    """All images were held until the end: 5,000 COCO captions at 1024² are 15 GB, and a run
    stopped at the last one left nothing on disk (and then the written paths were printed only
    after the last batch: a stopped run named none)."""
    import nitrofusion.pipelines.generation as generation

    drawn = []
    original = generation.pil_images

    def stop_at_the_third(pixels):
        if len(drawn) == 2:
            raise KeyboardInterrupt
        drawn.append(1)
        return original(pixels)

    monkeypatch.setattr(generation, "pil_images", stop_at_the_third)
    args = ["generate", "a", "b", "c", "--model", str(tiny_sdxl_dir), "--batch-size", "1", "--out", str(tmp_path)]
    assert main(args) == 130  # interrupted
    assert sorted(p.name[:4] for p in tmp_path.glob("*.png")) == ["0000", "0001"]
    assert capsys.readouterr().out.split() == sorted(str(p) for p in tmp_path.glob("*.png"))


def test_the_native_sampler_of_a_distilled_pipeline_is_its_shift_lcm(tiny_sdxl_dir, tmp_path, capsys):
    """Its own scheduler is the shift-LCM one: --steps 5 was an LCM traceback, and CFG 5 was
    applied to a student by default."""
    from nitrofusion import TimestepShiftLCMScheduler
    from nitrofusion.pipelines.loading import save_unet_weights

    pipe = load_pipeline(tiny_sdxl_dir, device="cpu")
    pipe.scheduler = TimestepShiftLCMScheduler.from_config(
        pipe.scheduler.config, shifted_timestep=500, original_inference_steps=50
    )
    pipe.save_pretrained(tmp_path / "student")
    native = load_pipeline(tmp_path / "student", sampler="native", device="cpu")
    result = generate(native, ["a cat"], steps=1)[0]
    assert (result.metadata["guidance_scale"], result.metadata["shift"]) == ("0", "500")
    # As shift-lcm samples it (it kept the stored scheduler: LCM's 50 original steps put 4 steps
    # at 999, 759, 499, 259, and a student file's recorded shift was not read)
    native.scheduler.set_timesteps(4)
    assert native.scheduler.noise_timesteps.tolist() == [999, 749, 499, 249]
    unet = save_unet_weights(pipe.unet, tmp_path / "unet.safetensors", shift=250)
    for sampler in ("native", "auto", "shift-lcm"):
        loaded = load_pipeline(tmp_path / "student", unet=unet, sampler=sampler, device="cpu")
        assert (loaded.nitro_sampler, loaded.scheduler.config.shifted_timestep) == ("shift-lcm", 250), sampler
    capsys.readouterr()
    args = ["generate", "a", "--model", str(tmp_path / "student"), "--sampler", "native", "--steps", "5"]
    expect_error([*args, "--out", str(tmp_path / "o")], capsys, "--steps must be 1 to 4")


def test_a_second_run_into_the_same_folder_keeps_the_first_runs_images(tiny_sdxl_dir, tmp_path, capsys):
    """Names say index, prompt and seed, not steps or model: a run at 4 steps replaced the 1-step
    run's image without a word."""
    args = ["generate", "a cat", "--model", str(tiny_sdxl_dir), "--sampler", "shift-lcm", "--out", str(tmp_path)]
    assert run([*args, "--steps", "1"], capsys)[0] == 0
    first = (tmp_path / "0000-a-cat-s0.png").read_bytes()
    code, stdout, _ = run([*args, "--steps", "4"], capsys)
    assert code == 0 and stdout.strip().endswith("0000-a-cat-s0-2.png")
    assert (tmp_path / "0000-a-cat-s0.png").read_bytes() == first
    assert Image.open(tmp_path / "0000-a-cat-s0-2.png").text["steps"] == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000-a-cat-s0-2.png", "0000-a-cat-s0.png"]  # no .tmp


def test_a_png_named_by_out_is_written_as_asked_over_an_earlier_one(tiny_sdxl_dir, tmp_path, capsys):
    args = [
        "generate",
        "a cat",
        "--model",
        str(tiny_sdxl_dir),
        "--sampler",
        "shift-lcm",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert run([*args, "--steps", "1"], capsys)[0] == 0
    assert run([*args, "--steps", "4"], capsys)[0] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no x-2.png, no temporary file left
    assert Image.open(tmp_path / "x.png").text["steps"] == "4"


def test_a_name_taken_while_the_image_was_written_is_not_replaced(tmp_path, monkeypatch):
    """The free name was found before writing and taken after: two runs into one folder at the same
    prompt and seed both chose 0000-a-cat-s0.png, and one image replaced the other."""
    import os

    from nitrofusion.userfiles import write_new

    target, link = tmp_path / "0000-a-cat-s0.png", os.link

    def another_run_first(src, dst):  # the other run takes the name between our look and our claim
        if Path(dst) == target:
            target.write_bytes(b"theirs")
        link(src, dst)

    monkeypatch.setattr(os, "link", another_run_first)
    assert write_new(target, lambda tmp: tmp.write_bytes(b"ours")) == tmp_path / "0000-a-cat-s0-2.png"
    assert target.read_bytes() == b"theirs" and (tmp_path / "0000-a-cat-s0-2.png").read_bytes() == b"ours"

    # Where the file system has no hard links, the name is claimed by an exclusive create instead.
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert write_new(target, lambda tmp: tmp.write_bytes(b"third")) == tmp_path / "0000-a-cat-s0-3.png"
    assert (tmp_path / "0000-a-cat-s0-3.png").read_bytes() == b"third"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"0000-a-cat-s0{s}.png" for s in ("-2", "-3", "")]


def test_a_prompt_that_is_not_utf8_is_one_line_before_any_model_loads(tmp_path, capsys):
    """Bytes in another encoding reach Python as lone surrogates: the tokenizer raised a traceback
    after the model had loaded."""
    expect_error(["generate", "caf\udce9", "--out", str(tmp_path)], capsys, "prompt 1 is not UTF-8 text")


@pytest.mark.parametrize("safety_checker", [True, False])
def test_a_teachers_frozen_parts_are_read_without_its_unet(tmp_path, safety_checker):
    """A bf16 run's export re-reads the teacher's text encoders and VAE at full precision; it read
    the whole pipeline before, a 10 GB UNet included (SDXL), only to drop it. With the UNet's
    weights gone the parts still load, bit for bit as stored."""
    from nitrofusion.pipelines.loading import load_frozen_parts
    from nitrofusion.testing import save_tiny_sd15

    model = save_tiny_sd15(tmp_path / "sd15", safety_checker=True)
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    parts = load_frozen_parts(model, safety_checker=safety_checker)
    assert "unet" not in parts and "scheduler" not in parts
    assert (parts["safety_checker"] is not None) == safety_checker
    (vae_file,) = (model / "vae").glob("*.safetensors")
    stored = load_file(str(vae_file))
    vae = parts["vae"].state_dict()
    assert all(vae[k].dtype == torch.float32 and torch.equal(vae[k], v.float()) for k, v in stored.items())


def snippet_cache(tiny_sdxl_dir: Path, root: Path, with_unet_weights: bool = False) -> Path:
    """What the public NitroSD snippet leaves: from_pretrained(base, unet=unet, variant="fp16")
    skips the base UNet's weights (unet/config.json only), the rest in fp16 files; a stray plain
    checkpoint at the root as SDXL base's repo has."""
    import shutil

    shutil.copytree(tiny_sdxl_dir, root)
    for f in root.rglob("*.safetensors"):
        if f.parent.name == "unet" and not with_unet_weights:
            f.unlink()
        else:
            f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    save_file({"w": torch.zeros(1)}, str(root / "sd_xl_offset_example-lora_1.0.safetensors"))
    return root


def test_a_base_cached_by_the_public_snippet_loads_with_a_student_unet(tiny_sdxl_dir, student_file, tmp_path):
    """The snippet never downloads the base UNet's weights; with --unet they are not needed, so
    the cache it made loads, and draws what the complete pipeline draws. A stray plain file at the
    root (SDXL base's single-file checkpoints) does not hide that the components are fp16 only."""
    from nitrofusion.pipelines.loading import weights_variant

    cache = snippet_cache(tiny_sdxl_dir, tmp_path / "base")
    assert weights_variant(cache) == "fp16"
    pipe = load_pipeline(cache, unet=student_file, device="cpu")
    assert not pipe.unet.training  # as from_pretrained leaves it
    ours = generate(pipe, ["a cat"], steps=2, progress=False)
    full = generate(load_pipeline(tiny_sdxl_dir, unet=student_file, device="cpu"), ["a cat"], steps=2, progress=False)
    assert np.array_equal(np.asarray(ours[0].image), np.asarray(full[0].image))
    with pytest.raises(UserError, match="could not load the pipeline"):
        load_pipeline(cache, device="cpu")  # without a student the UNet's weights are needed


def test_generate_with_a_student_reads_a_hub_base_cached_by_the_snippet_offline(
    tiny_sdxl_dir, student_file, tmp_path, monkeypatch, capsys
):
    """The CLI's size check resolved the hub id before loading, as if the base UNet's weights were
    needed: the snippet's cache was 'not in full' offline, and online fetched them."""
    import huggingface_hub

    cache = snippet_cache(tiny_sdxl_dir, tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cat.png"
    args = ["generate", "a cat", "--model", "stabilityai/base", "--unet", str(student_file), "--out", str(out)]
    code, _, err = run(args, capsys)
    assert code == 0 and out.is_file(), err


def test_a_hub_snapshot_in_part_is_not_taken_for_the_pipeline(tmp_path, monkeypatch):
    """The snippet's first line, UNet2DConditionModel.from_config(repo, subfolder="unet"), leaves a
    snapshot holding unet/config.json alone: it was taken for the pipeline ('model_index.json is
    not readable JSON'). It is now incomplete: downloaded in full where a hub is reachable, else one
    line saying so."""
    import nitrofusion.pipelines.loading as loading

    snapshot = tmp_path / "snapshot"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text("{}")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"not \(in full\) in the Hugging Face cache"):
        loading.resolve_model("someone/base")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    asked = []
    monkeypatch.setattr(
        loading, "download_pipeline", lambda repo, sd, unet_weights, *_: asked.append(unet_weights) or snapshot
    )
    assert loading.resolve_model("someone/base", unet_weights=False) == snapshot and asked == [False]


def test_a_pipeline_saved_from_the_public_snippet_loads_and_samples_at_nitrosds_timesteps(tiny_sdxl_dir, tmp_path):
    """Saved from the snippet's script, the scheduler is recorded as ["__main__", "TimestepShiftLCMScheduler"]
    (refused as foreign code), and with original_inference_steps 50: the snippet sets 4 on the config
    object, which is never written. It is read as ours, at 4, without importing anything."""
    import shutil

    from nitrofusion.pipelines.generation import check_distinct_timesteps

    model = tmp_path / "saved"
    shutil.copytree(tiny_sdxl_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    index["scheduler"] = ["__main__", "TimestepShiftLCMScheduler"]
    (model / "model_index.json").write_text(json.dumps(index))
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    config |= {"_class_name": "TimestepShiftLCMScheduler", "shifted_timestep": 250, "original_inference_steps": 50}
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    pipe = load_pipeline(model, device="cpu")
    assert pipe.nitro_sampler == "shift-lcm" and pipe.scheduler.config.original_inference_steps == 4
    check_distinct_timesteps(pipe, 4)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.noise_timesteps.tolist() == [999, 749, 499, 249]  # at 50: 999, 759, 499, 259
    assert pipe.scheduler.timesteps.tolist() == [249, 187, 124, 62]  # the UNet's, shift 250
    native = load_pipeline(model, sampler="native", device="cpu")  # its own scheduler: the same one
    assert native.nitro_sampler == "shift-lcm" and native.scheduler.config.original_inference_steps == 4
    # Recorded in the pipeline's config as ours, so that saving it writes a loadable index.
    assert native.config["scheduler"][1] == "TimestepShiftLCMScheduler"
    native.save_pretrained(tmp_path / "again")
    assert load_pipeline(tmp_path / "again", device="cpu").scheduler.config.shifted_timestep == 250


def test_a_pipeline_built_as_the_public_snippet_builds_it_samples_without_guidance(tiny_sdxl_dir, student_file):
    """Stock diffusers classes, the shifted LCM scheduler, no load_pipeline: generate took it for
    a multi-step pipeline and sampled with CFG 5. It is a shift-LCM one: guidance 0, 1-4 steps."""
    from diffusers import StableDiffusionXLPipeline

    from nitrofusion import TimestepShiftLCMScheduler
    from nitrofusion.pipelines.loading import load_unet_weights

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    load_unet_weights(pipe.unet, student_file)
    pipe.scheduler = TimestepShiftLCMScheduler.from_config(
        pipe.scheduler.config, original_inference_steps=4, shifted_timestep=250
    )
    (result,) = generate(pipe, ["a cat"], steps=1, progress=False)
    assert result.metadata["sampler"] == "shift-lcm" and result.metadata["guidance_scale"] == "0"
    expected = pipe("a cat", num_inference_steps=1, guidance_scale=0, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(result.image), np.asarray(expected.images[0]))
    with pytest.raises(UserError, match="1 to 4"):
        generate(pipe, ["a cat"], steps=8, progress=False)


def test_a_flow_transformer_pipeline_is_refused_by_name_before_any_weight_is_read(tmp_path, monkeypatch):
    """An SD3 pipeline is sampled (generate, evaluate, app: allow_flow) but never distilled: as a
    teacher it is refused from its index, in a local folder, a cached hub snapshot (which has no UNet
    and must not be called "cached in part") and a reachable repo (20-30 GB). Flux is refused by
    name everywhere. tests/test_flow_pipelines.py samples a tiny SD3."""
    import huggingface_hub

    from nitrofusion.pipelines import loading

    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (sd3 / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="StableDiffusion3Pipeline .*where a UNet pipeline"):
        load_pipeline(sd3, device="cpu", allow_flow=False)
    fetched = []

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, local_files_only=False):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        fetched.append(allow_patterns)
        return str(sd3)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(UserError, match="StableDiffusion3Pipeline .*where a UNet pipeline"):
        loading.resolve_model("stabilityai/stable-diffusion-3.5-large")  # a UNet's (the default)
    assert fetched == [["model_index.json"]]  # the index alone, never a weight
    loading.resolve_model("stabilityai/stable-diffusion-3.5-large", allow_flow=True)  # to sample: fetched
    assert fetched[1] == ["model_index.json"] and "transformer/*.safetensors" in fetched[2]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(sd3))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="where a UNet pipeline"):  # not "not (in full) in the cache"
        loading.resolve_model("stabilityai/stable-diffusion-3.5-large")
    (sd3 / "transformer").mkdir()
    (sd3 / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert loading.resolve_model("stabilityai/stable-diffusion-3.5-large", allow_flow=True) == sd3
    flux = index | {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (sd3 / "model_index.json").write_text(json.dumps(flux))
    for allow_flow in (False, True):
        with pytest.raises(
            UserError, match=r"FluxPipeline with a transformer \(FluxTransformer2DModel\).*not supported yet"
        ):
            load_pipeline(sd3, device="cpu", allow_flow=allow_flow)
    for entries in ({}, {"unet": None}, {"unet": "UNet2DConditionModel"}, {"transformer": None, "unet": [None]}):
        # (a hand-edited index's null was a TypeError traceback)
        (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", **entries}))
        with pytest.raises(UserError, match=r"\(StableDiffusionPipeline\) is not a UNet text-to-image pipeline"):
            load_pipeline(sd3, device="cpu")


def test_without_steps_a_teacher_samples_at_its_pipelines_default_and_a_student_at_one(tmp_path, capsys):
    """--steps defaulted to 1 for every model: a multi-step teacher then drew noise, without a word."""
    from PIL import Image as PILImage

    teacher, student = tmp_path / "teacher.png", tmp_path / "student.png"
    code, _, err = run(
        ["generate", "a photo of a sneaker", "--model", "embedded-teacher", "--out", str(teacher)], capsys
    )
    assert code == 0, err
    assert PILImage.open(teacher).text["steps"] == "25"  # the count its folder records (nitrofusion.json)
    code, _, err = run(["generate", "a photo of a sneaker", "--out", str(student)], capsys)
    assert code == 0, err
    assert PILImage.open(student).text["steps"] == "1"


def test_default_steps_and_batch_size_follow_the_model(tmp_path):
    from nitrofusion.evaluation.evaluate import default_batch_size
    from nitrofusion.pipelines.generation import default_steps, is_distilled
    from nitrofusion.testing import save_tiny_sd3
    from nitrofusion.world.spec import choose_model

    shipped = choose_model("embedded", None, None)
    student = load_pipeline(shipped.model, unet=shipped.unet, shift=shipped.shift, device="cpu")
    teacher = load_pipeline(choose_model("embedded-teacher", None, None).model, device="cpu")
    sd3 = load_pipeline(save_tiny_sd3(tmp_path / "sd3"), device="cpu", allow_flow=True)
    assert [default_steps(p) for p in (student, teacher, sd3)] == [1, 25, 28]  # the teacher's folder records 25
    plain = tmp_path / "plain-teacher"  # without it: StableDiffusionXLPipeline.__call__'s own 50
    shutil.copytree(choose_model("embedded-teacher", None, None).model, plain)
    (plain / "nitrofusion.json").unlink()
    assert default_steps(load_pipeline(plain, device="cpu")) == 50
    for bad in ("0", "2.5", "true", '"25"'):
        (plain / "nitrofusion.json").write_text(f'{{"num_inference_steps": {bad}}}')
        with pytest.raises(UserError, match="num_inference_steps must be a step count"):
            load_pipeline(plain, device="cpu")
    sd3.nitro_guidance = 0.0  # as a flow student's folder records it
    assert is_distilled(sd3) and default_steps(sd3) == 1
    assert default_batch_size(student) == 100  # 32 px: the cap
    teacher.unet.register_to_config(sample_size=1024 // teacher.vae_scale_factor)  # 1024 px, as SDXL
    assert default_batch_size(teacher) == 4


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    import nitrofusion.cli as cli

    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr(cli, "cmd_generate", out_of_memory)
    code = main(["generate", "a cat"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)" in err[0]

    def cpu_out_of_memory(args):  # the CPU allocator's is a plain RuntimeError
        torch.empty(2**60, dtype=torch.uint8)

    monkeypatch.setattr(cli, "cmd_generate", cpu_out_of_memory)
    code = main(["generate", "a cat"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "DefaultCPUAllocator: can't allocate memory" in err[0]

    def other_error(args):
        raise RuntimeError("a bug, not memory")

    monkeypatch.setattr(cli, "cmd_generate", other_error)
    with pytest.raises(RuntimeError, match="a bug"):  # a traceback: not dressed up as memory
        main(["generate", "a cat"])
