"""NumPy reference kernels: the definition of correct for every backend.

Written for clarity, not speed. Every other backend (``numba_cpu``,
``cupy_gpu``) exports exactly these public names with the same parameters and
defaults, and is tested against this module.

Conventions shared by every kernel
----------------------------------
* Arrays are C-contiguous, float32 or float64 (one dtype per call); class
  labels are integer arrays of shape ``(B,)`` with values in ``[0, K)``.
* ``out=`` / ``grad=`` / ``dx=`` buffers are optional; when given, the result
  is written into them and they are returned. Kernels never keep references.
* Losses return ``(loss, grad)``: ``loss`` is a 0-d array holding the *sum*
  over the batch of the per-sample losses (so nothing forces a device sync),
  and ``grad`` is ``grad_scale * d(loss)/d(logits)``; the framework passes
  ``grad_scale = 1/B`` for a mean reduction and ``1`` for a sum. Given
  ``loss=`` (a 0-d array of the logits' dtype), the batch sum is *added* to it
  in place and it is returned: an epoch accumulates on the device with no
  extra operation. ``correct_count(..., count=)`` accumulates the same way.
* Optimizer steps update their arrays in place and return nothing. The
  effective gradient is ``g + l2 * w + l1 * sign(w)``.
* Labels outside ``[0, K)`` are the caller's error (the framework validates
  them at the API boundary); a backend may raise on them but never reads or
  writes out of bounds.
* Activations are the rows of ``activations.py`` (``identity``, ``sigmoid``, ``tanh``, ``relu``,
  ``leaky_relu`` with negative slope ``LEAKY_SLOPE``, ``gelu``, ``gelu_tanh``, ``silu``, ``softplus``);
  ``act_grad`` needs the pre-activation (``pre=``, kept by ``bias_act(..., pre=)``) for those whose
  row says ``needs_input``.
* Per-step integers (Adam's ``t``, dropout's and ``gather_shifted``'s ``step``)
  are a Python int or a 1-element int64 array on the backend's device. The training loop passes the
  array: a GPU kernel reads it on the device, so a captured CUDA graph replays
  with the current value instead of the one it was captured with.
"""

from __future__ import annotations

import numpy as np

# ACTIVATIONS and LEAKY_SLOPE are re-exported: the contract's constants come from the table
from .activations import ACTIVATIONS as ACTIVATIONS
from .activations import LEAKY_SLOPE as LEAKY_SLOPE
from .activations import activation as _activation
from .activations import grad_spec as _grad_spec
from .common import PHILOX_M as _PHILOX_M
from .common import PHILOX_W as _PHILOX_W
from .common import accumulate as _accumulate
from .common import chain_layers as _chain_layers
from .common import check_permutation_size as _check_permutation_size
from .common import check_pixel_codes as _check_pixel_codes
from .common import gaussian_taps as _gaussian_taps
from .common import put as _put
from .common import step_value as _step_value
from .common import store_sum as _store_sum
from .common import updates_running_stats as _updates_running_stats
from .images import image_side as _image_side

# sigmoid_bce treats probabilities as clipped to [LOG_EPS, 1 - LOG_EPS]: no log(0), and
# each class term costs at most -log(LOG_EPS) ~ 27.6.
LOG_EPS = 1e-12
# True when sgd_matmul_step is one GEMM (alpha/beta), never forming the gradient; here and on the
# GPU it forms the product, then steps: one update per weight matrix instead of one per flat buffer.
SGD_IN_GEMM = False
# The largest last weight matrix (bytes) up to which ``dense_chain`` is the backend's fastest eval
# forward of a stack of dense layers (it may run bigger ones before it layer by layer), so the
# framework uses it instead of its layers one by one; 0: never (here dense_chain is the
# definition, no faster than the layers).
CHAIN_MAX_WEIGHT_BYTES = 0
_M32 = 0xFFFFFFFF




# --------------------------------------------------------------------- dense
def matmul(a, b, out=None, trans_a=False, trans_b=False):
    """``op(a) @ op(b)`` where ``op`` transposes when asked. (M,K)@(K,N) -> (M,N)."""
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    return np.matmul(a, b, out=out)


