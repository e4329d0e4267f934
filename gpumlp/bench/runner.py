"""Run the benchmarks: epochs per config and backend, kernel roofline, sweeps, time-to-accuracy.

Every measurement goes through the real code path (``gpumlp.train.fit`` for
epochs, the backend's kernel module for kernels) with warm-up excluded and the
device synchronised; the PyTorch peer runs the same recipe in the same process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from gpumlp.backend import MATMUL_PRECISIONS, BackendUnavailable, get_backend
from gpumlp.bench.flops import epoch_flops, kernel_bytes, matmul_flops, step_matmuls
from gpumlp.bench.machine import best_time
from gpumlp.model import MLP, parse_spec
from gpumlp.optim import RULES, Optimizer

EPOCH_SAMPLES = 55_000  # the classic 55k/5k MNIST training split
GPUMLP_BACKENDS = ("numpy", "numba", "cupy")
PEERS = ("torch", "torch-graphs")
DEFAULT_BACKENDS = ("numpy", "numba", "cupy", "torch", "torch-graphs")  # cuda-emu only on request
# A gpumlp backend name may carry run options: "cupy+graphs" (CUDA-graph steps), "cupy+tf32" /
# "cupy+bf16" (tensor-core matmul precision), or both, "cupy+graphs+tf32" (see split_variant).


@dataclass(frozen=True)
class Config:
    """One training recipe, run identically by every backend and the peer."""

    spec: str
    act: str
    loss: str
    optimizer: str
    lr: float
    batch_size: int
    reduction: str = "mean"
    about: str = ""
    lr_gamma: float = 1.0  # the learning rate is multiplied by this after every epoch

    @classmethod
    def of_preset(cls, name: str) -> Config:
        """The recipe of a gpumlp preset (constant or per-epoch exponential learning rate)."""
        from gpumlp.presets import get_preset

        preset = get_preset(name)
        m, f = preset["model"], preset["fit"]
        if f["schedule"] not in ("constant", "exp"):
            raise ValueError(f"preset {name!r}: the bench runs constant or exp schedules only")
        gamma = f["lr_gamma"] if f["schedule"] == "exp" else 1.0
        args = (m["spec"], m["act"], m["loss"], f["optimizer"], f["lr"], f["batch_size"], f["reduction"])
        return cls(*args, about=f"the {name} preset", lr_gamma=gamma)

    @property
    def widths(self) -> list[int]:
        return parse_spec(self.spec)


CONFIGS = {
    "seed": Config(
        "784-100-10", "sigmoid", "logistic", "sgd", 0.01, 100, "sum", "the seed: sigmoid, logistic cost, SGD"
    ),
    "adam256": Config("784-256-10", "relu", "softmax_xent", "adam", 1e-3, 128, "mean", "ReLU, softmax, Adam"),
    "deep1024": Config(
        "784-1024-1024-10", "relu", "softmax_xent", "sgd", 0.05, 256, "mean", "ReLU, softmax, SGD"
    ),
}
QUICK_CONFIGS = ("seed", "adam256")
TTA_CONFIG = Config.of_preset("fastest")
TTA_TARGETS = (0.975, 0.98)
# also reported in images/s
AUGMENT_KERNELS = ("gather_shifted", "gather_shifted_pixels", "elastic_field", "gather_warped")


# ------------------------------------------------------------------- runners
def split_variant(name: str) -> tuple[str, dict, str]:
    """A gpumlp backend name with run options -> (backend, fit options, matmul precision):
    'cupy+graphs+tf32' -> ('cupy', {'cuda_graphs': True}, 'tf32'); 'numba' -> ('numba', {}, 'float32')."""
    base, *options = name.split("+")
    fit_kw, precision = {}, "float32"
    for option in options:
        if option == "graphs":
            fit_kw["cuda_graphs"] = True
        elif option in MATMUL_PRECISIONS:
            precision = option
        else:
            raise ValueError(f"unknown run option +{option} in {name!r}: use +graphs, +tf32 or +bf16")
    return base, fit_kw, precision


def device_of(name: str) -> str:
    """'gpu' or 'cpu': which measured peaks a backend is compared against."""
    if name not in PEERS and split_variant(name)[0] == "cupy":
        return "gpu"
    if name in PEERS:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu"


def train_gpumlp(name: str, cfg: Config, X, y, epochs: int, dtype: str, seed: int = 0, callbacks=()):
    """gpumlp.train.fit on backend ``name`` (with its run options); -> per-epoch records."""
    from gpumlp.optim import Schedule
    from gpumlp.train import fit

    base, fit_kw, precision = split_variant(name)
    be = get_backend(base)
    model = MLP(cfg.spec, act=cfg.act, loss=cfg.loss, dtype=dtype, backend=be, seed=seed)
    be.set_matmul_precision(precision)
    try:
        hist = fit(
            model,
            X,
            y,
            epochs=epochs,
            batch_size=cfg.batch_size,
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            reduction=cfg.reduction,
            schedule=Schedule("exp", gamma=cfg.lr_gamma) if cfg.lr_gamma != 1 else "constant",
            seed=seed,
            callbacks=list(callbacks),
            **fit_kw,
        )
    finally:
        be.set_matmul_precision("float32")
    return hist.records, model


def train_peer(name: str, cfg: Config, X, y, epochs: int, dtype: str, seed: int = 0, callbacks=()):
    """The PyTorch peer with the same recipe, on the float inputs (Pixels decoded); -> per-epoch records."""
    from gpumlp.bench.peers import TorchRecipe

    X = np.asarray(X, dtype=dtype)
    peer = TorchRecipe(cfg.widths, cfg.act, cfg.loss, cfg.optimizer, cfg.lr, dtype, seed, name, cfg.lr_gamma)
    recs = peer.fit(X, y, epochs, cfg.batch_size, cfg.reduction, seed, callbacks)
    return recs, peer


def train(name: str, cfg: Config, X, y, epochs: int, dtype: str, seed: int = 0, callbacks=()):
    """Dispatch to the gpumlp backend or the peer called ``name``."""
    runner = train_peer if name in PEERS else train_gpumlp
    return runner(name, cfg, X, y, epochs, dtype, seed, callbacks)


def summarize(values: Sequence[float]) -> dict:
    """Median, min, max and quartiles of repeated timings."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2]}


