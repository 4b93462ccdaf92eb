"""`revq-pipe bench encode`: stage one's images/s beside the reference setting, in one run.

The VAE is DC-AE f32c32, the paper's: its checkpoint when it is in the local Hugging Face cache,
otherwise the same architecture built from its config with random weights (speed does not depend
on the weights). The config below is diffusers' own for the SANA DC-AE f32c32
(`convert_ae` in diffusers/scripts/convert_dcae_to_diffusers.py, the architecture of
mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers; sana-1.1 retrained only the decoder's weights).

Rows, all on the same JPEG images:
- reference: the encoder alone in fp32 at batch 64, as the ReVQ reference script runs it;
- on CUDA, the encoder alone at the project's setting (bf16 autocast, --batch-size), and the
  same with channels_last inputs and weights, a candidate layout measured for a later decision;
- on CUDA with `compile_encoder`, the channels_last encoder under torch.compile;
- decoding alone: PIL in as many DataLoader workers as encode starts (a second pass over the
  images, so the workers' start stays out), and on CUDA nvJPEG through torchvision's decode_jpeg
  with the resize and crop on the device;
- end to end: `encode` from webdataset shards of JPEGs to a Zarr store (decode, resize, encode,
  compress, write, statistics), wall clock of the whole call.
The encoder rows and the nvJPEG row time a fixed number of batches with
`torch.utils.benchmark.Timer` (after its two warm-up batches); the end-to-end row is one call of
the stage, timed as a whole.

What encode needs for 600 img/s end to end on one H100/H200, for the pass that changes
stages/encode.py and pipeline/images/ (these rows measure each piece first): the encoder itself
past 600 img/s (bf16 autocast is there; channels_last and torch.compile are the rows above);
decode workers enough for that rate (the PIL row per worker count: encode starts one per CPU, at
most 16); pinned host memory and non-blocking copies (there: `Block.pin_memory`,
`encode_block`), with the copy of block n+1 on a side stream while block n encodes (not yet: the
copy now queues on the encoder's stream); and nvJPEG decoding as an option when the CPUs cannot
keep up (the nvJPEG row; torchvision is then a dependency of that option).
"""

from __future__ import annotations

import datetime
import io
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.images.sample_images import HOLDOUT_PHOTOS, TRAIN_PHOTOS, photo_crops
from revq_pipe.pipeline.images.sources import decode_image, preprocess, resize_center_crop_tensor, to_model_input
from revq_pipe.pipeline.images.vae import DEFAULT_VAE_ID, FrozenVae, VaeSpec, cached_hub_spec
from revq_pipe.pipeline.reporting.benchmarking import device_description, mean_seconds

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
# Source JPEGs about ImageNet's average pixel count (500x375), so decoding costs what it would there.
JPEG_SIDE = 448
DISTINCT_PHOTOS = 64
CUDA_MIN_TIMED_BATCHES = 5


@dataclass
class Row:
    name: str
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


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

    def report(self) -> str:
        """A table of images/s, each row against the reference setting's."""
        reference = self.rows[0].rate
        lines = [f"bench encode: {self.weights} at {IMAGE_SIZE} px on {self.device}, {self.date}; "
                 f"{self.images} JPEGs ({JPEG_SIDE} px) in {self.shards} webdataset shard(s), {self.workers} worker(s)",
                 f"  {'measurement':<58} {'images':>7} {'s':>8} {'img/s':>9} {'vs ref':>7}"]
        for row in self.rows:
            lines.append(f"  {row.name:<58} {row.images:>7} {row.seconds:>8.2f} {row.rate:>9.4g} "
                         f"{row.rate / reference:>6.2f}x")
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def bench_encode(device: str = "auto", images: int = 2048, batch_size: int = 256, *,
                 vae_config: dict[str, Any] | None = None, compile_encoder: bool = False) -> BenchEncodeResult:
    """Measure images/s end to end (JPEG shards -> store) beside the encoder alone, fp32 bs 64,
    and the decoding alone (PIL in DataLoader workers; nvJPEG on CUDA when torchvision is there).

    `vae_config` replaces the DC-AE f32c32 architecture (random weights): a CPU smoke test's
    escape hatch, since the real encoder takes seconds per image there. `compile_encoder` adds a
    row for the encoder under torch.compile on CUDA (its compilation takes a minute or more).
    """
    from revq_pipe.pipeline.images.sources import default_workers
    from revq_pipe.stages.encode import prepare_encode, run_encode

    torch_device = resolve_device(device)
    vae, weights = _bench_vae(torch_device, vae_config)
    photos = _jpeg_photos(min(images, DISTINCT_PHOTOS))
    result = BenchEncodeResult(device=device_description(torch_device), weights=weights, batch_size=batch_size,
                               images=images, shards=math.ceil(images / batch_size), workers=0)
    batch = to_model_input(torch.stack([preprocess(_open(j), IMAGE_SIZE) for j in photos]))

    reference_batch = min(REFERENCE_BATCH, images)
    result.rows.append(_time_encoder(vae, batch, reference_batch, images, full_precision=True,
                                     name=f"reference: encoder alone, fp32, batch {reference_batch}"))
    if torch_device.type == "cuda":
        result.rows.append(_time_encoder(vae, batch, batch_size, images, full_precision=False,
                                         name=f"encoder alone, bf16 autocast, batch {batch_size}"))
        vae.module.to(memory_format=torch.channels_last)
        result.rows.append(_time_encoder(vae, batch, batch_size, images, full_precision=False, channels_last=True,
                                         name=f"encoder alone, bf16 autocast, channels_last, batch {batch_size}"))
        if compile_encoder:
            result.rows.append(_time_compiled_encoder(vae, batch, batch_size, images))
        vae.module.to(memory_format=torch.contiguous_format)
    else:
        result.notes.append("on the CPU the real encoder takes seconds per image: use a small --images "
                            "(--images 4 --batch-size 4 takes about 3 minutes on 2 cores); "
                            "bf16 rows are measured on CUDA only")

    result.rows.append(_time_cpu_decoding(photos, images, batch_size, default_workers(None)))
    if torch_device.type == "cuda":
        result.rows.append(_time_gpu_decoding(photos, images, batch_size, torch_device, result.notes))

    with tempfile.TemporaryDirectory(prefix="revq-bench-encode-") as tmp:
        pattern = _write_shards(Path(tmp) / "shards", photos, images, batch_size)
        job = prepare_encode(pattern, str(Path(tmp) / "store.zarr"), vae.spec, image_size=IMAGE_SIZE,
                             batch_size=batch_size, device=str(torch_device), progress=False)
        result.workers = min(default_workers(None), result.shards)
        started = time.perf_counter()
        summary = run_encode(job, vae)
        seconds = time.perf_counter() - started
    result.rows.append(Row(f"end to end: JPEG shards -> Zarr store, {summary.compute}, batch {batch_size}",
                           summary.count, seconds))
    result.notes.append(f"store: {summary.count} latents, compression {summary.compression_ratio:.2f}x "
                        f"({'random weights: not representative' if 'random' in weights else 'real latents'})")
    return result


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


