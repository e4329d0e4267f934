"""The one training loop, shared by every backend.

The data and labels are uploaded once. Per epoch, the backend shuffles on its
device (a Philox-keyed permutation, identical on every backend); each minibatch
is gathered on the device into a preallocated buffer, optionally shifted
(augmentation drawn from Philox too, keyed by the step);
forward, fused loss+gradient, backward, optional clipping, one fused optimizer
kernel per parameter. Loss and accuracy accumulate on the device and are read
once per epoch, so nothing synchronises inside an epoch. After each epoch:
NaN check, validation, history, callbacks, early stopping, atomic checkpoint.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gpumlp import checkpoint
from gpumlp.augment import Augment
from gpumlp.data import split_train_valid
from gpumlp.monitor import GradNorms, ParamChange
from gpumlp.optim import Optimizer, Schedule, clip_grad_norm
from gpumlp.validate import MAX_SEED, check_features, check_float, check_int, check_labels

# Salts of the training seed, so the shuffle's and the shifts' Philox streams never
# coincide with dropout's (keyed by the model seed * 1000 + layer index).
_SHUFFLE_SALT = 0x53485546  # "SHUF"
_AUGMENT_SALT = 0x41554721  # "AUG!"
_ELASTIC_SALT = 0x454C4153  # "ELAS"


# A training loss this many times the reference (the untrained model's loss, or the best epoch's,
# whichever is lower) counts as divergence, like NaN or inf.
DIVERGENCE_FACTOR = 1e3
_REFERENCE_ROWS = 2000  # rows the untrained model's loss (divergence's first reference) is measured on
_TINY_LOSS = 1e-3  # a loss near 0 would make any later wobble look like a 1000x growth


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or inf, or grew by more than the divergence factor.
    ``epoch`` (1-based), ``lr`` (that epoch's) and ``loss`` say where."""

    def __init__(self, message: str, epoch: int = 0, lr: float = 0.0, loss: float = math.nan):
        super().__init__(message)
        self.epoch, self.lr, self.loss = epoch, lr, loss


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


def evaluate(model, Xd, yd, batch_size: int = 2000) -> tuple[float, float]:
    """Mean loss and accuracy of device arrays Xd (n, F), yd (n,) int32, in eval mode."""
    be, n = model.be, Xd.shape[0]
    loss_sum = be.xp.zeros((), dtype=model.dtype)
    correct = be.xp.zeros((), dtype=np.int64)
    for s in range(0, n, batch_size):
        scores = model.forward(Xd[s : s + batch_size], train=False)
        model.loss(be, scores, yd[s : s + batch_size], loss=loss_sum)
        be.k.correct_count(scores, yd[s : s + batch_size], count=correct)
    return float(be.to_host(loss_sum)) / n, int(be.to_host(correct)) / n


@dataclass
class _State:
    """Everything besides the model that an exact resume needs."""

    epoch: int
    step: int
    seed: int  # the epoch's shuffle and the step's shifts are functions of (seed, epoch / step)
    history: History
    best: tuple[float, int, dict | None] = (-1.0, -1, None)  # (valid acc, epoch, host weights)
    initial_loss: float | None = None  # the untrained model's loss: divergence's first reference

    def reference_loss(self) -> float:
        """The lowest loss seen (untrained or any epoch), which divergence is measured against."""
        seen = [r["loss"] for r in self.history.records]
        if self.initial_loss is not None:
            seen.append(self.initial_loss)
        return min(seen, default=math.inf)


def _save_checkpoint(path, model, opt: Optimizer, opt_state: list, st: _State, extra: tuple) -> None:
    arrays = dict(extra[0])
    for (name, *_), states in zip(model.param_groups(), opt_state):
        arrays.update({f"opt/{name}/{j}": model.be.to_host(a) for j, a in enumerate(states)})
    if st.best[2] is not None:  # patience's best weights, so a resumed run can still restore them
        arrays.update({f"best/{key}": a for key, a in st.best[2].items()})
    meta = {
        **extra[1],
        "train": {
            "epoch": st.epoch,
            "step": st.step,
            "seed": st.seed,
            "history": st.history.to_dict(),
            "optimizer": opt.to_dict(),
            "best": list(st.best[:2]),
            "initial_loss": st.initial_loss,
            "n_train": extra[2] if len(extra) > 2 else None,
        },
    }
    model.save(path, extra_arrays=arrays, extra_meta=meta)


