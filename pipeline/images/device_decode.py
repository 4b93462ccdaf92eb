"""JPEG decoding on the encoding device (`encode --decode-on device`): nvJPEG on a GPU, through
torchvision.io.decode_jpeg, for when the CPUs cannot decode as fast as the encoder encodes.

The DataLoader workers still read every sample, but hand a plain JPEG over as its bytes (all of a
block's packed into one tensor, so a block crosses from the worker in one piece of shared memory);
anything else (PNG, CMYK or 16-bit JPEGs, a JPEG without its end marker, a file PIL cannot even
open) they decode with PIL as ever. The main process decodes a block's JPEGs in one batched call
on the device, then resizes and crops each there (`resize_center_crop_tensor`: the geometry of
PIL's path, a pixel at most one level apart). A JPEG the device rejects is decoded with PIL, and
skipped with PIL's reason only when PIL fails too: an image is skipped on this path when the
worker path skips it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.sources import decode_image, resize_center_crop_tensor, skip_reason

# JPEG colour modes PIL reports that the device decoder turns into RGB as PIL's convert("RGB") does.
DEVICE_JPEG_MODES = ("RGB", "L")
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"

DecodeJpegs = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def jpeg_for_device(data: bytes | str) -> bytes | None:
    """The bytes of `data` (bytes or a file path) when they are a JPEG the device decodes to what PIL
    would (8-bit RGB or grey, ending in its end marker); None otherwise, and when the file cannot be
    read: the worker then decodes the sample as it always does. Reads headers only."""
    try:
        if not isinstance(data, bytes):
            with open(data, "rb") as file:
                data = file.read()
        if not (data.startswith(JPEG_START) and data.rstrip(b"\0").endswith(JPEG_END)):
            return None  # cut short: PIL's full decode fails, and so must this path
        with Image.open(io.BytesIO(data)) as image:
            return data if image.format == "JPEG" and image.mode in DEVICE_JPEG_MODES else None
    except Exception:  # noqa: BLE001 - whatever PIL makes of it, the worker's own decode reports
        return None


@dataclass
class PackedJpegs:
    """A block's JPEGs for the device: their bytes end to end in one uint8 tensor, and for each its
    row in the block (its place among the block's decodable samples) and its span in `data`."""

    data: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    rows: list[tuple[int, int, int]] = field(default_factory=list)  # (row, start, stop)

    @classmethod
    def pack(cls, jpegs: list[tuple[int, bytes]]) -> "PackedJpegs":
        spans, offset = [], 0
        for row, data in jpegs:
            spans.append((row, offset, offset + len(data)))
            offset += len(data)
        joined = bytearray(b"".join(data for _, data in jpegs))
        return cls(torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8), spans)

    def __len__(self) -> int:
        return len(self.rows)

    def encoded(self) -> list[torch.Tensor]:
        """Each JPEG's bytes as the 1-D uint8 tensor decode_jpeg takes (views of `data`)."""
        return [self.data[start:stop] for _, start, stop in self.rows]


def torchvision_decoder() -> DecodeJpegs:
    """torchvision's batched decode_jpeg to RGB on a device; a UserError when torchvision is missing."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    # A torchvision built for another torch fails at import with a RuntimeError, not an ImportError.
    except Exception as err:  # noqa: BLE001
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"`decode_on=device` decodes JPEGs with torchvision.io.decode_jpeg, and torchvision "
                        f"cannot be imported here ({reason}): install it, or decode in the workers") from None

    def decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)

    return decode


class DeviceJpegDecoder:
    """Completes blocks whose JPEGs came as bytes: all their images, in row order, on `device`."""

    def __init__(self, device: torch.device, image_size: int, decode: DecodeJpegs | None = None):
        self.device, self.image_size = device, image_size
        self.decode = decode or torchvision_decoder()

    def images(self, block) -> torch.Tensor:
        """(rows, 3, S, S) uint8 on the device: the worker-decoded images and the JPEGs decoded here,
        in the block's row order. A JPEG neither the device nor PIL decodes leaves the block's rows
        and is added to its skipped samples, as the worker would have done."""
        jpegs, from_worker = block.jpegs, iter(block.images.to(self.device, non_blocking=True))
        encoded = jpegs.encoded()
        decoded = self._decode_all(encoded)
        at_row = {row: number for number, (row, _, _) in enumerate(jpegs.rows)}
        images, kept = [], []
        for row in range(len(block.indices)):
            number = at_row.get(row)
            if number is None:
                images.append(next(from_worker))
            elif decoded[number] is not None:
                images.append(resize_center_crop_tensor(decoded[number], self.image_size))
            else:
                try:  # the device refused it: PIL decides, as on the worker path
                    images.append(decode_image(bytes(encoded[number].numpy()), self.image_size).to(self.device))
                except Exception as err:  # noqa: BLE001 - as BlockBuilder skips a sample
                    block.skipped.append((block.indices[row], block.keys[row], skip_reason(err)))
                    continue
            kept.append(row)
        _keep_rows(block, kept)
        block.jpegs = None
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8, device=self.device)
        return torch.stack(images)

    def _decode_all(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each JPEG decoded on the device, None where that fails (a batch fails as a whole, so a
        failed batch is decoded again image by image to find which)."""
        if not encoded:
            return []
        try:
            return list(self.decode(encoded, self.device))
        except Exception:  # noqa: BLE001 - nvJPEG's errors come as RuntimeError, others as anything
            pass
        decoded = []
        for one in encoded:
            try:
                decoded.append(self.decode([one], self.device)[0])
            except Exception:  # noqa: BLE001
                decoded.append(None)
        return decoded


def _keep_rows(block, kept: list[int]) -> None:
    """Leave only rows `kept` in the block's bookkeeping; skipped samples back in source order."""
    block.indices = [block.indices[row] for row in kept]
    block.keys = [block.keys[row] for row in kept]
    block.labels = [block.labels[row] for row in kept]
    block.skipped.sort(key=lambda skip: skip[0])
