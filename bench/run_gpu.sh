#!/usr/bin/env bash
# The GPU numbers in one command, sized for one call of the device tool (10 minutes at most per command).
#
#   bash bench/run_gpu.sh [headline|quick|full] [STEPS] [BUDGET_S]
#
#   headline (default): the headline numbers in one call, steps in this order, each with its own cap:
#       nm       2:4 vs dense cuBLAS, cuSPARSELt and CUTLASS (where PyTorch can run them) and Triton, fp16,
#                LLaMA shapes 4096x4096, 11008x4096, 4096x11008, 14336x4096 at M = 1, 4, 16, 2048
#       spmm     unstructured 50/70/90/95% at M = 1 and 16, bitmap (sparsecore_triton) and sliced-ELL
#                (sparsecore_sell) vs dense and torch CSR, 4096x4096 and 11008x4096
#       models   LLaMA-shaped decoder block (dim 4096) end to end, dense / 2:4 / unstructured 90%, batch 1
#                and 16, eager (under no_grad) and CUDA-graph replay
#       channel  ResNet-50 conv layers at 50% in x 50% out channels, batch 1 and 32
#       tests    the GPU tests (pytest -m gpu) with whatever time is left
#   quick / full: each bench's --quick / whole sweep (several calls: pick STEPS per call).
#   STEPS: comma-separated subset of overhead,nm,spmm,models,channel,plots,tests (default: the mode's list).
#   BUDGET_S: wall-clock budget of the whole script (default 540, for a call with timeout_s=570): a step's
#       cap is cut to the time left (less a reserve for the final packing); a step with under 20 s left is
#       skipped with a line saying so. A step is stopped with SIGINT (pytest still writes its report),
#       then killed 10 s later.
#
# No GPU (torch.cuda.is_available() false), or RUN_GPU_DRY=1 (GPUs hidden): a dry run of the same steps on
# tiny shapes (at most 90 s a step), writing and packing the same files, so a CPU machine can check that
# nothing breaks before the GPU parts.
#
# Offline: no package is downloaded. When this checkout does not import as is (the device tool copies the
# working tree without the `sparsecore/kernels` link), it is installed with pip --no-index --no-deps
# --no-build-isolation -e . (GPU only), else, or when that fails, put on PYTHONPATH through a folder of links.
# A step whose optional package is missing (matplotlib for plots; hypothesis, sklearn... for some test files)
# is skipped, or those test files ignored, with a line saying so.
#
# Output: the tables go to a fresh run folder (RUN_DIR, default a temporary one), never over bench/results.
# When OUT is set (the device tool's return folder), after every step three files are replaced atomically
# (written under a temporary name, then renamed): results.tar.gz (every table, gpu_run.log, SUMMARY.md,
# steps.txt, gpu_tests.xml), gpu_run.log and SUMMARY.md (the headline tables, from bench.summary).
# The commit column: SPARSECORE_COMMIT if set, else git here, else a hash of the source files (said so).
set -uo pipefail
export PYTHONUNBUFFERED=1
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2

mode="${1:-headline}"
case "$mode" in
  headline) default_steps=nm,spmm,models,channel,tests ;;
  quick|full) default_steps=overhead,nm,spmm,models,channel,plots,tests ;;
  *) echo "usage: bash bench/run_gpu.sh [headline|quick|full] [STEPS] [BUDGET_S]; got mode '$mode'" >&2; exit 2 ;;
