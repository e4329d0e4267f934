"""Is this machine in a slow phase? One core's pass over data the other core just wrote, sampled
every few seconds against the same pass over data only this core touched.

    python bench/cross_core.py [--seconds 120] [--every 3] [--out bench/results/cross_core.md]

Each sample times, on adam256's first layer (784x256 float32 weights, batch 128): the numba Adam
step alone (its state last touched by this core); the same step right after a 2-thread BLAS GEMM
wrote its gradient (half of the gradient's lines then sit in the other core's cache) and read its
weights; and that forward GEMM right after Adam wrote the weights. Medians of 100 of each per
sample; the kernel-steal time of the sample's interval from /proc/stat (Linux). A sample whose
"after GEMM" Adam takes over 1.5x the lone one is marked slow: moving cache lines between the two
cores costs more than it does in the quiet phases, while one core's own work runs as fast as ever.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gpumlp.bench.machine import cpu_model
from gpumlp.kernels import numba_cpu as k

BATCH, FEATURES, HIDDEN, CALLS, SLOW = 128, 784, 256, 100, 1.5


def _steal_ticks() -> int | None:
    """Clock ticks the hypervisor took from this machine's vCPUs so far (None off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    return int(fields[8]) if len(fields) > 8 else None


def sample(rng: np.random.Generator) -> tuple[float, float, float]:
    """(Adam alone, Adam after a 2-thread GEMM wrote its gradient, forward GEMM after Adam), µs."""
    x = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    dz = rng.standard_normal((BATCH, HIDDEN)).astype(np.float32) * 0.01
    w = rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32) * 0.05
    g, m, v, z = np.empty_like(w), np.zeros_like(w), np.zeros_like(w), np.empty((BATCH, HIDDEN), np.float32)
    w1, g1 = w.copy(), w * 0.01
    m1, v1 = np.zeros_like(w), np.zeros_like(w)
    k.matmul(x, dz, out=g, trans_a=True)
    alone, after, forward = [], [], []
    for t in range(2, CALLS + 2):
        t0 = time.perf_counter()
        k.adam_step(w1, g1, m1, v1, 1e-3, t)
        alone.append(time.perf_counter() - t0)
    for t in range(2, CALLS + 2):
        k.matmul(x, dz, out=g, trans_a=True)
        t0 = time.perf_counter()
        k.adam_step(w, g, m, v, 1e-3, t)
        t1 = time.perf_counter()
        k.matmul(x, w, out=z)
        after.append(t1 - t0)
        forward.append(time.perf_counter() - t1)
    return tuple(float(np.median(s)) * 1e6 for s in (alone, after, forward))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--every", type=float, default=3.0, help="seconds between samples")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sample(rng)  # compiled (or loaded) before timing
    rows, slow = [], 0
    end = time.monotonic() + args.seconds
    while True:
        steal0 = _steal_ticks()
        alone, after, forward = sample(rng)
        steal1 = _steal_ticks()
        steal = "–" if steal0 is None or steal1 is None else str(steal1 - steal0)
        ratio = after / alone
        slow += ratio > SLOW
        mark, t = "slow" if ratio > SLOW else "", time.strftime("%H:%M:%S")
        rows.append(f"| {t} | {alone:.1f} | {after:.1f} | {ratio:.2f} | {forward:.1f} | {steal} | {mark} |")
        print(rows[-1], flush=True)
        if time.monotonic() + args.every > end:
            break
        time.sleep(args.every)
    text = "\n".join([
        f"## Cross-core phases ({cpu_model()}, float32, adam256's first layer)",
        "",
        f"`python bench/cross_core.py --seconds {args.seconds:g} --every {args.every:g}`: {len(rows)} "
        f"samples, {slow} slow (Adam after the GEMM over {SLOW}x Adam alone). Medians of {CALLS} calls per "
        "sample, µs.",
        "",
        "| time | Adam alone | Adam after 2-thread GEMM | ratio | forward GEMM after Adam | steal ticks | |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
