"""``njit`` for the Numba kernels: ``numba.njit``, caching compiled code on disk only where it can.

Where Numba can write no cache (a read-only install, no writable ``NUMBA_CACHE_DIR`` or home
cache), ``numba.njit(cache=True)`` raises ``RuntimeError: cannot cache function`` at import;
then the kernels compile in memory every run, after one warning line.
"""

from __future__ import annotations

import logging

import numba


def _cache_probe() -> int:
    return 0


def _caching_works() -> bool:
    """Whether Numba can cache functions of this directory's modules on disk (warns once if not)."""
    try:
        numba.njit(cache=True)(_cache_probe)
    except RuntimeError as e:  # numba: "cannot cache function ...: no locator available for file ..."
        logging.getLogger("gpumlp").warning(
            "warning: numba cannot cache compiled kernels (%s); compiling them afresh each run "
            "(set NUMBA_CACHE_DIR to a writable directory to cache them)",
            " ".join(str(e).split()),
        )
        return False
    return True


CACHE_OK = _caching_works()


def njit(*args, cache: bool = False, **kwargs):
    """``numba.njit``; ``cache=True`` caches on disk only where that works (see the module docstring)."""
    return numba.njit(*args, cache=cache and CACHE_OK, **kwargs)