def jit_warmup(name: str, dtype: str) -> float | None:
    """Seconds of a backend's one-time JIT (``Backend.warmup`` when it has one), else None."""
    if name in PEERS:
        return None
    warm = get_backend(split_variant(name)[0]).warmup
    return float(warm(np.dtype(dtype))) if warm is not None else None


def time_epochs(name: str, cfg_name: str, X, y, repeats: int, dtype: str, callbacks=()) -> dict:
    """Epoch seconds of one config on one backend: 1 warm-up epoch + ``repeats`` timed,
    each scaled to EPOCH_SAMPLES when X is a fraction of the epoch. ``callbacks`` run after each
    epoch, outside its timing."""
    cfg = CONFIGS[cfg_name]
    recs, _ = train(name, cfg, X, y, repeats + 1, dtype, callbacks=callbacks)
    scale = EPOCH_SAMPLES / X.shape[0]
    raw = [r["seconds"] for r in recs]
    steady = statistics.median(raw[1:])
    out = {
        "config": cfg_name,
        "backend": name,
        "device": device_of(name),
        "dtype": dtype,
        "samples_timed": int(X.shape[0]),
        "scale": scale,
        "repeats": repeats,
        "seconds": [s * scale for s in raw[1:]],
        "warmup_seconds": raw[0] * scale,
        "first_epoch_extra_seconds": max(0.0, raw[0] - steady),
        "final_loss": recs[-1]["loss"],
    }
    out.update(summarize(out["seconds"]))
    return out


def _device_arrays(device: str) -> tuple:
    """(array module, synchronize) of the device a floor is measured on."""
    if device == "gpu":
        import cupy

        return cupy, cupy.cuda.Device().synchronize
    return np, lambda: None


