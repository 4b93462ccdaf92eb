"""Image sources for `encode`: ImageFolder trees and webdataset shards, read as ordered blocks.

A source is a list of *parts* whose samples have fixed positions `(part, index)`: an ImageFolder
tree is one part (its files in sorted order); a webdataset source has one part per shard. The
store's rows follow that natural order, minus the samples that could not be decoded.

Work is cut into *blocks* of `block_size` consecutive samples of one part (the last block of a
part may be shorter). A block is decoded in one DataLoader worker and encoded as one GPU batch,
so the batch an image is encoded in depends only on its position, never on the worker count or
on where an interrupted run resumed: that is what makes a resumed store bit-identical to an
uninterrupted one. Workers may deliver blocks out of order (each webdataset worker reads its own
shards); the latent writer (pipeline/storage/latent_writer.py) puts the small latents back in order, not
the big decoded images.

Preprocessing follows the ReVQ reference (torchvision ImageFolder + Resize(S) + CenterCrop(S) +
ToTensor, then x*2-1): RGB conversion, bilinear resize of the short side to S, centre crop S x S.
Workers return uint8 tensors (4x fewer bytes to pin and copy); `to_model_input` scales on the
device.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.folder_walk import FolderWalk
from revq_pipe.pipeline.paths import local_path
from revq_pipe.pipeline.preflight import SHARD_SUFFIXES, local_source

if TYPE_CHECKING:
    from revq_pipe.pipeline.images.device_decode import PackedJpegs

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
# Label members of a webdataset sample, as in the common ImageNet-1k webdataset layout.
LABEL_MEMBERS = ("cls", "cls.txt")
UNKNOWN_LABEL = -1
# Encode's default decode processes: one per CPU but one, for the encoding process (it issues the
# GPU work, pins each block, runs the writer thread), and at most 16. PIL decodes, resizes and crops
# ImageNet-sized JPEGs to 256 px at about 194 img/s per process (DESIGN.md: about 3,100 img/s on 16
# processes), so one GPU at 600 img/s needs 4; 16 give about 3,100 img/s, room for larger images
# and slower cores, and more would only hold more blocks in shared memory.
MAX_DEFAULT_WORKERS = 16


# --------------------------------------------------------------------------- preprocessing


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL image: grayscale, palette, CMYK, 16-bit and alpha images included.

    Alpha is dropped as torchvision's loader does (`convert("RGB")`); palette images with a
    transparency entry go through RGBA first, which is what PIL recommends. 16-bit grayscale
    (modes I;16 and I) is scaled to 8 bits rather than clipped, so it is not all white.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(wide / 257.0, 0, 255).round().astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).round().astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) then CenterCrop(size) on a PIL image, to the pixel.

    Resize: the short side becomes `size`, the long side `int(size * long / short)`, PIL bilinear
    (antialiased on downscaling). CenterCrop: offsets `int(round((side - size) / 2))`.
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def resize_center_crop_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8 on the tensor's device (images decoded on a GPU) with
    `resize_center_crop`'s geometry (bilinear, antialiased; a pixel may differ from PIL's by one level)."""
    _, h, w = image.shape
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    resized = torch.nn.functional.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return resized[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """One image as a (3, size, size) uint8 tensor, ready for `to_model_input`."""
    array = np.asarray(resize_center_crop(to_rgb(image), size), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 in [-1, 1], computed as the reference does (x/255*2-1)."""
    return images.float().div_(255.0).mul_(2.0).sub_(1.0)


def decode_image(data: bytes | str | Path, size: int) -> torch.Tensor:
    """Decode image bytes (or a file) fully and preprocess it; raises on corrupt/truncated data,
    and on a path that is not a regular file (reading a FIFO would wait forever)."""
    if not isinstance(data, bytes) and not stat.S_ISREG(os.stat(data).st_mode):
        raise ValueError("not a regular file")
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        image.load()  # force the full decode now, so a truncated file fails here
        return preprocess(image, size)


# --------------------------------------------------------------------------- blocks


@dataclass
class Block:
    """Decoded samples [start, start + size) of one part, as one GPU batch.

    `images` holds only the samples that decoded; `skipped` names the others. `last` marks the
    final block of its part (the reader then knows the part's length). `error`, when set, is a
    problem with the source itself (an unreadable shard) that must stop the run: workers report
    it as data so the main process can raise it as one clear line.
    """

    part: int
    start: int
    size: int
    last: bool
    images: torch.Tensor
    indices: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (index, key, reason)
    error: str | None = None
    jpegs: PackedJpegs | None = None  # JPEGs left for the device to decode (encode's decode_on=device)

    def pin_memory(self) -> "Block":
        """Called by DataLoader(pin_memory=True) so the host-to-GPU copy can be asynchronous."""
        self.images = self.images.pin_memory()
        return self


class BlockBuilder:
    """Collects the decoded samples of one block; with `jpegs_for_device`, plain JPEGs are kept as
    bytes for the device to decode (pipeline/images/device_decode.py)."""

    def __init__(self, part: int, start: int, image_size: int, jpegs_for_device: bool = False):
        self.part, self.start, self.image_size = part, start, image_size
        self.jpegs_for_device = jpegs_for_device
        self.jpegs: list[tuple[int, bytes]] = []  # (row, bytes)
        self.images: list[torch.Tensor] = []
        self.indices: list[int] = []
        self.keys: list[str] = []
        self.labels: list[int] = []
        self.skipped: list[tuple[int, str, str]] = []
        self.count = 0

    def add(self, key: str, label: int, data: bytes | str | Path | None, reason: str | None = None) -> None:
        """Decode one sample into the block, or record why it is skipped."""
        index = self.start + self.count
        self.count += 1
        if data is None:
            self.skipped.append((index, key, reason or "no image"))
            return
        jpeg = self._jpeg_for_device(data)
        if jpeg is not None:
            self.jpegs.append((len(self.indices), jpeg))
        else:
            try:
                self.images.append(decode_image(data, self.image_size))
            # Any failure to decode one image (truncated, corrupt, unsupported, decompression bomb)
            # skips that image: one bad file must not stop a multi-hour run.
            except Exception as err:  # noqa: BLE001
                self.skipped.append((index, key, skip_reason(err)))
                return
        self.indices.append(index)
        self.keys.append(key)
        self.labels.append(label)

    def _jpeg_for_device(self, data: bytes | str | Path) -> bytes | None:
        if not self.jpegs_for_device:
            return None
        from revq_pipe.pipeline.images.device_decode import jpeg_for_device

        return jpeg_for_device(data if isinstance(data, bytes) else str(data))

    def build(self, last: bool) -> Block:
        images = torch.stack(self.images) if self.images else _no_images(self.image_size)
        block = Block(self.part, self.start, self.count, last, images, self.indices, self.keys, self.labels,
                      self.skipped)
        if self.jpegs_for_device:
            from revq_pipe.pipeline.images.device_decode import PackedJpegs

            block.jpegs = PackedJpegs.pack(self.jpegs)
        return block


def skip_reason(err: Exception) -> str:
    """Why a sample is skipped, in one short line: its decoding error."""
    return f"{type(err).__name__}: {err}".splitlines()[0][:200]


# --------------------------------------------------------------------------- work units


@dataclass
class FolderBlockUnit:
    """Files [start, stop) of an ImageFolder tree: one block."""

    part = 0  # an ImageFolder tree is one part
    root: str
    entries: list[tuple[str, int]]  # (relative path, label) of these files
    start: int
    last: bool

    def blocks(self, image_size: int, block_size: int, jpegs_for_device: bool = False) -> Iterator[Block]:
        builder = BlockBuilder(0, self.start, image_size, jpegs_for_device)
        for rel, label in self.entries:
            builder.add(rel, label, os.path.join(self.root, rel))
        yield builder.build(self.last)


@dataclass
class ShardUnit:
    """One webdataset shard, read from sample `start` on (a multiple of the block size)."""

    part: int
    url: str
    start: int

    def blocks(self, image_size: int, block_size: int, jpegs_for_device: bool = False) -> Iterator[Block]:
        import fsspec
        from webdataset.tariterators import group_by_keys, tar_file_expander

        builder: BlockBuilder | None = None
        index = 0
        try:
            with fsspec.open(self.url, "rb") as stream:
                samples = group_by_keys(tar_file_expander([{"url": self.url, "stream": stream}]))
                for sample in samples:
                    if index < self.start:  # resuming: skip already-stored samples undecoded
                        index += 1
                        continue
                    if builder is None:
                        builder = BlockBuilder(self.part, index, image_size, jpegs_for_device)
                    key, label, data, reason = _parse_sample(sample)
                    builder.add(key, label, data, reason)
                    index += 1
                    if builder.count == block_size:
                        # The shard's length is unknown until it ends, so a full block is never
                        # marked last; the end comes as a final (possibly empty) block.
                        yield builder.build(last=False)
                        builder = None
        except BadLabel as err:  # bad data, not an unreadable shard: the run stops, the shard is to be fixed
            message = f"webdataset shard {self.url}, {err}"
            yield Block(self.part, index, 0, True, _no_images(image_size), error=message.splitlines()[0])
            return
        except Exception as err:  # noqa: BLE001 - reported as one line by the main process
            message = f"cannot read webdataset shard {self.url}: {type(err).__name__}: {err}"
            yield Block(self.part, index, 0, True, _no_images(image_size), error=message.splitlines()[0])
            return
        if builder is None:
            builder = BlockBuilder(self.part, max(index, self.start), image_size, jpegs_for_device)
        yield builder.build(last=True)


def _no_images(image_size: int) -> torch.Tensor:
    return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)


class BadLabel(ValueError):
    """A sample's label member holds something other than a label (see `_parse_sample`)."""


def _parse_sample(sample: dict) -> tuple[str, int, bytes | None, str | None]:
    """(key, label, image bytes or None, reason when None) of one webdataset sample."""
    key = str(sample.get("__key__"))
    image_member = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    label = UNKNOWN_LABEL
    for member in LABEL_MEMBERS:
        if member in sample:
            text = sample[member].decode("utf-8", "replace").strip()
            # The rule for labels of every source: -1 (unknown) or a class number an int64 holds.
            if not re.fullmatch(r"-1|\d{1,19}", text) or int(text) >= 2**63:
                raise BadLabel(f"sample {key!r}: its {member} {text[:40]!r} is neither -1 (unknown) nor a class "
                               f"number from 0 to 2^63-1: fix it, or remove the member to store the sample with -1")
            label = int(text)
            break
    if image_member is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        return key, label, None, f"no image member (has {', '.join(members) or 'nothing'})"
    return key, label, sample[image_member], None


class BlockDataset(IterableDataset):
    """Blocks of decoded images for a DataLoader (batch_size=None).

    Worker `w` of `W` takes work units w, w+W, ...; with no workers, the main process takes all.
    With `jpegs_for_device`, plain JPEGs come as bytes for the device to decode.
    """

    def __init__(self, units: list, image_size: int, block_size: int, jpegs_for_device: bool = False):
        super().__init__()
        self.units, self.image_size, self.block_size = units, image_size, block_size
        self.jpegs_for_device = jpegs_for_device

    def __iter__(self) -> Iterator[Block]:
        info = get_worker_info()
        if info is not None:
            _quiet_when_the_main_process_stops()
        units = self.units if info is None else self.units[info.id :: info.num_workers]
        for unit in units:
            yield from unit.blocks(self.image_size, self.block_size, self.jpegs_for_device)


def _quiet_when_the_main_process_stops() -> None:
    """In a DataLoader worker: a block's transfer that the main process cut by stopping (Ctrl-C
    while it received the block) ends the thread serving it without a traceback on the user's
    terminal; the worker itself is stopped right after."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not issubclass(args.exc_type, (ConnectionError, EOFError)):
            default(args)

    threading.excepthook = hook


def default_workers(workers: int | None = None) -> int:
    """DataLoader processes to decode with: `workers` when given, else one per CPU of this process
    but one, at least 1 and at most MAX_DEFAULT_WORKERS."""
    if workers is not None:
        return workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus - 1, MAX_DEFAULT_WORKERS))


# --------------------------------------------------------------------------- sources


@dataclass
class Cursor:
    """The first source position not yet in the store: sample `index` of part `part`."""

    part: int = 0
    index: int = 0


class ImageFolderSource:
    """A directory of images: class sub-folders (labels in sorted order) or a flat folder (-1).
    `classes` names the labels: label i is the folder classes[i] (empty for a flat folder)."""

    kind = "folder"

    def __init__(self, root: Path, entries: list[tuple[str, int]], classes: list[str]):
        self.root, self.entries, self.classes = root, entries, classes

    @classmethod
    def scan(cls, root: Path, follow_links: bool = False) -> "ImageFolderSource":
        """List the images under `root` (links followed as pipeline/images/folder_walk.py says; out of the
        root only with `follow_links`); a folder with no images is a user error."""
        walk = FolderWalk(root, follow_outside=follow_links)
        subdirs, top_files = walk.names(root)
        top_images, top_others = _split_files(top_files)
        entries: list[tuple[str, int]] = []
        others: list[str] = list(top_others)
        if subdirs and top_images:
            raise UserError(f"{root} has images at its top level (e.g. {top_images[0]}) beside class sub-folders "
                            f"(e.g. {subdirs[0]}/): put every image in a class folder, or use a flat folder")
        if subdirs:
            for label, name in enumerate(subdirs):  # a class whose folder is skipped keeps its label
                images, rest = _walk_images(root, walk.tree(root / name))
                entries += [(rel, label) for rel in images]
                others += rest
        else:
            entries = [(rel, UNKNOWN_LABEL) for rel in top_images]
        walk.report()
        if not entries:
            if not others:
                raise UserError(f"source {root} is empty: no image files in it")
            hint = " (it holds webdataset shards: pass them as a .tar path or brace pattern)" if any(
                o.endswith(SHARD_SUFFIXES) for o in others) else ""
            raise UserError(f"no images in {root}: {len(others)} files, none of them "
                            f"{'/'.join(IMAGE_EXTENSIONS)} (e.g. {others[0]}){hint}")
        return cls(root, entries, subdirs)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def known_count(self) -> int | None:
        return len(self.entries)

    def describe(self) -> str:
        classes = f"{len(self.classes)} classes" if self.classes else "no classes (labels -1)"
        return f"ImageFolder {self.root} ({len(self.entries)} images, {classes})"

    def fingerprint(self) -> dict:
        """What identifies this source for resuming: the root and every (path, label) in order."""
        digest = hashlib.sha256("\n".join(f"{rel}\t{label}" for rel, label in self.entries).encode()).hexdigest()
        return {"kind": self.kind, "root": str(self.root), "count": len(self.entries), "files_sha256": digest}

    def units(self, cursor: Cursor, block_size: int) -> list[FolderBlockUnit]:
        """One unit per block, from the block holding `cursor` on."""
        first = cursor.index // block_size * block_size
        starts = range(first, len(self.entries), block_size)
        n = len(self.entries)
        return [FolderBlockUnit(str(self.root), self.entries[s : s + block_size], s, s + block_size >= n)
                for s in starts] or [FolderBlockUnit(str(self.root), [], len(self.entries), True)]


class WebDatasetSource:
    """webdataset shards: a .tar path, a brace pattern or an fsspec URL; one part per shard."""

    kind = "webdataset"

    def __init__(self, spec: str, urls: list[str]):
        self.spec, self.urls = spec, urls
        self.classes: list[str] = []  # samples carry integer labels (`cls`) only, no class names

    @classmethod
    def expand(cls, spec: str) -> "WebDatasetSource":
        """Expand the brace pattern; local shards must all exist (remote ones are checked on read)."""
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
        paths = [local_path(u) for u in urls]
        missing = [u for u, path in zip(urls, paths) if path is not None and not path.is_file()]
        if missing:
            raise UserError(f"webdataset shard not found: {missing[0]}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return cls(spec, [str(path.resolve()) if path is not None else u for u, path in zip(urls, paths)])

    @property
    def known_count(self) -> int | None:
        return None

    def describe(self) -> str:
        return f"webdataset {self.spec} ({len(self.urls)} shard{'s' if len(self.urls) != 1 else ''})"

    def fingerprint(self) -> dict:
        digest = hashlib.sha256("\n".join(self.urls).encode()).hexdigest()
        return {"kind": self.kind, "spec": self.spec, "shards": len(self.urls), "urls_sha256": digest}

    def units(self, cursor: Cursor, block_size: int) -> list[ShardUnit]:
        """One unit per shard from the cursor's shard on; that one starts at its cursor block."""
        first = cursor.index // block_size * block_size
        return [ShardUnit(p, self.urls[p], first if p == cursor.part else 0)
                for p in range(cursor.part, len(self.urls))]


ImageSource = ImageFolderSource | WebDatasetSource


def open_source(spec: str, follow_links: bool = False) -> ImageSource:
    """Resolve SOURCE to an ImageFolder tree or webdataset shards; bad input is a UserError.
    `follow_links` lets an ImageFolder tree's links lead out of it."""
    folder = local_source(spec)
    if folder is None:
        return WebDatasetSource.expand(str(spec))
    return ImageFolderSource.scan(folder.resolve(), follow_links)


def recorded_source(fingerprint: dict) -> str | None:
    """Where a latent store's images were, from the source fingerprint encode recorded (attrs `source`)."""
    return fingerprint.get("root") or fingerprint.get("spec")


def _is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def _split_files(names: list[str]) -> tuple[list[str], list[str]]:
    """(sorted image names, other names) among `names`, ignoring hidden files."""
    visible = sorted(n for n in names if not n.startswith("."))
    return [n for n in visible if _is_image_name(n)], [n for n in visible if not _is_image_name(n)]


def _walk_images(root: Path, listing: list[tuple[Path, list[str]]]) -> tuple[list[str], list[str]]:
    """Image paths of a FolderWalk listing relative to `root` (posix, in torchvision's sorted walk
    order), and the other files."""
    images, others = [], []
    for folder, names in sorted(listing, key=lambda item: str(item[0])):  # as os.walk paths sort
        rel_dir = folder.relative_to(root).as_posix()
        found, rest = _split_files(names)
        images += [f"{rel_dir}/{name}" for name in found]
        others += [f"{rel_dir}/{name}" for name in rest]
    return images, others
