#!/usr/bin/env bash
# One device check for a fresh GPU machine, within a short lease (< 8 min):
#   1. install: the project from its own files into a fresh venv; or, with --offline WHEELS (a
#      machine whose python3 already holds torch and reaches no package index), the wheels in WHEELS
#      (flwr and the project's other missing dependencies) into that python3, with no index;
#   2. the GPU tests (pytest -m gpu);
#   3. benchmarks/gpu_benchmark.py: true fp32 / TF32 / bf16 + channels_last images/s, the data share
#      (and, online, 1 / 2 / 4 / 8 clients sharing the GPU through flwr run, which needs Ray);
#   4-5. a 3-round federated run of PreActResNet-101 (width 64) with 4 clients on the one GPU, ResIST
#      then FedAvg: through flwr run online, in-process offline (no Ray; the clients one after the
#      other, see benchmarks/gpu_flwr_run.py).
# Everything goes to one results directory (default gpu-check-<UTC time>/): each step's output,
# the figures as JSON (gpu_benchmark.json, run-resist.json, run-fedavg.json) and nvidia-smi's card.
# --dry-run prints the steps and checks what they need, runs nothing.
#   bash benchmarks/gpu_check.sh [--dry-run] [--offline WHEELS] [RESULTS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
WHEELS=""
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --offline) WHEELS="${2:?--offline needs a folder of wheels}"; shift 2 ;;
    *) echo "unknown option $1 (expected --dry-run or --offline WHEELS)" >&2; exit 2 ;;
  esac
done
OUT="${1:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
if [[ -n "$WHEELS" ]]; then
  INSTALL="python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir '$WHEELS'/*.whl"
  PY="python3"
  BACKEND="inprocess"
  CLIENTS=""
else
  INSTALL="python3 -m venv .venv-gpu && . .venv-gpu/bin/activate && python -m pip install --quiet -e '.[dev]'"
  PY=". .venv-gpu/bin/activate && python"
  BACKEND="flwr"
  CLIENTS="--clients 1 2 4 8"
fi
RUN="benchmarks/gpu_flwr_run.py '$OUT' --clients 4 --rounds 3 --backend $BACKEND"
STEPS=(
  "$INSTALL"
  "$PY -m pytest -q -p no:cacheprovider -m gpu tests/node/test_gpu.py"
  "$PY benchmarks/gpu_benchmark.py --device cuda --steps 20 $CLIENTS --json '$OUT/gpu_benchmark.json'"
  "$PY $RUN --strategy resist --json '$OUT/run-resist.json'"
  "$PY $RUN --strategy fedavg --json '$OUT/run-fedavg.json'"
)
NAMES=(install gpu-tests gpu-benchmark run-resnet101-resist run-resnet101-fedavg)
if [[ $DRY == 1 ]]; then
  for file in pyproject.toml tests/node/test_gpu.py benchmarks/gpu_benchmark.py benchmarks/gpu_flwr_run.py; do
    [[ -f "$file" ]] || { echo "missing $file" >&2; exit 1; }
  done
  if [[ -n "$WHEELS" ]]; then
    compgen -G "$WHEELS/*.whl" > /dev/null || { echo "no wheels in $WHEELS" >&2; exit 1; }
  fi
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
