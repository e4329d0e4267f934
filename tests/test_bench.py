"""gpumlp bench: FLOP counts by hand, and a --quick run end to end with its JSON schema checked."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from gpumlp.bench import epoch_flops, kernel_bytes, step_flops
from gpumlp.bench.report import compare, render
from gpumlp.optim import RULES


def test_epoch_flops_seed_by_hand():
    # 784-100-10: layer 1 forward + dW (no dX): 2 * (2*784*100) = 313,600 per sample;
    # layer 2 forward + dW + dX: 3 * (2*100*10) = 6,000 per sample.
    assert epoch_flops([784, 100, 10], 1) == 319_600
    assert epoch_flops([784, 100, 10], 55_000) == 17_578_000_000
    assert epoch_flops("784-100-10".split("-"), 55_000) == 17_578_000_000


def test_epoch_flops_deep_by_hand():
    # 784-1024-1024-10 per sample: 2*2*784*1024 + 3*2*1024*1024 + 3*2*1024*10
    per_sample = 3_211_264 + 6_291_456 + 61_440
    assert per_sample == 9_564_160
    assert epoch_flops([784, 1024, 1024, 10], 55_000) == 55_000 * per_sample
    assert step_flops([784, 1024, 1024, 10], 256) == 256 * per_sample


@pytest.mark.parametrize("spec", ["784-100-10", "784-1024-1024-10"])
def test_step_matmuls_are_the_matmuls_a_training_step_runs(spec):
    """The floor times exactly the matmul calls of a real step: same shapes, same transposes."""
    from gpumlp.backend import Backend
    from gpumlp.bench.flops import step_matmuls
    from gpumlp.kernels import reference
    from gpumlp.model import MLP

    calls = []

    def recording_matmul(a, b, out=None, trans_a=False, trans_b=False):
        calls.append((a.shape, b.shape, trans_a, trans_b))
        return reference.matmul(a, b, out=out, trans_a=trans_a, trans_b=trans_b)

    recording = Backend("numpy", np, types.SimpleNamespace(**{**vars(reference), "matmul": recording_matmul}))
    model = MLP(spec, act="relu", backend=recording)
    x = np.random.default_rng(0).standard_normal((32, model.n_features)).astype(np.float32)
    scores = model.forward(x, train=True)
    _, grad = model.loss(model.be, scores, np.zeros(32, np.int32))
    calls.clear()  # one step: forward and backward
    model.forward(x, train=True)
    model.backward(grad)
    assert calls == step_matmuls([int(w) for w in spec.split("-")], 32)


def test_kernel_bytes_by_hand():
    assert kernel_bytes("bias_act", (256, 1024), 4) == (2 * 256 * 1024 + 1024) * 4
    assert kernel_bytes("act_grad", (256, 1024), 4) == 3 * 256 * 1024 * 4
    assert kernel_bytes("adam_step", (10, 10), 8) == 7 * 100 * 8
    assert kernel_bytes("permutation", (55000,), 4) == 4 * 55000
    assert kernel_bytes("softmax_xent", (256, 10), 4, label_itemsize=4) == 2 * 2560 * 4 + 256 * 4
    with pytest.raises(ValueError):
        kernel_bytes("nope", (1,), 4)


def _positive_finite(obj, where: str) -> None:
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        assert math.isfinite(obj) and obj > 0, f"{where} = {obj!r} is not positive and finite"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _positive_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _positive_finite(v, f"{where}[{i}]")


@pytest.fixture(scope="module")
def quick_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out.json"
    cmd = [sys.executable, "-m", "gpumlp.bench", "--quick", "--backends", "numpy,numba,torch"]
    cmd += ["--samples", "2000", "--json", str(out), "--no-progress"]  # 2000 samples keeps it short
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Epoch time" in proc.stdout
    return json.loads(out.read_text()), proc


def test_quick_run_schema(quick_json):
    res, proc = quick_json
    for key in ("schema", "machine", "configs", "peaks", "epochs", "kernels", "backends", "skipped"):
        assert key in res, key
    for key in ("cpu_model", "cores", "blas", "env", "versions"):
        assert key in res["machine"], key
    assert {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"} <= set(res["machine"]["env"])
    assert res["peaks"]["cpu"]["gemm_gflops"] > 0 and res["peaks"]["cpu"]["copy_gbs"] > 0
    assert "numpy" in res["backends"]
    ran = {e["backend"] for e in res["epochs"]}
    assert ran == set(res["backends"])
    for name in ("numba", "torch"):
        if name in res["skipped"]:
            assert name not in ran
            print(f"{name} skipped: {res['skipped'][name]}")
    if importlib.util.find_spec("torch") is None:
        assert "torch" in res["skipped"]
    for e in res["epochs"]:
        for key in ("config", "backend", "median", "min", "max", "q1", "q3", "seconds", "repeats", "gflops"):
            assert key in e, key
        assert e["min"] <= e["median"] <= e["max"] and len(e["seconds"]) == e["repeats"]
        assert "vs_numpy" in e
        assert ("vs_torch" in e) == ("torch" in ran)
    # the floor (the epoch's matmuls alone) is timed between each backend's epochs, on its device,
    # one floor epoch per timed epoch, and that backend's x_floor is against that floor
    floors = [(f["config"], f["backend"], f["device"], len(f["seconds"])) for f in res["floors"]]
    assert floors == [(e["config"], e["backend"], e["device"], e["repeats"]) for e in res["epochs"]]
    for e, f in zip(res["epochs"], res["floors"]):
        assert e["floor_seconds"] == f["median"]
        assert e["x_floor"] == pytest.approx(e["median"] / f["median"])
    kernels = {r["kernel"] for r in res["kernels"]}
    assert {"matmul", "bias_act", "act_grad", "softmax_xent", "permutation"} <= kernels
    # every optimizer of the table is timed, each under its own name where kernels are shared
    timed = {(r["kernel"], r["variant"]) for r in res["kernels"]}
    assert {(rule.kernel, "" if rule.kernel == f"{n}_step" else n) for n, rule in RULES.items()} <= timed
    numeric = {k: res[k] for k in ("peaks", "configs", "epochs", "kernels", "floors")}
    for e in numeric["epochs"]:
        e.pop("first_epoch_extra_seconds")  # may be 0 when the first epoch was not slower
    _positive_finite(numeric, "res")
    _positive_finite(res["jit_seconds"], "jit_seconds")


def test_quick_run_inference_section(quick_json):
    """predict / predict_proba images/s at batch 1, 64, 4096 for every CPU backend, the PyTorch and
    ONNX Runtime peers (core-count threads) and the matmul floor, with ratios from the same run."""
    res, proc = quick_json
    assert "Inference throughput" in proc.stdout
    rows = res["inference"]
    ours = [b for b in ("numpy", "numba") if b in res["backends"]]
    peers = [p for p in ("torch",) if p in res["backends"]]
    if importlib.util.find_spec("onnxruntime") is None:
        assert "onnxruntime" in res["skipped"]
    else:
        peers.append("onnxruntime")
        assert res["inference_peers"]["onnxruntime"]["intra_op_num_threads"] == os.cpu_count()
    if "torch" in peers:
        assert res["inference_peers"]["torch"]["num_threads"] == os.cpu_count()
    keys = [(r["model"], r["batch"], r["op"], r["runner"]) for r in rows]
    expected = [
        ("seed", b, op, r) for b in (1, 64, 4096) for op in ("predict", "predict_proba") for r in ours + peers
    ]
    expected += [("seed", b, "matmuls", "matmul floor") for b in (1, 64, 4096)]
    assert sorted(keys) == sorted(expected)  # each exactly once
    by = {k: r for k, r in zip(keys, rows)}
    for (model, batch, op, runner), r in by.items():
        assert r["images_per_s"] == pytest.approx(batch / r["seconds"]) and r["images_per_s"] > 0
        assert r["x_floor"] == pytest.approx(
            r["seconds"] / by[(model, batch, "matmuls", "matmul floor")]["seconds"]
        )
        if runner == "matmul floor":
            continue
        assert r["max_abs_diff"] <= 1e-4 and r["label_agreement"] >= 0.999  # checked before timing
        for peer in peers:
            assert r[f"vs_{peer}"] == pytest.approx(by[(model, batch, op, peer)]["seconds"] / r["seconds"])
    _positive_finite([{k: v for k, v in r.items() if k != "max_abs_diff"} for r in rows], "inference")
    md = render(res, markdown=True)
    assert "| model | batch | op | " + " | ".join(f"{r} img/s" for r in ours + peers) in md
    assert all(f"{g} ×{'ORT' if p == 'onnxruntime' else p} |" in md for g in ours for p in peers)


def test_floor_epochs_interleave_with_each_backends_epochs(monkeypatch):
    """The planned run, with fake timings on a machine that slows down 10 % after every epoch of
    anything: each backend's epochs alternate with floor epochs of their config on their device
    (the first after the warm-up, untimed), so every x_floor is the backend's own overhead however
    the machine drifts, also within one backend's epochs. A CPU peer (its own thread pool) gets a
    pause around each floor epoch, outside both timings, and untimed floor steps after the first."""
    from gpumlp.bench import build_parser, plan_tasks, run_tasks
    from gpumlp.bench import runner as R
    from gpumlp.bench.inference import POOL_SETTLE_S, WARM_UP_S

    overhead = {"numpy": 3.0, "numba": 1.2, "cupy+graphs": 2.0, "torch": 4.0}  # peers too
    device = {"numpy": "cpu", "numba": "cpu", "cupy+graphs": "gpu", "torch": "cpu"}
    speed, log, naps = [1.0], [], []

    def floor_epoch(d, c, samples, dtype):
        def epoch(warm_up_s=0.0):
            log.append(("floor", c, d, samples, warm_up_s))
            speed[0] *= 1.1
            return speed[0] / 1.1 * R.EPOCH_SAMPLES / samples  # scaled to an epoch, as the real one

        return epoch, 5

    def train(b, cfg, X, y, epochs, dtype, callbacks=()):
        recs = []
        for _ in range(epochs):
            log.append(("epoch", b))
            speed[0] *= 1.1
            recs.append({"seconds": overhead[b] * speed[0] / 1.1, "loss": 0.5})
            for cb in callbacks:
                cb(recs[-1], None)
        return recs, None

    monkeypatch.setattr(R, "device_of", device.get)
    monkeypatch.setattr(R, "floor_epoch", floor_epoch)
    monkeypatch.setattr(R, "train", train)
    monkeypatch.setattr(R, "jit_warmup", lambda b, dtype: None)
    monkeypatch.setattr(R.time, "sleep", naps.append)
    args = build_parser().parse_args(["--quick", "--no-kernels", "--no-inference", "--repeats", "3"])
    X, y = np.zeros((100, 784), np.float32), np.zeros(100, np.int64)
    tasks = plan_tasks(args, list(overhead), ["seed", "deep1024"], (X, y, X, y), 60, 3)
    order = [(c, b) for c in ("seed", "deep1024") for b in overhead]  # config-major
    assert [t[0] for t in tasks if t[1] != "jit_seconds"] == [f"{c} {b} + floor" for c, b in order]
    res = {"epochs": [], "jit_seconds": {}}
    run_tasks(tasks, res, no_progress=True)
    expected = []
    for c, b in order:  # warm-up epoch, then each epoch followed by a floor epoch
        expected += [("epoch", b), ("floor", c, device[b], 60, WARM_UP_S if b == "torch" else 0.0)] * 4
    assert log == expected
    assert naps == [POOL_SETTLE_S] * 2 * 4 * 2  # torch only: around its 4 floor epochs, 2 configs
    floors = [(f["config"], f["backend"], f["device"], len(f["seconds"])) for f in res["floors"]]
    assert floors == [(c, b, device[b], 3) for c, b in order]
    R.add_ratios(res["epochs"], {"cpu": {"gemm_gflops": 1.0}}, res["floors"])
    x_floor = [(e["config"], e["backend"], e["x_floor"]) for e in res["epochs"]]
    assert x_floor == [(c, b, pytest.approx(overhead[b] / 1.1)) for c, b in order]  # each floor 10 % later


def test_floors_of_older_results_name_no_backend_and_match_by_device():
    """Results written before floors were timed beside each backend: one floor per (config, device)."""
    from gpumlp.bench.runner import add_ratios

    runs = (("numpy", "cpu", 0.3), ("numba", "cpu", 0.2), ("cupy", "gpu", 0.05))
    epochs = [{"config": "seed", "backend": b, "device": d, "median": m} for b, d, m in runs]
    floors = [{"config": "seed", "device": d, "median": m} for d, m in (("cpu", 0.1), ("gpu", 0.01))]
    add_ratios(epochs, {"cpu": {"gemm_gflops": 1.0}}, floors)
    assert [e["x_floor"] for e in epochs] == pytest.approx([3.0, 2.0, 5.0])
    assert [e["floor_seconds"] for e in epochs] == [0.1, 0.1, 0.01]


def test_render_and_compare_roundtrip(quick_json):
    res, _ = quick_json
    md = render(res, markdown=True)
    assert "| config |" in md
    text, bad = compare(res, res)
    assert bad == 0 and "1.00" in text
    slower = json.loads(json.dumps(res))
    for e in slower["epochs"]:
        e["median"] *= 2
    for r in slower["inference"]:
        r["seconds"] *= 2
    _, bad = compare(slower, res)
    assert bad == len(res["epochs"]) + len(res["inference"])


def test_bench_plots_are_pngs_drawn_by_gpumlp_plots(quick_json, tmp_path):
    """--plot draws through gpumlp.plots (the one matplotlib setup): one PNG per figure."""
    pytest.importorskip("matplotlib")
    from gpumlp.bench.report import plot

    res, _ = quick_json
    paths = plot(res, tmp_path / "plots")
    assert [p.name for p in paths] == ["epoch_time.png"]  # --quick: no sweep and no tta
    assert paths[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_gpu_step_profile_counts_a_sync_free_step(tmp_path):
    """bench/gpu_step_profile.py drives the real training step on the emulated device,
    eagerly and through CUDA graphs."""
    out = tmp_path / "gpu_step.md"
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_step_profile.py"
    subprocess.run(
        [sys.executable, str(script), "--configs", "seed", "--steps", "2", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = [line for line in out.read_text().splitlines() if line.startswith("| seed 784-100-10")]
    eager, graph = ([c.strip() for c in row.strip("|").split("|")] for row in rows)
    assert int(eager[1]) > 0 and int(eager[2]) == 5  # our kernels; 2 forward + 3 backward GEMMs
    launches = next(line for line in out.read_text().splitlines() if line.startswith("| seed |"))
    assert "sgd_f32 ×2," in launches  # SGD steps the two flat buffers (cuBLAS does not fold it here)
    assert eager[8] == "0 / 0 / 0" and eager[9] == "0"  # no transfers, syncs or allocations per step
    # with graphs: one graph launch and two device copies (batch, step) replace every launch
    assert graph[1].startswith("1 + 2 ") and int(graph[2]) == int(eager[1]) + int(eager[2])
    assert graph[3] == "0 / 0 / 0" and graph[4] == "0"


def test_run_variants_time_graph_and_tensor_core_epochs():
    """'cuda-emu+graphs+tf32' (as 'cupy+graphs+tf32' in the GPU suite) times real epochs with
    CUDA-graph steps and TF32 operands, and leaves the backend at exact float32."""
    from gpumlp.backend import get_backend
    from gpumlp.bench import runner as R

    assert R.split_variant("cupy+graphs+tf32") == ("cupy", {"cuda_graphs": True}, "tf32")
    assert R.split_variant("numba") == ("numba", {}, "float32")
    rng = np.random.default_rng(0)
    X, y = rng.random((300, 784), dtype=np.float32), rng.integers(0, 10, 300)
    out = R.time_epochs("cuda-emu+graphs+tf32", "seed", X, y, 1, "float32")
    assert out["backend"] == "cuda-emu+graphs+tf32" and out["median"] > 0 and math.isfinite(out["final_loss"])
    linalg = get_backend("cuda-emu").xp._core._routines_linalg
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT


def test_run_variants_that_cannot_run_are_skipped_with_the_reason():
    from gpumlp.bench import runner as R

    ok, skipped = R.resolve_backends(["numpy+graphs", "numpy+tf32", "cuda-emu+fp8", "cuda-emu+graphs"])
    assert ok == ["cuda-emu+graphs"]
    assert "+graphs needs a CUDA backend" in skipped["numpy+graphs"]
    assert "needs a CUDA backend" in skipped["numpy+tf32"]
    assert "unknown run option +fp8" in skipped["cuda-emu+fp8"]


def _gpu_usable() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_gpu_checks_script_runs_on_the_emulated_device(tmp_path):
    """bench/gpu_checks.py bitwise (eager own GEMM vs graph replay) on cuda-emu, tiny: the script
    the GPU suite runs works end to end and finds the two runs identical."""
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_checks.py"
    out = tmp_path / "checks.json"
    args = ["bitwise", "--backend", "cuda-emu", "--limit", "200", "--spec", "784-8-10", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["weights_differ"] == [] and len(result["loss_graphs"]) == 3


def test_gpu_suite_refuses_without_a_gpu_and_names_only_known_runs():
    """bench/gpu_suite.sh stops with a clear message on a machine without a usable GPU, and every
    run it would benchmark is a known backend or peer with valid run options."""
    import re

    from gpumlp.bench import runner as R

    suite = Path(__file__).resolve().parent.parent / "bench" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(suite)], capture_output=True).returncode == 0  # all of it parses
    if _gpu_usable():
        pytest.skip("a GPU is usable here: the suite would run for real (bench/gpu_suite.sh runs it)")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(suite)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "needs CuPy and a usable CUDA GPU" in proc.stderr
    names = re.search(r"--backends (\S+)", suite.read_text()).group(1).split(",")
    assert {"cupy", "cupy+graphs", "cupy+graphs+tf32"} <= set(names)
    for name in names:
        if name not in R.PEERS:
            R.split_variant(name)  # raises on an unknown run option


def test_time_to_accuracy_runs_the_fastest_preset_recipe():
    from gpumlp.bench.runner import TTA_CONFIG
    from gpumlp.presets import get_preset

    p = get_preset("fastest")
    assert (TTA_CONFIG.spec, TTA_CONFIG.lr, TTA_CONFIG.batch_size) == (
        p["model"]["spec"],
        p["fit"]["lr"],
        p["fit"]["batch_size"],
    )
    assert p["fit"]["schedule"] == "exp" and TTA_CONFIG.lr_gamma == p["fit"]["lr_gamma"] < 1


def test_torch_peer_decays_the_learning_rate_per_epoch_like_gpumlp():
    pytest.importorskip("torch")
    from gpumlp.bench.peers import TorchRecipe
    from gpumlp.optim import Schedule

    peer = TorchRecipe([4, 3, 2], "relu", "softmax_xent", "adam", 0.01, lr_gamma=0.5)
    seen = []
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 4)).astype(np.float32), rng.integers(0, 2, 8)
    peer.fit(X, y, 3, 4, callbacks=[lambda rec, p: seen.append(p.opt.param_groups[0]["lr"])])
    assert seen == pytest.approx([Schedule("exp", gamma=0.5).lr(0.01, e) for e in range(3)])


def test_floor_epoch_warm_up_runs_untimed_steps_first():
    """``epoch(warm_up_s)`` runs the floor's steps for that long before the timed epoch, and the
    time it returns is the epoch's alone (here 2 steps scaled to an epoch: far below the warm-up
    scaled the same way)."""
    from gpumlp.bench import runner as R

    epoch, per_step = R.floor_epoch("cpu", "seed", 200, "float32")
    assert per_step == 5
    t0 = time.perf_counter()
    seconds = epoch(0.05)
    assert time.perf_counter() - t0 >= 0.05
    assert 0 < seconds < 0.05 * R.EPOCH_SAMPLES / 200 / 10