def bias_act(z, b, act, out=None, pre=None):
    """Forward of a dense layer's tail: ``act(z + b)``, act's NumPy definition in activations.py.
    ``pre``, when given, receives the pre-activation z + b too (act_grad needs it for some
    activations). z: (B,N), b: (N,) -> (B,N)."""
    spec = _activation(act)
    s = z + b
    if pre is not None:
        pre[...] = s
    return _put(out, spec.forward(s).astype(z.dtype, copy=False))


def dense_chain(x, weights, biases, acts, out=None, labels=None):
    """Eval forward of a stack of dense layers: a = x, then ``a = act_l(a @ weights[l] + biases[l])``
    for each layer l (``acts[l]``: activation name). -> (a, x_nonfinite): x_nonfinite is True when
    ``x @ weights[0]`` holds a NaN or inf, as any NaN or inf in x makes it (weights finite), and
    a finite x can by overflow. x: (B, K0), weights[l]: (K_l, N_l), biases[l]: (N_l,), one float
    dtype -> a: (B, N_last). ``labels`` (B,) int64, when given, receives ``np.argmax(a, axis=1)``."""
    a, nonfinite = _chain_layers(matmul, bias_act, x, weights, biases, acts)
    if labels is not None:
        labels[...] = np.argmax(a, axis=1)
    return _put(out, a), nonfinite


def act_grad(grad_out, y, act, out=None, pre=None):
    """Backward Hadamard product ``grad_out * act'(s)``, the derivative taken from the activation's
    output y, and from the pre-activation ``pre`` (s) for the activations whose table row needs
    it (else ``pre`` is not read). grad_out, y, pre: (B,N) -> (B,N)."""
    d = _grad_spec(act, pre).derivative(y, pre)
    return _put(out, grad_out * d)


def bias_grad(grad_z, out=None):
    """Column sums of the upstream gradient: d loss / d bias. (B,N) -> (N,)."""
    return _put(out, grad_z.sum(axis=0))


def gather_rows(src, idx, out=None):
    """Minibatch gather ``src[idx]``. src: (N,...), idx: (B,) int -> (B,...)."""
    return _put(out, src[idx])


def gather_pixels(codes, idx, divisor, offset, dtype=np.float32, out=None):
    """Minibatch gather of 8-bit codes, decoded: ``codes[idx]`` as ``dtype``, divided by ``divisor``,
    plus ``offset`` (both rounded to ``dtype``; the arithmetic of
    ``gpumlp.data.scale_pixels``). codes: (N, F) uint8, idx: (B,) int -> (B, F) dtype (float32/64)."""
    _check_pixel_codes(codes)
    dt = np.dtype(dtype)
    x = np.divide(codes[idx], dt.type(divisor), dtype=dt, out=out)  # each code as dtype, then divided
    x += dt.type(offset)
    return x


def gather_shifted(src, idx, max_shift, seed, step=0, out=None):
    """Minibatch gather with random-translation augmentation. Row r is the square
    image src[idx[r]] shifted by (dy, dx) in [-s, s]^2 (s = max_shift), drawn from
    h = _hash32(seed, B, step)[r]: dy = (h & 0xFFFF) % (2s+1) - s,
    dx = (h >> 16) % (2s+1) - s; pixels shifted in from outside repeat the edge:
    out[r, i, j] = img[clip(i - dy), clip(j - dx)]. ``step``: int or 1-element
    int64 device array (fresh shifts each training step, in a CUDA graph too).
    src: (N, side*side) float, idx: (B,) int -> (B, side*side)."""
    side = _image_side(src.shape[1], max_shift)
    b, span = idx.shape[0], 2 * max_shift + 1
    h = _hash32(seed, b, step).astype(np.int64)
    dy, dx = (h & 0xFFFF) % span - max_shift, (h >> 16) % span - max_shift
    pix = np.arange(side)
    rows = np.clip(pix[None, :] - dy[:, None], 0, side - 1)[:, :, None]  # (B, side, 1)
    cols = np.clip(pix[None, :] - dx[:, None], 0, side - 1)[:, None, :]  # (B, 1, side)
    images = src[idx].reshape(b, side, side)
    return _put(out, images[np.arange(b)[:, None, None], rows, cols].reshape(b, side * side))


