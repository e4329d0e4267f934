"""The one training loop, shared by every backend: :func:`fit`.

``fit`` checks its options (a frozen :class:`FitConfig`, one field per keyword) and runs in three
parts. Prepare: check the data, build the optimizer and its state, start or resume the training
state from the checkpoint, and the step with its preallocated buffers. Loop: upload the data once,
then per epoch run :meth:`gpumlp.step.TrainStep.epoch` (shuffle, gather, forward, fused
loss+gradient, backward, clipping and one fused optimizer kernel per parameter, all on the device,
read once per epoch), then the NaN/divergence check, validation, history, callbacks, early
stopping and the atomic checkpoint. Finish: restore patience's best weights, name the stop reason.

A run continues exactly from a checkpoint (``resume``) or, in memory, from where an earlier ``fit``
left off (``carry``, a :class:`Carry`; the estimator's ``partial_fit`` calls are epochs of one run).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gpumlp import checkpoint
from gpumlp.augment import Augment
from gpumlp.data import Pixels, split_train_valid
from gpumlp.monitor import GradNorms, ParamChange
from gpumlp.optim import RULES, Optimizer, Schedule
from gpumlp.step import History, TrainState, TrainStep
from gpumlp.validate import MAX_SEED, check_features, check_float, check_int, check_labels

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


def _training_state(run: _Run) -> tuple[dict, dict]:
    """What a checkpoint holds besides the weights and the caller's extras -> (host arrays: the
    optimizer state ``opt/<group>/<j>`` and patience's best weights ``best/<key>``, JSON-able
    training state: its ``train`` meta)."""
    model, st = run.model, run.state
    arrays = {}
    for (name, *_), states in zip(model.param_groups(), run.opt_state):
        arrays.update({f"opt/{name}/{j}": model.be.to_host(a) for j, a in enumerate(states)})
    if st.best[2] is not None:  # patience's best weights, so a resumed run can still restore them
        arrays.update({f"best/{key}": a for key, a in st.best[2].items()})
    train = {
        "epoch": st.epoch,
        "step": st.step,
        "seed": st.seed,
        "history": st.history.to_dict(),
        "optimizer": run.opt.to_dict(),
        "best": list(st.best[:2]),
        "initial_loss": st.initial_loss,
        "n_train": run.data[0].shape[0],
    }
    return arrays, train


def _save_checkpoint(path, run: _Run) -> None:
    """The model, the optimizer state, the training state and the caller's ``checkpoint_extra``
    (host arrays, JSON meta), atomically to ``path``."""
    arrays, train = _training_state(run)
    extra_arrays, extra_meta = run.cfg.checkpoint_extra
    run.model.save(path, extra_arrays={**extra_arrays, **arrays}, extra_meta={**extra_meta, "train": train})


@dataclass
class Carry:
    """Where one :func:`fit` left off, for the next to continue as the following epochs of the same
    run (``fit(..., carry=carry)`` reads it and leaves its own end in it). Empty: nothing to continue.

    A checkpoint's training part, in memory: ``arrays`` are host arrays of the optimizer state
    (``opt/<group>/<j>``) and of patience's best weights (``best/<key>``), ``meta`` is
    ``{"model": config, "train": ...}`` (epoch, step, seed, optimizer, best, ...). Its history keeps
    only the last epoch's record (what ``tol`` compares with), and ``initial_loss`` is the lowest loss
    so far (the divergence reference), so it does not grow with the epochs. Plain host data: it pickles."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.meta)

    @property
    def optimizer(self) -> str | None:
        """The name of the optimizer whose state it holds (None when empty)."""
        return self.meta["train"]["optimizer"]["name"] if self.meta else None


def _hand_over(run: _Run, carry: Carry) -> None:
    """Leave where ``run`` ended (after :func:`_finish`) in ``carry``."""
    arrays, train = _training_state(run)
    st = run.state
    train["history"] = {"records": st.history.records[-1:], "stop_reason": ""}
    train["initial_loss"] = st.reference_loss()  # min(it, the last record): the run's lowest loss
    carry.arrays, carry.meta = arrays, {"model": run.model.config(), "train": train}


