"""Does the head pool lose to a static head set because each pool head trains too rarely?

In the embedded preset a step samples one t* group of four and one candidate of four per
(kind, level) slot, so a pool head is trained on ~1/16 of the 300 one-step iterations (~19
updates) while a static head trains on all 300. This trains the one-step stage (the
ablations' budget) with fewer candidates per slot -- 2 (~38 updates per head) and 1 (~75) --
and with one candidate and every t* group each step (300 updates, still one head set per
t*), and prints them beside the cached full pool and static rows of `nitrofusion reproduce`.

    python scripts/pool_updates.py --seeds 0 1 --out runs/reproduce     # ~6 CPU minutes per run
"""

from __future__ import annotations

import argparse
import statistics

from nitrofusion.evaluation.reproduce import ABLATIONS, FULL, Reproduction, Variant

VARIANTS = (
    Variant("pool, 2 candidates", ("discriminator.candidates=2",)),
    Variant("pool, 1 candidate", ("discriminator.candidates=1",)),
    # Every t* group each step: every head trains every step (as static heads do) but stays
    # specialised to its noise level; separates "too few updates" from "split by t*".
    Variant("pool 1 candidate every group", ("discriminator.candidates=1", "discriminator.t_stars_per_step=4")),
)


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default="runs/reproduce")
    args = p.parse_args()

    rep = Reproduction(args.out, args.seeds, args.n, tables=("ablation",))
    static = next(v for v in ABLATIONS if v.name == "no dynamic pool")
    rows = [("pool, 4 candidates (full)", "nitrofusion-stage1", None), ("static head set", static.slug, static)]
    rows += [(v.name, v.slug, v) for v in VARIANTS]
    print("| heads | per-head updates (approx.) | seeds | class accuracy | domain FD |")
    print("| --- | ---: | ---: | ---: | ---: |")
    updates = {"pool, 4 candidates (full)": 19, "pool, 2 candidates": 38, "pool, 1 candidate": 75}
    # 300 one-step iterations x P(a head's t* group is drawn) x P(it is the slot's candidate)
    for label, key, variant in rows:
        scores = []
        for seed in args.seeds:
            if variant is None:  # the full method's one-step stage: cached by `reproduce`, never retrained here
                load = None
            else:
                load = rep._pipeline(lambda v=variant, s=seed: rep.distill(v, s) / "student_unet.safetensors")
            if load is None and not (rep.out / "scores" / f"{key}-1-seed{seed}.json").is_file():
                continue
            # The full method's stage-one student is FULL's run (as `reproduce` scores it).
            trained_with = rep.trained_with(variant or FULL, seed)
            score = rep.score(f"{key}-1-seed{seed}", load, 1, seed, label, "ablation", trained_with)
            if score is not None:
                scores.append(score)
        if not scores:
            print(f"| {label} | | 0 | not cached | |")
            continue
        acc = [s.class_accuracy for s in scores]
        fd = [s.domain_fd for s in scores]
        print(
            f"| {label} | {updates.get(label, 300)} | {len(scores)} | {statistics.fmean(acc):.3f} ± {sd(acc):.3f} "
            f"| {statistics.fmean(fd):.1f} ± {sd(fd):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