def gather_shifted_pixels(codes, idx, max_shift, seed, divisor, offset, dtype=np.float32, step=0, out=None):
    """``gather_shifted`` of the decoded minibatch ``gather_pixels(codes, idx, divisor, offset,
    dtype)``: the same shifts (drawn by row position, from seed, B and step), the same edge
    pixels. codes: (N, side*side) uint8, idx: (B,) int -> (B, side*side) dtype."""
    rows = gather_pixels(codes, idx, divisor, offset, dtype)
    return gather_shifted(rows, np.arange(idx.shape[0]), max_shift, seed, step, out)


def elastic_field(seed, n, side, alpha, sigma, step=0, out=None, work=None):
    """Random elastic displacement fields (Simard et al. 2003): noise u_i = 2 * uniform_i - 1
    (element i of hash_uniform(seed, n*2*side*side, step), laid out (n, 2, side, side)),
    smoothed along columns then rows by :func:`_gaussian_taps` (zero outside the image),
    times ``alpha``. Channel 0 displaces rows (y), channel 1 columns (x); in pixels.
    ``work``: scratch of out's shape (the GPU needs one). -> (n, 2, side, side) out's dtype
    (float32 when out is None), computed in float64."""
    taps = _gaussian_taps(sigma)
    radius = taps.size // 2
    noise = 2.0 * hash_uniform(seed, n * 2 * side * side, step).reshape(n, 2, side, side) - 1.0
    padded = np.pad(noise, ((0, 0), (0, 0), (0, 0), (radius, radius)))
    across = sum(t * padded[..., k : k + side] for k, t in enumerate(taps))  # along x
    padded = np.pad(across, ((0, 0), (0, 0), (radius, radius), (0, 0)))
    field = alpha * sum(t * padded[:, :, k : k + side, :] for k, t in enumerate(taps))  # along y
    dtype = out.dtype if out is not None else np.float32
    return _put(out, field.astype(dtype))


def _warp_params(seed, n, max_rotate, max_scale, max_shift, step=0):
    """Each row's random similarity transform for :func:`gather_warped`, from the words
    4r .. 4r+3 of hash_uniform(seed, 4n, step): angle (radians, |.| <= max_rotate degrees),
    scale (|scale - 1| <= max_scale), row and column shift (|.| <= max_shift pixels).
    -> (angle, scale, ty, tx), each (n,) float64."""
    u = 2.0 * hash_uniform(seed, 4 * n, step).reshape(n, 4) - 1.0
    angle, scale = u[:, 0] * np.deg2rad(max_rotate), 1.0 + u[:, 1] * max_scale
    return angle, scale, u[:, 2] * max_shift, u[:, 3] * max_shift


def gather_warped(src, idx, max_rotate, max_scale, max_shift, seed, step=0, field=None, out=None):
    """Minibatch gather with random rotation, scaling and (sub-pixel) translation about the image
    centre c = (side-1)/2, plus an optional elastic displacement ``field`` (n, 2, side, side), sampled
    bilinearly with edge pixels repeated. For output pixel (i, j) of row r, with
    (angle, scale, ty, tx) = _warp_params(...)[r], y = i - c - ty, x = j - c - tx:
    source row = (cos(angle) y + sin(angle) x) / scale + c + field[r, 0, i, j],
    source col = (-sin(angle) y + cos(angle) x) / scale + c + field[r, 1, i, j] (float64).
    src: (N, side*side) float, idx: (B,) int -> (B, side*side) src's dtype."""
    side = _image_side(src.shape[1], 0)
    b = idx.shape[0]
    if field is not None and field.shape != (b, 2, side, side):
        raise ValueError(f"gather_warped: field must have shape {(b, 2, side, side)}, got {field.shape}")
    params = _warp_params(seed, b, max_rotate, max_scale, max_shift, step)
    angle, scale, ty, tx = (a[:, None, None] for a in params)
    c = (side - 1) / 2.0
    i, j = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    y, x = i - c - ty, j - c - tx
    sy = (np.cos(angle) * y + np.sin(angle) * x) / scale + c
    sx = (-np.sin(angle) * y + np.cos(angle) * x) / scale + c
    if field is not None:
        sy, sx = sy + field[:, 0].astype(np.float64), sx + field[:, 1].astype(np.float64)
    y0, x0 = np.floor(sy), np.floor(sx)
    fy, fx = sy - y0, sx - x0
    rows = [np.clip(y0 + d, 0, side - 1).astype(np.int64) for d in (0, 1)]
    cols = [np.clip(x0 + d, 0, side - 1).astype(np.int64) for d in (0, 1)]
    img = src[idx].reshape(b, side, side).astype(np.float64)
    r = np.arange(b)[:, None, None]
    top = (1 - fx) * img[r, rows[0], cols[0]] + fx * img[r, rows[0], cols[1]]
    bottom = (1 - fx) * img[r, rows[1], cols[0]] + fx * img[r, rows[1], cols[1]]
    return _put(out, ((1 - fy) * top + fy * bottom).reshape(b, side * side).astype(src.dtype))