def check_resume(path, model, optimizer: str, n_train: int | None) -> tuple[dict, dict]:
    """Read and verify checkpoint ``path`` for resuming a run of ``model`` (an MLP) with ``optimizer``
    (a name of OPTIMIZERS) on ``n_train`` samples -> (arrays, meta), which ``fit(resume=...)``
    takes so the file is read once; any mismatch is a CheckpointError saying what differs.
    Nothing is loaded or written, so callers can check before touching a run directory."""
    arrays, meta = checkpoint.read(path)
    _check_training_state(path, arrays, meta, model, optimizer, n_train)
    return arrays, meta


def _check_training_state(path, arrays: dict, meta: dict, model, optimizer: str, n_train: int | None) -> None:
    """CheckpointError (naming ``path``, the file or "the carried state") unless (arrays, meta) hold
    a training state of ``model`` with ``optimizer`` on ``n_train`` samples (None: any number)."""
    model_config = model.config()
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
    state = RULES[optimizer].state
    for name, *_ in model.param_groups():  # exactly the optimizer's state arrays (RULES[...].state)
        saved = sorted(k for k in arrays if k.startswith(f"opt/{name}/"))
        if len(saved) != len(state):
            raise checkpoint.CheckpointError(
                f"{path} holds {len(saved)} optimizer arrays for {name!r} ({', '.join(saved) or 'none'}); "
                f"{optimizer} keeps {len(state)} ({', '.join(state) or 'none'})"
            )


def _load_checkpoint(path, model, opt, opt_state: list, n_train: int, checked=None) -> TrainState:
    """Load the checkpoint into the model and the optimizer state; ``checked`` is what
    check_resume already returned for it (else it is read and checked here)."""
    arrays, meta = checked if checked is not None else check_resume(path, model, opt.name, n_train)
    st, opt_arrays = _read_training_state(path, arrays, meta, model, opt_state)
    for src, dst in model.verify_state_arrays(arrays, source=str(path)) + opt_arrays:
        dst[...] = model.be.asarray(src, dtype=dst.dtype)  # everything verified: now load it all
    return st


def _continue(carry: Carry, model, opt, opt_state: list) -> TrainState:
    """Load the carried optimizer state into ``opt_state`` -> the training state to go on from
    (a history of its own, with no stop reason: a new call trains on)."""
    if carry.optimizer != opt.name:
        raise ValueError(
            f"the carry holds the state of optimizer {carry.optimizer!r}, not {opt.name!r}; "
            "pass a new Carry() to start that one afresh"
        )
    source = "the carried state"
    _check_training_state(source, carry.arrays, carry.meta, model, opt.name, None)
    st, opt_arrays = _read_training_state(source, carry.arrays, carry.meta, model, opt_state)
    for src, dst in opt_arrays:
        dst[...] = model.be.asarray(src, dtype=dst.dtype)
    st.history = History(list(st.history.records))
    return st


def _read_training_state(path, arrays: dict, meta: dict, model, opt_state: list) -> tuple[TrainState, list]:
    """The checked (arrays, meta)'s training state, verified -> (TrainState, [(host optimizer array,
    its ``opt_state`` array)] to load)."""
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
        st = TrainState(tr["epoch"], tr["step"], tr["seed"], hist, best, tr.get("initial_loss"))
        for rec in hist.records:
            float(rec["loss"])
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise checkpoint.CheckpointError(
            f"{path}: malformed training state ({type(e).__name__}: {e})"
        ) from None
    if best_weights is not None:
        model.verify_state_arrays(best_weights, source=f"{path} (best/)")
    return st, opt_arrays


def _split_validation(X, y, X_valid, y_valid, valid_split: int):
    check_int("valid_split", valid_split, 0)
    if X_valid is not None or not valid_split:
        return X, y, X_valid, y_valid
    if not 0 < valid_split < X.shape[0]:
        raise ValueError(f"valid_split={valid_split} must be between 1 and n_samples-1 ({X.shape[0] - 1})")
    return split_train_valid(X, y, valid_split)  # the last rows validate, as in the classic 55k/5k split


