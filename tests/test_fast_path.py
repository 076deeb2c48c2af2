"""The sampling fast path: same images as diffusers' own PIL output; a no-op on CPU; smoke runs
of the GPU benchmarks' code on the tiny pipeline (their figures need a GPU: docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nitrofusion.pipelines import generate, load_pipeline
from nitrofusion.pipelines.fast import FastSampler, GraphedFunction, compile_pipeline, fast_sampler
from nitrofusion.pipelines.generation import to_pil

ROOT = Path(__file__).resolve().parents[1]


def test_to_pil_matches_diffusers_pil_output(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=1, guidance_scale=0.0)
    stock = pipe(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    ours = to_pil(
        pipe(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt").images
    )
    for a, b in zip(stock, ours):
        assert a.mode == b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    images = generate(pipe, ["a cat", "a dog"], steps=1, batch_size=2, progress=False)
    assert np.array_equal(np.asarray(images[0].image), np.asarray(stock[0]))


LONG_PROMPT = "a dog on a long road, " * 30  # past CLIP's 77 tokens: both paths must truncate alike


def _pipeline_images(pipe, prompts, steps):
    """The stock pipeline's PIL images as one uint8 (B, H, W, 3) tensor: what FastSampler returns."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    kwargs = dict(num_inference_steps=steps, guidance_scale=0.0, generator=generators, output_type="pil")
    images = pipe(prompt=prompts, height=32, width=32, **kwargs).images
    return torch.from_numpy(np.stack([np.asarray(image) for image in images]))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_fast_sampler_gives_the_pipelines_images(tiny_sdxl_dir, steps):
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    prompts = ["a cat", LONG_PROMPT]
    with torch.inference_mode():
        ours = FastSampler(pipe)(prompts, steps, [torch.Generator().manual_seed(i) for i in range(2)], 32, 32)
        stock = _pipeline_images(pipe, prompts, steps)
    assert ours.shape == stock.shape == (2, 32, 32, 3) and ours.dtype == torch.uint8 and torch.equal(ours, stock)
    assert fast_sampler(pipe) is fast_sampler(pipe)  # made once, kept on the pipeline


def test_fast_sampler_says_what_a_long_prompt_lost(tiny_sdxl_dir, caplog):
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    with caplog.at_level("WARNING", logger="nitrofusion.pipelines.fast"):
        FastSampler(pipe).tokenize(["a cat", LONG_PROMPT + "purple giraffe"], torch.device("cpu"))
    (record,) = caplog.records
    message = record.getMessage()
    assert "'a dog on a long road" in message and "truncated to 77 tokens" in message and "purple giraffe" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="nitrofusion.pipelines.fast"):
        FastSampler(pipe).tokenize(["a cat"], torch.device("cpu"))
    assert not caplog.records
    # A pasted page (the app renders at every keystroke) is said in a few hundred characters, not whole.
    with caplog.at_level("WARNING", logger="nitrofusion.pipelines.fast"):
        FastSampler(pipe).tokenize([LONG_PROMPT + " zebra" * 2000], torch.device("cpu"))
    (record,) = caplog.records
    assert len(record.getMessage()) < 400 and "tokens)" in record.getMessage()


