"""Inference throughput: ``predict`` / ``predict_proba`` images/s of the gpumlp backends beside
PyTorch and ONNX Runtime running the same model (exported with :mod:`gpumlp.export`), one process.

For each model every runner is first checked against the numpy backend on the largest batch
(labels and probabilities; a mismatch stops the run before anything is timed). Then, per batch
size, every runner is timed in interleaved rounds (one round times each runner once, so drifts in
the machine's load hit all of them alike) and the best round counts; the warm-up call is not timed.
A ``matmul floor`` runner times the model's matmuls alone at the batch shape (``numpy.matmul``
into preallocated outputs, the BLAS the CPU backends use): a runner's time over the floor is what
it spends beyond those GEMMs, and ONNX Runtime's shows how its own GEMM compares with that BLAS.
Where the numba backend's predict is one fused ``dense_chain`` (its own register-tiled products, the
row's ``inference_path``; a model's weights beyond the tiles' limit on OpenBLAS inside it), it can go
below that floor.

Peers, given the threads a fair peer gets: ONNX Runtime (``CPUExecutionProvider``,
``intra_op_num_threads`` = the core count, default graph optimisations) runs the ONNX export;
PyTorch (``torch.set_num_threads(cores)``, ``torch.inference_mode()``) the ``nn.Sequential`` of the
PyTorch export, its final probability layer left out for ``predict`` (arg-max of the scores, as
gpumlp does). Every runner takes the same C-contiguous NumPy batch and returns NumPy arrays.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from gpumlp.model import MLP

MODELS = {  # random-initialised (seed 0): throughput does not depend on the weights' values
    "seed": ("784-100-10", "sigmoid", "logistic"),
    "wide": ("784-1024-1024-10", "relu", "softmax_xent"),
}
QUICK_MODELS = ("seed",)
BATCHES = (1, 64, 4096)
OPS = ("predict", "predict_proba")
ORT, TORCH, FLOOR = "onnxruntime", "torch", "matmul floor"
POOLS = {ORT: ORT, TORCH: TORCH, "cupy": "cupy"}  # worker threads of each peer (gpumlp's: runner_pools)
PROBA_ATOL = 1e-4  # float32 GEMMs of different libraries sum in different orders
MIN_LABEL_AGREEMENT = 0.999  # near-ties may flip between libraries, nothing more
EMULATED = ("cuda-emu",)  # an emulated device: correct, but its speed means nothing
POOL_SETTLE_S = 0.25  # > the longest spin-wait of the pools here (Intel OpenMP's default blocktime: 0.2 s)
WARM_UP_S = 0.02  # untimed calls before each fn's timing in a round (see interleaved_best)


def ort_unavailable(dtype: str) -> str | None:
    """None when ONNX Runtime can run the export here, else why not (install hint included)."""
    if dtype != "float32":
        return "the ONNX export is float32; the inference comparison with ONNX Runtime needs --dtype float32"
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"ONNX Runtime is not installed ({e}); pip install 'gpumlp[onnx]'"
    return None


def gpumlp_runners(backends: Sequence[str]) -> list[str]:
    """The gpumlp backends (run options dropped: predict does not use them) whose predict is timed."""
    from gpumlp.bench.runner import PEERS, split_variant

    names = [split_variant(b)[0] for b in backends if b not in PEERS]
    return [b for b in dict.fromkeys(names) if b not in EMULATED]


def peer_setup(with_torch: bool, with_ort: bool) -> dict:
    """Versions and thread settings of the peers that run (the JSON's ``inference_peers``)."""
    cores = os.cpu_count() or 1
    out = {}
    if with_ort:
        import onnxruntime

        out[ORT] = {"version": onnxruntime.__version__, "intra_op_num_threads": cores,
                    "inter_op_num_threads": 1, "providers": ["CPUExecutionProvider"]}  # fmt: skip
    if with_torch:
        import torch

        torch.set_num_threads(cores)
        out[TORCH] = {"version": torch.__version__, "num_threads": torch.get_num_threads()}
    return out


def _ort_runner(model: MLP) -> dict[str, Callable]:
    import onnxruntime

    from gpumlp.export import to_onnx

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = os.cpu_count() or 1, 1
    sess = onnxruntime.InferenceSession(
        to_onnx(model).SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return {
        "predict": lambda X: sess.run(["label"], {"input": X})[0],
        "predict_proba": lambda X: sess.run(["probabilities"], {"input": X})[0],
    }


def _torch_runner(model: MLP) -> dict[str, Callable]:
    import torch

    from gpumlp.export import build_torch, torch_export

    net = build_torch(*torch_export(model))
    scores = net[:-1]  # without the final softmax / sigmoid

    def predict(X):
        with torch.inference_mode():
            return scores(torch.from_numpy(X)).argmax(1).numpy()

    def predict_proba(X):
        with torch.inference_mode():
            return net(torch.from_numpy(X)).numpy()

    return {"predict": predict, "predict_proba": predict_proba}


def _floor_runner(model: MLP) -> Callable:
    """The eval forward's matmuls alone, at batch X's shape, into outputs preallocated per batch."""
    weights = [la.params["W"] for la in model.layers if "W" in la.params]
    cache: dict[int, list] = {}

    def matmuls(X):
        ops = cache.get(X.shape[0])
        if ops is None:
            rng, ops, a = np.random.default_rng(0), [], X
            for W in weights:
                ops.append((a, W, np.empty((X.shape[0], W.shape[1]), dtype=W.dtype)))
                a = rng.standard_normal(ops[-1][2].shape).astype(W.dtype)
            cache[X.shape[0]] = ops
        for a, W, out in ops:
            np.matmul(a, W, out=out)
        return ops[-1][2]

    return matmuls


def build_runners(spec: str, act: str, loss: str, backends: Sequence[str], peers: Sequence[str],
                  dtype: str) -> dict[str, dict[str, Callable]]:  # fmt: skip
    """runner name -> {op: fn(host batch) -> host result}, all on the same weights (seed 0)."""
    runners = {}
    for b in backends:
        model = MLP(spec, act=act, loss=loss, dtype=dtype, backend=b, seed=0)
        runners[b] = {"predict": model.predict, "predict_proba": model.predict_proba}
    ref = MLP(spec, act=act, loss=loss, dtype=dtype, backend="numpy", seed=0)
    runners[FLOOR] = {"matmuls": _floor_runner(ref)}  # beside the CPU backends: the same BLAS threads
    if TORCH in peers:
        runners[TORCH] = _torch_runner(ref)
    if ORT in peers:
        runners[ORT] = _ort_runner(ref)
    return runners


def runner_pools(runners: dict) -> dict[str, tuple]:
    """runner name -> (the worker threads its calls run on, its ``inference_path`` for a gpumlp
    backend, else None): a peer's own pool; Numba's for a backend whose predict is one fused
    ``dense_chain``; BLAS's for the rest (the floor's matmuls, layer-by-layer predicts). A gpumlp
    runner's ``predict`` is its model's bound method (:func:`build_runners`)."""
    out = {}
    for name, ops in runners.items():
        if name in POOLS or name == FLOOR:
            out[name] = (POOLS.get(name, "blas"), None)
            continue
        path = ops["predict"].__self__.inference_path
        out[name] = ("numba" if path == "dense_chain" else "blas", path)
    return out


def check_runners(runners: dict, ref: MLP, X: np.ndarray) -> dict[str, dict]:
    """Each runner's labels and probabilities against the numpy backend's on X; -> per runner
    {max_abs_diff, label_agreement}. Raises before anything is timed when one is wrong."""
    want_p, want_y = ref.predict_proba(X), ref.predict(X)
    out = {}
    for name, ops in runners.items():
        if name == FLOOR:
            continue
        p, y = ops["predict_proba"](X), np.asarray(ops["predict"](X))
        diff = float(np.max(np.abs(p - want_p)))
        agree = float(np.mean(y == want_y))
        if not (p.shape == want_p.shape and diff <= PROBA_ATOL and agree >= MIN_LABEL_AGREEMENT):
            raise RuntimeError(
                f"inference bench: {name} disagrees with the numpy backend on {ref.config()['spec']}: "
                f"max |probability difference| {diff:.3g} (limit {PROBA_ATOL}), labels agree on "
                f"{100 * agree:.2f}% (limit {100 * MIN_LABEL_AGREEMENT:.1f}%)"
            )
        out[name] = {"max_abs_diff": diff, "label_agreement": agree}
    return out


def interleaved_best(fns: dict[str, Callable[[], object]], repeats: int, inner: int,
                     pool: Callable[[str], str] = str) -> dict[str, float]:  # fmt: skip
    """Best seconds per call of each fn over ``repeats`` rounds; one round times ``inner`` calls of
    every fn in turn, each right after untimed warm-up calls (WARM_UP_S of them, at least one).
    Where ``pool(key)`` (the worker thread pool a fn runs on) changes, first a pause of
    POOL_SETTLE_S: the last pool's threads spin-wait for work a while after their last task, and on
    a small machine they would take the cores from the next pool's threads (measured: numba's
    predict at batch 64, 0.08 ms alone, took 25-65 ms per call right after a PyTorch call on 2
    cores). After the pause the cores need a few ms to come back to speed, hence the warm-up by
    time: one call was not enough (numba's seed predict at batch 4096, the calls after a pause:
    2.37, 1.97, 1.90, 1.86, 1.81, 1.74 ms, medians of 12 pauses), and whichever fn came first after
    a pause was timed slow."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        last = None
        for key, fn in fns.items():
            if pool(key) != last:
                time.sleep(POOL_SETTLE_S)
                last = pool(key)
            warm_until = time.perf_counter() + WARM_UP_S
            fn()
            while time.perf_counter() < warm_until:
                fn()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best[key] = min(best[key], (time.perf_counter() - t0) / inner)
    return best


def time_inference(model_name: str, X: np.ndarray, backends: Sequence[str], peers: Sequence[str],
                   dtype: str, repeats: int, batches: Sequence[int] = BATCHES) -> list[dict]:  # fmt: skip
    """Rows of images/s per (batch, op, runner) for one of MODELS, with ratios to ONNX Runtime,
    PyTorch and the matmul floor. X: host images (n >= max(batches), 784), pixels as the model takes
    them."""
    spec, act, loss = MODELS[model_name]
    runners = build_runners(spec, act, loss, backends, peers, dtype)
    pools = runner_pools(runners)
    X = np.ascontiguousarray(X, dtype=dtype)
    checks = check_runners(runners, MLP(spec, act=act, loss=loss, dtype=dtype, backend="numpy", seed=0),
                           X[: max(batches)])  # fmt: skip
    rows = []
    for batch in batches:
        xb = X[:batch]
        fns = {(name, op): (lambda fn=fn, xb=xb: fn(xb)) for name, ops in runners.items()
               for op, fn in ops.items()}  # fmt: skip
        inner = max(1, 512 // batch)  # a timing of a few ms at least, for the timer and the scheduler
        best = interleaved_best(fns, repeats, inner, pool=lambda key: pools[key[0]][0])
        floor = best[(FLOOR, "matmuls")]
        for (name, op), seconds in best.items():
            row = {"model": model_name, "spec": spec, "act": act, "loss": loss, "dtype": dtype,
                   "batch": batch, "op": op, "runner": name, "seconds": seconds,
                   "images_per_s": batch / seconds, "x_floor": seconds / floor, "repeats": repeats,
                   "inner": inner, **checks.get(name, {})}  # fmt: skip
            if pools[name][1] is not None:
                row["inference_path"] = pools[name][1]
            for peer in (ORT, TORCH):
                if (peer, op) in best:
                    row[f"vs_{peer}"] = best[(peer, op)] / seconds  # throughput ratio: > 1 is faster
            rows.append(row)
    return rows