# -------------------------------------------------------------------- losses
def _one_hot(labels, k, dtype):
    t = np.zeros((labels.shape[0], k), dtype=dtype)
    t[np.arange(labels.shape[0]), labels] = 1
    return t


def softmax(logits, out=None):
    """Row-wise softmax, stabilised by subtracting the row max. (B,K) -> (B,K)."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return _put(out, e / e.sum(axis=1, keepdims=True))


def softmax_xent(logits, labels, grad=None, grad_scale=1.0, loss=None):
    """Softmax cross-entropy from integer labels, fused with its gradient.

    loss = sum_i [logsumexp(z_i) - z_i[y_i]];  grad = grad_scale * (softmax(z) - onehot(y)).
    logits: (B,K) float, labels: (B,) int -> (0-d loss, (B,K) grad)."""
    rows = np.arange(logits.shape[0])
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    loss = _accumulate(loss, (lse - logits[rows, labels]).sum(), logits.dtype)
    g = softmax(logits) - _one_hot(labels, logits.shape[1], logits.dtype)
    return loss, _put(grad, (g * grad_scale).astype(logits.dtype, copy=False))


def sigmoid_bce(logits, labels, grad=None, grad_scale=1.0, loss=None):
    """Logistic cost: sigmoid outputs against one-hot targets, summed over classes.

    loss = -sum_ik [t log p + (1-t) log(1-p)], p = sigmoid(z), guarded against log(0):
    each term is computed as softplus(-z) (t=1) or softplus(z) (t=0), never as log of
    a rounded p, and capped at -log(LOG_EPS); grad = grad_scale * (p - t).
    logits: (B,K) float, labels: (B,) int -> (0-d loss, (B,K) grad)."""
    t = _one_hot(labels, logits.shape[1], logits.dtype)
    z = logits.astype(np.float64)
    terms = np.minimum(np.logaddexp(0.0, np.where(t == 1, -z, z)), -np.log(LOG_EPS))
    p = np.exp(-np.logaddexp(0.0, -z))  # sigmoid without overflow
    loss = _accumulate(loss, terms.sum(), logits.dtype)
    return loss, _put(grad, ((p - t) * grad_scale).astype(logits.dtype, copy=False))


def mse(pred, labels, grad=None, grad_scale=1.0, loss=None):
    """Half squared error against one-hot targets.

    loss = 0.5 * sum_ik (pred - t)^2;  grad = grad_scale * (pred - t).
    pred: (B,K) float, labels: (B,) int -> (0-d loss, (B,K) grad)."""
    d = pred - _one_hot(labels, pred.shape[1], pred.dtype)
    loss = _accumulate(loss, 0.5 * (d * d).sum(), pred.dtype)
    return loss, _put(grad, (d * grad_scale).astype(pred.dtype, copy=False))


def correct_count(scores, labels, count=None):
    """Number of rows whose argmax equals the label (first max wins), added into the
    0-d int64 accumulator ``count`` if given. -> 0-d int64."""
    return _accumulate(count, (scores.argmax(axis=1) == labels).sum(), np.int64)


# ---------------------------------------------------------------- optimizers
def _effective_grad(w, g, l2, l1):
    return g + l2 * w + l1 * np.sign(w)


def sgd_step(w, g, lr, l2=0.0, l1=0.0):
    """Plain gradient descent: w -= lr * g_eff. In place."""
    w -= (lr * _effective_grad(w, g, l2, l1)).astype(w.dtype)


def sgd_matmul_step(w, a, b, lr, l2=0.0, trans_a=False, trans_b=False, work=None):
    """Plain SGD with L2 from a gradient that is a matrix product, in place:
    ``w -= lr * (op(a) @ op(b) + l2 * w)``, i.e. ``sgd_step(w, matmul(a, b), lr, l2)``.
    A BLAS backend folds it into one GEMM (alpha = -lr, beta = 1 - lr*l2) and never forms the
    product; backends that do form it write it into ``work`` (w's shape) when given. The
    training loop uses it for a dense layer's weights when nothing needs the whole gradient
    first (no clipping, no L1, plain SGD). a: (K,M) with trans_a (else (M,K)), b: (K,N), w: (M,N)."""
    sgd_step(w, matmul(a, b, out=work, trans_a=trans_a, trans_b=trans_b), lr, l2)


def momentum_step(w, g, v, lr, mu=0.9, nesterov=False, l2=0.0, l1=0.0):
    """Heavy-ball momentum (PyTorch convention): v = mu*v + g_eff;
    w -= lr * (g_eff + mu*v if nesterov else v). In place on w and v."""
    ge = _effective_grad(w, g, l2, l1)
    v[...] = mu * v + ge
    w -= (lr * (ge + mu * v if nesterov else v)).astype(w.dtype)


def adagrad_step(w, g, h, lr, eps=1e-8, l2=0.0, l1=0.0):
    """AdaGrad: h += g_eff^2; w -= lr * g_eff / (sqrt(h) + eps). In place."""
    ge = _effective_grad(w, g, l2, l1)
    h += ge * ge
    w -= (lr * ge / (np.sqrt(h) + eps)).astype(w.dtype)


def rmsprop_step(w, g, s, lr, rho=0.9, eps=1e-8, l2=0.0, l1=0.0):
    """RMSProp: s = rho*s + (1-rho)*g_eff^2; w -= lr * g_eff / (sqrt(s) + eps). In place."""
    ge = _effective_grad(w, g, l2, l1)
    s[...] = rho * s + (1 - rho) * ge * ge
    w -= (lr * ge / (np.sqrt(s) + eps)).astype(w.dtype)


def adam_step(w, g, m, v, lr, t, beta1=0.9, beta2=0.999, eps=1e-8, l2=0.0, l1=0.0):
    """Adam with bias correction at step t (1-based; an int or a 1-element int64
    device array). In place on w, m, v.

    m = b1*m + (1-b1)*g_eff; v = b2*v + (1-b2)*g_eff^2;
    w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)."""
    _adam_moments_step(w, _effective_grad(w, g, l2, l1), m, v, lr, t, beta1, beta2, eps)


def adamw_step(w, g, m, v, lr, t, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, l2=0.0, l1=0.0):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) at step t (1-based; an int or a
    1-element int64 device array). In place on w, m, v.

    g_eff is formed from the undecayed w; w *= 1 - lr*weight_decay; then Adam's step with g_eff."""
    ge = _effective_grad(w, g, l2, l1)
    w *= 1 - lr * weight_decay
    _adam_moments_step(w, ge, m, v, lr, t, beta1, beta2, eps)


