"""gpumlp: multilayer perceptrons on NumPy, Numba and CuPy with one training loop."""

from gpumlp.backend import Backend, BackendUnavailable, get_backend
from gpumlp.model import MLP

__version__ = "0.1.0"
__all__ = ["MLP", "Backend", "BackendUnavailable", "get_backend", "__version__"]