def check_resume(path, model_config: dict, optimizer: str, n_train: int | None) -> tuple[dict, dict]:
    """Read and verify checkpoint ``path`` for resuming a run of ``model_config`` with ``optimizer``
    on ``n_train`` samples -> (arrays, meta); any mismatch is a CheckpointError saying what differs.
    Nothing is loaded or written, so callers can check before touching a run directory."""
    arrays, meta = checkpoint.read(path)
    tr = meta.get("train")
    if not isinstance(tr, dict):
        raise checkpoint.CheckpointError(f"{path} holds a model but no training state; cannot resume")
    if meta.get("model") != model_config:
        raise checkpoint.CheckpointError(
            f"{path} was written for model {meta.get('model')}, not {model_config}; "
            "use the same model flags to resume, or a new --out directory"
        )
    if "seed" not in tr:
        raise checkpoint.CheckpointError(
            f"{path} was written by a gpumlp before on-device shuffling and cannot be resumed exactly; "
            "start a new run (its weights still load for eval/predict)"
        )
    saved_opt = checkpoint.expect(path, tr, "optimizer", dict, "train").get("name")
    if saved_opt != optimizer:
        raise checkpoint.CheckpointError(
            f"{path} was trained with optimizer {saved_opt!r}, not {optimizer!r}; resume with "
            f"--optimizer {saved_opt}, or start a new run in a new --out directory"
        )
    saved_n = tr.get("n_train")
    if saved_n is not None and n_train is not None and saved_n != n_train:
        raise checkpoint.CheckpointError(
            f"{path} was trained on {saved_n} samples, this run has {n_train}; resume with the same "
            "data, --limit and --valid, or start a new run in a new --out directory"
        )
    for key, kind in (("epoch", int), ("step", int), ("seed", int), ("history", dict), ("best", list)):
        checkpoint.expect(path, tr, key, kind, "train")
    return arrays, meta


def _load_checkpoint(path, model, opt, opt_state: list, n_train: int) -> _State:
    arrays, meta = check_resume(path, model.config(), opt.name, n_train)
    tr = meta["train"]
    opt_arrays = [
        (checkpoint.expect_array(path, arrays, f"opt/{name}/{j}", a.shape, "f"), a)
        for (name, *_), states in zip(model.param_groups(), opt_state)
        for j, a in enumerate(states)
    ]
    try:
        hist = History(**tr["history"])
        best_weights = {k[len("best/") :]: a for k, a in arrays.items() if k.startswith("best/")} or None
        best = (float(tr["best"][0]), int(tr["best"][1]), best_weights)
        st = _State(tr["epoch"], tr["step"], tr["seed"], hist, best, tr.get("initial_loss"))
        for rec in hist.records:
            float(rec["loss"])
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise checkpoint.CheckpointError(
            f"{path}: malformed training state ({type(e).__name__}: {e})"
        ) from None
    if best_weights is not None:
        model.verify_state_arrays(best_weights, source=f"{path} (best/)")
    for src, dst in model.verify_state_arrays(arrays, source=str(path)) + opt_arrays:
        dst[...] = model.be.asarray(src, dtype=dst.dtype)  # everything verified: now load it all
    return st


def _split_validation(X, y, X_valid, y_valid, valid_split: int):
    check_int("valid_split", valid_split, 0)
    if X_valid is not None or not valid_split:
        return X, y, X_valid, y_valid
    if not 0 < valid_split < X.shape[0]:
        raise ValueError(f"valid_split={valid_split} must be between 1 and n_samples-1 ({X.shape[0] - 1})")
    return split_train_valid(X, y, valid_split)  # the last rows validate, as in the classic 55k/5k split


