"""``python -m gpumlp``: the same as the ``gpumlp`` console script."""

import sys

from gpumlp.cli import main

if __name__ == "__main__":
    sys.exit(main())
