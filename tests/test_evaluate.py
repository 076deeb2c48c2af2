"""`nitrofusion evaluate`: the image cache, the metrics against independent oracles, the
missing-weight messages and the end-to-end command on the embedded world."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from nitrofusion.cli import main
from nitrofusion.errors import UserError
from nitrofusion.evaluation import fid
from nitrofusion.evaluation.aesthetic import AestheticMLP, aesthetic_score, load_aesthetic
from nitrofusion.evaluation.cache import ImageCache
from nitrofusion.evaluation.clip import ClipModel, clip_score
from nitrofusion.evaluation.evaluate import table
from nitrofusion.evaluation.frechet import GaussianStats, frechet_distance
from nitrofusion.testing import tiny_sdxl_pipeline
from nitrofusion.world.spec import assets_dir


def _pixels(images):
    return [np.asarray(im) for im in images]


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.nitro_sampler = "native"
    return pipe


PROMPTS = [f"a photo of thing {i}" for i in range(7)]


def test_cached_images_are_read_when_used_not_held(tiny_pipe, tmp_path, monkeypatch):
    """All images were decoded into memory at once: 15.7 GB for a 5,000-image SDXL evaluation at
    1024x1024, before any scorer ran. The scorers take them a batch at a time; so does the cache."""
    import nitrofusion.evaluation.cache as cache

    images, _ = ImageCache(tmp_path, {"steps": 1}).fill(tiny_pipe, PROMPTS[:4], 1, 0, batch_size=4, guidance_scale=1.0)
    opened = []
    real_open = cache.Image.open
    monkeypatch.setattr(cache.Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    again, _ = ImageCache(tmp_path, {"steps": 1}).fill(tiny_pipe, PROMPTS[:4], 1, 0, batch_size=4, guidance_scale=1.0)
    assert len(again) == 4 and opened == []
    batch = again[1:3]
    assert [im.mode for im in batch] == ["RGB", "RGB"] and len(opened) == 2
    assert np.array_equal(np.asarray(again[3]), np.asarray(Image.open(tmp_path / "00003.png").convert("RGB")))


def test_cache_resumes_with_the_same_images(tiny_pipe, tmp_path):
    settings = {"model": "tiny", "steps": 2}
    whole, _ = ImageCache(tmp_path / "a", settings).fill(tiny_pipe, PROMPTS, 2, 10, batch_size=3, guidance_scale=1.0)
    # An interrupted run: some images never written, one batch boundary elsewhere.
    part = tmp_path / "b"
    ImageCache(part, settings).fill(tiny_pipe, PROMPTS[:5], 2, 10, batch_size=2, guidance_scale=1.0)
    for i in (1, 3):
        (part / f"{i:05d}.png").unlink()
    resumed, _ = ImageCache(part, settings).fill(tiny_pipe, PROMPTS, 2, 10, batch_size=4, guidance_scale=1.0)
    for a, b in zip(_pixels(whole), _pixels(resumed)):
        np.testing.assert_array_equal(a, b)
    manifest = json.loads((part / "manifest.json").read_text())
    assert manifest["generated"] == 5 + 2 + 2  # first pass, the two deleted, the two never made


def test_cache_refuses_other_settings(tiny_pipe, tmp_path):
    ImageCache(tmp_path, {"steps": 1}).fill(tiny_pipe, PROMPTS[:2], 1, 0, batch_size=2, guidance_scale=1.0)
    with pytest.raises(UserError, match="other settings \\(steps\\)"):
        ImageCache(tmp_path, {"steps": 2}).fill(tiny_pipe, PROMPTS[:2], 2, 0, batch_size=2, guidance_scale=1.0)


def test_cache_interrupted_in_its_first_batch_is_not_mixed_with_other_settings(tiny_pipe, tmp_path, monkeypatch):
    """The images of a batch were written before the manifest: a run stopped in its first batch left
    images with no recorded settings, which a run with another model into the same --out took as its own."""
    import nitrofusion.evaluation.cache as cache_module

    written = []
    replacing = cache_module.replacing

    def stop_after_the_first_image(path):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return replacing(path)

    monkeypatch.setattr(cache_module, "replacing", stop_after_the_first_image)
    with pytest.raises(KeyboardInterrupt):
        ImageCache(tmp_path, {"model": "a"}).fill(tiny_pipe, PROMPTS[:3], 1, 0, batch_size=3, guidance_scale=1.0)
    monkeypatch.setattr(cache_module, "replacing", replacing)
    assert (tmp_path / "00000.png").is_file()
    with pytest.raises(UserError, match="other settings \\(model\\)"):
        ImageCache(tmp_path, {"model": "b"}).fill(tiny_pipe, PROMPTS[:3], 1, 0, batch_size=3, guidance_scale=1.0)
    # Images left with no manifest at all (by an older version): their settings are unknown.
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(UserError, match="holds images but no manifest.json") as err:
        ImageCache(tmp_path, {"model": "b"}).fill(tiny_pipe, PROMPTS[:3], 1, 0, batch_size=3, guidance_scale=1.0)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png"]  # refused, nothing deleted or added
    # A manifest that is JSON but not one (a list; nested past the parser's recursion limit): one line.
    for text in ("[]", '{"settings": 3}', "[" * 100_000):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(UserError, match="manifest .* is unreadable; delete the directory"):
            ImageCache(tmp_path, {"model": "b"}).fill(tiny_pipe, PROMPTS[:3], 1, 0, batch_size=3, guidance_scale=1.0)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(str(path))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(assets_dir() / "tokenizer" / name, path / name)
    return path


def _images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_score_matches_the_models_own_forward(tiny_clip_dir):
    clip = ClipModel(tiny_clip_dir)
    images, prompts = _images(4), ["a red shoe", "a blue bag", "a coat", "a dress"]
    # Oracle: CLIPModel.forward's logits are exp(logit_scale) * cosine, on another code path.
    pixels = clip.processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = clip.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    cos = (out.logits_per_image.diagonal() / clip.model.logit_scale.exp()).detach()
    expected = float(cos.clamp(min=0).mean())  # the paper's scale (0.320), not torchmetrics' x100
    assert clip_score(clip, images, prompts) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_clip_score_reads_a_long_caption_up_to_clips_77_tokens(tiny_clip_dir):
    """COCO has captions over 77 tokens: CLIP reads their start, so whatever follows changes nothing
    (and nothing fails), while a change inside the first tokens does."""
    clip = ClipModel(tiny_clip_dir)
    long = "a photo of " + " ".join(["a red leather shoe"] * 30)  # far over 77 tokens
    base, tail, start = clip.text_embeddings(
        [long, long + " on a wooden table at night", "a drawing of " + long[len("a photo of ") :]]
    )
    assert torch.equal(base, tail)
    assert not torch.allclose(base, start)
    assert 0 <= clip_score(clip, _images(1), [long + " on a wooden table at night"]) <= 1


def test_clip_missing_or_without_tokenizer_is_one_line(tmp_path, tiny_clip_dir):
    with pytest.raises(UserError, match="--clip-model") as err:
        ClipModel(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "vocab.json").unlink()
    with pytest.raises(UserError, match="broken"):
        ClipModel(broken)
    # A text encoder alone: transformers built the vision tower with random weights, and scored.
    from transformers import CLIPModel, CLIPTextModel

    text_only = tmp_path / "text-only"
    CLIPTextModel(CLIPModel.from_pretrained(str(tiny_clip_dir)).config.text_config).save_pretrained(str(text_only))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_clip_dir / name, text_only / name)
    with pytest.raises(UserError, match="is not a whole CLIPModel: .* weights are missing"):
        ClipModel(text_only)


def test_aesthetic_score_is_the_mlp_on_normalised_embeddings(tiny_clip_dir, tmp_path):
    torch.manual_seed(1)
    mlp = AestheticMLP(embed_dim=16)
    path = tmp_path / "aesthetic.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path))
    loaded = load_aesthetic(path, embed_dim=16)
    clip = ClipModel(tiny_clip_dir)
    images = _images(3, seed=2)
    emb = clip.image_embeddings(images)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Oracle: the linear stack by hand (no activations; dropout off in eval).
    x = emb
    for i in (0, 2, 4, 6, 7):
        x = x @ mlp.layers[i].weight.T + mlp.layers[i].bias
    assert aesthetic_score(loaded, clip, images) == pytest.approx(float(x.mean().detach()), rel=1e-5)


def test_clip_score_and_the_aesthetic_predictor_read_their_own_clip(tiny_clip_dir, tmp_path, monkeypatch):
    """The paper: CLIP score with ViT-B/32, the aesthetic MLP on ViT-L/14; one model is loaded once."""
    from types import SimpleNamespace

    import nitrofusion.evaluation.clip as clip_module
    from nitrofusion.evaluation.evaluate import EvalRequest, build_scorers

    loaded = []
    widths = {"b32": 512, "l14": 768, "l14-336": 768}  # CLIP ViT-B/32's and ViT-L/14's embedding widths
    towers = {
        "b32": {"image_size": 224, "patch_size": 32, "hidden_size": 768, "num_hidden_layers": 12},
        "l14": {"image_size": 224, "patch_size": 14, "hidden_size": 1024, "num_hidden_layers": 24},
        "l14-336": {"image_size": 336, "patch_size": 14, "hidden_size": 1024, "num_hidden_layers": 24},
    }

    def stand_in(path, device, option):
        loaded.append((path, option))
        config = SimpleNamespace(projection_dim=widths[path], vision_config=SimpleNamespace(**towers[path]))
        return SimpleNamespace(model=SimpleNamespace(config=config))

    monkeypatch.setattr(clip_module, "ClipModel", stand_in)
    aesthetic = tmp_path / "aesthetic.safetensors"
    save_file({k: v.contiguous() for k, v in AestheticMLP().state_dict().items()}, str(aesthetic))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    common = dict(model="x", steps=[1], out=tmp_path, prompts=str(prompts), metrics=["clip", "aesthetic"])
    scorers = build_scorers(
        EvalRequest(**common, clip_model="b32", aesthetic=str(aesthetic), aesthetic_clip_model="l14"), "cpu"
    )
    assert loaded == [("b32", "--clip-model"), ("l14", "--aesthetic-clip-model")]
    assert scorers.warnings == []
    # Another CLIP of the predictor's width (ViT-L/14 at 336 px) scores, with a warning.
    loaded.clear()
    scorers = build_scorers(
        EvalRequest(**common, clip_model="b32", aesthetic=str(aesthetic), aesthetic_clip_model="l14-336"), "cpu"
    )
    assert len(scorers.warnings) == 1 and "image_size 336 (ViT-L/14: 224)" in scorers.warnings[0]
    loaded.clear()
    build_scorers(EvalRequest(**common, clip_model="l14", aesthetic=str(aesthetic)), "cpu")
    assert loaded == [("l14", "--clip-model")]
    # ViT-B/32 alone: refused while loading, before an image is generated, not after.
    with pytest.raises(UserError, match="768-d CLIP embeddings but the CLIP model gives 512-d"):
        build_scorers(EvalRequest(**common, clip_model="b32", aesthetic=str(aesthetic)), "cpu")
    # No CLIP at all: the aesthetic score alone names its own option (and the shared one).
    aesthetic_only = {**common, "metrics": ["aesthetic"]}
    with pytest.raises(UserError, match="the aesthetic score needs --aesthetic-clip-model \\(or --clip-model"):
        build_scorers(EvalRequest(**aesthetic_only, aesthetic=str(aesthetic)), "cpu")
    with pytest.raises(UserError, match="^CLIP score and CLIP-FID need --clip-model"):
        build_scorers(EvalRequest(**common, aesthetic=str(aesthetic)), "cpu")


def test_aesthetic_weights_missing_or_wrong(tmp_path):
    with pytest.raises(UserError, match="--aesthetic") as err:
        load_aesthetic(tmp_path / "none.safetensors")
    assert "\n" not in str(err.value)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"layers.0.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(UserError, match="does not fit"):
        load_aesthetic(wrong)


def reference_folder(path, n: int):
    """n small images, as a folder of real ones."""
    path.mkdir()
    for i, im in enumerate(_images(n, seed=3, size=20)):
        im.save(path / f"{i}.png")
    return path


def toy_features(images):
    """A stand-in feature extractor: mean colour and spread per channel."""
    t = fid.to_tensor(images, 16)
    return torch.cat([t.mean((2, 3)), t.std((2, 3))], 1)


def test_reference_statistics_from_images_and_from_file(tmp_path):
    ref_dir = reference_folder(tmp_path / "real", 12)
    extract = toy_features

    cache = tmp_path / "ref.safetensors"
    stats = fid.reference_stats(ref_dir, "toy", extract, cache)
    direct = GaussianStats.from_features(extract([Image.open(p) for p in sorted(ref_dir.glob("*.png"))]))
    np.testing.assert_allclose(stats.mu, direct.mu)
    again = fid.reference_stats(cache, "toy", extract)
    assert frechet_distance(stats, again) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(UserError, match="toy statistics"):
        fid.reference_stats(cache, "inception", extract)
    # The file records its source and feature network: reused for the same two only.
    made = fid.reference_stats(ref_dir, "toy", extract, cache, extractor="/weights/a")
    assert fid.cached_reference_stats(cache, str(ref_dir), "toy", "/weights/a") is not None
    assert fid.cached_reference_stats(cache, str(ref_dir), "toy", "/weights/b") is None  # other weights: computed again
    assert fid.cached_reference_stats(cache, str(tmp_path), "toy", "/weights/a") is None  # another directory
    with pytest.raises(UserError, match="features of '/weights/a', not of '/weights/b'"):
        fid.reference_stats(cache, "toy", extract, extractor="/weights/b")
    assert frechet_distance(made, fid.reference_stats(cache, "toy", extract, extractor="/weights/a")) == pytest.approx(
        0
    )
    with pytest.raises(UserError, match="not found"):
        fid.reference_stats(tmp_path / "missing", "toy", extract)


def test_an_older_stats_file_naming_its_network_by_a_relative_path_is_still_read(tmp_path, monkeypatch):
    """Older versions recorded a CLIP network as --clip-model gave it, perhaps relative; it is now
    identified by its contents, and its path resolved. The same folder read again matched nothing."""
    ref_dir = reference_folder(tmp_path / "real", 4)
    extract = toy_features

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "old.safetensors"
    fid.reference_stats(ref_dir, "toy", extract, cache, extractor="models/clip")  # as an older version wrote it
    here = str((tmp_path / "models" / "clip").resolve())
    fid.reference_stats(cache, "toy", extract, extractor="sha256:abc", extractor_file=here)
    with pytest.raises(UserError, match="not of"):
        fid.reference_stats(cache, "toy", extract, extractor="sha256:abc", extractor_file=str(tmp_path / "other"))


def test_table_has_only_measured_columns():
    rows = [{"model": "m", "sampler": "shift-lcm", "steps": 1, "clip_score": 0.31234, "seconds_per_image": 0.01}]
    text = table(rows)
    assert "CLIP score" in text and "FID" not in text and "0.312" in text


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--metrics", "clip"], "--clip-model"),
        (["--metrics", "clip", "--clip-model", "/nonexistent"], "--clip-model"),
        (["--metrics", "aesthetic", "--aesthetic", "/nonexistent.safetensors"], "--aesthetic"),
        (["--metrics", "fid"], "--inception"),
        (["--metrics", "imagereward"], "--image-reward"),
        (["--metrics", "fid", "--fid-features", "pixels"], "--fid-features"),
        (["--metrics", "fid", "--fid-features", "clip", "--fid-resize", "clean"], "--fid-resize is for"),
        (["--metrics", "fid", "--fid-features", "embedded", "--fid-resize", "pytorch-fid"], "--fid-resize is for"),
        (["--metrics", "embedded", "--fid-resize", "clean"], "--fid-resize is for the fid metric"),
        (["--metrics", "embedded", "--prompts", "PROMPTS"], "--prompts embedded"),
        (["--metrics", "bleu"], "unknown metric"),
        # Options of metrics not measured (here the default, embedded): accepted, they changed nothing.
        (["--clip-model", "nosuch"], "--clip-model is for"),
        (["--fid-features", "clip"], "--fid-features is for the fid metric"),
        (["--aesthetic-clip-model", "nosuch"], "--aesthetic-clip-model is for the aesthetic metric"),
        (["--image-reward-tokenizer", "nosuch"], "--image-reward-tokenizer is for the imagereward metric"),
        (["--metrics", "clip", "--prompts", "PROMPTS", "--evaluator", "nosuch"], "--evaluator is for"),
        (["--metrics", "fid", "--evaluator", "nosuch"], "--evaluator is for"),  # Inception features
        (["--metrics", "fid", "--fid-features", "clip", "--aesthetic-clip-model", "x"], "--aesthetic-clip-model"),
        # The aesthetic score with its own CLIP reads no --clip-model.
        (
            ["--metrics", "aesthetic", "--aesthetic", "a", "--aesthetic-clip-model", "b", "--clip-model", "c"],
            "--clip-model is for",
        ),
    ],
)
def test_missing_weights_fail_before_any_image(tmp_path, capsys, extra, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    extra = [str(prompts) if a == "PROMPTS" else a for a in extra]
    out = tmp_path / "out"
    code = main(["evaluate", "--steps", "1", "--n", "4", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1
    assert not (out / "images").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--fid-features", "inception"],  # the default, named
        ["--metrics", "aesthetic", "--aesthetic", "nosuch.safetensors", "--clip-model", "nosuch"],  # its CLIP
        ["--metrics", "fid", "--fid-features", "clip", "--clip-model", "nosuch"],
        ["--metrics", "fid", "--fid-features", "embedded", "--evaluator", "nosuch"],
        ["--evaluator", "nosuch"],  # the embedded metrics are the default for the embedded prompts
    ],
)
def test_an_option_of_a_measured_metric_is_not_refused_as_ignored(tmp_path, capsys, monkeypatch, extra):
    import nitrofusion.pipelines

    monkeypatch.setattr(nitrofusion.pipelines, "load_pipeline", _stop_at_the_pipeline)
    out = tmp_path / "out"
    if extra == ["--fid-features", "inception"]:  # accepted: it gets as far as the pipeline
        with pytest.raises(PipelineReached):
            main(["evaluate", "--steps", "1", "--n", "4", "--out", str(out), *extra])
        return
    code = main(["evaluate", "--steps", "1", "--n", "4", "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is for" not in err and len(err.splitlines()) == 1  # the missing file, said
    assert "nosuch" in err


class PipelineReached(Exception):
    pass


def _stop_at_the_pipeline(*args, **kwargs):
    raise PipelineReached


def test_an_out_of_range_seed_is_refused_before_anything_is_made(tmp_path, capsys, monkeypatch):
    """Image i is seed + i: a --seed whose last image overflows failed at the first image, after the
    model loaded, and left a manifest with that seed that refused the corrected rerun."""
    import nitrofusion.pipelines

    monkeypatch.setattr(nitrofusion.pipelines, "load_pipeline", _stop_at_the_pipeline)
    out = tmp_path / "evS"
    for seed in (2**64 - 1, 2**64 - 3, -(2**63) - 1):  # the first or the last image's seed out of range
        code = main(["evaluate", "--steps", "1", "--n", "4", "--seed", str(seed), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "--seed must be in" in err and len(err.splitlines()) == 1
        assert not out.exists()


def test_an_empty_out_is_refused_not_the_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["evaluate", "--steps", "1", "--n", "2", "--out", ""])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--out is empty" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_fid_on_other_prompts_needs_a_reference(tiny_clip_dir, tmp_path):
    from nitrofusion.evaluation.evaluate import EvalRequest, build_scorers

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    req = EvalRequest(
        model="x",
        steps=[1],
        out=tmp_path,
        prompts=str(prompts),
        metrics=["fid"],
        fid_features="clip",
        clip_model=str(tiny_clip_dir),
    )
    with pytest.raises(UserError, match="--reference"):
        build_scorers(req, "cpu")


def test_evaluate_command_on_the_embedded_world(tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["evaluate", "--steps", "1", "2", "--n", "8", "--batch-size", "4", "--out", str(out)]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["steps"] for r in rows] == [1, 2]
    assert all(0 <= r["class_accuracy"] <= 1 and r["domain_fd"] > 0 for r in rows)
    assert "class accuracy" in (out / "results.md").read_text()
    assert Image.open(out / "grid.png").size[0] > 100
    # A second run reuses every cached image and gives the same numbers.
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert [(r["class_accuracy"], r["domain_fd"]) for r in again] == [
        (r["class_accuracy"], r["domain_fd"]) for r in rows
    ]
    # The one-step row is the evaluator's score of the cached images for the prompts' classes.
    from nitrofusion.world.data import evaluation_prompts
    from nitrofusion.world.evaluator import Evaluator
    from nitrofusion.world.spec import evaluator_path

    cached = sorted((out / "images" / "shift-lcm-1-step").glob("*.png"))
    assert len(cached) == 8
    labels = torch.tensor([c for _, c in evaluation_prompts(8, 0)])
    score = Evaluator.load(evaluator_path()).score(fid.to_tensor([Image.open(p) for p in cached]), labels)
    assert rows[0]["class_accuracy"] == pytest.approx(score["class_accuracy"])
    assert rows[0]["domain_fd"] == pytest.approx(score["domain_fd"], rel=1e-6)
    manifest = json.loads((out / "images" / "shift-lcm-1-step" / "manifest.json").read_text())
    assert manifest["generated"] == 8
    # Another --n orders the embedded prompts otherwise: its images are not these, so it is refused.
    capsys.readouterr()
    assert main([a if a != "8" else "12" for a in args]) == 2
    assert "prompts_sha256" in capsys.readouterr().err
    assert (rows[0]["device"], rows[0]["dtype"]) == ("cpu", "float32")


def test_an_image_cache_is_not_resumed_in_another_precision(tmp_path, capsys, monkeypatch):
    """On a GPU, evaluate samples in fp16 and draws noise from CUDA generators: a cache begun on a
    CPU and resumed there mixed two samplings of the same seeds. The precision here stands for both."""
    out = tmp_path / "ev"
    args = ["evaluate", "--steps", "1", "--n", "4", "--batch-size", "4", "--out", str(out)]
    assert main(args) == 0
    (out / "images" / "shift-lcm-1-step" / "00003.png").unlink()  # a stopped run
    capsys.readouterr()
    assert main([*args, "--dtype", "bf16"]) == 2
    assert "other settings (dtype)" in capsys.readouterr().err
    assert main([*args, "--dtype", "fp8"]) == 2  # said before a metric's model or the pipeline loads
    assert "unknown dtype 'fp8'" in capsys.readouterr().err


def test_compare_puts_several_evaluations_in_one_table(tmp_path, capsys):
    for name, extra in (("a", []), ("b", ["--model", "embedded-teacher", "--sampler", "shift-lcm"])):
        args = [
            "evaluate",
            "--steps",
            "1",
            "--n",
            "4",
            "--batch-size",
            "4",
            "--label",
            name,
            "--out",
            str(tmp_path / name),
        ]
        assert main(args + extra) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "both")]) == 0
    rows = json.loads((tmp_path / "both" / "results.json").read_text())
    assert [r["model"] for r in rows] == ["a", "b"]
    assert "| b | shift-lcm | 1 |" in (tmp_path / "both" / "results.md").read_text()
    assert Image.open(tmp_path / "both" / "grid.png").size[1] > 2 * 32
    assert main(["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    old = json.loads((tmp_path / "a" / "results.json").read_text())
    (tmp_path / "a" / "results.json").write_text(json.dumps([{**old[0], "clip_score": 31.9}]))  # the old x100 scale
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "mixed")]) == 2
    assert "x100 scale" in capsys.readouterr().err
    (tmp_path / "a" / "results.json").write_text(json.dumps(old))
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    (tmp_path / "b" / "results.json").write_text(json.dumps([{**b[0], "n": 2000}]))  # another sample count
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "mixed")]) == 2
    assert "measured class_accuracy with n=2000, an earlier directory with 4" in capsys.readouterr().err


def test_grid_writes_the_format_its_file_name_says(tmp_path, capsys):
    rows = tmp_path / "a"
    rows.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(rows / f"{i}.png")
    for name, fmt in (("g.png", "PNG"), ("g.jpg", "JPEG")):
        assert main(["grid", str(rows), "--out", str(tmp_path / name)]) == 0
        assert Image.open(tmp_path / name).format == fmt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "g.jpg", "g.png"]  # no temporary left beside


def test_a_long_grid_label_wraps_and_keeps_its_step_count():
    """Labels were cut at 32 characters: "flow student, 2 stages, trailing, anchored, 4 step(s)" lost
    the step count that tells its rows apart. They wrap at word breaks, inside the label column."""
    from PIL import ImageDraw

    from nitrofusion.evaluation.grid import LABEL_WIDTH, make_grid, wrap_label

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = "flow student, 2 stages, trailing, anchored, 4 step(s)"
    lines = wrap_label(draw, label, LABEL_WIDTH - 8, 8)
    assert len(lines) == 2 and " ".join(lines) == label and lines[-1].endswith("4 step(s)")
    assert all(draw.textlength(line) <= LABEL_WIDTH - 8 for line in lines)
    assert wrap_label(draw, "teacher (Euler, CFG 5), 25", LABEL_WIDTH - 8, 8) == ["teacher (Euler, CFG 5), 25"]
    many = wrap_label(draw, "word " * 100, LABEL_WIDTH - 8, 3)
    assert len(many) == 3 and many[-1].endswith("...")
    grid = make_grid([[Image.new("RGB", (32, 32), "gray")]], [label], scale=3)
    text = np.asarray(grid)[:, :LABEL_WIDTH].min(axis=2) < 128  # dark label pixels
    rows = np.flatnonzero(text.any(axis=1))
    assert rows.max() - rows.min() > 14  # two lines of text, not one


def test_embedded_reference_statistics_are_not_reused_for_another_evaluator(tmp_path):
    """The embedded features recorded no feature network: statistics of a reference folder computed
    with one --evaluator were reused for another's features. The network is named by its contents:
    a copy of the shipped evaluator is the same network, other weights at the same path are not."""
    from nitrofusion.evaluation.evaluate import EvalRequest, build_scorers
    from nitrofusion.world.evaluator import Evaluator
    from nitrofusion.world.spec import evaluator_path

    ref_dir = tmp_path / "real"
    ref_dir.mkdir()
    for i, im in enumerate(_images(4, seed=5, size=32)):
        im.save(ref_dir / f"{i}.png")
    other = tmp_path / "other-evaluator.safetensors"
    shutil.copy(evaluator_path(), other)
    cache = tmp_path / "out" / "reference-embedded.safetensors"

    def build(evaluator):
        req = EvalRequest(
            model="x",
            steps=[1],
            out=tmp_path / "out",
            metrics=["fid"],
            fid_features="embedded",
            reference=str(ref_dir),
            evaluator=evaluator,
        )
        build_scorers(req, "cpu").prepare()
        return fid.stats_metadata(cache)

    shipped = build(None)
    assert shipped["extractor"] == fid.weights_identity(evaluator_path())
    assert shipped["extractor_file"] == str(evaluator_path().resolve())
    assert build(str(other))["extractor"] == shipped["extractor"]  # the same bytes, the same features
    retrained = Evaluator.load(other)
    with torch.no_grad():
        retrained.model.features[1].weight.mul_(1.5)
    retrained.save(other)
    meta = build(str(other))
    assert meta["extractor"] == fid.weights_identity(other) != shipped["extractor"]
    # An image added to the reference folder: the statistics are computed again, over five.
    _images(1, seed=6, size=32)[0].save(ref_dir / "4.png")
    assert build(str(other))["images"] == "5"


def test_reference_statistics_are_computed_again_when_the_images_change(tmp_path):
    """Reference statistics were reused by the directory's path alone: images added to (or replaced
    in) the reference folder were never read."""
    ref_dir = reference_folder(tmp_path / "real", 6)
    extract = toy_features

    cache = tmp_path / "ref.safetensors"
    fid.reference_stats(ref_dir, "toy", extract, cache, extractor="sha256:a")
    assert fid.cached_reference_stats(cache, ref_dir, "toy", "sha256:a") is not None
    _images(1, seed=9, size=20)[0].save(ref_dir / "sub-added.png")
    assert fid.cached_reference_stats(cache, ref_dir, "toy", "sha256:a") is None  # one more image
    fid.reference_stats(ref_dir, "toy", extract, cache, extractor="sha256:a")
    assert fid.stats_metadata(cache)["images"] == "7"
    assert fid.cached_reference_stats(cache, ref_dir, "toy", "sha256:a") is not None
    _images(1, seed=10, size=24)[0].save(ref_dir / "0.png")  # the same count, another image
    assert fid.cached_reference_stats(cache, ref_dir, "toy", "sha256:a") is None
    # A stats file prepared otherwise (another resize) is other numbers, and refused by name.
    meta = {**fid.stats_metadata(cache), "preprocess": "bilinear to 299"}
    other = tmp_path / "other.safetensors"
    save_file(
        {k: v.contiguous() for k, v in fid.GaussianStats.from_features(torch.rand(4, 6)).to_tensors().items()},
        str(other),
        metadata=meta,
    )
    with pytest.raises(UserError, match="prepared its images otherwise \\(bilinear to 299\\)"):
        fid.reference_stats(other, "toy", extract, extractor="sha256:a")


def test_evaluate_warns_of_cycled_prompts_and_of_fewer_images_than_features(tmp_path, capsys):
    """A prompt file shorter than --n was cycled, and a FID over fewer images than feature dimensions
    computed, without a word: both are now one warning line, and the row records the distinct prompts."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a coat\na bag\n")
    out = tmp_path / "ev"
    args = ["evaluate", "--steps", "1", "--n", "4", "--batch-size", "4", "--prompts", str(prompts), "--out", str(out)]
    capsys.readouterr()
    assert main([*args, "--metrics", "fid", "--fid-features", "embedded"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "holds 2 prompts, fewer than --n 4: they are cycled" in warnings[0]
    assert "FID over 4 images of 128-d features" in warnings[1] and "rank at most 3" in warnings[1]
    row = json.loads((out / "results.json").read_text())[0]
    assert (row["n"], row["distinct_prompts"]) == (4, 2)
    # The reference's covariance is as rank-deficient below the feature width: 3 real images.
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, image in enumerate(_images(3, seed=4)):
        image.save(refs / f"{i}.png")
    args = [*args[:-1], str(tmp_path / "ev-small-reference"), "--metrics", "fid", "--fid-features", "embedded"]
    assert main([*args, "--reference", str(refs)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert any("reference holds 3 images of 128-d features" in w and "rank at most 2" in w for w in warnings), warnings


def test_a_wrong_or_corrupt_evaluator_is_one_line(tmp_path, capsys):
    """--evaluator pointing at a corrupt file, another network or weights without reference statistics
    gave a traceback (SafetensorError, load_state_dict's RuntimeError, KeyError 'mu')."""
    from safetensors.torch import load_file

    from nitrofusion.world.spec import evaluator_path

    shipped = load_file(str(evaluator_path()))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(evaluator_path().read_bytes()[:1000])
    other_network = tmp_path / "aesthetic.safetensors"
    save_file({k: v.contiguous() for k, v in AestheticMLP().state_dict().items()}, str(other_network))
    no_reference = tmp_path / "no-reference.safetensors"
    save_file({k: v for k, v in shipped.items() if not k.startswith("ref.")}, str(no_reference))
    wrong_reference = tmp_path / "wrong-reference.safetensors"
    save_file({**shipped, "ref.mu": torch.zeros(64, dtype=torch.float64)}, str(wrong_reference))
    for path, needle in (
        (corrupt, "not a readable safetensors file"),
        (other_network, "does not fit the model"),
        (no_reference, "ref.mu missing"),
        (wrong_reference, "ref.mu of shape [64]"),
    ):
        out = tmp_path / f"out-{path.stem}"
        args = ["evaluate", "--steps", "1", "--n", "4", "--evaluator", str(path), "--out", str(out)]
        assert main(args) == 2, path
        err = capsys.readouterr().err.strip()
        assert needle in err and str(path) in err and len(err.splitlines()) == 1, err
        assert not (out / "images").exists()


# --fid-resize: each mode against a computation written here, from the tools' definitions.


def _noise(width: int, height: int, seed: int) -> Image.Image:
    """A non-smooth 8-bit RGB image: every resampling filter leaves its own trace on it."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _crop(im: Image.Image) -> np.ndarray:
    """The centred square of an image as uint8 [side, side, 3], by array slicing."""
    a = np.asarray(im.convert("RGB"))
    h, w = a.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return a[top : top + side, left : left + side]


def _nchw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)


# Larger and smaller than 299, square and not (cropped along either side).
RESIZE_IMAGES = [(400, 340), (41, 57), (299, 299), (64, 64)]


def test_fid_resize_pil_bicubic_8bit_is_the_default_and_unchanged():
    images = [_noise(w, h, i) for i, (w, h) in enumerate(RESIZE_IMAGES)]
    want = np.stack([np.asarray(Image.fromarray(_crop(im)).resize((299, 299), Image.BICUBIC)) for im in images])
    want = _nchw(want.astype(np.float32)) / 127.5 - 1
    for got in (fid.to_tensor(images, 299), fid.to_tensor(images, 299, "pil-bicubic-8bit")):
        assert got.shape == (4, 3, 299, 299) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert fid.DEFAULT_FID_RESIZE == "pil-bicubic-8bit"
    # Its recorded preparation is the text of versions before the choice: their statistics stay valid.
    assert fid.PREPROCESS["inception"] == "centre square, PIL bicubic to 299x299 on 8-bit RGB, [-1, 1]"
    assert fid.preprocess_text("inception") == fid.PREPROCESS["inception"]


def test_fid_resize_clean_is_pil_bicubic_on_float_channels_unrounded():
    images = [_noise(w, h, 10 + i) for i, (w, h) in enumerate(RESIZE_IMAGES)]
    want = []
    for im in images:
        square = _crop(im).astype(np.float32)
        side = square.shape[0]
        channels = []
        for c in range(3):
            plane = Image.frombytes("F", (side, side), np.ascontiguousarray(square[:, :, c]).tobytes())
            channels.append(np.asarray(plane.resize((299, 299), resample=Image.BICUBIC)).clip(0, 255))
        want.append(np.stack(channels, axis=-1))
    want = (_nchw(np.stack(want)) - 128) / 128  # clean-fid's InceptionV3W scales so (the TF graph's), not x/127.5-1
    got = fid.to_tensor(images, 299, "clean")
    assert got.shape == (4, 3, 299, 299) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    pixels = got[:2] * 128 + 128  # the resized ones: not rounded back to 8 bits, and clipped
    assert (pixels - pixels.round()).abs().max() > 0.1
    assert pixels.min() >= -1e-4 and pixels.max() <= 255 + 1e-4


def test_fid_resize_pytorch_fid_is_torch_bilinear_on_unit_floats():
    images = [_noise(w, h, 20 + i) for i, (w, h) in enumerate(RESIZE_IMAGES)]
    want = []
    for im in images:
        x = torch.from_numpy(_crop(im).copy()).permute(2, 0, 1)[None].float() / 255  # torchvision's to_tensor
        want.append(torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
    want = 2 * torch.cat(want) - 1  # pytorch-fid's normalize_input
    got = fid.to_tensor(images, 299, "pytorch-fid")
    assert got.shape == (4, 3, 299, 299) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # What the FID Inception does itself to input of another size: the same bilinear resize.
    from nitrofusion.evaluation.inception import FIDInceptionV3

    seen = []
    net = FIDInceptionV3().eval()
    net.Conv2d_1a_3x3.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        net(_nchw(_crop(images[3])[None].astype(np.float32)) / 127.5 - 1)  # 64x64, resized inside
    torch.testing.assert_close(seen[0], got[3:], rtol=0, atol=1e-5)


def test_fid_resize_modes_give_different_tensors():
    """On a non-smooth image each mode leaves its own trace: the option changes what the network reads."""
    images = [_noise(173, 150, 30)]
    got = {mode: fid.to_tensor(images, 299, mode) for mode in fid.FID_RESIZES}
    assert set(got) == {"pil-bicubic-8bit", "clean", "pytorch-fid"}
    modes = list(got)
    for i, a in enumerate(modes):
        for b in modes[i + 1 :]:
            assert (got[a] - got[b]).abs().mean() > 1e-3, (a, b)
    with pytest.raises(ValueError, match="resize must be one of"):
        fid.to_tensor(images, 299, "lanczos")


def test_a_reference_cache_of_one_fid_resize_is_not_reused_for_another(tmp_path):
    ref_dir = reference_folder(tmp_path / "real", 4)
    cache = tmp_path / "reference-inception.safetensors"
    fid.reference_stats(ref_dir, "inception", toy_features, cache, extractor="sha256:a", resize="clean")
    assert fid.stats_metadata(cache)["preprocess"] == fid.INCEPTION_PREPROCESS["clean"]
    assert fid.cached_reference_stats(cache, ref_dir, "inception", "sha256:a", "clean") is not None
    assert fid.cached_reference_stats(cache, ref_dir, "inception", "sha256:a", "pytorch-fid") is None
    assert fid.cached_reference_stats(cache, ref_dir, "inception", "sha256:a") is None  # the default
    assert len(set(fid.INCEPTION_PREPROCESS.values())) == len(fid.FID_RESIZES)
    # As a --reference stats file: refused for another mode, naming the one it was made with.
    fid.reference_stats(cache, "inception", toy_features, extractor="sha256:a", resize="clean")
    for other in ("pytorch-fid", "pil-bicubic-8bit"):
        with pytest.raises(UserError, match="pass --fid-resize clean to use it") as err:
            fid.reference_stats(cache, "inception", toy_features, extractor="sha256:a", resize=other)
        assert "\n" not in str(err.value)
    # A file of a version that recorded no preparation was made with the default resize.
    old = tmp_path / "old.safetensors"
    meta = {k: v for k, v in fid.stats_metadata(cache).items() if k != "preprocess"}
    stats = fid.GaussianStats.from_features(torch.rand(4, 6))
    save_file({k: v.contiguous() for k, v in stats.to_tensors().items()}, str(old), metadata=meta)
    fid.reference_stats(old, "inception", toy_features, extractor="sha256:a")
    with pytest.raises(UserError, match="pass --fid-resize pil-bicubic-8bit"):
        fid.reference_stats(old, "inception", toy_features, extractor="sha256:a", resize="clean")


class _StandInInception(torch.nn.Module):
    """In place of the FID Inception (whose own tests are in test_inception.py): it keeps what it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1) * self.scale


def test_fid_resize_flows_from_the_command_line_to_the_network_and_the_results(tmp_path, capsys, monkeypatch):
    import nitrofusion.evaluation.inception as inception

    ref_dir = tmp_path / "real"
    ref_dir.mkdir()
    for i, (w, h) in enumerate([(40, 30), (33, 33), (20, 26), (50, 50)]):
        _noise(w, h, 40 + i).save(ref_dir / f"{i}.png")
    refs = [Image.open(p) for p in sorted(ref_dir.glob("*.png"))]
    weights = tmp_path / "inception.safetensors"
    save_file({"scale": torch.ones(())}, str(weights))
    nets: list[_StandInInception] = []
    monkeypatch.setattr(inception, "load_fid_inception", lambda path: nets.append(_StandInInception()) or nets[-1])
    out = tmp_path / "ev"
    args = ["evaluate", "--steps", "1", "--n", "4", "--batch-size", "4", "--out", str(out), "--metrics", "fid"]
    args += ["--inception", str(weights), "--reference", str(ref_dir)]
    for mode in ("clean", "pytorch-fid", None):
        assert main(args + (["--fid-resize", mode] if mode else [])) == 0, capsys.readouterr().err
        cache = out / f"reference-inception{'-' + mode if mode else ''}.safetensors"  # one file per mode
        mode = mode or "pil-bicubic-8bit"
        # The reference images, read by the network as the mode prepares them: statistics made with
        # the mode before were not reused.
        torch.testing.assert_close(nets[-1].seen[0], fid.to_tensor(refs, 299, mode), rtol=0, atol=0)
        assert fid.stats_metadata(cache)["preprocess"] == fid.INCEPTION_PREPROCESS[mode]
        row = json.loads((out / "results.json").read_text())[0]
        assert (row["fid_features"], row["fid_resize"]) == ("inception", mode)
        assert f"FID: inception features, --fid-resize {mode}" in (out / "results.md").read_text()
    # The same mode again, and an earlier one: the cached statistics are reused (only the generated
    # images are read); switching modes used to overwrite the one file, and compute them all again.
    for again in ([], ["--fid-resize", "clean"]):
        assert main(args + again) == 0
        assert len(nets[-1].seen) == 1 and nets[-1].seen[0].shape[0] == 4


def test_fid_resize_bad_value_is_argparses_one_line(tmp_path, capsys):
    from nitrofusion.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--fid-resize", "lanczos", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "argument --fid-resize: invalid choice: 'lanczos'" in err[-1]
    parser = build_parser()
    assert parser.parse_args(["evaluate"]).fid_resize is None  # None: the default, and refusable for clip
    for mode in fid.FID_RESIZES:  # the command line offers every mode that fid.py knows
        assert parser.parse_args(["evaluate", "--fid-resize", mode]).fid_resize == mode


def _evaluation_dir(path, **row):
    path.mkdir()
    row = {"model": path.name, "sampler": "native", "steps": 1, "n": 4, **row}
    (path / "results.json").write_text(json.dumps([row]))
    images = path / "images" / "native-1-step"
    images.mkdir(parents=True)
    for i in range(4):
        _noise(8, 8, i).save(images / f"{i:05d}.png")
    return path


def test_compare_refuses_fids_of_two_resizes(tmp_path, capsys):
    fid_row = {"fid": 10.0, "fid_features": "inception", "fid_reference": "/data/ref"}
    old = _evaluation_dir(tmp_path / "old", **fid_row)  # before --fid-resize: the default
    default = _evaluation_dir(tmp_path / "default", **fid_row, fid_resize="pil-bicubic-8bit")
    clean = _evaluation_dir(tmp_path / "clean", **fid_row, fid_resize="clean")
    assert main(["compare", str(old), str(default), "--out", str(tmp_path / "a")]) == 0
    assert "FID: inception features, --fid-resize pil-bicubic-8bit" in (tmp_path / "a" / "results.md").read_text()
    capsys.readouterr()
    for first in (old, default):
        assert main(["compare", str(first), str(clean), "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip()
        assert "fid_resize='clean'" in err and "'pil-bicubic-8bit'" in err and len(err.splitlines()) == 1


def test_compare_refuses_scores_of_two_prompt_sets_and_takes_one_folder_however_spelt(tmp_path, capsys):
    """Rows drawn from other prompts (COCO captions and PartiPrompts) were put in one table; the
    same reference folder spelt with a trailing slash was refused as another protocol."""
    coco = {"clip_score": 0.31, "prompt_set": "sha256:aaa", "clip_model": str(tmp_path / "clip")}
    a = _evaluation_dir(tmp_path / "a", **coco)
    b = _evaluation_dir(tmp_path / "b", **{**coco, "clip_model": str(tmp_path / "clip") + "/"})
    parti = _evaluation_dir(tmp_path / "parti", **{**coco, "prompt_set": "sha256:bbb"})
    old = _evaluation_dir(tmp_path / "old", clip_score=0.30, clip_model=str(tmp_path / "clip"))  # records no set
    assert main(["compare", str(a), str(b), str(old), "--out", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(parti), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert "prompt_set='sha256:bbb'" in err and len(err.splitlines()) == 1


def test_evaluate_records_the_prompt_set_whatever_its_n_and_seed(tmp_path):
    from nitrofusion.evaluation.evaluate import prompt_set_identity

    one, other = tmp_path / "one.txt", tmp_path / "other.txt"
    one.write_text("a red bag\na blue shoe\n")
    other.write_text("a red bag\na green shoe\n")
    assert prompt_set_identity("embedded") == "embedded"
    assert prompt_set_identity(str(one)).startswith("sha256:")
    assert prompt_set_identity(str(one)) != prompt_set_identity(str(other))
    (tmp_path / "copy.txt").write_text(one.read_text())
    assert prompt_set_identity(str(tmp_path / "copy.txt")) == prompt_set_identity(str(one))


def test_compare_refuses_scores_of_other_weights_at_one_path(tmp_path, capsys):
    """Rows recorded the metric networks' paths only: an evaluator (or CLIP, aesthetic predictor,
    ImageReward) replaced at the same path scored into the same table. They record its contents now."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from nitrofusion.world.spec import evaluator_path

    evaluator = tmp_path / "evaluator.safetensors"
    shutil.copy(evaluator_path(), evaluator)
    args = ["evaluate", "--steps", "1", "--n", "4", "--evaluator", str(evaluator)]
    assert main([*args, "--out", str(tmp_path / "before")]) == 0
    row = json.loads((tmp_path / "before" / "results.json").read_text())[0]
    assert row["evaluator_weights"] == fid.weights_identity(evaluator_path())
    # The evaluator retrained, at the same path: another classifier, other numbers.
    with safe_open(str(evaluator), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(evaluator))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(evaluator), metadata=metadata)
    assert main([*args, "--out", str(tmp_path / "after")]) == 0
    # The shipped evaluator at its own path is the copy's contents: one protocol.
    assert main(["evaluate", "--steps", "1", "--n", "4", "--out", str(tmp_path / "shipped")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "before"), str(tmp_path / "shipped"), "--out", str(tmp_path / "ok")]) == 0
    assert main(["compare", str(tmp_path / "before"), str(tmp_path / "after"), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert "evaluator_weights=" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("n", "abc", "'n' is 'abc'"),
        ("n", 0, "'n' is 0"),
        ("n", True, "'n' is True"),
        ("steps", 1.5, "'steps' is 1.5"),
        ("sampler", None, "'sampler' is None"),
        ("clip_score", "0.3", "'clip_score' is '0.3'"),
        ("fid", [1.0], "'fid' is [1.0]"),
    ],
)
def test_compare_refuses_a_row_with_a_field_of_the_wrong_type(tmp_path, capsys, field, value, needle):
    """A hand-edited or foreign results.json: a traceback (TypeError, IndexError), the n=0 one after
    results.json and results.md were written without grid.png."""
    good = _evaluation_dir(tmp_path / "good", clip_score=0.3)
    bad = _evaluation_dir(tmp_path / "bad", **{"clip_score": 0.3, field: value})
    for dirs in ([bad], [good, bad]):
        code = main(["compare", *map(str, dirs), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert str(bad / "results.json") in err and needle in err
        assert not (tmp_path / "out").exists()


def test_compare_leaves_a_null_score_blank(tmp_path, capsys):
    """None is a blank cell by compare's own check, and then a TypeError in the CLIP scale's."""
    good = _evaluation_dir(tmp_path / "good", clip_score=0.3)
    blank = _evaluation_dir(tmp_path / "blank", clip_score=None)
    assert main(["compare", str(good), str(blank), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "results.md").is_file()


def test_compare_refuses_an_out_that_is_one_of_its_inputs(tmp_path, capsys):
    a, b = _evaluation_dir(tmp_path / "a"), _evaluation_dir(tmp_path / "b")
    before = {p: p.read_bytes() for p in a.rglob("*") if p.is_file()}
    (tmp_path / "link").symlink_to(a)
    for out in (a, tmp_path / "b" / ".." / "a", tmp_path / "link", f"{a}/"):
        assert main(["compare", str(a), str(b), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "is one of the directories compared" in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in a.rglob("*") if p.is_file()} == before
    assert not (a / "grid.png").exists()
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "both")]) == 0


def _mixed_reference(path):
    """32x32 RGB, 64x48 RGB and 32x32 greyscale images, as a folder of real ones may hold."""
    path.mkdir()
    for i in range(6):
        im = _noise(*((32, 32), (64, 48), (32, 32))[i % 3], seed=i)
        (im.convert("L") if i % 3 == 2 else im).save(path / f"{i}.png")
    return path


def test_embedded_features_of_reference_images_of_mixed_sizes(tmp_path):
    """A reference folder of mixed sizes: `ValueError: all input arrays must have the same shape`.
    Each image is prepared as the evaluator prepares its input (resized to 32x32), and gets the
    features it has among images of its own size; images already 32x32 are unchanged."""
    from nitrofusion.world.evaluator import Evaluator
    from nitrofusion.world.spec import evaluator_path

    ev = Evaluator.load(evaluator_path())
    extract = fid.embedded_extractor(ev)
    ref = _mixed_reference(tmp_path / "ref")
    images = [Image.open(p).convert("RGB") for p in fid.list_images(ref)]
    feats = extract(images)
    assert feats.shape == (6, 128)
    for size in ((32, 32), (64, 48)):
        idx = [i for i, im in enumerate(images) if im.size == size]
        alone = extract([images[i] for i in idx])
        torch.testing.assert_close(feats[idx], alone, rtol=1e-5, atol=1e-5)
    # The generated images' path: one size, one batch, the features of before, bit for bit.
    square = [im for im in images if im.size == (32, 32)]
    assert torch.equal(extract(square), ev.features_and_logits(fid.to_tensor(square))[0])
    # 64x48 images get the features of the same images resized to 32x32 as the evaluator does.
    wide = [im for im in images if im.size == (64, 48)]
    x = torch.nn.functional.interpolate(
        fid.to_tensor(wide).mean(1, keepdim=True), size=(32, 32), mode="bilinear", antialias=True
    )
    torch.testing.assert_close(extract(wide), ev.model.embed(x), rtol=1e-5, atol=1e-5)
    stats = fid.reference_stats(ref, "embedded", extract)
    assert stats.mu.shape == (128,)


def test_a_model_rewritten_at_the_same_path_is_not_served_from_its_old_images(tmp_path, capsys):
    """The cache recorded the model's path only: a student retrained or a world rebuilt into the
    same folder was scored from the old model's images (the --unet file was recorded, the folder not)."""
    import os
    import shutil

    from nitrofusion.world.spec import teacher_path

    model = tmp_path / "teacher"
    shutil.copytree(teacher_path(), model)
    out = tmp_path / "ev"
    args = ["evaluate", "--model", str(model), "--steps", "1", "--n", "4", "--batch-size", "4", "--out", str(out)]
    assert main(args) == 0
    manifest = out / "images" / "native-1-step" / "manifest.json"
    recorded = json.loads(manifest.read_text())["settings"]["model_files"]
    assert list(recorded) == ["unet/diffusion_pytorch_model.safetensors"]
    (weights,) = (model / "unet").glob("*.safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # written again
    capsys.readouterr()
    assert main(args) == 2
    assert "other settings (model_files)" in capsys.readouterr().err
    # A cache made before the files were recorded is compared without them, not refused
    state = json.loads(manifest.read_text())
    del state["settings"]["model_files"]
    manifest.write_text(json.dumps(state))
    assert main(args) == 0


def test_step_counts_the_model_cannot_sample_are_said_before_the_reference_features(tmp_path, capsys):
    """A reference folder's features were computed and written before the pipeline was loaded, so
    `--steps` the model refuses (here 3 at --shift 3: the timesteps repeat) were said after them;
    a folder with no images is still said first, before the model loads."""
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(4):
        Image.new("L", (28, 28), 40 * i).save(refs / f"{i}.png")
    out = tmp_path / "out"
    args = ["evaluate", "--model", "embedded", "--metrics", "fid", "--fid-features", "embedded", "--n", "4"]
    assert main([*args, "--reference", str(refs), "--steps", "3", "--shift", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--shift 3 is too small for 3 steps" in err and len(err.splitlines()) == 1
    assert not out.exists()
    (empty := tmp_path / "empty").mkdir()
    assert main([*args, "--reference", str(empty), "--out", str(out)]) == 2
    assert "holds 0 images" in capsys.readouterr().err
    # Accepted, the features are computed once the model is, and scored against.
    assert main([*args, "--reference", str(refs), "--steps", "1", "--out", str(out)]) == 0
    assert (out / "reference-embedded.safetensors").is_file()
    assert json.loads((out / "results.json").read_text())[0]["fid"] > 0


def test_a_damaged_image_is_named_and_a_refused_run_leaves_no_folder(tmp_path, capsys):
    """PIL's message for a truncated file names no file: among thousands of COCO images the user
    could not tell which one; and the refused run had made its --out already."""
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(4):
        Image.new("RGB", (28, 28), (40 * i, 0, 0)).save(refs / f"{i}.jpg")
    whole = (refs / "2.jpg").read_bytes()
    (refs / "2.jpg").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    args = ["evaluate", "--model", "embedded", "--metrics", "fid", "--fid-features", "embedded", "--n", "4"]
    assert main([*args, "--reference", str(refs), "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"error: cannot read reference image '{refs / '2.jpg'}'" in err.splitlines()[-1], err  # after a warning
    assert not out.exists()
    # A cached image damaged after it was written: named, with what to do.
    (refs / "2.jpg").write_bytes(whole)
    assert main([*args, "--reference", str(refs), "--steps", "1", "--out", str(out)]) == 0
    cached = next((out / "images").glob("*/00001.png"))
    cached.write_bytes(cached.read_bytes()[:60])
    assert main([*args, "--reference", str(refs), "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"error: cannot read cached image '{cached}'" in err.splitlines()[-1] and "delete it" in err
    cached.unlink()
    assert main([*args, "--reference", str(refs), "--steps", "1", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())[0]["prompt_set"] == "embedded"  # compare's protocol


def test_a_missing_model_is_said_before_the_reference_features_are_computed(tmp_path, capsys):
    """They were computed and written first (minutes for a COCO reference on a CPU), then the run
    was refused for its --model."""
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(4):
        Image.new("L", (28, 28), 40 * i).save(refs / f"{i}.png")
    out = tmp_path / "out"
    args = ["evaluate", "--model", str(tmp_path / "nope"), "--metrics", "fid", "--fid-features", "embedded"]
    assert main([*args, "--reference", str(refs), "--n", "4", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert not out.exists()
