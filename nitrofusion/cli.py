"""The `nitrofusion` command: a thin argparse layer over the package's functions.

Problems with the user's input (UserError) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

# transformers warns at import time about optional image backends (torchvision) that
# text-to-image sampling never uses; keep the CLI's stderr for our own messages.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from nitrofusion.errors import UserError, check_guidance_scale, is_out_of_memory
from nitrofusion.userfiles import check_writable_folder
from nitrofusion.world.config import DEFAULT_STAGES, WORLD_STAGES

EXIT_USAGE = 2
EXIT_OUT_OF_MEMORY = 3  # not the user's input: the machine's memory
LORA_HELP = (
    "a LoRA (.safetensors, diffusers' format) fused into the model: export-lora's samples as its student "
    "(its recorded shift or noise levels); default model with it: the embedded teacher"
)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        from nitrofusion.data.prompts import read_prompt_file

        prompts += read_prompt_file(args.prompts)
    if not prompts:
        raise UserError("no prompts: give them as arguments or with --prompts FILE")
    for i, prompt in enumerate(prompts):
        try:
            prompt.encode("utf-8")  # a command-line argument in another encoding holds lone surrogates
        except UnicodeEncodeError:
            raise UserError(f"prompt {i + 1} is not UTF-8 text (was it typed in another encoding?)") from None
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    # What needs no model is checked before importing diffusers (seconds), so a typo fails at once.
    prompts = _read_prompts(args)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")

    from nitrofusion.pipelines import load_pipeline, save_images
    from nitrofusion.pipelines.adapters import check_lora_option
    from nitrofusion.pipelines.generation import (
        check_seeds,
        check_size,
        check_steps,
        generate_batches,
        prepare_output,
        size_limits_of_folder,
    )
    from nitrofusion.pipelines.loading import resolve_model, unet_only_options
    from nitrofusion.world.spec import choose_model

    prepare_output(args.out, len(prompts))
    # What the request asks of the model is checked again after loading; here what can be known
    # before it (an SDXL pipeline loads in tens of seconds).
    check_seeds(args.seed, len(prompts))
    check_guidance_scale(args.guidance_scale)
    if args.steps is not None:
        check_steps(args.sampler, args.steps)
    choice = choose_model(args.model, args.unet, args.shift, args.sampler, args.lora)
    check_lora_option(args.lora, choice.unet)  # before a model is looked for (or fetched)
    # An SD3 pipeline is resolved too (sampled with its own scheduler); with --unet, --shift,
    # --compile or --sampler shift-lcm it is refused from its index before a weight is fetched.
    unet_only = unet_only_options(choice.unet, choice.shift, args.sampler, args.compile)
    folder = resolve_model(choice.model, unet_weights=choice.unet is None, allow_flow=True, unet_only=unet_only)
    limits = size_limits_of_folder(folder)
    if limits is not None:
        multiple, largest = limits
        check_size(multiple, args.height, args.width, largest)
    pipe = load_pipeline(
        choice.model,
        unet=choice.unet,
        shift=choice.shift,
        sampler=args.sampler,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        safety_checker=not args.no_safety_checker,
        lora=args.lora,
    )
    batches = generate_batches(
        pipe,
        prompts,
        steps=args.steps,
        seed=args.seed,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        guidance_scale=args.guidance_scale,
    )
    written = 0
    for batch in batches:  # each batch on disk, and said, before the next is drawn: a stopped run keeps its images
        for path in save_images(batch, args.out, first=written):
            print(path, flush=True)
            written += 1
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from nitrofusion.world.config import WorldConfig

    cfg = WorldConfig(
        seed=args.seed,
        device=args.device,
        vae_steps=args.vae_steps,
        vae=str(Path(args.vae).resolve()) if args.vae else "",  # recorded so: resumed from anywhere
        unet_steps=args.unet_steps,
        flow_steps=args.flow_steps,
        classifier_epochs=args.classifier_epochs,
        checkpoint_every=args.checkpoint_every,
        train_images=args.train_images,
        test_images=args.test_images,
        samples_per_class=args.samples_per_class,
    )
    cfg.check()  # before the imports below (seconds): a bad option fails at once
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(WORLD_STAGES))
    if unknown or not stages:
        raise UserError(f"--stages takes some of {', '.join(WORLD_STAGES)} (comma-separated), got '{args.stages}'")

    from nitrofusion.pipelines.loading import resolve_device
    from nitrofusion.world.train import build_world

    resolve_device(args.device)
    report = build_world(cfg, args.run_dir, args.out, stages)
    out = Path(args.out)
    vae = report["vae"]
    print(f"VAE: test PSNR {vae['test_psnr_db']:.2f} dB, latent scaling factor {vae['scaling_factor']:.3f}")
    if "unet" in stages:
        print(f"teacher pipeline: {out / 'teacher'}")
    if "flow" in stages:
        print(f"flow teacher pipeline (SD3 architecture): {out / 'flow-teacher'}")
    if "classifier" in stages:
        print(f"evaluator: test accuracy {report['evaluator_test_accuracy']:.4f}; {out / 'evaluator.safetensors'}")
    for key, what in (("samples", "the teacher's samples"), ("flow_samples", "the flow teacher's samples")):
        if key in report:
            print(f"{what}: {report[key]}")
    trained = ([] if cfg.vae else ["vae"]) + stages
    print(f"curves: {Path(args.run_dir)}/{{{','.join(trained)}}}/curves.png")
    print(f"{report['total_seconds'] / 60:.1f} min; report: {Path(args.run_dir) / 'report.json'}")
    return 0


def _leave_process_group() -> None:
    """A rank that stops (an error every rank raised, or the end) leaves its process group before
    exiting: one exiting with gloo's threads still running aborted ("terminate called without an
    active exception") after its one-line error."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _check_checkpoint(path: str) -> None:
    from nitrofusion.training import checkpoint

    try:
        checkpoint.read_meta(path)
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"cannot resume from '{path}': {exc}") from None


