"""What keeping the training images as 8-bit codes (``gpumlp.data.Pixels``) buys the minibatch
gather: ``gather_rows`` of float32 rows against ``gather_pixels`` of uint8 codes decoded to float32,
and ``gather_shifted`` against ``gather_shifted_pixels`` (shifts of up to 2 px), per CPU backend,
interleaved in one process.

    python bench/pixel_gather.py [--rounds 7] [--rows 55000] [--out bench/results/pixel_gather.md]

Minibatches of random rows of a rows x 784 set (MNIST's 55,000 by default: 172 MB as float32,
43 MB as codes, both beyond the caches, as in training), a fresh batch of indices per call; the
best over the rounds of each round's mean per call (``gpumlp.bench.inference.interleaved_best``).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from gpumlp.backend import get_backend
from gpumlp.bench.inference import interleaved_best
from gpumlp.bench.machine import cpu_model

FEATURES, BATCHES, INNER = 784, (100, 128, 256), 50


def _gathers(k, codes, floats, batch: int, shift: int, rng) -> dict:
    """The two gathers of ``batch`` rows (shifted by up to ``shift`` px when > 0) on kernel module
    ``k``, each call with the next of 400 random index arrays."""
    batches = itertools.cycle([rng.integers(0, len(codes), batch).astype(np.int32) for _ in range(400)])
    out = np.empty((batch, FEATURES), np.float32)
    if shift:
        scale = (127.5, -1.0)
        return {
            "float32 rows": lambda: k.gather_shifted(floats, next(batches), shift, 1, out=out),
            "uint8 codes": lambda: k.gather_shifted_pixels(codes, next(batches), shift, 1, *scale, out=out),
        }
    return {
        "float32 rows": lambda: k.gather_rows(floats, next(batches), out=out),
        "uint8 codes": lambda: k.gather_pixels(codes, next(batches), 127.5, -1.0, np.float32, out),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, default=55_000)
    ap.add_argument("--backends", default="numba,numpy")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (args.rows, FEATURES), dtype=np.uint8)
    floats = codes.astype(np.float32)  # the same images as float rows: what a float training set reads
    rows = []
    for name in args.backends.split(","):
        for shift, batch in [(0, b) for b in BATCHES] + [(2, 128)]:
            fns = _gathers(get_backend(name).k, codes, floats, batch, shift, rng)
            best = interleaved_best(fns, args.rounds, INNER)
            f32, u8 = best["float32 rows"] * 1e6, best["uint8 codes"] * 1e6
            kind = f"shifted ±{shift} px" if shift else "rows"
            rows.append(f"| {name} | {kind} | {batch} | {f32:.1f} | {u8:.1f} | {f32 / u8:.2f} |")
    mb = args.rows * FEATURES / 1e6
    text = "\n".join([
        f"## Minibatch gather: float32 rows against 8-bit codes decoded ({cpu_model()}, one thread)",
        "",
        f"`python bench/pixel_gather.py --rounds {args.rounds} --rows {args.rows}`: random rows of a "
        f"{args.rows} x {FEATURES} set ({4 * mb:.0f} MB as float32, {mb:.0f} MB as codes), fresh indices "
        f"per call; best of {args.rounds} rounds of {INNER} calls, interleaved.",
        "",
        "| backend | gather | batch | float32 rows µs | uint8 codes µs | speed-up |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
