"""A whole training step as one CUDA graph (the `cuda-graph` step option).

A ReVQ step on CUDA is a few hundred kernel launches, most of them small (the rectifier's norms and
activations, the codebook update's bookkeeping); launched one by one from Python the GPU waits on
the host between them. Captured once as a CUDA graph, the step is replayed with one launch.

What capture needs, and where it comes from:
- static shapes and addresses: the batch is copied into one input buffer (training batches all
  have the batch size: the loader drops the last, partial one), and every tensor the step keeps
  between steps (codebooks, moments, counts, the rectifier's parameters and optimizer state) is
  updated in place;
- no host synchronisation and no host decision on device data inside the step: the search runs
  without its NaN/inf check (the trainer checks losses every few steps instead), the sparse
  codebook update runs as kernels that read the step count and learning rate from the device
  (`fused-adamw`), and the rectifier's AdamW is `capturable`;
- warm-up before capture: the first `WARMUP_STEPS` steps run eagerly, on a side stream as
  torch's documentation asks, which compiles the rectifier, autotunes the search kernel and
  creates the optimizer states; they are ordinary training steps of the run.
Values the host computes from Python numbers (the rectifier's learning rate) are frozen into the
graph, so the trainer drops the graph when an epoch changes them, and the next step captures
again (a few milliseconds once per epoch). Capture does not run the step: it is replayed once
right after.
"""

from __future__ import annotations

from typing import Callable

import torch

# Eager steps before the first capture: the compiled rectifier's first call compiles, its second
# may recompile once for a changed guard; the third runs as captured steps will.
WARMUP_STEPS = 3


class CapturedStep:
    """`step(z) -> losses` run eagerly for WARMUP_STEPS calls, then captured and replayed."""

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor]):
        self.step = step
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: torch.Tensor | None = None
        self.static_losses: torch.Tensor | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= WARMUP_STEPS:
            return self._eager_on_side_stream(z)
        if self.graph is None:
            self._capture(z)
        else:
            self.static_batch.copy_(z)
        self.graph.replay()
        return self.static_losses.clone()  # the next replay overwrites the static output

    def invalidate(self) -> None:
        """Drop the graph (and its memory): the next call captures again with the host's new values."""
        self.graph = self.static_losses = None

    def _eager_on_side_stream(self, z: torch.Tensor) -> torch.Tensor:
        side = torch.cuda.Stream(device=z.device)
        side.wait_stream(torch.cuda.current_stream(z.device))
        with torch.cuda.stream(side):
            losses = self.step(z)
        torch.cuda.current_stream(z.device).wait_stream(side)
        return losses

    def _capture(self, z: torch.Tensor) -> None:
        if self.static_batch is None or self.static_batch.shape != z.shape:
            self.static_batch = z.clone()
        else:
            self.static_batch.copy_(z)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's prefetch thread may copy the next batches meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_losses = self.step(self.static_batch)
        self.graph = graph
