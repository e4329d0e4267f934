"""Subcommands that show data, experiments and runs: ``experiment``, ``show-data``, ``report``.

Registered on the ``gpumlp`` parser by :func:`add_parsers`; each ``cmd_*`` takes the
parsed arguments and returns the exit code, like the commands of :mod:`gpumlp.cli`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def add_parsers(sub, add_common) -> None:
    """Add ``experiment``, ``show-data`` and ``report`` to the subparsers ``sub``;
    ``add_common(parser)`` adds the shared --backend/--precision/--data-dir flags."""
    from gpumlp.cli import NONNEG_INT, POS_FLOAT, POS_INT
    from gpumlp.experiment import DATASETS

    ex = sub.add_parser("experiment", help="the seed texts' experiments (experiment nonlinear --help)")
    ex.add_argument("name", choices=["nonlinear"], help="nonlinear: linear vs nonlinear models on 2-D data")
    ex.add_argument("--dataset", choices=list(DATASETS), default="circles", help="toy data (default circles)")
    ex.add_argument("--n", type=POS_INT, default=400, help="training points (and as many test points)")
    ex.add_argument("--noise", type=_nonneg_float, default=None, help="noise (default: the generator's)")
    ex.add_argument("--hidden", type=POS_INT, default=16, help="hidden units (default 16)")
    ex.add_argument("--epochs", type=POS_INT, default=150)
    ex.add_argument("--lr", type=POS_FLOAT, default=0.02, help="Adam learning rate")
    ex.add_argument("--seed", type=NONNEG_INT, default=0)
    ex.add_argument("--backend", default="numpy", help="compute backend (default numpy: tiny models)")
    ex.add_argument("--out", default=".", help="directory for nonlinear_<dataset>.png and .json")
    sd = sub.add_parser("show-data", help="MNIST sample grids: one per class, N variants of one digit")
    sd.add_argument("--digit", type=_digit, default=7, help="the class shown N times (default 7)")
    sd.add_argument("--n", type=POS_INT, default=25, help="how many variants (default 25)")
    sd.add_argument("--augment-shift", type=POS_INT, default=2, help="shift of the augmented copies (px)")
    sd.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of the shifts")
    sd.add_argument("--out", default=".", help="directory for samples.png and variants_<digit>.png")
    sd.add_argument("--data-dir", default=None, help="directory holding the four MNIST IDX files")
    rp = sub.add_parser("report", help="one self-contained HTML page for a training run")
    rp.add_argument("run_dir", help="a 'gpumlp train --out' directory")
    rp.add_argument("--html", default=None, help="output file (default RUN_DIR/report.html)")
    add_common(rp)


def _nonneg_float(text: str) -> float:
    from gpumlp.cli import NONNEG_FLOAT

    return NONNEG_FLOAT(text)


def _digit(text: str) -> int:
    """A class 0..9."""
    if not (text.isdigit() and 0 <= int(text) <= 9):
        raise argparse.ArgumentTypeError(f"{text!r} is not a digit 0..9")
    return int(text)


def cmd_experiment(args: argparse.Namespace) -> int:
    """``gpumlp experiment nonlinear``: the accuracy table on stdout, figure and JSON in --out."""
    from gpumlp.experiment import run_nonlinear
    from gpumlp.plots import plot_nonlinear, require_matplotlib

    require_matplotlib()  # fail before training, not after
    result = run_nonlinear(
        args.dataset, n=args.n, noise=args.noise, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
        backend=args.backend, seed=args.seed,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_nonlinear(result, out / f"nonlinear_{args.dataset}.png")
    (out / f"nonlinear_{args.dataset}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    print(
        f"{args.dataset}: {args.n} training points, 2-{args.hidden}-K networks, {args.epochs} epochs of Adam"
    )
    print(result.table())
    print(f"figure: {figure}")
    return 0


def cmd_show_data(args: argparse.Namespace) -> int:
    """``gpumlp show-data``: samples.png (one per class) and variants_<digit>.png."""
    from gpumlp.cli import load_data
    from gpumlp.kernels import reference
    from gpumlp.plots import plot_samples, plot_variants, require_matplotlib

    require_matplotlib()
    mnist = load_data(args)  # MNIST, or the --data-dir given
    x, y = mnist.x_train, mnist.y_train
    out = Path(args.out)
    samples = plot_samples(x, y, out / "samples.png", "MNIST training set: the first sample of each class")
    idx = np.flatnonzero(y == args.digit)[: args.n].astype(np.int32)
    pixels = x.reshape(len(x), -1).astype(np.float32)
    shifted = reference.gather_shifted(pixels, idx, args.augment_shift, args.seed)
    panels = {"as stored": pixels[idx], f"shifted by up to {args.augment_shift} px": shifted}
    title = f"{len(idx)} training images of the digit {args.digit}"
    variants = plot_variants(panels, out / f"variants_{args.digit}.png", title)
    print(f"samples: {samples}")
    print(f"variants: {variants}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``gpumlp report RUN_DIR``: RUN_DIR/report.html (or --html), every image embedded."""
    from gpumlp.html_report import write_report

    path = write_report(args.run_dir, args.html, backend=args.backend, data_dir=args.data_dir)
    print(f"report: {path}")
    return 0


COMMANDS = {"experiment": cmd_experiment, "show-data": cmd_show_data, "report": cmd_report}
