"""The ``gpumlp`` command line: ``train | eval | predict | export | summary | report | search |
experiment | show-data | info | bench``.

Exit codes: 0 success; 2 a bad flag, file or value, a damaged model file, an ``--out``
directory in use by another run, or too little memory (one ``gpumlp: error: ...``
line on stderr, never a traceback); 3 training diverged; 130 interrupted
(Ctrl-C; the last per-epoch checkpoint is kept). Results go to stdout,
progress and diagnostics to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import gpumlp
from gpumlp import cli_tools, logs
from gpumlp.cli_data import describe, hidden_widths
from gpumlp.presets import PRESETS, SCALE_MODES, Prep, fit_kwargs, get_preset

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 2, 3, 130


class UsageError(Exception):
    """A bad command-line value found after parsing; exits 2 with its message."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``gpumlp: error: ...`` (exit 2). No abbreviations:
    ``--data`` must never be taken for ``--data-dir``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        hint = f" (see '{self.prog} --help')"
        self.exit(EXIT_USAGE, f"gpumlp: error: {message}{hint}\n")


# ------------------------------------------------------------------ argument types
def _number(kind, low: float | None, strict: bool, what: str):
    """An argparse type: ``kind`` (int/float) that is finite and >= or > ``low``."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if kind is float and not np.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    convert.__name__ = what
    return convert


POS_FLOAT = _number(float, 0.0, True, "a number > 0")
NONNEG_FLOAT = _number(float, 0.0, False, "a number >= 0")
POS_INT = _number(int, 0, True, "an integer >= 1")
NONNEG_INT = _number(int, 0, False, "an integer >= 0")
FRACTION = _number(float, 0.0, False, "a number in [0, 1)")


def _rate(text: str) -> float:
    """A rate in [0, 1): dropout, a moment's decay."""
    value = FRACTION(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1)")
    return value


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The full ``gpumlp`` argument parser."""
    from gpumlp import search_cli

    p = _Parser(prog="gpumlp", description="Train and use multilayer perceptrons on MNIST or any data set.")
    p.add_argument("--version", action="version", version=f"gpumlp {gpumlp.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(sub.add_parser("train", help="train a model (MNIST, or --data/--dataset)"))
    ev = sub.add_parser("eval", help="test accuracy and per-class report of a saved model")
    ev.add_argument("model", help="model file written by 'gpumlp train --out' (DIR/model.npz)")
    _add_common(ev)
    pr = sub.add_parser("predict", help="predict the class of images in a file")
    pr.add_argument("model", help="model file (DIR/model.npz)")
    pr.add_argument(
        "file", help="inputs: IDX (.gz or raw), .npz (array 'x'/'X' or the first), .csv/.tsv or a PNG"
    )
    pr.add_argument("--label-column", help="of a .csv/.tsv with one column too many: the one to ignore")
    pr.add_argument("--proba", action="store_true", help="also print the class probabilities")
    pr.add_argument(
        "--pixels",
        choices=("auto", "0-255", "0-1"),
        default="auto",
        help="input pixel range (default auto: integers are 0-255, floats all in [0, 1] are 0-1)",
    )
    pr.add_argument("--backend", default=None, help="compute backend (default: $GPUMLP_BACKEND or auto)")
    _add_precision(pr)
    _add_export(sub)
    search_cli.add_args(sub.add_parser("search", help="hyper-parameter search (grid, random, halving; Dask)"))
    sub.add_parser("info", help="versions, backends, BLAS and GPU")
    cli_tools.add_parsers(sub, _add_common)
    sub.add_parser("bench", help="benchmarks (gpumlp bench --help)", add_help=False)
    return p


def _add_export(sub) -> None:
    """``export MODEL --format onnx|torch OUT`` and ``summary MODEL``."""
    ex = sub.add_parser("export", help="write a saved model as ONNX or a PyTorch state_dict + module spec")
    ex.add_argument("model", help="model file (DIR/model.npz)")
    ex.add_argument("out", help="output file (.onnx, or .pt for torch)")
    ex.add_argument("--format", choices=("onnx", "torch"), required=True, help="export format")
    sm = sub.add_parser("summary", help="layers, output shapes and parameter counts of a saved model")
    sm.add_argument("model", help="model file (DIR/model.npz)")


def _add_common(p: argparse.ArgumentParser) -> None:
    """--backend, --precision and --data-dir."""
    backends = "numpy | numba | cupy | cuda-emu | auto"
    p.add_argument("--backend", default=None, help=f"{backends} (default: $GPUMLP_BACKEND or auto)")
    _add_precision(p)
    from gpumlp.cli_data import add_data_args

    add_data_args(p)


def _add_precision(p: argparse.ArgumentParser) -> None:
    from gpumlp.backend import MATMUL_PRECISIONS

    p.add_argument(
        "--precision",
        choices=MATMUL_PRECISIONS,
        default="float32",
        help="float32 GEMMs: exact (default), or tf32/bf16 tensor cores (cupy; cuda-emu emulates them)",
    )


def _add_train(p: argparse.ArgumentParser) -> None:
    """Every hyper-parameter of ``train``; None means 'take it from the preset'."""
    p.add_argument("--preset", choices=list(PRESETS), default="fast", help="base recipe (default: fast)")
    _add_model_args(p.add_argument_group("model"))
    f = p.add_argument_group("optimisation")
    _add_optimizer_args(f)
    _add_stopping_args(f)
    _add_augment_args(f)
    _add_run_args(p.add_argument_group("data and run"))


def _add_model_args(m) -> None:
    """The network: widths, activation, cost, weight init, dropout, batch norm, dtype."""
    from gpumlp.kernels.reference import ACTIVATIONS
    from gpumlp.layers import INITS
    from gpumlp.losses import ALIASES, LOSSES

    m.add_argument("--spec", help="layer widths, e.g. 784-100-10 (must match the data)")
    m.add_argument("--hidden", type=hidden_widths, help="hidden widths, e.g. 256,128 (in/out from the data)")
    m.add_argument("--act", choices=ACTIVATIONS, help="hidden activation")
    m.add_argument("--loss", choices=[*LOSSES, *ALIASES], help="cost")
    m.add_argument("--init", choices=INITS, help="weight init")
    m.add_argument("--dropout", type=_rate, help="dropout rate after each hidden layer")
    m.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=None, help="batch norm")
    m.add_argument("--dtype", choices=["float32", "float64"])


# Hyper-parameters that only some optimizers take (a flag each; an error for any other optimizer):
# config key -> (argument type, what it is). None in a config: the optimizer's own default.
OPTIMIZER_HYPERS = {
    "rho": (_rate, "RMSProp's decay of the mean squared gradient, in [0, 1)"),
    "beta1": (_rate, "decay of the first moment (Lion: the momentum's weight in the update), in [0, 1)"),
    "beta2": (_rate, "decay of the second moment (Lion: of the momentum), in [0, 1)"),
    "eps": (POS_FLOAT, "term added to the denominator for numerical stability, > 0"),
}


def _takers(key: str) -> list[str]:
    """The optimizers that take hyper-parameter ``key`` (a field of gpumlp.optim.Optimizer)."""
    from gpumlp.optim import OPTIMIZERS, RULES

    return [n for n in OPTIMIZERS if key in RULES[n].hyper.values()]


def _defaults(key: str) -> str:
    """'adam 0.9, lion 0.9': the default of hyper-parameter ``key`` in each optimizer that takes it."""
    from gpumlp.optim import Optimizer

    return ", ".join(f"{n} {getattr(Optimizer(n), key):g}" for n in _takers(key))


def _add_optimizer_args(f) -> None:
    """The update: optimizer, learning rate and its schedule, regularisation, clipping, minibatches."""
    from gpumlp.optim import OPTIMIZERS, SCHEDULES

    f.add_argument("--optimizer", choices=OPTIMIZERS)
    f.add_argument("--lr", type=POS_FLOAT, help="learning rate")
    f.add_argument(
        "--momentum",
        type=_rate,
        help=f"momentum coefficient mu, in [0, 1) (default: {_defaults('momentum')})",
    )
    f.add_argument("--l1", type=NONNEG_FLOAT)
    f.add_argument("--l2", type=NONNEG_FLOAT)
    f.add_argument(
        "--weight-decay",
        type=NONNEG_FLOAT,
        help=f"decoupled weight decay (default: {_defaults('weight_decay')})",
    )
    for key, (kind, what) in OPTIMIZER_HYPERS.items():
        f.add_argument(f"--{key}", type=kind, help=f"{what} (default: {_defaults(key)})")
    f.add_argument("--clip-norm", type=POS_FLOAT, help="clip gradients to this global L2 norm")
    f.add_argument("--clip-value", type=POS_FLOAT, help="clip every gradient element to [-V, V]")
    f.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule")
    f.add_argument("--lr-gamma", type=POS_FLOAT, help="schedule factor (0, 1]")
    f.add_argument("--lr-step", type=POS_INT, help="epochs per step of the 'step' schedule")
    f.add_argument("--reduction", choices=["mean", "sum"], help="minibatch gradient: mean or sum")
    f.add_argument("--batch-size", type=POS_INT)


def _add_stopping_args(f) -> None:
    """When training stops: divergence, the number of epochs, convergence, patience."""
    f.add_argument(
        "--divergence-factor",
        type=NONNEG_FLOAT,
        default=1e3,
        help="stop (exit 3) when the loss exceeds this many times the lowest seen (default 1000; 0: off)",
    )
    f.add_argument("--epochs", type=POS_INT, help="total epochs (with --resume: including those done)")
    f.add_argument("--tol", type=POS_FLOAT, help="stop when the loss changes by less than this")
    f.add_argument(
        "--stop-param-change", type=POS_FLOAT, help="stop when no weight or bias changes by EPS in an epoch"
    )
    f.add_argument("--patience", type=POS_INT, help="early stop after N epochs without better valid acc")


def _add_augment_args(f) -> None:
    """Random shifts, rotations, scaling and elastic distortions of the training images."""
    f.add_argument("--augment-shift", type=NONNEG_INT, help="random shifts of up to N pixels")
    f.add_argument("--augment-rotate", type=NONNEG_FLOAT, metavar="DEG", help="random rotations up to DEG")
    f.add_argument("--augment-scale", type=NONNEG_FLOAT, metavar="F", help="random scaling by 1 +- F")
    f.add_argument(
        "--augment-elastic", type=NONNEG_FLOAT, metavar="ALPHA", help="elastic distortions of strength ALPHA"
    )
    f.add_argument(
        "--augment-elastic-sigma", type=POS_FLOAT, metavar="PX", help="smoothing of the elastic fields (4)"
    )


def _add_run_args(d) -> None:
    """Data, seed, backend, output directory and resume, logging, CUDA graphs, plots."""
    d.add_argument("--scale", choices=SCALE_MODES, help="input preprocessing")
    d.add_argument("--valid", type=NONNEG_INT, help="validation rows from the end of the train set")
    d.add_argument("--limit", type=POS_INT, help="train on the first N samples only (quick runs)")
    d.add_argument("--seed", type=NONNEG_INT, help="seed for init, dropout, shuffling and shifts")
    _add_common(d)
    d.add_argument("--out", help="output directory: model.npz, checkpoint.npz, history.json, metrics.json")
    d.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    d.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none unless stderr is a terminal)"
    )
    d.add_argument("--quiet", action="store_true", help="only results and errors")
    d.add_argument("--verbose", action="store_true", help="also debug messages and third-party warnings")
    d.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each full-size step as one CUDA graph (cupy/cuda-emu; numba replays its own step graphs "
        "by default)",
    )
    d.add_argument("--plots", action="store_true", help="also write PNG plots to OUT (needs matplotlib)")
    d.add_argument("--tensorboard", metavar="DIR", help="write per-epoch scalars as TensorBoard event files")
    d.add_argument(
        "--log-grad-norms", action="store_true", help="record each layer's gradient norm per epoch"
    )


# ------------------------------------------------------------------ config
MODEL_KEYS = ("spec", "act", "loss", "init", "dropout", "batchnorm", "dtype", "seed")
FIT_KEYS = tuple(PRESETS["seed"]["fit"])
DATA_KEYS = ("scale", "valid")
MODEL_SECTIONS = ("model", "fit", "data")


def resolve_config(args: argparse.Namespace, saved: dict | None = None) -> dict:
    """Preset (or a resumed run's saved config), overridden by every flag given explicitly."""
    config = saved if saved is not None else get_preset(args.preset)
    config["preset"] = config.get("preset", args.preset)
    _usual_lr(args, config)
    for section, keys in (("model", MODEL_KEYS), ("fit", FIT_KEYS), ("data", DATA_KEYS)):
        for key in keys:
            value = getattr(args, key, None)
            if value is not None:
                config[section][key] = value
    if getattr(args, "limit", None) is not None:
        config["data"]["limit"] = args.limit
    config["data"].setdefault("limit", None)
    if args.seed is not None:
        config["fit"]["seed"] = args.seed
    config["fit"].setdefault("seed", config["model"]["seed"])
    return config


def _usual_lr(args: argparse.Namespace, config: dict) -> None:
    """A new --optimizer without --lr gets that optimizer's usual rate, not the preset's."""
    from gpumlp.cli_data import usual_lr

    f = config["fit"]
    opt = getattr(args, "optimizer", None)
    if opt is not None and getattr(args, "lr", None) is None and opt != f["optimizer"]:
        reduction = getattr(args, "reduction", None) or f["reduction"]
        f["lr"] = usual_lr(opt, reduction, getattr(args, "batch_size", None) or f["batch_size"])


# ------------------------------------------------------------------ data
def load_data(args: argparse.Namespace, source: dict | None = None, seed: int = 0):
    """The data set of the flags (or ``source``, a saved run's), split and labels as class ids."""
    from gpumlp.cli_data import data_source, load_dataset, prepare

    source = data_source(args) if source is None else source
    ds = load_dataset(source, getattr(args, "mirror", None))
    return prepare(ds, source.get("test_split", getattr(args, "test_split", 0.2)), seed)


def split_data(data, config: dict):
    """-> (x_train, y_train, x_valid | None, y_valid | None) raw features; validation = last rows."""
    from gpumlp.data import split_train_valid

    n_valid, limit = config["data"]["valid"], config["data"]["limit"]
    if not 0 <= n_valid < len(data.x_train):
        raise UsageError(f"--valid {n_valid} must be smaller than the {len(data.x_train)} training samples")
    x_tr, y_tr, x_va, y_va = split_train_valid(data.x_train, data.y_train, n_valid)
    if limit is not None:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    return (x_tr, y_tr, x_va, y_va) if n_valid else (x_tr, y_tr, None, None)


# ------------------------------------------------------------------ train
def _out_paths(out: Path | None) -> dict[str, Path]:
    """Named files of an output directory."""
    names = ("model.npz", "checkpoint.npz", "history.json", "metrics.json", "config.json")
    return {n.split(".")[0]: out / n for n in names} if out else {}


def _write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON (atomically: temp file, fsync, rename)."""
    from gpumlp.rundir import write_json

    write_json(path, obj, default=_json_default)


def _json_default(o):
    """numpy scalars and arrays -> JSON."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def _train_config(args: argparse.Namespace, paths: dict) -> tuple[dict, dict | None]:
    """Resolve the run's config; with --resume start from OUT/config.json when present.
    -> (config, the config.json it resumed from, kept to restore if the run diverges, or None)."""
    if args.resume and not paths:
        raise UsageError("--resume needs --out DIR (it continues from DIR/checkpoint.npz)")
    if args.resume and not paths["checkpoint"].is_file():
        raise UsageError(f"--resume: no checkpoint at {paths['checkpoint']} to continue from")
    saved = None
    if args.resume:
        from gpumlp.rundir import check_resume_after_divergence

        check_resume_after_divergence(paths["config"].parent, args.lr)
    if args.resume and paths["config"].is_file():
        try:
            saved = json.loads(paths["config"].read_text())
        except ValueError as e:
            raise UsageError(f"{paths['config']} is unreadable ({e}); start a new run") from None
        if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in MODEL_SECTIONS):
            raise UsageError(f"{paths['config']} lacks its model/fit/data sections; start a new run")
    config = resolve_config(args, copy.deepcopy(saved))
    _check_optimizer_flags(args, config["fit"]["optimizer"])
    return config, saved


