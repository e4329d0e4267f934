#!/usr/bin/env bash
# GPU suite: the first run on a CUDA machine, in one call (about 10 minutes on one H100/H200).
# Each step's output lands in bench/results/gpu-<device>-*; a failing step does not stop the others.
#   1. preflight: nvidia-smi, driver vs the CUDA of the installed CuPy wheel (cuda13 wheels need an
#      R580+ driver, else install the cuda12 extra), and the private CuPy API gpumlp uses;
#   2. the GPU tests (-m gpu, and every test parametrised on the cupy backend) twice: as is, and
#      with CUDA_LAUNCH_BLOCKING=1 (a failure that disappears when launches are serialised is an
#      ordering bug between streams or with the host);
#   3. compute-sanitizer --tool memcheck and --tool racecheck on a 2-epoch CUDA-graph training run,
#      where compute-sanitizer is installed;
#   4. 3 epochs of eager steps on our own GEMM vs CUDA-graph replays, constant lr: weights bit for bit;
#   5. epoch-1 test accuracy on full MNIST, cupy vs numba;
#   6. the side-by-side benchmark (bench/results/gpu-<device>.{json,md}), with --quick when less than
#      4 minutes of the budget ($GPU_SUITE_SECONDS, default 570) are left.
# (The per-step launch profile is computed without a GPU, by bench/gpu_step_profile.py on the
# emulated device.)
#   usage: bench/gpu_suite.sh [extra args for gpumlp.bench]
# Works offline: gpumlp is installed without dependencies (or, if pip cannot, imported from a
# temporary copy), so only CuPy, NumPy, Numba, tqdm (and pytest/hypothesis for the tests, torch for
# the peer) must already be there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
start=$SECONDS
budget=${GPU_SUITE_SECONDS:-570}

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
  if [ -n "$driver" ] && [ "${driver%%.*}" -lt 580 ] && $PY -m pip show -q cupy-cuda13x >/dev/null 2>&1; then
    echo "gpu_suite: driver $driver is older than R580, which CUDA 13 (cupy-cuda13x) needs:" \
      "pip uninstall cupy-cuda13x && pip install -e '.[cuda12]'" >&2
  fi
fi
$PY -c "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0" \
  || { echo "gpu_suite: needs CuPy and a usable CUDA GPU (pip install -e '.[cuda12]' or '.[cuda13]')" >&2; exit 2; }
$PY -c "import torch" 2>/dev/null || echo "gpu_suite: PyTorch missing; the torch column will be skipped" >&2

if ! $PY -c "import gpumlp.kernels" 2>/dev/null; then
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
    tmp=$(mktemp -d)  # kernels/ installs as gpumlp.kernels: rebuild that layout by copying
    cp -r gpumlp "$tmp/gpumlp" && cp -r kernels "$tmp/gpumlp/kernels"
    export PYTHONPATH="$tmp${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_suite: pip install failed; importing gpumlp from $tmp" >&2
  fi
fi

device=$($PY -c "import cupy, re; p = cupy.cuda.runtime.getDeviceProperties(0); \
print(re.sub(r'[^A-Za-z0-9]+', '-', p['name'].decode()).strip('-').lower())")
mkdir -p bench/results
out=bench/results/gpu-$device
checks="$out-checks.json"
: >"$checks"
summary=()

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log it, record its exit status
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== gpu_suite: $name" | tee -a "$out-suite.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$out-suite.log"
  rc=${PIPESTATUS[0]}
  summary+=("$name: rc=$rc ($((SECONDS - t0)) s)")
  return "$rc"
}
: >"$out-suite.log"

step preflight 120 $PY bench/gpu_checks.py preflight --json "$checks"

if $PY -c "import pytest" 2>/dev/null; then
  for blocking in 0 1; do
    tests=(tests -q -rs -p no:cacheprovider)
    if [ "$blocking" = 1 ]; then env=(env CUDA_LAUNCH_BLOCKING=1); else env=(env -u CUDA_LAUNCH_BLOCKING); fi
    step "tests -m gpu (CUDA_LAUNCH_BLOCKING=$blocking)" 150 "${env[@]}" $PY -m pytest "${tests[@]}" -m gpu
    step "tests -k cupy (CUDA_LAUNCH_BLOCKING=$blocking)" 240 "${env[@]}" $PY -m pytest "${tests[@]}" \
      -m "not slow" -k cupy
  done
else
  summary+=("tests: skipped (pytest missing)")
fi

sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
  "$($PY -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)"/nvidia/*/compute-sanitizer/compute-sanitizer \
  2>/dev/null | head -1)
if [ -n "$sanitizer" ]; then
  # everything a graph step can contain, on 2000 samples: 20 steps of 100 per epoch
  run=($PY -m gpumlp train --backend cupy --cuda-graphs --epochs 2 --limit 2000 --batch-size 100 --no-progress
    --spec 784-128-10 --optimizer adam --clip-norm 1 --dropout 0.2 --batchnorm --augment-shift 2
    --schedule constant --out "$(mktemp -d)")
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool" 150 "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit 50 \
      "${run[@]}"
  done
else
  summary+=("compute-sanitizer: not found (install the CUDA toolkit or nvidia-cuda-sanitizer-api); skipped")
fi

step "eager own GEMM vs graph replay, 3 epochs, bitwise" 180 $PY bench/gpu_checks.py bitwise --json "$checks"
step "epoch-1 accuracy on full MNIST, cupy vs numba" 240 $PY bench/gpu_checks.py accuracy --json "$checks"

# cupy+graphs and the tensor-core variants: what decides whether --cuda-graphs becomes the default.
# --tta: seconds to 97.5 % and 98 % MNIST test accuracy (the issue's "98 % in < 1 s" target).
left=$((budget - (SECONDS - start)))
quick=()
[ "$left" -lt 240 ] && quick=(--quick)
step "benchmark ${quick[*]}" $((left > 120 ? left : 120)) \
  $PY -m gpumlp.bench --backends cupy,cupy+graphs,cupy+tf32,cupy+graphs+tf32,numba,torch,torch-graphs \
  --tta "${quick[@]}" --json "$out.json" --markdown "$out.md" "$@"

printf '%s\n' "${summary[@]}" | tee "$out-summary.txt"
echo "gpu_suite: wrote $out-suite.log, $checks, $out-summary.txt, $out.json, $out.md ($((SECONDS - start)) s)"
! grep -qv "rc=0\|skipped\|not found" "$out-summary.txt"
