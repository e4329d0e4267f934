"""Kernel modules (installed as gpumlp.kernels): how to compute, one module per backend."""
