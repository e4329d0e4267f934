#!/usr/bin/env bash
# GPU suite: on a CUDA machine with CuPy (and PyTorch for the peer column),
# run the tests (GPU tests included, slow ones not) and the side-by-side
# benchmark (the per-step launch profile is computed without a GPU, by
# bench/gpu_step_profile.py on the emulated device); results land in
# bench/results/gpu-<device>.{json,md} and gpu-<device>-tests.log.
#   usage: bench/gpu_suite.sh [extra args for gpumlp.bench, e.g. --quick]
# Works offline: gpumlp is installed without dependencies (or, if pip cannot,
# imported from a temporary copy), so only CuPy, NumPy, Numba, tqdm (and
# pytest/hypothesis for the tests, torch for the peer) must already be there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

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

tests_rc=0
if $PY -c "import pytest" 2>/dev/null; then
  $PY -m pytest tests -m "not slow" -q -rs -p no:cacheprovider 2>&1 | tee "$out-tests.log"
  tests_rc=${PIPESTATUS[0]}
else
  echo "gpu_suite: pytest missing; tests skipped" | tee "$out-tests.log" >&2
fi
# Results are worth keeping even when a test fails: run the benchmarks regardless.
# cupy+graphs and the tensor-core variants: what decides whether --cuda-graphs becomes the default.
# --tta: seconds to 97.5 % and 98 % MNIST test accuracy (the issue's "98 % in < 1 s" target).
$PY -m gpumlp.bench --backends cupy,cupy+graphs,cupy+tf32,cupy+graphs+tf32,numba,torch,torch-graphs \
  --tta --json "$out.json" --markdown "$out.md" "$@"
bench_rc=$?
echo "gpu_suite: wrote $out.json, $out.md, $out-tests.log (tests rc=$tests_rc, bench rc=$bench_rc)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