def _check_optimizer_flags(args: argparse.Namespace, optimizer: str) -> None:
    """UsageError for a flag of an optimizer's own hyper-parameter (``SPECIFIC_HYPERS``) given on the
    command line to an ``optimizer`` that does not take it (a preset's or resumed config's value is
    no flag: the flags' defaults are None)."""
    from gpumlp.optim import SPECIFIC_HYPERS

    for key in SPECIFIC_HYPERS:
        takers = _takers(key)
        if getattr(args, key, None) is not None and optimizer not in takers:
            raise UsageError(
                f"--{key.replace('_', '-')} does not apply to optimizer {optimizer}; it is a "
                f"hyper-parameter of {', '.join(takers)}"
            )


def cmd_train(args: argparse.Namespace) -> int:
    """``gpumlp train``: holds an exclusive lock on ``--out`` for the whole run. A run that fails
    before writing anything there (a usage error found once the directory is locked: a flag the
    optimizer does not take, --patience without validation data, a bad data file...) removes the
    directory again if this invocation created it."""
    from gpumlp.rundir import RunLock

    missing = args.resume and args.out and not Path(args.out).is_dir()  # refused in _train; create nothing
    if not args.out or missing:
        return _train(args)
    lock = RunLock(args.out).acquire()
    try:
        status = _train(args)
    except BaseException:
        lock.release_and_discard()
        raise
    lock.release()
    return status