esac
steps=",${2:-$default_steps},"
budget="${3:-540}"
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "BUDGET_S must be a whole number of seconds, got '$budget'" >&2; exit 2; }
for s in ${steps//,/ }; do
  [[ ",overhead,nm,spmm,models,channel,plots,tests," == *",$s,"* ]] \
    || { echo "unknown step '$s' (steps: overhead,nm,spmm,models,channel,plots,tests)" >&2; exit 2; }
done
deadline=$((SECONDS + budget))
reserve=15  # seconds kept for the last summary and packing
dry_cap=90  # a dry run's cap per step (about three times the slowest step on a busy 2-core machine)
dry=1       # set by main() from the first probe

run_dir="${RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sparsecore_gpu_run.XXXXXX")}"
mkdir -p "$run_dir" || exit 2
work=$(mktemp -d "${TMPDIR:-/tmp}/sparsecore_gpu_py.XXXXXX")
log="$run_dir/gpu_run.log"
steps_file="$run_dir/steps.txt"
: > "$log"
: > "$steps_file"
py_cwd="$repo"      # where python runs: this checkout, or the folder of links (PYTHONPATH fallback)
pytest_extra=()

py() { (cd "$py_cwd" && python3 "$@"); }

# One python start (torch's import costs seconds): "cuda=0|1", "importable=0|1" (whether `import sparsecore`
# and its kernels from $py_cwd resolve to this checkout's files) and a versions line.
probe() {
  py - "$repo" <<'EOF' 2>/dev/null
import os, sys
import torch
print("cuda=%d" % torch.cuda.is_available())
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "absent"
print("versions=python %s torch %s triton %s device %s" % (sys.version.split()[0], torch.__version__, triton_version,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"))
repo = os.path.realpath(sys.argv[1])
try:
    import sparsecore, sparsecore.kernels
    ok = (os.path.realpath(sparsecore.__file__) == os.path.join(repo, "sparsecore", "__init__.py")
          and os.path.realpath(sparsecore.kernels.__file__) == os.path.join(repo, "kernels", "__init__.py"))
except Exception:
    ok = False
print("importable=%d" % ok)
EOF
}

importable() { probe | grep -qx 'importable=1'; }

# PYTHONPATH fallback: a folder whose sparsecore/ links every entry of this checkout's sparsecore/, plus
# kernels/ (the package-dir mapping pyproject.toml gives pip), and bench/.
link_tree() {
  local shadow="$work/py"
  mkdir -p "$shadow/sparsecore"
  for f in "$repo"/sparsecore/*; do
    [ "$(basename "$f")" = kernels ] || ln -sfn "$f" "$shadow/sparsecore/$(basename "$f")"
  done
  ln -sfn "$repo/kernels" "$shadow/sparsecore/kernels"
  ln -sfn "$repo/bench" "$shadow/bench"
  py_cwd="$shadow"
  export PYTHONPATH="$shadow${PYTHONPATH:+:$PYTHONPATH}"
  pytest_extra=(-o pythonpath=)  # the ini pythonpath=["."] would put the checkout's sparsecore/ first
}

setup_python() {  # $1: the first probe's importable flag
  if [ -z "${RUN_GPU_PYTHONPATH:-}" ] && [ "$1" = 1 ]; then
    echo "python: this checkout imports as is"
    return 0
  fi
  if [ "$dry" = 0 ] && [ -z "${RUN_GPU_PYTHONPATH:-}" ]; then
    if timeout 180 python3 -m pip install -q --no-index --no-build-isolation --no-deps -e . && importable; then
      echo "python: installed this checkout (pip --no-index --no-deps --no-build-isolation -e .)"
      return 0
    fi
    echo "python: pip could not install this checkout; falling back to PYTHONPATH"
  fi
  link_tree
  if importable; then
    echo "python: this checkout on PYTHONPATH through $py_cwd"
  else
    echo "!! python: sparsecore does not import from this checkout; the steps below will fail"
  fi
}

missing_packages() {  # the optional packages among $@ that are not installed
  py -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@"
}

summarize() {
  py -m bench.summary "$run_dir" --steps "$steps_file" --out "$run_dir/SUMMARY.md" > /dev/null 2>>"$log" \
    || echo "!! summary failed (see the log)"
}

pack() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT" || return 0
  # tar exits 1 when a file changed while it was read (the log, still being written): the archive is whole.
  tar czf "$OUT/results.tar.gz.part" -C "$run_dir" --exclude='*.part' --warning=no-file-changed . 2>/dev/null
  [ $? -le 1 ] && mv -f "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
  cp "$log" "$OUT/gpu_run.log.part" && mv -f "$OUT/gpu_run.log.part" "$OUT/gpu_run.log"
  if [ -f "$run_dir/SUMMARY.md" ]; then
    cp "$run_dir/SUMMARY.md" "$OUT/SUMMARY.md.part" && mv -f "$OUT/SUMMARY.md.part" "$OUT/SUMMARY.md"
  fi
}

# step NAME CAP_S NEEDS CMD...: run CMD (from $py_cwd) if NAME is selected and the packages in NEEDS
# (comma-separated, or -) are installed, with a limit of min(CAP_S, time left - reserve); then record its
# status, rewrite the summary and pack.
step() {
  local name=$1 cap=$2 needs=$3
  shift 3
  [[ "$steps" == *",$name,"* ]] || return 0
  local left=$((deadline - SECONDS - reserve)) status rc t0
  if [ "$needs" != - ]; then
    local missing
    missing=$(missing_packages ${needs//,/ })
    if [ -n "$missing" ]; then
      echo "!! skipped $name: needs $missing (not installed)"
      echo "$name skipped(needs:${missing// /,}) 0" >> "$steps_file"
      return 0
    fi
  fi
  if [ "$left" -lt 20 ]; then
    echo "!! skipped $name: ${left}s of the ${budget}s budget left"
    echo "$name skipped(time) 0" >> "$steps_file"
    return 0
  fi
  [ "$dry" = 1 ] && [ "$cap" -gt "$dry_cap" ] && cap=$dry_cap  # tiny shapes: a step that takes longer hangs
  local limit=$((cap < left ? cap : left))
  echo "== $name (limit ${limit}s, ${SECONDS}s elapsed): $*"
  t0=$SECONDS
  (cd "$py_cwd" && timeout -s INT -k 10 "$limit" "$@")
  rc=$?
  status=ok
  if [ "$rc" -ne 0 ]; then
    status="failed(rc=$rc)"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -eq 130 ]; } && status="time-limit(${limit}s)"
    echo "!! $name: $status"
  fi
  echo "$name $status $((SECONDS - t0))" >> "$steps_file"
  summarize
  pack
}

# The pytest arguments of the tests step: test files that import a missing optional package are ignored.
test_args() {
  local args=(-m gpu -q -rfE -p no:cacheprovider --maxfail=20 --continue-on-collection-errors
              --junitxml="$run_dir/gpu_tests.xml" "${pytest_extra[@]}")
  local pkg f missing
  missing=$(missing_packages hypothesis safetensors sklearn mnist1d matplotlib pytest_benchmark)
  for pkg in $missing; do
    for f in $(grep -lE "^\s*(import|from) ${pkg}\b" "$repo"/tests/*.py 2>/dev/null); do
      echo "!! tests: ignoring $(basename "$f"): needs $pkg (not installed)" >&2
      args+=(--ignore="$f")
    done
  done
  printf '%s\n' "${args[@]}" "$repo/tests"
}

main() {
  echo "sparsecore run_gpu.sh $mode, steps ${steps:1:-1}, budget ${budget}s, run folder $run_dir"
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  local found
  if [ -n "${RUN_GPU_DRY:-}" ]; then
    export CUDA_VISIBLE_DEVICES=""  # every step sees no GPU, exactly as on a CPU machine
    echo "RUN_GPU_DRY is set: GPUs hidden"
  fi
  found=$(probe)
  echo "${found}" | sed -n 's/^versions=//p'
  if echo "$found" | grep -qx 'cuda=1'; then
    dry=0
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
  elif echo "$found" | grep -qx 'cuda=0'; then
    dry=1
    echo "DRY RUN: no CUDA device; every step runs on tiny CPU shapes, at most ${dry_cap}s each (this checks" \
         "the plumbing, not speed)"
  else
    echo "!! python3 cannot import torch: nothing can run"
    echo "setup failed(no-torch) 0" >> "$steps_file"
    return 1
  fi
  setup_python "$(echo "$found" | sed -n 's/^importable=//p')"
  if [ -n "${SPARSECORE_COMMIT:-}" ]; then
    echo "commit: $SPARSECORE_COMMIT (from SPARSECORE_COMMIT)"
  elif c=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null); then
    [ -z "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ] || c="$c-dirty"
    export SPARSECORE_COMMIT="$c"
    echo "commit: $c (from git)"
  else
    SPARSECORE_COMMIT=$(py -c 'from bench.common import source_digest; print(source_digest())' 2>/dev/null)
    export SPARSECORE_COMMIT="${SPARSECORE_COMMIT:-unknown-no-git}"
    echo "commit: $SPARSECORE_COMMIT (no git here: a hash of the source files;" \
         "run with SPARSECORE_COMMIT=<commit> to name it)"
  fi
  local out=(--out-dir "$run_dir") flag=() nm spmm models channel
  [ "$mode" = quick ] && flag=(--quick)
  if [ "$dry" = 1 ]; then
    nm=(--shapes 64x128 --ms 1,16 --providers dense,cusparselt,cutlass,triton_nm)
    spmm=(--shapes 48x96 --ms 1,16 --sparsities 50,90 --providers dense,torch_csr,sparsecore_triton,sparsecore_sell)
    models=(--preset tiny --models decoder_block --variants dense,2:4,unstructured90 --batches 2 --rep 3)
    channel=(--layers-only --batches 1)
  elif [ "$mode" = headline ]; then
    nm=(--shapes 4096x4096,11008x4096,4096x11008,14336x4096 --ms 1,4,16,2048
        --providers dense,cusparselt,cutlass,triton_nm)
    spmm=(--shapes 4096x4096,11008x4096 --ms 1,16 --sparsities 50,70,90,95
          --providers dense,torch_csr,sparsecore_triton,sparsecore_sell)
    models=(--models decoder_block --variants dense,2:4,unstructured90 --batches 1,16)
    channel=(--layers-only --batches 1,32)
  else
    nm=("${flag[@]}") spmm=("${flag[@]}") models=("${flag[@]}") channel=("${flag[@]}")
  fi
  local tests=()
  [[ "$steps" != *",tests,"* ]] || mapfile -t tests < <(test_args)
  step overhead 90 - python3 -m bench.bench_overhead "${flag[@]}" "${out[@]}"
  step nm 140 - python3 -m bench.bench_nm "${nm[@]}" "${out[@]}"
  step spmm 130 - python3 -m bench.bench_spmm "${spmm[@]}" "${out[@]}"
  step models 110 - python3 -m bench.bench_models "${models[@]}" "${out[@]}"
  step channel 60 - python3 -m bench.bench_channel "${channel[@]}" "${out[@]}"
  step plots 30 matplotlib python3 -m bench.plots --results "$run_dir" --out "$run_dir/plots"
  step tests 600 pytest python3 -m pytest "${tests[@]}"
  echo "== done in ${SECONDS}s"
  summarize
  cat "$run_dir/SUMMARY.md" 2>/dev/null
}

main 2>&1 | tee -a "$log"
pack  # again, now that tee has flushed the whole log
rm -rf "$work"
failed=$(grep -v ' ok ' "$steps_file" | grep -v 'skipped(needs' | cut -d' ' -f1 | tr '\n' ' ')
if [ -n "$failed" ]; then
  echo "steps not ok: $failed(tables and log: $run_dir${OUT:+, packed into $OUT})"
  exit 1
fi
echo "all steps ok (tables and log: $run_dir${OUT:+, packed into $OUT})"
