#!/usr/bin/env bash
# The GPU-only checks and figures of docs/benchmarks.md, in parts that each fit one call of the
# lent GPU machine (10 minutes a command; 15 minutes of device time a session, start included,
# a call within 30 s of the last finds the machine warm). In the order they matter:
#
#   bash benchmarks/device_checks.sh training    # the GPU tests of training and offload, then SDXL training rows:
#                                                # the preset, without its EMA, the static head set, the teacher
#                                                # offloaded, 8-bit AdamW (~5 min on an H200, ~50 s a row)
#   bash benchmarks/device_checks.sh training preset offload 8bit ema-offload foreach   # named rows
#   bash benchmarks/device_checks.sh inference 1 # CUDA-only tests, then SDXL sampling at batch 1 (~4 min; default: 1 4, ~7 min)
#   INFERENCE_SETTINGS="stock+compile nitrofusion+compile" bash benchmarks/device_checks.sh inference 1
#   SKIP_TESTS=1 bash benchmarks/device_checks.sh training preset lora   # a second call: rows only, no pytest
#   ARCH=sd3 SKIP_TESTS=1 bash benchmarks/device_checks.sh training preset no-ema lora   # the sd3 preset, SD3-Medium
#
# Results go to $OUT (the device tool brings that folder back), else runs/device. diffusers and
# bitsandbytes are not installed on that machine: carry their wheels in .whl/ (python
# benchmarks/device_wheels.py: 10 MB, bitsandbytes without the kernels of other CUDA releases);
# each one whose package is missing there, or there in another version, is installed here.
# Before rows with 8-bit AdamW a 2-second bitsandbytes smoke test runs; its failure is logged
# and the rows still run (they then report the error themselves).
set -euo pipefail
part=${1:?"which part: inference or training"}
out=${OUT:-runs/device}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 # nothing outside the machine can be reached: never wait on the hub
missing=()
for wheel in .whl/*.whl; do
    [ -e "$wheel" ] || continue
    package=$(basename "$wheel" | cut -d- -f1)
    version=$(basename "$wheel" | cut -d- -f2)
    have=$(python3 -c "import importlib.metadata as m; print(m.version('$package'))" 2>/dev/null || true)
    [ "$have" = "$version" ] || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${missing[@]}"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if ! error=$(python3 -c "import diffusers" 2>&1); then
    echo "diffusers does not import (${error##*$'\n'}): carry .whl (python benchmarks/device_wheels.py)" >&2
    exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

case $part in
inference)
    shift
    batches=("$@")
    [ ${#batches[@]} -gt 0 ] || batches=(1 4)
    # The tests that skip on CPU machines (CUDA graphs, pinned copies), before the figures.
    # A failing test must not cost the figures this scarce call is for: its output is kept, the run goes on.
    if [ "${SKIP_TESTS:-0}" != 1 ]; then
        python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests/test_fast_path.py \
            -k "graphed or compiled_pipeline" > "$out/cuda-tests.txt" 2>&1 ||
            echo "CUDA-only tests FAILED: see cuda-tests.txt"
        tail -n 5 "$out/cuda-tests.txt"
    fi
    read -r -a settings <<< "${INFERENCE_SETTINGS:-stock nitrofusion+compile}"
    python3 benchmarks/sdxl_inference.py --batches "${batches[@]}" --settings "${settings[@]}" \
        --breakdown --profile "$out/traces" --out "$out/sdxl_inference.json"
    ;;
training)
    shift
    settings=("$@")
    [ ${#settings[@]} -gt 0 ] || settings=(preset no-ema static offload 8bit)
    # The GPU tests of training (20 s), before the rows; a failure is kept and the rows still run.
    # One file that fails to import (e.g. bitsandbytes) must not lose the other files' tests.
    if [ "${SKIP_TESTS:-0}" != 1 ]; then
        python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests/test_offload.py \
            tests/test_optimizers.py tests/test_host_memory.py -k "gpu" > "$out/cuda-tests-training.txt" 2>&1 ||
            echo "CUDA-only tests FAILED: see cuda-tests-training.txt"
        tail -n 3 "$out/cuda-tests-training.txt"
    fi
    if [[ " ${settings[*]} " == *8bit* ]]; then # one 8-bit AdamW step on the GPU, before the rows that need it
        timeout 120 python3 - > "$out/bnb-smoke.txt" 2>&1 <<'EOF' || echo "bitsandbytes smoke test FAILED: see bnb-smoke.txt"
import bitsandbytes as bnb
import torch

p = torch.nn.Parameter(torch.randn(8192, device="cuda"))  # over 4,096 values: 8-bit moments
p.grad = torch.randn_like(p)
before = p.detach().clone()
opt = bnb.optim.AdamW8bit([p], lr=1e-3)
opt.step()
torch.cuda.synchronize()
assert not torch.equal(before, p.detach()), "the step left the parameter unchanged"
state = {k: (str(v.dtype), tuple(v.shape)) for k, v in opt.state[p].items() if torch.is_tensor(v)}
print(f"bitsandbytes {bnb.__version__}: one AdamW8bit step on CUDA: ok; state {state}")
EOF
        tail -n 1 "$out/bnb-smoke.txt"
    fi
    arch=${ARCH:-sdxl} # ARCH=sd3: the sd3 preset on SD3-Medium's architecture
    python3 benchmarks/sdxl_training.py --arch "$arch" --warmup 2 --steps 6 --settings "${settings[@]}" \
        --out "$out/${arch}_training.json"
    ;;
*)
    echo "unknown part '$part': inference or training" >&2
    exit 2
    ;;
esac
