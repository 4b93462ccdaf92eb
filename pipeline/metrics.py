"""Quality numbers for evaluation: image PSNR/SSIM (scikit-image) and codebook usage statistics."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def psnr_ssim(originals: np.ndarray, reconstructions: np.ndarray) -> tuple[float, float]:
    """Mean per-image PSNR (dB) and SSIM of (N, H, W, 3) float images in [0, 1].

    Per image, then averaged, as image-tokenizer papers report them (a dataset-wide PSNR would let
    a few flat images dominate).
    """
    if originals.shape != reconstructions.shape or originals.ndim != 4:
        raise ValueError(f"need two (N, H, W, 3) arrays of one shape, got {originals.shape} and {reconstructions.shape}")
    psnrs, ssims = [], []
    for original, recon in zip(originals.astype(np.float64), reconstructions.astype(np.float64)):
        psnrs.append(peak_signal_noise_ratio(original, recon, data_range=1.0))
        ssims.append(structural_similarity(original, recon, data_range=1.0, channel_axis=-1))
    return float(np.mean(psnrs)), float(np.mean(ssims))


class CodeUsage:
    """Counts how often each code of each token position is chosen, over any number of batches."""

    def __init__(self, tokens: int, codes: int, device: torch.device | str = "cpu"):
        self.tokens, self.codes = tokens, codes
        # One flat (T*K,) histogram: position t's code k sits at t*K + k.
        self.counts = torch.zeros(tokens * codes, dtype=torch.int64, device=device)
        self._offsets = torch.arange(tokens, device=device) * codes

    def update(self, ids: torch.Tensor) -> None:
        """Add a (B, T) batch of token ids."""
        flat = (ids.to(self.counts.device) + self._offsets).reshape(-1)
        self.counts.index_add_(0, flat, torch.ones_like(flat))

    def usage(self) -> float:
        """Fraction of all T*K codes chosen at least once."""
        return float((self.counts > 0).double().mean())

    def perplexity(self) -> float:
        """exp(entropy) of each position's code distribution, averaged over positions.

        K means every code is used equally often; 1 means one code takes everything.
        """
        counts = self.counts.view(self.tokens, self.codes).double()
        probs = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(dim=1)
        return float(torch.exp(entropy).mean())

    def summary(self) -> dict[str, float]:
        return {"usage": self.usage(), "perplexity": self.perplexity()}
