"""``gpumlp search``: grid, random and coarse-to-fine hyper-parameter search from the command line,
with successive halving, on local processes or a Dask cluster.

The space comes from ``--param NAME=SPEC`` flags and/or a JSON/TOML file (``--space``). A SPEC is
a list of choices ``adam,sgd`` / ``64,128-64`` (hidden widths joined by ``-``), or a range
``log:1e-4:1e-1``, ``uniform:0:0.5``, ``int:32:256``. In a file, choices are lists and ranges are
tables: ``{"lr": {"log": [1e-4, 1e-1]}, "optimizer": ["adam", "sgd"]}``. Names are MLP or fit
keywords (``lr``, ``optimizer``, ``batch_size``, ``act``, ``dropout``, ...) or ``hidden``.

Successive halving (``--halving``) trains every configuration for a small number of epochs, keeps
the best 1/eta, multiplies the epochs by eta, and repeats up to ``--epochs``: the worst trials stop
early. Results: a table on stdout; with ``--out DIR``: results.csv, results.json and
parallel.png (parallel coordinates, needs matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from gpumlp.search import RANGE_KINDS, coarse_to_fine

EXTRA_KEYS = ("hidden",)


def add_args(p: argparse.ArgumentParser) -> None:
    """The ``search`` subcommand's flags."""
    from gpumlp.cli_data import add_data_args, hidden_widths
    from gpumlp.presets import PRESETS, SCALE_MODES

    s = p.add_argument_group("search")
    s.add_argument(
        "--param", action="append", default=[], metavar="NAME=SPEC", help="a dimension (repeatable)"
    )
    s.add_argument("--space", metavar="FILE", help="the space as JSON or TOML")
    s.add_argument("--method", choices=("random", "grid"), default="random")
    s.add_argument("--trials", type=int, default=10, help="random configurations per round (default 10)")
    s.add_argument("--rounds", type=int, default=1, help="coarse-to-fine rounds (random search)")
    s.add_argument("--shrink", type=float, default=0.3, help="range kept around the best each round")
    s.add_argument("--halving", action="store_true", help="successive halving: stop the worst trials early")
    s.add_argument(
        "--eta", type=int, default=3, help="halving keeps 1/eta of the trials per rung (default 3)"
    )
    s.add_argument("--min-epochs", type=int, default=1, help="epochs of the first halving rung")
    s.add_argument("--workers", type=int, help="parallel trials (default: one per GPU, or per 2 CPU cores)")
    s.add_argument("--dask", metavar="local|tcp://HOST:PORT", help="run trials on a Dask cluster")
    s.add_argument("--out", help="write results.csv, results.json, parallel.png here")
    s.add_argument("--seed", type=int, default=0, help="seed of the random search and of every trial")
    b = p.add_argument_group("fixed settings of every trial (default: the preset's)")
    b.add_argument("--preset", choices=list(PRESETS), default="fast")
    b.add_argument("--hidden", type=hidden_widths, help="hidden widths, e.g. 256,128")
    b.add_argument("--epochs", type=int, help="epochs per trial (the last halving rung)")
    b.add_argument("--batch-size", type=int)
    b.add_argument("--optimizer")
    b.add_argument("--lr", type=float)
    b.add_argument("--act")
    b.add_argument("--scale", choices=SCALE_MODES)
    b.add_argument("--valid", type=int, help="validation rows from the end of the train set")
    b.add_argument("--limit", type=int, help="use the first N training samples only")
    b.add_argument("--backend", default=None, help="compute backend of every trial (default: auto)")
    add_data_args(p, test_split=False)
    p.add_argument("--quiet", action="store_true", help="only the results table")
    p.add_argument("--verbose", action="store_true", help="also third-party logs")


