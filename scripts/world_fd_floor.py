"""What domain FD a perfect embedded teacher would score: the floor its training data sets.

The embedded teacher's UNet was trained on VAE latents of Fashion-MNIST, half of them flipped
left-right *as latents* (nitrofusion/world/train.py). The footwear classes face one way, and
the VAE is not flip-equivariant (a flipped latent decodes to a blurred flipped image), so the
distribution the teacher learnt to sample is not the real one: its domain FD has a floor well
above that of real images. This script scores, with the shipped evaluator against its test-set
statistics, train images as they are and as each step of that recipe changes them:

    python scripts/world_fd_floor.py --n 2000 --out runs/world_fd_floor.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from nitrofusion.world import data
from nitrofusion.world.evaluator import Evaluator
from nitrofusion.world.spec import evaluator_path, teacher_path


def as_saved(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images through 8-bit pixels, as generated images reach the evaluator (PNG, PIL)."""
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round()
    return u8 / 127.5 - 1


@torch.no_grad()
def decode(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.decode(chunk).sample for chunk in z.split(250)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="train images (a seeded random subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON of the table")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    images, labels = data.load_split("train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    real, labels = data.to_model_range(images[pick]), labels[pick]
    evaluator = Evaluator.load(evaluator_path())
    vae = AutoencoderKL.from_pretrained(teacher_path() / "vae", use_safetensors=True).eval()

    with torch.no_grad():
        posterior = [vae.encode(chunk).latent_dist for chunk in real.split(250)]
        z = torch.cat(
            [d.sample(generator=torch.Generator().manual_seed(args.seed + i)) for i, d in enumerate(posterior)]
        )
    half = torch.rand(len(real), generator=torch.Generator().manual_seed(args.seed + 1)) < 0.5
    rows = {
        "real train images": real,
        "VAE reconstructions (a posterior sample decoded)": decode(vae, z),
        "real images, half flipped in pixel space": torch.where(half[:, None, None, None], real.flip(-1), real),
        "half the latents flipped, decoded (the teacher's training data)": decode(
            vae, torch.where(half[:, None, None, None], z.flip(-1), z)
        ),
        "every latent flipped, decoded": decode(vae, z.flip(-1)),
    }
    results = []
    print(f"| images ({args.n} Fashion-MNIST train images) | class accuracy | domain FD |")
    print("| --- | ---: | ---: |")
    for name, x in rows.items():
        score = evaluator.score(as_saved(x), labels)
        results.append({"images": name, **score})
        print(f"| {name} | {score['class_accuracy']:.3f} | {score['domain_fd']:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"n": args.n, "seed": args.seed, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
