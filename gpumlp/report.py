"""PNG reports: training curves, misclassified digits, confusion matrix.

matplotlib is optional (the ``plot`` extra) and imported only when a plot is
drawn, always with the non-interactive Agg backend, so nothing here needs a
display and ``import gpumlp.report`` never needs matplotlib.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PLOT_HINT = "pip install -e '.[plot]'"


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or a clear ImportError naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            f"plots need matplotlib, which is not installed; install it with: {PLOT_HINT}"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Write a figure as PNG (creating parent folders) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _records(history: dict) -> list[dict]:
    """The per-epoch records of a History.to_dict() (or a bare list of records)."""
    recs = history.get("records", []) if isinstance(history, dict) else list(history)
    if not recs:
        raise ValueError("history has no epoch records to plot")
    return recs


def plot_history(history: dict, path: str | os.PathLike) -> Path:
    """Cost and accuracy per epoch (train, and valid when recorded) side by side -> PNG at ``path``."""
    plt = _pyplot()
    recs = _records(history)
    epochs = [r["epoch"] for r in recs]
    fig, (ax_cost, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((ax_cost, "loss", "valid_loss", "cost"), (ax_acc, "train_acc", "valid_acc", "accuracy"))
    for ax, train_key, valid_key, label in panels:
        ax.plot(epochs, [r[train_key] for r in recs], marker=".", label="train")
        if all(valid_key in r for r in recs):
            ax.plot(epochs, [r[valid_key] for r in recs], marker=".", label="valid")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_cost.set_title("cost per sample")
    ax_acc.set_title("accuracy")
    return _save(fig, path)


def plot_misclassified(X, y_true, y_pred, path: str | os.PathLike, n: int = 25) -> Path:
    """Up to ``n`` misclassified 28x28 images of X (N, 784) in a square grid titled "t: 7 p: 2" -> PNG."""
    plt = _pyplot()
    X, y_true, y_pred = np.asarray(X), np.asarray(y_true), np.asarray(y_pred)
    if X.ndim != 2 or X.shape[1] != 784:
        raise ValueError(f"plot_misclassified needs (N, 784) images of 28x28 digits, got shape {X.shape}")
    wrong = np.flatnonzero(y_true != y_pred)[:n]
    side = max(1, int(np.ceil(np.sqrt(n))))
    fig, axes = plt.subplots(side, side, figsize=(1.6 * side, 1.8 * side))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, i in zip(np.ravel(axes), wrong):
        ax.imshow(X[i].reshape(28, 28), cmap="gray_r")
        ax.set_title(f"t: {y_true[i]} p: {y_pred[i]}", fontsize=9)
    fig.suptitle(f"{len(wrong)} misclassified" + ("" if len(wrong) else " (none)"))
    return _save(fig, path)


def plot_confusion(cm, path: str | os.PathLike) -> Path:
    """Confusion matrix (rows true, columns predicted) as an annotated heat map -> PNG."""
    plt = _pyplot()
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {cm.shape}")
    k = cm.shape[0]
    fig, ax = plt.subplots(figsize=(0.6 * k + 2, 0.6 * k + 1.5))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title="confusion matrix")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(k):
        for j in range(k):
            color = "white" if cm[i, j] > threshold else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
    return _save(fig, path)
