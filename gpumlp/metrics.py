"""Classification metrics on host arrays of integer class ids.

Pure NumPy, no scikit-learn. Conventions: the confusion matrix has true
classes as rows and predicted classes as columns; a ratio whose denominator
is zero (no predictions of a class, no samples of a class) is 0, silently.
"""

from __future__ import annotations

import numpy as np


def _labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Validate two 1-D integer label arrays of equal length -> (y_true, y_pred) int64."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise ValueError(f"labels must be 1-D arrays of class ids, got shapes {t.shape} and {p.shape}")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.shape[0]} labels but y_pred has {p.shape[0]}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and a.dtype.kind not in "iub":
            raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
    return t.astype(np.int64, copy=False), p.astype(np.int64, copy=False)


def accuracy(y_true, y_pred) -> float:
    """Fraction of samples whose predicted class equals the true class (0.0 for no samples)."""
    t, p = _labels(y_true, y_pred)
    return float((t == p).mean()) if t.size else 0.0


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """(K, K) int64 counts: entry [i, j] = samples of true class i predicted as class j."""
    t, p = _labels(y_true, y_pred)
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name} has class ids outside 0..{n_classes - 1}: min {a.min()}, max {a.max()}")
    flat = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den == 0, without warnings."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def precision_recall_f1(y_true, y_pred, n_classes: int) -> dict:
    """Per-class ``precision``, ``recall``, ``f1`` (K,) float64 arrays and ``support`` (K,) int64,
    plus ``macro_precision``, ``macro_recall``, ``macro_f1`` (unweighted means over classes) and
    ``accuracy``. Zero divisions give 0."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = cm.sum()
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support.astype(np.int64),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "accuracy": float(tp.sum() / total) if total else 0.0,
    }


def classification_report(y_true, y_pred, n_classes: int, digits: int = 4, names=None) -> str:
    """A readable table: one row per class (precision, recall, f1, support), then accuracy and macro avg.
    ``names``: the classes' labels for the rows (default 0..n_classes-1)."""
    m = precision_recall_f1(y_true, y_pred, n_classes)
    names = [str(c) for c in (range(n_classes) if names is None else names)]
    width = max(len("macro avg"), *map(len, names))
    col = max(digits + 3, 9)
    head = f"{'':>{width}} " + "".join(f"{h:>{col}}" for h in ("precision", "recall", "f1-score", "support"))
    lines = [head, ""]
    for c in range(n_classes):
        vals = (m["precision"][c], m["recall"][c], m["f1"][c])
        lines.append(_row(names[c], vals, int(m["support"][c]), width, col, digits))
    n = int(m["support"].sum())
    lines.append("")
    lines.append(
        f"{'accuracy':>{width}} " + f"{'':>{2 * col}}" + f"{m['accuracy']:>{col}.{digits}f}{n:>{col}}"
    )
    macro = (m["macro_precision"], m["macro_recall"], m["macro_f1"])
    lines.append(_row("macro avg", macro, n, width, col, digits))
    return "\n".join(lines)


def _row(name: str, vals: tuple, support: int, width: int, col: int, digits: int) -> str:
    """One aligned report line."""
    return f"{name:>{width}} " + "".join(f"{v:>{col}.{digits}f}" for v in vals) + f"{support:>{col}}"
