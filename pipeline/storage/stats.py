"""Per-dimension latent statistics, computed with dask over the store's chunks (its dask view,
`LatentStore.dask_latents`).

Accumulation is float64 and chunk by chunk, so the numbers stay right for stores bigger than
memory and for float16 latents (whose sums would overflow or lose precision in their own dtype).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from revq_pipe.pipeline.errors import UserError

if TYPE_CHECKING:
    import dask.array as da


def latent_stats(*arrays: da.Array) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std of every latent dimension over all rows of the (N, C, H, W) dask
    arrays together (a store's latents, and its flipped latents when it has them): two (C*H*W,)
    float32 arrays."""
    if sum(array.shape[0] for array in arrays) == 0:
        raise UserError("cannot compute statistics of an empty latent store")
    import dask.array as da  # here: half a second of imports that only finishing a store needs

    flat = da.concatenate([array.reshape(array.shape[0], -1) for array in arrays]).astype(np.float64)
    mean, sq_mean = da.compute(flat.mean(axis=0), (flat * flat).mean(axis=0))
    # E[x^2] - E[x]^2 in float64 is exact enough for latents; clip tiny negative round-off.
    std = np.sqrt(np.maximum(sq_mean - mean * mean, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)