def _adam_moments_step(w, ge, m, v, lr, t, beta1, beta2, eps):
    t = _step_value(t)
    m[...] = beta1 * m + (1 - beta1) * ge
    v[...] = beta2 * v + (1 - beta2) * ge * ge
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    w -= (lr * m_hat / (np.sqrt(v_hat) + eps)).astype(w.dtype)


def lion_step(w, g, m, lr, beta1=0.9, beta2=0.99, weight_decay=0.0, l2=0.0, l1=0.0):
    """Lion (Chen et al. 2023), in place on w and m:
    c = b1*m + (1-b1)*g_eff; w -= lr * (sign(c) + weight_decay*w); m = b2*m + (1-b2)*g_eff."""
    ge = _effective_grad(w, g, l2, l1)
    c = beta1 * m + (1 - beta1) * ge
    w -= (lr * (np.sign(c) + weight_decay * w)).astype(w.dtype)
    m[...] = beta2 * m + (1 - beta2) * ge


# ------------------------------------------------------ counter-based random words
def _philox4x32(counter, key):
    """Philox4x32-10 on 32-bit words held in uint64: counter (c0, c1, c2, c3), arrays or ints
    (broadcast), key (k0, k1) ints -> the 4 output words as uint64 arrays.

    Each round: (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0)),
    then the key advances by the Weyl increments. In place, which is 4x faster than fresh arrays."""
    m32, s32 = np.uint64(_M32), np.uint64(32)
    c0, c1, c2, c3 = (np.array(w, dtype=np.uint64) for w in np.broadcast_arrays(*counter))
    for c in (c0, c1, c2, c3):
        c &= m32  # in place: stays an array, also when 0-d
    k0, k1 = np.uint64(key[0] & _M32), np.uint64(key[1] & _M32)
    p0, p1 = np.empty_like(c0), np.empty_like(c0)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(_PHILOX_W[0])) & m32, (k1 + np.uint64(_PHILOX_W[1])) & m32
        np.multiply(c0, np.uint64(_PHILOX_M[0]), out=p0)  # exact 64-bit products of 32-bit words
        np.multiply(c2, np.uint64(_PHILOX_M[1]), out=p1)
        np.right_shift(p1, s32, out=c0)  # the old c0 is in p0 already
        c0 ^= c1
        c0 ^= k0
        np.bitwise_and(p1, m32, out=c1)
        np.right_shift(p0, s32, out=c2)
        c2 ^= c3
        c2 ^= k1
        np.bitwise_and(p0, m32, out=c3)
    return c0, c1, c2, c3


