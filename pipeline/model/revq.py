"""The ReVQ model: preprocessor -> splitter -> grouped quantizer -> rectifier, as one nn.Module.

    z (B, C, H, W) raw VAE latents
      -> normalise with the store's per-dimension mean/std          (Preprocessor)
      -> cut into T tokens of d numbers                             (TokenSplitter: channel or spatial)
      -> nearest code of each position's own codebook (T, K, d)     (GroupedQuantizer -> ids (B, T))
      -> codebook vectors merged back to (B, C, H, W)
      -> rectifier g, then un-normalise                             (-> raw latents)

`ReVQ.from_pretrained(run_dir or "user/repo")` loads a run written by `revq-pipe fit`, or one published
on the Hugging Face hub, in one call. This module holds tensors only: saving, loading and
publishing are its hub mixin's (pipeline/model/hub_mixin.py), and images go through the VAE to ids
and back in `ReVQImageTokenizer` (pipeline/images/image_tokenizer.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from revq_pipe.kernels import nearest_code
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.model.hub_mixin import ReVQHubMixin
from revq_pipe.pipeline.model.rectifier import build_rectifier

# Dimensions whose std is ~0 in the store (constant latents) would divide by zero; this floor keeps
# them finite and near zero after normalisation.
MIN_STD = 1e-5


class Preprocessor(nn.Module):
    """Per-dimension standardisation with the latent store's mean/std (both (C*H*W,) buffers)."""

    def __init__(self, latent_shape: tuple[int, int, int]):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        numel = math.prod(latent_shape)
        self.register_buffer("mean", torch.zeros(numel))
        self.register_buffer("std", torch.ones(numel))

    @torch.no_grad()
    def set_stats(self, mean: np.ndarray | torch.Tensor, std: np.ndarray | torch.Tensor) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(MIN_STD))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return ((z.flatten(1) - self.mean) / self.std).view_as(z)

    def denormalize(self, zn: torch.Tensor) -> torch.Tensor:
        return (zn.flatten(1) * self.std + self.mean).view_as(zn)


class TokenSplitter(nn.Module):
    """Cuts a (B, C, H, W) latent into (B, T, d) tokens and merges them back.

    `channel` (the paper's multi-group split): flatten channel-major (C, H, W) and cut into T
    consecutive runs of d, so a token lies inside one channel's map whenever d divides H*W.
    `spatial` (the ablation): flatten position-major (H, W, C) and cut the same way, so a token holds
    the channels at one position (d = C), a slice of them (d < C) or several positions (d > C).
    """

    def __init__(self, latent_shape: tuple[int, int, int], tokens: int, split: str = "channel"):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.tokens = tokens
        self.dim = math.prod(latent_shape) // tokens
        self.split_kind = split

    def split(self, z: torch.Tensor) -> torch.Tensor:
        if self.split_kind == "spatial":
            z = z.permute(0, 2, 3, 1)
        return z.reshape(z.shape[0], self.tokens, self.dim)

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        c, h, w = self.latent_shape
        if self.split_kind == "spatial":
            return tokens.reshape(-1, h, w, c).permute(0, 3, 1, 2).contiguous()
        return tokens.reshape(-1, c, h, w)


