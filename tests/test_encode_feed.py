"""encode's speed-ups on the CPU: the encoder's channels_last, bf16 autocast and compiled paths
within rounding of the plain one, the decode workers' default, JPEG decoding on the device (its
resize against PIL's, its rows and skipped samples against the workers'), and the option's
refusals. tests/test_cuda_encode.py runs the CUDA paths on a GPU."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY_DC_CONFIG, TINY_IMAGE_SIZE, TINY_KL_CONFIG
from revq_pipe.cli import app
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.device_decode import DeviceJpegDecoder, jpeg_for_device, torchvision_decoder
from revq_pipe.pipeline.images.sample_images import HOLDOUT_PHOTOS, TRAIN_PHOTOS, photo_crops
from revq_pipe.pipeline.images.sources import (BlockDataset, Cursor, ImageFolderSource, default_workers,
                                               resize_center_crop, resize_center_crop_tensor)
from revq_pipe.pipeline.images.vae import FrozenVae, VaeSpec
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.stages.encode import encode
from test_encode import SMALL, damaged_folder

runner = CliRunner()
CPU = torch.device("cpu")


def torchvision_missing() -> str | None:
    try:
        torchvision_decoder()
    except UserError as err:
        return str(err)
    return None


MISSING = torchvision_missing()
needs_torchvision = pytest.mark.skipif(
    MISSING is not None, reason=f"needs torchvision's decode_jpeg, which does not import here "
                                f"({MISSING and MISSING.split('(')[-1].split(')')[0]}); scripts/gpu_check.sh runs "
                                f"this on the GPU machine, which has torchvision")


def tiny_vae(class_name: str) -> FrozenVae:
    import diffusers

    torch.manual_seed(0)
    config = TINY_DC_CONFIG if class_name == "AutoencoderDC" else TINY_KL_CONFIG
    module = getattr(diffusers, class_name)(**config)
    spec = VaeSpec("tiny", "", None, class_name, {**dict(module.config), "_class_name": class_name}, True,
                   TINY_IMAGE_SIZE)
    return FrozenVae(spec, module, CPU)


def photo_batch(count: int, size: int = TINY_IMAGE_SIZE) -> torch.Tensor:
    crops = photo_crops(TRAIN_PHOTOS, count, seed=1, out_size=size)
    return torch.stack([torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
                        for _, image in crops])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("class_name", ["AutoencoderDC", "AutoencoderKL"])
def test_channels_last_and_bf16_autocast_stay_within_their_rounding(class_name):
    vae = tiny_vae(class_name)
    images, shape = photo_batch(6), (4, 8, 8) if class_name == "AutoencoderDC" else (4, 16, 16)
    plain = vae.encode_block(images, latent_shape=shape, dtype="float32")
    vae.tune(channels_last=True)
    assert vae.module.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    channels_last = vae.encode_block(images, latent_shape=shape, dtype="float32")
    torch.testing.assert_close(channels_last, plain, rtol=1e-4, atol=1e-4)  # float32 rounding
    with vae.autocast("bf16-autocast"):  # what encode runs on CUDA, here on the CPU
        bf16 = vae.encode_block(images, latent_shape=shape, dtype="float32")
    # bf16 keeps 8 bits of mantissa (0.4% a rounding); a few layers of it stay within 2%.
    assert 0 < relative_error(bf16, plain) < 0.02
    vae.tune()
    assert vae.encode_block(images, latent_shape=shape, dtype="float32").equal(plain)  # undone: the same bits


@pytest.mark.slow
def test_a_compiled_encoder_writes_the_store_of_the_eager_one(photo_folder, tiny_dc_vae_dir, tmp_path):
    options = {**SMALL, "batch_size": 5}  # 12 photos: blocks of 5, 5, 2, the last padded to 5 when compiled
    encode(str(photo_folder), str(tmp_path / "eager.zarr"), vae=str(tiny_dc_vae_dir), **options)
    encode(str(photo_folder), str(tmp_path / "compiled.zarr"), vae=str(tiny_dc_vae_dir), compile_encoder=True,
           **options)
    eager, compiled = LatentStore.open(str(tmp_path / "eager.zarr")), LatentStore.open(str(tmp_path / "compiled.zarr"))
    np.testing.assert_allclose(compiled.latents[:].astype(np.float32), eager.latents[:].astype(np.float32),
                               rtol=2e-3, atol=2e-3)  # float16 storage of float32 rounding differences
    assert list(compiled.keys[:]) == list(eager.keys[:])
    assert compiled.attrs["encoder"]["setup"]["compile"] and not eager.attrs["encoder"]["setup"]["compile"]
    # The same settings: one resumes the other's store (compiling changes rounding, not the data).
    assert {**compiled.attrs, "encoder": None} == {**eager.attrs, "encoder": None}


@pytest.mark.parametrize("cpus, workers", [(1, 1), (2, 1), (8, 7), (17, 16), (64, 16)])
def test_default_workers_leave_one_cpu_to_the_encoding_process(monkeypatch, cpus, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert default_workers(None) == workers
    assert default_workers(3) == 3 and default_workers(0) == 0


@pytest.mark.parametrize("source_size, size", [((448, 300), 64), ((500, 375), 256), ((300, 500), 256),
                                                ((200, 150), 256), ((64, 64), 64), ((1000, 999), 256), ((81, 80), 32)])
def test_the_device_resize_matches_pils_within_one_level(source_size, size):
    for _, image in photo_crops(TRAIN_PHOTOS + HOLDOUT_PHOTOS, 6, seed=0, out_size=max(source_size)):
        image = image.convert("RGB").resize(source_size)
        pil = np.asarray(resize_center_crop(image, size)).astype(int)
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        device = resize_center_crop_tensor(tensor, size).permute(1, 2, 0).numpy().astype(int)
        assert device.shape == pil.shape == (size, size, 3)
        assert np.abs(device - pil).max() <= 1  # a crop one pixel off would differ by far more on photos
        assert (device == pil).mean() > 0.8


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def bogus_huffman(jpeg: bytes) -> bytes:
    """A JPEG whose headers PIL opens but whose Huffman table no decoder accepts."""
    data = bytearray(jpeg)
    table = data.index(b"\xff\xc4") + 5  # after the marker, the length and the table's class/id
    data[table:table + 16] = b"\xff" * 16  # code counts that cannot fit
    return bytes(data)


@pytest.fixture(scope="module")
def device_folder(photo_folder, tmp_path_factory) -> tuple[Path, list[str]]:
    """The damaged folder of test_encode, plus a grey, a progressive and an undecodable JPEG."""
    root, bad = damaged_folder(photo_folder, tmp_path_factory.mktemp("device") / "photos")
    base = Image.open(sorted(root.rglob("*.jpg"))[0]).convert("RGB")
    (root / "astronaut" / "grey.jpg").write_bytes(jpeg_bytes(base.convert("L")))
    (root / "chelsea" / "progressive.jpg").write_bytes(jpeg_bytes(base, progressive=True))
    (root / "coffee" / "bogus.jpg").write_bytes(bogus_huffman(jpeg_bytes(base)))
    return root, sorted(bad + ["coffee/bogus.jpg"])


def test_only_plain_complete_jpegs_go_to_the_device(device_folder):
    root, _ = device_folder
    files = {path.relative_to(root).as_posix(): path for path in root.rglob("*.*")}
    for name in ("astronaut/grey.jpg", "chelsea/progressive.jpg", "coffee/bogus.jpg"):
        assert jpeg_for_device(str(files[name])) == files[name].read_bytes()
    taken = [name for name, path in files.items() if jpeg_for_device(path.read_bytes()) is not None]
    # Not: the PNGs (grey, palette, alpha), the CMYK JPEG, the truncated JPEG, the fake PNG.
    assert len(taken) == len([name for name in files if name.endswith(".jpg")]) - 2
    assert "coffee/cmyk.jpg" not in taken and not any(name.endswith(".png") for name in taken)
    assert jpeg_for_device(str(root / "missing.jpg")) is None


def nvjpeg_stand_in(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Where torchvision is missing, a decoder in decode_jpeg's place: PIL's decode of each JPEG to
    (3, H, W) RGB, refusing the whole batch when one JPEG is progressive (as nvJPEG's hardware
    decoder does) or undecodable, so that every fallback of DeviceJpegDecoder runs."""
    images = []
    for data in encoded:
        with Image.open(io.BytesIO(bytes(data.numpy()))) as image:
            if image.info.get("progressive"):
                raise RuntimeError("progressive JPEG")
            images.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).to(device))
    return images


