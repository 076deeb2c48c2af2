"""Bad input to every command: one line, exit 2, and nothing left behind (found by a sweep of each
option; each case was a traceback, a silently wrong result or a leftover folder before)."""

import json

import pytest
from PIL import Image

from nitrofusion.cli import main


def one_line_error(args, capsys, fragment):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], (code, err)


@pytest.fixture
def pngs(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(folder / f"{i}.png")
    return folder


CASES = {
    # make-pairs: inf guidance wrote NaN latents as training data; 0 meant the default size.
    "pairs-guidance": (
        ["make-pairs", "--guidance-scale", "inf", "--out", "{new}"],
        "--guidance-scale must be a finite",
    ),
    "pairs-resolution": (["make-pairs", "--resolution", "33", "--out", "{new}"], "--resolution must be a positive"),
    "pairs-dtype": (["make-pairs", "--dtype", "fp8", "--out", "{new}"], "unknown dtype 'fp8'"),
    "pairs-zero-size": (["make-pairs", "--resolution", "0", "--out", "{new}"], "--resolution must be a positive"),
    "pairs-out-file": (["make-pairs", "--out", "{file}"], "is a file, not a folder"),
    # distill: zero iterations exported the teacher as a "student"; an empty folder name was ignored.
    "distill-max-steps": (["distill", "--max-steps", "0", "--output-dir", "{new}"], "--max-steps must be at least 1"),
    "distill-nothing": (
        ["distill", "--set", "refine.steps_per_stage=[0]", "--output-dir", "{new}"],
        "nothing to train",
    ),
    "distill-empty-out": (["distill", "--output-dir", ""], "--output-dir is empty"),
    # evaluate: checked per step after the model loaded, or never.
    "eval-batch": (["evaluate", "--n", "4", "--batch-size", "0", "--out", "{new}"], "--batch-size must be at least 1"),
    "eval-steps-twice": (["evaluate", "--n", "4", "--steps", "1", "1", "--out", "{new}"], "distinct step counts"),
    "eval-steps-zero": (["evaluate", "--n", "4", "--steps", "0", "--out", "{new}"], "distinct step counts"),
    "eval-guidance": (["evaluate", "--n", "4", "--guidance-scale", "nan", "--out", "{new}"], "must be a finite"),
    "eval-steps-late": (["evaluate", "--n", "4", "--steps", "1", "5", "--out", "{new}"], "--steps must be 1 to 4"),
    "eval-reference": (["evaluate", "--n", "4", "--reference", "r.npz", "--out", "{new}"], "--reference is for"),
    "eval-native-shift": (
        ["evaluate", "--n", "4", "--model", "embedded-teacher", "--sampler", "native", "--shift", "250"]
        + ["--out", "{new}"],
        "--shift is for the shift-lcm sampler",
    ),
    # reproduce: a repeated seed reported a spread of 0 it never measured.
    "repro-seeds": (["reproduce", "--report-only", "--seeds", "0", "0", "--out", "{new}"], "lists a seed twice"),
    "repro-batch": (["reproduce", "--report-only", "--batch-size", "0", "--out", "{new}"], "--batch-size must be"),
    "repro-empty": (["reproduce", "--report-only", "--out", "{new}"], "no scores to report"),
    # grid: a huge scale hung; a .txt name got PNG bytes; a limit of 0 said there were no images.
    "grid-limit": (["grid", "{pngs}", "--limit", "0", "--out", "{new}/g.png"], "--limit must be at least 1"),
    "grid-scale": (["grid", "{pngs}", "--scale", "100000", "--out", "{new}/g.png"], "--scale must be 1 to 16"),
    "grid-suffix": (["grid", "{pngs}", "--out", "{new}/g.txt"], "needs an image file extension"),
    "grid-out-dir": (["grid", "{pngs}", "--out", "{pngs}"], "needs an image file extension"),
    "grid-corrupt": (["grid", "{bad_pngs}", "--out", "{new}/g.png"], "cannot read an image"),
    # Messages that named the wrong fault: "not found" for a folder, "holds None statistics".
    "prompts-folder": (["generate", "--prompts", "{pngs}", "--out", "{new}"], "is not a regular file"),
    "unet-folder": (["generate", "a", "--unet", "{pngs}", "--out", "{new}"], "is not a file"),
    "reference-weights": (
        ["evaluate", "--n", "4", "--metrics", "fid", "--fid-features", "embedded", "--reference", "{weights}"]
        + ["--out", "{new}"],
        "is not a statistics file",
    ),
    "reference-corrupt": (
        ["evaluate", "--n", "4", "--metrics", "fid", "--fid-features", "embedded", "--reference", "{corrupt}"]
        + ["--out", "{new}"],
        "is not a readable safetensors file",
    ),
    # A CLI audit: written into the current folder, into a folder named foo.jpg, an option ignored,
    # an allocator traceback or hours of sampling, a black image, an int64 overflow.
    "gen-empty-out": (["generate", "a", "--out", ""], "--out is empty"),
    "gen-jpg-out": (["generate", "a", "--out", "{new}/cat.jpg"], "images are written as PNG"),
    "gen-native-shift": (
        ["generate", "a", "--model", "embedded-teacher", "--sampler", "native", "--shift", "250", "--out", "{new}"],
        "--shift is for the shift-lcm sampler",
    ),
    "gen-huge": (["generate", "a", "--height", "40000", "--out", "{new}"], "must be at most 8192 px"),
    "gen-guidance-huge": (["generate", "a", "--guidance-scale", "1e30", "--out", "{new}"], "in 0..100"),
    "pairs-huge": (["make-pairs", "--resolution", "100000", "--out", "{new}"], "must be at most 8192 px"),
    "distill-huge": (
        ["distill", "--set", "data.resolution=100000", "--output-dir", "{new}"],
        "'data.resolution' must be at most 8192 px",
    ),
    "teacher-one-test-image": (  # a traceback after every stage had trained: a covariance needs 2
        ["train-teacher", "--test-images", "1", "--run-dir", "{new}/r", "--out", "{new}/o"],
        "--test-images must be 0 (all) or at least 2, got 1",
    ),
    "teacher-seed": (
        ["train-teacher", "--seed", "99999999999999999999", "--run-dir", "{new}/r", "--out", "{new}/o"],
        "--seed must be in 0..2^32-1",
    ),
    "lora-bin": (
        ["export-lora", "--student", "{weights}", "--teacher", "{weights}", "--out", "{new}/lo.bin"],
        "names a .bin file",
    ),
    "grid-over-an-input": (["grid", "{pngs}", "--out", "{pngs}/0.png"], "is one of the images"),
    # A review: refused only once the teacher had loaded and its pairs were made (hours at SDXL
    # size); a shift the user never gave named as the fault.
    "distill-resume-missing": (
        ["distill", "--resume", "{new}/step-00000100", "--output-dir", "{new}"],
        "cannot resume from",
    ),
    "distill-resume-not-a-checkpoint": (["distill", "--resume", "{pngs}", "--output-dir", "{new}"], "meta.json"),
    "distill-out-under-a-file": (["distill", "--set", "run.output_dir={file}/run"], "'{file}' is a file"),
    "gen-nested-model-index": (["generate", "a", "--model", "{nested}", "--out", "{new}"], "is not readable JSON"),
    "gen-native-embedded-student": (
        ["generate", "a", "--sampler", "native", "--out", "{new}"],
        "the embedded student samples with the shift-lcm sampler only",
    ),
    "eval-native-embedded-student": (
        ["evaluate", "--n", "4", "--sampler", "native", "--out", "{new}"],
        "--model embedded-teacher --sampler native",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(case, tmp_path, pngs, capsys):
    args, fragment = CASES[case]
    (tmp_path / "file").write_text("")
    bad = tmp_path / "bad_pngs"
    bad.mkdir()
    (bad / "0.png").write_bytes(b"not a png")
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    paths = {"new": tmp_path / "new" / "out", "file": tmp_path / "file", "pngs": pngs, "bad_pngs": bad}
    paths |= {"weights": tmp_path / "weights.safetensors", "corrupt": tmp_path / "corrupt.safetensors"}
    nested = tmp_path / "nested"  # a model_index.json nested past the JSON parser's recursion limit
    nested.mkdir()
    (nested / "model_index.json").write_text("[" * 100_000)
    paths["nested"] = nested
    one_line_error([a.format(**paths) for a in args], capsys, fragment.format(**paths))
    assert not (tmp_path / "new").exists()


def test_compare_says_what_is_wrong_with_a_results_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for content, fragment in (
        ("{not json", "is not valid JSON"),
        ("[]", "holds no evaluate rows"),
        ('{"model": "x"}', "holds no evaluate rows"),
        ('[{"model": "x"}]', "has a row without sampler, steps, n"),
        ("[" * 100_000, "is not valid JSON"),  # past the parser's recursion limit: was a traceback
    ):
        (run / "results.json").write_text(content)
        one_line_error(["compare", str(run), "--out", str(tmp_path / "new")], capsys, fragment)
    one_line_error(["compare", str(run), str(run), "--out", str(tmp_path / "new")], capsys, "named twice")
    assert not (tmp_path / "new").exists()


def test_export_lora_checks_its_out_and_inputs_before_the_svd(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "x.safetensors").mkdir()
    save_file({"a.weight": torch.ones(2, 2)}, str(tmp_path / "a.safetensors"))
    save_file({"a.weight": torch.zeros(2, 2)}, str(tmp_path / "b.safetensors"))
    args = ["export-lora", "--student", str(tmp_path / "a.safetensors"), "--teacher", str(tmp_path / "b.safetensors")]
    one_line_error([*args, "--out", str(tmp_path / "x.safetensors")], capsys, "is a folder")
    one_line_error([*args, "--out", str(tmp_path / "lora")], capsys, "is neither a UNet's state dict")
    assert not (tmp_path / "lora").exists()


def test_the_app_refuses_a_max_size_below_its_models_own():
    from nitrofusion.app.server import LoadedModel, create_app
    from nitrofusion.errors import UserError

    model = LoadedModel.__new__(LoadedModel)
    model.name, model.default_size = "embedded", 32
    with pytest.raises(UserError, match="--max-size 16 is below model 'embedded''s own size 32"):
        create_app([model], max_size=16)


def test_the_app_refuses_a_max_size_below_a_models_own_before_any_model_loads(monkeypatch):
    """Said after loading, an SDXL pipeline's tens of seconds came first."""
    from nitrofusion.app import ModelSpec
    from nitrofusion.app.server import load_models
    from nitrofusion.errors import UserError

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("nitrofusion.pipelines.load_pipeline", no_loading)
    for specs in ([ModelSpec()], [ModelSpec(model="embedded-teacher"), ModelSpec(name="second")]):
        with pytest.raises(UserError, match="--max-size 16 is below model '(embedded-teacher|embedded)''s own size 32"):
            load_models(specs, device="cpu", warmup=False, max_size=16)


def test_train_teacher_refuses_a_run_dir_of_other_settings_and_a_file_as_out(tmp_path, capsys):
    import torch

    from nitrofusion.training import checkpoint

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"seed": 0, "train_images": 256}))
    checkpoint.save(run / "vae", 1, {"w": torch.zeros(1)}, {})  # a stage trained under them: they bind
    (tmp_path / "file").write_text("")
    base = ["train-teacher", "--run-dir", str(run), "--train-images", "128", "--seed", "7"]
    one_line_error(
        [*base, "--out", str(tmp_path / "out")], capsys, "holds a run with other settings (seed, train_images"
    )
    one_line_error([*base, "--out", str(tmp_path / "file")], capsys, "is a file, not a folder")


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, capsys):
    """transfer and export-lora replaced their --student (or --target) with their result, exit 0."""
    import torch
    from safetensors.torch import save_file

    files = {}
    for name in ("base", "student", "target"):
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({"conv_in.weight": torch.full((2, 2), float(len(name)))}, str(files[name]))
    before = {name: path.read_bytes() for name, path in files.items()}
    common = ["--base", str(files["base"]), "--student", str(files["student"]), "--target", str(files["target"])]
    for victim in ("student", "target"):
        one_line_error(["transfer", *common, "--out", str(files[victim])], capsys, f"is the --{victim} file")
    lora = ["export-lora", "--student", str(files["student"]), "--teacher", str(files["base"])]
    one_line_error([*lora, "--out", str(files["student"])], capsys, "is the --student file")
    # A --scale that takes weights past fp32's range wrote a UNet of inf and NaN weights.
    one_line_error(
        [*["transfer", *common], "--scale", "1e300", "--out", str(tmp_path / "x.safetensors")], capsys, "--scale"
    )
    assert {name: path.read_bytes() for name, path in files.items()} == before
    assert not (tmp_path / "x.safetensors").exists()