class GroupedQuantizer(nn.Module):
    """One codebook of K codes of dim d per token position: `codebooks` (T, K, d)."""

    def __init__(self, tokens: int, codes: int, dim: int):
        super().__init__()
        self.codebooks = nn.Parameter(torch.randn(tokens, codes, dim))

    @torch.no_grad()
    def search(self, x: torch.Tensor, counts: torch.Tensor | None = None, *, check_finite: bool = True) -> torch.Tensor:
        """Nearest code (squared L2, ties to the lowest index) of each (B, T, d) token -> (B, T) int64.

        `counts` (T, K) int, when given, is incremented in place with the chosen codes' histogram.
        `check_finite=False` skips the search's NaN/inf check (a device sync per call on CUDA).
        """
        ids, _ = nearest_code(x.transpose(0, 1), self.codebooks.detach(), counts=counts,
                              check_finite=check_finite)
        return ids.t()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) code ids -> (B, T, d) code vectors; differentiable in the codebooks."""
        positions = torch.arange(self.codebooks.shape[0], device=ids.device)
        return self.codebooks[positions, ids]

    @torch.no_grad()
    def init_from_tokens(self, tokens: torch.Tensor) -> None:
        """Codebooks from a sample of data: `tokens` (K, T, d), one distinct sample per code."""
        self.codebooks.copy_(tokens.transpose(0, 1))

    @torch.no_grad()
    def reset_unused(self, counts: torch.Tensor, *, ratio: float, noise: float,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-Activation Reset: move never-chosen codes onto the most-chosen ones plus Gaussian noise.

        Per position at most `ratio` of the K codes move (at least one); the i-th least used dead
        code lands on the i-th most used code. Returns the moved codes as (positions, code ids).
        """
        t, k, d = self.codebooks.shape
        r = max(int(ratio * k), 1)
        order = torch.sort(counts, dim=1, descending=True, stable=True).indices
        n_dead = (counts == 0).sum(dim=1, keepdim=True)
        moved = torch.arange(r, device=counts.device)[None, :] < n_dead.clamp(max=r)
        src, dst = order[:, :r], order[:, k - r:].flip(1)
        rows = torch.arange(t, device=counts.device)[:, None].expand(t, r)
        rows, src, dst = rows[moved], src[moved], dst[moved]
        jitter = torch.randn(len(dst), d, device=self.codebooks.device, generator=generator)
        self.codebooks[rows, dst] = self.codebooks[rows, src] + noise * jitter
        return rows, dst


def usage_stats(counts: torch.Tensor) -> dict[str, float]:
    """Codebook usage from (T, K) activation counts: % of codes chosen at least once (mean and min
    over positions) and code perplexity (exp of each position's entropy, averaged over positions)."""
    counts = counts.double()
    used = (counts > 0).double().mean(dim=1) * 100
    p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=1)
    return {"usage_mean_pct": used.mean().item(), "usage_min_pct": used.min().item(),
            "perplexity": entropy.exp().mean().item()}


