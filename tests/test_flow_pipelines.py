"""SD3-architecture flow-matching transformers (StableDiffusion3Pipeline) in generate, evaluate and
the app, sampled with their own scheduler, on a tiny SD3; refused with the options only a UNet
takes; Flux refused by name everywhere. Distilling one: test_flow_distill.py."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nitrofusion.cli import main
from nitrofusion.errors import UserError
from nitrofusion.pipelines import generate, load_pipeline, loading
from nitrofusion.testing import save_tiny_sd3, tiny_sd3_pipeline


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def sd3(tiny_sd3_dir):
    return load_pipeline(tiny_sd3_dir, device="cpu")


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails a test that reads a pipeline's weights (every load goes through _read_pipeline)."""

    def read(*a, **k):
        raise AssertionError("a pipeline's weights were read")

    monkeypatch.setattr(loading, "_read_pipeline", read)


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def flux_dir(tiny_sd3_dir: Path, tmp_path: Path) -> Path:
    """The tiny SD3 with a Flux index: refused before its (SD3) weights could be read."""
    flux = tmp_path / "flux"
    shutil.copytree(tiny_sd3_dir, flux)
    index = json.loads((flux / "model_index.json").read_text())
    index |= {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (flux / "model_index.json").write_text(json.dumps(index))
    return flux


def test_generate_draws_what_the_stock_sd3_pipeline_draws(sd3):
    """load_pipeline + generate sample with the pipeline's own scheduler and SD3's own default CFG (7),
    image i from seed + i: the same pixels as StableDiffusion3Pipeline called with those generators.
    The stock pipeline is the one saved (built in memory, so its weights are aligned as loaded ones are)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    assert sd3.nitro_sampler == "native" and isinstance(sd3.scheduler, FlowMatchEulerDiscreteScheduler)
    stock = tiny_sd3_pipeline()
    assert isinstance(stock, StableDiffusion3Pipeline) and stock.text_encoder_3 is None
    prompts = ["a cat", "a red bag"]
    for guidance, steps in ((None, 2), (0.0, 4)):  # SD3's default; a distilled (Turbo) model's 4 steps, no CFG
        got = generate(sd3, prompts, steps=steps, seed=5, batch_size=2, guidance_scale=guidance, progress=False)
        want = stock(
            prompts,
            num_inference_steps=steps,
            guidance_scale=7.0 if guidance is None else guidance,
            generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
        ).images
        assert [r.image.size for r in got] == [(64, 64)] * 2  # transformer sample_size 8 x VAE factor 8
        for r, w in zip(got, want):
            assert np.array_equal(np.asarray(r.image), np.asarray(w))
        assert got[0].metadata["guidance_scale"] == ("7" if guidance is None else "0")
        assert got[0].metadata["sampler"] == "native" and "shift" not in got[0].metadata
    assert getattr(sd3, "nitro_fast", None) is None  # the stock pipeline's path, never the fast sampler


def test_cli_generate_writes_a_png_that_says_native(tiny_sd3_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    args = ["generate", "a cat", "--model", str(tiny_sd3_dir), "--steps", "2", "--seed", "3", "--out", str(out)]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert stdout.split() == [str(out)]
    img = Image.open(out)
    assert img.size == (64, 64) and np.asarray(img).std() > 0
    assert img.text["sampler"] == "native" and img.text["guidance_scale"] == "7" and img.text["seed"] == "3"
    assert img.text["model"] == str(tiny_sd3_dir)
    code, _, err = run([*args[:-1], str(tmp_path / "wide.png"), "--width", "96", "--guidance-scale", "0"], capsys)
    assert code == 0 and Image.open(tmp_path / "wide.png").size == (96, 64), err


@pytest.mark.parametrize(
    "about",
    [
        *(
            json.dumps({"guidance_scale": 0, "sigmas": sigmas})
            for sigmas in (
                {"2": [1.0]},
                {"2": [1.0, 1.0]},
                {"2": [0.5, 1.0]},
                {"1": [0.5]},  # pure noise told it is at sigma 0.5
                {"1": [0.0]},
                {"two": [1.0, 0.5]},
                {"²": [1.0, 0.5]},  # a digit to str.isdigit, not to int()
                {"01": [1.0]},
                [1.0, 0.5],
                {"1": [True]},
            )
        ),
        '{"guidance_scale": 0, "sigmas": ',  # cut short: read as nothing, it sampled at CFG 7 and stock levels
        "[0]",
    ],
)
def test_a_malformed_nitrofusion_json_is_refused_in_one_line_before_any_weight(
    tiny_sd3_dir, tmp_path, capsys, no_weights_read, about
):
    """A flow student samples at the guidance and levels its folder records: others would degrade it
    quietly, so a nitrofusion.json that cannot be right stops the load, before the weights are read."""
    model = tmp_path / "student"
    shutil.copytree(tiny_sd3_dir, model)
    (model / "nitrofusion.json").write_text(about)
    code, _, err = run(["generate", "a cat", "--model", str(model), "--out", str(tmp_path / "x.png")], capsys)
    assert "nitrofusion.json'" in one_line_error(code, err)
    assert not (tmp_path / "x.png").exists()


def test_a_step_count_whose_levels_are_not_recorded_is_sampled_with_a_warning(tiny_sd3_dir, tmp_path):
    model = tmp_path / "student"
    shutil.copytree(tiny_sd3_dir, model)
    (model / "nitrofusion.json").write_text(json.dumps({"guidance_scale": 0, "sigmas": {"1": [1], "2": [1, 0.5]}}))
    pipe = load_pipeline(model, device="cpu")
    assert pipe.nitro_sigmas == {1: [1.0], 2: [1.0, 0.5]}
    assert generate(pipe, ["a cat"], steps=2, progress=False)[0].metadata["sigmas"] == "[1.0, 0.5]"
    with pytest.warns(UserWarning, match="for 1, 2 steps: 3 steps sample at its scheduler's own spacing"):
        image = generate(pipe, ["a cat"], steps=3, progress=False)[0]
    assert "sigmas" not in image.metadata


def test_a_size_not_a_multiple_of_vae_factor_times_patch_is_refused_in_one_line(tiny_sd3_dir, sd3, tmp_path, capsys):
    """SD3 latents are cut into 2x2 patches: sides are multiples of 8 x 2 = 16. 24 is a multiple of 8
    (enough for a UNet) but not of 16: refused before loading (the CLI) and after (generate)."""
    from nitrofusion.pipelines.generation import size_multiple, size_multiple_of_folder

    assert size_multiple_of_folder(tiny_sd3_dir) == size_multiple(sd3) == 16
    args = ["generate", "a cat", "--model", str(tiny_sd3_dir), "--height", "24", "--out", str(tmp_path / "x.png")]
    err = one_line_error(*run(args, capsys)[::2])
    assert "--height must be a positive multiple of 16 for this model, got 24" in err
    with pytest.raises(UserError, match="--width must be a positive multiple of 16"):
        generate(sd3, ["a cat"], steps=1, width=40, progress=False)
    assert not (tmp_path / "x.png").exists()


def test_a_size_past_the_transformers_position_embedding_is_refused_in_one_line(sd3, tiny_sd3_dir, tmp_path, capsys):
    """An SD3 transformer's position embedding covers pos_embed_max_size patches a side (the tiny
    one's 16: 256 px; SD3-Medium's 192: 3072 px): a larger side was a ValueError traceback from
    diffusers' patch embedding, in generate, make-pairs and the app."""
    from nitrofusion.app.server import LoadedModel
    from nitrofusion.pipelines.generation import largest_side, size_limits_of_folder

    assert size_limits_of_folder(tiny_sd3_dir) == (16, 256) and largest_side(sd3) == 256
    args = ["generate", "a cat", "--model", str(tiny_sd3_dir), "--height", "272", "--out", str(tmp_path / "x.png")]
    assert "--height must be at most 256 px for this model, got 272" in one_line_error(*run(args, capsys)[::2])
    with pytest.raises(UserError, match="--width must be at most 256 px for this model"):
        generate(sd3, ["a cat"], steps=1, width=272, progress=False)
    args = ["make-pairs", "--model", str(tiny_sd3_dir), "--n", "1", "--steps", "1", "--resolution", "272"]
    err = one_line_error(*run([*args, "--out", str(tmp_path / "pairs")], capsys)[::2])
    assert "--resolution must be at most 256 px for this teacher, got 272" in err
    model = LoadedModel.from_pipeline("sd3", str(tiny_sd3_dir), sd3)
    assert model.describe(1024)["max_size"] == 256 and max(model.sizes(1024)) <= 256
    assert not (tmp_path / "x.png").exists()
    assert generate(sd3, ["a cat"], steps=1, width=256, height=16, progress=False)[0].image.size == (256, 16)