def fit(
    model,
    X,
    y,
    *,
    epochs: int = 10,
    batch_size: int = 100,
    optimizer: str | Optimizer = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    l1: float = 0.0,
    l2: float = 0.0,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    schedule: str | Schedule = "constant",
    reduction: str = "mean",
    shuffle: bool = True,
    seed: int = 0,
    X_valid=None,
    y_valid=None,
    valid_split: int = 0,
    tol: float | None = None,
    stop_param_change: float | None = None,
    patience: int | None = None,
    augment_shift: int = 0,
    augment: Augment | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_extra: tuple[dict, dict] = ({}, {}),
    divergence_factor: float | None = DIVERGENCE_FACTOR,
    cuda_graphs: bool = False,
    log_grad_norms: bool = False,
    progress: bool = False,
    verbose: bool = False,
    callbacks: Sequence[Callable[[dict, object], bool | None]] = (),
) -> History:
    """Train ``model`` on host arrays X (n, n_features) and integer labels y (n,).

    Training stops with :class:`TrainingDiverged`, before anything is saved for that epoch, when
    the epoch's loss is NaN/inf or more than ``divergence_factor`` times the lowest loss seen
    (the untrained model's or an earlier epoch's; None turns the growth test off).

    Minibatch SGD family (``batch_size=1`` is stochastic, ``batch_size>=n`` full
    batch); ``reduction`` ``mean`` averages the gradient over a minibatch,
    ``sum`` adds it up (the classic seed recipe). ``clip_value`` clamps every
    gradient element to [-clip_value, clip_value], then ``clip_norm`` scales all
    gradients to at most that global L2 norm. Stops after ``epochs``, when
    the training loss changes by less than ``tol``, when every weight and bias changed
    by less than ``stop_param_change`` over an epoch, or after ``patience``
    epochs without a better validation accuracy (then the best weights are
    restored). ``shuffle`` reorders the samples every epoch (on the device, the
    same order on every backend for a given ``seed``). ``augment_shift`` shifts
    each gathered square image by up to that many pixels (edges repeated),
    drawn afresh every step; ``augment`` (an :class:`~gpumlp.augment.Augment`) adds
    rotation, scaling, sub-pixel shifts and elastic distortions, drawn the same way.
    With ``checkpoint_path`` the state is saved atomically after each epoch, with
    ``checkpoint_extra`` = (host arrays, JSON meta) of the caller's (e.g. preprocessing);
    ``resume=True`` continues from it exactly.
    ``cuda_graphs`` (cupy/cuda-emu) replays each full-size step as one CUDA graph
    (any optimizer, dropout, batch norm and clipping included).
    ``log_grad_norms`` records each layer's RMS gradient norm per epoch (``grad_norms``
    in the records), accumulated on the device and read once per epoch.
    ``callbacks`` get (epoch record, model) and may return True to stop."""
    be = model.be
    X = check_features(X, model.n_features, dtype=model.dtype)
    y = check_labels(y, X.shape[0], model.n_classes)
    X, y, X_valid, y_valid = _split_validation(X, y, X_valid, y_valid, valid_split)
    _check_fit_args(model, X.shape[0], epochs, batch_size, tol, patience, augment_shift, seed)
    if patience is not None and X_valid is None:
        raise ValueError("patience needs validation data: pass X_valid/y_valid or valid_split > 0")
    if divergence_factor is not None:
        check_float("divergence_factor", divergence_factor, 1.0, math.inf, low_open=True, high_open=True)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    positive = {"clip_norm": clip_norm, "clip_value": clip_value, "stop_param_change": stop_param_change}
    for name, value in positive.items():
        if value is not None:
            check_float(name, value, 0.0, math.inf, low_open=True, high_open=True)
    if augment is not None and augment_shift:
        raise ValueError("give the shift either as augment_shift or inside augment, not both")
    augment = augment or Augment(shift=augment_shift)
    augment.check_images(X.shape[1])  # square images with room for the shift, or ValueError
    opt = (
        optimizer
        if isinstance(optimizer, Optimizer)
        else Optimizer(optimizer, lr=lr, momentum=momentum, l1=l1, l2=l2)
    )
    sched = schedule if isinstance(schedule, Schedule) else Schedule(schedule)
    opt_state = [opt.init_state(be, w) for _, w, _, _ in model.param_groups()]
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if resume and ckpt and ckpt.exists():
        st = _load_checkpoint(ckpt, model, opt, opt_state, X.shape[0])
    else:
        st = _State(epoch=0, step=0, seed=int(seed), history=History())
    checkpoint_extra = (*checkpoint_extra[:2], X.shape[0])
    if X_valid is not None:
        Xv = check_features(X_valid, model.n_features, "X_valid", dtype=model.dtype)
        valid_host = (Xv, check_labels(y_valid, Xv.shape[0], model.n_classes, "y_valid"))
    else:
        valid_host = None
    step = _Step(model, opt, opt_state, min(batch_size, X.shape[0]), X.shape[0], reduction, clip_norm)
    step.configure(shuffle, augment, cuda_graphs)
    step.clip_value, step.grad_norms = clip_value, GradNorms(model) if log_grad_norms else None
    change = ParamChange(model) if stop_param_change else None
    bar = tqdm(total=epochs, initial=st.epoch, disable=not progress, unit="epoch", file=sys.stderr)
    try:
        Xd, yd = be.asarray(X, dtype=model.dtype), be.asarray(y.astype(np.int32, copy=False))
        valid = valid_host and (be.asarray(valid_host[0], dtype=model.dtype), be.asarray(valid_host[1]))
        if st.initial_loss is None and st.epoch == 0 and divergence_factor is not None:
            st.initial_loss = evaluate(model, Xd[:_REFERENCE_ROWS], yd[:_REFERENCE_ROWS])[0]
        while st.epoch < epochs and not st.history.stop_reason:
            t0 = time.perf_counter()
            epoch_lr = sched.lr(opt.lr, st.epoch)
            if change:
                change.mark()
            train_loss, train_acc = step.epoch(Xd, yd, epoch_lr, st)
            _check_divergence(train_loss, st, epoch_lr, divergence_factor, ckpt)
            rec = {"epoch": st.epoch + 1, "loss": train_loss, "train_acc": train_acc, "lr": epoch_lr}
            if change:
                rec["param_change"] = change.max_change()
            if step.grad_norms:
                rec["grad_norms"] = step.grad_norms.read(-(-step.n // step.B))
            if valid:
                rec["valid_loss"], rec["valid_acc"] = evaluate(model, *valid)
            rec["seconds"] = time.perf_counter() - t0
            st.history.records.append(rec)
            st.epoch += 1
            st.history.stop_reason = _stop_reason(st, rec, model, tol, patience, stop_param_change)
            if any(cb(rec, model) for cb in callbacks):
                st.history.stop_reason = "callback"
            if ckpt:
                _save_checkpoint(ckpt, model, opt, opt_state, st, checkpoint_extra)
            # postfix first: update() redraws, so the bar shows this epoch's numbers, not the last one's
            shown = {key: v for key, v in rec.items() if isinstance(v, float) and key != "lr"}
            bar.set_postfix({key: f"{v:.4f}" for key, v in shown.items()}, refresh=False)
            bar.update(1)
            if verbose:
                bar.write(format_record(rec, epochs), file=sys.stderr)
    except MemoryError as e:
        raise DeviceOutOfMemory(_oom_message(model, X.shape, batch_size, e)) from e
    finally:
        bar.close()
    if patience and st.best[2] is not None:
        model.load_state_arrays(st.best[2])
    st.history.stop_reason = st.history.stop_reason or "epochs"
    return st.history


class _Step:
    """One epoch of minibatch steps with buffers preallocated per batch shape
    (the full batch and the last partial one), so the step allocates nothing.

    Each epoch starts on the device: the permutation (or the identity without
    shuffling), the labels in that order, and the epoch's step numbers. The
    step number ``t`` (Adam's bias correction, dropout's masks, the shifts)
    reaches the kernels as a 1-element device array, a view into that table.
    With ``graphs`` (backends with CUDA graphs), the first full-size step for
    each learning rate runs eagerly and is then captured; every later one
    copies its indices|labels row and its step number into fixed device buffers
    (two device-to-device copies) and replays the graph: gather, forward, loss,
    backward, clipping and update in one launch. Every epoch runs on the step's
    one stream, which first waits for what the default stream uploaded."""

    def __init__(self, model, opt, opt_state: list, batch: int, n: int, reduction: str, clip):
        self.model, self.opt, self.opt_state, self.clip = model, opt, opt_state, clip
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
        self.clip_value, self.grad_norms = None, None  # set by fit: clipping by value, a GradNorms
        # One stream for every epoch: graph replays launch on the stream they were captured on, and
        # CuPy's memory pool keeps freed blocks per stream (a stream per epoch would strand them).
        self.stream = model.be.stream()
        self.configure(True, Augment(), False)

    def configure(self, shuffle: bool, augment: Augment, graphs: bool) -> None:
        """Shuffle every epoch or keep the data order; augment the gathered images;
        replay full-size steps as CUDA graphs."""
        be, xp = self.model.be, self.model.be.xp
        if graphs and be.capture is None:
            raise ValueError(f"cuda_graphs needs a CUDA backend (cupy or cuda-emu), not {be.name!r}")
        self.shuffle, self.augment, self.use_graphs = shuffle, augment, graphs
        if augment.elastic_alpha:  # the displacement fields and their blur scratch, per batch shape
            side = augment.check_images(self.model.n_features)
            shape, dt = (2, side, side), self.model.dtype
            self.fields = {b: tuple(xp.empty((b, *shape), dtype=dt) for _ in "fw") for b in self.x_buf}
        self.graph, self.graph_key = None, None
        if not shuffle:
            self.order[...] = xp.arange(self.n, dtype=np.int32)
        if graphs:
            self.batch_buf = xp.zeros(2 * self.B, dtype=np.int32)  # indices | labels of the replayed step
            self.t_buf = xp.zeros(1, dtype=np.int64)

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
        # plain SGD steps the weights inside their gradient GEMM, unless the gradient itself is needed
        needs_grad = bool(self.clip or self.clip_value or self.grad_norms)
        fold = self.opt.gemm_fold(lr, needs_grad)
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
                k.elastic_field(seed ^ _ELASTIC_SALT, idx.shape[0], side, *args, step=t, out=field, work=work)
            limits = (aug.rotate, aug.scale, aug.shift)
            return k.gather_warped(Xd, idx, *limits, seed ^ _AUGMENT_SALT, step=t, field=field, out=out)
        if aug.shift:
            return k.gather_shifted(Xd, idx, int(aug.shift), seed ^ _AUGMENT_SALT, step=t, out=out)
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
        # Run the step for real first: everything it needs is then compiled and allocated.
        self._run(Xd, idx, labels, lr, self.t_buf, seed)
        self.graph = self.model.be.capture(lambda: self._run(Xd, idx, labels, lr, self.t_buf, seed))
        self.graph_key = (Xd, lr, seed)

    def epoch(self, Xd, yd, lr: float, st: _State) -> tuple[float, float]:
        """Train one pass over the rows of device arrays Xd (n, F) and labels yd (n,) int32
        -> (mean loss, accuracy), read from the device once at the end."""
        be, xp, n, B = self.model.be, self.model.be.xp, self.n, self.B
        steps = -(-n // B)
        be.wait_for_uploads(self.stream)
        with self.stream:
            if self.shuffle:
                be.k.permutation(st.seed ^ _SHUFFLE_SALT, n, st.epoch, out=self.order)
            order, labels = self.order, be.k.gather_rows(yd, self.order, out=self.y_order)
            t_d = xp.arange(st.step + 1, st.step + steps + 1, dtype=np.int64)
            if self.use_graphs:  # one row of indices | labels per full-size step
                full = n // B
                table = xp.concatenate([a[: full * B].reshape(full, B) for a in (order, labels)], axis=1)
            self.loss_sum[...] = 0
            self.correct[...] = 0
            if self.grad_norms:
                self.grad_norms.reset()
            for i, s in enumerate(range(0, n, B)):
                b = min(B, n - s)
                if self.use_graphs and b == B:
                    self._replay(Xd, table[i], t_d[i : i + 1], lr, st.seed)
                else:
                    self._run(Xd, order[s : s + b], labels[s : s + b], lr, t_d[i : i + 1], st.seed)
            st.step += steps
            be.synchronize()
        return float(be.to_host(self.loss_sum)) / n, int(be.to_host(self.correct)) / n


def _check_fit_args(model, n: int, epochs, batch_size, tol, patience, augment_shift, seed) -> None:
    """ValueError, with the valid range, for any bad hyper-parameter of :func:`fit`."""
    check_int("epochs", epochs, 1)
    check_int("batch_size", batch_size, 1)
    check_int("augment_shift", augment_shift, 0)
    check_int("seed", seed, 0, MAX_SEED)
    if tol is not None:
        check_float("tol", tol, 0.0, math.inf, low_open=True, high_open=True)
    if patience is not None:
        check_int("patience", patience, 1)
    last = n % min(batch_size, n) or min(batch_size, n)
    if model.batchnorm and min(batch_size, n, last) < 2:
        raise ValueError(
            f"batch norm needs >= 2 samples in every training batch, but {n} samples in batches of "
            f"{batch_size} leave a batch of 1; change batch_size or the number of samples"
        )


def _check_divergence(loss: float, st: _State, lr: float, factor: float | None, ckpt: Path | None) -> None:
    """Raise TrainingDiverged when an epoch's loss is NaN/inf or ``factor`` x the reference loss."""
    ref = st.reference_loss()
    grew = factor is not None and math.isfinite(ref) and loss > factor * max(ref, _TINY_LOSS)
    if math.isfinite(loss) and not grew:
        return
    epoch = st.epoch + 1
    saved = f"the last good checkpoint is {ckpt}" if ckpt and ckpt.exists() else "no checkpoint was saved"
    why = (
        f"the loss became {loss}" if not grew else f"the loss grew to {loss:.4g}, over {factor:g}x {ref:.4g}"
    )
    raise TrainingDiverged(
        f"training diverged: {why} in epoch {epoch} (lr {lr:g}); nothing of that epoch was saved, "
        f"{saved}. Lower the learning rate, add clip_norm or clip_value, or check the data.",
        epoch=epoch, lr=lr, loss=loss,
    )  # fmt: skip


def _oom_message(model, shape: tuple, batch_size: int, err: BaseException) -> str:
    itemsize = model.dtype.itemsize
    data_mb = shape[0] * shape[1] * itemsize / 2**20
    params_mb = sum(w.size for _, w, _, _ in model.parameters()) * itemsize / 2**20
    advice = "lower the batch size, use a smaller model or fewer samples"
    if model.dtype.itemsize > 4:
        advice += ", or use float32"
    return (
        f"out of memory on backend {model.be.name}: the training set needs {data_mb:.1f} MiB "
        f"({shape[0]}x{shape[1]} {model.dtype.name}), the parameters {params_mb:.1f} MiB (x3-4 with "
        f"gradients and optimizer state), plus activations for batch size {batch_size}; {advice}. ({err})"
    )


class DeviceOutOfMemory(MemoryError):
    """The backend ran out of (device) memory; the message gives the sizes involved."""


def _stop_reason(st: _State, rec: dict, model, tol, patience, stop_param_change=None) -> str:
    recs = st.history.records
    if tol is not None and len(recs) > 1 and abs(recs[-2]["loss"] - rec["loss"]) < tol:
        return f"converged: loss changed by less than tol={tol}"
    if stop_param_change and rec["param_change"] < stop_param_change:
        return f"converged: no weight or bias changed by {stop_param_change} or more in the epoch"
    if patience and "valid_acc" in rec:
        if rec["valid_acc"] > st.best[0]:
            st.best = (rec["valid_acc"], rec["epoch"], model.state_arrays())
        elif rec["epoch"] - st.best[1] >= patience:
            return (
                f"early stop: no better validation accuracy for {patience} epochs (best epoch {st.best[1]})"
            )
    return ""


def format_record(rec: dict, epochs: int) -> str:
    """One human-readable line for an epoch record."""
    parts = [
        f"epoch {rec['epoch']:>{len(str(epochs))}}/{epochs}",
        f"loss {rec['loss']:.4f}",
        f"train {100 * rec['train_acc']:.2f}%",
    ]
    if "valid_acc" in rec:
        parts.append(f"valid {100 * rec['valid_acc']:.2f}%")
    parts.append(f"{rec['seconds']:.2f}s")
    return " | ".join(parts)