def floor_epoch(device: str, cfg_name: str, samples: int, dtype: str) -> tuple[Callable[..., float], int]:
    """The floor of one epoch of ``cfg_name`` on ``device``: only the steps' matmuls
    (:func:`~gpumlp.bench.flops.step_matmuls`), at the real batch shapes (full batches and the
    last partial one), into preallocated outputs, nothing else. -> (a function timing one such
    epoch over ``samples`` rows, in seconds scaled to EPOCH_SAMPLES like :func:`time_epochs`,
    after ``warm_up_s`` seconds of untimed steps when given; the matmuls per step)."""
    cfg = CONFIGS[cfg_name]
    xp, sync = _device_arrays(device)
    rng = np.random.default_rng(0)
    full, rest = divmod(samples, cfg.batch_size)

    def operands(batch: int) -> list[tuple]:
        ops = []
        for a_shape, b_shape, trans_a, trans_b in step_matmuls(cfg.widths, batch):
            a, b = (xp.asarray(rng.standard_normal(s).astype(dtype)) for s in (a_shape, b_shape))
            a, b = a.T if trans_a else a, b.T if trans_b else b  # views: BLAS gets transpose flags
            ops.append((a, b, xp.empty((a.shape[0], b.shape[1]), dtype=dtype)))
        return ops

    plan = [(operands(cfg.batch_size), full)] + ([(operands(rest), 1)] if rest else [])

    def epoch(warm_up_s: float = 0.0) -> float:
        warm_until = time.perf_counter() + warm_up_s
        while time.perf_counter() < warm_until:
            for a, b, out in plan[0][0]:
                xp.matmul(a, b, out=out)
        sync()
        t0 = time.perf_counter()
        for ops, count in plan:
            for _ in range(count):
                for a, b, out in ops:
                    xp.matmul(a, b, out=out)
        sync()
        return (time.perf_counter() - t0) * EPOCH_SAMPLES / samples

    return epoch, len(plan[0][0])


def time_epochs_and_floor(name: str, cfg_name: str, X, y, repeats: int, dtype: str) -> dict:
    """:func:`time_epochs`, with one floor epoch (:func:`floor_epoch`, the backend's device) after
    each epoch, outside its timing: the floor and the epochs interleave, so that a machine whose
    speed drifts (a shared VM) gives both the same share of its slow minutes. The floor epoch
    after the warm-up epoch is the floor's warm-up. Around the floor epochs of a CPU peer (a thread
    pool of its own) a pause of POOL_SETTLE_S, so that neither pool spins into the other's timing,
    and WARM_UP_S of untimed floor steps after the first: the cores take a few ms to come back to
    speed after a pause (a floor epoch timed right after one read 7-8 % slower).
    -> {"epochs": [the epochs entry], "floors": [the floor entry, naming the backend]}."""
    from gpumlp.bench.inference import POOL_SETTLE_S, WARM_UP_S

    device = device_of(name)
    epoch, per_step = floor_epoch(device, cfg_name, X.shape[0], dtype)
    own_pool = name in PEERS and device == "cpu"
    seconds: list[float] = []

    def floor_after(rec, model) -> None:
        if own_pool:
            time.sleep(POOL_SETTLE_S)
        seconds.append(epoch(WARM_UP_S if own_pool else 0.0))
        if own_pool:
            time.sleep(POOL_SETTLE_S)

    entry = time_epochs(name, cfg_name, X, y, repeats, dtype, callbacks=[floor_after])
    timed = seconds[1:]
    floor = {"config": cfg_name, "device": device, "backend": name, "dtype": dtype,
             "samples_timed": int(X.shape[0]), "matmuls_per_step": per_step, "seconds": timed,
             "median": statistics.median(timed)}  # fmt: skip
    return {"epochs": [entry], "floors": [floor]}


def add_ratios(entries: list[dict], peaks: dict, floors: Sequence[dict] = ()) -> None:
    """Fill vs_torch, vs_numpy, GFLOP/s, GEMM-bound and floor columns in place. Each entry's
    floor is the one timed with its backend's epochs; older results, whose floors name no backend,
    had one floor per (config, device)."""
    by = {(e["config"], e["backend"]): e["median"] for e in entries}
    beside = {(f["config"], f["backend"]): f["median"] for f in floors if "backend" in f}
    per_device = {(f["config"], f["device"]): f["median"] for f in floors if "backend" not in f}
    for e in entries:
        cfg = CONFIGS[e["config"]]
        flops = epoch_flops(cfg.widths, EPOCH_SAMPLES)
        peak = peaks.get(e["device"], peaks["cpu"])["gemm_gflops"]
        e["flops"] = flops
        e["gflops"] = flops / e["median"] / 1e9
        e["gemm_bound_seconds"] = flops / (peak * 1e9)
        e["x_gemm_bound"] = e["median"] / e["gemm_bound_seconds"]
        e["pct_gemm_peak"] = 100 * e["gflops"] / peak
        floor = beside.get((e["config"], e["backend"]), per_device.get((e["config"], e["device"])))
        if floor is not None:
            e["floor_seconds"] = floor
            e["x_floor"] = e["median"] / floor
        for ref in ("torch", "numpy"):
            if (e["config"], ref) in by:
                e[f"vs_{ref}"] = e["median"] / by[(e["config"], ref)]