def test_fast_sampler_decodes_an_fp16_vae_in_fp32_like_the_pipeline(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu", dtype="fp16")
    pipe.vae.register_to_config(force_upcast=True)  # SDXL's VAE overflows in fp16
    sampler = FastSampler(pipe)
    assert sampler.vae is not pipe.vae and sampler.vae.dtype == torch.float32
    with torch.inference_mode():
        ours = sampler(["a cat"], 2, [torch.Generator().manual_seed(0)], 32, 32)
        stock = _pipeline_images(pipe, ["a cat"], 2)
    assert pipe.vae.dtype == torch.float16  # the pipeline cast its VAE back; ours was never moved
    assert torch.equal(ours, stock)


def test_fast_sampler_applies_only_where_it_matches_the_pipeline(tiny_sdxl_dir, tiny_sd15_dir):
    assert fast_sampler(load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")) is not None
    assert fast_sampler(load_pipeline(tiny_sdxl_dir, sampler="native", device="cpu")) is None
    assert fast_sampler(load_pipeline(tiny_sd15_dir, sampler="shift-lcm", device="cpu")) is None
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    pipe.vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    assert fast_sampler(pipe) is None
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    pipe.unet.register_to_config(time_cond_proj_dim=256)  # LCM-style guidance embedding: timestep_cond
    assert fast_sampler(pipe) is None
    # Offload hooks (enable_model_cpu_offload) move modules per call: its latents would stay behind.
    from accelerate.hooks import ModelHook, add_hook_to_module

    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    add_hook_to_module(pipe.unet, ModelHook())
    assert fast_sampler(pipe) is None


def _refuse_capture(monkeypatch):
    """GraphedFunction on a CPU machine: warm-up runs the function plainly, capture fails as a
    function that syncs with the host would."""
    calls = []

    def warm_up(self, static_in):
        calls.append("warm-up")
        self.fn(*static_in)

    def record(self, static_in):
        calls.append("capture")
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedFunction, "_warm_up", warm_up)
    monkeypatch.setattr(GraphedFunction, "_record", record)
    return calls


def test_whole_sample_falls_back_per_shape_when_capture_fails(tiny_sdxl_dir, monkeypatch):
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    calls = _refuse_capture(monkeypatch)
    graphed = FastSampler(pipe, graph=True)
    with torch.inference_mode(), pytest.warns(UserWarning, match="sample not captured"):
        got = graphed(["a cat"], 2, [torch.Generator().manual_seed(0)], 32, 32)
    with torch.inference_mode():
        want = _pipeline_images(pipe, ["a cat"], 2)
        again = graphed(["a cat"], 2, [torch.Generator().manual_seed(0)], 32, 32)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert calls == ["warm-up", "capture"]  # a failed shape is not tried again
    with torch.inference_mode(), pytest.warns(UserWarning, match="sample not captured"):
        graphed(["a cat"], 1, [torch.Generator().manual_seed(0)], 32, 32)  # a new shape is
    assert calls == ["warm-up", "capture"] * 2

    def broken(*args):
        raise RuntimeError("a bug in the function itself")

    graphed.sample.fn = broken  # an error in warm-up is the function's own: raised, not hidden
    with torch.inference_mode(), pytest.raises(RuntimeError, match="a bug"):
        graphed(["a cat"], 4, [torch.Generator().manual_seed(0)], 32, 32)


def test_a_changed_pipeline_drops_its_graphs(tiny_sdxl_dir, monkeypatch):
    """Graphs replay the schedule and weight addresses they were captured with: a new scheduler
    setting or weights moved elsewhere must start afresh, not replay stale ones."""
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    _refuse_capture(monkeypatch)
    sampler = FastSampler(pipe, graph=True)
    with torch.inference_mode(), pytest.warns(UserWarning):
        sampler(["a cat"], 1, [torch.Generator().manual_seed(0)], 32, 32)
    assert len(sampler.sample.graphs) == 1
    with torch.inference_mode():
        sampler(["a cat"], 1, [torch.Generator().manual_seed(0)], 32, 32)
    assert len(sampler.sample.graphs) == 1  # nothing changed: kept
    pipe.scheduler.register_to_config(shifted_timestep=500)
    with torch.inference_mode(), pytest.warns(UserWarning):
        sampler(["a cat"], 1, [torch.Generator().manual_seed(0)], 32, 32)
    assert len(sampler.sample.graphs) == 1 and sampler._made_for == sampler._pipeline_state()
    pipe.unet.to(torch.float64)  # new weight storage
    assert sampler._pipeline_state() != sampler._made_for


def test_lora_adapters_loaded_after_qkv_fusion_apply(tiny_sdxl_dir):
    """--compile fuses q/k/v into one copied projection; LoRA adapters loaded afterwards sit on
    to_q/k/v, which the fused attention never calls: the image ignored them. The sampler sees the
    adapters arrive and unfuses, so the images are the stock pipeline's with the LoRA."""
    from peft import LoraConfig

    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    pipe.unet.fuse_qkv_projections()  # as compile_pipeline does on CUDA
    sampler = FastSampler(pipe)
    seed = [torch.Generator().manual_seed(0)]
    with torch.inference_mode():
        before = sampler(["a cat"], 1, seed, 32, 32)
    never_fused = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    for p in (pipe, never_fused):  # the same adapter weights on both
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
        p.unet.add_adapter(config)
    with torch.inference_mode(), pytest.warns(UserWarning, match="unfused"):
        after = sampler(["a cat"], 1, [torch.Generator().manual_seed(0)], 32, 32)
    with torch.inference_mode():
        expected = _pipeline_images(never_fused, ["a cat"], 1)
    assert not torch.equal(before, after) and torch.equal(after, expected)


def test_vae_tiling_switched_on_after_first_use_is_followed(tiny_sdxl_dir):
    """The fp32 VAE copy and the graphs were made once: tiling or slicing switched on later was
    ignored (other pixels than the stock pipeline's, and the memory it was meant to save)."""
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu", dtype="fp16")
    pipe.vae.register_to_config(force_upcast=True)  # as SDXL's VAE (which overflows in fp16)
    sampler = FastSampler(pipe)
    assert pipe.vae.config.force_upcast and sampler._vae_fp32 is not None  # the standing fp32 copy
    with torch.inference_mode():
        before = sampler(["a cat"], 1, [torch.Generator().manual_seed(0)], 32, 32)
    made_for = sampler._made_for
    pipe.vae.enable_tiling()
    latent = 32 // pipe.vae_scale_factor
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 16, latent // 2  # tiles smaller than the image
    with torch.inference_mode():
        after = sampler(["a cat"], 1, [torch.Generator().manual_seed(0)], 32, 32)
        expected = _pipeline_images(pipe, ["a cat"], 1)
    assert sampler.vae.use_tiling and sampler.vae.tile_latent_min_size == latent // 2
    assert not torch.equal(after, before) and torch.equal(after, expected)  # decoded in tiles, as stock does
    pipe.vae.disable_tiling()
    pipe.vae.enable_slicing()
    assert sampler._pipeline_state() != made_for


def test_a_compiled_sampler_fills_a_short_last_batch(tiny_sdxl_dir, monkeypatch):
    """Compiled, a new batch size costs minutes: 3 prompts in batches of 2 run as two batches of 2
    (one shape), and the images are those of the plain path, the filler's dropped."""
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    prompts = ["a cat", "a dog", "a red house"]
    want = generate(pipe, prompts, steps=1, batch_size=2, progress=False)
    _refuse_capture(monkeypatch)
    pipe.nitro_fast = FastSampler(pipe, graph=True)
    with pytest.warns(UserWarning, match="sample not captured"):
        got = generate(pipe, prompts, steps=1, batch_size=2, progress=False)
    assert [key[0][0][0] for key in pipe.nitro_fast.sample.graphs] == [2]  # the ids' batch: one shape
    assert [r.seed for r in got] == [0, 1, 2] and [r.prompt for r in got] == prompts
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(got, want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_function_replays_like_the_plain_function():
    """Two shapes sharing one pool, replayed A, B, A: each equals the plain call on its inputs."""
    weight = torch.randn(64, 64, device="cuda")

    def fn(x):
        return (torch.relu(x @ weight).sum(-1), x * 2)

    graphed = GraphedFunction(fn)
    a, b = torch.randn(8, 64, device="cuda"), torch.randn(3, 64, device="cuda")
    outs = [graphed(x) for x in (a, b, a)]
    for x, got in zip((a, b, a), outs):
        assert all(torch.equal(g, w) for g, w in zip(got, fn(x)))
    assert len(graphed.graphs) == 2 and all(v is not None for v in graphed.graphs.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graphed_function_on_a_second_gpu_captures_there():
    """With cuda:0 current, a function of cuda:1 tensors was captured on a cuda:0 stream: an empty
    graph (the kernels ran eagerly), whose every replay returned the capture's outputs."""
    weight = torch.randn(16, 16, device="cuda:1")
    graphed = GraphedFunction(lambda x: (x @ weight,))
    a, b = torch.randn(4, 16, device="cuda:1"), torch.randn(4, 16, device="cuda:1")
    assert torch.cuda.current_device() == 0
    for x in (a, b, a):
        assert torch.equal(graphed(x)[0], x @ weight)
    assert all(entry is not None for entry in graphed.graphs.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_function_that_cannot_be_captured_runs_plainly_on_the_callers_stream():
    """A function that waits for the host (here `.item()`) cannot be captured: it runs plainly,
    with a warning, and the caller's stream is current again (torch.cuda.graph restores it only
    when the capture ends well)."""

    def fn(x):
        return (x * float(x.sum().item() > 0),)

    graphed = GraphedFunction(fn, "syncing")
    x = torch.ones(4, device="cuda")
    stream = torch.cuda.current_stream()
    with pytest.warns(UserWarning, match="syncing not captured"):
        out = graphed(x)
    assert torch.cuda.current_stream() == stream
    assert list(graphed.graphs.values()) == [None]
    assert torch.equal(out[0], x) and torch.equal(graphed(x)[0], x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_compiled_pipeline_replays_whole_samples_like_its_modules_called_plainly(tiny_sdxl_dir):
    """The whole path on a GPU, tiny: compile_pipeline, one graph per sample (pixels quantised
    inside it, copied out through pinned memory); prompts A, B, A give A twice and B apart, and
    each equals the same compiled modules called without capture."""
    pipe = compile_pipeline(load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cuda"))
    sampler = pipe.nitro_fast
    assert sampler.captured
    plain = FastSampler(pipe)
    plain._vae_fp32 = sampler._vae_fp32

    def sample(which, prompt):
        with torch.inference_mode():
            return which([prompt], 2, [torch.Generator("cuda").manual_seed(0)], 32, 32)

    a, b, again = (sample(sampler, p) for p in ("a cat", "a red house", "a cat"))
    assert a.device.type == "cpu" and a.dtype == torch.uint8 and a.is_pinned()
    assert torch.equal(a, again) and not torch.equal(a, b)
    assert torch.equal(a, sample(plain, "a cat")) and torch.equal(b, sample(plain, "a red house"))
    assert all(entry is not None for entry in sampler.sample.graphs.values())  # captured, not fallen back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_compiled_pipeline_with_a_multistep_scheduler_samples_as_its_eager_self(tiny_sd15_dir):
    """SD1.5's PNDM keeps the UNet's earlier outputs, which a CUDA-graphed UNet overwrites on its
    next call: such a pipeline compiles its UNet without graphs and samples as it does eagerly."""
    from diffusers import PNDMScheduler

    def loaded():
        pipe = load_pipeline(tiny_sd15_dir, sampler="native", device="cuda", dtype="fp32")
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True, steps_offset=1)
        return pipe

    def sample(pipe):  # no CFG: PNDM then keeps the UNet's own outputs (with CFG, their guided combination)
        out = pipe(
            ["a cat"],
            num_inference_steps=8,
            guidance_scale=1.0,
            generator=torch.Generator("cuda").manual_seed(0),
            output_type="np",
        )
        return out.images

    eager = sample(loaded())
    compiled = compile_pipeline(loaded())
    first, second = sample(compiled), sample(compiled)
    # An overwritten output moved this tiny model's pixels by 0.04 (a CPU simulation of the bug).
    assert np.abs(first - eager).max() < 5e-3 and np.abs(second - eager).max() < 5e-3


def test_compile_gives_a_multistep_schedulers_unet_no_cuda_graphs(tiny_sd15_dir, monkeypatch):
    """The choice behind the GPU test above, made where it can run: PNDM gets a UNet compiled
    without graphs, the shift-LCM sampler a graphed one (the pipeline's device is faked as CUDA)."""
    from diffusers import PNDMScheduler

    modes = {}

    def fake_compile(fn, mode=None, **kwargs):
        modes.setdefault(type(getattr(fn, "__self__", fn)).__name__, mode)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    for sampler, want in (("native", None), ("shift-lcm", "reduce-overhead")):
        pipe = load_pipeline(tiny_sd15_dir, sampler=sampler, device="cpu", dtype="fp32")
        if sampler == "native":
            pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
        monkeypatch.setattr(type(pipe), "device", property(lambda self: torch.device("cuda")))
        modes.clear()
        compile_pipeline(pipe)
        monkeypatch.undo()
        monkeypatch.setattr(torch, "compile", fake_compile)
        assert modes["UNet2DConditionModel"] == want, sampler


def test_generate_never_asks_diffusers_for_the_device(tiny_sdxl_dir, monkeypatch):
    """`pipe.device` / `ModelMixin.device` walk every submodule (~4 ms per call at SDXL size, the
    largest host cost of a compiled batch-1 sample on the H100): the fast path reads a parameter."""
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    want = generate(pipe, ["a cat"], steps=1, progress=False)[0].image

    def walked(self):
        raise AssertionError("device looked up through diffusers")

    monkeypatch.setattr(type(pipe), "device", property(walked))
    monkeypatch.setattr(type(pipe.unet), "device", property(walked))
    got = generate(pipe, ["a cat"], steps=1, progress=False)[0].image
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_fast_path_leaves_a_cpu_pipeline_alone(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir, sampler="shift-lcm", device="cpu")
    before = set(pipe.unet.state_dict())
    with pytest.warns(UserWarning, match="--compile applies on CUDA only"):  # said, not silently ignored
        assert compile_pipeline(pipe) is pipe
    assert set(pipe.unet.state_dict()) == before and not isinstance(pipe.unet, torch._dynamo.OptimizedModule)


def test_inference_benchmark_runs_on_the_tiny_pipeline(tmp_path):
    out = tmp_path / "inference.json"
    cmd = [sys.executable, "benchmarks/sdxl_inference.py", "--tiny", "--device", "cpu", "--dtype", "fp32"]
    cmd += ["--no-compile", "--batches", "1", "--steps", "1", "2", "--warmup", "1", "--repeat", "1", "--out", str(out)]
    subprocess.run([*cmd, "--breakdown"], cwd=ROOT, check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert {r["setting"] for r in rows} == {"stock", "no SDPA (classic attention)", "nitrofusion"}
    assert not [r for r in rows if r["what"] == "error"]
    timed = [r for r in rows if r["what"] != "stages"]
    assert timed and all(r["median_ms"] > 0 for r in timed)
    # The stage breakdown: every stage of both pipelines was timed, and the parts add up to the call.
    stages = [r for r in rows if r["what"] == "stages"]
    assert len(stages) == len([r for r in rows if r["what"] == "end to end"])
    for r in stages:
        assert {"text encoding", "UNet", "VAE decode", "images", "other"} <= set(r["stages_ms"])
        assert all(v > 0 for k, v in r["stages_ms"].items() if k != "other")
        # "other" is the call less the timed stages: negative if a stage were timed twice (nested).
        assert r["stages_ms"]["other"] >= 0


def training_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sdxl_training", ROOT / "benchmarks" / "sdxl_training.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def run_training_benchmark(monkeypatch, args: list[str]) -> None:
    """benchmarks/sdxl_training.py with `args`, its worker processes run in this one: the same
    command lines through the script's main, without importing torch and diffusers again for each
    (~8 s a process). `run_worker`'s own process is tested below."""
    import contextlib
    import io

    bench = training_benchmark()

    def run_worker(worker_args: list[str], timeout: float) -> dict:
        printed = io.StringIO()
        with monkeypatch.context() as m, contextlib.redirect_stdout(printed):
            m.setattr(sys, "argv", [bench.__file__, *worker_args])
            bench.main()
        (line,) = [line for line in printed.getvalue().splitlines() if line.startswith("RESULT ")]
        return json.loads(line[len("RESULT ") :])

    monkeypatch.setattr(bench, "run_worker", run_worker)
    monkeypatch.setattr(sys, "argv", [bench.__file__, *args])
    bench.main()


def test_a_training_benchmark_worker_runs_as_a_process_and_says_how_it_failed():
    bench = training_benchmark()
    assert bench.run_worker(["--worker", "--arch", "flux"], timeout=120)["error"].startswith("exit 2: ")


def test_training_benchmark_runs_on_the_tiny_pipeline(tmp_path, monkeypatch, bf16_accelerator):
    """One row that takes two features at once: 8-bit moments and the teacher offloaded. The other
    rows' overrides are checked below."""
    out = tmp_path / "training.json"
    args = ["--tiny", "--device", "cpu", "--batch", "1", "--warmup", "0", "--steps", "2"]
    run_training_benchmark(monkeypatch, [*args, "--settings", "8bit-offload", "--out", str(out)])  # 2 steps: a refresh
    (row,) = json.loads(out.read_text())["rows"]
    assert row["setting"] == "8bit-offload" and "error" not in row and row["s_per_iteration"] > 0
    assert row["validation_s"] > 0 and "validation_error" not in row
    # The student's 8-bit moments against fp32 AdamW's two 4-byte moments a parameter: a third or
    # less (the tiny UNet's many small tensors keep fp32 moments; at SDXL size it is about a quarter).
    assert 0 < row["student_optimizer_gib"] < 0.35 * 8 * row["trainable_params"] / 2**30
    assert row["ema_update_s"] > 0  # the preset's EMA
    # Offloaded: the text encoders, the VAE and the UNet's decoder, more than half the teacher.
    assert row["teacher_in_host_memory_gib"] > 0.5 * row["teacher_gib"]


def test_every_training_benchmark_setting_is_a_valid_config():
    """The GPU rows the test above does not run: their overrides still name real keys and values."""
    from nitrofusion.training.config import load_config

    bench = training_benchmark()
    one = ["optim.grad_accumulation=1"]  # the benchmark's base: one micro-batch per iteration
    preset = load_config("sdxl", None, one)
    for name, (_, overrides) in bench.SETTINGS.items():
        cfg = load_config("sdxl", None, [*one, *overrides])
        assert (cfg != preset) == bool(overrides), name


def test_the_training_benchmark_runs_the_sd3_preset_on_the_tiny_sd3(tmp_path, monkeypatch, bf16_accelerator):
    """--arch sd3: the sd3 preset (its teacher offloaded) on a flow transformer (one row; the other
    settings' overrides are the sdxl rows', checked below)."""
    out = tmp_path / "training.json"
    args = ["--arch", "sd3", "--tiny", "--device", "cpu", "--batch", "1", "--warmup", "0", "--steps", "2"]
    run_training_benchmark(monkeypatch, [*args, "--settings", "preset", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {r["setting"]: r for r in report["rows"]}
    assert report["preset"] == "sd3" and report["model"] == "tiny SD3 (tests)" and set(rows) == {"preset"}
    assert all("error" not in r and r["s_per_iteration"] > 0 and r["validation_s"] > 0 for r in rows.values())
    assert rows["preset"]["teacher_in_host_memory_gib"] > 0  # the preset's teacher offload
    assert rows["preset"]["heads"] == 3 * 4 * 1 * 4  # kinds x t* x the tiny SD3's one read block x candidates
