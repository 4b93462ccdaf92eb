"""The ReVQ model: preprocessor -> splitter -> grouped quantizer -> rectifier, as one nn.Module.

    z (B, C, H, W) raw VAE latents
      -> normalise with the store's per-dimension mean/std          (Preprocessor)
      -> cut into T tokens of d numbers                             (TokenSplitter: channel or spatial)
      -> nearest code of each position's own codebook (T, K, d)     (GroupedQuantizer -> ids (B, T))
      -> codebook vectors merged back to (B, C, H, W)
      -> rectifier g, then un-normalise                             (-> raw latents)

`ReVQ.from_pretrained(run_dir or "user/repo")` loads a run written by `revq-pipe fit`, or one published
on the Hugging Face hub, in one call; `tokenize_images` / `detokenize_images` go from images to ids
and back through the VAE the model records.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from PIL import Image

from revq_pipe.kernels import nearest_code
from revq_pipe.pipeline.atomic_files import write_atomically
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.image_inputs import image_batch
from revq_pipe.pipeline.model.model_card import LIBRARY_NAME, TAGS, model_card
from revq_pipe.pipeline.images.pixels import vae_pixels
from revq_pipe.pipeline.model.rectifier import build_rectifier
from revq_pipe.pipeline.images.sources import to_model_input
from revq_pipe.pipeline.train.training_record import read_training_record, training_summary
from revq_pipe.pipeline.images.vae import hub_offline, hub_unreachable, resolve_vae
from revq_pipe.pipeline.model.weights import (CHECKSUM_KEY, checked_model_config, file_sha256, load_verified,
                                              read_config_file)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
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


class ReVQ(nn.Module, PyTorchModelHubMixin, library_name=LIBRARY_NAME, tags=list(TAGS)):
    """A ReVQ tokenizer: raw VAE latents <-> (B, T) token ids. Rebuilt from its `ReVQConfig`.

    Loads and saves as Hugging Face models do (`huggingface_hub.PyTorchModelHubMixin`):
    `ReVQ.from_pretrained("runs/512T")` or `ReVQ.from_pretrained("user/repo")`, `save_pretrained`,
    `push_to_hub("user/repo")` (config.json, model.safetensors and a model card).
    """

    def __init__(self, config: ReVQConfig):
        super().__init__()
        self.config = config
        self.preprocessor = Preprocessor(config.latent_shape)
        self.splitter = TokenSplitter(config.latent_shape, config.tokens, config.split)
        self.quantizer = GroupedQuantizer(config.tokens, config.codes, config.dim)
        self.rectifier = build_rectifier(config)
        # What the model card says about training (training_record.training_summary): filled when
        # the model is loaded from a run dir, or by whoever trained it.
        self.training_summary: dict[str, Any] = {}
        # The VAE a local run's training record names (a local folder config.json does not name).
        self.recorded_vae: str | None = None
        self._vaes: dict[tuple[str, str], Any] = {}  # loaded VAEs of the image API, by name and device

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

    # The image API: images -> the VAE's latents -> tokens, and back, in one call each.

    def tokenize_images(self, images: Any, *, vae: str | None = None, batch_size: int = 64) -> torch.Tensor:
        """Images (PIL images, paths, (3, H, W) / (B, 3, H, W) tensors in [0, 1] or uint8) -> (B, T)
        int64 token ids: preprocessed as `revq-pipe encode` does (RGB, resize, centre crop to the
        model's image size), encoded by the VAE, tokenized. `vae` defaults to the one the model records."""
        frozen = self.vae(vae)
        pixels = image_batch(images, self.config.image_size or frozen.spec.default_image_size)
        ids = []
        for start in range(0, len(pixels), batch_size):
            batch = to_model_input(pixels[start:start + batch_size].to(frozen.device))
            ids.append(self.tokenize(frozen.encode(batch)))
        return torch.cat(ids)

    def detokenize_images(self, ids: torch.Tensor, *, vae: str | None = None, batch_size: int = 64,
                          output_type: str = "pil") -> list[Image.Image] | np.ndarray:
        """(B, T) token ids -> images through the rectifier and the VAE decoder: a list of PIL images,
        or with `output_type="np"` one (B, S, S, 3) uint8 array."""
        if output_type not in ("pil", "np"):
            raise UserError(f"output_type must be 'pil' or 'np', not {output_type!r}")
        latents = self.detokenize_batched(torch.as_tensor(ids).cpu().numpy(), batch_size)
        pixels = vae_pixels(self.vae(vae), latents, batch_size)
        return pixels if output_type == "np" else [Image.fromarray(image) for image in pixels]

    def vae(self, name: str | None = None):
        """The frozen VAE of the image API (loaded once, on the model's device): `name` (a hub id, a
        local diffusers folder, `revq-pipe-embedded`) or else the VAE the model records."""
        name = name or self.config.vae or self.recorded_vae
        if name is None:
            raise UserError("this model does not record its VAE (it was trained on latents of a local "
                            "VAE folder): pass vae=<that folder or hub id>")
        key = (name, str(self.device))  # a model moved to another device loads the VAE there too
        if key not in self._vaes:
            spec = resolve_vae(name)
            if self.config.image_size and spec.latent_shape(self.config.image_size) != self.config.latent_shape:
                raise UserError(f"the VAE {name} makes latents of shape {spec.latent_shape(self.config.image_size)}, "
                                f"this model tokenizes {self.config.latent_shape}")
            self._vaes[key] = spec.load(self.device)
        return self._vaes[key]

    # Hugging Face: save_pretrained / from_pretrained / push_to_hub (the mixin's, with these parts).

    def save_pretrained(self, save_directory: str | Path, *, config: Any = None,
                        model_card_kwargs: dict[str, Any] | None = None, **unused: Any) -> None:
        """Write model.safetensors, config.json (the architecture) and README.md (the model card,
        regenerated every time so it describes these weights), each atomically: a crash leaves the
        previous complete file or the new one."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(directory)
        card = self.generate_model_card(**(model_card_kwargs or {}))
        write_atomically(directory / CARD_NAME, lambda tmp: card.save(tmp))

    def _save_pretrained(self, save_directory: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        weights = save_directory / WEIGHTS_NAME
        write_atomically(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        # The weights' sha256 beside the architecture: loading refuses a file changed anywhere (weights.py).
        text = json.dumps({**self.config.to_dict(), CHECKSUM_KEY: file_sha256(weights)}, indent=2) + "\n"
        write_atomically(save_directory / CONFIG_NAME, lambda tmp: tmp.write_text(text))

    def generate_model_card(self, *args: Any, repo_id: str | None = None, **kwargs: Any):
        return model_card(self.config, self.training_summary, repo_id=repo_id)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload config.json, model.safetensors and the model card to the hub repo `repo_id` (the
        run's training record, with its local paths, stays here)."""
        kwargs["model_card_kwargs"] = {"repo_id": repo_id, **(kwargs.get("model_card_kwargs") or {})}
        return super().push_to_hub(repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, device: str | torch.device | None = None,
                        **kwargs: Any) -> "ReVQ":
        """Load a run dir (config.json + model.safetensors) or a hub model `user/repo` (downloaded
        into, or read offline from, the Hugging Face cache), in eval mode on `device` (default CPU)."""
        from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

        name = str(pretrained_model_name_or_path)
        if os.path.isdir(name) and os.path.isfile(os.path.join(name, CONFIG_NAME)):
            read_config_file(Path(name) / CONFIG_NAME)  # a damaged one is refused before the hub mixin reads it
        if not os.path.isdir(name):
            if name.startswith((".", "/", "~")) or os.path.exists(name):
                raise UserError(f"{name} is not a ReVQ run directory")
            if not hub_offline() and hub_unreachable():
                kwargs["local_files_only"] = True  # the cache only, instead of the hub client's retries
        try:
            return super().from_pretrained(name, device=device, **kwargs)
        except (HFValidationError, LocalEntryNotFoundError, HfHubHTTPError) as err:
            raise UserError(f"{name} is neither a run directory nor a ReVQ model on the Hugging Face hub "
                            f"(or in its cache): {str(err).splitlines()[0]}") from err

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         config: dict[str, Any] | None = None, device: str | torch.device | None = None,
                         **unused: Any) -> "ReVQ":
        from revq_pipe.pipeline.device import resolve_device

        if config is None:
            raise UserError(f"{model_id} is not a ReVQ run: it has no config.json")
        if os.path.isdir(model_id):
            weights = Path(model_id) / WEIGHTS_NAME
            if not weights.is_file():
                raise UserError(f"{model_id} has no {WEIGHTS_NAME}: the run has not finished an epoch yet")
        else:
            weights = Path(hf_hub_download(model_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                                           force_download=force_download, local_files_only=local_files_only,
                                           token=token))
        state = load_verified(weights, config.get(CHECKSUM_KEY))
        # Checked against the weights before the model is built: config.json may have been edited.
        model = cls(checked_model_config(config, {name: tuple(t.shape) for name, t in state.items()},
                                         Path(model_id) / CONFIG_NAME))
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"{weights} does not match the config.json beside it: {err}") from err
        if os.path.isdir(model_id):
            model.training_summary = training_summary(model_id)
            model.recorded_vae = (read_training_record(model_id).get("data") or {}).get("revq", {}).get("vae")
        if device is not None:
            model.to(resolve_device(device) if isinstance(device, str) else device)
        return model.eval()