@pytest.mark.parametrize(
    "option",
    [["--unet", "student.safetensors"], ["--shift", "250"], ["--compile"], ["--sampler", "shift-lcm"]],
    ids=lambda o: o[0],
)
def test_options_only_a_unet_takes_are_refused_in_one_line_before_loading(
    tiny_sd3_dir, option, tmp_path, capsys, no_weights_read
):
    args = ["generate", "a cat", "--model", str(tiny_sd3_dir), *option, "--out", str(tmp_path / "x.png")]
    err = one_line_error(*run(args, capsys)[::2])
    flag = " ".join(option) if option[0] == "--sampler" else option[0]
    assert f"{flag} is for UNet pipelines" in err and "StableDiffusion3Pipeline" in err, err


def test_evaluate_writes_a_row_for_an_sd3_model(tiny_sd3_dir, tmp_path, capsys):
    from transformers import CLIPConfig, CLIPModel

    from nitrofusion.world.spec import assets_dir

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    clip = tmp_path / "clip"
    config = CLIPConfig(text_config=tower, vision_config=tower | dict(image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(str(clip))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(assets_dir() / "tokenizer" / name, clip / name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red bag\n")
    out = tmp_path / "ev"
    args = ["evaluate", "--model", str(tiny_sd3_dir), "--steps", "1", "2", "--n", "2", "--batch-size", "2"]
    args += ["--prompts", str(prompts), "--metrics", "clip", "--clip-model", str(clip), "--out", str(out)]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in rows] == [("native", 1), ("native", 2)]
    row = rows[0]
    assert row["guidance_scale"] == 7.0 and row["unet"] is None and row["shift"] is None
    assert row["device"] == "cpu" and row["dtype"] == "float32"  # read from the transformer
    assert 0 <= row["clip_score"] <= 1 and row["model"] == str(tiny_sd3_dir)
    assert sorted(p.name for p in (out / "images" / "native-2-step").glob("*.png")) == ["00000.png", "00001.png"]
    assert "| native | 2 |" in stdout
    # Refused after the metrics' models are loaded (their loading bars are transformers'), before the SD3's.
    code, _, err = run([*args, "--shift", "250"], capsys)
    assert code == 2 and "error: --shift is for UNet pipelines" in err.splitlines()[-1], err

    # A flow student's levels are part of its images' settings: a re-export at other levels is not
    # served from the cache of the old one.
    student = tmp_path / "student"
    shutil.copytree(tiny_sd3_dir, student)
    (student / "nitrofusion.json").write_text(json.dumps({"guidance_scale": 0, "sigmas": {"2": [1, 0.5]}}))
    args = [a if a != str(tiny_sd3_dir) else str(student) for a in args]
    args[args.index(str(out))] = str(tmp_path / "ev-student")
    code, _, err = run(args, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "ev-student" / "results.json").read_text())
    assert "sigmas" not in rows[0] and rows[1]["sigmas"] == [1.0, 0.5] and rows[1]["guidance_scale"] == 0
    (student / "nitrofusion.json").write_text(json.dumps({"guidance_scale": 0, "sigmas": {"2": [1, 0.75]}}))
    code, _, err = run(args, capsys)
    assert code == 2 and "was made with other settings (sigmas)" in err, err


def test_flux_is_refused_by_name_everywhere(tiny_sd3_dir, tmp_path, capsys, no_weights_read):
    flux = flux_dir(tiny_sd3_dir, tmp_path)
    commands = [
        ["generate", "a cat", "--model", str(flux), "--out", str(tmp_path / "x.png")],
        ["evaluate", "--model", str(flux), "--n", "2", "--steps", "1", "--out", str(tmp_path / "ev")],
        ["make-pairs", "--model", str(flux), "--out", str(tmp_path / "pairs")],
        ["distill", "--set", f"model.teacher={flux}", "--output-dir", str(tmp_path / "run")],
    ]
    for args in commands:
        err = one_line_error(*run(args, capsys)[::2])
        assert "FluxPipeline with a transformer (FluxTransformer2DModel): it is not supported yet" in err, args
    from nitrofusion.app.server import ModelSpec, load_models

    with pytest.raises(UserError, match="FluxPipeline .*not supported yet"):
        load_models([ModelSpec(str(flux))], device="cpu", warmup=False)


def test_a_hub_sd3_is_fetched_to_sample_and_refused_from_its_index_otherwise(tiny_sd3_dir, tmp_path, monkeypatch):
    """A reachable SD3 repo is fetched (its transformer's weights too) for generate; as a teacher,
    with --unet (or another UNet-only option) or as Flux, only its index is. A cached SD3 is found
    in the cache (not "cached in part": it has no UNet weights)."""
    import huggingface_hub

    fetched: list = []

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, local_files_only=False):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        fetched.append(allow_patterns)
        return str(root)

    root = tiny_sd3_dir  # what the hub serves
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    repo = "stabilityai/stable-diffusion-3.5-large-turbo"
    assert loading.resolve_model(repo, allow_flow=True) == tiny_sd3_dir
    assert fetched[0] == ["model_index.json"] and "transformer/*.safetensors" in fetched[1]
    for kwargs, message in (
        ({}, "where a UNet pipeline .* is needed"),
        ({"allow_flow": True, "unet_only": ("--unet",)}, "--unet is for UNet pipelines"),
    ):
        fetched.clear()
        with pytest.raises(UserError, match=message):
            loading.resolve_model(repo, **kwargs)
        assert fetched == [["model_index.json"]]
    fetched.clear()
    root = flux_dir(tiny_sd3_dir, tmp_path)
    with pytest.raises(UserError, match="FluxPipeline .*not supported yet"):
        loading.resolve_model("black-forest-labs/FLUX.1-schnell", allow_flow=True)
    assert fetched == [["model_index.json"]]
    # Cached, offline: the snapshot is the pipeline (no "not (in full) in the Hugging Face cache").
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tiny_sd3_dir))
    assert loading.resolve_model(repo, allow_flow=True) == tiny_sd3_dir
    with pytest.raises(UserError, match="where a UNet pipeline"):
        loading.resolve_model(repo)


