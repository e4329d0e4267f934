"""Experiment: the whole CPU minibatch step as one compiled function, against today's per-kernel step.

One ``@njit`` function per model structure (here: one hidden Dense layer, the seed and adam256
configs) runs gather, forward (cblas GEMMs + fused bias/activation), the fused loss, backward,
and the update (plain SGD folded into the weight-gradient GEMM, or Adam over the flat parameter
groups), calling the same jitted kernel bodies and the same OpenBLAS ``cblas_?gemm`` binding as
``gpumlp.kernels.numba_cpu``. It is validated first: 20 unshuffled steps from the same initial
model must give the per-kernel path's weights (and summed loss) within float32 rounding. Then
epochs of both are timed interleaved in one process and the median µs per step is printed, with
the fused/per-kernel ratio (< 1: the fused step is faster).

Usage: ``python bench/fused_step.py [--configs seed,adam256] [--samples 11000] [--repeats 7]``.
An experiment (STYLE: kernel variants live in bench/ until they win), it reaches into the
kernel module's private jitted bodies on purpose.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import numpy as np

from gpumlp.backend import get_backend
from gpumlp.bench.runner import CONFIGS
from gpumlp.kernels import numba_cpu as nk
from gpumlp.model import MLP
from gpumlp.train import fit

_ACT = {"sigmoid": 1, "relu": 3}


@functools.lru_cache
def make_step(dtype):
    """The fused step for 784-H-K MLPs (hidden act code, loss bce/softmax, sgd-fold or adam)."""
    import numba

    gemm = nk._GEMM[np.dtype(dtype)]
    bias_act, act_grad, bias_grad = nk._bias_act_rows, nk._act_grad_range, nk._bias_grad_k
    bce, xent, correct, gather = nk._sigmoid_bce_k, nk._softmax_xent_k, nk._correct_k, nk._gather_k
    sgd, adam, cap = nk._sgd_range, nk._adam_range, nk._BCE_CAP
    real = np.dtype(dtype).type  # Adam's scalars in the weights' dtype, as numba_cpu passes them

    @numba.njit(error_model="numpy")
    def step(X, idx, labels, p, ws, act, use_bce, use_adam, lr, scale, t, acc, hits):
        W1, b1, W2, b2, wg, gg, ow, og, m1, v1, m2, v2 = p
        x, z1, y1, z2, s2, g2, dy1, dz1, gW1, gW2, gb1, gb2 = ws
        bsz = idx.shape[0]
        gather(X, idx, x)
        gemm(z1, x, W1, 1.0, 0.0, False, False)
        bias_act(z1, b1, y1, y1, False, act, 0, bsz)  # pre unused: no pre-activation kept
        gemm(z2, y1, W2, 1.0, 0.0, False, False)
        bias_act(z2, b2, s2, s2, False, 0, 0, bsz)
        acc[0] += bce(s2, labels, g2, scale, cap) if use_bce else xent(s2, labels, g2, scale)
        hits[0] += correct(s2, labels)
        bias_grad(g2, gb2)
        if not use_adam:
            gemm(dy1, g2, W2, 1.0, 0.0, False, True)
            gemm(W2, y1, g2, -lr, 1.0, True, False)
        else:
            gemm(gW2, y1, g2, 1.0, 0.0, True, False)
            gemm(dy1, g2, W2, 1.0, 0.0, False, True)
        y1f = y1.reshape(-1)  # also as the pre-activation argument, unread by sigmoid/relu
        act_grad(dy1.reshape(-1), y1f, y1f, dz1.reshape(-1), act, 0, dy1.size)
        bias_grad(dz1, gb1)
        if not use_adam:
            gemm(W1, x, dz1, -lr, 1.0, True, False)
            sgd(ow, og, lr, 0.0, 0.0, 0, ow.size)
        else:
            gemm(gW1, x, dz1, 1.0, 0.0, True, False)
            lr_c, inv_bc2 = real(lr / (1.0 - 0.9**t)), real(1.0 / (1.0 - 0.999**t))
            b1, b2, omb1, omb2 = real(0.9), real(0.999), real(1 - 0.9), real(1 - 0.999)
            eps, one, zero = real(1e-8), real(1), real(0)
            adam(wg, gg, m1, v1, lr_c, b1, b2, omb1, omb2, eps, inv_bc2, one, zero, zero, 0, wg.size)
            adam(ow, og, m2, v2, lr_c, b1, b2, omb1, omb2, eps, inv_bc2, one, zero, zero, 0, ow.size)

    return step


class FusedTrainer:
    """Holds a model's arrays, workspaces and optimizer state for the fused step."""

    def __init__(self, model: MLP, cfg, batch: int):
        (l1, l2), dt = model.layers, model.dtype
        (_, wg, gg, _), (_, ow, og, _) = model.param_groups()
        h, k, f = l1.n_out, l2.n_out, model.n_features
        zeros = [np.zeros_like(a) for a in (wg, wg, ow, ow)]
        self.p = (l1.params["W"], l1.params["b"], l2.params["W"], l2.params["b"], wg, gg, ow, og, *zeros)
        widths = (f, h, h, k, k, k, h, h)  # x, z1, y1, z2, scores, dscores, dy1, dz1
        grads = (l1.grads["W"], l2.grads["W"], l1.grads["b"], l2.grads["b"])
        self.ws = tuple(np.empty((batch, w), dt) for w in widths) + grads
        self.cfg, self.batch, self.act = cfg, batch, _ACT[cfg.act]
        self.step = make_step(np.dtype(dt))
        self.acc, self.hits, self.t = np.zeros(1, dt), np.zeros(1, np.int64), 0

    def epoch(self, X, y, order) -> None:
        """Full batches of ``order`` (the per-kernel path's last partial batch is left out of both)."""
        cfg, b, labels = self.cfg, self.batch, y[order].astype(np.int32)
        scale = 1.0 / b if cfg.reduction == "mean" else 1.0
        use_bce, use_adam = cfg.loss == "logistic", cfg.optimizer == "adam"
        for s in range(0, order.size - b + 1, b):
            self.t += 1
            self.step(X, order[s : s + b], labels[s : s + b], self.p, self.ws, self.act, use_bce, use_adam,
                      cfg.lr, scale, self.t, self.acc, self.hits)  # fmt: skip


