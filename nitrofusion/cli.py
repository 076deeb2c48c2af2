"""The `nitrofusion` command: a thin argparse layer over the package's functions.

Problems with the user's input (UserError) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# transformers warns at import time about optional image backends (torchvision) that
# text-to-image sampling never uses; keep the CLI's stderr for our own messages.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from nitrofusion.errors import UserError

EXIT_USAGE = 2


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UserError(f"cannot read prompt file '{path}': {exc.strerror}") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise UserError(f"prompt file '{path}' has no prompts (one per line expected)")
        prompts += from_file
    if not prompts:
        raise UserError("no prompts: give them as arguments or with --prompts FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from nitrofusion.pipelines import generate, load_pipeline, save_images
    from nitrofusion.pipelines.generation import prepare_output
    from nitrofusion.world.spec import default_model

    prompts = _read_prompts(args)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    prepare_output(args.out, len(prompts))
    model = args.model or default_model()
    if model is None:
        raise UserError("no --model given and no embedded model is installed; pass --model PATH_OR_HUB_ID")
    pipe = load_pipeline(
        model, unet=args.unet, shift=args.shift, sampler=args.sampler, device=args.device, dtype=args.dtype
    )
    results = generate(
        pipe,
        prompts,
        steps=args.steps,
        seed=args.seed,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        guidance_scale=args.guidance_scale,
    )
    for path in save_images(results, args.out):
        print(path)
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from nitrofusion.world.train import WorldConfig, build_world

    cfg = WorldConfig(
        seed=args.seed,
        device=args.device,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        classifier_epochs=args.classifier_epochs,
    )
    report = build_world(cfg, args.run_dir, args.out, ["unet", "classifier"])
    print(report)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from nitrofusion.training.config import load_config
    from nitrofusion.training.distill import Distiller, TrainingStopped

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"refine.steps_per_stage=[{args.max_steps}]")
    cfg = load_config(args.preset, args.config, overrides)
    try:
        out = Distiller(cfg).train(resume=args.resume)
    except TrainingStopped as exc:
        print(f"nitrofusion distill: stopped: {exc}", file=sys.stderr)
        return 1
    print(f"student UNet: {out / 'student_unet.safetensors'}")
    print(f"pipeline:     {out / 'pipeline'}")
    return 0


def cmd_make_pairs(args: argparse.Namespace) -> int:
    from nitrofusion.data.prompts import load_prompts
    from nitrofusion.data.teacher import TeacherSampler, make_pairs
    from nitrofusion.pipelines import load_pipeline
    from nitrofusion.pipelines.generation import default_size
    from nitrofusion.training.distill import resolve_teacher

    if args.n < 1 or args.batch_size < 1 or args.steps < 1:
        raise UserError("--n, --batch-size and --steps must be at least 1")
    prompts = load_prompts(args.prompts)
    pipe = load_pipeline(resolve_teacher(args.model), sampler="native", device=args.device)
    size = args.resolution or default_size(pipe)
    sampler = TeacherSampler(pipe, args.steps, args.guidance_scale, size, size)
    shards = make_pairs(sampler, prompts, args.n, args.out, seed=args.seed, batch_size=args.batch_size)
    print(f"{len(shards)} shards in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from nitrofusion.evaluation.embedded import as_dict, markdown_table, score_pipeline
    from nitrofusion.evaluation.grid import make_grid
    from nitrofusion.pipelines import load_pipeline
    from nitrofusion.pipelines.generation import prepare_output
    from nitrofusion.world.evaluator import Evaluator
    from nitrofusion.world.spec import default_model, evaluator_path

    if args.n < 2:
        raise UserError(f"--n must be at least 2 (a covariance needs two samples), got {args.n}")
    out, _ = prepare_output(args.out, 2)
    ev_path = Path(args.evaluator) if args.evaluator else evaluator_path()
    if not ev_path.is_file():
        raise UserError(
            f"evaluator weights '{ev_path}' not found; build them with 'nitrofusion train-teacher' "
            "or point --evaluator at an evaluator.safetensors"
        )
    evaluator = Evaluator.load(ev_path)
    model = args.model or default_model()
    if model is None:
        raise UserError("no --model given and no embedded model is installed")
    pipe = load_pipeline(model, unet=args.unet, shift=args.shift, sampler=args.sampler, device=args.device)
    scores, rows = [], []
    for steps in args.steps:
        score, images = score_pipeline(
            pipe,
            evaluator,
            steps,
            n=args.n,
            seed=args.seed,
            guidance_scale=args.guidance_scale,
            batch_size=args.batch_size,
            label=args.label or Path(str(model)).name,
        )
        scores.append(score)
        rows.append(images[:10])
        print(markdown_table([score]).splitlines()[-1])
    table = markdown_table(scores)
    (out / "results.json").write_text(json.dumps([as_dict(s) for s in scores], indent=1))
    (out / "results.md").write_text(table + "\n")
    make_grid(rows, [f"{s.sampler} {s.steps} step" for s in scores], scale=3).save(out / "grid.png")
    print(table)
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from nitrofusion.evaluation.grid import grid_from_dirs

    for d in args.dirs:
        if not Path(d).is_dir():
            raise UserError(f"'{d}' is not a directory of PNG images")
    try:
        print(grid_from_dirs(args.dirs, args.out, scale=args.scale, limit=args.limit))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nitrofusion import __version__

    parser = argparse.ArgumentParser(prog="nitrofusion", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nitrofusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample images in 1-4 steps")
    g.add_argument("prompt", nargs="*", help="prompts (or use --prompts FILE)")
    g.add_argument("--prompts", help="text file with one prompt per line")
    g.add_argument(
        "--model", help="diffusers pipeline directory or hub id in the local cache (default: the embedded model)"
    )
    g.add_argument("--unet", help="student UNet state dict (.safetensors) to load into the model's UNet")
    g.add_argument("--steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--shift", type=int, help="timestep shift (250 NitroSD-Realism, 500 NitroSD-Vibrant)")
    g.add_argument(
        "--sampler",
        choices=["auto", "shift-lcm", "native"],
        default="auto",
        help="shift-lcm: NitroFusion's 1-4 step sampler; native: the pipeline's own scheduler",
    )
    g.add_argument("--guidance-scale", type=float, help="CFG scale (default 0 for shift-lcm, 5 for native)")
    g.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16")
    g.add_argument("--out", default="outputs", help="output directory, or a .png file for one prompt")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train-teacher", help="reproduce the embedded world (VAE, teacher, evaluator)")
    t.add_argument("--run-dir", default="runs/world", help="checkpoints and logs (resumed if present)")
    t.add_argument("--out", default="runs/world_out", help="where the pipeline and evaluator are written")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--vae-steps", type=int, default=800)
    t.add_argument("--unet-steps", type=int, default=6000)
    t.add_argument("--classifier-epochs", type=int, default=3)
    t.set_defaults(func=cmd_train_teacher)

    d = sub.add_parser("distill", help="distil a multi-step teacher into a 1-4 step student (NitroFusion)")
    d.add_argument("--preset", help="embedded (a few CPU minutes) or sdxl (the paper's settings)")
    d.add_argument("--config", help="YAML config file (see docs/distill.md for the schema)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=1e-5")
    d.add_argument("--resume", help="'latest' or a checkpoint directory")
    d.add_argument("--output-dir", help="shortcut for --set run.output_dir=...")
    d.add_argument("--max-steps", type=int, help="shortcut: train only N one-step iterations")
    d.set_defaults(func=cmd_distill)

    mp = sub.add_parser("make-pairs", help="precompute teacher samples (prompt, noise seed, latent) shards")
    mp.add_argument("--model", default="embedded", help="teacher pipeline directory, hub id or 'embedded'")
    mp.add_argument("--prompts", default="embedded", help="text file with one prompt a line, or 'embedded'")
    mp.add_argument("--n", type=int, default=1024)
    mp.add_argument("--steps", type=int, default=25)
    mp.add_argument("--guidance-scale", type=float, default=5.0)
    mp.add_argument("--batch-size", type=int, default=64)
    mp.add_argument("--resolution", type=int)
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--device")
    mp.add_argument("--out", required=True)
    mp.set_defaults(func=cmd_make_pairs)

    e = sub.add_parser("evaluate", help="score a model on the embedded world (class accuracy, domain FD)")
    e.add_argument("--model", help="pipeline directory (default: the embedded model)")
    e.add_argument("--unet", help="student UNet state dict (.safetensors)")
    e.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    e.add_argument("--sampler", choices=["auto", "shift-lcm", "native"], default="auto")
    e.add_argument("--shift", type=int)
    e.add_argument("--guidance-scale", type=float)
    e.add_argument("--n", type=int, default=2000, help="images per setting")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=250)
    e.add_argument("--device")
    e.add_argument("--evaluator", help="evaluator.safetensors (default: the shipped one)")
    e.add_argument("--label", help="model name in the table")
    e.add_argument("--out", default="outputs/evaluate")
    e.set_defaults(func=cmd_evaluate)

    gr = sub.add_parser("grid", help="put directories of PNGs side by side in one grid PNG (a row each)")
    gr.add_argument("dirs", nargs="+")
    gr.add_argument("--out", required=True)
    gr.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling of each image")
    gr.add_argument("--limit", type=int, default=16, help="images per row")
    gr.set_defaults(func=cmd_grid)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"nitrofusion {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