def _train(args: argparse.Namespace) -> int:
    """``gpumlp train`` once the run directory is ours."""
    from gpumlp.backend import get_backend
    from gpumlp.model import MLP

    t_start = time.perf_counter()
    out = Path(args.out) if args.out else None
    paths = _out_paths(out)
    config, last_good = _train_config(args, paths)
    fit_kw = fit_kwargs(config)  # validates the schedule before any data is loaded
    if args.plots:
        from gpumlp.plots import require_matplotlib

        require_matplotlib()  # fail now, not after training, when matplotlib is missing
    be = get_backend(args.backend)
    be.set_matmul_precision(args.precision)
    data = _train_data(args, config)
    model = MLP(**config["model"], backend=be)
    x_tr, y_tr, x_va, y_va = split_data(data, config)
    prep = Prep.fit(x_tr, config["data"]["scale"])
    dt = model.dtype
    X_valid = prep.apply(x_va, dt) if x_va is not None else None
    if config["fit"]["patience"] and X_valid is None:
        raise UsageError("--patience needs a validation set (--valid N > 0)")
    spec, preset = config["model"]["spec"], config["preset"]
    _log(f"training {spec} on {len(x_tr)} samples of {data.source}, backend {be.name}, preset {preset}")
    _log(f"hyper-parameters: {describe(config)}")
    if out:  # with --resume: the checkpoint, checked (and read once for the whole run)
        fit_kw["resume"] = _start_run_dir(args, paths, config, model, len(x_tr))
    history = _fit(args, model, prep, (x_tr, y_tr, X_valid, y_va), fit_kw, config, paths, last_good)
    return _report_run(args, model, prep, data, history, config, paths, len(x_tr), t_start)


