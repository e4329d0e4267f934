"""Plots as PNG files: training curves, misclassified digits, confusion matrix.

matplotlib is optional (the ``plot`` extra) and imported only when a plot is
drawn, always with the non-interactive Agg backend, so nothing here needs a
display and ``import gpumlp.plots`` never needs matplotlib.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PLOT_HINT = "pip install -e '.[plot]'"


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or a one-line ImportError naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            f"plots need matplotlib, which is not installed; install it with: {PLOT_HINT}"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raise the ImportError naming the ``plot`` extra now (before a long run) if matplotlib is missing."""
    pyplot()


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG at ``path`` (creating parent folders), close it -> the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return path


def _records(history: dict) -> list[dict]:
    """The per-epoch records of a History.to_dict() (or a bare list of records)."""
    recs = history.get("records", []) if isinstance(history, dict) else list(history)
    if not recs:
        raise ValueError("history has no epoch records to plot")
    return recs


def plot_history(history: dict, path: str | os.PathLike) -> Path:
    """Cost and accuracy per epoch (train, and valid when recorded) side by side -> PNG at ``path``."""
    plt = pyplot()
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
    return save_png(fig, path)


def plot_misclassified(X, y_true, y_pred, path: str | os.PathLike, n: int = 25) -> Path:
    """Up to ``n`` misclassified 28x28 images of X (N, 784) in a square grid titled "t: 7 p: 2" -> PNG."""
    plt = pyplot()
    X, y_true, y_pred = np.asarray(X), np.asarray(y_true), np.asarray(y_pred)
    if X.ndim != 2 or X.shape[1] != 784:
        raise ValueError(f"plot_misclassified needs (N, 784) images of 28x28 digits, got shape {X.shape}")
    wrong = np.flatnonzero(y_true != y_pred)[:n]
    cols = max(1, int(np.ceil(np.sqrt(n))))
    fig = plt.figure(figsize=(1.6 * cols, 1.8 * cols))
    titles = [f"t: {y_true[i]} p: {y_pred[i]}" for i in wrong]
    title = f"{len(wrong)} misclassified" + ("" if len(wrong) else " (none)")
    _digit_grid(fig, X[wrong], titles, cols, title)
    return save_png(fig, path)


def plot_confusion(cm, path: str | os.PathLike) -> Path:
    """Confusion matrix (rows true, columns predicted) as an annotated heat map -> PNG."""
    plt = pyplot()
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
    return save_png(fig, path)


def plot_grad_norms(history: dict, path: str | os.PathLike) -> Path:
    """Each layer's RMS gradient norm per epoch (the ``grad_norms`` records), log scale -> PNG."""
    plt = pyplot()
    recs = _records(history)
    if not all("grad_norms" in r for r in recs):
        raise ValueError("history has no grad_norms; train with log_grad_norms=True (--log-grad-norms)")
    epochs = [r["epoch"] for r in recs]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in recs[0]["grad_norms"]:
        ax.semilogy(epochs, [r["grad_norms"][name] for r in recs], marker=".", label=name)
    ax.set(xlabel="epoch", ylabel="RMS gradient L2 norm per step", title="gradient norm per layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _digit_grid(fig, images, titles: list[str], cols: int, title: str) -> None:
    """Draw 28x28 images (N, 784) into ``fig`` (a figure or subfigure) as a grid of ``cols`` columns."""
    rows = max(1, -(-len(images) // cols))
    space = 0.35 if any(titles) else 0.05
    axes = np.atleast_1d(fig.subplots(rows, cols, gridspec_kw={"hspace": space, "wspace": 0.05})).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, t in zip(axes, images, titles):
        ax.imshow(np.asarray(img).reshape(28, 28), cmap="gray_r")
        ax.set_title(t, fontsize=8)
    fig.suptitle(title)


def plot_samples(X, y, path: str | os.PathLike, title: str = "one sample per class") -> Path:
    """The first image (N, 784) of every class in y, left to right by class -> PNG."""
    plt = pyplot()
    X, y = np.asarray(X), np.asarray(y)
    classes = np.unique(y)
    first = [int(np.flatnonzero(y == c)[0]) for c in classes]
    fig = plt.figure(figsize=(1.2 * len(classes), 1.7))
    _digit_grid(fig, X[first], [f"class {c}" for c in classes], len(classes), title)
    return save_png(fig, path)


def plot_variants(panels: dict[str, np.ndarray], path: str | os.PathLike, title: str) -> Path:
    """Side-by-side square grids, one per {panel title: images (N, 784)} -> PNG."""
    plt = pyplot()
    n = max(len(v) for v in panels.values())
    cols = max(1, int(np.ceil(np.sqrt(n))))
    fig = plt.figure(figsize=(1.1 * cols * len(panels) + 0.5, 1.1 * cols + 0.8))
    for sub, (name, images) in zip(np.atleast_1d(fig.subfigures(1, len(panels))), panels.items()):
        _digit_grid(sub, images, [""] * len(images), cols, name)
    fig.suptitle(title, y=1.04)
    return save_png(fig, path)


def plot_nonlinear(result, path: str | os.PathLike, resolution: int = 200) -> Path:
    """Decision boundaries of every variant of a :class:`gpumlp.experiment.NonlinearResult`
    side by side (training points on top), plus their loss curves -> PNG."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    X, y, k = result.X, result.y, int(result.y.max()) + 1
    lo, hi = X.min(axis=0) - 0.4, X.max(axis=0) + 0.4
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], resolution), np.linspace(lo[1], hi[1], resolution))
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    colors = plt.get_cmap("tab10").colors[:k]
    n_panels = len(result.variants) + 1
    cols = min(3, n_panels)
    rows = -(-n_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, v in zip(axes, result.variants):
        zone = v.predict(grid).reshape(gx.shape)
        ax.contourf(gx, gy, zone, levels=np.arange(k + 1) - 0.5, cmap=ListedColormap(colors), alpha=0.25)
        ax.contour(gx, gy, zone, levels=np.arange(k) + 0.5, colors="k", linewidths=0.8)
        ax.scatter(X[:, 0], X[:, 1], c=[colors[c] for c in y], s=8, edgecolors="k", linewidths=0.2)
        label = v.name if v.act == v.name else f"{v.name} ({v.act} activation)"
        ax.set_title(f"{label}: test {100 * v.test_acc:.1f}%", fontsize=10)
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xticks=[], yticks=[], aspect="equal")
    curves = axes[len(result.variants)]
    for v in result.variants:
        curves.semilogy(range(1, len(v.losses) + 1), v.losses, label=v.name)
    curves.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="convergence")
    curves.grid(alpha=0.3, which="both")
    curves.legend(fontsize=8)
    for ax in axes[n_panels:]:
        ax.axis("off")
    fig.suptitle(f"{result.dataset}: linear vs nonlinear models", fontsize=13)
    fig.tight_layout()
    return save_png(fig, path)
