"""Glue shared by the kernel modules that is not a kernel itself: argument checks, the
``out=`` / accumulator conventions on host arrays, and constants of the shared algorithms.

``reference.py``, ``numba_cpu.py`` and ``cupy_gpu.py`` import these (under private aliases, so
that the contract test, which compares the modules' public names, does not count them).
"""

from __future__ import annotations

import numpy as np

# Philox4x32-10 (Salmon, Moraes, Dror & Shaw, SC'11; the generator of Random123 and cuRAND):
# round multipliers and Weyl key increments.
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


class StepNotCapturable(RuntimeError):
    """A training step makes a kernel call that a step graph cannot replay; the step then runs
    kernel by kernel (gpumlp.step.TrainStep)."""


def step_value(t) -> int:
    """A per-step integer given as an int or a 1-element integer (host) array -> int."""
    if isinstance(t, (int, np.integer)):
        return int(t)
    t = np.asarray(t)
    if t.size != 1 or t.dtype.kind not in "iu":
        raise ValueError(f"a step must be an int or a 1-element integer array, got {t.dtype} {t.shape}")
    return int(t.reshape(-1)[0])


def updates_running_stats(running_mean, running_var) -> bool:
    """Batch norm's running statistics come both or neither; True when given."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    return running_mean is not None


def store_sum(out, value: float, accumulate: bool, dtype):
    """A scalar sum as a new 0-d array of dtype, or written / added into the 0-d ``out``."""
    if out is None:
        return np.asarray(value, dtype=dtype)
    out[...] = (out + value) if accumulate else value
    return out


def check_chain(x, weights, biases, acts) -> None:
    """ValueError unless ``dense_chain``'s arguments chain: x (B, K0), weights[l] (K_l, N_l) with
    K_{l+1} = N_l, biases[l] (N_l,), one activation name per layer, at least one layer."""
    if not (len(weights) == len(biases) == len(acts) >= 1):
        raise ValueError(
            f"dense_chain: {len(weights)} weights, {len(biases)} biases and {len(acts)} activations; "
            "give one of each per layer (at least one layer)"
        )
    width = x.shape[1] if x.ndim == 2 else None
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
            raise ValueError(
                f"dense_chain: layer {i} has weights {w.shape} and bias {b.shape} after an input of "
                f"width {width}; expected ({width}, N) and (N,)"
            )
        width = w.shape[1]


def chain_layers(matmul, bias_act, x, weights, biases, acts):
    """``dense_chain`` through a kernel module's ``matmul`` and ``bias_act``, layer by layer (any
    array module: the finiteness test is plain arithmetic). -> (last activations, x_nonfinite)."""
    check_chain(x, weights, biases, acts)
    a, nonfinite = x, False
    for i, (w, b, act) in enumerate(zip(weights, biases, acts)):
        z = matmul(a, w)
        if i == 0:
            nonfinite = not bool((abs(z) < float("inf")).all())  # False for NaN and inf
        a = bias_act(z, b, act)
    return a, nonfinite


def put(out, value):
    """Write ``value`` into ``out`` if given, else return ``value`` as is."""
    if out is None:
        return value
    out[...] = value
    return out


def accumulate(acc, value, dtype):
    """Add ``value`` into the 0-d accumulator ``acc`` if given, else a new 0-d array of dtype."""
    if acc is None:
        return np.asarray(value, dtype=dtype)
    acc += value
    return acc


def gaussian_taps(sigma: float) -> np.ndarray:
    """The normalised Gaussian of std ``sigma`` the elastic fields are smoothed with, as
    scipy.ndimage.gaussian_filter samples it: radius int(4 sigma + 0.5). -> (2R+1,) float64."""
    if not sigma > 0:
        raise ValueError(f"elastic sigma must be > 0 pixels, got {sigma}")
    radius = int(4.0 * sigma + 0.5)
    g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return g / g.sum()


def check_permutation_size(n: int) -> None:
    """Permutations are int32: n must be in [0, 2^31)."""
    if not 0 <= n < 2**31:
        raise ValueError(f"permutation: n must be in [0, 2^31), got {n}")


def check_pixel_codes(codes) -> None:
    """ValueError unless ``codes`` (NumPy or device array) is gather_pixels' 2-D uint8 C-contiguous source."""
    if codes.dtype != np.uint8 or codes.ndim != 2 or not codes.flags.c_contiguous:
        raise ValueError(
            f"gather_pixels: codes must be a C-contiguous 2-D uint8 array (N, F), got {codes.dtype} "
            f"{tuple(codes.shape)}; pass gpumlp.data.Pixels(...).codes"
        )