@dataclass(frozen=True)
class FitConfig:
    """The options of :func:`fit`: every keyword besides the validation data X_valid / y_valid.

    Training stops with :class:`TrainingDiverged`, before anything is saved for that epoch, when
    the epoch's loss is NaN/inf or more than ``divergence_factor`` times the lowest loss seen
    (the untrained model's or an earlier epoch's; None turns the growth test off).

    Minibatch SGD family (``batch_size=1`` is stochastic, ``batch_size>=n`` full
    batch); ``optimizer`` is a name of ``gpumlp.optim.OPTIMIZERS`` (or an Optimizer) with ``lr``,
    ``momentum``, ``l1``, ``l2``, and for the optimizers that take them ``weight_decay`` (decoupled),
    ``rho`` (RMSProp's decay), ``beta1``/``beta2`` (the moments' decays: Adam, AdamW, Lion) and
    ``eps`` (None: the optimizer's default, see :class:`gpumlp.optim.Optimizer`); ``reduction``
    ``mean`` averages the gradient over a minibatch, ``sum`` adds it up (the classic seed recipe).
    ``clip_value`` clamps every
    gradient element to [-clip_value, clip_value], then ``clip_norm`` scales all
    gradients to at most that global L2 norm. Stops after ``epochs``, when
    the training loss changes by less than ``tol``, when every weight and bias changed
    by less than ``stop_param_change`` over an epoch, or after ``patience``
    epochs without a better validation accuracy (then the best weights are
    restored). ``valid_split`` holds out that many last rows for validation when no
    X_valid is given. ``shuffle`` reorders the samples every epoch (on the device, the
    same order on every backend for a given ``seed``). ``augment_shift`` shifts
    each gathered square image by up to that many pixels (edges repeated),
    drawn afresh every step; ``augment`` (an :class:`~gpumlp.augment.Augment`) adds
    rotation, scaling, sub-pixel shifts and elastic distortions, drawn the same way.
    With ``checkpoint_path`` the state is saved atomically after each epoch, with
    ``checkpoint_extra`` = (host arrays, JSON meta) of the caller's (e.g. preprocessing);
    ``resume=True`` continues from it exactly (or pass the (arrays, meta) :func:`check_resume`
    returned for it, so the file is read once). ``carry`` (a :class:`Carry`) continues in memory
    from where the fit that last used it left off, when it holds that (the same model and optimizer
    name; other hyper-parameters may change), and is left holding this fit's end: optimizer state,
    step count (Adam's bias correction, dropout, augmentation), epoch (the shuffle's and the
    schedule's position), seed (``seed`` is then ignored), patience's best. Then ``epochs`` counts the
    epochs of this call, and the history returned holds this call's records only.
    ``cuda_graphs`` (cupy/cuda-emu) replays each full-size step as one CUDA graph
    (any optimizer, dropout, batch norm and clipping included). numba replays its full-size
    steps as step graphs without being asked (compiled once per model structure, bit for bit the
    kernel-by-kernel step; ``GPUMLP_STEP_GRAPHS=0`` turns them off).
    ``log_grad_norms`` records each layer's RMS gradient norm per epoch (``grad_norms``
    in the records), accumulated on the device and read once per epoch.
    ``progress`` shows a progress bar, ``verbose`` one line per epoch (both on stderr).
    ``callbacks`` get (epoch record, model) and may return True to stop."""

    epochs: int = 10
    batch_size: int = 100
    optimizer: str | Optimizer = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    l1: float = 0.0
    l2: float = 0.0
    weight_decay: float | None = None
    rho: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    clip_norm: float | None = None
    clip_value: float | None = None
    schedule: str | Schedule = "constant"
    reduction: str = "mean"
    shuffle: bool = True
    seed: int = 0
    valid_split: int = 0
    tol: float | None = None
    stop_param_change: float | None = None
    patience: int | None = None
    augment_shift: int = 0
    augment: Augment | None = None
    checkpoint_path: str | os.PathLike | None = None
    resume: bool | tuple[dict, dict] = False
    checkpoint_extra: tuple[dict, dict] = ({}, {})
    divergence_factor: float | None = DIVERGENCE_FACTOR
    cuda_graphs: bool = False
    log_grad_norms: bool = False
    progress: bool = False
    verbose: bool = False
    callbacks: Sequence[Callable[[dict, object], bool | None]] = ()
    carry: Carry | None = None

    @classmethod
    def of(cls, options: dict) -> FitConfig:
        """The config of the fields' values in ``options`` (a mapping with at least every field)."""
        return cls(**{f.name: options[f.name] for f in fields(cls)})

    def check(self, model, n: int, has_valid: bool) -> None:
        """ValueError, with the valid range, for any bad option, given ``n`` training rows."""
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("augment_shift", self.augment_shift, 0)
        check_int("seed", self.seed, 0, MAX_SEED)
        if self.tol is not None:
            check_float("tol", self.tol, 0.0, math.inf, low_open=True, high_open=True)
        if self.patience is not None:
            check_int("patience", self.patience, 1)
        last = n % min(self.batch_size, n) or min(self.batch_size, n)
        if model.batchnorm and min(self.batch_size, n, last) < 2:
            raise ValueError(
                f"batch norm needs >= 2 samples in every training batch, but {n} samples in batches of "
                f"{self.batch_size} leave a batch of 1; change batch_size or the number of samples"
            )
        if self.patience is not None and not has_valid:
            raise ValueError("patience needs validation data: pass X_valid/y_valid or valid_split > 0")
        if self.divergence_factor is not None:
            check_float(
                "divergence_factor", self.divergence_factor, 1.0, math.inf, low_open=True, high_open=True
            )
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        positive = {"clip_norm": self.clip_norm, "clip_value": self.clip_value}
        for name, value in {**positive, "stop_param_change": self.stop_param_change}.items():
            if value is not None:
                check_float(name, value, 0.0, math.inf, low_open=True, high_open=True)
        if self.augment is not None and self.augment_shift:
            raise ValueError("give the shift either as augment_shift or inside augment, not both")
        if self.carry and self.resume:
            raise ValueError("continue either from a checkpoint (resume) or from a carry, not both")

    def augmentation(self, n_features: int) -> Augment:
        """The Augment to apply (``augment``, or the plain ``augment_shift``), checked against
        images of ``n_features`` pixels (square, with room for the shift) or ValueError."""
        augment = self.augment or Augment(shift=self.augment_shift)
        augment.check_images(n_features)
        return augment

    def make_optimizer(self) -> tuple[Optimizer, Schedule]:
        """The optimizer and the learning-rate schedule (given as names or as objects)."""
        opt = self.optimizer
        if not isinstance(opt, Optimizer):
            decay = {"l1": self.l1, "l2": self.l2, "weight_decay": self.weight_decay}
            rates = {"rho": self.rho, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}
            opt = Optimizer(opt, lr=self.lr, momentum=self.momentum, **decay, **rates)
        return opt, self.schedule if isinstance(self.schedule, Schedule) else Schedule(self.schedule)


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
    weight_decay: float | None = None,
    rho: float | None = None,
    beta1: float | None = None,
    beta2: float | None = None,
    eps: float | None = None,
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
    resume: bool | tuple[dict, dict] = False,
    checkpoint_extra: tuple[dict, dict] = ({}, {}),
    divergence_factor: float | None = DIVERGENCE_FACTOR,
    cuda_graphs: bool = False,
    log_grad_norms: bool = False,
    progress: bool = False,
    verbose: bool = False,
    callbacks: Sequence[Callable[[dict, object], bool | None]] = (),
    carry: Carry | None = None,
) -> History:
    """Train ``model`` on host arrays X (n, n_features) and integer labels y (n,) -> History.

    X_valid (m, n_features) / y_valid (m,): validation data, evaluated after every epoch. Every
    other keyword is a :class:`FitConfig` field, documented there. Raises ValueError for bad
    options, :class:`TrainingDiverged` and :class:`DeviceOutOfMemory`."""
    cfg = FitConfig.of(locals())  # every keyword but the validation data, one for one
    run = _prepare(model, X, y, X_valid, y_valid, cfg)
    bar = tqdm(
        total=run.cfg.epochs, initial=run.state.epoch, disable=not cfg.progress, unit="epoch", file=sys.stderr
    )
    try:
        _loop(run, bar)
    except MemoryError as e:
        raise DeviceOutOfMemory(_oom_message(model, run.data[0].shape, cfg.batch_size, e)) from e
    finally:
        bar.close()
    return _finish(run)


