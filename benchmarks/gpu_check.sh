#!/usr/bin/env bash
# One device check for a fresh GPU machine with nothing installed, within a short lease (< 8 min):
#   1. install the project from its own files into a fresh venv;
#   2. the GPU tests (pytest -m gpu);
#   3. benchmarks/gpu_benchmark.py: true fp32 / TF32 / bf16 + channels_last images/s, the data share,
#      1 / 2 / 4 / 8 clients sharing the GPU;
#   4. a 3-round flwr run of PreActResNet-101 (width 64) with 4 clients on the one GPU.
# Everything goes to one results directory (default gpu-check-<UTC time>/): each step's output and
# nvidia-smi's card name. --dry-run prints the steps and checks what they need, runs nothing.
#   bash benchmarks/gpu_check.sh [--dry-run] [RESULTS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
STEPS=(
  "python3 -m venv .venv-gpu && . .venv-gpu/bin/activate && python -m pip install --quiet -e '.[dev]'"
  ". .venv-gpu/bin/activate && python -m pytest -q -m gpu tests/node/test_gpu.py"
  ". .venv-gpu/bin/activate && python benchmarks/gpu_benchmark.py --device cuda --steps 10 --clients 1 2 4 8"
  ". .venv-gpu/bin/activate && python benchmarks/gpu_flwr_run.py '$OUT' --clients 4 --rounds 3"
)
NAMES=(install gpu-tests gpu-benchmark flwr-run-resnet101)
if [[ $DRY == 1 ]]; then
  for file in pyproject.toml tests/node/test_gpu.py benchmarks/gpu_benchmark.py benchmarks/gpu_flwr_run.py; do
    [[ -f "$file" ]] || { echo "missing $file" >&2; exit 1; }
  done
  for i in "${!STEPS[@]}"; do echo "step $((i + 1)) ${NAMES[$i]} -> $OUT/${NAMES[$i]}.txt: ${STEPS[$i]}"; done
  exit 0
fi
mkdir -p "$OUT"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi unavailable") > "$OUT/card.txt"
status=0
for i in "${!STEPS[@]}"; do
  start=$(date +%s)
  if bash -c "${STEPS[$i]}" > "$OUT/${NAMES[$i]}.txt" 2>&1; then result=ok; else result=FAILED; status=1; fi
  echo "${NAMES[$i]}: $result in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
done
exit $status