@torch.no_grad()
def latent_metrics(model: "ReVQ", batches: Iterable[torch.Tensor], *,
                   sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Quantize-then-rectify quality over batches of raw latents: the latent MSE in the model's
    normalised space (the one training minimises) and raw, the same two for the quantizer alone
    (codebook vectors, no rectifier: what the rectifier must beat), plus code usage and perplexity
    (`usage_stats`). fit's per-epoch validation and `revq-pipe eval` both report these numbers.

    When each of several processes holds part of the batches, `sum_over_processes` (summing a tensor
    over them, in place) turns the squared-error sums, element counts and code counts into the
    whole set's before any mean is taken."""
    counts = torch.zeros(model.config.tokens, model.config.codes, dtype=torch.int64, device=model.device)
    # rows: rectified normalised, rectified raw, quantizer-only normalised, quantizer-only raw
    squared_errors = torch.zeros(4, dtype=torch.float64, device=model.device)
    numel = 0
    for z in batches:
        zn = model.preprocessor.normalize(z)
        ids = model.quantizer.search(model.splitter.split(zn), counts)
        quantized = model.splitter.merge(model.quantizer.lookup(ids))
        for row, reconstruction in ((0, model.rectifier(quantized)), (2, quantized)):
            squared_errors[row] += (reconstruction - zn).square().sum(dtype=torch.float64)
            squared_errors[row + 1] += (model.preprocessor.denormalize(reconstruction) - z).square().sum(
                dtype=torch.float64)
        numel += z.numel()
    if sum_over_processes is not None:
        sum_over_processes(squared_errors)
        sum_over_processes(counts)
        numel = int(sum_over_processes(torch.tensor(numel, dtype=torch.int64, device=model.device)))
    normalised, raw, quantizer_normalised, quantizer_raw = (squared_errors / max(numel, 1)).tolist()
    return {"latent_mse_normalised": normalised, "latent_mse": raw,
            "quantizer_mse_normalised": quantizer_normalised, "quantizer_mse": quantizer_raw, **usage_stats(counts)}


class ReVQ(nn.Module, ReVQHubMixin):
    """A ReVQ tokenizer: raw VAE latents <-> (B, T) token ids. Rebuilt from its `ReVQConfig`.

    Loads and saves as Hugging Face models do (`ReVQHubMixin`, a `PyTorchModelHubMixin`):
    `ReVQ.from_pretrained("runs/512T")` or `ReVQ.from_pretrained("user/repo")`, `save_pretrained`,
    `push_to_hub("user/repo")` (config.json, model.safetensors and a model card). Images in and out
    through the VAE: `ReVQImageTokenizer(model)`.
    """

    def __init__(self, config: ReVQConfig):
        super().__init__()
        self.config = config
        self.preprocessor = Preprocessor(config.latent_shape)
        self.splitter = TokenSplitter(config.latent_shape, config.tokens, config.split)
        self.quantizer = GroupedQuantizer(config.tokens, config.codes, config.dim)
        self.rectifier = build_rectifier(config)
        # What the model card says about training, and the VAE a local run's training record names
        # (config.json does not name a local folder): the hub mixin fills them when it loads a run
        # dir; whoever trains the model fills the summary.
        self.training_summary: dict[str, Any] = {}
        self.recorded_vae: str | None = None

    @property
    def codebooks(self) -> nn.Parameter:
        """(T, K, d) codebooks, in normalised latent space."""
        return self.quantizer.codebooks

    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    def _check_latents(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[1:]) != self.config.latent_shape or z.ndim != 4:
            raise UserError(f"latents of shape {tuple(z.shape)} do not match this model's (B, "
                            f"{', '.join(map(str, self.config.latent_shape))})")
        return z.to(self.device, torch.float32)

    @torch.no_grad()
    def tokenize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, C, H, W) -> (B, T) int64 token ids (normalise, split, nearest code).

        int64 whatever a token store holds (uint16/uint32), so the ids go straight into
        `nn.Embedding`, `cross_entropy` or arithmetic; no autograd graph is built."""
        zn = self.preprocessor.normalize(self._check_latents(z))
        return self.quantizer.search(self.splitter.split(zn))

    def dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> quantized latents (B, C, H, W) in normalised space, before the rectifier."""
        ids = ids.to(self.device, torch.int64)
        if ids.ndim != 2 or ids.shape[1] != self.config.tokens:
            raise UserError(f"token ids of shape {tuple(ids.shape)} do not match this model's (B, {self.config.tokens})")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.codes):
            raise UserError(f"token ids must lie in [0, {self.config.codes}): these come from another model")
        return self.splitter.merge(self.quantizer.lookup(ids))

    @torch.no_grad()
    def detokenize(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> raw VAE latents (B, C, H, W): codebook lookup, merge, rectifier, un-normalise."""
        return self.preprocessor.denormalize(self.rectifier(self.dequantize(ids)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Quantize-then-rectify of raw latents: `detokenize(tokenize(z))`."""
        return self.detokenize(self.tokenize(z))

    # Batched forms for arrays that may not fit on the device at once (a store's chunk, a whole
    # store): `batch_size` rows go to the model's device at a time, and results come back as numpy.

    def tokenize_batched(self, latents: np.ndarray, batch_size: int) -> np.ndarray:
        """(N, C, H, W) raw latents of any float dtype -> (N, T) int64 token ids."""
        return self._batched(self.tokenize, latents, np.float32, batch_size, (self.config.tokens,), np.int64)

    def detokenize_batched(self, ids: np.ndarray, batch_size: int) -> np.ndarray:
        """(N, T) token ids of any integer dtype -> (N, C, H, W) float32 raw latents."""
        return self._batched(self.detokenize, ids, np.int64, batch_size, self.config.latent_shape, np.float32)

    def forward_batched(self, latents: np.ndarray, batch_size: int) -> np.ndarray:
        """(N, C, H, W) raw latents -> their quantize-then-rectify reconstruction, float32."""
        return self._batched(self, latents, np.float32, batch_size, self.config.latent_shape, np.float32)

    @torch.inference_mode()
    def _batched(self, step, rows: np.ndarray, in_dtype, batch_size: int, row_shape: tuple[int, ...],
                 out_dtype) -> np.ndarray:
        outputs = [step(torch.from_numpy(np.asarray(rows[start:start + batch_size], dtype=in_dtype))).cpu().numpy()
                   for start in range(0, len(rows), batch_size)]
        if not outputs:
            return np.zeros((0, *row_shape), out_dtype)
        return np.concatenate(outputs).astype(out_dtype, copy=False)
