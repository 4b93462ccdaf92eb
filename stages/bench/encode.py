"""`revq-pipe bench encode`: stage one's images/s beside the reference setting, in one run, with
each piece of encode's speed measured on its own and end to end with and without it.

The VAE is DC-AE f32c32, the paper's: its checkpoint when it is in the local Hugging Face cache,
otherwise the same architecture built from its config with random weights (speed does not depend
on the weights). The config below is diffusers' own for the SANA DC-AE f32c32
(`convert_ae` in diffusers/scripts/convert_dcae_to_diffusers.py, the architecture of
mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers; sana-1.1 retrained only the decoder's weights).

Rows, all on the same JPEG images (pipeline/reporting/encode_timing.py times them):
- reference: the encoder alone in fp32 at batch 64, as the ReVQ reference script runs it;
- on CUDA, the encoder alone at encode's setting (bf16 autocast, --batch-size), contiguous and
  channels_last (encode's default there), and with `compile_encoder` under torch.compile;
- decoding alone: PIL in one DataLoader worker (the rate per process: how many feed 600 img/s) and
  in as many as encode starts; on the device (torchvision's decode_jpeg: nvJPEG on a GPU, then the
  resize and crop there) where torchvision is importable;
- end to end: `encode` from webdataset shards of JPEGs to a Zarr store (decode, resize, encode,
  compress, write, statistics), wall clock of the whole call: with encode's defaults, then on
  CUDA without each speed-up in turn (channels_last; the side stream that overlaps the copies with
  the encoder; pinned memory), then with JPEGs decoded on the device, and compiled.

What encode has for 600 img/s on one H100/H200 (pipeline/images/encode_feed.py): bf16 autocast and
channels_last; blocks in pinned memory, copied (or decoded) on a side stream one block ahead of the
encoder, latents copied back behind it; a decode worker per CPU but one, at most 16; `--decode-on
device` when the CPUs cannot keep up; `--compile`. The rows say which of them the encoder needs.
"""

from __future__ import annotations

import datetime
import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.encode_config import EncodeConfig
from revq_pipe.pipeline.images.sources import default_workers, preprocess, to_model_input
from revq_pipe.pipeline.images.vae import DEFAULT_VAE_ID, FrozenVae, VaeSpec, cached_hub_spec
from revq_pipe.pipeline.reporting.benchmarking import device_description
from revq_pipe.pipeline.reporting.encode_timing import (JPEG_SIDE, Row, jpeg_photos, time_device_decoding,
                                                        time_encoder, time_worker_decoding, write_shards)

log = logging.getLogger(__name__)

DC_AE_F32C32_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="conv",
    upsample_block_type="interpolate",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)
IMAGE_SIZE = 256
REFERENCE_BATCH = 64
DISTINCT_PHOTOS = 64
TARGET_RATE = 600  # img/s end to end on one H100/H200 (the GPU issue's target)
PER_WORKER_IMAGES = 256  # images the one-worker PIL row decodes (it is the slow one)
# End-to-end variants on CUDA: encode's default with one speed-up turned off (EncoderSetup fields).
WITHOUT = [("channels_last", "without channels_last"),
           ("copy_stream", "copies on the encoder's stream, no look-ahead"),
           ("pin_memory", "pageable memory, blocking copies")]


@dataclass
class BenchEncodeResult:
    device: str
    weights: str
    batch_size: int
    images: int
    shards: int
    workers: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())

    def add(self, row: Row) -> None:
        self.rows.append(row)
        # As each row is measured: a run cut short (a GPU window's time limit) still shows it.
        log.info(f"bench encode, {row.name}: {row.rate:.4g} img/s")

    def report(self) -> str:
        """A table of images/s, each row against the reference setting's."""
        reference = self.rows[0].rate
        lines = [f"bench encode: {self.weights} at {IMAGE_SIZE} px on {self.device}, {self.date}; "
                 f"{self.images} JPEGs ({JPEG_SIDE} px) in {self.shards} webdataset shard(s), {self.workers} worker(s)",
                 f"  {'measurement':<72} {'images':>7} {'s':>8} {'img/s':>9} {'vs ref':>7}"]
        for row in self.rows:
            lines.append(f"  {row.name:<72} {row.images:>7} {row.seconds:>8.2f} {row.rate:>9.4g} "
                         f"{row.rate / reference:>6.2f}x")
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def bench_encode(device: str = "auto", images: int = 2048, batch_size: int = 256, *,
                 vae_config: dict[str, Any] | None = None, compile_encoder: bool = False) -> BenchEncodeResult:
    """Measure images/s end to end (JPEG shards -> store), with and without each of encode's
    speed-ups, beside the encoder alone (fp32 bs 64 the reference) and the decoding alone.

    `vae_config` replaces the DC-AE f32c32 architecture (random weights): a CPU smoke test's
    escape hatch, since the real encoder takes seconds per image there. `compile_encoder` adds
    rows for the encoder under torch.compile (its compilation takes a minute or more).
    """
    torch_device = resolve_device(device)
    vae, weights = _bench_vae(torch_device, vae_config)
    photos = jpeg_photos(min(images, DISTINCT_PHOTOS))
    result = BenchEncodeResult(device=device_description(torch_device), weights=weights, batch_size=batch_size,
                               images=images, shards=math.ceil(images / batch_size),
                               workers=min(default_workers(None), math.ceil(images / batch_size)))
    _encoder_rows(result, vae, photos, compile_encoder)
    _decoding_rows(result, photos, torch_device)
    with tempfile.TemporaryDirectory(prefix="revq-bench-encode-") as tmp:
        pattern = write_shards(Path(tmp) / "shards", photos, images, batch_size)
        variants = [("JPEG shards -> Zarr store, encode's defaults", {})]
        if torch_device.type == "cuda":
            variants += [(label, {"setup": {name: False}}) for name, label in WITHOUT]
        if _torchvision_importable():
            variants.append(("JPEGs decoded on the device", {"decode_on": "device"}))
        if compile_encoder:
            variants.append(("torch.compile", {"compile_encoder": True}))
        for number, (label, options) in enumerate(variants):
            try:
                _end_to_end(result, vae, pattern, Path(tmp) / f"store-{number}.zarr", label, **options)
            except Exception as err:  # noqa: BLE001 - one failing variant must not cost the others' rows
                result.notes.append(f"end to end, {label}: failed: {type(err).__name__}: "
                                    f"{(str(err).splitlines() or [''])[0][:160]}")
    return result


