"""Can the discriminator heads tell a student from its teacher at all?

A probe outside training: one-step x0 of a fixed student and the teacher's x0 from the same
noise (the precomputed pairs), re-noised to each t* and passed through the frozen teacher
encoder once; then a static head set (one head per kind and feature level) is trained on
the features of 3 batches and scored on a 4th. Held-out accuracy near 0.5 and loss near
2 ln 2 = 1.386 mean the heads are blind; that is how the GroupNorm heads behaved (docs/results.md).

    python scripts/probe_heads.py --student runs/reproduce/runs/regression-only/seed-0/student_unet.safetensors
    python scripts/probe_heads.py --student ... --groupnorm     # the heads as they were: blind
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from nitrofusion.training.config import load_config
from nitrofusion.training.distill import Distiller


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="student UNet (.safetensors) to judge against the teacher")
    p.add_argument("--preset", default="embedded")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=200, help="head training steps per t*")
    p.add_argument("--groupnorm", action="store_true", help="the old heads: GroupNorm (a channel per group) + SiLU")
    p.add_argument("--out", default="runs/probe_heads.json")
    args = p.parse_args()

    torch.manual_seed(0)
    overrides = [
        f"model.student_init={args.student}",
        "loss.pretrain_steps=0",
        "refine.steps_per_stage=[1]",
        "discriminator.pool=false",
        f"data.batch_size={args.batch}",
        "run.output_dir=runs/probe_heads",
    ]
    d = Distiller(load_config(args.preset, None, overrides), progress=False)
    judge, pool = d.critics["pool"].judgement, d.pool
    if args.groupnorm:
        for head in pool.heads:
            head.trunk = with_groupnorm(head.trunk)
    batches = []
    with torch.no_grad():
        for micro in range(4):
            cond, noise, real = d.batch(micro)
            fake, _, _ = d.student_x0(d.phase(0), noise, cond, micro, False)
            batches.append((cond, real, fake))
    real_all = torch.cat([b[1] for b in batches])
    fake_all = torch.cat([b[2] for b in batches])
    report = {
        "student": args.student,
        "heads_norm": "groupnorm" if args.groupnorm else "none",
        "x0_variance": {"teacher": real_all.var().item(), "student": fake_all.var().item()},
        "heads": [f"{s.kind}/level{s.level}" for s in pool.slots],
        "t_stars": {},
    }
    g = torch.Generator().manual_seed(1)
    for t_star in d.cfg.discriminator.t_stars:
        feats = []
        with torch.no_grad():
            for cond, real, fake in batches:
                noise_r = torch.randn(real.shape, generator=g)
                noise_f = torch.randn(real.shape, generator=g)
                real_f = judge._features(real, t_star, noise_r, cond)
                feats.append((real_f, judge._features(fake, t_star, noise_f, cond)))
        for i, head in enumerate(pool.heads):
            head.reset_parameters(torch.Generator().manual_seed(5 + i))
            for m in head.modules():
                if isinstance(m, nn.GroupNorm):
                    m.reset_parameters()
        opt = torch.optim.Adam(pool.parameters(), lr=1e-3, betas=(0.0, 0.99))
        ids = pool.sample_heads(t_star, g)
        for step in range(args.steps):
            k = step % 3
            real_logits = pool.logits(ids, feats[k][0], batches[k][0].pooled)
            fake_logits = pool.logits(ids, feats[k][1], batches[k][0].pooled)
            loss = sum(F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real_logits, fake_logits))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            real_logits = pool.logits(ids, feats[3][0], batches[3][0].pooled)
            fake_logits = pool.logits(ids, feats[3][1], batches[3][0].pooled)
        pairs = list(zip(real_logits, fake_logits))
        accuracy = [0.5 * ((r > 0).float().mean() + (f < 0).float().mean()).item() for r, f in pairs]
        held_out = [(F.softplus(-r).mean() + F.softplus(f).mean()).item() for r, f in pairs]
        report["t_stars"][str(t_star)] = {"held_out_accuracy": accuracy, "held_out_loss": held_out}
        print(
            f"t*={t_star:4d}  held-out accuracy: mean {sum(accuracy) / len(accuracy):.3f}, "
            f"min {min(accuracy):.3f}, max {max(accuracy):.3f}; loss mean {sum(held_out) / len(held_out):.3f}",
            flush=True,
        )
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    var = report["x0_variance"]
    print(f"x0 variance: teacher {var['teacher']:.3f}, student {var['student']:.3f}")
    print(f"wrote {args.out}")


def with_groupnorm(trunk: nn.Sequential) -> nn.Sequential:
    """The trunk as it was before the fix: each conv followed by GroupNorm with one channel per
    group (what the old group rule gave at widths 16 and 32) and SiLU."""
    layers: list[nn.Module] = []
    for m in trunk:
        if isinstance(m, nn.Conv2d):
            layers += [m, nn.GroupNorm(m.out_channels, m.out_channels), nn.SiLU()]
    return nn.Sequential(*layers)


if __name__ == "__main__":
    main()