# ------------------------------------------------------------------ the space
def _value(text: str):
    """'3' -> 3, '0.1' -> 0.1, 'true' -> True, else the text."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return {"true": True, "false": False}.get(text.lower(), text)


def parse_param(item: str) -> tuple[str, object]:
    """``NAME=SPEC`` -> (name, list of choices or (kind, lo, hi))."""
    name, sep, spec = item.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"--param {item!r}: expected NAME=SPEC, e.g. lr=log:1e-4:1e-1 or optimizer=adam,sgd")
    kind, _, rest = spec.partition(":")
    if kind in RANGE_KINDS:
        bounds = rest.split(":")
        if len(bounds) != 2:
            raise ValueError(f"--param {item!r}: a range is {kind}:LO:HI")
        lo, hi = (_value(v) for v in bounds)
        return name, (kind, lo, hi)
    choices = [_value(v) for v in spec.split(",")]
    if name == "hidden":
        choices = [[int(w) for w in str(c).split("-")] for c in choices]
    return name, choices


def read_space_file(path: str) -> dict:
    """A space from JSON or TOML: lists are choices, ``{kind: [lo, hi]}`` tables are ranges."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"--space {path}: cannot read it ({e.strerror or e})") from None
    try:
        if p.suffix.lower() == ".toml":
            raw = _toml().loads(text)
        else:
            raw = json.loads(text)
    except ValueError as e:
        raise ValueError(
            f"--space {path}: not valid {p.suffix.lstrip('.').upper() or 'JSON'} ({e})"
        ) from None
    space = {}
    for name, spec in raw.items():
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in RANGE_KINDS:
            kind, (lo, hi) = next(iter(spec.items()))
            space[name] = (kind, lo, hi)
        elif isinstance(spec, list):
            space[name] = spec
        else:
            raise ValueError(
                f'--space {path}: {name!r} must be a list of choices or e.g. {{"log": [lo, hi]}}'
            )
    return space