def _fit(args: argparse.Namespace, model, prep: Prep, split, fit_kw: dict, config: dict, paths, last_good):
    """Train on ``split`` = (raw train x, y, preprocessed valid X | None, valid y) -> History.
    Divergence marks the run directory (and restores the config of the kept checkpoint);
    Ctrl-C says whether a checkpoint was kept."""
    from gpumlp.train import TrainingDiverged

    x_tr, y_tr, X_valid, y_va = split
    out, level = Path(args.out) if args.out else None, logs.verbosity(args.quiet, args.verbose)
    try:  # overflow on the way to a NaN loss is reported once, as TrainingDiverged, not as warnings
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return model.fit(
                prep.training_input(x_tr, model.dtype), y_tr, **fit_kw, X_valid=X_valid, y_valid=y_va,
                checkpoint_path=paths.get("checkpoint"),
                divergence_factor=args.divergence_factor or None,
                checkpoint_extra=(prep.to_arrays(), {"prep": prep.to_meta()}),
                cuda_graphs=args.cuda_graphs, log_grad_norms=args.log_grad_norms,
                progress=logs.progress_bar_wanted(args.no_progress, level), verbose=level > logs.QUIET,
                callbacks=_callbacks(args),
            )  # fmt: skip
    except TrainingDiverged as e:
        if out:
            from gpumlp.rundir import mark_diverged

            mark_diverged(out, config["fit"]["lr"], e.epoch, str(e))
            if last_good is not None:  # the config of the kept checkpoint, not the lr that diverged
                _write_json(paths["config"], last_good)
        raise
    except KeyboardInterrupt:
        ckpt = paths.get("checkpoint")
        kept = (
            f"the last checkpoint is kept in {ckpt} (continue with --resume)"
            if ckpt and ckpt.is_file()
            else "no checkpoint was saved (use --out DIR to keep one per epoch)"
        )
        raise _Interrupted(f"interrupted; {kept}") from None