# ------------------------------------------------------------------- kernels
def _kernel_cases(be, dtype: np.dtype, rng: np.random.Generator) -> list[tuple[str, str, tuple, Callable]]:
    """(kernel, variant, shape, thunk) at the shapes of the default configs."""
    k, asa = be.k, be.asarray

    def arr(*shape):
        return asa(rng.standard_normal(shape).astype(dtype))

    z, b, y = arr(256, 1024), arr(1024), arr(256, 1024)
    zs, bs = arr(100, 100), arr(100)
    logits, grad = arr(256, 10), arr(256, 10)
    labels = asa(rng.integers(0, 10, 256).astype(np.int32))
    a1, w1, c1 = arr(256, 784), arr(784, 1024), arr(256, 1024)
    a2, w2, c2 = arr(256, 1024), arr(1024, 1024), arr(256, 1024)
    dw, dx = arr(784, 1024), arr(256, 784)  # separate outputs: no value feeds back and overflows
    dz, b0 = arr(256, 1024), b * 0
    W, G = arr(1024, 1024), arr(1024, 1024)
    W = W * 0.01  # keep weights bounded over many in-place steps
    t = asa(np.array([10], np.int64))  # Adam's step on the device, as the training step passes it
    return [
        ("matmul", "x·W", (256, 784, 1024), lambda: k.matmul(a1, w1, out=c1)),
        ("matmul", "x·W", (256, 1024, 1024), lambda: k.matmul(a2, w2, out=c2)),
        ("matmul", "xᵀ·dz", (784, 256, 1024), lambda: k.matmul(a1, c1, out=dw, trans_a=True)),
        ("matmul", "dz·Wᵀ", (256, 1024, 784), lambda: k.matmul(c1, w1, out=dx, trans_b=True)),
        # the weight gradient with plain SGD folded in (BLAS beta): compare with the xᵀ·dz row
        (
            "sgd_matmul_step",
            "W -= lr·xᵀ·dz",
            (784, 256, 1024),
            lambda: k.sgd_matmul_step(dw, a1, c1, 1e-9, trans_a=True),
        ),
        # in place, as Dense.forward calls it; act_grad into its own buffer, as Dense.backward does
        ("bias_act", "relu", (256, 1024), lambda: k.bias_act(y, b0, "relu", out=y)),
        ("bias_act", "sigmoid", (100, 100), lambda: k.bias_act(zs, bs, "sigmoid", out=zs)),
        ("act_grad", "relu", (256, 1024), lambda: k.act_grad(z, y, "relu", out=dz)),
        ("bias_grad", "", (256, 1024), lambda: k.bias_grad(z, out=b)),
        (
            "softmax_xent",
            "",
            (256, 10),
            lambda: k.softmax_xent(logits, labels, grad=grad, grad_scale=1 / 256),
        ),
        ("sigmoid_bce", "", (256, 10), lambda: k.sigmoid_bce(logits, labels, grad=grad)),
    ] + _data_cases(be, dtype, rng, t) + _optimizer_cases(be, W, G, t)


def _data_cases(be, dtype: np.dtype, rng: np.random.Generator, t) -> list[tuple[str, str, tuple, Callable]]:
    """The minibatch gathers (plain, from 8-bit codes, augmenting) and the epoch's shuffle: 256
    MNIST-sized rows from 8192; ``t`` the training step on the device."""
    k, asa = be.k, be.asarray
    Xall, xb = (asa(rng.standard_normal(shape).astype(dtype)) for shape in ((8192, 784), (256, 784)))
    idx = asa(rng.permutation(8192)[:256].astype(np.int32))
    codes = asa(rng.integers(0, 256, (8192, 784), dtype=np.uint8))
    fd, fw = (be.xp.empty((256, 2, 28, 28), dtype=dtype) for _ in "fw")  # elastic field and scratch
    order = be.xp.empty(55000, dtype=np.int32)  # an epoch's shuffle of the MNIST training split
    return [
        ("gather_rows", "", (256, 784), lambda: k.gather_rows(Xall, idx, out=xb)),
        ("gather_pixels", "uint8", (256, 784), lambda: k.gather_pixels(codes, idx, 255.0, 0.0, dtype, xb)),
        ("gather_shifted", "±2 px", (256, 784), lambda: k.gather_shifted(Xall, idx, 2, 0, t, out=xb)),
        ("gather_shifted_pixels", "uint8 ±2 px", (256, 784),
         lambda: k.gather_shifted_pixels(codes, idx, 2, 0, 255.0, 0.0, dtype, t, xb)),
        ("elastic_field", "α 34 σ 4", (256, 784), lambda: k.elastic_field(0, 256, 28, 34.0, 4.0, t, fd, fw)),
        (
            "gather_warped",
            "±10° ±10% ±2 px + field",
            (256, 784),
            lambda: k.gather_warped(Xall, idx, 10.0, 0.1, 2.0, 0, t, field=fd, out=xb),
        ),
        ("permutation", "", (55000,), lambda: k.permutation(0, 55000, 1, out=order)),
    ]


