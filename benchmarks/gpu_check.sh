#!/usr/bin/env bash
# One device check for a fresh GPU machine (not yet timed on one: plan a lease of 15 minutes):
#   1. install: the project from its own files into a fresh venv; or, with --offline WHEELS (a
#      machine whose python3 already holds torch and reaches no package index), the wheels in WHEELS
#      (benchmarks/gpu_offline_wheels.txt says which and how to fetch them) into RESULTS_DIR/site,
#      put on PYTHONPATH with this checkout, then an import of everything the next steps need;
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
usage="usage: bash benchmarks/gpu_check.sh [--dry-run] [--offline WHEELS] [RESULTS_DIR]"
DRY=0
WHEELS=""
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --offline)
      if [[ $# -lt 2 || "$2" == --* ]]; then echo "--offline needs a folder of wheels; $usage" >&2; exit 2; fi
      WHEELS="$2"; shift 2 ;;
    --*) echo "unknown option $1; $usage" >&2; exit 2 ;;
    *)
      if [[ -n "$OUT" ]]; then echo "one results folder, got '$OUT' and '$1'; $usage" >&2; exit 2; fi
      OUT="$1"; shift ;;
  esac
done
OUT="${OUT:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
if [[ -n "$WHEELS" ]] && ! compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "no wheels in $WHEELS (benchmarks/gpu_offline_wheels.txt says how to fetch them)" >&2
  exit 1
fi
q() { printf "%q" "$1"; }  # a path as one shell word, spaces and quotes included
RUNS_OUT="$(q "$OUT")"
if [[ -n "$WHEELS" ]]; then
  SITE="$(q "$(pwd)/$OUT/site")"
  [[ "$OUT" == /* ]] && SITE="$(q "$OUT/site")"
  INSTALL="python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE \
$(q "$WHEELS")/*.whl && PYTHONPATH=$SITE:$(q "$(pwd)") python3 -c 'import torch, flwr, pydantic, omegaconf, tomli_w, \
resist_fl, client_app.app, server_app.app, simulations.inprocess; print(\"torch\", torch.__version__, \"flwr\", \
flwr.__version__, \"cuda\", torch.cuda.is_available())'"
  PY="PYTHONPATH=$SITE:$(q "$(pwd)") python3"
  BACKEND="inprocess"
  CLIENTS=""
else
  INSTALL="python3 -m venv .venv-gpu && . .venv-gpu/bin/activate && python -m pip install --quiet -e '.[dev]'"
  PY=". .venv-gpu/bin/activate && python"
  BACKEND="flwr"
  CLIENTS="--clients 1 2 4 8"
fi
RUN="benchmarks/gpu_flwr_run.py $RUNS_OUT --clients 4 --rounds 3 --backend $BACKEND --timeout 240"
STEPS=(
  "$INSTALL"
  "$PY -m pytest -q -p no:cacheprovider -m gpu tests/node/test_gpu.py"
  "$PY benchmarks/gpu_benchmark.py --device cuda --steps 10 $CLIENTS --json $(q "$OUT/gpu_benchmark.json")"
  "$PY $RUN --strategy resist --json $(q "$OUT/run-resist.json")"
  "$PY $RUN --strategy fedavg --json $(q "$OUT/run-fedavg.json")"
)
NAMES=(install gpu-tests gpu-benchmark run-resnet101-resist run-resnet101-fedavg)
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
  if [[ $i == 0 && $result == FAILED ]]; then break; fi  # nothing after it can run without the install
done
exit $status
