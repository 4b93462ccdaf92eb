"""The embedded VAE by the name every artefact records, through the CLI: encode with
`--vae revq-pipe-embedded`, then decode and eval find it from the run's and the store's record."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import PHOTO_COUNT
from revq_pipe.cli import app
from revq_pipe.pipeline.images.embedded_vae import EMBEDDED_IMAGE_SIZE
from revq_pipe.pipeline.storage.store import LatentStore


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow  # the embedded VAE encodes, decodes and evaluates 12 photos: about 15 s on 2 cores
def test_the_recorded_embedded_vae_name_works_from_encode_to_eval(photo_folder, tmp_path):
    store, run, tokens = tmp_path / "latents.zarr", tmp_path / "run", tmp_path / "tokens.zarr"
    cli("encode", photo_folder, "--out", store, "--vae", "revq-pipe-embedded", "--workers", 0, "--device", "cpu")
    assert LatentStore.open(str(store)).attrs["vae"] == "revq-pipe-embedded"
    cli("fit", store, "--out", run, "--preset", "tiny", "--codes", 8, "--epochs", 1, "--batch-size", 4,
        "--device", "cpu")
    assert json.loads((run / "config.json").read_text())["vae"] == "revq-pipe-embedded"  # portable: published too
    cli("export-tokens", run, store, "--out", tokens, "--device", "cpu")

    cli("decode", run, tokens, "--out", tmp_path / "pngs", "--images", "--device", "cpu")  # no --vae: the run's
    pngs = sorted((tmp_path / "pngs").rglob("*.png"))
    assert len(pngs) == PHOTO_COUNT
    with Image.open(pngs[0]) as png:
        assert png.size == (EMBEDDED_IMAGE_SIZE, EMBEDDED_IMAGE_SIZE)
    cli("decode", run, tokens, "--out", tmp_path / "pngs-named", "--vae", "embedded", "--device", "cpu")
    assert pngs[0].read_bytes() == (tmp_path / "pngs-named" / pngs[0].relative_to(tmp_path / "pngs")).read_bytes()

    result = cli("eval", run, store, "--device", "cpu")  # the store records the VAE and the photo folder
    assert "PSNR VAE only / through tokens" in result.stdout
    image = json.loads((run / "eval-latents.json").read_text())["image"]
    assert image["psnr_vae"] > image["psnr_tokens"] > 5