def blocks_of(root: Path, device_jpegs: bool, block_size: int = 4) -> list:
    source = ImageFolderSource.scan(root)
    return list(BlockDataset(source.units(Cursor(), block_size), TINY_IMAGE_SIZE, block_size, device_jpegs))


@pytest.mark.parametrize("decoder", ["stand-in", pytest.param("torchvision", marks=needs_torchvision)])
def test_device_decoding_keeps_and_skips_the_samples_the_workers_do(device_folder, decoder):
    root, bad = device_folder
    decode = nvjpeg_stand_in if decoder == "stand-in" else None
    on_device = DeviceJpegDecoder(CPU, TINY_IMAGE_SIZE, decode=decode)
    skipped = []
    for worker_block, device_block in zip(blocks_of(root, False), blocks_of(root, True), strict=True):
        assert device_block.jpegs is not None and len(device_block.jpegs) + len(device_block.images) == len(
            device_block.indices)
        images = on_device.images(device_block)
        assert (device_block.indices, device_block.keys, device_block.labels) == (
            worker_block.indices, worker_block.keys, worker_block.labels)
        assert device_block.skipped == worker_block.skipped  # the same samples, in order, with PIL's reasons
        assert images.shape == worker_block.images.shape and images.dtype == torch.uint8
        assert (images.int() - worker_block.images.int()).abs().max() <= 1  # the resize's rounding only
        skipped += [key for _, key, _ in device_block.skipped]
    assert sorted(skipped) == bad