def test_the_app_serves_an_sd3_model(tiny_sd3_dir):
    pytest.importorskip("fastapi", reason="the app needs fastapi")
    pytest.importorskip("httpx", reason="the app tests need httpx")
    from fastapi.testclient import TestClient

    from nitrofusion.app.server import ModelSpec, create_app, load_models

    (model,) = load_models([ModelSpec(str(tiny_sd3_dir), name="sd3")], device="cpu", warmup=False)
    with TestClient(create_app([model]), base_url="http://127.0.0.1") as c:
        (described,) = c.get("/api/models").json()["models"]
        assert (described["sampler"], described["default_size"], described["size_multiple"]) == ("native", 64, 16)
        r = c.post("/api/generate", json={"prompt": "a cat", "steps": 2, "seed": 4})
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(r.content))
        assert img.size == (64, 64) and img.text["sampler"] == "native" and img.text["model"] == "sd3"
        r = c.post("/api/generate", json={"prompt": "a cat", "width": 40})
        assert r.status_code == 400 and "multiple of 16" in r.json()["error"], r.text
    with pytest.raises(UserError, match="--compile is for UNet pipelines"):
        load_models([ModelSpec(str(tiny_sd3_dir))], device="cpu", warmup=False, compile=True)


def test_the_app_samples_each_model_at_its_own_guidance_scale(tiny_sd3_dir):
    """SD3.5-Large-Turbo needs CFG 0; without a per-model --guidance-scale the app drew it at SD3's 7."""
    pytest.importorskip("httpx", reason="the app tests need httpx")
    import argparse

    from fastapi.testclient import TestClient

    from nitrofusion.app.cli import _add_arguments
    from nitrofusion.app.server import ModelSpec, create_app, load_models

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    args = parser.parse_args(
        ["--model", f"sd3={tiny_sd3_dir}", "--model", f"turbo={tiny_sd3_dir}", "--guidance-scale", "0"]
    )
    assert [s.guidance_scale for s in args.models] == [None, 0.0]
    models = load_models(args.models, device="cpu", warmup=False)
    with TestClient(create_app(models), base_url="http://127.0.0.1") as c:
        described = {m["name"]: m["guidance_scale"] for m in c.get("/api/models").json()["models"]}
        assert described == {"sd3": 7.0, "turbo": 0.0}
        for name, want in (("sd3", "7"), ("turbo", "0")):
            r = c.post("/api/generate", json={"prompt": "a cat", "steps": 1, "seed": 1, "model": name})
            assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).text["guidance_scale"] == want
    with pytest.raises(UserError, match="guidance"):  # before anything is loaded
        load_models([ModelSpec("/does/not/exist", guidance_scale=-1.0)], device="cpu", warmup=False)
