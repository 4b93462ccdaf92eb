"""Flip augmentation: `encode --flip` stores each image's flipped latent, and fit trains on both."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.train.loader import LatentLoader
from revq_pipe.pipeline.images.sample_images import photo_crops
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.stages.encode import encode
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit

from conftest import TINY_IMAGE_SIZE


@pytest.fixture(scope="module")
def png_folders(tmp_path_factory):
    """The same photo crops as lossless PNGs at the VAE's input size (no resize, no crop), and the
    same files flipped left-right: a flipped image's encode is then exactly comparable."""
    root = tmp_path_factory.mktemp("flip")
    for name, transform in (("plain", lambda image: image),
                            ("mirrored", lambda image: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        for i, (label, image) in enumerate(photo_crops(("astronaut", "coffee"), 40, seed=5, out_size=TINY_IMAGE_SIZE)):
            path = root / name / label / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            transform(image).save(path)
    return root


@pytest.fixture(scope="module")
def stores(png_folders, tiny_dc_vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("flip-stores")
    options = dict(vae=str(tiny_dc_vae_dir), image_size=TINY_IMAGE_SIZE, batch_size=8, device="cpu", dtype="float32",
                   workers=0, progress=False, chunk_size=16)
    encode(str(png_folders / "plain"), str(out / "flip.zarr"), flip=True, **options)
    encode(str(png_folders / "plain"), str(out / "plain.zarr"), **options)
    encode(str(png_folders / "mirrored"), str(out / "mirrored.zarr"), **options)
    return {name: LatentStore.open(str(out / f"{name}.zarr")) for name in ("flip", "plain", "mirrored")}


def test_a_flipped_latent_is_the_encode_of_the_flipped_image_and_the_originals_are_untouched(stores):
    flip, plain, mirrored = stores["flip"], stores["plain"], stores["mirrored"]
    assert flip.has_flip and not plain.has_flip and flip.attrs["flip"] is True
    np.testing.assert_array_equal(flip.keys[:], mirrored.keys[:])
    np.testing.assert_allclose(flip.latents_flip[:], mirrored.latents[:], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(flip.latents[:], plain.latents[:])
    assert flip.latents_flip.chunks == flip.latents.chunks
    # and flipping does change the latent: the pairs are not copies
    assert np.abs(flip.latents_flip[:] - flip.latents[:]).mean() > 0.01


def test_the_statistics_cover_the_flipped_latents_too(stores):
    flip = stores["flip"]
    both = np.concatenate([flip.latents[:], flip.latents_flip[:]]).reshape(2 * len(flip), -1).astype(np.float64)
    np.testing.assert_allclose(flip.mean, both.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flip.std, both.std(axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("resident", [True, False])
def test_each_epoch_takes_every_sample_once_as_itself_or_its_flip(stores, resident, monkeypatch):
    monkeypatch.setattr("revq_pipe.pipeline.train.loader.STREAM_BLOCK_BYTES", 1)  # blocks of two chunks
    flip = stores["flip"]
    originals, flipped = (torch.from_numpy(array[:]).flatten(1) for array in (flip.latents, flip.latents_flip))
    loader = LatentLoader(flip, 8, torch.device("cpu"), seed=0, resident=resident, flip=True, drop_last=False)
    seen, views = [], []
    for batch in loader.epoch(0):
        for row in batch.flatten(1):
            match_plain = (originals == row).all(dim=1).nonzero().flatten().tolist()
            match_flip = (flipped == row).all(dim=1).nonzero().flatten().tolist()
            assert len(match_plain) + len(match_flip) == 1
            seen += match_plain + match_flip
            views.append(bool(match_flip))
    assert sorted(seen) == list(range(len(flip)))
    assert 0.25 < np.mean(views) < 0.75
    assert [b.tolist() for b in loader.epoch(0)] == [b.tolist() for b in loader.epoch(0)]


def test_fit_uses_the_flipped_latents_unless_told_not_to(stores, tmp_path):
    config = FitConfig.from_preset("tiny", epochs=2, batch_size=16, codes=8, device="cpu")
    with_flip = fit(stores["flip"].url, str(tmp_path / "flip"), config, progress=False)
    assert with_flip.train_config.flip is True and with_flip.history[-1]["codebook_loss"] > 0
    assert fit(stores["plain"].url, str(tmp_path / "plain"), config, progress=False).train_config.flip is False
    result = CliRunner().invoke(app, ["fit", stores["flip"].url, "--out", str(tmp_path / "cli"), "--preset", "tiny",
                                      "--codes", "8", "--batch-size", "16", "--device", "cpu", "--epochs", "1",
                                      "--no-flip"])
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "cli" / "training.json").read_text())["train"]["flip"] is False
    with pytest.raises(UserError, match="holds no flipped latents"):
        fit(stores["plain"].url, str(tmp_path / "bad"), config.with_overrides(flip=True), progress=False)


def test_encode_with_flip_into_a_plain_store_needs_overwrite(png_folders, tiny_dc_vae_dir, stores):
    result = CliRunner().invoke(app, ["encode", str(png_folders / "plain"), "--out", stores["plain"].url, "--flip",
                                      "--vae", str(tiny_dc_vae_dir), "--device", "cpu", "--dtype", "float32",
                                      "--batch-size", "8", "--workers", "0", "--image-size", str(TINY_IMAGE_SIZE)])
    assert result.exit_code == 2 and "other settings" in result.stderr and "flip" in result.stderr
