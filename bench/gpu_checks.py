"""The checks of bench/gpu_suite.sh that need Python, one subcommand each; each prints one JSON line
(also appended to ``--json``) and exits 1 when its check fails.

- ``preflight``: GPU, driver and CUDA versions (the driver must support the CUDA of the installed
  CuPy wheel: cuda13 wheels need an R580+ driver, else install the cuda12 extra), CuPy's version,
  and the private CuPy API gpumlp relies on (the compute-type switch, stream capture, graphs).
- ``bitwise``: 3 epochs with a constant learning rate, eager steps on our own GEMM vs CUDA-graph
  replays: the weights must be identical bit for bit (the loss may differ in its last bits: float
  atomics add it up in any order).
- ``accuracy``: one epoch on full MNIST on this backend and on numba, same seed: test accuracies
  within ``--tolerance`` percentage points.

``--backend cuda-emu`` runs ``bitwise`` and ``accuracy`` on the emulated device (for trying the script
without a GPU; use ``--limit`` and a small ``--spec`` there).
Usage: ``python bench/gpu_checks.py preflight|bitwise|accuracy [--json FILE]``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import numpy as np

from gpumlp.backend import get_backend, make_cuda_backend
from gpumlp.data import load_mnist, scale_pixels
from gpumlp.model import MLP

# CUDA major version -> the oldest Linux driver branch that runs it (CUDA's release notes).
MIN_DRIVER = {12: 525, 13: 580}
# everything a graph step can contain: Adam, clipping, dropout, batch norm, shifts
STEP = dict(optimizer="adam", lr=1e-3, clip_norm=1.0, augment_shift=2, batch_size=100, schedule="constant")
MODEL = dict(act="relu", dropout=0.2, batchnorm=True)


def preflight(args) -> dict:
    """Versions and the private API; ok when the driver runs this CuPy's CUDA and the API is there."""
    import cupy

    from gpumlp.kernels.cupy_gpu import compute_type_switch

    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    runtime, driver = rt.runtimeGetVersion(), rt.driverGetVersion()  # e.g. 13000 = CUDA 13.0
    wheels = [d for d in ("cupy-cuda13x", "cupy-cuda12x", "cupy") if _installed(d)]
    problems = []
    if driver < runtime // 1000 * 1000:
        need = MIN_DRIVER.get(runtime // 1000, "a newer")
        problems.append(
            f"the driver supports CUDA {driver // 1000}.{driver % 1000 // 10} but CuPy is built for CUDA "
            f"{runtime // 1000}.{runtime % 1000 // 10}: update the driver to R{need}+ or, for cuda13 wheels "
            "on an older driver, pip uninstall cupy-cuda13x && pip install -e '.[cuda12]'"
        )
    if compute_type_switch(cupy) is None:
        problems.append("cupy._core._routines_linalg lacks set/get_compute_type or COMPUTE_TYPE_*")
    for path in ("cuda.Stream.begin_capture", "cuda.Stream.is_capturing", "cuda.graph.Graph.launch"):
        obj = cupy
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            problems.append(f"cupy.{path} is missing")
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {
        "gpu": name,
        "compute_capability": f"{props['major']}.{props['minor']}",
        "cuda_runtime": runtime,
        "cuda_driver": driver,
        "cupy": cupy.__version__,
        "wheels": wheels,
        "ok": not problems,
        "problems": problems,
    }


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _mnist(limit: int | None):
    d = load_mnist(download=False)
    n = limit or len(d.y_train)
    x_tr, x_te = scale_pixels(d.x_train[:n], "-1,1"), scale_pixels(d.x_test, "-1,1")
    return x_tr, d.y_train[:n], x_te, d.y_test


def bitwise(args) -> dict:
    """Eager (own GEMM) vs graph replay, 3 epochs, constant lr: weights bit for bit."""
    be = make_cuda_backend(args.backend, gemm="own")
    X, y, *_ = _mnist(args.limit or 10_000)
    runs = {}
    for graphs in (False, True):
        model = MLP(args.spec, **MODEL, backend=be, seed=7)
        t = time.perf_counter()
        hist = model.fit(X, y, epochs=3, seed=7, cuda_graphs=graphs, **STEP)
        runs[graphs] = (hist["loss"], model.state_arrays(), time.perf_counter() - t)
    differ = [k for k, w in runs[False][1].items() if not np.array_equal(w, runs[True][1][k])]
    loss_eager, loss_graph = np.array(runs[False][0]), np.array(runs[True][0])
    return {
        "samples": len(y),
        "weights_differ": differ,
        "loss_eager": loss_eager.tolist(),
        "loss_graphs": loss_graph.tolist(),
        "seconds_eager": runs[False][2],
        "seconds_graphs": runs[True][2],
        "ok": not differ and bool(np.allclose(loss_graph, loss_eager, rtol=1e-6)),
    }


def accuracy(args) -> dict:
    """Test accuracy after one epoch here and on numba, same model, data and seed."""
    x_tr, y_tr, x_te, y_te = _mnist(args.limit)
    acc = {}
    for name in (args.backend, "numba"):
        be = get_backend(name) if name == "numba" else make_cuda_backend(name)
        model = MLP(args.spec, **MODEL, backend=be, seed=3)
        model.fit(x_tr, y_tr, epochs=1, seed=3, **STEP)
        acc[name] = float(model.score(x_te, y_te))
    gap = 100 * abs(acc[args.backend] - acc["numba"])
    return {"samples": len(y_tr), "accuracy": acc, "gap_points": gap, "ok": gap <= args.tolerance}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=("preflight", "bitwise", "accuracy"))
    ap.add_argument("--backend", default="cupy", choices=("cupy", "cuda-emu"))
    ap.add_argument("--limit", type=int, help="training rows (default: bitwise 10000, accuracy all 60000)")
    ap.add_argument("--spec", default="784-256-128-10", help="layer widths of the model trained")
    ap.add_argument("--tolerance", type=float, default=0.5, help="accuracy: max gap in percentage points")
    ap.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    args = ap.parse_args(argv)
    result = {"check": args.check, "backend": args.backend, **globals()[args.check](args)}
    line = json.dumps(result)
    print(line)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
