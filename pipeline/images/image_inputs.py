"""Images as a user holds them (PIL images, tensors, arrays, file paths) -> the uint8 batch encode makes.

Every kind goes through encode's own preprocessing (`sources.preprocess`: RGB, resize of the short
side, centre crop), so `ReVQImageTokenizer.tokenize_images` sees exactly what `revq-pipe encode`
would have. Tensors follow torchvision's conventions: float in [0, 1] (what `ToTensor` gives) or
uint8 0..255, shaped (3, H, W) or (B, 3, H, W); numpy arrays are (H, W, 3) uint8 as PIL gives them.
A list may mix all of these, batches included: its images come in order, a batch's in its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.sources import preprocess


def image_batch(images: Any, size: int) -> torch.Tensor:
    """One image or a sequence of them -> (B, 3, size, size) uint8, in the order given."""
    return torch.stack([preprocess(image, size) for image in _pil_images(images)])


def _pil_images(images: Any) -> Iterable[Image.Image]:
    if isinstance(images, (Image.Image, str, Path, torch.Tensor, np.ndarray)):
        images = [images]
    # A (B, 3, H, W) batch stands for its B images, alone or as one item of a list.
    images = [image for item in images for image in (item if _is_batch(item) else [item])]
    if not images:
        raise UserError("no images given")
    for image in images:
        yield _to_pil(image)


def _is_batch(item: Any) -> bool:
    return isinstance(item, torch.Tensor) and item.ndim == 4


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise UserError(f"image not found: {image}")
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise UserError(f"an image tensor must be (3, H, W) or (B, 3, H, W), not {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            # float in [0, 1], as torchvision's ToTensor makes; rounded to 8 bits as a saved image is
            image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        array = image.expand(3, -1, -1).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(np.ascontiguousarray(array))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise UserError(f"an image array must be uint8 (H, W) or (H, W, 3), not {image.dtype} {image.shape}")
        return Image.fromarray(image)
    raise UserError(f"cannot read an image from a {type(image).__name__}: pass PIL images, tensors or paths")
