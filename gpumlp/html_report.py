"""One self-contained HTML page per training run: ``gpumlp report RUN_DIR``.

Reads what ``gpumlp train --out RUN_DIR`` wrote (history.json, metrics.json, config.json,
model.npz), predicts the MNIST test set once more for the image grids, and writes a
single file: every figure is an embedded base64 PNG, the style is inline, there is no
script and no link, so the page opens offline and can be mailed as is.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from gpumlp import plots

_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 2px 8px; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .note { color: #666; }
"""


def _read_json(path: Path, what: str) -> dict:
    """A JSON file of the run, or a clear error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {what} (is this a 'gpumlp train --out' directory?)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _img(png: Path, alt: str) -> str:
    """An <img> with the PNG file embedded as base64."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str] | None, rows: list[list]) -> str:
    """An HTML table (no header row for None); numbers right-aligned (floats to 4 digits), all escaped."""

    def cell(v) -> str:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            text = f"{v:.4f}" if isinstance(v, float) else str(v)
            return f'<td class="num">{text}</td>'
        return f"<td>{html.escape(str(v))}</td>"

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _settings_table(config: dict) -> str:
    """Hyper-parameters: one row per (section, key) of the run's config."""
    rows = [[section, key, json.dumps(value)] for section in ("model", "fit", "data")
            for key, value in config.get(section, {}).items()]  # fmt: skip
    return _table(["section", "setting", "value"], [["", "preset", config.get("preset", "?")], *rows])


def _machine_table(metrics: dict) -> str:
    """Where the run trained (metrics.json ``machine``), or a note when the run did not record it."""
    machine = metrics.get("machine")
    if not machine:
        return '<p class="note">This run did not record its machine (written by an older gpumlp).</p>'
    return _table(
        None, [[key, json.dumps(v) if isinstance(v, (dict, list)) else v] for key, v in machine.items()]
    )


def _per_class_table(metrics: dict) -> str:
    keys = ("precision", "recall", "f1", "support")
    rows = [[c, *(metrics[k][c] for k in keys)] for c in range(len(metrics["support"]))]
    rows.append(
        [
            "macro",
            metrics["macro_precision"],
            metrics["macro_recall"],
            metrics["macro_f1"],
            sum(metrics["support"]),
        ]
    )
    return _table(["class", *keys], rows)


def _figures(run: Path, history: dict, metrics: dict, tmp: Path, backend, data_dir) -> dict[str, str]:
    """Section title -> embedded figure(s) HTML."""
    figs = {
        "Training curves": _img(plots.plot_history(history, tmp / "h.png"), "loss and accuracy per epoch")
    }
    if history["records"] and "grad_norms" in history["records"][-1]:
        figs["Gradient norm per layer"] = _img(
            plots.plot_grad_norms(history, tmp / "g.png"), "gradient norms"
        )
    figs["Confusion matrix (test set)"] = _img(
        plots.plot_confusion(metrics["confusion_matrix"], tmp / "c.png"), "confusion matrix"
    )
    model_path = run / "model.npz"
    if not model_path.is_file():
        figs["Test images"] = f'<p class="note">No {html.escape(str(model_path))}: no image grids.</p>'
        return figs
    from gpumlp.cli import load_data, load_model

    config = metrics.get("config", {})  # the run's own data set, unless data_dir overrides it
    source = {"data_dir": str(Path(data_dir).expanduser().absolute())} if data_dir else None
    source = source or config.get("data", {}).get("source", {})
    data = load_data(argparse.Namespace(), source, seed=config.get("fit", {}).get("seed", 0))
    if data.n_features != 784:  # the grids draw 28x28 digits
        figs["Test images"] = '<p class="note">The data are not 28x28 images: no image grids.</p>'
        return figs
    model, prep, _ = load_model(str(model_path), backend)
    y_pred = model.predict(prep.apply(data.x_test, model.dtype))
    x = data.x_test.reshape(len(data.x_test), -1)
    figs["Misclassified test images"] = _img(
        plots.plot_misclassified(x, data.y_test, y_pred, tmp / "m.png"), "misclassified digits"
    )
    figs["One test image per class"] = _img(
        plots.plot_samples(x, data.y_test, tmp / "s.png", "test set: the first sample of each class"),
        "samples",
    )
    return figs


def render(run_dir: str | os.PathLike, backend: str | None = None, data_dir: str | None = None) -> str:
    """The report of ``run_dir`` as one HTML string (images embedded)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist; pass a 'gpumlp train --out' directory")
    history = _read_json(run / "history.json", "the per-epoch history")
    metrics = _read_json(run / "metrics.json", "the test metrics")
    config = metrics.get("config") or _read_json(run / "config.json", "the run's settings")
    with tempfile.TemporaryDirectory() as tmp:
        figs = _figures(run, history, metrics, Path(tmp), backend, data_dir)
    last = history["records"][-1] if history["records"] else {}
    summary = [
        ["test accuracy", f"{100 * metrics['test_accuracy']:.2f} %"],
        ["epochs", metrics.get("epochs", len(history["records"]))],
        ["stopped because", history.get("stop_reason", "")],
        ["final training loss", last.get("loss", "")],
        ["train seconds", metrics.get("train_seconds", "")],
        ["backend", metrics.get("backend", "")],
        ["training samples", metrics.get("samples", "")],
    ]
    parts = [
        f"<h1>gpumlp run {html.escape(run.resolve().name)}</h1>",
        _table(None, summary),
        *(f"<h2>{html.escape(title)}</h2>{body}" for title, body in figs.items()),
        "<h2>Per-class precision, recall and F1 (test set)</h2>",
        _per_class_table(metrics),
        "<h2>Hyper-parameters</h2>",
        _settings_table(config),
        "<h2>Machine</h2>",
        _machine_table(metrics),
    ]
    title = html.escape(f"gpumlp run {run.resolve().name}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def write_report(
    run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, backend=None, data_dir=None
) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default RUN_DIR/report.html) -> its path."""
    page = render(run_dir, backend, data_dir)
    path = Path(out) if out else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def machine_summary(backend_name: str) -> dict:
    """A few cheap facts about this machine for metrics.json (no heavy imports)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from gpumlp.bench.machine import cpu_model

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": ver("numba"),
        "backend": backend_name,
    }
