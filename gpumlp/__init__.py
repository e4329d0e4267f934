"""gpumlp: multilayer perceptrons on NumPy, Numba and CuPy with one training loop."""

from gpumlp.backend import Backend, BackendUnavailable, get_backend

__version__ = "0.1.0"
__all__ = ["Backend", "BackendUnavailable", "get_backend", "__version__"]
