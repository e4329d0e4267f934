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
from gpumlp.data import split_train_valid
from gpumlp.kernels.reference import _image_side
from gpumlp.optim import Optimizer, Schedule, clip_grad_norm
from gpumlp.validate import check_features, check_labels

# Salts of the training seed, so the shuffle's and the shifts' Philox streams never
# coincide with dropout's (keyed by the model seed * 1000 + layer index).
_SHUFFLE_SALT = 0x53485546  # "SHUF"
_AUGMENT_SALT = 0x41554721  # "AUG!"


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or inf."""


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
        },
    }
    model.save(path, extra_arrays=arrays, extra_meta=meta)


def _load_checkpoint(path, model, opt_state: list) -> _State:
    arrays, meta = checkpoint.read(path)
    if "train" not in meta:
        raise checkpoint.CheckpointError(f"{path} holds a model but no training state; cannot resume")
    if meta["model"] != model.config():
        raise checkpoint.CheckpointError(
            f"{path} was written for model {meta['model']}, not {model.config()}; "
            "use the same model flags to resume, or a new --out directory"
        )
    model.load_state_arrays(arrays)
    for (name, w, *_), states in zip(model.param_groups(), opt_state):
        for j, a in enumerate(states):
            a[...] = model.be.asarray(arrays[f"opt/{name}/{j}"], dtype=w.dtype)
    tr = meta["train"]
    if "seed" not in tr:
        raise checkpoint.CheckpointError(
            f"{path} was written by a gpumlp before on-device shuffling and cannot be resumed exactly; "
            "start a new run (its weights still load for eval/predict)"
        )
    hist = History(**tr["history"])
    best_weights = {k[len("best/") :]: a for k, a in arrays.items() if k.startswith("best/")} or None
    best = (*tr.get("best", (-1.0, -1)), best_weights)
    return _State(epoch=tr["epoch"], step=tr["step"], seed=tr["seed"], history=hist, best=best)


def _split_validation(X, y, X_valid, y_valid, valid_split: int):
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
    schedule: str | Schedule = "constant",
    reduction: str = "mean",
    shuffle: bool = True,
    seed: int = 0,
    X_valid=None,
    y_valid=None,
    valid_split: int = 0,
    tol: float | None = None,
    patience: int | None = None,
    augment_shift: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_extra: tuple[dict, dict] = ({}, {}),
    cuda_graphs: bool = False,
    progress: bool = False,
    verbose: bool = False,
    callbacks: Sequence[Callable[[dict, object], bool | None]] = (),
) -> History:
    """Train ``model`` on host arrays X (n, n_features) and integer labels y (n,).

    Minibatch SGD family (``batch_size=1`` is stochastic, ``batch_size>=n`` full
    batch); ``reduction`` ``mean`` averages the gradient over a minibatch,
    ``sum`` adds it up (the classic seed recipe). Stops after ``epochs``, when
    the training loss changes by less than ``tol``, or after ``patience``
    epochs without a better validation accuracy (then the best weights are
    restored). ``shuffle`` reorders the samples every epoch (on the device, the
    same order on every backend for a given ``seed``). ``augment_shift`` shifts
    each gathered square image by up to that many pixels (edges repeated),
    drawn afresh every step. With ``checkpoint_path`` the state is saved atomically after
    each epoch, with ``checkpoint_extra`` = (host arrays, JSON meta) of the
    caller's (e.g. preprocessing); ``resume=True`` continues from it exactly.
    ``cuda_graphs`` (cupy/cuda-emu) replays each full-size step as one CUDA graph
    (any optimizer, dropout, batch norm and clipping included).
    ``callbacks`` get (epoch record, model) and may return True to stop."""
    be = model.be
    X = check_features(X, model.n_features)
    y = check_labels(y, X.shape[0], model.n_classes)
    X, y, X_valid, y_valid = _split_validation(X, y, X_valid, y_valid, valid_split)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if augment_shift:
        _image_side(X.shape[1], augment_shift)  # square images with room for the shift, or ValueError
    opt = (
        optimizer
        if isinstance(optimizer, Optimizer)
        else Optimizer(optimizer, lr=lr, momentum=momentum, l1=l1, l2=l2)
    )
    sched = schedule if isinstance(schedule, Schedule) else Schedule(schedule)
    opt_state = [opt.init_state(be, w) for _, w, _, _ in model.param_groups()]
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if resume and ckpt and ckpt.exists():
        st = _load_checkpoint(ckpt, model, opt_state)
    else:
        st = _State(epoch=0, step=0, seed=int(seed), history=History())
    if X_valid is not None:
        Xv = check_features(X_valid, model.n_features, "X_valid")
        valid_host = (Xv, check_labels(y_valid, Xv.shape[0], model.n_classes, "y_valid"))
    else:
        valid_host = None
    step = _Step(model, opt, opt_state, min(batch_size, X.shape[0]), X.shape[0], reduction, clip_norm)
    step.configure(shuffle, augment_shift, cuda_graphs)
    bar = tqdm(total=epochs, initial=st.epoch, disable=not progress, unit="epoch", file=sys.stderr)
    try:
        Xd, yd = be.asarray(X, dtype=model.dtype), be.asarray(y.astype(np.int32, copy=False))
        valid = valid_host and (be.asarray(valid_host[0], dtype=model.dtype), be.asarray(valid_host[1]))
        while st.epoch < epochs and not st.history.stop_reason:
            t0 = time.perf_counter()
            epoch_lr = sched.lr(opt.lr, st.epoch)
            train_loss, train_acc = step.epoch(Xd, yd, epoch_lr, st)
            if not math.isfinite(train_loss):
                raise TrainingDiverged(_diverged_message(train_loss, st.epoch + 1, epoch_lr, ckpt))
            rec = {"epoch": st.epoch + 1, "loss": train_loss, "train_acc": train_acc, "lr": epoch_lr}
            if valid:
                rec["valid_loss"], rec["valid_acc"] = evaluate(model, *valid)
            rec["seconds"] = time.perf_counter() - t0
            st.history.records.append(rec)
            st.epoch += 1
            st.history.stop_reason = _stop_reason(st, rec, model, tol, patience)
            if any(cb(rec, model) for cb in callbacks):
                st.history.stop_reason = "callback"
            if ckpt:
                _save_checkpoint(ckpt, model, opt, opt_state, st, checkpoint_extra)
            bar.update(1)
            bar.set_postfix({key: f"{v:.4f}" for key, v in rec.items() if key not in ("epoch", "lr")})
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
    backward, clipping and update in one launch."""

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
        self.configure(True, 0, False)

    def configure(self, shuffle: bool, shift: int, graphs: bool) -> None:
        """Shuffle every epoch or keep the data order; shift images by up to ``shift``
        pixels (0: no augmentation); replay full-size steps as CUDA graphs."""
        be, xp = self.model.be, self.model.be.xp
        if graphs and be.capture is None:
            raise ValueError(f"cuda_graphs needs a CUDA backend (cupy or cuda-emu), not {be.name!r}")
        self.shuffle, self.shift, self.use_graphs = shuffle, shift, graphs
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
        if self.shift:
            x = k.gather_shifted(Xd, idx, self.shift, seed ^ _AUGMENT_SALT, step=t, out=self.x_buf[b])
        else:
            x = k.gather_rows(Xd, idx, out=self.x_buf[b])
        scores = model.forward(x, train=True, step=t)
        scale = 1.0 / b if self.mean else 1.0
        _, grad = model.loss(be, scores, labels, grad=self.g_buf[b], grad_scale=scale, loss=self.loss_sum)
        k.correct_count(scores, labels, count=self.correct)
        fold = self.opt.gemm_fold(lr, bool(self.clip))  # plain SGD: the weights step in their GEMM
        model.backward(grad, sgd=fold)
        if self.clip:
            clip_grad_norm(be, [g for _, _, g, _ in self.params], self.clip, self.sumsq)
        for (_, w, g, decayed), state in zip(self.params, self.opt_state):
            if not (fold and decayed):
                self.opt.update(be, w, g, state, lr, t, decayed)

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
        with be.stream():
            if self.shuffle:
                be.k.permutation(st.seed ^ _SHUFFLE_SALT, n, st.epoch, out=self.order)
            order, labels = self.order, be.k.gather_rows(yd, self.order, out=self.y_order)
            t_d = xp.arange(st.step + 1, st.step + steps + 1, dtype=np.int64)
            if self.use_graphs:  # one row of indices | labels per full-size step
                full = n // B
                table = xp.concatenate([a[: full * B].reshape(full, B) for a in (order, labels)], axis=1)
            self.loss_sum[...] = 0
            self.correct[...] = 0
            for i, s in enumerate(range(0, n, B)):
                b = min(B, n - s)
                if self.use_graphs and b == B:
                    self._replay(Xd, table[i], t_d[i : i + 1], lr, st.seed)
                else:
                    self._run(Xd, order[s : s + b], labels[s : s + b], lr, t_d[i : i + 1], st.seed)
            st.step += steps
            be.synchronize()
        return float(be.to_host(self.loss_sum)) / n, int(be.to_host(self.correct)) / n


def _diverged_message(loss: float, epoch: int, lr: float, ckpt: Path | None) -> str:
    saved = f"the last good checkpoint is {ckpt}" if ckpt and ckpt.exists() else "no checkpoint was saved"
    return (
        f"training diverged: the loss became {loss} in epoch {epoch} (lr {lr:g}); {saved}. "
        "Lower the learning rate, add clip_norm, or check the data."
    )


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


def _stop_reason(st: _State, rec: dict, model, tol, patience) -> str:
    recs = st.history.records
    if tol is not None and len(recs) > 1 and abs(recs[-2]["loss"] - rec["loss"]) < tol:
        return f"converged: loss changed by less than tol={tol}"
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