def _toml():
    """tomllib (Python 3.11+), else the tomli backport."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError(
                "a TOML --space needs Python 3.11+ or 'pip install tomli'; or use JSON"
            ) from None
    return tomllib


def build_space(args: argparse.Namespace) -> dict:
    """The search space of --space and --param (flags win), with its names checked."""
    from gpumlp.model import MLP
    from gpumlp.train import fit

    space = read_space_file(args.space) if args.space else {}
    space.update(parse_param(item) for item in args.param)
    if not space:
        raise ValueError("nothing to search: give --param NAME=SPEC (e.g. lr=log:1e-4:1e-1) or --space FILE")
    known = {*inspect.signature(MLP.__init__).parameters, *inspect.signature(fit).parameters, *EXTRA_KEYS}
    unknown = sorted(set(space) - known - {"self", "model", "X", "y", "backend"})
    if unknown:
        raise ValueError(f"unknown hyper-parameters {unknown}: use MLP or fit keyword names, or 'hidden'")
    return space


# ------------------------------------------------------------------ running trials
def successive_halving(trials, configs: list[dict], base: dict, eta: int, min_epochs: int, log) -> list[dict]:
    """Train every config for few epochs, keep the best 1/eta, multiply the epochs by eta, repeat up to
    ``base['epochs']``. Returns every trial (with its ``rung``), best of the last rung first."""
    max_epochs = int(base["epochs"])
    rungs = max(1, int(math.floor(math.log(max(max_epochs / max(min_epochs, 1), 1), eta))) + 1)
    epochs = max(1, int(round(max_epochs / eta ** (rungs - 1))))
    done: list[dict] = []
    for rung in range(rungs):
        ep = max_epochs if rung == rungs - 1 else epochs
        log(f"rung {rung + 1}/{rungs}: {len(configs)} trial(s) of {ep} epoch(s)")
        results = run_all(trials, configs, {**base, "epochs": ep}, log)
        for r in results:
            r["rung"] = rung + 1
        done += results
        keep = max(1, len(configs) // eta)
        configs = [r["params"] for r in results[:keep]]
        epochs *= eta
        if len(results) == 1:
            break
    last = max(t["rung"] for t in done)
    return sorted(done, key=lambda t: (-(t["rung"] == last), -t["valid_acc"]))


def run_all(trials, configs: list[dict], base: dict, log) -> list[dict]:
    """Run ``configs`` on ``trials`` (all submitted at once); results best first."""
    futures = [trials.submit(c, base) for c in configs]
    results = []
    for f in futures:
        r = f.result()
        r["epochs_budget"] = base["epochs"]
        log(f"trial {_show(r['params'])}: valid {100 * r['valid_acc']:.2f}% ({r['seconds']:.1f}s)")
        results.append(r)
    return sorted(results, key=lambda t: -t["valid_acc"])


def search_rounds(trials, space: dict, base: dict, args: argparse.Namespace, log) -> list[dict]:
    """Grid or random search, refined coarse to fine over ``args.rounds``, each round optionally halved.
    -> the full-budget trials best first, then those stopped early."""

    def run(configs: list[dict]) -> list[dict]:
        if args.halving:
            return successive_halving(trials, configs, base, args.eta, args.min_epochs, log)
        return run_all(trials, configs, base, log)

    all_trials = coarse_to_fine(
        space, run, method=args.method, n_trials=args.trials, rounds=args.rounds, shrink=args.shrink,
        seed=args.seed,
    )  # fmt: skip
    final = [t for t in all_trials if t["epochs_budget"] == base["epochs"]]
    return sorted(final, key=lambda t: -t["valid_acc"]) + [t for t in all_trials if t not in final]


# ------------------------------------------------------------------ data and base config
def trial_data(args: argparse.Namespace):
    """(X, y, X_valid, y_valid) preprocessed as training would, and the base config of every trial."""
    from gpumlp.cli import load_data
    from gpumlp.cli_data import model_spec
    from gpumlp.data import split_train_valid
    from gpumlp.presets import Prep, fit_kwargs, get_preset

    config = get_preset(args.preset)
    data = load_data(args, seed=args.seed)
    x, y = data.x_train[: args.limit], data.y_train[: args.limit]
    n_valid = args.valid if args.valid is not None else min(config["data"]["valid"], len(x) // 10)
    if not 0 < n_valid < len(x):
        raise ValueError(
            f"--valid {n_valid}: the search needs validation rows, fewer than the {len(x)} samples"
        )
    x_tr, y_tr, x_va, y_va = split_train_valid(x, y, n_valid)
    scale = args.scale or (config["data"]["scale"] if data.pixels else "standardize")
    prep = Prep.fit(x_tr, scale)
    spec = model_spec(None, args.hidden, config["model"]["spec"], data.n_features, len(data.classes))
    base = {**config["model"], "spec": spec, **fit_kwargs(config), "seed": args.seed}
    for key in ("epochs", "batch_size", "optimizer", "lr", "act"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.optimizer is not None and args.lr is None and args.optimizer != config["fit"]["optimizer"]:
        from gpumlp.cli_data import usual_lr

        base["lr"] = usual_lr(args.optimizer, base["reduction"], base["batch_size"])
    base["backend"] = args.backend
    arrays = (prep.training_input(x_tr), y_tr, prep.apply(x_va), y_va)  # codes: a quarter of the bytes
    return arrays, base, data


# ------------------------------------------------------------------ output
def _show(params: dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "-".join(map(str, v))
    return str(v)


def table(results: list[dict], names: list[str]) -> str:
    """The trials as an aligned text table, best first."""
    head = ["rank", "valid %", "epochs", "seconds", *names]
    rows = [
        [str(i + 1), f"{100 * t['valid_acc']:.2f}", str(t["epochs"]), f"{t['seconds']:.1f}"]
        + [_fmt(t["params"].get(n)) for n in names]
        for i, t in enumerate(results)
    ]
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows])


def write_results(out: Path, results: list[dict], names: list[str], space: dict, plot: bool) -> list[Path]:
    """results.csv, results.json and (when matplotlib is installed) parallel.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cols = ["valid_acc", "epochs", "seconds", "rung", "round", "backend"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*names, *cols])
        for t in results:
            w.writerow([_fmt(t["params"].get(n)) for n in names] + [t.get(c, "") for c in cols])
    body = {"best": results[0], "trials": results, "space": {k: list(v) for k, v in space.items()}}
    (out / "results.json").write_text(json.dumps(body, indent=2, default=str) + "\n")
    written = [out / "results.csv", out / "results.json"]
    if plot:
        written.append(plot_parallel(results, names, space, out / "parallel.png"))
    return written


