"""The training step: one epoch of minibatch steps on the model's device, and its state.

:class:`TrainStep` is what :func:`gpumlp.train.fit` runs once per epoch, and what the
benchmarks and the GPU step profiler time. :class:`TrainState` is everything besides the
model and the optimizer state that an exact resume needs (epoch, step, seed, history).

One step, for a minibatch of B rows (B = ``batch``, or the last partial batch):

1. gather rows ``idx`` (B,) int32 of the device training set Xd (n, F) into a
   preallocated x (B, F), shifted / warped when augmenting (Philox keyed by the step); Xd may
   be :class:`~gpumlp.data.Pixels`, 8-bit codes decoded by the gather (plain or shifted);
2. forward x -> scores (B, C); the fused loss kernel adds the batch loss into a 0-d
   device accumulator and writes d loss / d scores (B, C), scaled by 1/B for ``mean``;
   the accuracy kernel adds the correct count into another;
3. backward through every layer (plain SGD steps its weights inside the gradient GEMM
   unless clipping or gradient norms need the gradient itself);
4. optional clipping by value, then by global L2 norm; one fused optimizer kernel per
   parameter group.

Nothing allocates and nothing synchronises inside an epoch: each epoch starts on the device
(the Philox permutation, or the identity without shuffling; the labels in that order; the
epoch's step numbers, which reach the kernels as 1-element int64 device arrays) and the loss
and accuracy are read once at its end. Every epoch runs on the step's one stream
(``Backend.stream()``), which first waits for what the default stream uploaded. With CUDA
graphs (cupy / cuda-emu) the first full-size step for each learning rate runs eagerly and is
then captured; every later one copies its indices|labels row and step number into fixed device
buffers and replays the graph: gather, forward, loss, backward, clipping and update in one launch.
numba does the same by default with its step graphs (``gpumlp.kernels.numba_graph``: the step's
kernel calls as compiled functions); a step with a kernel they cannot replay runs kernel by kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gpumlp.augment import Augment
from gpumlp.data import Pixels
from gpumlp.kernels.common import StepNotCapturable
from gpumlp.optim import Optimizer, clip_grad_norm

# Salts of the training seed, so the shuffle's and the shifts' Philox streams never
# coincide with dropout's (keyed by the model seed * 1000 + layer index).
SHUFFLE_SALT = 0x53485546  # "SHUF"
AUGMENT_SALT = 0x41554721  # "AUG!"
ELASTIC_SALT = 0x454C4153  # "ELAS"


@dataclass
class History:
    """Per-epoch records (dicts with epoch, loss, train_acc, valid_loss, valid_acc,
    lr, seconds) and why training stopped."""

    records: list[dict] = field(default_factory=list)
    stop_reason: str = ""

    def __getitem__(self, key: str) -> list:
        return [r[key] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"records": self.records, "stop_reason": self.stop_reason}


@dataclass
class TrainState:
    """Everything besides the model and the optimizer state that an exact resume needs."""

    epoch: int  # epochs done; the next epoch's shuffle is keyed by it
    step: int  # steps done; the next step is number step + 1 (Adam, dropout, augmentation)
    seed: int  # the epoch's shuffle and the step's shifts are functions of (seed, epoch / step)
    history: History = field(default_factory=History)
    best: tuple[float, int, dict | None] = (-1.0, -1, None)  # (valid acc, epoch, host weights)
    initial_loss: float | None = None  # the untrained model's loss: divergence's first reference

    def reference_loss(self) -> float:
        """The lowest loss seen (untrained or any epoch), which divergence is measured against."""
        seen = [r["loss"] for r in self.history.records]
        if self.initial_loss is not None:
            seen.append(self.initial_loss)
        return min(seen, default=math.inf)


class TrainStep:
    """Epochs of minibatch steps over ``n`` rows in batches of ``batch``, with buffers
    preallocated per batch shape (the full batch and the last partial one).

    ``opt_state``: one list of state arrays per ``model.param_groups()`` entry, as
    ``opt.init_state`` makes them. ``reduction``: ``mean`` or ``sum`` of the minibatch
    gradient. ``clip_norm`` / ``clip_value``: gradient clipping (None: off). ``grad_norms``:
    a :class:`~gpumlp.monitor.GradNorms` to accumulate into (None: off)."""

    def __init__(
        self,
        model,
        opt: Optimizer,
        opt_state: list,
        batch: int,
        n: int,
        reduction: str = "mean",
        clip_norm: float | None = None,
        *,
        clip_value: float | None = None,
        grad_norms=None,
    ):
        self.model, self.opt, self.opt_state, self.clip = model, opt, opt_state, clip_norm
        self.B, self.n = batch, n
        self.params = model.param_groups()
        self.mean = reduction == "mean"
        xp, dt = model.be.xp, model.dtype
        sizes = {batch, n % batch or batch}
        self.x_buf = {b: xp.empty((b, model.n_features), dtype=dt) for b in sizes}
        self.g_buf = {b: xp.empty((b, model.n_classes), dtype=dt) for b in sizes}
        self.order, self.y_order = xp.empty(n, dtype=np.int32), xp.empty(n, dtype=np.int32)
        # Device accumulators the loss and count kernels add into: no extra op, no allocation per step.
        self.loss_sum, self.correct = xp.zeros((), dtype=dt), xp.zeros((), dtype=np.int64)
        self.sumsq = xp.zeros((), dtype=dt)  # clipping's squared gradient norm
        self.clip_value, self.grad_norms = clip_value, grad_norms
        # One stream for every epoch: graph replays launch on the stream they were captured on, and
        # CuPy's memory pool keeps freed blocks per stream (a stream per epoch would strand them).
        self.stream = model.be.stream()
        self.configure(True, Augment(), False)

    @property
    def steps_per_epoch(self) -> int:
        """Minibatch steps in one epoch (the last one may be partial)."""
        return -(-self.n // self.B)

    def configure(self, shuffle: bool, augment: Augment, graphs: bool) -> None:
        """Shuffle every epoch or keep the data order; augment the gathered images;
        replay full-size steps as CUDA graphs."""
        be, xp = self.model.be, self.model.be.xp
        if graphs and be.capture is None:
            raise ValueError(f"cuda_graphs needs a CUDA backend (cupy or cuda-emu), not {be.name!r}")
        self.shuffle, self.augment, self.use_graphs = shuffle, augment, graphs or be.replays_steps
        if augment.elastic_alpha:  # the displacement fields and their blur scratch, per batch shape
            side = augment.check_images(self.model.n_features)
            shape, dt = (2, side, side), self.model.dtype
            self.fields = {b: tuple(xp.empty((b, *shape), dtype=dt) for _ in "fw") for b in self.x_buf}
        self.graph, self.graph_key = None, None
        if not shuffle:
            self.order[...] = xp.arange(self.n, dtype=np.int32)
        if self.use_graphs:
            self.batch_buf = xp.zeros(2 * self.B, dtype=np.int32)  # indices | labels of the replayed step
            self.t_buf = xp.zeros(1, dtype=np.int64)

    def epoch(self, Xd, yd, lr: float, state: TrainState) -> tuple[float, float]:
        """Train one pass over the rows of device arrays Xd (n, F) and labels yd (n,) int32
        at learning rate ``lr`` -> (mean loss, accuracy), read from the device once at the end.
        The shuffle is keyed by ``state.seed`` and ``state.epoch``; ``state.step`` advances by
        :attr:`steps_per_epoch` (``state.epoch`` is the caller's to advance)."""
        be, xp, n, B = self.model.be, self.model.be.xp, self.n, self.B
        steps = self.steps_per_epoch
        be.wait_for_uploads(self.stream)
        with self.stream:
            if self.shuffle:
                be.k.permutation(state.seed ^ SHUFFLE_SALT, n, state.epoch, out=self.order)
            order, labels = self.order, be.k.gather_rows(yd, self.order, out=self.y_order)
            t_d = xp.arange(state.step + 1, state.step + steps + 1, dtype=np.int64)
            if self.use_graphs:  # one row of indices | labels per full-size step
                full = n // B
                table = xp.concatenate([a[: full * B].reshape(full, B) for a in (order, labels)], axis=1)
            self.loss_sum[...] = 0
            self.correct[...] = 0
            if self.grad_norms:
                self.grad_norms.reset()
            with be.steps():
                for i, s in enumerate(range(0, n, B)):
                    b = min(B, n - s)
                    if self.use_graphs and b == B:
                        self._replay(Xd, table[i], t_d[i : i + 1], lr, state.seed)
                    else:
                        self._run(Xd, order[s : s + b], labels[s : s + b], lr, t_d[i : i + 1], state.seed)
            state.step += steps
            be.synchronize()
        return float(be.to_host(self.loss_sum)) / n, int(be.to_host(self.correct)) / n

    def _run(self, Xd, idx, labels, lr: float, t, seed: int) -> None:
        """One minibatch step: gather rows ``idx`` of Xd (shifted with augmentation), forward,
        loss, backward, clipping, update. ``t``: the 1-based step as a 1-element int64 device array."""
        model, be = self.model, self.model.be
        b, k = idx.shape[0], be.k
        x = self._gather(Xd, idx, t, seed)
        scores = model.forward(x, train=True, step=t)
        scale = 1.0 / b if self.mean else 1.0
        _, grad = model.loss(be, scores, labels, grad=self.g_buf[b], grad_scale=scale, loss=self.loss_sum)
        k.correct_count(scores, labels, count=self.correct)
        # plain SGD steps the weights inside their gradient GEMM where the backend's BLAS can (else
        # the flat-buffer update is fewer launches), unless the gradient itself is needed
        needs_grad = bool(self.clip or self.clip_value or self.grad_norms)
        fold = self.opt.gemm_fold(lr, needs_grad) if be.k.SGD_IN_GEMM else None
        model.backward(grad, sgd=fold)
        if self.grad_norms:
            self.grad_norms.accumulate()
        if self.clip_value:
            for _, _, g, _ in self.params:
                k.clip_value(g, self.clip_value)
        if self.clip:
            clip_grad_norm(be, [g for _, _, g, _ in self.params], self.clip, self.sumsq)
        for (_, w, g, decayed), state in zip(self.params, self.opt_state):
            if not (fold and decayed):
                self.opt.update(be, w, g, state, lr, t, decayed)

    def _gather(self, Xd, idx, t, seed: int):
        """The minibatch rows ``idx`` of Xd into the batch buffer, augmented as configured."""
        k, aug, out = self.model.be.k, self.augment, self.x_buf[idx.shape[0]]
        if aug.warps:
            field = None
            if aug.elastic_alpha:
                field, work = self.fields[idx.shape[0]]
                side, args = field.shape[-1], (aug.elastic_alpha, aug.elastic_sigma)
                k.elastic_field(seed ^ ELASTIC_SALT, idx.shape[0], side, *args, step=t, out=field, work=work)
            limits = (aug.rotate, aug.scale, aug.shift)
            return k.gather_warped(Xd, idx, *limits, seed ^ AUGMENT_SALT, step=t, field=field, out=out)
        if isinstance(Xd, Pixels) and aug.shift:
            args = (int(aug.shift), seed ^ AUGMENT_SALT, Xd.divisor, Xd.offset, out.dtype)
            return k.gather_shifted_pixels(Xd.codes, idx, *args, step=t, out=out)
        if aug.shift:
            return k.gather_shifted(Xd, idx, int(aug.shift), seed ^ AUGMENT_SALT, step=t, out=out)
        if isinstance(Xd, Pixels):
            return k.gather_pixels(Xd.codes, idx, Xd.divisor, Xd.offset, out.dtype, out=out)
        return k.gather_rows(Xd, idx, out=out)

    def _replay(self, Xd, batch, t, lr: float, seed: int) -> None:
        """The same step through a CUDA graph. ``batch``: the step's indices|labels
        (2B,) int32 and ``t`` its step number, both device arrays."""
        self.batch_buf[...] = batch
        self.t_buf[...] = t
        idx, labels = self.batch_buf[: self.B], self.batch_buf[self.B :]
        made_for = self.graph_key  # (data, lr, seed) baked into the graph; holding Xd keeps its memory alive
        if made_for is not None and made_for[0] is Xd and made_for[1:] == (lr, seed):
            self.graph()
            return
        be = self.model.be
        if not be.capture_first:  # then everything the step needs is compiled and allocated
            self._run(Xd, idx, labels, lr, self.t_buf, seed)
        try:
            self.graph = be.capture(lambda: self._run(Xd, idx, labels, lr, self.t_buf, seed))
        except StepNotCapturable:  # a kernel a numba step graph cannot replay: kernel by kernel from now on
            self.use_graphs = False
            if be.capture_first:  # the capture ran nothing
                self._run(Xd, idx, labels, lr, self.t_buf, seed)
            return
        self.graph_key = (Xd, lr, seed)
        if be.capture_first:
            self.graph()