@needs_torchvision
def test_an_encode_decoding_on_the_device_stores_the_workers_rows(device_folder, tiny_dc_vae_dir, tmp_path):
    root, bad = device_folder
    workers = encode(str(root), str(tmp_path / "workers.zarr"), vae=str(tiny_dc_vae_dir), **SMALL)
    device = encode(str(root), str(tmp_path / "device.zarr"), vae=str(tiny_dc_vae_dir), decode_on="device", **SMALL)
    a, b = LatentStore.open(str(tmp_path / "workers.zarr")), LatentStore.open(str(tmp_path / "device.zarr"))
    assert list(a.keys[:]) == list(b.keys[:]) and np.array_equal(a.labels[:], b.labels[:])
    assert sorted(key for key, _ in b.skipped) == bad and device.count == workers.count
    np.testing.assert_allclose(b.latents[:].astype(np.float32), a.latents[:].astype(np.float32), rtol=0.05, atol=0.05)
    assert b.attrs["preprocessing"] != a.attrs["preprocessing"]
    with pytest.raises(UserError, match="other settings"):  # neither resumes the other's store
        encode(str(root), str(tmp_path / "workers.zarr"), vae=str(tiny_dc_vae_dir), decode_on="device", **SMALL)


def test_decoding_on_the_device_without_torchvision_is_refused_in_one_line(photo_folder, tiny_dc_vae_dir, tmp_path):
    if MISSING is None:
        pytest.skip("torchvision is importable here, so encode does not refuse --decode-on device")
    result = runner.invoke(app, ["encode", str(photo_folder), "--out", str(tmp_path / "s.zarr"), "--vae",
                                 str(tiny_dc_vae_dir), "--decode-on", "device"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "--decode-on device" in result.output and "torchvision" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_an_unknown_decode_place_is_refused_in_one_line(photo_folder, tiny_dc_vae_dir, tmp_path):
    result = runner.invoke(app, ["encode", str(photo_folder), "--out", str(tmp_path / "s.zarr"), "--vae",
                                 str(tiny_dc_vae_dir), "--decode-on", "gpu"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "workers, device" in result.output
    assert not (tmp_path / "s.zarr").exists()
