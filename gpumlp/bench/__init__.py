"""``gpumlp bench``: every available backend and the PyTorch peer, same configs, same data, one run.
This is the installed runner; the suites and scripts that need a checkout are in the top-level
``bench/`` (see README.md here and there).

Usage: ``python -m gpumlp.bench [--quick] [--backends numpy,numba,torch] [--configs seed,adam256]
[--dtype float32] [--repeats N] [--json PATH] [--markdown PATH] [--plot DIR] [--compare OLD.json]
[--sweep] [--tta] [--no-inference | --inference-only]``. Prints tables on stdout, progress on stderr;
returns a process exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from gpumlp.bench.flops import epoch_flops, kernel_bytes, step_flops

SCHEMA = "gpumlp-bench/1"
__all__ = ["main", "run", "epoch_flops", "step_flops", "kernel_bytes", "SCHEMA"]


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The ``gpumlp bench`` command line."""
    from gpumlp.bench.runner import CONFIGS, DEFAULT_BACKENDS

    p = argparse.ArgumentParser(
        prog="gpumlp bench",
        description="Benchmark every available backend and the PyTorch peer on the same MNIST configs.",
    )
    p.add_argument("--quick", action="store_true", help="sub-minute run: partial epochs, fewer repeats")
    p.add_argument(
        "--backends",
        type=_csv,
        default=None,
        help=f"comma list (default: {','.join(DEFAULT_BACKENDS)}; cuda-emu only on request); "
        "a gpumlp backend may add run options: cupy+graphs, cupy+tf32, cupy+graphs+tf32",
    )
    p.add_argument("--configs", type=_csv, default=None, help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed epochs after warm-up (default 5, quick 2)"
    )
    p.add_argument(
        "--samples", type=int, default=None, help="samples per timed epoch (default 55000, quick 5500)"
    )
    p.add_argument("--json", type=Path, help="write machine-readable results here")
    p.add_argument("--markdown", type=Path, help="write the tables as markdown here")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write PNG plots into DIR (needs matplotlib)")
    p.add_argument("--compare", type=Path, metavar="OLD_JSON", help="print new/old ratios, flag >10%% slower")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when --compare flags any")
    p.add_argument("--sweep", action="store_true", help="epoch time vs hidden width and vs batch size")
    p.add_argument("--tta", action="store_true", help="time to 97.5%% and 98%% MNIST test accuracy")
    p.add_argument("--tta-epochs", type=int, default=None, help="max epochs for --tta (default 20, quick 1)")
    p.add_argument("--no-kernels", action="store_true", help="skip the per-kernel roofline")
    infer = p.add_mutually_exclusive_group()
    infer.add_argument(
        "--no-inference", action="store_true", help="skip predict throughput (vs PyTorch, ONNX Runtime)"
    )
    infer.add_argument(
        "--inference-only", action="store_true", help="only predict throughput (no epochs, floors, kernels)"
    )
    p.add_argument(
        "--inputs",
        choices=("pixels", "floats"),
        default="pixels",
        help="gpumlp trains on the MNIST images as 8-bit codes decoded per minibatch, as `gpumlp train` does "
        "(pixels, default), or on their float copy (floats); the peers always get the floats",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _load_data(dtype: str, inputs: str = "pixels") -> tuple:
    """MNIST: the 55k training split (as :class:`~gpumlp.data.Pixels` or floats) and the 10k test
    set, pixels scaled to [0, 1]."""
    from gpumlp.bench.runner import EPOCH_SAMPLES
    from gpumlp.data import Pixels, load_mnist, scale_pixels

    m = load_mnist()
    codes = m.x_train[:EPOCH_SAMPLES]
    X = Pixels(codes, "0,1") if inputs == "pixels" else scale_pixels(codes, "0,1", dtype=dtype)
    Xt = scale_pixels(m.x_test, "0,1", dtype=dtype)
    return X, m.y_train[:EPOCH_SAMPLES], Xt, m.y_test


def run(args: argparse.Namespace) -> dict:
    """Run everything the parsed arguments ask for; -> the results dict (the JSON)."""
    from gpumlp.bench import runner as R
    from gpumlp.bench.machine import measure_peaks

    repeats, samples, cfg_names = _sizes(args)
    backends, skipped = _backends_to_run(args)
    res = _header(args, repeats, samples, backends, skipped, cfg_names)
    if not args.no_inference:
        res["inference_peers"] = _inference_peers(args, backends, skipped)
    res["peaks"]["cpu"] = measure_peaks(args.dtype, args.quick)
    if any(R.device_of(b) == "gpu" for b in backends):
        res["peaks"]["gpu"] = _gpu_peaks(args.dtype, args.quick)
    X, y, Xt, yt = _load_data(args.dtype, args.inputs)
    run_tasks(plan_tasks(args, backends, cfg_names, (X, y, Xt, yt), samples, repeats), res, args.no_progress)
    _summarise(args, res, backends)
    return res


def _sizes(args: argparse.Namespace) -> tuple[int, int, list[str]]:
    """(timed epochs per config, samples per timed epoch, config names); bad ones exit with a message."""
    from gpumlp.bench import runner as R

    repeats = args.repeats or (2 if args.quick else 5)
    samples = min(args.samples or (5500 if args.quick else R.EPOCH_SAMPLES), R.EPOCH_SAMPLES)
    cfg_names = args.configs or list(R.QUICK_CONFIGS if args.quick else R.CONFIGS)
    unknown = [c for c in cfg_names if c not in R.CONFIGS]
    if unknown:
        raise SystemExit(f"gpumlp bench: unknown config(s) {unknown}; choose from {', '.join(R.CONFIGS)}")
    if repeats < 1:
        raise SystemExit("gpumlp bench: --repeats must be >= 1")
    return repeats, samples, cfg_names


def _backends_to_run(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """(the backends and peers that run here, name -> why skipped); the skipped are said on stderr."""
    from gpumlp.bench import runner as R

    backends, skipped = R.resolve_backends(args.backends or R.DEFAULT_BACKENDS)
    if not args.backends:  # absent-by-default peers/GPU backends are not worth a warning line
        skipped = {k: v for k, v in skipped.items() if k not in ("cupy", "torch-graphs")}
    if not args.no_inference:
        from gpumlp.bench.inference import ORT, ort_unavailable

        if why := ort_unavailable(args.dtype):
            skipped[ORT] = why
    for name, why in skipped.items():
        print(f"gpumlp bench: skipping {name}: {why}", file=sys.stderr)
    return backends, skipped


def _header(args: argparse.Namespace, repeats: int, samples: int, backends: list[str], skipped: dict,
            cfg_names: list[str]) -> dict:  # fmt: skip
    """The results dict before any measurement: the run's settings, machine and configs."""
    from gpumlp.bench import runner as R
    from gpumlp.bench.machine import machine_info

    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "quick": args.quick,
        "dtype": args.dtype,
        "repeats": repeats,
        "epoch_samples": R.EPOCH_SAMPLES,
        "samples_timed": samples,
        "machine": machine_info(),
        "backends": backends,
        "skipped": skipped,
        "configs": {c: R.config_dict(c, R.CONFIGS[c]) for c in cfg_names},
        "peaks": {},
        "jit_seconds": {},
        "epochs": [],
    }


def run_tasks(tasks: list[tuple], res: dict, no_progress: bool) -> None:
    """Run the planned tasks in order, with a progress bar, adding each result under its key (key
    None: under each key of the {key: [entries]} the task returns)."""
    from tqdm.auto import tqdm

    for key in {key for _, key, _, _ in tasks} - {None}:
        res.setdefault(key, [])
    bar = tqdm(tasks, desc="bench", unit="task", file=sys.stderr, disable=no_progress or None)
    for label, key, fn, fn_args in bar:
        bar.set_postfix_str(label)
        out = fn(*fn_args)
        if key is None:  # results under several keys: {key: [entries]}
            for k, entries in out.items():
                res.setdefault(k, []).extend(entries)
        elif key == "jit_seconds":
            if out is not None:
                res[key][fn_args[0]] = out
        else:
            res[key].extend(out if isinstance(out, list) else [out])
    bar.close()


def _summarise(args: argparse.Namespace, res: dict, backends: list[str]) -> None:
    """After the measurements: JIT seconds where no warm-up hook gave them, the CPU peaks measured
    again (the better of both), ratios to the floors and peaks, the load at the end."""
    from gpumlp.bench import runner as R
    from gpumlp.bench.machine import measure_peaks, merge_peaks

    for b in backends:  # no warm-up hook: the first epoch's extra time is the one-time cost
        if b not in res["jit_seconds"] and b not in R.PEERS:
            firsts = [e["first_epoch_extra_seconds"] for e in res["epochs"] if e["backend"] == b]
            if b == "numba" and firsts:
                res["jit_seconds"][b] = firsts[0]
    res["peaks"]["cpu"] = merge_peaks(res["peaks"]["cpu"], measure_peaks(args.dtype, args.quick))
    R.add_ratios(res["epochs"], res["peaks"], res.get("floors", []))
    R.add_kernel_peaks(res.get("kernels", []), res["peaks"])
    if "start" in res["machine"]["loadavg"]:  # other jobs on the machine make timings noisy
        res["machine"]["loadavg"]["end"] = os.getloadavg()[0]


def plan_tasks(args: argparse.Namespace, backends: list[str], cfg_names: list[str], data: tuple, samples: int,
               repeats: int) -> list[tuple[str, str | None, object, tuple]]:  # fmt: skip
    """The run as (progress label, results key, function, arguments) tasks, in order; key None: the
    function returns {key: [entries]}."""
    from gpumlp.bench import runner as R

    X, y, Xt, yt = data
    dt_, quick = args.dtype, args.quick
    tasks = [(f"JIT {b}", "jit_seconds", R.jit_warmup, (b, dt_)) for b in backends]
    if args.inference_only:
        return tasks + _inference_tasks(args, backends, Xt, repeats)
    tasks += _epoch_tasks(backends, cfg_names, X[:samples], y[:samples], repeats, dt_)
    if not args.no_kernels:
        for b in (b for b in backends if b not in R.PEERS and "+" not in b):  # variants: same kernels
            tasks.append((f"kernels {b}", "kernels", R.time_kernels, (b, dt_, quick)))
    if args.sweep:
        for kind, x, cfg, n in R.sweep_points(quick):
            point = (kind, x, cfg, X[:n], y[:n], dt_)
            tasks += [(f"sweep {kind}={x} {b}", "sweep", R.time_sweep_point, (b, *point)) for b in backends]
    if args.tta:
        max_ep = args.tta_epochs or (1 if quick else 20)
        n_tta = samples if quick else R.EPOCH_SAMPLES
        tasks += [
            (f"tta {b}", "tta", R.time_to_accuracy, (b, (X, y, Xt, yt), dt_, max_ep, n_tta)) for b in backends
        ]
    if not args.no_inference:
        tasks += _inference_tasks(args, backends, Xt, repeats)
    return tasks


def _epoch_tasks(backends: list[str], cfg_names: list[str], X, y, repeats: int, dtype: str) -> list[tuple]:
    """The epoch timings, config-major so that slow drifts in machine load hit every backend alike;
    each backend's epochs interleaved with floor epochs on its device (``time_epochs_and_floor``),
    so its × floor divides two timings of the same minutes."""
    from gpumlp.bench import runner as R

    return [(f"{c} {b} + floor", None, R.time_epochs_and_floor, (b, c, X, y, repeats, dtype))
            for c in cfg_names for b in backends]  # fmt: skip


def _inference_peers(args: argparse.Namespace, backends: list[str], skipped: dict) -> dict:
    """Versions and thread settings of the inference peers that run."""
    from gpumlp.bench.inference import ORT, TORCH, peer_setup

    return peer_setup(with_torch=TORCH in backends, with_ort=ORT not in skipped)


def _inference_tasks(args: argparse.Namespace, backends: list[str], Xt, repeats: int) -> list[tuple]:
    """One task per model: predict/predict_proba images/s of every runner at each batch size."""
    from gpumlp.bench import inference as I

    ours = I.gpumlp_runners(backends)
    peers = [p for p in (I.TORCH,) if p in backends] + ([] if I.ort_unavailable(args.dtype) else [I.ORT])
    models = I.QUICK_MODELS if args.quick else tuple(I.MODELS)
    return [(f"inference {m}", "inference", I.time_inference, (m, Xt, ours, peers, args.dtype, repeats))
            for m in models]  # fmt: skip


def _gpu_peaks(dtype: str, quick: bool) -> dict:
    """GEMM and copy peaks on the GPU with CuPy (or torch when CuPy is absent)."""
    import numpy as np

    from gpumlp.bench.flops import matmul_flops
    from gpumlp.bench.machine import GEMM_SHAPES, best_time

    try:
        import cupy as xp

        sync = xp.cuda.Device().synchronize
        lib = "cupy"
    except ImportError:
        import torch

        sync, lib, xp = torch.cuda.synchronize, "torch", None
    gemm = []
    for m, k, n in GEMM_SHAPES + ((4096, 4096, 4096),):
        if xp is not None:
            a, b = xp.ones((m, k), dtype=dtype), xp.ones((k, n), dtype=dtype)
            c = xp.empty((m, n), dtype=dtype)
            fn = lambda a=a, b=b, c=c: xp.matmul(a, b, out=c)  # noqa: E731
        else:
            import torch

            a = torch.ones((m, k), dtype=getattr(torch, dtype), device="cuda")
            b = torch.ones((k, n), dtype=getattr(torch, dtype), device="cuda")
            c = torch.empty((m, n), dtype=getattr(torch, dtype), device="cuda")
            fn = lambda a=a, b=b, c=c: torch.matmul(a, b, out=c)  # noqa: E731
        t = best_time(fn, 5 if quick else 15, 10, sync)
        gemm.append({"shape": [m, k, n], "seconds": t, "gflops": matmul_flops(m, k, n) / t / 1e9})
    nbytes = 1 << 30
    if xp is not None:
        src = xp.ones(nbytes // 4, dtype=np.float32)
        dst = xp.empty_like(src)
        fn = lambda: xp.copyto(dst, src)  # noqa: E731
    else:
        import torch

        src = torch.ones(nbytes // 4, device="cuda")
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    t = best_time(fn, 5, 3, sync)
    copy = {"bytes": nbytes, "seconds": t, "gbs": 2 * nbytes / t / 1e9, "library": lib}
    return {"dtype": dtype, "gemm": gemm, "gemm_gflops": max(g["gflops"] for g in gemm), "copy": copy,
            "copy_gbs": copy["gbs"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gpumlp bench`` / ``python -m gpumlp.bench``; -> exit code."""
    from gpumlp.bench import report

    args = build_parser().parse_args(argv)
    res = run(args)
    print(report.render(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report.render(res, markdown=True))
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.plot:
        for path in report.plot(res, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    if args.compare:
        text, bad = report.compare(res, json.loads(args.compare.read_text()))
        print(f"== Compared with {args.compare}\n{text}")
        if bad and args.fail_on_regression:
            return 1
    return 0
