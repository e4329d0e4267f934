"""Data sets: the MNIST IDX reader, loader, cache and download; preprocessing; images kept as
8-bit codes; toy 2-D sets."""

from gpumlp.data.idx import DataError, read_idx
from gpumlp.data.mnist import DEFAULT_MIRRORS, MNIST, load_mnist
from gpumlp.data.pixels import Pixels
from gpumlp.data.preprocess import scale_pixels, split_train_valid, standardize
from gpumlp.data.toy import make_circles, make_moons, make_spirals, make_xor

__all__ = [
    "DEFAULT_MIRRORS",
    "MNIST",
    "Pixels",
    "DataError",
    "load_mnist",
    "make_circles",
    "make_moons",
    "make_spirals",
    "make_xor",
    "read_idx",
    "scale_pixels",
    "split_train_valid",
    "standardize",
]
