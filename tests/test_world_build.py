"""`nitrofusion train-teacher`, the embedded world's build, cut to a few steps on 256 images:
every stage runs, stock diffusers loads what it writes, and a resumed build goes on bit for bit."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from nitrofusion.cli import main
from nitrofusion.training import checkpoint
from nitrofusion.world.evaluator import Evaluator

ASSETS = Path(__file__).resolve().parents[1] / "nitrofusion" / "world" / "assets"


def build(run, out, samples_per_class=1):
    args = ["train-teacher", "--run-dir", str(run), "--out", str(out), "--checkpoint-every", "1"]
    args += [
        "--train-images",
        "256",
        "--test-images",
        "300",
        "--samples-per-class",
        str(samples_per_class),
        "--stages",
        "unet,flow,classifier",
    ]
    return main([*args, "--vae-steps", "2", "--unet-steps", "3", "--flow-steps", "3", "--classifier-epochs", "1"])


def steps_logged(run, stage):
    return [json.loads(line)["step"] for line in (run / stage / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_build_writes_a_world_stock_diffusers_loads_and_resumes_exactly(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    assert build(run, out) == 0
    printed = capsys.readouterr().out
    assert "evaluator: test accuracy" in printed and "samples.png" in printed

    pipe = StableDiffusionXLPipeline.from_pretrained(out / "teacher", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a photo of a bag", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    flow = StableDiffusion3Pipeline.from_pretrained(
        out / "flow-teacher", text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    flow.set_progress_bar_config(disable=True)
    assert flow("a photo of a bag", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    assert json.loads((out / "flow-teacher" / "nitrofusion.json").read_text()) == {
        "guidance_scale": 5.0,
        "num_inference_steps": 28,
    }
    assert json.loads((out / "teacher" / "nitrofusion.json").read_text()) == {"num_inference_steps": 25}
    for name in ("teacher", "flow-teacher"):  # what the shipped world's folders record too
        assert (out / name / "nitrofusion.json").read_text() == (ASSETS / name / "nitrofusion.json").read_text()
    assert flow.vae.config.shift_factor == 0.0 and flow.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    a, b = pipe.vae.state_dict(), flow.vae.state_dict()  # the two worlds share one VAE
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    Evaluator.load(out / "evaluator.safetensors")
    assert Image.open(run / "samples.png").height > 10 * 32  # a row per class
    assert Image.open(run / "flow-samples.png").height > 10 * 32
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["train_images"] == 256 and 0 <= report["evaluator_test_accuracy"] <= 1
    for stage, steps in (("vae", 2), ("unet", 3), ("flow", 3), ("classifier", 2)):  # 256 images: 2 batches of 128
        assert steps_logged(run, stage) == list(range(1, steps + 1))
        assert (run / stage / "curves.png").is_file()

    # The same build killed after its second teacher step and its first evaluator step: the
    # newest checkpoints are those. Resumed, the remaining steps continue the same random
    # streams: the whole training state (fp32 weights, EMA, optimizer, data stream) and the
    # evaluator are the uninterrupted build's to the bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed / "run")
    shutil.rmtree(resumed / "run" / "unet" / "step-00000003")
    shutil.rmtree(resumed / "run" / "flow" / "step-00000003")
    shutil.rmtree(resumed / "run" / "classifier" / "step-00000002")
    kept = (resumed / "run" / "classifier" / "step-00000001").stat().st_mtime_ns
    assert build(resumed / "run", resumed / "out", samples_per_class=0) == 0  # samples: a third of a build's time
    for stage, last in (("unet", 3), ("flow", 3), ("classifier", 2)):
        a, b = (checkpoint.load(r / stage / f"step-{last:08d}")[0] for r in (run, resumed / "run"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    a, b = (load_file(str(o / "evaluator.safetensors")) for o in (out, resumed / "out"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert steps_logged(resumed / "run", "unet") == steps_logged(resumed / "run", "flow") == [1, 2, 3]
    log = (resumed / "run" / "log.txt").read_text()  # the killed build's lines, then the resumed one's
    for stage in ("unet", "flow"):
        assert log.count(f"{stage} step 1 ") == 1 and log.count(f"{stage} step 3 ") == 2, "the resumed build ran step 3"
    assert (resumed / "run" / "classifier" / "step-00000001").stat().st_mtime_ns == kept, "step 1 ran again"


@pytest.mark.parametrize(
    "option, value",
    [
        ("--vae-steps", "0"),
        ("--flow-steps", "0"),
        ("--checkpoint-every", "0"),
        ("--train-images", "-1"),
        ("--test-images", "-5"),
        ("--stages", "unet,teacher"),
        ("--stages", ","),
        ("--vae", "/nonexistent/vae"),
    ],
)
def test_bad_build_options_are_one_line(tmp_path, capsys, option, value):
    args = ["train-teacher", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), option, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option.lstrip("-") in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_flow_world_built_on_a_trained_vae_keeps_its_latents(tmp_path, capsys):
    """`--stages flow --vae PIPELINE`: no VAE is trained; the flow teacher decodes with the given
    VAE's weights and its recorded scaling factor (the two shipped worlds share their latents)."""
    from nitrofusion.models.builders import build_sdxl_pipeline
    from nitrofusion.world.spec import WORLD_SPEC

    given = build_sdxl_pipeline(WORLD_SPEC, seed=3)
    given.vae.register_to_config(scaling_factor=0.77)
    given.save_pretrained(tmp_path / "given")
    args = ["train-teacher", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--stages", "flow"]
    args += ["--vae", str(tmp_path / "given"), "--train-images", "64", "--test-images", "64", "--flow-steps", "1"]
    assert main([*args, "--samples-per-class", "0"]) == 0
    assert "latent scaling factor 0.770" in capsys.readouterr().out
    assert not (tmp_path / "run" / "vae").exists() and not (tmp_path / "out" / "teacher").exists()
    flow = load_file(str(tmp_path / "out" / "flow-teacher" / "vae" / "diffusion_pytorch_model.safetensors"))
    want = given.vae.state_dict()
    assert flow.keys() == want.keys() and all(torch.equal(flow[k].float(), want[k].half().float()) for k in want)
    config = json.loads((tmp_path / "out" / "flow-teacher" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == 0.77 and config["shift_factor"] == 0.0

    # The run folder resumes only on the same VAE: another one, or a run recorded before --vae
    # existed (it trained its own), is refused in one line.
    given.vae.save_pretrained(tmp_path / "other-vae")
    swap = {str(tmp_path / "given"): str(tmp_path / "other-vae")}
    assert main([*(swap.get(a, a) for a in args), "--samples-per-class", "0"]) == 2
    assert "other settings (vae)" in capsys.readouterr().err
    recorded = tmp_path / "run" / "config.json"
    recorded.write_text(json.dumps({k: v for k, v in json.loads(recorded.read_text()).items() if k != "vae"}))
    assert main([*args, "--samples-per-class", "0"]) == 2
    assert "other settings (vae)" in capsys.readouterr().err

    bad = tmp_path / "bad-vae"  # a VAE of another shape: one line, before any training
    shutil.copytree(tmp_path / "other-vae", bad)
    (bad / "config.json").write_text(
        json.dumps({**json.loads((bad / "config.json").read_text()), "latent_channels": 8})
    )
    swap = {str(tmp_path / "given"): str(bad), str(tmp_path / "run"): str(tmp_path / "run2")}
    assert main([*(swap.get(a, a) for a in args), "--samples-per-class", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vae" in err[0], err


@pytest.mark.parametrize("damage", ["truncated", "not idx"])
def test_a_damaged_dataset_is_one_line_and_binds_the_run_folder_to_nothing(tmp_path, capsys, monkeypatch, damage):
    """A truncated Fashion-MNIST download was an EOFError traceback (another gzip file a reshape
    ValueError), and the failed start had recorded its settings: a rerun in the same --run-dir with
    others was refused, though nothing had been trained under them."""
    import gzip

    from nitrofusion.world import data

    source = data.data_dir()
    broken = tmp_path / "fashion"
    broken.mkdir()
    for f in source.glob("*-ubyte.gz"):
        shutil.copy(f, broken / f.name)
    images = broken / "train-images-idx3-ubyte.gz"
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:5000])
    else:
        with gzip.open(images, "wb") as f:
            f.write(b"this is not an IDX file")
    monkeypatch.setenv(data.ENV_VAR, str(broken))
    capsys.readouterr()
    assert build(tmp_path / "run", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-images-idx3-ubyte.gz" in err[0] and "install it again" in err[0], err
    # The same folder takes other settings (and fails on the data again): nothing was trained under
    # the settings the failed start recorded.
    args = ["train-teacher", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    assert main([*args, "--train-images", "128", "--stages", "unet,classifier"]) == 2
    err = capsys.readouterr().err
    assert "install it again" in err and "other settings" not in err
