"""Real photographs that are available offline, for the demo, the embedded VAE and the tests.

They come from scikit-image's bundled samples and scikit-learn's two sample images (when
scikit-learn is installed). Crops are deterministic for a given seed, so data lists can be recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs of natural scenes/objects, split once so that the embedded VAE's quality can
# be reported on photos it never saw in training. The demo draws from the held-out ones.
TRAIN_PHOTOS = ("astronaut", "coffee", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "china")
HOLDOUT_PHOTOS = ("rocket", "flower")
GRAY_PHOTOS = ("camera", "moon", "coins", "clock", "grass", "gravel", "brick")


def load_photo(name: str) -> Image.Image:
    """One bundled photograph as an RGB PIL image."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg")).convert("RGB")
    import skimage.data

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left view, right view, disparity)
        array = array[0]
    return Image.fromarray(array).convert("RGB")


def photo_crops(
    names: tuple[str, ...] | list[str],
    count: int,
    *,
    seed: int = 0,
    min_side: int = 96,
    out_size: int | None = None,
    flips: bool = True,
) -> list[tuple[str, Image.Image]]:
    """`count` random square crops (side >= min_side, random scale and place) from the named photos.

    Returns (label, image) pairs where label is the source photo's name, cycling through the photos
    so every one is represented. With `out_size`, crops are resized to that square size.
    """
    rng = np.random.default_rng(seed)
    photos = [(name, load_photo(name)) for name in names]
    crops = []
    for i in range(count):
        name, photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(rng.integers(min(min_side, w, h), min(w, h) + 1))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        if flips and rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if out_size is not None:
            crop = crop.resize((out_size, out_size), Image.Resampling.BICUBIC)
        crops.append((name, crop))
    return crops


def write_image_folder(root: str | Path, crops: list[tuple[str, Image.Image]], *, fmt: str = "jpg") -> list[Path]:
    """Write crops as an ImageFolder tree: root/<label>/<label>_<i>.<fmt>. Returns the paths."""
    root = Path(root)
    paths = []
    for i, (label, image) in enumerate(crops):
        path = root / label / f"{label}_{i:05d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=95) if fmt in ("jpg", "jpeg") else image.save(path)
        paths.append(path)
    return paths
