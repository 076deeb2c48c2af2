"""Pinned host memory of the offloaded parts at SDXL architecture: tensor by tensor, against packed.

torch's pinned allocator gives each request the next power of two in bytes. Pinning each tensor
on its own (what `model.teacher_offload` and `optim.ema_offload` did before host_memory.py) then
costs the sum of those roundings; `host_copies` asks for a few power-of-two blocks instead. The
sizes come from SDXL base 1.0's architecture built on the meta device (nothing is allocated),
so this runs anywhere in seconds; on a GPU, tests/test_host_memory.py checks the allocator's own
count against `pack`.

    python benchmarks/pinned_host.py --out runs/pinned_host.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nitrofusion.models.builders import build_sdxl_base
from nitrofusion.training.host_memory import pack, power_of_two
from nitrofusion.training.offload import teacher_groups, unique_tensors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/pinned_host.json")
    args = p.parse_args()
    pipe = build_sdxl_base("meta")
    # The sdxl preset's teacher is bf16; the EMA is an fp32 copy of the student UNet's parameters.
    parts = {
        f"teacher {name} (bf16)": (unique_tensors(modules), 2)
        for name, modules in teacher_groups(pipe, False, False).items()
    }
    parts["student EMA (fp32)"] = (list(pipe.unet.parameters()), 4)
    rows = []
    print(f"{'part':<26} {'tensors':>7} {'GiB':>7} {'one by one':>11} {'packed':>8}")
    for name, (tensors, element) in parts.items():
        sizes = [t.numel() * element for t in tensors]
        blocks, _ = pack(sizes)
        row = {
            "part": name,
            "tensors": len(sizes),
            "gib": sum(sizes) / 2**30,
            "pinned_one_by_one_gib": sum(power_of_two(n) for n in sizes) / 2**30,
            "pinned_packed_gib": sum(blocks) / 2**30,
            "blocks": len(blocks),
        }
        rows.append(row)
        gib, one, packed = row["gib"], row["pinned_one_by_one_gib"], row["pinned_packed_gib"]
        ratios = f"{one:>5.2f} ×{one / gib:.2f} {packed:>5.2f} ×{packed / gib:.3f}"
        print(f"{name:<26} {len(sizes):>7} {gib:>7.2f} {ratios}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