def _report_run(
    args, model, prep: Prep, data, history, config: dict, paths, n_train: int, t_start: float
) -> int:
    """Test the trained model, write the run directory's outputs and print the summary."""
    train_s = float(sum(history["seconds"]))
    y_pred = model.predict(prep.apply(data.x_test, model.dtype))
    metrics = _test_metrics(data.y_test, y_pred, model.n_classes)
    total_s = time.perf_counter() - t_start
    metrics.update(backend=model.be.name, train_seconds=train_s, seconds=total_s, epochs=len(history))
    metrics.update(stop_reason=history.stop_reason, samples=n_train, config=config)
    metrics["machine"] = _machine(model.be.name)
    if paths:
        _save_outputs(model, prep, history, metrics, paths, args.plots, data, y_pred)
    print(f"test accuracy: {100 * metrics['test_accuracy']:.2f}%")
    print(f"epochs: {len(history)} (stop: {history.stop_reason}), train seconds: {train_s:.2f}")
    print(f"total seconds: {total_s:.2f}")
    print(f"backend: {model.be.name}")
    if paths:
        print(f"model: {paths['model']}")
    return EXIT_OK


def _callbacks(args: argparse.Namespace) -> list:
    """Per-epoch callbacks the flags ask for (``--tensorboard DIR``)."""
    from gpumlp.tracking import TensorBoardWriter

    return [TensorBoardWriter(args.tensorboard)] if args.tensorboard else []