def _encoder_rows(result: BenchEncodeResult, vae: FrozenVae, photos: list[bytes], compile_encoder: bool) -> None:
    """The encoder alone: the reference, then on CUDA encode's setting contiguous, channels_last, compiled."""
    batch = to_model_input(torch.stack([preprocess(Image.open(io.BytesIO(j)), IMAGE_SIZE) for j in photos]))
    size, images = result.batch_size, result.images
    reference_batch = min(REFERENCE_BATCH, images)
    vae.tune()
    result.add(time_encoder(vae, batch, reference_batch, images, compute="float32",
                                    name=f"reference: encoder alone, fp32, batch {reference_batch}"))
    if vae.device.type != "cuda":
        result.notes.append("on the CPU the real encoder takes seconds per image: use a small --images "
                            "(--images 4 --batch-size 4 takes about 3 minutes on 2 cores); "
                            "bf16 and channels_last rows are measured on CUDA only")
        return
    result.add(time_encoder(vae, batch, size, images, compute="bf16-autocast",
                                    name=f"encoder alone, bf16 autocast, batch {size}"))
    vae.tune(channels_last=True)
    result.add(time_encoder(vae, batch, size, images, compute="bf16-autocast",
                                    name=f"encoder alone, bf16 autocast, channels_last, batch {size}"))
    if compile_encoder:  # compiled by the Timer's warm-up
        vae.tune(channels_last=True, compile_batch=size)
        result.add(time_encoder(vae, batch, size, images, compute="bf16-autocast",
                                        name=f"encoder alone, bf16, channels_last, torch.compile, batch {size}"))
    vae.tune()


def _decoding_rows(result: BenchEncodeResult, photos: list[bytes], device: torch.device) -> None:
    """Decoding alone: PIL in one worker and in encode's default count; on the device with torchvision."""
    workers, size = default_workers(None), result.batch_size
    one = time_worker_decoding(photos, min(result.images, PER_WORKER_IMAGES), size, 1, IMAGE_SIZE)
    result.add(one)
    if workers != 1:
        result.add(time_worker_decoding(photos, result.images, size, workers, IMAGE_SIZE))
    result.notes.append(f"PIL decodes {one.rate:.0f} img/s per worker process here: {math.ceil(TARGET_RATE / one.rate)} "
                        f"workers feed {TARGET_RATE} img/s; encode starts {workers} on this machine by default")
    if _torchvision_importable():
        result.add(time_device_decoding(photos, result.images, size, device, IMAGE_SIZE))
    else:
        result.notes.append("torchvision is not importable: no rows for decoding on the device")


def _end_to_end(result: BenchEncodeResult, vae: FrozenVae, pattern: str, out: Path, label: str, *,
                setup: dict[str, bool] | None = None, **options: Any) -> None:
    """One whole encode of the shards into a new store at `out`, timed as a whole; `options` any
    fields of EncodeConfig, `setup` EncoderSetup fields turned off."""
    from revq_pipe.stages.encode import prepare_encode, run_encode

    config = EncodeConfig(image_size=IMAGE_SIZE, batch_size=result.batch_size, device=str(vae.device),
                          progress=False, **options)
    job = prepare_encode(pattern, str(out), vae.spec, config)
    job.setup = replace(job.setup, **(setup or {}))
    started = time.perf_counter()
    try:
        summary = run_encode(job, vae)
    finally:
        vae.tune()
    result.add(Row(f"end to end, {summary.compute}: {label}", summary.count, time.perf_counter() - started))
    if not any(note.startswith("store:") for note in result.notes):
        representative = "random weights: not representative" if "random" in result.weights else "real latents"
        result.notes.append(f"store: {summary.count} latents, compression {summary.compression_ratio:.2f}x "
                            f"({representative})")


def _torchvision_importable() -> bool:
    from revq_pipe.pipeline.images.device_decode import torchvision_decoder

    try:
        torchvision_decoder()
    except UserError:
        return False
    return True


def _bench_vae(device: torch.device, config: dict[str, Any] | None) -> tuple[FrozenVae, str]:
    """The real DC-AE f32c32 when cached (and no config is forced), else its architecture."""
    from diffusers import AutoencoderDC

    cached = None if config is not None else cached_hub_spec(DEFAULT_VAE_ID)
    if cached is not None:
        return cached.load(device), f"DC-AE f32c32 checkpoint {DEFAULT_VAE_ID}"
    torch.manual_seed(0)
    module = AutoencoderDC(**(config or DC_AE_F32C32_CONFIG))
    model_config = {**dict(module.config), "_class_name": "AutoencoderDC"}
    name = ("DC-AE f32c32 architecture, random weights" if config is None
            else "a custom AutoencoderDC config, random weights")
    spec = VaeSpec(name=name, location="", subfolder=None, class_name="AutoencoderDC", config=model_config,
                   local_files_only=True, default_image_size=IMAGE_SIZE)
    return FrozenVae(spec, module, device), name
