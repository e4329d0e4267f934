"""The GEMMs of batch-4096 inference: NumPy's OpenBLAS against ONNX Runtime's MLAS, in one process.

For each matmul of the benchmark models' forward pass at batch 4096 (seed 784-100-10, wide
784-1024-1024-10) it times ``numpy.matmul`` into a preallocated output and ONNX Runtime running a
one-node ``MatMul`` graph (the weights as an initializer, ``CPUExecutionProvider``, the same thread
count), interleaved, best of the rounds, and prints GFLOP/s and the NumPy/ORT ratio (> 1: NumPy is
faster). The OpenBLAS kernel set in use (threadpoolctl's ``architecture``) heads the table, so runs
under different ``OPENBLAS_CORETYPE`` settings can be told apart, e.g.::

    python bench/predict_gemm.py                                             # as the environment says
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/predict_gemm.py  # OpenBLAS's own pick
    OPENBLAS_NUM_THREADS=1 python bench/predict_gemm.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

SHAPES = {  # (m, k, n) of x·W at batch 4096
    "seed": ((4096, 784, 100), (4096, 100, 10)),
    "wide": ((4096, 784, 1024), (4096, 1024, 1024), (4096, 1024, 10)),
}


def blas_arch() -> str:
    """OpenBLAS's kernel set and thread count as loaded (threadpoolctl), or '?' without it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "?"
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i.get('internal_api')} {i.get('architecture')} x{i.get('num_threads')}" for i in blas)


def ort_matmul(w: np.ndarray, threads: int):
    """A one-node ONNX Runtime session computing x @ w -> callable(x)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    onnx.checker.check_model(model)
    return lambda x: sess.run(None, {"x": x})[0]


def _seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _floor(ins, ws, outs) -> None:
    for a, w, o in zip(ins, ws, outs):
        np.matmul(a, w, out=o)


def predict_row(name: str, threads: int, rounds: int) -> str:
    """A table row: the numba backend's ``predict`` at batch 4096 vs ONNX Runtime on its export, and
    the model's matmuls alone (numpy.matmul, preallocated), interleaved, best of the rounds."""
    import onnxruntime as ort

    from gpumlp.bench.inference import MODELS
    from gpumlp.export import to_onnx
    from gpumlp.model import MLP

    spec, act, loss = MODELS[name]
    rng = np.random.default_rng(1)
    model = MLP(spec, act=act, loss=loss, backend="numba", seed=0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    onnx_bytes = to_onnx(model).SerializeToString()
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    X = rng.random((4096, model.n_features), dtype=np.float32)
    ws = [la.params["W"] for la in model.layers if "W" in la.params]
    outs = [np.empty((4096, w.shape[1]), np.float32) for w in ws]
    ins = [X] + [rng.random(o.shape, dtype=np.float32) for o in outs[:-1]]
    runs = {
        "numba": (model.predict, X),
        "ort": (sess.run, ["label"], {"input": X}),
        "floor": (_floor, ins, ws, outs),
    }
    assert (model.predict(X) == sess.run(["label"], {"input": X})[0]).mean() > 0.999
    times = {key: [] for key in runs}
    for _ in range(rounds):
        for key, (fn, *args) in runs.items():
            times[key].append(_seconds(fn, *args))
    t = {key: min(v) for key, v in times.items()}
    ratios = (t["ort"] / t["numba"], t["numba"] / t["floor"], t["ort"] / t["floor"])
    return (
        f"| {name} {spec} | {4096 / t['numba']:.3g} | {4096 / t['ort']:.3g} | "
        + " | ".join(f"{r:.2f}" for r in ratios)
        + " |"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    env = {k: os.environ.get(k, "(unset)") for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS")}
    print(f"OpenBLAS: {blas_arch()}; {env}; ORT threads {args.threads}\n")
    print("| model | m x k x n | numpy GFLOP/s | ORT GFLOP/s | numpy / ORT speed |")
    print("|---|---|---|---|---|")
    for model, shapes in SHAPES.items():
        for m, k, n in shapes:
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = rng.standard_normal((k, n)).astype(np.float32)
            out, run_ort = np.empty((m, n), np.float32), ort_matmul(w, args.threads)
            np.testing.assert_allclose(run_ort(x), np.matmul(x, w, out=out), rtol=1e-3, atol=1e-3)
            t_np, t_ort = [], []
            for _ in range(args.rounds):  # interleaved: load drifts hit both
                t_np.append(_seconds(np.matmul, x, w, out))
                t_ort.append(_seconds(run_ort, x))
            flops = 2.0 * m * k * n
            g_np, g_ort = flops / min(t_np) / 1e9, flops / min(t_ort) / 1e9
            print(f"| {model} | {m}x{k}x{n} | {g_np:.1f} | {g_ort:.1f} | {g_np / g_ort:.2f} |")
    print("\n| model, batch 4096 | numba predict img/s | ORT img/s | numba / ORT speed | numba × floor "
          "| ORT × floor |\n|---|---|---|---|---|---|")  # fmt: skip
    for name in SHAPES:
        print(predict_row(name, args.threads, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
