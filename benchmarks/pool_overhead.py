"""Time per step and peak memory of the full head pool against a single static head set.

Same model, batch and data (precomputed teacher pairs, so teacher sampling is not timed);
each configuration runs in its own process so peak RSS is its own, `--rounds` times,
interleaved; the median time per step is reported. Prints a markdown table.

    python benchmarks/pool_overhead.py [--teacher embedded] [--steps 20] [--batch 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def worker(args: argparse.Namespace) -> None:
    import torch

    from nitrofusion.training.config import load_config
    from nitrofusion.training.distill import Distiller

    torch.set_num_threads(args.threads)
    cfg = load_config(
        "embedded",
        None,
        [
            f"model.teacher={args.teacher}",
            f"data.pairs={args.pairs}",
            f"data.batch_size={args.batch}",
            f"discriminator.pool={args.pool}",
            "loss.pretrain_steps=0",  # time adversarial steps: the preset's regression warm-up never uses the heads
            f"run.output_dir={args.out}",
            "run.validate_every=0",
        ],
    )
    d = Distiller(cfg, progress=False)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):
        d.train_step()
        d.step += 1
    t0 = time.perf_counter()
    for _ in range(args.steps):
        d.train_step()
        d.step += 1
    dt = (time.perf_counter() - t0) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_params = sum(p.numel() for p in d.pool.parameters())
    print(
        json.dumps(
            {
                "pool": args.pool,
                "heads": len(d.pool),
                "head_params": n_params,
                "s_per_step": dt,
                "peak_rss_mb": peak / 1024,
                "setup_rss_mb": base_rss / 1024,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", default="embedded")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="runs per setting, interleaved; the median is reported")
    p.add_argument("--pairs")
    p.add_argument("--pool")
    p.add_argument("--out")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.pool is not None:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = os.path.join(tmp, "pairs")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "nitrofusion.cli",
                "make-pairs",
                "--model",
                args.teacher,
                "--n",
                "256",
                "--out",
                pairs,
            ],
            check=True,
            capture_output=True,
        )
        # Interleaved rounds (pool, static, static, pool, ...): a shared VM's speed drifts by
        # 10% and more over a minute, which one run per setting would read as pool overhead.
        order = [("true", "false") if r % 2 == 0 else ("false", "true") for r in range(args.rounds)]
        runs: dict[str, list[dict]] = {"true": [], "false": []}
        for pool in (setting for pair in order for setting in pair):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--pool",
                    pool,
                    "--pairs",
                    pairs,
                    "--out",
                    os.path.join(tmp, f"{pool}-{len(runs[pool])}"),
                    "--teacher",
                    args.teacher,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--batch",
                    str(args.batch),
                    "--threads",
                    str(args.threads),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[pool].append(json.loads(out.strip().splitlines()[-1]))
    rows = {}
    for pool, results in runs.items():
        rows[pool] = dict(results[0], s_per_step=statistics.median(r["s_per_step"] for r in results))
        rows[pool]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
        rows[pool]["all_s_per_step"] = [round(r["s_per_step"], 3) for r in results]
    full, static = rows["true"], rows["false"]
    print("| setting | heads | head params | s / step | peak RSS (MB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in (("480-head pool", full), ("static head set", static)):
        print(f"| {name} | {r['heads']} | {r['head_params']:,} | {r['s_per_step']:.3f} | {r['peak_rss_mb']:.0f} |")
    print(f"\ns / step of each run: pool {full['all_s_per_step']}, static {static['all_s_per_step']}")
    print(
        f"pool / static: time x{full['s_per_step'] / static['s_per_step']:.3f}, "
        f"peak memory x{full['peak_rss_mb'] / static['peak_rss_mb']:.3f}"
    )


if __name__ == "__main__":
    main()