@dataclass
class _Run:
    """What one :func:`fit` call works with, made by :func:`_prepare`."""

    model: Any
    cfg: FitConfig
    opt: Optimizer
    opt_state: list  # per param group, the optimizer's state arrays (loaded on resume)
    sched: Schedule
    state: TrainState
    step: TrainStep
    data: tuple  # host (X (n, F), y (n,)) checked training data
    valid: tuple | None  # host (X_valid (m, F), y_valid (m,)) checked validation data
    ckpt: Path | None
    change: ParamChange | None  # for stop_param_change
    carried: int = 0  # history records carried in from an earlier fit (not returned again)


def _prepare(model, X, y, X_valid, y_valid, cfg: FitConfig) -> _Run:
    """Check the data and options; build the optimizer, its state, the training state (new or
    resumed from the checkpoint) and the step with its buffers. Nothing is uploaded yet."""
    if isinstance(X, Pixels):  # kept as codes: each minibatch is decoded in its gather
        check_features(X.codes, model.n_features, dtype=model.dtype)
    else:
        X = check_features(X, model.n_features, dtype=model.dtype)
    y = check_labels(y, X.shape[0], model.n_classes)
    X, y, X_valid, y_valid = _split_validation(X, y, X_valid, y_valid, cfg.valid_split)
    cfg.check(model, X.shape[0], X_valid is not None)
    augment = cfg.augmentation(X.shape[1])
    if isinstance(X, Pixels) and augment.warps:  # the warping gather reads floats (shifts decode codes)
        X = X.decode(model.dtype)
    opt, sched = cfg.make_optimizer()
    opt_state = [opt.init_state(model.be, w) for _, w, _, _ in model.param_groups()]
    ckpt = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
    if cfg.carry:
        st = _continue(cfg.carry, model, opt, opt_state)
        cfg = replace(cfg, epochs=st.epoch + cfg.epochs)  # the loop counts the run's epochs
    elif cfg.resume and ckpt and ckpt.exists():
        checked = cfg.resume if isinstance(cfg.resume, tuple) else None
        st = _load_checkpoint(ckpt, model, opt, opt_state, X.shape[0], checked)
    else:
        st = TrainState(epoch=0, step=0, seed=int(cfg.seed), history=History())
    valid = None
    if X_valid is not None:
        if isinstance(X_valid, Pixels):  # decoded in the model's dtype, not float32 first
            X_valid = X_valid.decode(model.dtype)
        Xv = check_features(X_valid, model.n_features, "X_valid", dtype=model.dtype)
        valid = (Xv, check_labels(y_valid, Xv.shape[0], model.n_classes, "y_valid"))
    norms = GradNorms(model) if cfg.log_grad_norms else None
    batch, n = min(cfg.batch_size, X.shape[0]), X.shape[0]
    step = TrainStep(
        model,
        opt,
        opt_state,
        batch,
        n,
        cfg.reduction,
        cfg.clip_norm,
        clip_value=cfg.clip_value,
        grad_norms=norms,
    )
    step.configure(cfg.shuffle, augment, cfg.cuda_graphs)
    change = ParamChange(model) if cfg.stop_param_change else None
    carried = len(st.history) if cfg.carry else 0
    return _Run(model, cfg, opt, opt_state, sched, st, step, (X, y), valid, ckpt, change, carried)


