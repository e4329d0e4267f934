"""Command-line glue for data: the data flags, loading a data set from them, the model's widths
from the data, label classes, and each optimizer's usual learning rate when ``--lr`` is not given.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpumlp.data.datasets import (
    DATASET_NAMES,
    Dataset,
    encode_labels,
    holdout,
    load_idx_dir,
    load_known,
    load_path,
)
from gpumlp.optim import RULES, SPECIFIC_HYPERS, Optimizer


class DataUsageError(ValueError):
    """A data flag does not fit the data; the message says which and how to fix it."""


def add_data_args(p: argparse.ArgumentParser, test_split: bool = True) -> None:
    """--data, --dataset, --data-dir, --label-column, --idx-files, --mirror (and --test-split)."""
    g = p.add_argument_group("data set (default: MNIST)") if isinstance(p, argparse.ArgumentParser) else p
    g.add_argument(
        "--data", metavar="PATH", help="a .npz (X, y[, X_test, y_test]), .csv/.tsv or an IDX directory"
    )
    g.add_argument("--dataset", choices=DATASET_NAMES, help="a known set by name (downloaded into the cache)")
    g.add_argument("--data-dir", default=None, help="directory of IDX files (MNIST-style or EMNIST names)")
    g.add_argument("--label-column", metavar="NAME|INDEX", help="label column of a .csv/.tsv (default: last)")
    g.add_argument(
        "--idx-files",
        metavar="A,B[,C,D]",
        help="IDX file names in --data-dir: train images, labels[, test ...]",
    )
    g.add_argument(
        "--mirror", action="append", metavar="URL", help="download mirror for --dataset (repeatable)"
    )
    if test_split:
        g.add_argument(
            "--test-split",
            type=float,
            default=0.2,
            metavar="FRACTION",
            help="held-out test fraction when the data has no test split (default 0.2)",
        )


def data_source(args: argparse.Namespace) -> dict:
    """The data flags as a JSON-able dict (saved with a model so that eval finds the data again)."""
    keys = ("data", "dataset", "data_dir", "label_column", "idx_files")
    source = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    for k in ("data", "data_dir"):  # absolute, so that eval finds them from any directory
        if k in source:
            source[k] = str(Path(source[k]).expanduser().absolute())
    return source


def load_dataset(source: dict, mirrors=None) -> Dataset:
    """The data set that :func:`data_source` describes; MNIST (default search) when it is empty."""
    given = [k for k in ("data", "dataset", "data_dir") if source.get(k)]
    if len(given) > 1:
        flags = " and ".join("--" + k.replace("_", "-") for k in given)
        raise DataUsageError(f"{flags} both name a data set; give only one")
    if source.get("data"):
        return load_path(source["data"], source.get("label_column"))
    if source.get("data_dir"):
        files = source.get("idx_files")
        return load_idx_dir(source["data_dir"], files.split(",") if files else None)
    return load_known(source.get("dataset") or "mnist", mirrors)


@dataclass
class Prepared:
    """A data set split into train and test, labels as class ids, and the class values."""

    x_train: np.ndarray  # (N, F)
    y_train: np.ndarray  # (N,) int64 in 0..K-1
    x_test: np.ndarray
    y_test: np.ndarray
    classes: np.ndarray  # (K,) the original label values
    pixels: bool
    source: str

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def prepare(ds: Dataset, test_split: float, seed: int) -> Prepared:
    """Hold out a test split when the data has none, and map labels to class ids."""
    if not 0 < test_split < 1:
        raise DataUsageError(f"--test-split {test_split} must be a fraction in (0, 1)")
    ds = holdout(ds, test_split, seed)
    classes, y_train = encode_labels(ds.y_train)
    if len(classes) < 2:
        raise DataUsageError(f"{ds.source}: the training labels hold only one class ({classes[0]!r})")
    _, y_test = encode_labels(ds.y_test, classes)
    return Prepared(ds.x_train, y_train, ds.x_test, y_test, classes, ds.pixels, ds.source)


def hidden_widths(text: str) -> list[int]:
    """An argparse type: ``256,128`` -> [256, 128] (empty or ``0``: no hidden layer)."""
    if text.strip() in ("", "0"):
        return []
    try:
        widths = [int(w) for w in text.replace("-", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of widths") from None
    if min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every hidden width must be >= 1")
    return widths


def model_spec(
    spec: str | None, hidden: list[int] | None, preset_spec: str, n_features: int, n_classes: int
) -> str:
    """The layer widths for the data: ``--spec`` checked against it, else ``--hidden`` (or the
    preset's hidden widths) between the data's input width and class count."""
    from gpumlp.model import parse_spec

    if spec is not None and hidden is not None:
        raise DataUsageError("--spec and --hidden both give the layer widths; use one")
    if spec is not None:
        widths = parse_spec(spec)
        if widths[0] != n_features or widths[-1] != n_classes:
            raise DataUsageError(
                f"--spec {spec} does not match the data: it has {n_features} features and {n_classes} "
                f"classes, so the spec must be {n_features}-...-{n_classes} (or give --hidden only)"
            )
        return spec
    if hidden is None:
        hidden = parse_spec(preset_spec)[1:-1]
    return "-".join(map(str, [n_features, *hidden, n_classes]))


def usual_lr(optimizer: str, reduction: str, batch_size: int) -> float:
    """The optimizer's usual learning rate; SGD-family rates are per sample with ``sum`` reduction."""
    rule = RULES[optimizer]
    lr = rule.lr
    if reduction == "sum" and not rule.scale_invariant:
        lr /= batch_size
    return lr


def describe(config: dict) -> str:
    """One line with the run's effective hyper-parameters."""
    m, f, d = config["model"], config["fit"], config["data"]
    parts = [f"spec {m['spec']}", f"act {m['act']}", f"loss {m['loss']}", f"optimizer {f['optimizer']}"]
    parts.append(f"lr {f['lr']:g}")
    opt = Optimizer(f["optimizer"], f["lr"], **{key: f.get(key) for key in SPECIFIC_HYPERS})
    taken = opt.rule.hyper.values()  # the ones this optimizer takes
    parts += [f"{key} {getattr(opt, key):g}" for key in SPECIFIC_HYPERS if key in taken]
    parts.append(
        f"schedule {f['schedule']}" + (f" (gamma {f['lr_gamma']:g})" if f["schedule"] != "constant" else "")
    )
    parts += [f"batch {f['batch_size']} ({f['reduction']})", f"epochs {f['epochs']}"]
    augment = ("augment_shift", "augment_rotate", "augment_scale", "augment_elastic")
    for key in ("l1", "l2", "clip_norm", "clip_value", "dropout", *augment, "patience", "stop_param_change"):
        value = f.get(key, m.get(key))
        if value:
            parts.append(f"{key} {value:g}")
    if m.get("batchnorm"):
        parts.append("batchnorm")
    parts += [f"scale {d['scale']}", f"valid {d['valid']}", f"seed {f['seed']}"]
    return ", ".join(parts)
