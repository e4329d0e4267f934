#!/usr/bin/env bash
# GPU suite: on a CUDA machine with CuPy (and PyTorch for the peer column),
# run the tests (GPU tests included, slow ones not), then the side-by-side
# benchmark; results land in bench/results/gpu-<device>.{json,md}.
#   usage: bench/gpu_suite.sh [extra args for gpumlp.bench, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

$PY -c "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0" \
  || { echo "gpu_suite: needs CuPy and a usable CUDA GPU (pip install -e '.[cuda12]' or '.[cuda13]')" >&2; exit 2; }
$PY -c "import torch" 2>/dev/null || echo "gpu_suite: PyTorch missing; the torch column will be skipped" >&2

device=$($PY -c "import cupy, re; p = cupy.cuda.runtime.getDeviceProperties(0); \
print(re.sub(r'[^A-Za-z0-9]+', '-', p['name'].decode()).strip('-').lower())")
mkdir -p bench/results
out=bench/results/gpu-$device

$PY -m pytest tests -m "not slow" -q -rs 2>&1 | tee "$out-tests.log"
$PY -m gpumlp.bench --backends cupy,torch --json "$out.json" --markdown "$out.md" "$@"
echo "gpu_suite: wrote $out.json, $out.md, $out-tests.log"
