"""The pieces `bench encode` times (stages/bench/encode.py): the encoder alone, decoding alone (PIL
in DataLoader workers, or on the device as `encode --decode-on device` does), and the JPEG photos
and webdataset shards they all read.

The encoder rows and the device-decoding row time a fixed number of batches with
`torch.utils.benchmark.Timer` (after its two warm-up batches); the PIL row times a second pass
over the images, so that starting the worker processes stays out.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from revq_pipe.pipeline.images.sample_images import HOLDOUT_PHOTOS, TRAIN_PHOTOS, photo_crops
from revq_pipe.pipeline.images.sources import Block, decode_image
from revq_pipe.pipeline.reporting.benchmarking import mean_seconds

# Source JPEGs about ImageNet's average pixel count (500x375), so decoding costs what it would there.
JPEG_SIDE = 448
CUDA_MIN_TIMED_BATCHES = 5


@dataclass
class Row:
    name: str
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def jpeg_photos(count: int) -> list[bytes]:
    """`count` distinct JPEGs (quality 90) of the bundled photos, JPEG_SIDE pixels square."""
    crops = photo_crops(TRAIN_PHOTOS + HOLDOUT_PHOTOS, count, seed=0, out_size=JPEG_SIDE)
    encoded = []
    for _, image in crops:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def write_shards(folder: Path, photos: list[bytes], images: int, shard_size: int) -> str:
    """`images` samples cycling through the photos, `shard_size` per shard (one GPU batch each,
    so that every worker has a shard to decode); returns the brace pattern."""
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "bench-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i in range(images):
            sink.write({"__key__": f"{i:08d}", "jpg": photos[i % len(photos)], "cls": str(i % 10)})
    last = math.ceil(images / shard_size) - 1
    return str(folder / f"bench-{{000000..{last:06d}}}.tar")


def time_encoder(vae, photos: torch.Tensor, batch_size: int, images: int, *, compute: str, name: str) -> Row:
    """Encoder-only images/s on preprocessed photos already on the device, as `vae` is tuned now."""
    repeats = math.ceil(batch_size / len(photos))
    batch = photos.repeat(repeats, 1, 1, 1)[:batch_size].to(vae.device)
    batches = math.ceil(images / batch_size)
    if vae.device.type == "cuda":
        batches = max(batches, CUDA_MIN_TIMED_BATCHES)
    with vae.autocast(compute):
        seconds = mean_seconds(lambda: vae.encode(batch), batches) * batches
    return Row(name, batches * batch_size, seconds)


class _JpegFiles(torch.utils.data.Dataset):
    """`count` JPEGs cycling through `photos`, decoded, resized and cropped as encode does."""

    def __init__(self, photos: list[bytes], count: int, image_size: int):
        self.photos, self.count, self.image_size = photos, count, image_size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_image(self.photos[index % len(self.photos)], self.image_size)


def time_worker_decoding(photos: list[bytes], images: int, batch_size: int, workers: int, image_size: int) -> Row:
    """JPEG -> uint8 batches with PIL in `workers` DataLoader processes, as encode decodes; timed over
    a second pass so that starting the workers stays out."""
    loader = torch.utils.data.DataLoader(_JpegFiles(photos, images, image_size), batch_size=batch_size,
                                         num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:
        pass
    started = time.perf_counter()
    for _ in loader:
        pass
    return Row(f"decode alone: PIL in {workers} DataLoader worker{'s' if workers != 1 else ''}, batch {batch_size}",
               images, time.perf_counter() - started)


def time_device_decoding(photos: list[bytes], images: int, batch_size: int, device: torch.device,
                         image_size: int) -> Row:
    """JPEG -> uint8 batches on the device as `encode --decode-on device` does them (DeviceJpegDecoder:
    torchvision's batched decode_jpeg, nvJPEG on a GPU, then the resize and crop there). Only the
    compressed bytes cross to the GPU."""
    from revq_pipe.pipeline.images.device_decode import DeviceJpegDecoder, PackedJpegs

    decoder = DeviceJpegDecoder(device, image_size)
    jpegs = PackedJpegs.pack([(row, photos[row % len(photos)]) for row in range(batch_size)])
    empty = torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)

    def decode_batch() -> torch.Tensor:
        block = Block(0, 0, batch_size, True, empty, list(range(batch_size)), [""] * batch_size, [0] * batch_size,
                      jpegs=jpegs)
        return decoder.images(block)

    batches = math.ceil(images / batch_size)
    if device.type == "cuda":
        batches = max(batches, CUDA_MIN_TIMED_BATCHES)
    seconds = mean_seconds(decode_batch, batches) * batches
    where = "nvJPEG" if device.type == "cuda" else "libjpeg in this process"
    return Row(f"decode alone: on the device, torchvision ({where}), batch {batch_size}", batches * batch_size,
               seconds)
