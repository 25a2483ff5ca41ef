#!/usr/bin/env bash
# The GPU checks in one call, for a lent GPU machine (see scripts/gpu_check.py for what each one proves):
#   device tool: run(command="bash scripts/gpu_check.sh", carry=["build/gpu_carry"])
# Prepare the carry here first with `make gpu-carry` (wheels for the server's settings, SST-2 dev).
# Results: a table on stdout and $OUT/gpu_check.json ($OUT is the device tool's output folder).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu_check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" 2>&1 \
  || echo "no nvidia-smi" > "$out/nvidia-smi.csv"
python="${PYTHON:-python3}"  # the device image's python3 holds PyTorch and ONNX Runtime
if ! "$python" -c "import pydantic_settings" 2>/dev/null && [ -d build/gpu_carry/wheels ]; then
  "$python" -m pip install -q --no-index --find-links build/gpu_carry/wheels pydantic-settings \
    || echo "could not install the carried wheels: the engine checks will skip"
fi
data=()
[ -f build/gpu_carry/dev.tsv ] && data=(--data build/gpu_carry/dev.tsv)
"$python" -m scripts.gpu_check --out "$out" "${data[@]}"
