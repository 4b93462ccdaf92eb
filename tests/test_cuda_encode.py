"""On a CUDA GPU only (scripts/gpu_check.sh runs these on a lent machine; CI has none): encode's
speed-ups there against the plain paths. The copies overlapped on a side stream and pinned memory
give the latents of plain copies; bf16 with channels_last stays within bf16 rounding of float32 on
the CPU; no host synchronisation while blocks are encoded; the compiled encoder and nvJPEG decoding
keep every row and skip what the plain paths skip."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import TINY_IMAGE_SIZE
from revq_pipe.pipeline.images.encode_config import EncodeConfig
from revq_pipe.pipeline.images.encode_feed import EncoderSetup, encoded_blocks
from revq_pipe.pipeline.images.sources import Cursor, ImageFolderSource
from revq_pipe.pipeline.images.vae import resolve_vae
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.stages.encode import prepare_encode, run_encode
from test_encode import SMALL
from test_encode_feed import device_folder, needs_torchvision  # noqa: F401 - a fixture used below

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on a lent machine)")


def cuda_store(source, out, vae_dir, setup: dict | None = None, **options) -> LatentStore:
    """A store encoded on CUDA (bf16 autocast), with EncoderSetup fields in `setup` set."""
    spec = resolve_vae(str(vae_dir))
    job = prepare_encode(str(source), str(out), spec, EncodeConfig(device="cuda", **{**SMALL, "workers": 2, **options}))
    job.setup = replace(job.setup, **(setup or {}))
    run_encode(job, spec.load(job.device))
    return LatentStore.open(str(out))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_overlapped_copies_give_the_latents_of_plain_copies(photo_folder, tiny_dc_vae_dir, tmp_path):
    fast = cuda_store(photo_folder, tmp_path / "fast.zarr", tiny_dc_vae_dir)
    plain = cuda_store(photo_folder, tmp_path / "plain.zarr", tiny_dc_vae_dir,
                       setup={"copy_stream": False, "pin_memory": False})
    assert fast.attrs["encoder"]["setup"] == {"decode_on": "workers", "compile": False, "channels_last": True,
                                              "pin_memory": True, "copy_stream": True}
    assert list(fast.keys[:]) == list(plain.keys[:])
    # The same kernels on the same images: a block's latents landing in another's rows would differ wholly.
    np.testing.assert_allclose(fast.latents[:].astype(np.float32), plain.latents[:].astype(np.float32),
                               rtol=1e-3, atol=1e-3)


def test_bf16_channels_last_on_cuda_is_within_bf16_rounding_of_float32_on_the_cpu(photo_folder, tiny_dc_vae_dir,
                                                                                     tmp_path):
    from revq_pipe.stages.encode import encode

    cuda = cuda_store(photo_folder, tmp_path / "cuda.zarr", tiny_dc_vae_dir)
    encode(str(photo_folder), str(tmp_path / "cpu.zarr"), vae=str(tiny_dc_vae_dir), device="cpu", **SMALL)
    cpu = LatentStore.open(str(tmp_path / "cpu.zarr"))
    assert cuda.attrs["compute"] == "bf16-autocast" and cpu.attrs["compute"] == "float32"
    assert 0 < relative_error(cuda.latents[:], cpu.latents[:]) < 0.02


def test_no_host_sync_while_blocks_are_encoded(photo_folder, tiny_dc_vae_dir):
    spec = resolve_vae(str(tiny_dc_vae_dir))
    vae = spec.load(torch.device("cuda"))
    units = ImageFolderSource.scan(photo_folder).units(Cursor(), 3)
    blocks = encoded_blocks(vae, units, image_size=TINY_IMAGE_SIZE, batch_size=3, workers=0,
                            latent_shape=spec.latent_shape(TINY_IMAGE_SIZE), dtype="float16", flip=False,
                            setup=EncoderSetup())
    next(blocks)  # the first block: cuDNN's and the allocator's first calls may wait
    torch.cuda.set_sync_debug_mode("error")
    try:
        with vae.autocast("bf16-autocast"):
            pending = [latents for _, latents in blocks]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum(len(latents.numpy()) for latents in pending) == 9  # the writer's wait, after the loop


def test_a_compiled_encoder_on_cuda_stays_within_bf16_rounding(photo_folder, tiny_dc_vae_dir, tmp_path):
    options = {"batch_size": 5}  # blocks of 5, 5, 2: the last padded to 5
    eager = cuda_store(photo_folder, tmp_path / "eager.zarr", tiny_dc_vae_dir, **options)
    compiled = cuda_store(photo_folder, tmp_path / "compiled.zarr", tiny_dc_vae_dir, compile_encoder=True, **options)
    assert list(compiled.keys[:]) == list(eager.keys[:])
    assert relative_error(compiled.latents[:], eager.latents[:]) < 0.02


@needs_torchvision
def test_nvjpeg_decoding_keeps_and_skips_the_samples_the_workers_do(device_folder, tiny_dc_vae_dir, tmp_path):  # noqa: F811
    root, bad = device_folder
    workers = cuda_store(root, tmp_path / "workers.zarr", tiny_dc_vae_dir)
    nvjpeg = cuda_store(root, tmp_path / "nvjpeg.zarr", tiny_dc_vae_dir, decode_on="device")
    assert list(nvjpeg.keys[:]) == list(workers.keys[:])
    assert sorted(key for key, _ in nvjpeg.skipped) == bad
    assert relative_error(nvjpeg.latents[:], workers.latents[:]) < 0.05
