"""Per-epoch training monitors that stay on the device until the epoch ends.

:class:`GradNorms` adds each step's squared gradient norm of every layer into a
0-d device accumulator per layer (the ``sum_squares`` kernel, so it also runs
inside captured CUDA graphs) and is read once per epoch. :class:`ParamChange`
keeps a device copy of the parameters from the start of an epoch and gives the
largest absolute change of any weight or bias at its end.
"""

from __future__ import annotations

import math
from collections import Counter


def layer_names(model) -> list[str]:
    """Names of the layers that have parameters, in order: ``dense1``, ``batchnorm1``, ``dense2``..."""
    seen: Counter = Counter()
    names = []
    for layer in model.layers:
        if layer.params:
            kind = type(layer).__name__.lower()
            seen[kind] += 1
            names.append(f"{kind}{seen[kind]}")
    return names


class GradNorms:
    """Root-mean-square over an epoch's steps of each layer's gradient L2 norm (all its
    parameters together, before any clipping): ``sqrt(sum_steps ||g_layer||^2 / steps)``."""

    def __init__(self, model):
        self.be, self.names = model.be, layer_names(model)
        self.grads = [list(la.grads.values()) for la in model.layers if la.params]
        self.acc = [model.be.xp.zeros((), dtype=model.dtype) for _ in self.grads]

    def reset(self) -> None:
        """Zero the accumulators (at the start of an epoch, outside any graph capture)."""
        for a in self.acc:
            a[...] = 0

    def accumulate(self) -> None:
        """Add this step's squared per-layer gradient norms on the device (no sync, graph-safe)."""
        for a, grads in zip(self.acc, self.grads):
            for g in grads:
                self.be.k.sum_squares(g, out=a, accumulate=True)

    def read(self, steps: int) -> dict[str, float]:
        """{layer name: RMS gradient norm over ``steps`` steps}, read from the device once."""
        return {n: math.sqrt(float(self.be.to_host(a)) / steps) for n, a in zip(self.names, self.acc)}


class ParamChange:
    """Largest |w_end - w_start| over every parameter (weights and biases) in one epoch."""

    def __init__(self, model):
        self.be, self.params = model.be, [w for _, w, _, _ in model.param_groups()]
        self.start = [model.be.xp.empty_like(w) for w in self.params]

    def mark(self) -> None:
        """Remember the parameters now (a device copy; synchronised so every stream sees it)."""
        for s, w in zip(self.start, self.params):
            s[...] = w
        self.be.synchronize()

    def max_change(self) -> float:
        """max |w - w_at_mark| over every parameter, one small read from the device."""
        xp, worst = self.be.xp, 0.0
        for s, w in zip(self.start, self.params):
            xp.subtract(w, s, out=s)
            worst = max(worst, float(self.be.to_host(xp.abs(s, out=s).max())))
        return worst
