#!/usr/bin/env bash
# One command for a session that has a GPU: GPU tests, then every benchmark, tables under bench/results/.
#   bash bench/run_gpu.sh quick   # ~8 minutes on an H100: GPU tests + --quick benchmarks
#   bash bench/run_gpu.sh full    # the full kernel and model sweeps (run in several calls if time is short)
# Works offline: installs this checkout without dependencies (torch, triton, safetensors come with the image).
# Packs logs and tables into $OUT/results.tgz when OUT is set (the device tool's return folder).
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-quick}"
flag=$([ "$mode" = quick ] && echo --quick || echo "")
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
mkdir -p bench/results
log=bench/results/gpu_run.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  timeout 300 python3 -m pytest -q -m gpu tests -x -p no:cacheprovider
  for b in bench_nm bench_spmm bench_channel bench_models; do
    echo "== $b $flag"; timeout 600 python3 -m bench.$b $flag || echo "!! bench.$b exited with status $?"
  done
  python3 -m bench.plots
} 2>&1 | tee "$log"
if [ -n "${OUT:-}" ]; then  # the device tool returns at most 8 files: one archive
  tar czf "$OUT/results.tgz" bench/results && cp "$log" "$OUT/"
fi
