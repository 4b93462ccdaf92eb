"""eval (latent and image metrics, one result file per store, defaults from the store's record) and
decode through a real VAE to PNG images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from typer.testing import CliRunner

from conftest import PHOTO_COUNT, TINY_IMAGE_SIZE
from revq_pipe.cli import app
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.reporting.metrics import image_psnr_ssim
from revq_pipe.pipeline.images.pixels import original_pixels, vae_pixels
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.images.vae import resolve_vae
from revq_pipe.stages.decode import decode
from revq_pipe.stages.encode import encode
from revq_pipe.stages.evaluate import evaluate
from revq_pipe.stages.export_tokens import export_tokens
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit

CODES = 8  # fit samples its first codebooks from the store's 12 latents


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, photo_folder, tiny_dc_vae_dir):
    """Photos encoded with a tiny AutoencoderDC, and a tiny-preset run fitted on them."""
    root = tmp_path_factory.mktemp("eval")
    store = str(root / "latents.zarr")
    encode(str(photo_folder), store, vae=str(tiny_dc_vae_dir), image_size=TINY_IMAGE_SIZE, device="cpu",
           dtype="float32", workers=0, progress=False)
    config = FitConfig.from_preset("tiny", codes=CODES, epochs=2, batch_size=4, device="cpu")
    fit(store, str(root / "run"), config, progress=False)
    return {"store": store, "run": root / "run", "vae": str(tiny_dc_vae_dir), "images": str(photo_folder)}


def test_eval_latent_metrics_and_its_result_file(pipeline):
    report = evaluate(str(pipeline["run"]), pipeline["store"], latent_only=True, device="cpu", progress=False)

    model = ReVQ.from_pretrained(pipeline["run"], device="cpu")
    z = torch.from_numpy(LatentStore.open(pipeline["store"]).latents[:])
    with torch.inference_mode():
        ids, recon = model.tokenize(z), model(z)
    assert report.count == PHOTO_COUNT
    assert report.latent_mse == pytest.approx(float(((recon - z) ** 2).mean()), rel=1e-5)
    normalise = model.preprocessor.normalize
    assert report.latent_mse_normalised == pytest.approx(float(((normalise(recon) - normalise(z)) ** 2).mean()), rel=1e-5)
    # the quantizer alone: each token's code vector, merged back, no rectifier
    with torch.no_grad():
        codes = torch.stack([model.codebooks[t, ids[:, t]] for t in range(model.config.tokens)], dim=1)
    quantized = codes.reshape(z.shape)  # the channel split: tokens are the channel-major flattening cut in T runs
    assert report.quantizer_mse_normalised == pytest.approx(float(((quantized - normalise(z)) ** 2).mean()), rel=1e-5)
    raw = model.preprocessor.denormalize(quantized)
    assert report.quantizer_mse == pytest.approx(float(((raw - z) ** 2).mean()), rel=1e-5)
    assert "quantizer alone" in report.table()
    used = [len(set(ids[:, t].tolist())) / CODES * 100 for t in range(model.config.tokens)]
    assert report.usage_mean_pct == pytest.approx(np.mean(used))
    assert report.usage_min_pct == pytest.approx(min(used))
    assert 1 <= report.perplexity <= CODES
    assert report.image is None

    assert report.saved_to == str(pipeline["run"] / "eval-latents.json")
    saved = json.loads((pipeline["run"] / "eval-latents.json").read_text())
    assert saved["latent_mse"] == report.latent_mse and saved["count"] == PHOTO_COUNT
    assert set(saved["skipped"]) == {"psnr/ssim", "lpips", "rfid"}
    table = report.table()
    assert "latent MSE" in table and "LPIPS" in table and "skipped" in table


def test_eval_image_metrics_match_the_reconstructions(pipeline):
    report = evaluate(str(pipeline["run"]), pipeline["store"], vae=pipeline["vae"], images=pipeline["images"],
                      batch_size=5, device="cpu", progress=False)

    store = LatentStore.open(pipeline["store"])
    originals = np.concatenate(list(original_pixels(pipeline["images"], store.keys[:], TINY_IMAGE_SIZE))) / 255.0
    vae = resolve_vae(pipeline["vae"]).load(torch.device("cpu"))
    model = ReVQ.from_pretrained(pipeline["run"], device="cpu")
    z = store.latents[:]
    with torch.inference_mode():
        recon = torch.cat([model(torch.from_numpy(z[i:i + 5])) for i in range(0, len(z), 5)])
    vae_only, through_tokens = vae_pixels(vae, z, 5) / 255.0, vae_pixels(vae, recon, 5) / 255.0
    psnr_vae, ssim_vae = image_psnr_ssim(originals, vae_only)
    psnr_tokens, ssim_tokens = image_psnr_ssim(originals, through_tokens)
    expected = {"psnr_vae": psnr_vae.mean(), "ssim_vae": ssim_vae.mean(),
                "psnr_tokens": psnr_tokens.mean(), "ssim_tokens": ssim_tokens.mean()}
    assert {name: report.image[name] for name in expected} == pytest.approx(expected)
    # The same numbers without the project's metric helper: PSNR from its formula, SSIM from
    # scikit-image called here, each per image and then averaged.
    for name, pixels in (("vae", vae_only), ("tokens", through_tokens)):
        mse = ((originals - pixels) ** 2).mean(axis=(1, 2, 3))
        assert report.image[f"psnr_{name}"] == pytest.approx(np.mean(10 * np.log10(1.0 / mse)))
        ssim = [structural_similarity(o, r, data_range=1.0, channel_axis=-1) for o, r in zip(originals, pixels)]
        assert report.image[f"ssim_{name}"] == pytest.approx(np.mean(ssim))
    for name in ("lpips", "rfid"):  # each either ran (its weights are cached here) or says why not
        assert (name in report.image) != (name in report.skipped)
        assert name in report.image or report.skipped[name].startswith("skipped (")
    assert "PSNR" in report.table()
    assert json.loads((pipeline["run"] / "eval-latents.json").read_text())["image"] == report.image


def test_eval_defaults_to_the_vae_and_images_the_store_records(pipeline):
    """Plain `revq-pipe eval RUN STORE` measures the images: the store records its VAE and source."""
    result = CliRunner().invoke(app, ["eval", str(pipeline["run"]), pipeline["store"], "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "PSNR VAE only / through tokens" in result.stdout and "eval-latents.json" in result.stdout
    defaulted = json.loads((pipeline["run"] / "eval-latents.json").read_text())["image"]
    explicit = evaluate(str(pipeline["run"]), pipeline["store"], vae=pipeline["vae"], images=pipeline["images"],
                        device="cpu", progress=False).image
    assert defaulted == pytest.approx(explicit)


def test_eval_skips_images_whose_recorded_source_is_gone(pipeline, tmp_path):
    moved = tmp_path / "photos"
    shutil.copytree(pipeline["images"], moved)
    store = str(tmp_path / "latents.zarr")
    encode(str(moved), store, vae=pipeline["vae"], image_size=TINY_IMAGE_SIZE, device="cpu", dtype="float32",
           workers=0, progress=False)
    shutil.rmtree(moved)
    report = evaluate(str(pipeline["run"]), store, device="cpu", progress=False)
    assert report.image is None and "source not found" in report.skipped["psnr/ssim"]
    # named explicitly, the same missing source is an error, not a skip
    with pytest.raises(UserError, match="source not found"):
        evaluate(str(pipeline["run"]), store, images=str(moved), device="cpu", progress=False)


def test_eval_writes_one_result_file_per_store(pipeline, tmp_path):
    other = tmp_path / "held-out.zarr"
    shutil.copytree(pipeline["store"], other)
    for store in (pipeline["store"], str(other)):
        assert CliRunner().invoke(app, ["eval", str(pipeline["run"]), store, "--latent-only"]).exit_code == 0
    first = json.loads((pipeline["run"] / "eval-latents.json").read_text())
    second = json.loads((pipeline["run"] / "eval-held-out.json").read_text())
    assert first["store"] == pipeline["store"] and second["store"] == str(other)
    # another store of the same name keeps its own file too
    same_name = tmp_path / "elsewhere" / "latents.zarr"
    shutil.copytree(pipeline["store"], same_name)
    report = evaluate(str(pipeline["run"]), str(same_name), latent_only=True, device="cpu", progress=False)
    assert report.saved_to != str(pipeline["run"] / "eval-latents.json")
    assert json.loads((pipeline["run"] / "eval-latents.json").read_text())["store"] == pipeline["store"]


def test_psnr_and_ssim_match_their_formulas_and_scikit_image_on_constructed_errors():
    rng = np.random.default_rng(0)
    originals = rng.uniform(0.25, 0.75, size=(3, 16, 16, 3))
    rms_errors = np.array([0.1, 0.01, 0.003])
    checkerboard = np.where(np.indices((16, 16, 3)).sum(axis=0) % 2 == 0, 1.0, -1.0)  # every square is 1
    reconstructions = originals + rms_errors[:, None, None, None] * checkerboard  # MSE = rms_error^2 exactly
    psnr, ssim = image_psnr_ssim(originals, reconstructions)

    np.testing.assert_allclose(psnr, 10 * np.log10(1.0 / rms_errors**2), rtol=1e-9)  # 20, 40, 50.46 dB
    for i, (original, recon) in enumerate(zip(originals, reconstructions)):
        assert psnr[i] == pytest.approx(peak_signal_noise_ratio(original, recon, data_range=1.0))
        assert ssim[i] == pytest.approx(structural_similarity(original, recon, data_range=1.0, channel_axis=-1))
    assert ssim[0] < ssim[1] < ssim[2] < 1.0

    # Two flat images have no variance: SSIM is its luminance term alone, (2ab + C1) / (a^2 + b^2 + C1).
    flat_a, flat_b = np.full((1, 16, 16, 3), 0.6), np.full((1, 16, 16, 3), 0.4)
    c1 = (0.01 * 1.0) ** 2  # (K1 * data range)^2, SSIM's usual constant
    _, flat_ssim = image_psnr_ssim(flat_a, flat_b)
    assert flat_ssim[0] == pytest.approx((2 * 0.6 * 0.4 + c1) / (0.6**2 + 0.4**2 + c1))


def test_original_pixels_follow_the_store_order_and_skip_missing(pipeline):
    keys = LatentStore.open(pipeline["store"]).keys[:]
    wanted = list(keys[1::2])  # as if encode had skipped every other image
    blocks = list(original_pixels(pipeline["images"], wanted, TINY_IMAGE_SIZE))
    pixels = np.concatenate(blocks)
    assert pixels.shape == (len(wanted), TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3) and pixels.dtype == np.uint8
    with Image.open(f"{pipeline['images']}/{wanted[0]}") as first:
        from revq_pipe.pipeline.images.sources import preprocess

        np.testing.assert_array_equal(pixels[0], preprocess(first, TINY_IMAGE_SIZE).permute(1, 2, 0).numpy())
    with pytest.raises(UserError, match="does not hold"):
        list(original_pixels(pipeline["images"], ["nowhere/missing.jpg"], TINY_IMAGE_SIZE))


def test_decode_with_vae_writes_one_png_per_key(pipeline, tmp_path):
    tokens, images = str(tmp_path / "tokens.zarr"), tmp_path / "images"
    export_tokens(str(pipeline["run"]), pipeline["store"], tokens, device="cpu", progress=False)
    summary = decode(str(pipeline["run"]), tokens, str(images), vae=pipeline["vae"], device="cpu", progress=False)
    assert summary.kind == "images" and summary.count == PHOTO_COUNT

    store = LatentStore.open(pipeline["store"])
    pngs = sorted(images.rglob("*.png"))
    assert sorted(str(p.relative_to(images)) for p in pngs) == sorted(
        k.rsplit(".", 1)[0] + ".png" for k in store.keys[:])
    vae = resolve_vae(pipeline["vae"]).load(torch.device("cpu"))
    model = ReVQ.from_pretrained(pipeline["run"], device="cpu")
    with torch.inference_mode():  # the 12 images are one token-store chunk: one batch, as decode ran it
        expected = vae_pixels(vae, model(torch.from_numpy(store.latents[:])), PHOTO_COUNT)
    for key, pixels in zip(store.keys[:], expected):
        np.testing.assert_array_equal(np.asarray(Image.open(images / (str(key).rsplit(".", 1)[0] + ".png"))), pixels)

    # The same command again finds the folder complete; other tokens need --overwrite to write into it.
    written = {p: p.stat().st_mtime_ns for p in pngs}
    decode(str(pipeline["run"]), tokens, str(images), vae=pipeline["vae"], device="cpu", progress=False)
    assert {p: p.stat().st_mtime_ns for p in pngs} == written
    other = str(tmp_path / "other-tokens.zarr")
    export_tokens(str(pipeline["run"]), pipeline["store"], other, device="cpu", progress=False)
    with pytest.raises(UserError, match="`overwrite=True`"):
        decode(str(pipeline["run"]), other, str(images), vae=pipeline["vae"], device="cpu", progress=False)

    # `--images` alone decodes through the VAE the run records: the same PNGs
    recorded = tmp_path / "recorded"
    result = CliRunner().invoke(app, ["decode", str(pipeline["run"]), tokens, "--out", str(recorded), "--images",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for png in pngs:
        assert (recorded / png.relative_to(images)).read_bytes() == png.read_bytes()


def test_vae_of_another_architecture_is_refused(pipeline, tiny_kl_vae_dir):
    with pytest.raises(UserError, match="not the VAE"):
        evaluate(str(pipeline["run"]), pipeline["store"], vae=str(tiny_kl_vae_dir), images=pipeline["images"],
                 device="cpu", progress=False)


@pytest.mark.parametrize("extra, reason", [
    (["--latent-only", "--vae", "{vae}"], "cannot go with --vae"),
    (["--vae", "{run}/missing"], "VAE directory not found"),
    (["--vae", "{vae}", "--images", "{run}/missing"], "source not found"),
    (["--batch-size", "0"], "batch-size"),
])
def test_eval_bad_usage_exits_2(pipeline, extra, reason):
    args = ["eval", str(pipeline["run"]), pipeline["store"], "--device", "cpu",
            *[a.format(**pipeline) for a in extra]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert reason in result.output
