"""Named training recipes and the input preprocessing that goes with a model.

A preset is three dicts: ``model`` (``MLP`` keyword arguments), ``fit``
(``fit`` keyword arguments, with the LR schedule spelled as ``schedule`` /
``lr_gamma`` / ``lr_step``) and ``data`` (pixel ``scale`` mode and the
number of ``valid`` rows held out from the end of the training set).

:class:`Prep` is the preprocessing a model was trained with; it travels inside
the saved model (meta ``prep`` + arrays ``prep/mean``, ``prep/std``) so that
``eval`` and ``predict`` feed the model exactly what it saw in training.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import numpy as np

from gpumlp import checkpoint
from gpumlp.data import Pixels, scale_pixels
from gpumlp.data.preprocess import PIXEL_SCALES

SCALE_MODES = ("-1,1", "0,1", "standardize")
STD_FLOOR = 1e-8  # as gpumlp.data.standardize: near-constant features are only centred

# What both base recipes share: no L1, no clipping, no early stopping, no augmentation.
_MODEL_COMMON = {"dropout": 0.0, "batchnorm": False, "dtype": "float32", "seed": 1}
_FIT_COMMON = {
    "momentum": 0.9,
    "l1": 0.0,
    "weight_decay": None,
    "rho": None,  # None: the optimizer's own default (gpumlp.optim.Optimizer)
    "beta1": None,
    "beta2": None,
    "eps": None,
    "clip_norm": None,
    "clip_value": None,
    "tol": None,
    "stop_param_change": None,
    "patience": None,
    "augment_shift": 0,
    "augment_rotate": 0.0,
    "augment_scale": 0.0,
    "augment_elastic": 0.0,
    "augment_elastic_sigma": 4.0,
}
PRESETS: dict[str, dict] = {
    # The classic reference run: sigmoid 784-100-10 with the logistic cost, plain SGD on
    # summed minibatch gradients, L2 0.01, pixels in [-1, 1], 55k train / 5k valid.
    "seed": {
        "model": {
            "spec": "784-100-10",
            "act": "sigmoid",
            "loss": "logistic",
            "init": "normal",
            **_MODEL_COMMON,
        },
        "fit": {
            "optimizer": "sgd",
            "lr": 0.0005,
            "l2": 0.01,
            "schedule": "constant",
            "lr_gamma": 0.1,
            "lr_step": 10,
            "reduction": "sum",
            "batch_size": 100,
            "epochs": 200,
            **_FIT_COMMON,
        },
        "data": {"scale": "-1,1", "valid": 5000},
    },
    # A modern recipe measured to reach >= 98 % MNIST test accuracy in a few CPU epochs.
    "fast": {
        "model": {
            "spec": "784-512-256-10",
            "act": "relu",
            "loss": "softmax_xent",
            "init": "he",
            **_MODEL_COMMON,
        },
        "fit": {
            "optimizer": "adam",
            "lr": 0.001,
            "l2": 0.0,
            "schedule": "exp",
            "lr_gamma": 0.7,
            "lr_step": 1,
            "reduction": "mean",
            "batch_size": 128,
            "epochs": 6,
            **_FIT_COMMON,
        },
        "data": {"scale": "0,1", "valid": 5000},
    },
}
# Wider, with dropout and 2-pixel shift augmentation: measured 99.01 % test in 20 epochs (72 s, numba).
PRESETS["accurate"] = copy.deepcopy(PRESETS["fast"])
PRESETS["accurate"]["model"].update(spec="784-1024-1024-10", dropout=0.2)
PRESETS["accurate"]["fit"].update(lr_gamma=0.85, epochs=20, augment_shift=2)
# The most accurate MLP recipe: the accurate preset's net trained longer, on all 60k training images,
# rotated, scaled, shifted and elastically distorted (Simard et al. 2003: alpha 34, sigma 4), Adam
# decaying x0.95/epoch: measured 99.31 % test in 70 epochs (numba; 35 epochs at x0.92: 99.23 %).
PRESETS["best"] = copy.deepcopy(PRESETS["accurate"])
PRESETS["best"]["fit"].update(
    lr_gamma=0.95, epochs=70, augment_shift=2, augment_rotate=10.0, augment_scale=0.1, augment_elastic=34.0
)
PRESETS["best"]["data"].update(valid=0)
# The time-to-accuracy recipe (the bench's --tta run): a narrow two-layer net, a high Adam rate
# halved every epoch; measured 98.12 % MNIST test in 5 epochs, 1.9 s of training (numba, 2 cores).
PRESETS["fastest"] = copy.deepcopy(PRESETS["fast"])
PRESETS["fastest"]["model"].update(spec="784-256-128-10")
PRESETS["fastest"]["fit"].update(lr=0.002, lr_gamma=0.5, batch_size=100, epochs=5)

FIT_SCHEDULE_KEYS = ("schedule", "lr_gamma", "lr_step")
# config key -> Augment field (runs saved before rotation/scale/elastic existed lack all but the shift)
FIT_AUGMENT_KEYS = {
    "augment_shift": "shift",
    "augment_rotate": "rotate",
    "augment_scale": "scale",
    "augment_elastic": "elastic_alpha",
    "augment_elastic_sigma": "elastic_sigma",
}


def fit_kwargs(config: dict) -> dict:
    """The :func:`gpumlp.train.fit` keyword arguments of a preset or run config (schedule as a
    Schedule, augmentation as an Augment)."""
    from gpumlp.augment import Augment
    from gpumlp.optim import Schedule

    f = config["fit"]
    kw = {k: v for k, v in f.items() if k not in FIT_SCHEDULE_KEYS and k not in FIT_AUGMENT_KEYS}
    kw["schedule"] = Schedule(f["schedule"], gamma=f["lr_gamma"], step_size=f["lr_step"])
    kw["augment"] = Augment(**{field: f[key] for key, field in FIT_AUGMENT_KEYS.items() if key in f})
    return kw


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name`` (safe to modify)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


@dataclass
class Prep:
    """Input preprocessing: raw pixels 0..255 -> model inputs. ``scale`` is ``-1,1``, ``0,1`` or
    ``standardize`` (pixels to [0, 1], then per-feature ``(x - mean) / std`` from the training rows)."""

    scale: str = "0,1"
    mean: np.ndarray | None = None  # (F,) float64, standardize only
    std: np.ndarray | None = None  # (F,) float64, floored: never 0

    @classmethod
    def fit(cls, x_train, scale: str) -> Prep:
        """Learn the preprocessing for ``scale`` from raw training pixels (N, F)."""
        if scale not in SCALE_MODES:
            raise ValueError(f"unknown scale mode {scale!r}; choose one of {', '.join(SCALE_MODES)}")
        if scale != "standardize":
            return cls(scale)
        x01 = np.asarray(x_train, dtype=np.float64) / 255.0
        std = x01.std(axis=0)
        return cls(scale, x01.mean(axis=0), np.where(std < STD_FLOOR, 1.0, std))

    def apply(self, x, dtype=np.float32) -> np.ndarray:
        """Raw pixels (N, F), values 0..255 -> (N, F) float model inputs."""
        out = scale_pixels(x, "0,1" if self.scale == "standardize" else self.scale, dtype)
        if self.scale == "standardize":
            out -= self.mean.astype(dtype)
            out /= self.std.astype(dtype)
        return out

    def training_input(self, x, dtype=np.float32) -> np.ndarray | Pixels:
        """What ``fit`` trains on: uint8 pixels under a pixel scale stay 8-bit codes (the same
        inputs as :meth:`apply`'s, a quarter of the memory, decoded in each minibatch's gather);
        anything else is :meth:`apply`'s floats."""
        if self.scale in PIXEL_SCALES and np.asarray(x).dtype == np.uint8:
            return Pixels(x, self.scale)
        return self.apply(x, dtype)

    def to_meta(self) -> dict:
        """JSON-able part (goes into the model file's meta under ``prep``)."""
        return {"scale": self.scale}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Array part (``prep/mean``, ``prep/std``), empty unless standardizing."""
        if self.scale != "standardize":
            return {}
        return {"prep/mean": self.mean, "prep/std": self.std}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Prep | None:
        """The preprocessing stored in a model file, or None when it holds none."""
        return cls.from_checkpoint(path, *checkpoint.read(path))

    @classmethod
    def from_checkpoint(cls, path, arrays: dict, meta: dict) -> Prep | None:
        """The preprocessing in the verified (arrays, meta) that :func:`checkpoint.read` gave for ``path``
        (None when it holds none)."""
        prep = meta.get("prep")
        if prep is None:
            return None
        if prep.get("scale") not in SCALE_MODES:
            raise checkpoint.CheckpointError(f"{path}: unknown preprocessing {prep!r}")
        if prep["scale"] != "standardize":
            return cls(prep["scale"])
        if "prep/mean" not in arrays or "prep/std" not in arrays:
            raise checkpoint.CheckpointError(f"{path}: standardize preprocessing without prep/mean, prep/std")
        return cls("standardize", arrays["prep/mean"], arrays["prep/std"])
