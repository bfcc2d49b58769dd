"""Numeric kernels: numba functions, each with a plain-numpy twin of the same signature."""