def _optimizer_cases(be, W, G, t) -> list[tuple[str, str, tuple, Callable]]:
    """One case per optimizer of RULES, each stepping W with G through ``Optimizer.update`` (its
    default hyper-parameters, L2 on, a tiny rate): (kernel, rule name where it differs, shape, thunk)."""
    cases = []
    for name, rule in RULES.items():
        opt = Optimizer(name, lr=1e-9, l2=1e-4)
        state = opt.init_state(be, W)
        variant = "" if rule.kernel == f"{name}_step" else name

        def step(opt=opt, state=state):
            opt.update(be, W, G, state, 1e-9, t, decayed=True)

        cases.append((rule.kernel, variant, tuple(W.shape), step))
    return cases


def time_kernels(name: str, dtype: str, quick: bool = False) -> list[dict]:
    """Roofline rows for one backend: seconds per call and GB/s or GFLOP/s (see add_kernel_peaks)."""
    be, dt = get_backend(name), np.dtype(dtype)
    rows = []
    for kernel, variant, shape, fn in _kernel_cases(be, dt, np.random.default_rng(0)):
        fn()
        be.synchronize()
        t1 = best_time(fn, 1, 1, be.synchronize)
        inner = max(1, min(2000, int((0.005 if quick else 0.02) / max(t1, 1e-7))))
        t = best_time(fn, 3 if quick else 7, inner, be.synchronize)
        row = {"backend": name, "kernel": kernel, "variant": variant, "shape": list(shape), "dtype": dtype}
        row.update({"device": device_of(name), "seconds": t, "calls_per_timing": inner})
        if kernel in ("matmul", "sgd_matmul_step"):
            row["gflops"] = matmul_flops(*shape) / t / 1e9
        else:
            row["bytes"] = kernel_bytes(kernel, shape, dt.itemsize, label_itemsize=4)
            row["gbs"] = row["bytes"] / t / 1e9
        if kernel in AUGMENT_KERNELS:
            row["images_per_s"] = shape[0] / t
        rows.append(row)
    return rows


def add_kernel_peaks(rows: list[dict], peaks: dict) -> None:
    """Fill each kernel row's % of the measured GEMM peak (matmul) or copy bandwidth (the rest)."""
    for r in rows:
        p = peaks.get(r["device"], peaks["cpu"])
        if "gflops" in r:
            r["pct_peak"] = 100 * r["gflops"] / p["gemm_gflops"]
        else:  # vs the DRAM copy rate and vs a cache-resident copy (these working sets fit in L2/L3)
            r["pct_peak"] = 100 * r["gbs"] / p["copy_gbs"]
            if "copy_cached_gbs" in p:
                r["pct_cached_copy"] = 100 * r["gbs"] / p["copy_cached_gbs"]