def _model(cfg):
    return MLP(cfg.spec, act=cfg.act, loss=cfg.loss, dtype="float32", backend=get_backend("numba"), seed=0)


def _fit(model, cfg, X, y, seed, shuffle=True):
    kw = dict(batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, reduction=cfg.reduction)
    return fit(model, X, y, epochs=1, seed=seed, shuffle=shuffle, divergence_factor=None, **kw)


def validate(cfg, X, y, steps: int = 20) -> float:
    """Max |difference| of the weights after ``steps`` unshuffled steps, per-kernel vs fused."""
    n = steps * cfg.batch_size
    a, b = _model(cfg), _model(cfg)
    _fit(a, cfg, X[:n], y[:n], 0, shuffle=False)
    fused = FusedTrainer(b, cfg, cfg.batch_size)
    fused.epoch(X[:n], y[:n], np.arange(n, dtype=np.int32))
    worst = 0.0
    for (_, wa, _, _), (_, wb, _, _) in zip(a.param_groups(), b.param_groups()):
        worst = max(worst, float(np.max(np.abs(wa - wb))))
        np.testing.assert_allclose(wb, wa, rtol=1e-4, atol=1e-5)
    return worst


def compare(cfg_name: str, X, y, repeats: int) -> dict:
    """Median µs per step of the per-kernel fit epoch and the fused epoch, interleaved."""
    cfg = CONFIGS[cfg_name]
    steps = X.shape[0] // cfg.batch_size
    X = X[: steps * cfg.batch_size]
    y = y[: steps * cfg.batch_size]
    a, b = _model(cfg), _model(cfg)
    fused = FusedTrainer(b, cfg, cfg.batch_size)
    kernel_t, fused_t = [], []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        fused.epoch(X, y, nk.permutation(r, X.shape[0]))  # fit's epoch also draws its permutation
        dt_fused = (time.perf_counter() - t0) / steps
        dt_kernel = _fit(a, cfg, X, y, r).records[0]["seconds"] / steps
        if r:  # the first round compiles
            fused_t.append(dt_fused)
            kernel_t.append(dt_kernel)
    pk, pf = statistics.median(kernel_t), statistics.median(fused_t)
    ratios = [f / k for f, k in zip(fused_t, kernel_t)]
    return {
        "config": cfg_name,
        "kernel_us": pk * 1e6,
        "fused_us": pf * 1e6,
        "ratio": statistics.median(ratios),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="seed,adam256")
    ap.add_argument("--samples", type=int, default=11000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    from gpumlp.data import load_mnist, scale_pixels

    m = load_mnist()
    X, y = scale_pixels(m.x_train[: args.samples]), m.y_train[: args.samples]
    print(
        "| config | per-kernel µs/step | fused µs/step | fused / per-kernel (median) | max abs Δw, 20 steps |"
    )
    print("|---|---|---|---|---|")
    for name in args.configs.split(","):
        diff = validate(CONFIGS[name], X, y)
        r = compare(name, X, y, args.repeats)
        print(f"| {name} | {r['kernel_us']:.1f} | {r['fused_us']:.1f} | {r['ratio']:.3f} | {diff:.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
