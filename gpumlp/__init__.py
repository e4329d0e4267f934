"""gpumlp: multilayer perceptrons on NumPy, Numba and CuPy with one training loop."""

from gpumlp.backend import Backend, BackendUnavailable, get_backend
from gpumlp.model import MLP

__version__ = "0.1.0"
__all__ = ["MLP", "MLPClassifier", "Backend", "BackendUnavailable", "get_backend", "__version__"]


def __getattr__(name: str):
    """``gpumlp.MLPClassifier`` on first use: importing scikit-learn is slow and optional."""
    if name == "MLPClassifier":
        from gpumlp.estimator import MLPClassifier

        return MLPClassifier
    raise AttributeError(f"module 'gpumlp' has no attribute {name!r}")