def _loop(run: _Run, bar) -> None:
    """Upload the data, measure the untrained loss (divergence's first reference), then train
    epoch by epoch until the last epoch or a stop reason."""
    model, be, st, cfg = run.model, run.model.be, run.state, run.cfg
    X, y = run.data
    if isinstance(X, Pixels):
        Xd = Pixels(be.asarray(X.codes), X.mode)
    else:
        Xd = be.asarray(X, dtype=model.dtype)
    yd = be.asarray(y.astype(np.int32, copy=False))
    valid = run.valid and (be.asarray(run.valid[0], dtype=model.dtype), be.asarray(run.valid[1]))
    if st.initial_loss is None and st.epoch == 0 and cfg.divergence_factor is not None:
        head = Xd[:_REFERENCE_ROWS]
        if isinstance(head, Pixels):
            rows = be.xp.arange(len(head), dtype=np.int32)
            head = be.k.gather_pixels(head.codes, rows, head.divisor, head.offset, model.dtype)
        st.initial_loss = evaluate(model, head, yd[:_REFERENCE_ROWS])[0]
    while st.epoch < cfg.epochs and not st.history.stop_reason:
        rec = _train_epoch(run, Xd, yd, valid)
        _end_epoch(run, rec, bar)


def _train_epoch(run: _Run, Xd, yd, valid) -> dict:
    """One epoch of steps, the divergence check and validation -> the epoch's record."""
    st, step, change = run.state, run.step, run.change
    t0 = time.perf_counter()
    epoch_lr = run.sched.lr(run.opt.lr, st.epoch)
    if change:
        change.mark()
    train_loss, train_acc = step.epoch(Xd, yd, epoch_lr, st)
    _check_divergence(train_loss, st, epoch_lr, run.cfg.divergence_factor, run.ckpt)
    rec = {"epoch": st.epoch + 1, "loss": train_loss, "train_acc": train_acc, "lr": epoch_lr}
    if change:
        rec["param_change"] = change.max_change()
    if step.grad_norms:
        rec["grad_norms"] = step.grad_norms.read(step.steps_per_epoch)
    if valid:
        rec["valid_loss"], rec["valid_acc"] = evaluate(run.model, *valid)
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _end_epoch(run: _Run, rec: dict, bar) -> None:
    """Record the epoch, decide whether to stop (convergence, patience, callbacks), save the
    checkpoint and show progress."""
    st, cfg = run.state, run.cfg
    st.history.records.append(rec)
    st.epoch += 1
    st.history.stop_reason = _stop_reason(st, rec, run.model, cfg.tol, cfg.patience, cfg.stop_param_change)
    if any(cb(rec, run.model) for cb in cfg.callbacks):
        st.history.stop_reason = "callback"
    if run.ckpt:
        _save_checkpoint(run.ckpt, run)
    # postfix first: update() redraws, so the bar shows this epoch's numbers, not the last one's
    shown = {key: v for key, v in rec.items() if isinstance(v, float) and key != "lr"}
    bar.set_postfix({key: f"{v:.4f}" for key, v in shown.items()}, refresh=False)
    bar.update(1)
    if cfg.verbose:
        bar.write(format_record(rec, cfg.epochs), file=sys.stderr)


def _finish(run: _Run) -> History:
    """Restore patience's best weights, name the stop reason and leave the end in the carry ->
    the history (without the records carried in)."""
    st = run.state
    if run.cfg.patience and st.best[2] is not None:
        run.model.load_state_arrays(st.best[2])
    st.history.stop_reason = st.history.stop_reason or "epochs"
    if run.cfg.carry is not None:
        _hand_over(run, run.cfg.carry)
    if run.carried:
        return History(st.history.records[run.carried :], st.history.stop_reason)
    return st.history


def _check_divergence(
    loss: float, st: TrainState, lr: float, factor: float | None, ckpt: Path | None
) -> None:
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


def _stop_reason(st: TrainState, rec: dict, model, tol, patience, stop_param_change=None) -> str:
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
