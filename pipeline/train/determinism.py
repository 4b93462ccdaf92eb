"""Bit-for-bit reproducible training on the CPU.

The guarantee: on the CPU, two `fit` runs with the same arguments, the same torch build and the
same number of torch threads (torch.get_num_threads(), at any value) write bit-identical weights,
and a run killed and resumed writes the weights of the uninterrupted run. Runs with different
thread counts agree only to float32 rounding: matrix products and reductions split their sums by
thread count.

What it takes: torch's deterministic algorithms. Without them, the codebooks' gradient (indexing's
backward, an accumulating index_put_) adds duplicate codes' contributions in the order threads
reach them, and two runs at two threads drifted apart by ~1e-6. GPUs get no such promise
(atomics in fused kernels, bf16 autocast, compilation): the flag stays off there, so CUDA runs keep
their fast kernels.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def deterministic_algorithms(*, warn_only: bool = False) -> Iterator[None]:
    """torch's deterministic algorithms for the block, restoring the caller's setting after; with
    `warn_only`, an op without a deterministic form warns instead of failing."""
    enabled, was_warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=was_warn_only)


def deterministic_on_cpu(device: torch.device) -> contextlib.AbstractContextManager:
    """Deterministic algorithms for the block when `device` is the CPU (warning where an op has no
    deterministic form); nothing on GPUs."""
    return deterministic_algorithms(warn_only=True) if device.type == "cpu" else contextlib.nullcontext()
