"""``python -m gpumlp`` and the ``gpumlp`` console script (``run``)."""

import os
import signal
import sys
import threading


def _exit_quietly(signum, frame) -> None:
    os._exit(130)  # nothing written yet; a KeyboardInterrupt in NumPy's C import becomes an ImportError


def run() -> int:
    """Import the CLI and run it; Ctrl-C while NumPy/Numba are still loading exits 130 quietly."""
    quiet = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    if quiet:
        signal.signal(signal.SIGINT, _exit_quietly)
    from gpumlp import rundir, train  # noqa: F401 - main()'s own imports, loaded while Ctrl-C is quiet
    from gpumlp.cli import main

    if quiet:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # main() reports Ctrl-C itself
    return main()


if __name__ == "__main__":
    sys.exit(run())
