"""How the codebooks start: distinct random samples of the store's tokens, optionally refined by k-means.

`random` (the paper's way): code k of every position is that position's token in the k-th of K
distinct random latents. `kmeans` (the default): the same start, then Lloyd iterations per position
on a larger random sample (the first K rows of the sample are the random init's), each assignment
step one `kernels.nearest_code` call on the training device. Its searches are bounded by
`kmeans_budget` times the store's latents, well under one epoch of training (`kmeans_plan`). Both draw from
the `codebook_init` random stream only.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from revq_pipe.kernels import nearest_code
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.reporting.console import progress_bar
from revq_pipe.pipeline.seeds import stream_generator
from revq_pipe.pipeline.train.config import TrainConfig
from revq_pipe.pipeline.train.loader import LatentLoader

# The k-means sample: KMEANS_SAMPLES_PER_CODE latents per code, at most KMEANS_MAX_SAMPLES (64k
# DC-AE latents are 512 MiB in fp32), and at most the store; `kmeans_plan` fits it to its budget.
KMEANS_SAMPLES_PER_CODE = 16
KMEANS_MAX_SAMPLES = 1 << 16


def sample_rows(n: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct rows of a store of `n`, in the `codebook_init` stream's random order."""
    return torch.randperm(n, generator=stream_generator(seed, "codebook_init"))[:count].numpy()


def kmeans_plan(n: int, codes: int, iterations: int, budget: float) -> tuple[int, int]:
    """(sample, iterations): how many of a store's `n` latents k-means refines `codes` codes per
    position on, and in how many Lloyd iterations (at most `iterations`), so that it searches at
    most `budget` x n latents. A sample of at most `codes` leaves nothing to refine (the random
    init's K rows alone, each already its own code's mean): then k-means is skipped.

    How the bound follows: each iteration is one nearest-code search of the sample against every
    position's codebook (the sums and means after it cost O(sample x d), far less), and one more
    search measures the result, so k-means searches (iterations + 1) x sample latents. An epoch
    searches each of the n latents once and runs the rectifier forward and backward and both
    optimizers besides, which cost more than the search wherever it has been measured: on the CPU
    the demo's epoch took as long as 11 searches of its store, and on an H100 a 512T_NC=16384 step
    (27 ms) as long as 20 searches of its batch (1.3 ms). So `budget` 4 keeps k-means well under one
    epoch. The sample keeps its size (16 latents per code, at most 65,536 and the store) and the
    iterations give way first, since a few iterations on a good sample do more than many on a thin
    one (on the demo's store: 3 on all 2,048 crops beat 10 on 186); only when not even one fits does
    the sample shrink.
    """
    sample = min(KMEANS_SAMPLES_PER_CODE * codes, KMEANS_MAX_SAMPLES, n)
    searches = int(budget * n)
    fitting = min(iterations, searches // sample - 1)
    if fitting >= 1:
        return sample, fitting
    return min(sample, searches // 2), 1


@torch.no_grad()
def lloyd_(codebooks: torch.Tensor, x: torch.Tensor, iterations: int, *, progress: bool = False) -> list[float]:
    """Refine (T, K, d) codebooks in place with Lloyd iterations on (T, S, d) samples, per position.

    Each code moves to the mean of the samples nearest to it; a code no sample chose stays where it
    is (the epoch-end reset handles codes that stay unused). Returns the sample's mean squared
    distance to its nearest code before each iteration and after the last. `progress` shows a bar.
    """
    t, k, d = codebooks.shape
    offsets = torch.arange(t, device=x.device)[:, None] * k
    history = []
    with progress_bar(progress, total=iterations, desc="k-means", leave=False) as bar:
        for _ in range(iterations):
            counts = torch.zeros(t, k, dtype=torch.int64, device=x.device)
            ids, distances = nearest_code(x, codebooks, counts=counts)
            history.append(distances.mean().item() / d)
            sums = torch.zeros(t * k, d, dtype=torch.float32, device=x.device)
            sums.index_add_(0, (ids + offsets).reshape(-1), x.reshape(-1, d).float())
            chosen = counts.reshape(-1) > 0
            means = sums[chosen] / counts.reshape(-1)[chosen, None]
            codebooks.view(-1, d)[chosen] = means.to(codebooks.dtype)
            bar.update(1)
    _, distances = nearest_code(x, codebooks)
    history.append(distances.mean().item() / d)
    return history


def init_codebooks(model: ReVQ, loader: LatentLoader, train: TrainConfig, *, progress: bool = False) -> str | None:
    """Set the model's codebooks as `train.codebook_init` says, from the loader's store, and return
    the line that reports it (None for "random"). Code k of every position starts as its token in
    the k-th of K distinct random latents; with "kmeans", Lloyd iterations on a larger sample (whose
    first K rows are those) refine them, with a progress bar on `progress`."""
    started = time.perf_counter()
    k, kmeans = model.config.codes, train.codebook_init == "kmeans"
    samples, iterations = kmeans_plan(loader.n, k, train.kmeans_iters, train.kmeans_budget) if kmeans else (k, 0)
    rows = sample_rows(loader.n, max(samples, k), train.seed)
    with torch.no_grad():
        tokens = model.splitter.split(model.preprocessor.normalize(loader.rows(rows)))  # (S, T, d)
    model.quantizer.init_from_tokens(tokens[:k])
    if not kmeans:
        return None
    budget = f"budget {train.kmeans_budget:g} x {loader.n:,}"
    if samples <= k:
        return (f"k-means init skipped: one iteration within the searches of its {budget} latents leaves a "
                f"sample of {samples}, no more than the {k} codes (a larger `kmeans_budget` allows one)")
    mse = lloyd_(model.codebooks.data, tokens.transpose(0, 1).contiguous(), iterations, progress=progress)
    return (f"k-means init: {iterations} iterations on {samples:,} latents ({samples / k:.1f} per code; "
            f"{(iterations + 1) * samples:,} searched, {budget}): quantizer MSE on them {mse[0]:.4g} -> "
            f"{mse[-1]:.4g}, {time.perf_counter() - started:.1f} s")