# -------------------------------------------------------------------- sweeps
WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096)
BATCHES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def sweep_points(quick: bool) -> list[tuple[str, int, Config, int]]:
    """(kind, x, config, samples) for the width and batch sweeps; big points use a fraction of an epoch."""
    points = []
    cap = 2e9 if quick else 40e9  # matmul FLOPs per timed (partial) epoch
    for w in (64, 256, 1024) if quick else WIDTHS:
        cfg = Config(f"784-{w}-10", "relu", "softmax_xent", "sgd", 0.05, 256, "mean", f"width {w}")
        per_sample = epoch_flops(cfg.widths, 1)
        n = min(EPOCH_SAMPLES, max(4 * 256, int(cap / per_sample) // 256 * 256))
        points.append(("width", w, cfg, n))
    for bs in (64, 512, 4096) if quick else BATCHES:
        cfg = Config("784-256-10", "relu", "softmax_xent", "sgd", 0.05, bs, "mean", f"batch {bs}")
        n = min(EPOCH_SAMPLES, max(4 * bs, 4096 if quick else 16384))
        points.append(("batch", bs, cfg, n))
    return points


def time_sweep_point(name: str, kind: str, x: int, cfg: Config, X, y, dtype: str) -> dict:
    """One sweep point: 1 warm-up + 1 timed (partial) epoch, scaled to EPOCH_SAMPLES."""
    recs, _ = train(name, cfg, X, y, 2, dtype)
    secs = recs[-1]["seconds"] * EPOCH_SAMPLES / X.shape[0]
    flops = epoch_flops(cfg.widths, EPOCH_SAMPLES)
    return {
        "kind": kind,
        "x": x,
        "backend": name,
        "spec": cfg.spec,
        "batch_size": cfg.batch_size,
        "samples_timed": int(X.shape[0]),
        "seconds": secs,
        "gflops": flops / secs / 1e9,
    }


# ----------------------------------------------------------- time to accuracy
def time_to_accuracy(name: str, data, dtype: str, max_epochs: int, n_train: int) -> dict:
    """Train TTA_CONFIG from scratch, test accuracy after each epoch (eval time excluded)."""
    X, y, Xt, yt = data
    X, y = X[:n_train], y[:n_train]
    t0 = time.perf_counter()
    jit = jit_warmup(name, dtype)  # ~0 when the run already compiled; the run's jit_seconds has the first
    train(name, TTA_CONFIG, X[:1024], y[:1024], 1, dtype)  # warm caches/JIT/threads, not counted
    warm = time.perf_counter() - t0
    curve: list[dict] = []
    elapsed = [0.0]

    def on_epoch(rec, model):
        elapsed[0] += rec["seconds"]
        acc = model.accuracy(Xt, yt) if name in PEERS else model.score(Xt, yt)
        curve.append({"epoch": rec["epoch"], "train_seconds": elapsed[0], "test_acc": acc})
        return acc >= max(TTA_TARGETS)

    wall0 = time.perf_counter()
    train(name, TTA_CONFIG, X, y, max_epochs, dtype, callbacks=[on_epoch])
    out = {
        "backend": name,
        "device": device_of(name),
        "spec": TTA_CONFIG.spec,
        "recipe": asdict(TTA_CONFIG),
        "samples": int(X.shape[0]),
        "jit_seconds": jit,
        "warmup_seconds": warm,
        "wall_seconds_with_eval": time.perf_counter() - wall0,
        "curve": curve,
        "best_test_acc": max(c["test_acc"] for c in curve),
    }
    for target in TTA_TARGETS:
        hit = next((c for c in curve if c["test_acc"] >= target), None)
        out[f"seconds_to_{target}"] = hit["train_seconds"] if hit else None
        out[f"epochs_to_{target}"] = hit["epoch"] if hit else None
    return out


def resolve_backends(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split requested names into runnable ones and {name: why not}."""
    from gpumlp.bench.peers import peer_variants, torch_unavailable

    ok, skipped = [], {}
    for name in names:
        if name in PEERS:
            why = torch_unavailable()
            if why is None and name not in peer_variants():
                why = f"{name} needs a CUDA GPU for torch"
        else:
            try:
                why = _variant_unavailable(name)
            except (BackendUnavailable, ValueError) as e:
                why = str(e)
            except Exception as e:  # a half-written backend must not stop the others
                why = f"{type(e).__name__}: {e}"
        if why:
            skipped[name] = why
        else:
            ok.append(name)
    return ok, skipped


def _variant_unavailable(name: str) -> str | None:
    """Why backend ``name`` and its run options cannot run here, or None (raises for bad names)."""
    base, fit_kw, precision = split_variant(name)
    be = get_backend(base)
    if fit_kw.get("cuda_graphs") and be.capture is None:
        return f"+graphs needs a CUDA backend (cupy or cuda-emu), not {base!r}"
    be.set_matmul_precision(precision)  # BackendUnavailable where the backend has no such choice
    be.set_matmul_precision("float32")
    return None


def config_dict(name: str, cfg: Config) -> dict:
    """JSON form of a config plus its FLOPs per epoch."""
    return {"name": name, **asdict(cfg), "flops_per_epoch": epoch_flops(cfg.widths, EPOCH_SAMPLES)}
