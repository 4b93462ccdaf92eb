"""Independent random streams for training (and export-tokens' shuffled order), all derived from one `--seed`.

Each purpose draws from its own stream, `numpy.random.SeedSequence(seed).spawn`'s child for that
purpose, and per-epoch streams are that child's own children (SeedSequence with the spawn key
(purpose, epoch)). So no two purposes ever share a seed: the codebooks' initial sample is not the
first batch of epoch 0, and the reset noise of epoch e is not the data order of epoch e + 1, as
happened when every purpose seeded `torch.manual_seed` from `seed` plus a small offset.
"""

from __future__ import annotations

import numpy as np
import torch

# The order is part of the streams' definition (it is the spawn key): append, never reorder.
STREAMS = ("codebook_init", "data_order", "reset_noise", "rectifier_init", "export_order")


def stream_seed(seed: int, stream: str, *index: int) -> int:
    """A 63-bit seed for `stream` (optionally per epoch or other index) derived from `seed`."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}: one of {', '.join(STREAMS)}")
    sequence = np.random.SeedSequence(seed, spawn_key=(STREAMS.index(stream), *index))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def stream_generator(seed: int, stream: str, *index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded from `stream_seed`."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream, *index))
