"""Where one CPU training step's time goes: every kernel call of a real minibatch step, timed in place.

Runs ``gpumlp.train.fit`` (the real step: gather, forward, loss, backward, update) on a
CPU backend whose kernel module is wrapped, for the instrumented epochs only, by a proxy that
times each call with ``perf_counter`` and files it under the kernel's name and its operands'
shapes (a matmul is labelled by its role: ``x·W`` forward, ``xᵀ·dz`` weight gradient,
``dz·Wᵀ`` input gradient). Plain epochs (no proxy) are interleaved with the instrumented ones,
so both see the same machine load; the step total is the plain epochs' median over the steps,
and "Python + glue" = step total - the sum of the kernels' medians: what the training loop,
the layers and the kernels' Python wrappers cost between calls (the proxy's own cost lands in
the instrumented epochs only, never in the table).

Kernel times include each kernel's Python wrapper and Numba dispatch: what the step pays to
call it. Numbers are per step in µs (median over the instrumented epochs of each kernel's mean
per step); the floor column of ``gpumlp bench`` is the sum of the matmul rows at best.

Usage: ``python bench/step_breakdown.py [--configs seed,adam256] [--backend numba]
[--epochs 5] [--samples 11000] [--dtype float32] [--inputs pixels|floats]
[--out bench/results/step_breakdown.md]``
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from gpumlp.backend import get_backend
from gpumlp.bench.machine import ENV_VARS
from gpumlp.bench.runner import CONFIGS
from gpumlp.model import MLP
from gpumlp.train import fit

_MATMUL_ROLES = {(False, False): "x·W", (True, False): "xᵀ·dz", (False, True): "dz·Wᵀ"}


def _key(name: str, args: tuple, kwargs: dict) -> tuple:
    """What distinguishes a kernel's calls within a step (cheap: formatted by :func:`label` later)."""
    if name in ("matmul", "sgd_matmul_step"):
        a, b = (args[0], args[1]) if name == "matmul" else (args[1], args[2])
        return name, a.shape, b.shape, kwargs.get("trans_a", False), kwargs.get("trans_b", False)
    return name, np.shape(args[0]), args[2] if name in ("bias_act", "act_grad") else ""


def label(key: tuple) -> str:
    """Kernel name, role and shapes: ``matmul xᵀ·dz 784x100x100`` (m x k x n), ``bias_act relu 128x256``."""
    name = key[0]
    if name in ("matmul", "sgd_matmul_step"):
        _, a, b, ta, tb = key
        m, k = a[::-1] if ta else a
        n = b[0] if tb else b[1]
        role = "W -= lr·xᵀ·dz" if name == "sgd_matmul_step" else _MATMUL_ROLES[(bool(ta), bool(tb))]
        return f"{name} {role} {m}x{k}x{n}"
    return " ".join(filter(None, (name, key[2], "x".join(map(str, key[1])))))


class TimedKernels:
    """Proxy of a kernel module: every function call is timed and added to ``totals[label]``."""

    def __init__(self, module):
        self._module, self.totals, self.calls = module, defaultdict(float), defaultdict(int)

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        if not callable(fn) or name.startswith("_"):
            return fn

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            dt = time.perf_counter() - t0
            key = _key(name, args, kwargs)
            self.totals[key] += dt
            self.calls[key] += 1
            return out

        return timed


def _epoch(model, cfg, X, y, epoch: int) -> float:
    """One fit epoch (shuffled by ``epoch``) -> its seconds, as fit measures them."""
    hist = fit(
        model, X, y, epochs=1, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
        reduction=cfg.reduction, seed=epoch, divergence_factor=None,
    )  # fmt: skip
    return hist.records[0]["seconds"]


def proxy_cost(n: int = 20000) -> float:
    """Seconds the proxy adds to one call (its timing and bookkeeping), measured on a no-op."""
    module = SimpleNamespace(noop=lambda a: a)
    proxy, a, best = TimedKernels(module), np.zeros((2, 2), np.float32), []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            module.noop(a)
        direct = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n):
            proxy.noop(a)
        best.append((time.perf_counter() - t0 - direct) / n)
    return min(best)


