"""A/B of the Numba kernels of another checkout (BASE) against this one, in one process.

    python bench/compare_numba_kernels.py /path/to/base/checkout [--asm]

Times bias_act, act_grad and the optimizer steps at bench/bench_kernels.py's shapes (float32),
base and this checkout interleaved round by round (alternating which goes first, state reset
before each round), and prints the median time of each and the ratio this/base. With --asm, also
compares the machine code of the serial and parallel variants of both (symbol names aside;
Numba can show it only for code it compiled in this run, as with the default fresh cache).
BASE's kernels are copied to a temporary package, so nothing is written into that checkout;
Numba's cache goes to a temporary directory unless NUMBA_CACHE_DIR is set. On a shared machine,
rerun before believing a single ratio far from 1.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("_bias_act", "_act_grad", "_sgd", "_momentum", "_adagrad", "_rmsprop", "_adam")


def _cases(np):
    """(name, call(k), reset()) at the shapes of bench/bench_kernels.py."""
    rng = np.random.default_rng(0)
    cases, no_state = [], lambda: None
    for shape in [(100, 100), (100, 10), (256, 1024)]:
        z, b, y = (rng.standard_normal(s).astype(np.float32) for s in (shape, shape[1:], shape))
        out = np.empty(shape, np.float32)
        for act in ("relu", "sigmoid", "tanh"):
            call = lambda k, z=z, b=b, o=out, a=act: k.bias_act(z, b, a, out=o)  # noqa: E731
            cases.append((f"bias_act {act} {shape}", call, no_state))
        call = lambda k, z=z, y=y, o=out: k.act_grad(z, y, "relu", out=o)  # noqa: E731
        cases.append((f"act_grad relu {shape}", call, no_state))
    for shape in [(100, 100), (100, 10), (784, 1024)]:
        w0 = rng.standard_normal(shape).astype(np.float32)
        w, g, m, v = w0.copy(), w0 * 1e-3, np.zeros_like(w0), np.zeros_like(w0)

        def reset(w=w, w0=w0, m=m, v=v):
            np.copyto(w, w0)
            m.fill(0)
            v.fill(0)

        steps = {
            "sgd": lambda k, w=w, g=g: k.sgd_step(w, g, 1e-3, 1e-4),
            "momentum": lambda k, w=w, g=g, m=m: k.momentum_step(w, g, m, 1e-3),
            "adagrad": lambda k, w=w, g=g, m=m: k.adagrad_step(w, g, m, 1e-3),
            "rmsprop": lambda k, w=w, g=g, m=m: k.rmsprop_step(w, g, m, 1e-3),
            "adam": lambda k, w=w, g=g, m=m, v=v: k.adam_step(w, g, m, v, 1e-3, 3),
        }
        cases += [(f"{name} {shape}", call, reset) for name, call in steps.items()]
    return cases


def _timed(call, k, reset, iters: int) -> float:
    reset()
    t0 = time.perf_counter()
    for _ in range(iters):
        call(k)
    return (time.perf_counter() - t0) / iters


def _machine_code(fn, sig) -> list[str]:
    asm = re.sub(r"_ZN\w+", "SYM", fn.inspect_asm(sig))
    return [ln for ln in asm.splitlines() if ln.strip() and not ln.strip().startswith((".", "#"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="the other checkout (its kernels/ folder is compared)")
    ap.add_argument("--asm", action="store_true", help="also compare the variants' machine code")
    ap.add_argument("--rounds", type=int, default=20)
    opts = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="compare-kernels-"))
    os.environ.setdefault("NUMBA_CACHE_DIR", str(tmp / "numba"))  # before numba is imported
    shutil.copytree(opts.base / "kernels", tmp / "base_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path[:0] = [str(tmp), str(ROOT)]
    import base_kernels.numba_cpu as base
    import numpy as np

    from gpumlp.kernels import numba_cpu as this

    cases = _cases(np)
    for k in (base, this):
        k._warmup(np.float32)
    ratios = []
    for name, call, reset in cases:
        times: dict = {base: [], this: []}
        for r in range(opts.rounds):
            for k in (base, this) if r % 2 == 0 else (this, base):
                times[k].append(_timed(call, k, reset, 200))
        tb, tt = np.median(times[base]), np.median(times[this])
        ratios.append(tt / tb)
        print(f"{name:30s} base {tb * 1e6:9.1f} us  this {tt * 1e6:9.1f} us  this/base {tt / tb:5.2f}")
    print(f"geometric mean this/base over {len(ratios)} kernels: {np.exp(np.mean(np.log(ratios))):.3f}")
    if opts.asm:
        for name in VARIANTS:
            for variant in ("_serial", "_par"):
                a, b = getattr(base, name + variant, None), getattr(this, name + variant, None)
                for sig in a.signatures if a is not None and b is not None else ():
                    same = _machine_code(a, sig) == _machine_code(b, sig)
                    print(f"{name + variant:20s} {'same machine code' if same else 'DIFFERENT machine code'}")


if __name__ == "__main__":
    main()