def _train_data(args: argparse.Namespace, config: dict):
    """Load the run's data set and fit the config to it: widths from the data (``--spec`` checked,
    ``--hidden`` or the preset's hidden widths), standardisation for non-pixel features and a
    validation set of at most a tenth of the rows unless given."""
    from gpumlp.cli_data import data_source, model_spec

    given = data_source(args)
    resumed = "source" in config["data"] and not given
    source = config["data"]["source"] if resumed else {**given, "test_split": args.test_split}
    config["data"]["source"] = source
    data = load_data(args, source, seed=config["fit"]["seed"])
    spec = model_spec(args.spec, args.hidden, config["model"]["spec"], data.n_features, len(data.classes))
    config["model"]["spec"] = spec
    config["data"]["pixels"] = bool(data.pixels)  # predict reads pixel ranges only for image models
    if args.scale is None and not data.pixels and not resumed:
        config["data"]["scale"] = "standardize"
    if args.valid is None and not resumed:
        config["data"]["valid"] = min(config["data"]["valid"], len(data.x_train) // 10)
    return data


def _machine(backend_name: str) -> dict:
    from gpumlp.html_report import machine_summary

    return machine_summary(backend_name)


class _Interrupted(Exception):
    """Ctrl-C during training, with a message about the kept checkpoint."""


def _start_run_dir(args: argparse.Namespace, paths: dict, config: dict, model, n_train: int):
    """Check that a --resume can continue (model, optimizer, data size), then write config.json:
    nothing in the run directory changes unless the resume is accepted. -> what ``fit(resume=)``
    takes: the checked checkpoint (so it is read once), or False."""
    from gpumlp.rundir import clear_diverged
    from gpumlp.train import check_resume

    resume = args.resume and check_resume(paths["checkpoint"], model, config["fit"]["optimizer"], n_train)
    _write_json(paths["config"], config)
    clear_diverged(paths["config"].parent)
    return resume


def _test_metrics(y_true, y_pred, n_classes: int) -> dict:
    """metrics.json body: accuracy, per-class precision/recall/F1, confusion matrix."""
    from gpumlp.metrics import confusion_matrix, precision_recall_f1

    prf = precision_recall_f1(y_true, y_pred, n_classes)
    return {
        "test_accuracy": prf["accuracy"],
        "precision": prf["precision"],
        "recall": prf["recall"],
        "f1": prf["f1"],
        "support": prf["support"],
        "macro_precision": prf["macro_precision"],
        "macro_recall": prf["macro_recall"],
        "macro_f1": prf["macro_f1"],
        "confusion_matrix": confusion_matrix(y_true, y_pred, n_classes),
    }


def _save_outputs(model, prep: Prep, history, metrics: dict, paths: dict, plots: bool, data, y_pred) -> None:
    """model.npz (with its preprocessing and classes), history.json, metrics.json and optionally PNGs."""
    from gpumlp.data.datasets import classes_to_json

    meta = {"prep": prep.to_meta(), "gpumlp_version": gpumlp.__version__, "config": metrics["config"]}
    meta["classes"] = classes_to_json(data.classes)
    model.save(paths["model"], extra_arrays=prep.to_arrays(), extra_meta=meta)
    _write_json(paths["history"], history.to_dict())
    _write_json(paths["metrics"], metrics)
    if plots:
        from gpumlp import plots

        out = paths["model"].parent
        plots.plot_history(history.to_dict(), out / "history.png")
        plots.plot_confusion(metrics["confusion_matrix"], out / "confusion.png")
        if data.n_features == 784:  # the digit grid draws 28x28 images
            plots.plot_misclassified(data.x_test, data.y_test, y_pred, out / "misclassified.png")
        _log(
            f"plots written to {out}/history.png, confusion.png"
            + (", misclassified.png" * (data.n_features == 784))
        )
        if "grad_norms" in history.records[-1]:
            path = plots.plot_grad_norms(history.to_dict(), out / "grad_norms.png")
            _log(f"gradient norms plotted in {path}")


# ------------------------------------------------------------------ eval / predict
def load_model(path: str, backend: str | None):
    """(model, prep, meta) from a model file, read and checksum-verified once; a missing or bad file is
    a clear error. ``meta`` is its JSON header, with ``classes`` (the label of each output; 0..K-1 when
    the file predates stored classes)."""
    from gpumlp import checkpoint
    from gpumlp.model import MLP

    if not Path(path).is_file():
        raise UsageError(f"model file {path} does not exist")
    arrays, meta = checkpoint.read(path)
    model = MLP.from_checkpoint(path, arrays, meta, backend=backend)
    prep = Prep.from_checkpoint(path, arrays, meta)
    if prep is None:
        _log(f"warning: {path} stores no preprocessing; assuming pixels scaled to [0, 1]")
        prep = Prep("0,1")
    meta.setdefault("classes", list(range(model.n_classes)))
    return model, prep, meta


def cmd_eval(args: argparse.Namespace) -> int:
    """``gpumlp eval MODEL``."""
    from gpumlp.cli_data import data_source
    from gpumlp.data.datasets import encode_labels
    from gpumlp.metrics import accuracy, classification_report

    model, prep, meta = load_model(args.model, args.backend)
    model.be.set_matmul_precision(args.precision)
    config = meta.get("config", {})
    given = data_source(args)  # no data flags: the data set the model was trained on
    source = {**given, "test_split": args.test_split} if given else config.get("data", {}).get("source", {})
    data = load_data(args, source, seed=config.get("fit", {}).get("seed", 0))
    _, y_test = encode_labels(data.classes[data.y_test], np.asarray(meta["classes"]))
    y_pred = model.predict(prep.apply(data.x_test, model.dtype))
    print(f"test accuracy: {100 * accuracy(y_test, y_pred):.2f}%")
    print(classification_report(y_test, y_pred, model.n_classes, names=meta["classes"]))
    print(f"backend: {model.be.name}")
    return EXIT_OK


def read_images(path: str, n_features: int, label_column: str | None = None) -> np.ndarray:
    """Raw inputs (N, n_features) from an IDX (.gz or raw), .npz, .csv/.tsv or PNG file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"input file {path} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        from gpumlp.data.datasets import table_features

        x = table_features(p, n_features, label_column)
    elif suffix == ".npz":
        x = _read_npz(p)
    elif suffix == ".png":
        x = _read_png(p)
    else:
        from gpumlp.data import read_idx

        x = read_idx(p)
    x = np.asarray(x)
    if x.ndim == 1 or (x.ndim == 2 and x.shape[0] * x.shape[1] == n_features and x.shape[1] != n_features):
        x = x[None]  # a single image
    x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x
    if x.ndim != 2 or x.shape[1] != n_features or x.dtype.kind not in "uif":
        raise UsageError(f"{path}: expected images with {n_features} pixels each, got {x.dtype} {x.shape}")
    return x


def as_pixels(x: np.ndarray, path: str, pixels: str = "auto") -> np.ndarray:
    """Images read from ``path`` -> pixels 0..255: ``pixels`` says whether the file holds 0-255 or
    0-1 values (``auto``: detect, see gpumlp.data.images); PNGs are always read as 0..255."""
    from gpumlp.data.images import to_pixels_255

    png = Path(path).suffix.lower() == ".png"
    x, used = to_pixels_255(x, "0-255" if png else pixels, str(path))
    if pixels == "auto" and used == "0-1":
        _log(f"{path}: all values are in [0, 1]; read as pixels scaled to [0, 1] (say --pixels 0-255 if not)")
    return x


def _read_npz(path: Path) -> np.ndarray:
    """Array ``x`` (or the first array) of an .npz file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not z.files:
                raise UsageError(f"{path}: the .npz file holds no arrays")
            key = next((k for k in ("x", "X", "x_test", "X_test") if k in z.files), z.files[0])
            return z[key]
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable .npz file ({e})") from None
    except (EOFError, zipfile.BadZipFile) as e:  # a 0-byte or damaged file
        raise UsageError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def _read_png(path: Path) -> np.ndarray:
    """A PNG (gray, 16-bit, RGB, with or without alpha) -> (H, W) pixels 0..255."""
    from gpumlp.data.images import read_png

    return read_png(path)


def cmd_predict(args: argparse.Namespace) -> int:
    """``gpumlp predict MODEL FILE``."""
    model, prep, meta = load_model(args.model, args.backend)
    model.be.set_matmul_precision(args.precision)
    saved = meta.get("config", {}).get("data", {}).get("source", {})  # the training table's label column
    label_column = args.label_column or saved.get("label_column")
    x = read_images(args.file, model.n_features, label_column)
    if meta.get("config", {}).get("data", {}).get("pixels", True):  # a model of images (older: MNIST)
        x = as_pixels(x, args.file, args.pixels)
    x = prep.apply(x, model.dtype)
    classes = np.asarray(meta["classes"])
    if not args.proba:
        print("\n".join(str(c) for c in classes[model.predict(x)]))
        return EXIT_OK
    proba = model.predict_proba(x)
    for c, row in zip(classes[proba.argmax(axis=1)], proba):
        print(f"{c}\t" + " ".join(f"{v:.4f}" for v in row))
    return EXIT_OK


# ------------------------------------------------------------------ export / summary
def cmd_export(args: argparse.Namespace) -> int:
    """``gpumlp export MODEL --format onnx|torch OUT``."""
    from gpumlp.export import EXPORTERS

    model, prep, _ = load_model(args.model, "numpy")
    EXPORTERS[args.format](model, prep, args.out)
    print(f"{args.format} model: {args.out}")
    return EXIT_OK


def cmd_summary(args: argparse.Namespace) -> int:
    """``gpumlp summary MODEL``."""
    from gpumlp.export import summary

    model, prep, _ = load_model(args.model, "numpy")
    print(summary(model, prep))
    return EXIT_OK


# ------------------------------------------------------------------ info / bench
def _version(module: str) -> str:
    """Version of an importable module, or 'not installed' (or why it failed to import)."""
    import importlib

    try:
        return getattr(importlib.import_module(module), "__version__", "installed (no version)")
    except ImportError:
        return "not installed"
    except Exception as e:  # e.g. cupy present but its CUDA libraries are not
        return f"installed but fails to import ({type(e).__name__}: {e})"


def _backends() -> tuple[dict[str, str], str]:
    """(name -> availability line, the name 'auto' picks); any import failure counts as unavailable."""
    from gpumlp.backend import AUTO_ORDER, backend_report

    report = backend_report()
    auto = next((n for n in AUTO_ORDER if report.get(n, "").startswith("available")), "none")
    return report, auto


def _blas() -> str:
    """BLAS library in use: threadpoolctl when installed, else numpy's build config."""
    try:
        from threadpoolctl import threadpool_info

        libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if libs:
            return "; ".join(
                f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)" for i in libs
            )
    except ImportError:
        pass
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{cfg.get('name')} {cfg.get('version', '')}".strip()
    except Exception:
        return "unknown (install threadpoolctl for details)"