def cmd_distill(args: argparse.Namespace) -> int:
    from nitrofusion.training.config import load_config

    overrides = list(args.set or [])
    settings = None
    if args.output_dir is not None:
        check_writable_folder(args.output_dir, "--output-dir")
        settings = {"run": {"output_dir": args.output_dir}}  # the folder as named, never read as YAML
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1, got {args.max_steps}")
        overrides.append(f"refine.steps_per_stage=[{args.max_steps}]")
    if args.no_safety_checker:
        overrides.append("model.safety_checker=false")
    cfg = load_config(args.preset, args.config, overrides, settings)
    # Before the teacher loads and its pairs are made (minutes to hours): an output folder that
    # cannot be written, or a checkpoint that is not one, is refused now.
    check_writable_folder(cfg.run.output_dir, "run.output_dir")
    if args.resume is not None and args.resume != "latest":
        _check_checkpoint(args.resume)
    # Imported once the config is known to be good: diffusers and transformers take seconds to
    # import, and a mistyped key should not wait for them.
    from nitrofusion.training.distill import Distiller, TrainingStopped

    try:
        distiller = Distiller(cfg)
        out = distiller.train(resume=args.resume)
    except TrainingStopped as exc:
        print(f"nitrofusion distill: stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    print(f"student:  {out / distiller.weights_name}")
    print(f"pipeline: {out / 'pipeline'}")
    return 0


def cmd_make_pairs(args: argparse.Namespace) -> int:
    from nitrofusion.data.teacher_timesteps import check_teacher_timesteps
    from nitrofusion.pipelines.generation import check_side

    if args.n < 1 or (args.batch_size is not None and args.batch_size < 1) or args.steps < 1:
        raise UserError("--n, --batch-size and --steps must be at least 1")
    check_guidance_scale(args.guidance_scale)
    if args.resolution is not None:  # before the teacher is loaded: what no teacher samples
        check_side("--resolution", args.resolution, 8, model="any teacher")
    if args.timesteps is not None:  # before the teacher is loaded
        check_teacher_timesteps(args.timesteps, args.steps, "--timesteps", "--steps")
    rank, world, device = _launched_processes(args.device)
    try:
        return _make_pairs(args, rank, world, device)
    finally:
        _leave_process_group()  # launched as several: together, as they started


def _make_pairs(args: argparse.Namespace, rank: int, world: int, device: str | None) -> int:
    from nitrofusion.data.prompts import load_prompts
    from nitrofusion.data.teacher import (
        SHARD_SIZE,
        ShardsNotDelivered,
        TeacherSampler,
        check_own_files,
        make_pairs,
        planned_shards,
        wait_for_shards,
    )
    from nitrofusion.pipelines import load_pipeline
    from nitrofusion.pipelines.generation import (
        check_side,
        default_guidance,
        default_size,
        largest_side,
        size_multiple,
    )
    from nitrofusion.pipelines.loading import resolve_device, resolve_dtype
    from nitrofusion.training.distill import resolve_teacher

    resolve_dtype(args.dtype, resolve_device(device))  # a bad --dtype or --device before the teacher loads
    check_writable_folder(args.out, "--out")
    check_own_files(Path(args.out))  # before the teacher loads: a user's prompts.json there would be replaced
    prompts = load_prompts(args.prompts)
    # Pairs are latents: nothing is decoded, so a safety checker (SD1.5's 1.2 GB) would never run.
    # An SD3 flow transformer is a teacher too; Flux is refused from its index, before any weight is read.
    teacher = resolve_teacher(args.model)
    pipe = load_pipeline(teacher, sampler="native", device=device, dtype=args.dtype, safety_checker=False)
    size = default_size(pipe) if args.resolution is None else args.resolution
    check_side("--resolution", size, size_multiple(pipe), largest_side(pipe), "this teacher")
    guidance = default_guidance("native", pipe) if args.guidance_scale is None else args.guidance_scale
    sampler = TeacherSampler(pipe, args.steps, guidance, size, size, args.timesteps)
    # The teacher's batch by its image size (with CFG it samples twice as many): 64 at 1024² with
    # CFG was 128 SDXL samples at once.
    batch_size = args.batch_size or max(1, min(64, PAIRS_BATCH_PIXELS // size**2))
    if world > 1:  # every process has checked the folder before the main one writes to it
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    shards = make_pairs(
        sampler,
        prompts,
        args.n,
        args.out,
        args.seed,
        batch_size,
        rank=rank,
        world=world,
        progress=rank == 0,
    )
    if world > 1:  # the other processes' shards, on disk (hours at SDXL size: outside any collective)
        try:
            wait_for_shards(planned_shards(args.out, args.n, SHARD_SIZE), Path(args.out), 60)
        except ShardsNotDelivered as exc:
            print(f"nitrofusion make-pairs: stopped: {exc}", file=sys.stderr)
            return 1
    if rank == 0:
        print(f"{len(shards)} shards in {args.out}")
    return 0


# make-pairs' default teacher batch: 8 pairs at 1024² (the sdxl preset's data.pairs_batch_size).
PAIRS_BATCH_PIXELS = 8 * 1024**2


def _launched_processes(device: str | None) -> tuple[int, int, str | None]:
    """(rank, processes, device) of this process. Launched as several (`torchrun`, `accelerate
    launch`), each makes its share of the shards on its own GPU (on the CPU where there is none);
    alone, (0, 1, --device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    from accelerate import PartialState

    from nitrofusion.training.distill import has_accelerator_device

    if device is not None:
        raise UserError("--device is for one process: launched as several, each takes its own GPU")
    state = PartialState(cpu=not has_accelerator_device())
    return state.process_index, state.num_processes, str(state.device)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nitrofusion.evaluation.evaluate import EvalRequest, evaluate, table
    from nitrofusion.pipelines.generation import prepare_output
    from nitrofusion.world.spec import choose_model

    out, _ = prepare_output(args.out, 2)
    choice = choose_model(args.model, args.unet, args.shift, args.sampler, args.lora)
    request = EvalRequest(
        model=str(choice.model),
        steps=args.steps,
        out=out,
        prompts=args.prompts,
        n=args.n,
        seed=args.seed,
        unet=str(choice.unet) if choice.unet else None,
        lora=args.lora,
        shift=choice.shift,
        sampler=args.sampler,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        label=args.label or _label(args, choice.model),
        metrics=args.metrics,
        fid_features=args.fid_features,
        fid_resize=args.fid_resize,
        reference=args.reference,
        inception=args.inception,
        clip_model=args.clip_model,
        aesthetic=args.aesthetic,
        aesthetic_clip_model=args.aesthetic_clip_model,
        image_reward=args.image_reward,
        image_reward_tokenizer=args.image_reward_tokenizer,
        evaluator=args.evaluator,
        safety_checker=not args.no_safety_checker,
    )
    rows = evaluate(request)
    print(table(rows))
    print(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'grid.png'}")
    return 0


def _label(args: argparse.Namespace, model: Path) -> str:
    """An evaluation's default row name: the model as given, or the model and the LoRA fused into it."""
    if args.lora is None:
        return args.model or "embedded"
    from nitrofusion.pipelines.adapters import read_lora_file

    return f"{model.name} + {read_lora_file(args.lora).name}"


def cmd_compare(args: argparse.Namespace) -> int:
    from nitrofusion.evaluation.evaluate import combine

    print(combine([Path(d) for d in args.dirs], args.out))  # as given: "" is refused, not the current folder
    print(f"results: {Path(args.out) / 'results.md'}, {Path(args.out) / 'grid.png'}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from nitrofusion.evaluation.reproduce import Reproduction

    repro = Reproduction(
        args.out,
        args.seeds,
        args.n,
        preset=args.preset,
        overrides=args.set,
        batch_size=args.batch_size,
        report_only=args.report_only,
        tables=tuple(args.tables),
    )
    repro.run()
    print((Path(args.out) / "results.md").read_text())
    print(f"results: {Path(args.out) / 'results.md'}, {Path(args.out) / 'results.json'}, {Path(args.out) / 'grid.png'}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from nitrofusion.weights.transfer import transfer
    from nitrofusion.world.spec import weights_source

    base, student, target = map(weights_source, (args.base, args.student, args.target))
    print(transfer(base, student, target, args.out, args.scale, args.dtype, args.shift, args.other_base))
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    from nitrofusion.weights.lora import export_lora

    if args.dtype not in ("fp16", "bf16", "fp32"):
        raise UserError(f"--dtype must be fp16, bf16 or fp32, got {args.dtype}")
    from nitrofusion.world.spec import weights_source

    student, teacher = weights_source(args.student), weights_source(args.teacher)
    report = export_lora(
        student, teacher, args.out, rank=args.rank, dtype=args.dtype, shift=args.shift, other_base=args.other_base
    )
    print(report.line())
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from nitrofusion.evaluation.grid import grid_from_dirs

    for d in args.dirs:
        if not Path(d).is_dir():
            raise UserError(f"'{d}' is not a directory of PNG images")
    if args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if not 1 <= args.scale <= 16:  # 32-pixel images x 16 = 512 each; far more only exhausts memory
        raise UserError(f"--scale must be 1 to 16, got {args.scale}")
    from PIL import Image

    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out '{out}' needs an image file extension (.png, .jpg, ...)")
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder: name an image file")
    check_writable_folder(out.parent, "--out folder")
    try:
        print(grid_from_dirs(args.dirs, args.out, scale=args.scale, limit=args.limit))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return 0


SAFETY_CHECKER_HELP = (
    "leave out the pipeline's safety checker (SD1.5's): no image is blacked out, as in COCO evaluations"
)


def _add_safety_checker_option(p: argparse.ArgumentParser, help_: str = SAFETY_CHECKER_HELP) -> None:
    p.add_argument("--no-safety-checker", action="store_true", help=help_)


def build_parser() -> argparse.ArgumentParser:
    from nitrofusion import __version__

    parser = argparse.ArgumentParser(prog="nitrofusion", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nitrofusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample images in 1-4 steps")
    g.add_argument("prompt", nargs="*", help="prompts (or use --prompts FILE)")
    g.add_argument("--prompts", help="prompt file: .txt (a prompt a line), .jsonl, .json (COCO too), .csv/.tsv")
    g.add_argument(
        "--model",
        help="diffusers pipeline directory or hub id (from the local cache, else downloaded unless HF_HUB_OFFLINE "
        "is set) (SDXL, SD1.5, or an SD3-architecture flow "
        "transformer, sampled with its own scheduler), 'embedded' (the shipped student, default), "
        "'embedded-teacher' or 'embedded-flow-teacher'",
    )
    g.add_argument("--unet", help="student UNet state dict (.safetensors) to load into the model's UNet")
    g.add_argument("--lora", help=LORA_HELP)
    g.add_argument(
        "--steps",
        type=int,
        help="sampling steps (1-4 with shift-lcm; default 1 for a distilled model, else the pipeline's own: "
        "50 for SD1.5/SDXL, 28 for SD3)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    g.add_argument(
        "--height", type=int, help="pixels (default: the model's size); a multiple of 8 (16 for SD3), at most 8192"
    )
    g.add_argument(
        "--width", type=int, help="pixels (default: the model's size); a multiple of 8 (16 for SD3), at most 8192"
    )
    g.add_argument("--batch-size", type=int, default=4, help="images sampled at once (default 4)")
    g.add_argument("--shift", type=int, help="timestep shift (250 NitroSD-Realism, 500 NitroSD-Vibrant)")
    g.add_argument(
        "--sampler",
        choices=["auto", "shift-lcm", "native"],
        default="auto",
        help="shift-lcm: NitroFusion's 1-4 step sampler; native: the pipeline's own scheduler",
    )
    g.add_argument(
        "--guidance-scale",
        type=float,
        help="CFG scale (default 0 for shift-lcm; for native, the pipeline's own: SDXL 5, SD1.5 7.5, SD3 7 "
        "(SD3.5-Large-Turbo needs 0))",
    )
    g.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16")
    g.add_argument(
        "--compile",
        action="store_true",
        help="CUDA: compile the networks and replay each sample as one CUDA graph (minutes first; faster after)",
    )
    _add_safety_checker_option(g)
    g.add_argument("--out", default="outputs", help="output directory, or a .png file for one prompt")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train-teacher", help="reproduce the embedded world (VAE, teachers, evaluator)")
    t.add_argument("--run-dir", default="runs/world", help="checkpoints and logs (resumed if present)")
    t.add_argument("--out", default="runs/world_out", help="where the pipeline and evaluator are written")
    t.add_argument("--seed", type=int, default=0, help="default 0")
    t.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    t.add_argument("--vae-steps", type=int, default=800, help="VAE training steps (default 800)")
    t.add_argument("--unet-steps", type=int, default=6000, help="UNet training steps (default 6000)")
    t.add_argument(
        "--vae",
        help="a trained VAE (a diffusers vae/ folder or a pipeline holding one) instead of training one; "
        "e.g. nitrofusion/world/assets/teacher to build on the shipped world's latents",
    )
    t.add_argument("--flow-steps", type=int, default=5000, help="flow teacher (SD3 architecture) steps (default 5000)")
    t.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help="what to build after the VAE, comma-separated: unet (the teacher), flow (the SD3-architecture "
        "teacher), classifier (the evaluator); default unet,classifier",
    )
    t.add_argument("--classifier-epochs", type=int, default=3, help="evaluator epochs (default 3)")
    t.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints, in each stage")
    t.add_argument("--train-images", type=int, default=0, help="train on the first N images only (0: all 60,000)")
    t.add_argument("--test-images", type=int, default=0, help="measure on the first N test images (0: all 10,000)")
    t.add_argument("--samples-per-class", type=int, default=8, help="the teacher's samples in samples.png (0: none)")
    t.set_defaults(func=cmd_train_teacher)

    d = sub.add_parser("distill", help="distil a multi-step teacher into a 1-4 step student (NitroFusion)")
    d.add_argument(
        "--preset",
        help="embedded (a few CPU minutes), sdxl (the paper's batch, pool and refresh on one GPU, with SDXL base as "
        "the teacher: docs/distill.md says where it departs), sd15 (an SD1.5-architecture teacher at 512 px, "
        "one 24 GB GPU) or sd3 (an SD3-architecture teacher); "
        "also demo, flow-embedded (the embedded SD3-architecture teacher), dmd2-embedded, dmdx-embedded",
    )
    d.add_argument("--config", help="YAML config file (see docs/distill.md for the schema)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=1e-5")
    d.add_argument("--resume", help="'latest' or a checkpoint directory")
    d.add_argument("--output-dir", help="shortcut for --set run.output_dir=...")
    d.add_argument(
        "--max-steps",
        type=int,
        help="shortcut for --set refine.steps_per_stage=[N]: N one-step iterations after the "
        "preset's regression pre-training (loss.pretrain_steps), and no refinement to more steps",
    )
    _add_safety_checker_option(
        d,
        "shortcut for --set model.safety_checker=false: the teacher's (SD1.5's) safety checker is not loaded, "
        "judges no validation grid and is left out of the exported pipeline",
    )
    d.set_defaults(func=cmd_distill)

    mp = sub.add_parser("make-pairs", help="precompute teacher samples (prompt, noise seed, latent) shards")
    mp.add_argument(
        "--model", default="embedded", help="teacher pipeline directory (SDXL, SD1.5, SD3), hub id or 'embedded'"
    )
    mp.add_argument("--prompts", default="embedded", help="prompt file (.txt, .jsonl, .json, .csv, .tsv) or 'embedded'")
    mp.add_argument("--n", type=int, default=1024, help="pairs to make (default 1024)")
    mp.add_argument("--steps", type=int, default=25, help="the teacher's sampling steps (default 25)")
    mp.add_argument(
        "--timesteps",
        type=int,
        nargs="+",
        help="the teacher's own schedule, as many as --steps (DMD2's 4-step SDXL: 999 749 499 249)",
    )
    mp.add_argument(
        "--guidance-scale",
        type=float,
        help="the teacher's CFG scale (default: its pipeline's own, as each preset's data.teacher_guidance: "
        "SDXL 5, SD1.5 7.5, SD3 7)",
    )
    mp.add_argument(
        "--batch-size",
        type=int,
        help="pairs sampled at once (default: 8 Mpx of images, at most 64: 8 at 1024², 32 at 512²)",
    )
    mp.add_argument("--resolution", type=int, help="pixels (default: the teacher's size); a multiple of 8")
    mp.add_argument("--seed", type=int, default=0, help="default 0; distill's run.seed, to share its pairs")
    mp.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    mp.add_argument(
        "--dtype", default="auto", help="the teacher's: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 (SD3.5's)"
    )
    mp.add_argument("--out", required=True, help="the pairs folder (resumed if it holds pairs made the same way)")
    mp.set_defaults(func=cmd_make_pairs)

    e = sub.add_parser("evaluate", help="generate (cached) and score: FID, CLIP, aesthetic, ImageReward, embedded")
    e.add_argument("--model", help="pipeline directory or hub id, SD3 architecture too (default: the embedded model)")
    e.add_argument("--unet", help="student UNet state dict (.safetensors)")
    e.add_argument("--lora", help=LORA_HELP)
    e.add_argument(
        "--steps",
        type=int,
        nargs="+",
        help="step counts, a row each (default 1 2 4 for a distilled model, else the count its nitrofusion.json "
        "records, else the pipeline's own: 50 or 28)",
    )
    e.add_argument("--prompts", default="embedded", help="'embedded' or a prompt file (.txt .jsonl .json .csv .tsv)")
    e.add_argument("--n", type=int, default=1000, help="images per setting (prompts cycled)")
    e.add_argument("--sampler", choices=["auto", "shift-lcm", "native"], default="auto", help="as for generate")
    e.add_argument("--shift", type=int, help="timestep shift for shift-lcm (default: the model's, else 250)")
    e.add_argument("--guidance-scale", type=float, help="CFG scale (default: as for generate)")
    e.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    e.add_argument(
        "--batch-size",
        type=int,
        help="images sampled at once (default: 4 Mpx of images, at most 100: 4 at 1024², 16 at 512², 100 for the "
        "embedded world)",
    )
    e.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    e.add_argument(
        "--dtype", default="auto", help="the model's: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 (SD3.5's)"
    )
    _add_safety_checker_option(e)
    e.add_argument("--label", help="model name in the table")
    e.add_argument(
        "--metrics",
        nargs="+",
        help="embedded, fid, clip, aesthetic, imagereward (default: embedded for embedded prompts, else the rest)",
    )
    e.add_argument("--fid-features", default="inception", help="inception, clip or embedded")
    e.add_argument(
        "--fid-resize",
        choices=["pil-bicubic-8bit", "clean", "pytorch-fid"],
        help="how Inception FID resizes images to 299x299: pil-bicubic-8bit (default: PIL bicubic on the 8-bit "
        "image), clean (clean-fid's: PIL bicubic on float channels) or pytorch-fid (torch bilinear); "
        "compare FIDs only within one (docs/evaluate.md)",
    )
    e.add_argument("--reference", help="FID reference: a directory of real images or a stats .safetensors")
    e.add_argument("--inception", help="FID Inception-v3 weights (.safetensors; see docs/evaluate.md)")
    e.add_argument("--clip-model", help="transformers CLIP directory for CLIP score (the paper's: ViT-B/32)")
    e.add_argument("--aesthetic", help="LAION aesthetic predictor weights (.safetensors)")
    e.add_argument("--aesthetic-clip-model", help="the aesthetic predictor's CLIP, ViT-L/14 (default: --clip-model)")
    e.add_argument("--image-reward", help="ImageReward weights (.safetensors)")
    e.add_argument("--image-reward-tokenizer", help="directory with bert-base-uncased's vocab.txt")
    e.add_argument("--evaluator", help="the embedded evaluator (default: the shipped one)")
    e.add_argument("--out", default="outputs/evaluate", help="image cache (resumable), results.json/md, grid.png")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("compare", help="one table and side-by-side grid from several 'evaluate' outputs")
    c.add_argument("dirs", nargs="+", help="evaluate --out directories")
    c.add_argument("--out", required=True, help="folder for the combined results.md/json and grid.png")
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser(
        "reproduce", help="the embedded reproduction: teacher, student 1-4 steps, ablations, several seeds"
    )
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    r.add_argument("--n", type=int, default=1000, help="images per row and seed")
    r.add_argument("--preset", default="embedded", help="the distill preset (default embedded)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run")
    r.add_argument("--batch-size", type=int, default=250, help="images scored at once (default 250)")
    r.add_argument("--out", default="runs/reproduce", help="runs, cached scores, results.md/json, grid.png")
    r.add_argument("--report-only", action="store_true", help="tabulate what is cached; train and sample nothing")
    r.add_argument(
        "--tables",
        nargs="+",
        default=["teacher", "student", "family", "ablation", "flow"],
        help="row groups to train and score (teacher, student, family, ablation, flow); the rest only from the cache",
    )
    r.set_defaults(func=cmd_reproduce)

    tr = sub.add_parser("transfer", help="carry a student onto another fine-tune: target + (student - base)")
    tr.add_argument(
        "--base", required=True, help="the teacher the student was distilled from (pipeline, unet/ or file)"
    )
    tr.add_argument("--student", required=True, help="the distilled student UNet (.safetensors, unet/ or pipeline)")
    tr.add_argument("--target", required=True, help="another fine-tune of the same base (pipeline, unet/ or file)")
    tr.add_argument("--scale", type=float, default=1.0, help="multiplier of the delta")
    tr.add_argument("--out", required=True, help="the new student UNet (.safetensors), use with generate --unet")
    tr.add_argument(
        "--dtype",
        default="auto",
        help="auto (the dtype the target is stored in), fp32, fp16 or bf16 (bf16 can round small deltas away)",
    )
    tr.add_argument(
        "--shift",
        type=int,
        default=None,
        help="the timestep shift to record in the result for generate --unet (default: the student's where it "
        "records one: a distill file or pipeline; the public NitroSD files record none: 250 Realism, 500 Vibrant)",
    )
    tr.add_argument(
        "--other-base",
        action="store_true",
        help="take the delta against a --base that is not the student's teacher, on purpose (e.g. SDXL base "
        "under a student of DMD2's SDXL, to carry DMD2's change too); refused otherwise",
    )
    tr.set_defaults(func=cmd_transfer)

    lo = sub.add_parser("export-lora", help="the student - teacher delta as a LoRA for diffusers' load_lora_weights")
    lo.add_argument(
        "--student",
        required=True,
        help="student UNet (.safetensors, unet/ or pipeline), or an SD3 student (student_transformer.safetensors)",
    )
    lo.add_argument("--teacher", required=True, help="the teacher it was distilled from")
    lo.add_argument("--rank", type=int, default=64, help="LoRA rank (default 64; capped per module by its size)")
    lo.add_argument("--dtype", default="fp16", help="fp16 (default), bf16 or fp32")
    lo.add_argument("--out", required=True, help="a .safetensors file or a directory")
    lo.add_argument(
        "--shift",
        type=int,
        default=None,
        help="the timestep shift to record in the file (nitrofusion.shift): the LoRA'd teacher is the student only "
        "with TimestepShiftLCMScheduler at it (default: the student's where it records one; UNet students only)",
    )
    lo.add_argument(
        "--other-base",
        action="store_true",
        help="take the delta against a --teacher that is not the one the student records, on purpose",
    )
    lo.set_defaults(func=cmd_export_lora)

    gr = sub.add_parser("grid", help="put directories of PNGs side by side in one grid PNG (a row each)")
    gr.add_argument("dirs", nargs="+", help="folders of PNGs, a row each")
    gr.add_argument("--out", required=True, help="the grid image file (.png, .jpg, ...)")
    gr.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling of each image")
    gr.add_argument("--limit", type=int, default=16, help="images per row")
    gr.set_defaults(func=cmd_grid)

    from nitrofusion.app.cli import add_parser as add_app_parser

    add_app_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
        # Python's format is two lines, the second the source line that warned.
        text = " ".join(str(message).split())
        print(f"nitrofusion {args.command}: warning: {text}", file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            return args.func(args)
    except UserError as exc:
        print(f"nitrofusion {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a path that could not be read or written, found where it was used
        where = f": '{exc.filename}'" if exc.filename else ""
        print(f"nitrofusion {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        first = str(exc).splitlines()[0] if str(exc) else "no detail"
        hint = OUT_OF_MEMORY_HINTS.get(args.command, OUT_OF_MEMORY_HINTS[None])
        print(
            f"nitrofusion {args.command}: error: out of memory ({first}); {hint}",
            file=sys.stderr,
        )
        return EXIT_OUT_OF_MEMORY


# What takes less memory, by command: distill has no --dtype (it trains in fp32 or bf16 autocast).
OUT_OF_MEMORY_HINTS = {
    "distill": "train with less on the GPU: the EMA or the teacher in host memory (optim.ema_offload, "
    "model.teacher_offload), 8-bit AdamW (optim.optimizer=adamw8bit), a narrower head pool "
    "(discriminator.width), fewer samples a micro-batch (data.batch_size, with optim.grad_accumulation "
    "for the same batch), or a LoRA student (model.lora_rank); docs/distill.md, 'Teacher and EMA offload'",
    None: "sample smaller batches (--batch-size) or at a half-precision --dtype",
}


if __name__ == "__main__":
    sys.exit(main())