def breakdown(backend: str, cfg_name: str, X, y, epochs: int, dtype: str) -> dict:
    """Per-step seconds of every kernel label, the step total and the rest for one config."""
    # kernel by kernel: a step graph (numba's default) runs its kernels as one call, which no proxy sees
    cfg, be = CONFIGS[cfg_name], dataclasses.replace(get_backend(backend), replays_steps=False)
    model = MLP(cfg.spec, act=cfg.act, loss=cfg.loss, dtype=dtype, backend=be, seed=0)
    steps = -(-X.shape[0] // cfg.batch_size)
    _epoch(model, cfg, X, y, 0)  # warm-up: JIT, workspaces, thread pools
    module = be.k
    overhead = proxy_cost()
    plain, timed, rest, per_kernel, calls = [], [], [], defaultdict(list), {}
    for e in range(epochs):
        plain.append(_epoch(model, cfg, X, y, 2 * e + 1) / steps)
        proxy = TimedKernels(module)
        be.k = proxy
        try:
            timed.append(_epoch(model, cfg, X, y, 2 * e + 2) / steps)
        finally:
            be.k = module
        for key, total in proxy.totals.items():
            per_kernel[key].append(total / steps)
            calls[key] = proxy.calls[key] / steps
        n_calls = sum(proxy.calls.values()) / steps
        rest.append(timed[-1] - sum(proxy.totals.values()) / steps - n_calls * overhead)
    rows = {label(key): statistics.median(v) for key, v in per_kernel.items()}
    calls = {label(key): n for key, n in calls.items()}
    return {
        "config": cfg_name, "backend": backend, "rows": rows, "calls": calls, "proxy_cost": overhead,
        "plain": statistics.median(plain), "timed": statistics.median(timed), "rest": statistics.median(rest),
    }  # fmt: skip


def _group(label: str) -> str:
    name = label.split()[0]
    if name in ("matmul", "sgd_matmul_step"):
        return "GEMM"
    if name.endswith("_step"):
        return "optimizer"
    return "elementwise"


def to_markdown(results: list[dict], header: str) -> str:
    """One table per config: µs per step, calls per step, share of the step, and group subtotals."""
    lines = [header, ""]
    for r in results:
        cfg = CONFIGS[r["config"]]
        step = sum(r["rows"].values()) + r["rest"]  # the instrumented epochs' step, less the proxy
        lines += [
            f"### {r['config']} {cfg.spec} {cfg.act} {cfg.optimizer} b{cfg.batch_size}, {r['backend']}",
            "",
            "| kernel call | µs/step | calls/step | % of step |",
            "|---|---|---|---|",
        ]
        groups: dict[str, float] = defaultdict(float)
        for key, sec in sorted(r["rows"].items(), key=lambda kv: -kv[1]):
            groups[_group(key)] += sec
            lines.append(f"| {key} | {sec * 1e6:.1f} | {r['calls'][key]:.2f} | {100 * sec / step:.1f} |")
        for name, sec in sorted(groups.items(), key=lambda kv: -kv[1]):
            lines.append(f"| **all {name}** | {sec * 1e6:.1f} | | {100 * sec / step:.1f} |")
        rest = r["rest"]
        lines += [
            f"| **Python + glue** (between the calls) | {rest * 1e6:.1f} | | {100 * rest / step:.1f} |",
            f"| **step total** | {step * 1e6:.1f} | | 100.0 |",
            "",
            f"Step without the proxy (plain epochs, interleaved): {r['plain'] * 1e6:.1f} µs; with it: "
            f"{r['timed'] * 1e6:.1f} µs, of which {r['proxy_cost'] * 1e6:.2f} µs per call is the proxy's.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="seed,adam256")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--epochs", type=int, default=5, help="instrumented (and as many plain) epochs")
    ap.add_argument("--samples", type=int, default=11000, help="MNIST training rows per epoch")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--inputs", choices=("pixels", "floats"), default="pixels",
        help="train on the images as 8-bit codes (gpumlp.data.Pixels, as `gpumlp train` does) or as floats",
    )  # fmt: skip
    ap.add_argument("--note", default="", help="a line printed under the title (e.g. the machine's load)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    from gpumlp.data import Pixels, load_mnist, scale_pixels

    m = load_mnist()
    codes, y = m.x_train[: args.samples], m.y_train[: args.samples]
    X = Pixels(codes) if args.inputs == "pixels" else scale_pixels(codes, dtype=args.dtype)
    results = [breakdown(args.backend, c, X, y, args.epochs, args.dtype) for c in args.configs.split(",")]
    header = (
        f"## One training step, kernel by kernel ({args.dtype}, {args.samples} samples/epoch, median of "
        f"{args.epochs} instrumented epochs interleaved with {args.epochs} plain ones)\n\n"
        f"Command: `python bench/step_breakdown.py {shlex.join(sys.argv[1:] if argv is None else argv)}`"
    )
    env = " ".join(f"{k}={os.environ[k]}" for k in ENV_VARS if k in os.environ)
    header += f"\n\nenv: {env or '(none set)'}; 1-min load average at start {os.getloadavg()[0]:.2f}"
    if args.note:
        header += f"\n\n{args.note}"
    text = to_markdown(results, header)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
