"""Napkin math for the benchmarks: FLOPs of an epoch's matmuls and bytes moved per kernel.

Only the dense matmuls are counted as FLOPs (2 per multiply-add); elementwise
kernels are memory-bound, so they are measured in bytes read + written.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpumlp.optim import RULES


def layer_shapes(widths: Sequence[int]) -> list[tuple[int, int]]:
    """Widths (input, hidden..., classes) -> [(fan_in, fan_out)] per dense layer."""
    return [(int(a), int(b)) for a, b in zip(widths[:-1], widths[1:])]


MatmulCall = tuple[tuple[int, int], tuple[int, int], bool, bool]  # (a shape, b shape, trans_a, trans_b)


def step_matmuls(widths: Sequence[int], batch: int) -> list[MatmulCall]:
    """The matmuls of one training step on ``batch`` samples, as Dense runs them:
    (shape of a, shape of b, trans_a, trans_b) for ``matmul(a, b, trans_a, trans_b)``.

    Per layer (fan_in i, fan_out o): forward X·W ((B,i)·(i,o)), backward dW = Xᵀ·dZ
    ((B,i)ᵀ·(B,o)), and dX = dZ·Wᵀ ((B,o)·(i,o)ᵀ) for every layer but the first (whose
    input gradient nobody needs)."""
    layers = layer_shapes(widths)
    steps = [((batch, i), (i, o), False, False) for i, o in layers]
    for layer, (i, o) in reversed(list(enumerate(layers))):
        steps.append(((batch, i), (batch, o), True, False))
        if layer:
            steps.append(((batch, o), (i, o), False, True))
    return steps


def step_flops(widths: Sequence[int], batch: int) -> int:
    """Matmul FLOPs of one training step on ``batch`` samples (see :func:`step_matmuls`)."""
    total = 0
    for a, b, trans_a, trans_b in step_matmuls(widths, batch):
        m, k = a[::-1] if trans_a else a
        n = b[0] if trans_b else b[1]
        total += matmul_flops(m, k, n)
    return total


def epoch_flops(widths: Sequence[int], n_samples: int) -> int:
    """Matmul FLOPs of one epoch over ``n_samples`` (independent of the batch size)."""
    return step_flops(widths, n_samples)


def kernel_bytes(kernel: str, shape: Sequence[int], itemsize: int, label_itemsize: int = 8) -> int:
    """Bytes a kernel must read + write at ``shape``, the minimum any implementation moves.

    bias_act (B,N): reads z and b, writes y. act_grad (B,N): reads grad and y, writes out.
    bias_grad (B,N): reads grad, writes (N,). softmax_xent (B,K): reads logits and labels,
    writes grad. gather_rows / gather_shifted (B,F): read B rows and B indices, write B rows;
    gather_pixels / gather_shifted_pixels read their B rows as uint8.
    permutation (n,): writes n int32 indices.
    An optimizer step (P,) (gpumlp.optim.RULES): reads w, g and its state, writes w and the state."""
    if kernel in ("bias_act", "act_grad"):
        b, n = shape
        return (3 * b * n if kernel == "act_grad" else 2 * b * n + n) * itemsize
    if kernel == "bias_grad":
        b, n = shape
        return (b * n + n) * itemsize
    if kernel in ("softmax_xent", "sigmoid_bce"):
        b, k = shape
        return 2 * b * k * itemsize + b * label_itemsize
    if kernel in ("gather_rows", "gather_shifted", "gather_warped"):
        b, f = shape
        return 2 * b * f * itemsize + b * label_itemsize
    if kernel in ("gather_pixels", "gather_shifted_pixels"):
        b, f = shape
        return b * f * (1 + itemsize) + b * label_itemsize
    if kernel == "elastic_field":  # writes the (B, 2, side, side) field
        b, f = shape
        return 2 * b * f * itemsize
    if kernel == "permutation":  # writes the (n,) int32 order: its keys need not leave the cache
        return 4 * int(shape[0])
    n_params = 1
    for s in shape:
        n_params *= int(s)
    # an optimizer step reads w, g and its state arrays and writes w and the state
    moves = {r.kernel: 3 + 2 * len(r.state) for r in RULES.values()}
    if kernel not in moves:
        raise ValueError(f"no byte count for kernel {kernel!r}")
    return moves[kernel] * n_params * itemsize


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of an (m,k)·(k,n) matmul: one multiply and one add per term."""
    return 2 * m * k * n