def test_make_pairs_never_replaces_a_users_prompts_file_in_its_folder(tmp_path, capsys):
    """`make-pairs --prompts data/prompts.json --out data` replaced the user's COCO captions file."""
    data = tmp_path / "data"
    data.mkdir()
    coco = json.dumps({"annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": 2, "caption": "a dog"}]})
    (data / "prompts.json").write_text(coco)
    args = ["make-pairs", "--prompts", str(data / "prompts.json"), "--n", "2", "--steps", "1", "--out", str(data)]
    one_line_error(args, capsys, "is not a file teacher pairs write")
    assert (data / "prompts.json").read_text() == coco and sorted(p.name for p in data.iterdir()) == ["prompts.json"]


def test_image_to_image_pipelines_are_refused_by_name(tiny_sdxl_dir, tmp_path, capsys):
    """The refiner, img2img, inpainting and upscaler pipelines hold a UNet2DConditionModel too; called
    with a prompt alone they failed deep in their own __call__, with a traceback."""
    import shutil

    from nitrofusion.app.server import ModelSpec, load_models
    from nitrofusion.errors import UserError

    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl_dir, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    said = "is a StableDiffusionXLImg2ImgPipeline, not a text-to-image pipeline distilled or sampled here"
    for args in (
        ["generate", "a cat", "--model", str(refiner), "--out", str(tmp_path / "x.png")],
        ["evaluate", "--model", str(refiner), "--n", "2", "--steps", "1", "--out", str(tmp_path / "ev")],
        ["make-pairs", "--model", str(refiner), "--out", str(tmp_path / "pairs")],
        ["distill", "--set", f"model.teacher={refiner}", "--output-dir", str(tmp_path / "run")],
    ):
        one_line_error(args, capsys, said)
    with pytest.raises(UserError, match=said):
        load_models([ModelSpec(str(refiner))], device="cpu", warmup=False)


