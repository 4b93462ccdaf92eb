"""How the codebooks start: distinct random samples of the store's tokens, optionally refined by k-means.

`random` (the paper's way): code k of every position is that position's token in the k-th of K
distinct random latents. `kmeans`: the same start, then Lloyd iterations per position on a larger
random sample (the first K rows of the sample are the random init's), each assignment step one
`kernels.nearest_code` call on the training device, so it costs a few epochs' worth of search at most.
Both draw from the `codebook_init` random stream only.
"""

from __future__ import annotations

import numpy as np
import torch

from revq_pipe.kernels import nearest_code
from revq_pipe.pipeline.model.config import TrainConfig
from revq_pipe.pipeline.train.loader import LatentLoader
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.seeds import stream_generator

# The k-means sample: KMEANS_SAMPLES_PER_CODE latents per code, at most KMEANS_MAX_SAMPLES (64k
# DC-AE latents are 512 MiB in fp32), never fewer than K (each code needs a sample to start from).
KMEANS_SAMPLES_PER_CODE = 16
KMEANS_MAX_SAMPLES = 1 << 16


def sample_rows(n: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct rows of a store of `n`, in the `codebook_init` stream's random order."""
    return torch.randperm(n, generator=stream_generator(seed, "codebook_init"))[:count].numpy()


def kmeans_sample_size(n: int, codes: int) -> int:
    return min(n, max(codes, min(KMEANS_SAMPLES_PER_CODE * codes, KMEANS_MAX_SAMPLES)))


@torch.no_grad()
def lloyd_(codebooks: torch.Tensor, x: torch.Tensor, iterations: int) -> list[float]:
    """Refine (T, K, d) codebooks in place with Lloyd iterations on (T, S, d) samples, per position.

    Each code moves to the mean of the samples nearest to it; a code no sample chose stays where it
    is (the epoch-end reset handles codes that stay unused). Returns the sample's mean squared
    distance to its nearest code before each iteration and after the last.
    """
    t, k, d = codebooks.shape
    offsets = torch.arange(t, device=x.device)[:, None] * k
    history = []
    for _ in range(iterations):
        counts = torch.zeros(t, k, dtype=torch.int64, device=x.device)
        ids, distances = nearest_code(x, codebooks, counts=counts)
        history.append(distances.mean().item() / d)
        sums = torch.zeros(t * k, d, dtype=torch.float32, device=x.device)
        sums.index_add_(0, (ids + offsets).reshape(-1), x.reshape(-1, d).float())
        chosen = counts.reshape(-1) > 0
        means = sums[chosen] / counts.reshape(-1)[chosen, None]
        codebooks.view(-1, d)[chosen] = means.to(codebooks.dtype)
    _, distances = nearest_code(x, codebooks)
    history.append(distances.mean().item() / d)
    return history


def init_codebooks(model: ReVQ, loader: LatentLoader, train: TrainConfig) -> list[float] | None:
    """Set the model's codebooks as `train.codebook_init` says, from the loader's store. Code k of
    every position starts as its token in the k-th of K distinct random latents; with "kmeans",
    Lloyd iterations on a larger sample (whose first K rows are those) refine them, and the sample's
    quantizer MSE before each iteration and after the last is returned (None for "random")."""
    k = model.config.codes
    kmeans = train.codebook_init == "kmeans"
    rows = sample_rows(loader.n, kmeans_sample_size(loader.n, k) if kmeans else k, train.seed)
    with torch.no_grad():
        tokens = model.splitter.split(model.preprocessor.normalize(loader.rows(rows)))  # (S, T, d)
    model.quantizer.init_from_tokens(tokens[:k])
    if not kmeans:
        return None
    return lloyd_(model.codebooks.data, tokens.transpose(0, 1).contiguous(), train.kmeans_iters)