def _hash32(seed, n, step=0):
    """Counter-based random words: element i is word i % 4 of Philox4x32-10 with counter
    (i // 4, 0, step mod 2^32, step // 2^32) and key (seed mod 2^32, seed // 2^32 mod 2^32),
    seed taken mod 2^64. -> (n,) uint32."""
    step, seed = _step_value(step), int(seed) & (2**64 - 1)
    blocks = np.arange(-(-n // 4), dtype=np.uint64)
    words = _philox4x32((blocks, 0, step & _M32, step >> 32), (seed & _M32, seed >> 32))
    return np.stack(words, axis=1).reshape(-1)[:n].astype(np.uint32)


def hash_uniform(seed, n, step=0):
    """Counter-based uniform numbers in [0,1): element i is (_hash32(seed, n, step)[i] >> 8) / 2^24,
    Philox4x32-10 keyed by the seed with the step in the counter, so each training step draws
    a fresh stream from one layer seed. Every backend computes the identical stream, so dropout
    masks agree bit for bit across numpy, numba and CUDA. -> (n,) float64."""
    return (_hash32(seed, n, step) >> np.uint32(8)).astype(np.float64) * (1.0 / (1 << 24))


def permutation(seed, n, epoch=0, out=None):
    """A pseudo-random permutation of range(n), identical on every backend: the
    indices in the order of their random words ``_hash32(seed, n, epoch)``,
    equal words by index (a stable argsort; a GPU sorts 64-bit keys
    word << 32 | index instead). Made on the device, so shuffling uploads
    nothing. seed, epoch: int, n < 2^31 -> (n,) int32."""
    _check_permutation_size(n)
    return _put(out, np.argsort(_hash32(seed, n, epoch), kind="stable").astype(np.int32))


def dropout_forward(x, p, seed, out=None, mask=None, step=0):
    """Inverted dropout: element i kept when hash_uniform(seed, n, step)[i] >= p,
    kept values scaled by 1/(1-p). Returns (out, mask) with mask holding 0 or
    1/(1-p) in x's dtype. x: (B,N), p in [0,1), seed: int, step: int or
    1-element int64 device array -> ((B,N), (B,N))."""
    u = hash_uniform(seed, x.size, step).reshape(x.shape)
    mk = np.where(u >= p, 1.0 / (1.0 - p), 0.0).astype(x.dtype)
    mask = _put(mask, mk)
    return _put(out, x * mask), mask


def dropout_backward(grad_out, mask, out=None):
    """d loss / d x of dropout: grad_out * mask. (B,N) -> (B,N)."""
    return _put(out, grad_out * mask)


# ---------------------------------------------------------------- batch norm
def batchnorm_forward(
    x, gamma, beta, eps=1e-5, out=None, xhat=None, mean=None, var=None,
    running_mean=None, running_var=None, momentum=0.9,
):  # fmt: skip
    """Training-mode batch norm over the batch axis.

    Returns (out, xhat, mean, var): out = gamma*xhat + beta with
    xhat = (x - mean)/sqrt(var + eps), var the biased batch variance.
    Given ``running_mean``/``running_var`` (both or neither), they are updated
    in place: running = momentum * running + (1 - momentum) * batch statistic,
    with the unbiased variance var * B/(B-1) (as PyTorch).
    x: (B,N), gamma/beta/running_*: (N,) -> (B,N), (B,N), (N,), (N,)."""
    m = x.mean(axis=0)
    v = ((x - m) ** 2).mean(axis=0)
    xh = _put(xhat, ((x - m) / np.sqrt(v + eps)).astype(x.dtype, copy=False))
    mean, var = _put(mean, m.astype(x.dtype)), _put(var, v.astype(x.dtype))
    if _updates_running_stats(running_mean, running_var):
        b = x.shape[0]
        running_mean[...] = momentum * running_mean + (1 - momentum) * mean
        running_var[...] = momentum * running_var + (1 - momentum) * var * (b / max(b - 1, 1))
    return _put(out, gamma * xh + beta), xh, mean, var


def batchnorm_inference(x, gamma, beta, mean, var, eps=1e-5, out=None):
    """Inference-mode batch norm with running statistics. x: (B,N) -> (B,N)."""
    y = gamma * (x - mean) / np.sqrt(var + eps) + beta
    return _put(out, y.astype(x.dtype, copy=False))


def batchnorm_backward(grad_out, xhat, gamma, var, eps=1e-5, dx=None, dgamma=None, dbeta=None):
    """Backward of training-mode batch norm. Returns (dx, dgamma, dbeta).

    dx = gamma/sqrt(var+eps) * (dy - mean(dy) - xhat * mean(dy * xhat)).
    grad_out, xhat: (B,N), gamma, var: (N,) -> (B,N), (N,), (N,)."""
    db = grad_out.sum(axis=0)
    dg = (grad_out * xhat).sum(axis=0)
    b = grad_out.shape[0]
    g = gamma / np.sqrt(var + eps)
    d = g * (grad_out - db / b - xhat * (dg / b))
    return _put(dx, d.astype(grad_out.dtype, copy=False)), _put(dgamma, dg), _put(dbeta, db)


# ---------------------------------------------------------- gradient clipping
def sum_squares(x, out=None, accumulate=False):
    """Sum of x**2 over all elements as a 0-d array of x's dtype. Given ``out``
    (0-d, x's dtype) the result is written into it, or added to it with
    ``accumulate=True``, so one buffer collects the squared norm of several arrays."""
    return _store_sum(out, np.sum(np.square(x, dtype=np.float64)), accumulate, x.dtype)


def clip_scale(g, sumsq, max_norm):
    """Scale g in place by min(1, max_norm / (sqrt(sumsq) + 1e-12)): the clipping
    factor for a global L2 norm whose square is the 0-d array ``sumsq``."""
    g *= g.dtype.type(min(1.0, max_norm / (np.sqrt(float(sumsq)) + 1e-12)))


def clip_value(g, value):
    """Clip every element of g in place to [-value, value] (clipping by value, value > 0
    rounded to g's dtype); NaN stays NaN so a diverging run is still seen."""
    v = g.dtype.type(value)
    np.clip(g, -v, v, out=g)