def _gpu() -> str:
    """GPU name via cupy, or why there is none."""
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        count = cupy.cuda.runtime.getDeviceCount()
        return f"{name} ({props['totalGlobalMem'] / 2**30:.1f} GiB), {count} device(s)"
    except ImportError:
        return "none detected (cupy not installed)"
    except Exception as e:
        return f"none usable ({_one_line(e)})"


def _jit_cache() -> str:
    """The numba JIT cache dir, when the numba kernels expose it."""
    try:
        from gpumlp.kernels import numba_cpu
    except Exception as e:
        return f"n/a ({_one_line(e)})"
    get = getattr(numba_cpu, "_jit_cache_dir", None)
    return str(get()) if callable(get) else "n/a (numba_cpu has no _jit_cache_dir)"


def cmd_info(args: argparse.Namespace) -> int:
    """``gpumlp info``."""
    print(f"gpumlp {gpumlp.__version__}")
    print(f"python {platform.python_version()} ({sys.executable}) on {platform.platform()}")
    for mod in ("numpy", "numba", "cupy", "torch"):
        print(f"{mod}: {_version(mod)}")
    report, auto = _backends()
    print("backends:")
    for name, line in report.items():
        print(f"  {name}: {line}")
    env = os.environ.get("GPUMLP_BACKEND")
    print(f"auto picks: {auto}" + (f" (but $GPUMLP_BACKEND={env})" if env else ""))
    print(f"BLAS: {_blas()}")
    print(f"CPU cores: {os.cpu_count()}")
    print(f"GPU: {_gpu()}")
    print(f"numba JIT cache: {_jit_cache()}")
    return EXIT_OK


