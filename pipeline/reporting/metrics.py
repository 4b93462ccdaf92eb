"""Image quality numbers for evaluation: PSNR and SSIM from scikit-image.

Codebook usage and perplexity come from `revq_pipe.pipeline.model.revq.usage_stats`, shared with `fit`.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def image_psnr_ssim(originals: np.ndarray, reconstructions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of (N, H, W, 3) float images in [0, 1]: two (N,) arrays.

    Per image, so callers can average over any number of batches as image-tokenizer papers do (a
    dataset-wide PSNR would let a few flat images dominate).
    """
    if originals.shape != reconstructions.shape or originals.ndim != 4:
        raise ValueError(f"need two (N, H, W, 3) arrays of one shape, got {originals.shape} and {reconstructions.shape}")
    psnrs, ssims = [], []
    for original, recon in zip(originals.astype(np.float64), reconstructions.astype(np.float64)):
        psnrs.append(peak_signal_noise_ratio(original, recon, data_range=1.0))
        ssims.append(structural_similarity(original, recon, data_range=1.0, channel_axis=-1))
    return np.array(psnrs), np.array(ssims)