def plot_parallel(results: list[dict], names: list[str], space: dict, path: Path) -> Path:
    """Parallel coordinates: one axis per hyper-parameter (log axes for log ranges, choices spread
    evenly) and validation accuracy last; one line per trial, coloured by accuracy."""
    from gpumlp.plots import pyplot

    plt = pyplot()

    axes_vals = []
    for n in names:
        spec = space[n]
        vals = [t["params"][n] for t in results]
        if isinstance(spec, tuple):
            v = np.array(vals, dtype=float)
            v = np.log10(v) if spec[0] == "log" else v
            lo, hi = (np.log10(spec[1]), np.log10(spec[2])) if spec[0] == "log" else (spec[1], spec[2])
        else:
            labels = [_fmt(c) for c in spec]
            v = np.array([labels.index(_fmt(x)) for x in vals], dtype=float)
            lo, hi = 0, max(len(spec) - 1, 1)
        axes_vals.append((v - lo) / ((hi - lo) or 1))
    acc = np.array([t["valid_acc"] for t in results])
    axes_vals.append((acc - acc.min()) / ((acc.max() - acc.min()) or 1))
    fig, ax = plt.subplots(figsize=(1.8 * (len(names) + 1) + 1, 4))
    cmap = plt.get_cmap("viridis")
    for i in range(len(results)):
        ax.plot(range(len(axes_vals)), [a[i] for a in axes_vals], color=cmap(axes_vals[-1][i]), alpha=0.8)
    ax.set_xticks(
        range(len(axes_vals)), [*(f"log10 {n}" if _is_log(space[n]) else n for n in names), "valid acc"]
    )
    ax.set_yticks([])
    ax.set_title(f"{len(results)} trials, best {100 * acc.max():.2f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _is_log(spec) -> bool:
    return isinstance(spec, tuple) and spec[0] == "log"


# ------------------------------------------------------------------ entry point
def run(args: argparse.Namespace) -> int:
    """Run the search the flags describe; print the table; write the result files."""
    from gpumlp.backend import get_backend
    from gpumlp.distribute import DaskTrials, LocalTrials, default_workers
    from gpumlp.search import trial_gpus

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"gpumlp: {msg}", file=sys.stderr, flush=True)

    space = build_space(args)
    arrays, base, data = trial_data(args)
    base_backend = get_backend(args.backend).name
    workers = args.workers or default_workers(base_backend)
    t0 = time.perf_counter()
    trials = (
        DaskTrials(arrays, args.dask, workers)
        if args.dask
        else LocalTrials(arrays, workers, trial_gpus(base_backend))
    )
    try:
        log(
            f"searching {_show_space(space)} on {len(arrays[1])} samples of {data.source}, "
            f"{trials.description}"
        )
        results = search_rounds(trials, space, base, args, log)
        if args.dask:
            log(f"training data scattered to the workers {trials.scatter_count()} time(s)")
    finally:
        trials.close()
    names = list(space)
    print(table(results, names))
    best = results[0]
    print(f"best: {_show(best['params'])} valid accuracy {100 * best['valid_acc']:.2f}%")
    print(f"trials: {len(results)}, seconds: {time.perf_counter() - t0:.1f}")
    if args.out:
        plot = _have_matplotlib()
        for path in write_results(Path(args.out), results, names, space, plot):
            print(f"wrote {path}")
    return 0


def _show_space(space: dict) -> str:
    return ", ".join(f"{k} {':'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in space.items())


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
