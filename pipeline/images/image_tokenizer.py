"""Images to token ids and back in one call each: a ReVQ model and the frozen VAE its latents came from.

    tokenizer = ReVQImageTokenizer.from_pretrained("runs/512T")    # or ReVQImageTokenizer(model, vae=...)
    ids = tokenizer.tokenize_images(["photo.jpg", pil, tensor])   # (B, T) int64
    images = tokenizer.detokenize_images(ids)                     # PIL images

Images are preprocessed exactly as `revq-pipe encode` does it (pipeline/images/image_inputs.py) and
decoded as `revq-pipe decode --images` does it (pipeline/images/pixels.py), so the ids equal what
encode then export-tokens would have written, and the images what decode would have saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.image_inputs import image_batch
from revq_pipe.pipeline.images.pixels import vae_pixels
from revq_pipe.pipeline.images.sources import to_model_input
from revq_pipe.pipeline.images.vae import FrozenVae, resolve_vae
from revq_pipe.pipeline.model.revq import ReVQ

OUTPUT_TYPES = ("pil", "np")


class ReVQImageTokenizer:
    """A ReVQ model with its VAE: images -> the VAE's latents -> (B, T) token ids, and back.

    `vae` (a hub id, a local diffusers folder, `revq-pipe-embedded`) defaults to the VAE the model
    records. It is loaded on first use, once per device: a model moved to another device gets the
    VAE loaded there too.
    """

    def __init__(self, model: ReVQ, vae: str | None = None):
        self.model = model
        self.vae_name = vae or model.config.vae or model.recorded_vae
        if self.vae_name is None:
            raise UserError("this model does not record its VAE (it was trained on latents of a local "
                            "VAE folder): pass vae=<that folder or hub id>")
        self._vaes: dict[str, FrozenVae] = {}  # by device

    @classmethod
    def from_pretrained(cls, name: str | Path, *, vae: str | None = None, device: str | torch.device | None = None,
                        **kwargs: Any) -> "ReVQImageTokenizer":
        """The model of a run dir or hub id `name` (`ReVQ.from_pretrained`) with its VAE, or `vae`."""
        return cls(ReVQ.from_pretrained(name, device=device, **kwargs), vae=vae)

    @property
    def vae(self) -> FrozenVae:
        """The frozen VAE, on the model's device (loaded there on first use)."""
        device = self.model.device
        if str(device) not in self._vaes:
            config = self.model.config
            spec = resolve_vae(self.vae_name)
            if config.image_size and spec.latent_shape(config.image_size) != config.latent_shape:
                raise UserError(f"the VAE {self.vae_name} makes latents of shape "
                                f"{spec.latent_shape(config.image_size)}, this model tokenizes {config.latent_shape}")
            self._vaes[str(device)] = spec.load(device)
        return self._vaes[str(device)]

    def tokenize_images(self, images: Any, *, batch_size: int = 64) -> torch.Tensor:
        """Images (PIL images, paths, (3, H, W) / (B, 3, H, W) tensors in [0, 1] or uint8, or a list
        of any of these) -> (B, T) int64 token ids: preprocessed as `revq-pipe encode` does (RGB,
        resize, centre crop to the model's image size), encoded by the VAE, tokenized."""
        frozen = self.vae
        pixels = image_batch(images, self.model.config.image_size or frozen.spec.default_image_size)
        ids = []
        for start in range(0, len(pixels), batch_size):
            batch = to_model_input(pixels[start:start + batch_size].to(frozen.device))
            ids.append(self.model.tokenize(frozen.encode(batch)))
        return torch.cat(ids)

    def detokenize_images(self, ids: torch.Tensor, *, batch_size: int = 64,
                          output_type: str = "pil") -> list[Image.Image] | np.ndarray:
        """(B, T) token ids -> images through the rectifier and the VAE decoder: a list of PIL images,
        or with `output_type="np"` one (B, S, S, 3) uint8 array."""
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be 'pil' or 'np', not {output_type!r}")
        latents = self.model.detokenize_batched(torch.as_tensor(ids).cpu().numpy(), batch_size)
        pixels = vae_pixels(self.vae, latents, batch_size)
        return pixels if output_type == "np" else [Image.fromarray(image) for image in pixels]
