"""Feeding the frozen encoder so that a GPU never waits: the loop every encode path runs.

    DataLoader workers ─blocks─▶ pinned memory ─side stream: copy (or decode) block n+1─▶ encoder: block n
                                                                                              │
                               host memory ◀─side stream: latents of block n─────────────────┘

On CUDA the blocks arrive in pinned memory (DataLoader pin_memory), and a side stream copies block
n+1 to the device (or decodes its JPEGs there, with `decode_on="device"`) while the encoder's
stream works on block n; the latents of block n go back to pinned host memory on the side stream
too, while block n+1 is encoded, and only the writer waits for them. Each of these only changes
speed; `EncoderSetup` turns them off one by one for `bench encode`, which measures each. On the
CPU none of them applies, and encode computes what it always has.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from revq_pipe.pipeline.images.sources import Block, BlockDataset


@dataclass(frozen=True)
class EncoderSetup:
    """How blocks reach the encoder and how it runs.

    `decode_on`: "workers" (PIL in the DataLoader processes) or "device" (JPEGs decoded by
    torchvision on the encoding device: nvJPEG on a GPU; the pixels then differ from PIL's by a
    level here and there, so stores record it). `compile`: the encoder under torch.compile (its
    latents differ by rounding). These two come from the user's `EncodeConfig`, which checked them
    (pipeline/images/encode_config.py). `channels_last`, `pin_memory`, `copy_stream`: None turns
    each on where it only speeds things up, on CUDA.
    """

    decode_on: str = "workers"
    compile: bool = False
    channels_last: bool | None = None
    pin_memory: bool | None = None
    copy_stream: bool | None = None

    def on(self, device: torch.device) -> "EncoderSetup":
        """Every choice made for `device`."""
        cuda = device.type == "cuda"
        return replace(self, **{name: cuda for name in ("channels_last", "pin_memory", "copy_stream")
                                if getattr(self, name) is None})

    def record(self) -> dict:
        return asdict(self)


class HostLatents:
    """A block's latents on their way to host memory; `numpy()` waits for them."""

    def __init__(self, latents: torch.Tensor, ready: torch.cuda.Event | None = None):
        self.latents, self.ready = latents, ready

    @classmethod
    def copy(cls, latents: torch.Tensor, stream: torch.cuda.Stream | None, pinned: bool) -> "HostLatents":
        """Start the copy of device latents to the host (on `stream` once the encoder's stream has made
        them; without one, on the encoder's stream); into pinned memory without waiting when `pinned`."""
        if latents.device.type != "cuda":
            return cls(latents)
        if stream is None:
            host = latents.to("cpu", non_blocking=pinned)
        else:
            stream.wait_stream(torch.cuda.current_stream(latents.device))
            with torch.cuda.stream(stream):
                host = latents.to("cpu", non_blocking=pinned)
            latents.record_stream(stream)  # the allocator must not reuse it before the copy is done
        ready = torch.cuda.Event()
        ready.record(stream)
        return cls(host, ready)

    def numpy(self):
        if self.ready is not None:
            self.ready.synchronize()
        return self.latents.numpy()


class BlockFeed:
    """Blocks with their images on the device. With a side `stream`, block n+1 is copied (or its
    JPEGs decoded by `decoder`) on it while the caller encodes block n on its own stream."""

    def __init__(self, blocks: Iterable[Block], device: torch.device, *, stream: torch.cuda.Stream | None,
                 decoder=None):
        self.blocks, self.device, self.stream, self.decoder = blocks, device, stream, decoder

    def __iter__(self) -> Iterator[Block]:
        if self.stream is None:
            for block in self.blocks:
                yield self._to_device(block)
            return
        staged = None
        for block in self.blocks:
            with torch.cuda.stream(self.stream):
                self._to_device(block)
            ready = torch.cuda.Event()
            ready.record(self.stream)
            if staged is not None:
                yield self._wait(*staged)
            staged = block, ready
        if staged is not None:
            yield self._wait(*staged)

    def _to_device(self, block: Block) -> Block:
        if block.error:
            return block
        if self.decoder is not None:
            block.images = self.decoder.images(block)
        else:
            block.images = block.images.to(self.device, non_blocking=True)
        return block

    def _wait(self, block: Block, ready: torch.cuda.Event) -> Block:
        """The block, once the encoder's stream has waited for its images (which it then owns)."""
        encoder_stream = torch.cuda.current_stream(self.device)
        encoder_stream.wait_event(ready)
        if block.images is not None and block.images.is_cuda:
            block.images.record_stream(encoder_stream)
        return block


def encoded_blocks(vae, units: list, *, image_size: int, batch_size: int, workers: int,
                   latent_shape: tuple[int, int, int], dtype: str, flip: bool,
                   setup: EncoderSetup) -> Iterator[tuple[Block, HostLatents | None]]:
    """Every block of `units`, decoded (in up to `workers` DataLoader processes; JPEGs on the
    device with setup.decode_on="device"), encoded by `vae` (a FrozenVae, tuned as `setup` says)
    and its latents on their way to the host (None when no image of the block decoded). Iterate
    inside `vae.autocast(compute)`."""
    setup = setup.on(vae.device)
    vae.tune(channels_last=setup.channels_last, compile_batch=batch_size if setup.compile else None)
    decoder = None
    if setup.decode_on == "device":
        from revq_pipe.pipeline.images.device_decode import DeviceJpegDecoder

        decoder = DeviceJpegDecoder(vae.device, image_size)
    loader = DataLoader(BlockDataset(units, image_size, batch_size, jpegs_for_device=decoder is not None),
                        batch_size=None, num_workers=min(workers, len(units)), pin_memory=setup.pin_memory)
    stream = torch.cuda.Stream(vae.device) if setup.copy_stream else None
    feed = BlockFeed(loader, vae.device, stream=stream, decoder=decoder)
    for block, latents in vae.encode_blocks(feed, latent_shape=latent_shape, dtype=dtype, flip=flip):
        yield block, None if latents is None else HostLatents.copy(latents, stream, setup.pin_memory)