def test_an_original_layout_single_file_checkpoint_is_named_and_the_conversion_said(tiny_sdxl_dir, tmp_path, capsys):
    """Most SD1.5/SDXL fine-tunes ship as one file with model.diffusion_model.* keys: as a transfer
    target it was "not the same architecture", as --unet hundreds of missing keys, as --model "no
    model_index.json"."""
    import torch
    from safetensors.torch import save_file

    from nitrofusion.weights.io import unet_state_dict

    single = tmp_path / "finetune.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(single))
    unet = unet_state_dict(tiny_sdxl_dir, "--base")
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in unet.items()}, str(base))
    said = "is a single-file checkpoint in the original layout (model.diffusion_model.* keys)"
    out = str(tmp_path / "moved.safetensors")
    one_line_error(
        ["transfer", "--base", str(base), "--student", str(base), "--target", str(single), "--out", out], capsys, said
    )
    one_line_error(
        ["generate", "a cat", "--model", str(tiny_sdxl_dir), "--unet", str(single), "--out", out + ".png"], capsys, said
    )
    one_line_error(
        ["generate", "a cat", "--model", str(single), "--out", out + ".png"],
        capsys,
        "is a single weights file, where a diffusers pipeline directory is needed",
    )
    assert not (tmp_path / "moved.safetensors").exists()
