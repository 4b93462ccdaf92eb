"""Triton kernels and their dispatch (Triton on CUDA, bounded-memory torch on CPU)."""

from revq_pipe.kernels.nearest_code import NonFiniteError, nearest_code

__all__ = ["NonFiniteError", "nearest_code"]