def _time_encoder(vae: FrozenVae, photos: torch.Tensor, batch_size: int, images: int, *, full_precision: bool,
                  name: str, channels_last: bool = False) -> Row:
    """Encoder-only images/s on preprocessed photos already on the device (Timer warms up first)."""
    repeats = math.ceil(batch_size / len(photos))
    batch = photos.repeat(repeats, 1, 1, 1)[:batch_size].to(vae.device)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    batches = math.ceil(images / batch_size)
    if vae.device.type == "cuda":
        batches = max(batches, CUDA_MIN_TIMED_BATCHES)
    with vae.autocast(full_precision):
        seconds = mean_seconds(lambda: vae.encode(batch), batches) * batches
    return Row(name, batches * batch_size, seconds)


def _time_compiled_encoder(vae: FrozenVae, photos: torch.Tensor, batch_size: int, images: int) -> Row:
    """The channels_last bf16 row with the encoder module under torch.compile (compiled by the warm-up)."""
    eager = vae.module
    vae.module = torch.compile(eager)
    try:
        return _time_encoder(vae, photos, batch_size, images, full_precision=False, channels_last=True,
                             name=f"encoder alone, bf16, channels_last, torch.compile, batch {batch_size}")
    finally:
        vae.module = eager


class _JpegFiles(torch.utils.data.Dataset):
    """`count` JPEGs cycling through `photos`, decoded, resized and cropped as encode does."""

    def __init__(self, photos: list[bytes], count: int):
        self.photos, self.count = photos, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_image(self.photos[index % len(self.photos)], IMAGE_SIZE)


def _time_cpu_decoding(photos: list[bytes], images: int, batch_size: int, workers: int) -> Row:
    """JPEG -> uint8 batches with PIL in `workers` DataLoader processes, as encode decodes; timed over
    a second pass so that starting the workers stays out (how many workers feed 600 img/s)."""
    loader = torch.utils.data.DataLoader(_JpegFiles(photos, images), batch_size=batch_size, num_workers=workers,
                                         persistent_workers=workers > 0)
    for _ in loader:
        pass
    started = time.perf_counter()
    for _ in loader:
        pass
    return Row(f"decode alone: PIL in {workers} DataLoader workers, batch {batch_size}", images,
               time.perf_counter() - started)


def _time_gpu_decoding(photos: list[bytes], images: int, batch_size: int, device: torch.device,
                       notes: list[str]) -> Row:
    """JPEG -> uint8 batches on the GPU: nvJPEG through torchvision.io.decode_jpeg, then the same
    resize (bilinear, antialiased) and center crop on the device: an option for when the CPUs
    cannot feed the encoder. Only the compressed bytes cross to the GPU."""
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        notes.append("torchvision is not installed: no nvJPEG decode row")
        return Row("decode alone: nvJPEG on the GPU (torchvision missing)", 0, float("nan"))
    encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in photos]
    batch = [encoded[i % len(encoded)] for i in range(batch_size)]

    def decode_batch() -> torch.Tensor:
        decoded = decode_jpeg(batch, device=device)
        return torch.stack([resize_center_crop_tensor(image, IMAGE_SIZE) for image in decoded])

    batches = max(math.ceil(images / batch_size), CUDA_MIN_TIMED_BATCHES)
    seconds = mean_seconds(decode_batch, batches) * batches
    return Row(f"decode alone: nvJPEG on the GPU (torchvision), batch {batch_size}", batches * batch_size, seconds)


def _jpeg_photos(count: int) -> list[bytes]:
    crops = photo_crops(TRAIN_PHOTOS + HOLDOUT_PHOTOS, count, seed=0, out_size=JPEG_SIDE)
    encoded = []
    for _, image in crops:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def _open(jpeg: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(jpeg))


def _write_shards(folder: Path, photos: list[bytes], images: int, shard_size: int) -> str:
    """`images` samples cycling through the photos, `shard_size` per shard (one GPU batch each,
    so that every worker has a shard to decode); returns the brace pattern."""
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "bench-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i in range(images):
            sink.write({"__key__": f"{i:08d}", "jpg": photos[i % len(photos)], "cls": str(i % 10)})
    last = math.ceil(images / shard_size) - 1
    return str(folder / f"bench-{{000000..{last:06d}}}.tar")
