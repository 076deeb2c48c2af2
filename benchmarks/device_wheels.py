"""The wheels benchmarks/device_checks.sh installs on the lent GPU machine, in .whl/.

That machine has torch 2.11 (CUDA 13.0) but not diffusers or bitsandbytes, and nothing can be
fetched there. bitsandbytes' wheel carries a kernel library for every CUDA and ROCm release
(43 MB); with the repository (28 MB) that is past what a device call may carry (64 MiB), so
the libraries of other releases are dropped, leaving 3.6 MB.

    python benchmarks/device_wheels.py            # then carry .whl (ignored by git: add /.whl/ to .git/info/exclude)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = ("diffusers==0.42.1", "bitsandbytes==0.50.2")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
KEEP = {"cuda130", "cpu"}  # the device's torch is cu130; cpu is bitsandbytes' fallback


def download(folder: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(folder)]
    cmd += [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(cmd + list(WHEELS), check=True)


def drop_other_kernels(wheel: Path) -> int:
    """Rewrite `wheel` without the kernel libraries of CUDA/ROCm releases other than KEEP; the
    bytes saved. pip installs a wheel whose RECORD names files it lacks (it writes its own)."""
    tmp = wheel.with_suffix(".tmp")
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            lib = re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+)\.so", item.filename)
            if lib and lib.group(1) not in KEEP:
                continue
            zout.writestr(item, zin.read(item.filename))
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path(".whl"))
    args = p.parse_args()
    args.dir.mkdir(exist_ok=True)
    download(args.dir)
    for wheel in sorted(args.dir.glob("bitsandbytes-*.whl")):
        saved = drop_other_kernels(wheel)
        print(f"{wheel.name}: {saved / 2**20:.1f} MiB of other CUDA/ROCm releases' kernels dropped")
    total = sum(w.stat().st_size for w in args.dir.glob("*.whl"))
    print(f"{args.dir}: {total / 2**20:.1f} MiB of wheels")


if __name__ == "__main__":
    main()
