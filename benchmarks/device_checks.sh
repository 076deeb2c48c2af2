#!/usr/bin/env bash
# The GPU-only checks and figures of docs/benchmarks.md, in parts that each fit one call of the
# lent GPU machine (10 minutes a command; 15 minutes of device time a session, start included,
# a call within 30 s of the last finds the machine warm). In the order they matter:
#
#   bash benchmarks/device_checks.sh training    # the GPU tests of training and offload, then SDXL training rows:
#                                                # the preset, without its EMA, the static head set, the teacher
#                                                # offloaded, 8-bit AdamW (~5 min on an H200, ~50 s a row)
#   bash benchmarks/device_checks.sh training offload 8bit foreach ema-offload lora lora-offload   # named rows
#   bash benchmarks/device_checks.sh inference 1 # CUDA-only tests, then SDXL sampling at batch 1 (~4 min; default: 1 4, ~7 min)
#   INFERENCE_SETTINGS="stock+compile nitrofusion+compile" bash benchmarks/device_checks.sh inference 1
#   bash benchmarks/device_checks.sh training dmd2 dmd2-8bit no-ckpt
#
# Results go to $OUT (the device tool brings that folder back), else runs/device. diffusers and
# bitsandbytes are not installed on that machine: carry their wheels in .whl/ (python
# benchmarks/device_wheels.py: 10 MB, bitsandbytes without the kernels of other CUDA releases);
# each one whose package is missing there, or there in another version, is installed here.
set -euo pipefail
part=${1:?"which part: inference or training"}
out=${OUT:-runs/device}
mkdir -p "$out"
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

case $part in
inference)
    shift
    batches=("$@")
    [ ${#batches[@]} -gt 0 ] || batches=(1 4)
    # The tests that skip on CPU machines (CUDA graphs, pinned copies), before the figures.
    # A failing test must not cost the figures this scarce call is for: its output is kept, the run goes on.
    python3 -m pytest -q -p no:cacheprovider tests/test_fast_path.py -k "graphed or compiled_pipeline" \
        > "$out/cuda-tests.txt" 2>&1 || echo "CUDA-only tests FAILED: see cuda-tests.txt"
    tail -n 5 "$out/cuda-tests.txt"
    read -r -a settings <<< "${INFERENCE_SETTINGS:-stock nitrofusion+compile}"
    python3 benchmarks/sdxl_inference.py --batches "${batches[@]}" --settings "${settings[@]}" \
        --breakdown --profile "$out/traces" --out "$out/sdxl_inference.json"
    ;;
training)
    shift
    settings=("$@")
    [ ${#settings[@]} -gt 0 ] || settings=(preset no-ema static offload 8bit)
    # The GPU tests of training (20 s), before the rows; a failure is kept and the rows still run.
    python3 -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_optimizers.py \
        tests/test_host_memory.py -k "gpu" \
        > "$out/cuda-tests-training.txt" 2>&1 || echo "CUDA-only tests FAILED: see cuda-tests-training.txt"
    tail -n 3 "$out/cuda-tests-training.txt"
    python3 benchmarks/sdxl_training.py --warmup 2 --steps 6 --settings "${settings[@]}" \
        --out "$out/sdxl_training.json"
    ;;
*)
    echo "unknown part '$part': inference or training" >&2
    exit 2
    ;;
esac
