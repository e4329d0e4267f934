"""gpumlp: multilayer perceptrons on NumPy, Numba and CuPy (and cuda-emu, CUDA emulated on the CPU)
with one training loop."""

__version__ = "0.1.0"
__all__ = ["MLP", "MLPClassifier", "Backend", "BackendUnavailable", "get_backend", "__version__"]


def __getattr__(name: str):
    """``gpumlp.MLP`` and the backend names, imported on first use: ``import gpumlp`` (and the
    CLI's start, where Ctrl-C must exit quietly) does not wait for NumPy and Numba to load."""
    if name == "MLP":
        from gpumlp.model import MLP

        return MLP
    if name == "MLPClassifier":  # importing scikit-learn is slow and optional
        from gpumlp.estimator import MLPClassifier

        return MLPClassifier
    if name in ("Backend", "BackendUnavailable", "get_backend"):
        from gpumlp import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'gpumlp' has no attribute {name!r}")
