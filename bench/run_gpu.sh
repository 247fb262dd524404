#!/usr/bin/env bash
# One command for a session that has a GPU: GPU tests, then every benchmark, tables under bench/results/.
#   bash bench/run_gpu.sh [quick|full] [STEPS] [BUDGET_S]
#     quick (default): --quick benchmarks;  full: the whole kernel and model sweeps
#     STEPS: comma-separated subset of  tests,overhead,nm,spmm,channel,models,plots  (default: all, in that order)
#     BUDGET_S: wall-clock budget for the steps (default 540): each step's timeout is cut to the time left,
#               and a step that would start with under 20 s left is skipped and says so.
#   e.g. a 10-minute device call:  bash bench/run_gpu.sh quick tests,nm,spmm 540
#        and a second one:         bash bench/run_gpu.sh quick overhead,channel,models,plots 540
# Works offline: installs this checkout without dependencies (torch, triton, safetensors come with the image).
# When OUT is set (the device tool's return folder), bench/results is packed into $OUT/results.tgz and the log
# copied to $OUT/gpu_run.log after every step, so a call cut off by its time limit still returns what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-quick}"
steps=",${2:-tests,overhead,nm,spmm,channel,models,plots},"
budget="${3:-540}"
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "BUDGET_S must be a whole number of seconds, got '$budget'"; exit 2; }
deadline=$((SECONDS + budget))
status_file=$(mktemp)  # the steps run in a pipeline (| tee): a failure is recorded here for the exit status
flag=$([ "$mode" = quick ] && echo --quick || echo "")
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
mkdir -p bench/results
log=bench/results/gpu_run.log
: > "$log"

pack() {
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tgz" bench/results 2>/dev/null
    cp "$log" "$OUT/gpu_run.log"
  fi
}

# step NAME MAX_S CMD...: run CMD if NAME is selected, with timeout min(MAX_S, time left); then pack.
step() {
  local name=$1 max=$2
  shift 2
  [[ "$steps" == *",$name,"* ]] || return 0
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "!! skipped $name: ${left}s of the ${budget}s budget left"
    return 0
  fi
  local limit=$((max < left ? max : left))
  echo "== $name (limit ${limit}s, $((SECONDS))s elapsed)"
  timeout -k 10 "$limit" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "!! $name exited with status $rc$( { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo ' (time limit)')"
    echo "$name" >> "$status_file"
  fi
  pack
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  step tests 240 python3 -m pytest -q -m gpu tests --maxfail=10 -p no:cacheprovider
  step overhead 90 python3 -m bench.bench_overhead $flag
  step nm 240 python3 -m bench.bench_nm $flag
  step spmm 240 python3 -m bench.bench_spmm $flag
  step channel 180 python3 -m bench.bench_channel $flag
  step models 420 python3 -m bench.bench_models $flag
  step plots 30 python3 -m bench.plots
  echo "== done in ${SECONDS}s"
} 2>&1 | tee -a "$log"
pack  # again, now that tee has flushed the whole log
if [ -s "$status_file" ]; then
  echo "failed steps: $(tr '\n' ' ' < "$status_file")"
  rm -f "$status_file"
  exit 1
fi
rm -f "$status_file"