def cmd_bench(argv: Sequence[str]) -> int:
    """``gpumlp bench ...``: delegate to gpumlp.bench.main."""
    try:
        from gpumlp import bench
    except ImportError as e:
        raise UsageError(f"benchmarks are not available in this install ({e})") from None
    return int(bench.main(list(argv)) or 0)


# ------------------------------------------------------------------ main
def cmd_search(args: argparse.Namespace) -> int:
    """``gpumlp search``: see :mod:`gpumlp.search_cli`."""
    from gpumlp import search_cli

    return search_cli.run(args)


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "info": cmd_info,
    "search": cmd_search,
}
COMMANDS.update(export=cmd_export, summary=cmd_summary)
COMMANDS.update(cli_tools.COMMANDS)


def _log(msg: str) -> None:
    """A diagnostic line on stderr (``gpumlp: msg``; hidden by --quiet unless it is a warning)."""
    log = logging.getLogger("gpumlp.cli")
    (log.warning if msg.startswith("warning:") else log.info)(msg)


def _one_line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split()) or type(e).__name__


def _fail(msg: str, code: int) -> int:
    """Print ``gpumlp: error: msg`` and return ``code``."""
    print(f"gpumlp: error: {msg}", file=sys.stderr, flush=True)
    return code


def glue_negative_values(argv: list[str]) -> list[str]:
    """``--scale -1,1`` -> ``--scale=-1,1``: argparse would take '-1,1' for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--scale" and arg.startswith("-"):
            out[-1] = f"--scale={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpumlp`` console script and ``python -m gpumlp``; returns the exit code."""
    from gpumlp.backend import BackendUnavailable
    from gpumlp.rundir import RunDirBusy
    from gpumlp.train import TrainingDiverged

    argv = glue_negative_values(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="gpumlp: %(message)s", stream=sys.stderr)
    try:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        logs.setup(logs.verbosity(getattr(args, "quiet", False), getattr(args, "verbose", False)))
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # e.g. `gpumlp predict ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except TrainingDiverged as e:
        return _fail(_one_line(e), EXIT_DIVERGED)
    except (KeyboardInterrupt, _Interrupted) as e:
        return _fail(_one_line(e) if isinstance(e, _Interrupted) else "interrupted", EXIT_INTERRUPTED)
    except (UsageError, ValueError, TypeError, BackendUnavailable, ImportError, OSError, RunDirBusy) as e:
        return _fail(_one_line(e), EXIT_USAGE)
    except MemoryError as e:
        return _fail(f"out of memory: {_one_line(e)}", EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
