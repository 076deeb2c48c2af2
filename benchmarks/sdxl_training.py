"""NitroFusion training at SDXL architecture: peak GPU memory and time per iteration, feature by feature.

The `sdxl` preset (1024², batch 5, 480-head pool, bf16, gradient checkpointing) on SDXL base
1.0's architecture with random weights (memory and speed do not depend on the values), with
gradient accumulation 1 (one micro-batch per iteration; the preset's 20 multiply the time,
not the memory; the `accumulate` row has them, and runs at most 1 + 2 iterations). Teacher
pairs are random latents of the right shape, so only the training iteration is timed; their
1,000 prompts are all different, so nearly every micro-batch meets prompts the conditioning
cache has not, as training on a large prompt set does (with the teacher offloaded, the text
encoders come to the GPU for them). After the timed iterations one
validation (the preset's 10 prompts at 1 to 4 steps, decoded) is timed on its own, with its own
peak: it runs with the training's whole state resident. The teacher is made in a process of its
own and every setting runs in its own process, so each finds the whole GPU free (recorded as
`gpu_free_gib_at_start`) and its peak memory is its own; a setting that does not fit is reported
as out of memory, with where, and one that runs past `--timeout` is killed and reported as such.
Each row also records the allocator's retries (`num_alloc_retries`: it freed its cache to satisfy a
request, the sign of a card nearly full). Results are written (replaced whole) after every setting.

    python benchmarks/sdxl_training.py --out runs/sdxl_training.json          # a CUDA machine
    python benchmarks/sdxl_training.py --tiny --device cpu --steps 2          # the same code, tiny, CPU

`--arch sd3`: the `sd3` preset on SD3-Medium's architecture (2.03 B-parameter transformer, random
weights) instead, without T5 (4.8 B parameters that only encode prompts, in host memory under
the preset's teacher offload; the pipeline fills T5's part of the prompt with zeros), so the
text-encoding cost of prompts the cache has not met is not T5's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NO_EMA = "optim.ema_decay=0"  # the preset keeps an fp32 EMA of the student on the GPU (9.6 GiB at SDXL)
DMD2 = "loss.objective=dmd2"
EIGHT_BIT = "optim.optimizer=adamw8bit"  # 2 bytes of moments a parameter instead of 8 (15 GB less at SDXL)
OFFLOAD = "model.teacher_offload=true"  # training/offload.py
EMA_OFFLOAD = "optim.ema_offload=true"  # the EMA in host memory, averaged on the GPU tensor by tensor (training/ema.py)
SETTINGS = {  # id: (what, overrides of the preset: sdxl, or sd3 with --arch sd3)
    # The head pool: 480 heads at SDXL, 576 at SD3-Medium (each row records its count).
    "preset": ("the preset: bf16, gradient checkpointing, the head pool, fused AdamW, an EMA of the student", []),
    "no-ema": ("without the EMA", [NO_EMA]),
    "static": ("static head set (30 heads)", ["discriminator.pool=false"]),
    # torch's default AdamW kernels on CUDA (foreach): sqrt(v) as large as the parameters at every step.
    "foreach": ("AdamW's foreach kernels instead of the fused one", ["optim.fused=false"]),
    "8bit": ("8-bit AdamW moments for the student (bitsandbytes)", [EIGHT_BIT]),
    # The EMA's copies in and out per student update: per iteration here (accumulation 1), per
    # 20 micro-batches in the preset.
    "ema-offload": ("the EMA of the student in host memory", [EMA_OFFLOAD]),
    # DMD2 trains a second UNet (the fake score) with its own optimizer: two fp32 UNets and their moments.
    "dmd2": ("DMD2 objective (a trained fake score, no head pool)", [DMD2]),
    "dmd2-8bit": ("DMD2 objective, 8-bit AdamW moments for the student and the fake score", [DMD2, EIGHT_BIT]),
    # Text encoders, VAE and the UNet's decoder (never run with pairs made beforehand) in host memory.
    "offload": ("the teacher's text encoders, VAE and UNet decoder in host memory", [OFFLOAD]),
    "8bit-offload": ("8-bit AdamW moments, the teacher offloaded", [EIGHT_BIT, OFFLOAD]),
    "lora": ("LoRA rank 64 (frozen base in bf16), EMA of the adapters", ["model.lora_rank=64"]),
    "lora-offload": ("LoRA rank 64, EMA of the adapters, the teacher offloaded", ["model.lora_rank=64", OFFLOAD]),
    "no-ckpt": ("no gradient checkpointing", ["model.gradient_checkpointing=false"]),
    # The preset's own accumulation: each micro-batch draws its heads, so ~72% of the pool carries
    # gradients (and soon optimizer state) at the step; the other rows show one micro-batch's 6%.
    "accumulate": ("the preset's 20 micro-batches per iteration", ["optim.grad_accumulation=20"]),
    "fp32": ("fp32 (no mixed precision)", ["optim.mixed_precision=no"]),
}


# At most (warm-up, timed) iterations for a setting whose iteration is many micro-batches: with the
# preset's 20, 2 + 6 iterations are 160 micro-batches (about 4 minutes on an H100, past --timeout).
# One warm-up iteration leaves ~72% of the pool's heads with optimizer state, two more ~98%.
MAX_ITERATIONS = {"accumulate": (1, 2)}

PAIRS = 1000  # distinct prompts: the timed micro-batches draw 5 each, so nearly all are new to the cache


def prompts_file(pairs: Path) -> Path:
    return pairs.parent / "prompts.txt"


def make_teacher_and_pairs(root: Path, tiny: bool, device: str, arch: str = "sdxl") -> tuple[Path, Path, int]:
    from safetensors.torch import save_file

    from nitrofusion.data.prompts import load_prompts
    from nitrofusion.data.teacher import PAIR_NOISE_OFFSET, TeacherSampler, pairs_recipe
    from nitrofusion.models import builders
    from nitrofusion.pipelines.generation import denoiser
    from nitrofusion.pipelines.loading import quiet_loading
    from nitrofusion.training.config import load_config

    if tiny:
        pipe = builders.build_sd3_pipeline() if arch == "sd3" else builders.build_sdxl_pipeline(builders.SDXLSpec())
    else:  # made on the GPU (seconds), saved in bf16 (the trainer loads it in fp32 and casts as configured)
        build = builders.build_sd3_medium if arch == "sd3" else builders.build_sdxl_base
        pipe = build(device, torch.bfloat16)
    teacher = root / "teacher"
    with quiet_loading():  # an SD3 without T5 warns that None "cannot be saved"
        pipe.save_pretrained(str(teacher))
    network = denoiser(pipe).config
    size = network.sample_size * pipe.vae_scale_factor
    latent = network.sample_size
    n = PAIRS
    pairs = root / "pairs"
    pairs.mkdir()
    # The run's own prompt list (the worker's data.prompts, a file beside the pairs): a run refuses
    # pairs made from another. PAIRS different prompts, one a pair: the embedded world's 80 repeated
    # would be met again by the conditioning cache after the first 80 draws.
    world = load_prompts("embedded")
    prompts = [f"{world[i % len(world)]}, #{i}" for i in range(PAIRS)]
    prompts_file(pairs).write_text("\n".join(prompts) + "\n")
    assert load_prompts(str(prompts_file(pairs))) == prompts
    (pairs / "prompts.json").write_text(json.dumps(prompts))
    # Recorded as the trainer checks it: made by the preset's teacher settings at this size.
    data = load_config(arch).data
    recipe = pairs_recipe(TeacherSampler(pipe, data.teacher_steps, data.teacher_guidance, size, size), prompts, 0)
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "latents": torch.randn(n, network.in_channels, latent, latent, generator=g),
            "seeds": PAIR_NOISE_OFFSET + torch.arange(n),
            "prompt_ids": torch.arange(n),
        },
        str(pairs / "pairs-00000.safetensors"),
        metadata=recipe,
    )
    return teacher, pairs, size


def worker(args: argparse.Namespace) -> None:
    from nitrofusion.training.config import load_config
    from nitrofusion.training.distill import Distiller
    from nitrofusion.training.optimizers import state_bytes

    overrides = [
        f"model.teacher={args.teacher}",
        f"data.pairs={args.pairs}",
        f"data.prompts={prompts_file(Path(args.pairs))}",
        f"data.resolution={args.size}",
        f"data.batch_size={args.batch}",
        "optim.grad_accumulation=1",
        "loss.pretrain_steps=0",  # the adversarial iterations: the preset's regression warm-up runs no critic
        f"run.output_dir={args.run_dir}",
        "run.validate_every=0",
        *json.loads(args.overrides),
    ]
    cfg = load_config(args.arch, None, overrides)
    cuda = torch.cuda.is_available() and args.device == "cuda"
    result: dict = {}
    peaks = {"outside_student_step": 0, "student_step": 0}  # bytes
    where = {"now": "set-up"}  # for an out-of-memory row: where it ran out
    if cuda:  # what this process found free: the whole card, less its own CUDA context
        free, total = torch.cuda.mem_get_info()
        result.update(gpu_free_gib_at_start=free / 2**30, gpu_total_gib=total / 2**30)
    try:
        t0 = time.perf_counter()
        d = Distiller(cfg, progress=False)
        result["setup_s"] = time.perf_counter() - t0
        if cuda:
            result["after_setup_gib"] = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        result["trainable_params"] = sum(p.numel() for p in d.student.parameters() if p.requires_grad)
        result["heads"] = len(d.pool) if d.pool is not None else 0
        modules = [m for m in d.teacher.components.values() if isinstance(m, torch.nn.Module)]
        tensors = [t for m in modules for t in m.state_dict().values()]
        result["teacher_gib"] = sum(t.numel() * t.element_size() for t in tensors) / 2**30
        result["teacher_in_host_memory_gib"] = d.offload.host_bytes() / 2**30
        if cuda:  # where the peak is: the student's optimizer step, or everything else (forward, backward, critics)
            student_step = d.opt_g.step

            def measured_step(*args, **kwargs):
                peaks["outside_student_step"] = max(peaks["outside_student_step"], torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
                where["now"] = "the student's optimizer step"
                out = student_step(*args, **kwargs)
                where["now"] = "the iteration outside the student's optimizer step"
                peaks["student_step"] = max(peaks["student_step"], torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
                return out

            d.opt_g.step = measured_step
        # The EMA update on its own: what optim.ema_offload's copies cost. On CUDA timed by events,
        # read after the timed iterations, so the measurement adds no wait to the iteration it times.
        ema_seconds: list = []  # seconds, or (start, end) CUDA events
        ema_update = d.ema.update

        def timed_ema_update(model):
            if not cuda:
                t = time.perf_counter()
                ema_update(model)
                ema_seconds.append(time.perf_counter() - t)
                return
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            ema_update(model)
            end.record()
            ema_seconds.append((start, end))

        d.ema.update = timed_ema_update
        where["now"] = "the iteration outside the student's optimizer step"
        for _ in range(args.warmup):
            d.train_step()
            d.step += 1
        if cuda:
            torch.cuda.synchronize()
        ema_seconds.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            d.train_step()
            d.step += 1
        if cuda:
            torch.cuda.synchronize()
        result["s_per_iteration"] = (time.perf_counter() - t0) / args.steps
        if d.ema.decay > 0 and ema_seconds:
            seconds = [e[0].elapsed_time(e[1]) / 1000 if cuda else e for e in ema_seconds]
            result["ema_update_s"] = sum(seconds) / len(seconds)
        result["student_optimizer_gib"] = state_bytes(d.opt_g.optimizer) / 2**30
        critics = [opt for critic in d.critics.values() for opt in critic.optimizers.values()]
        result["critic_optimizers_gib"] = sum(state_bytes(opt) for opt in critics) / 2**30  # heads, fake score
        if cuda:
            peaks["outside_student_step"] = max(peaks["outside_student_step"], torch.cuda.max_memory_allocated())
            result["peak_gib"] = max(peaks.values()) / 2**30
            result.update({f"peak_{k}_gib": v / 2**30 for k, v in peaks.items()})
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            # Host memory pinned for the offloaded parts, as the allocator holds it (packed in
            # power-of-two blocks: training/host_memory.py): what the offload costs on the host side.
            result["pinned_host_gib"] = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) / 2**30
            result["num_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    except torch.OutOfMemoryError:
        result["error"] = f"out of memory in {where['now']}"
        if cuda:
            result["peak_gib"] = max(*peaks.values(), torch.cuda.max_memory_allocated()) / 2**30
            result["num_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.validate:  # the training's state all resident, its gradients freed: a peak of its own
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            d.validate()
            if cuda:
                torch.cuda.synchronize()
            result["validation_s"] = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            result["validation_error"] = "out of memory"
        if cuda:
            result["peak_validation_gib"] = torch.cuda.max_memory_allocated() / 2**30
            retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - result.get("num_alloc_retries", 0)
            result["validation_num_alloc_retries"] = retries
    print("RESULT " + json.dumps(result), flush=True)


def teacher_worker(args: argparse.Namespace) -> None:
    """Makes the teacher and the pairs in a process of its own: the memory it used on the GPU
    (SDXL built in fp32, then cast) goes back to the card when it exits, before any setting runs."""
    teacher, pairs, size = make_teacher_and_pairs(Path(args.root), args.tiny, args.device, args.arch)
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print("RESULT " + json.dumps({"teacher": str(teacher), "pairs": str(pairs), "size": size, "device": device}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), help="settings to run (default: all)")
    p.add_argument("--arch", choices=["sdxl", "sd3"], default="sdxl", help="SDXL base (default) or SD3-Medium")
    p.add_argument("--tiny", action="store_true", help="the tiny test pipeline instead of the full-size one")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip the timed validation")
    p.add_argument("--timeout", type=float, default=240, help="seconds a setting's process may run (default 240)")
    p.add_argument("--out", default="runs/sdxl_training.json")
    # worker-only arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--make-teacher", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.make_teacher:
        return teacher_worker(args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = args.settings or list(SETTINGS)
    # This process never touches the GPU: memory its allocator kept cached would be missing from
    # every setting's card (it was: 13 GiB, before 2026-11-27, when this process built the teacher).
    report = {
        "machine": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": __import__("diffusers").__version__,
            # Read from the installed metadata, not imported: importing bitsandbytes may start CUDA here.
            "transformers": version("transformers"),
            "bitsandbytes": version("bitsandbytes"),
        },
        "model": {
            ("sdxl", True): "tiny SDXL (tests)",
            ("sdxl", False): "SDXL base 1.0 architecture, random weights",
            ("sd3", True): "tiny SD3 (tests)",
            ("sd3", False): "SD3-Medium architecture without T5, random weights",
        }[args.arch, args.tiny],
        "preset": args.arch,
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "pairs": PAIRS,
        "rows": [],
    }
    common = ["--device", args.device, "--batch", str(args.batch), "--arch", args.arch]
    common += ["--tiny"] if args.tiny else []
    with tempfile.TemporaryDirectory() as tmp:
        made = run_worker(["--make-teacher", "--root", tmp, *common], args.timeout)
        if "error" in made:
            raise SystemExit(f"making the teacher failed: {made['error']}")
        report["machine"]["device"], report["size"] = made["device"], made["size"]
        for i, name in enumerate(names):
            what, overrides = SETTINGS[name]
            cap = MAX_ITERATIONS.get(name, (args.warmup, args.steps))
            warmup, steps = min(args.warmup, cap[0]), min(args.steps, cap[1])
            row = run_worker(
                [
                    "--worker",
                    *common,
                    *("--teacher", made["teacher"], "--pairs", made["pairs"], "--size", str(made["size"])),
                    *("--warmup", str(warmup), "--steps", str(steps)),
                    *("--run-dir", str(Path(tmp) / f"run{i}"), "--overrides", json.dumps(overrides)),
                    *([] if args.validate else ["--no-validate"]),
                ],
                args.timeout,
            )
            row = {"setting": name, "what": what, "overrides": overrides, "warmup": warmup, "steps": steps, **row}
            report["rows"].append(row)
            write_json(out, report)
            print(json.dumps(row), flush=True)
    print(f"wrote {out}")


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_json(path: Path, data: dict) -> None:
    """`data` as JSON at `path`, atomically: a run killed mid-write leaves the last whole file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(data, f, indent=1)
    os.chmod(f.name, 0o644)  # a temporary file is made private
    os.replace(f.name, path)


def run_worker(args: list[str], timeout: float) -> dict:
    """This script in a new process with `args`; what it printed after RESULT, or the error. A process
    still running after `timeout` seconds is killed: one hung setting must not take the others' time."""
    try:
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s (killed)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT ") :])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}


if __name__ == "__main__":
    main()
