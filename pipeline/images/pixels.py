"""Pixels for image-space results: VAE reconstructions and the originals they are compared with.

Both come out as uint8 (N, S, S, 3) arrays, the form a PNG holds: reconstructions are rounded to
8 bits before any metric, so PSNR/SSIM describe the images a user would actually save. Originals
go through encode's own preprocessing (`sources.preprocess`), so they are exactly what the VAE saw.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.sources import Cursor, open_source
from revq_pipe.pipeline.images.vae import FrozenVae

SOURCE_BLOCK = 64  # images decoded per read from the source


def vae_pixels(vae: FrozenVae, latents: np.ndarray | torch.Tensor, batch_size: int) -> np.ndarray:
    """(N, C, H, W) latents through the VAE decoder -> (N, S, S, 3) uint8 images."""
    images = []
    for start in range(0, len(latents), batch_size):
        batch = torch.as_tensor(np.asarray(latents[start:start + batch_size], dtype=np.float32)).to(vae.device)
        decoded = vae.decode(batch).float().clamp(-1, 1)
        # [-1, 1] -> [0, 255], rounded to the nearest level (ties to even): what torchvision's
        # save_image does by adding 0.5 before the cast. Its to_pil_image / ToPILImage truncate
        # (`mul(255).byte()`), which would darken every pixel by half a level on average.
        pixels = ((decoded + 1) * 127.5).round().to(torch.uint8)
        images.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8)


def original_pixels(images: str, keys: list[str] | np.ndarray, image_size: int) -> Iterator[np.ndarray]:
    """The preprocessed source images of `keys`, in that order, as uint8 (n, S, S, 3) blocks.

    `keys` must come in the source's own order (as encode stored them); images the store lacks
    (skipped by encode) are passed over. A key that the source does not hold is a user error.
    """
    source = open_source(images)
    wanted = [str(key) for key in keys]
    row = 0
    for unit in source.units(Cursor(), SOURCE_BLOCK):
        for block in unit.blocks(image_size, SOURCE_BLOCK):
            if block.error:
                raise UserError(block.error)
            found = []
            for key, image in zip(block.keys, block.images):
                if row < len(wanted) and key == wanted[row]:
                    found.append(image.permute(1, 2, 0).numpy())
                    row += 1
            if found:
                yield np.stack(found)
            if row == len(wanted):
                return
    if row < len(wanted):
        raise UserError(f"{images} does not hold the store's image {wanted[row]!r} (in the store's order): "
                        "pass the source the store was encoded from")
