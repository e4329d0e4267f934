"""``python -m gpumlp.bench``: see :func:`gpumlp.bench.main`."""

import sys

from gpumlp.bench import main

sys.exit(main())
