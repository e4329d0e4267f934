"""Command-line output a person or a CI log can read.

gpumlp's own messages go to stderr as ``gpumlp: ...`` lines, flushed. Progress
bars only on a terminal; elsewhere one plain line per epoch. Third-party chatter
(matplotlib's font cache, dask's INFO logs) is silenced unless ``--verbose``, and
warnings print as one ``gpumlp: warning: ...`` line without a source path.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

QUIET, NORMAL, VERBOSE = 0, 1, 2
_LEVEL = [NORMAL]  # the level of the last setup(), for silence_third_party()
_THIRD_PARTY = ("matplotlib", "PIL", "numba", "distributed", "tornado", "asyncio", "bokeh")


def verbosity(quiet: bool = False, verbose: bool = False) -> int:
    """QUIET, NORMAL or VERBOSE from the ``--quiet``/``--verbose`` flags."""
    return QUIET if quiet else VERBOSE if verbose else NORMAL


def setup(level: int = NORMAL) -> None:
    """Route gpumlp's loggers to stderr at ``level`` and silence third-party chatter."""
    from gpumlp.data.mnist import cache_root

    # matplotlib builds its font cache under MPLCONFIGDIR: keep it in our cache so it is built once.
    if not os.environ.get("MPLCONFIGDIR"):
        os.environ["MPLCONFIGDIR"] = str(cache_root() / "matplotlib")
    root = logging.getLogger("gpumlp")
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gpumlp: %(message)s"))
    root.addHandler(handler)
    root.propagate = False
    root.setLevel({QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}[level])
    _LEVEL[0] = level
    silence_third_party()
    if level < VERBOSE:
        warnings.showwarning = _one_line_warning
    if level == QUIET:
        warnings.simplefilter("ignore")


def silence_third_party() -> None:
    """Third-party loggers at ERROR (INFO with --verbose); call again after a library that sets its
    own levels on import (dask.distributed) is imported."""
    for name in _THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.INFO if _LEVEL[0] == VERBOSE else logging.ERROR)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``gpumlp: warning: Category: message`` on stderr (no source path or code line)."""
    text = " ".join(str(message).split())
    print(f"gpumlp: warning: {category.__name__}: {text}", file=sys.stderr, flush=True)


def progress_bar_wanted(no_progress: bool, level: int) -> bool:
    """A tqdm bar only on an interactive terminal, not with --no-progress or --quiet."""
    return not no_progress and level > QUIET and sys.stderr.isatty()
