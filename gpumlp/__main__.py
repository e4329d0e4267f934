"""``python -m gpumlp`` and the ``gpumlp`` console script (``run``)."""

import sys


def run() -> int:
    """Import the CLI and run it; Ctrl-C while NumPy/Numba are still loading exits 130 quietly."""
    try:
        from gpumlp.cli import main
    except KeyboardInterrupt:
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
