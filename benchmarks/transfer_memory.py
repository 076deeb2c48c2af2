"""Peak memory of `nitrofusion transfer` at SDXL architecture: reading folders as memory-mapped
safetensors (now) against building each folder's UNet with `from_pretrained` (before).

Three SDXL-architecture UNets with random weights are written in fp16, as a hub cache holds
them: the base and the target as `unet/` folders, the student as a file. Each way runs in a
child process while this one samples the child's anonymous resident memory (RssAnon: what
the kernel cannot drop; pages mapped from a file are not counted, they are the page cache's).
`--width` scales the UNet's channels: the `from_pretrained` way holds two fp32 UNets beside
the result, about 25 GB at full SDXL size, so it runs only where `--baseline` is given. Both
ways write the same fp16 file.

    python benchmarks/transfer_memory.py --width 0.5 --baseline --out runs/transfer_memory-half.json
    python benchmarks/transfer_memory.py --out runs/transfer_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BEFORE = """
import sys, torch
from diffusers import UNet2DConditionModel
from nitrofusion.pipelines.loading import read_safetensors, save_state_dict
from nitrofusion.weights.transfer import transfer_delta
base, student, target, out = sys.argv[1:]
state = lambda d: UNet2DConditionModel.from_pretrained(d, use_safetensors=True).state_dict()
save_state_dict(transfer_delta(state(base), read_safetensors(student), state(target), dtype=torch.float16), out)
"""


def anonymous_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def peak_of(cmd: list[str]) -> tuple[int, float]:
    """(peak RssAnon in bytes, seconds) of a child process, sampled every 5 ms."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def watch() -> None:
        while child.poll() is None:
            try:
                peak[0] = max(peak[0], anonymous_bytes(child.pid))
            except (OSError, StopIteration):
                break
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    _, err = child.communicate()
    watcher.join()
    if child.returncode:
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-2000:]}")
    return peak[0], time.perf_counter() - start


def write_unets(root: Path, width: float) -> tuple[int, int]:
    """base/ and target/ folders and student.safetensors, fp16; (parameters, bytes of the result)."""
    from diffusers import UNet2DConditionModel

    from nitrofusion.models.builders import sdxl_base_configs
    from nitrofusion.pipelines.loading import save_state_dict

    config = sdxl_base_configs()["unet"]
    config["block_out_channels"] = [int(c * width) // 32 * 32 for c in config["block_out_channels"]]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).half()
    unet.save_pretrained(root / "base")
    unet.save_pretrained(root / "target")
    save_state_dict(unet.state_dict(), root / "student.safetensors")
    params = sum(p.numel() for p in unet.parameters())
    return params, 2 * params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=1.0, help="scale of SDXL's UNet channels")
    p.add_argument("--baseline", action="store_true", help="also run the from_pretrained way")
    p.add_argument("--out", default="runs/transfer_memory.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params, result = write_unets(root, args.width)
        inputs = [str(root / "base"), str(root / "student.safetensors"), str(root / "target")]
        now = [sys.executable, "-m", "nitrofusion.cli", "transfer", "--base", inputs[0], "--student", inputs[1]]
        now += ["--target", inputs[2], "--out", str(root / "now.safetensors"), "--dtype", "fp16"]
        ways = {"memory-mapped (now)": now}
        if args.baseline:
            ways["from_pretrained (before)"] = [sys.executable, "-c", BEFORE, *inputs, str(root / "before.safetensors")]
        rows = []
        print(f"SDXL UNet x{args.width:g}: {params / 1e9:.2f} B parameters, result {result / 2**30:.2f} GiB (fp16)")
        for name, cmd in ways.items():
            peak, seconds = peak_of(cmd)
            rows.append({"way": name, "peak_anonymous_gib": peak / 2**30, "x_result": peak / result, "s": seconds})
            print(
                f"{name:<26} peak anonymous {peak / 2**30:6.2f} GiB = {peak / result:4.2f}x the result, {seconds:.0f} s"
            )
    report = {"width": args.width, "parameters": params, "result_gib": result / 2**30, "rows": rows}
    report["torch"] = torch.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
