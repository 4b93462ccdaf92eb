"""Stage one: run every image through the frozen VAE once, into a Zarr latent store.

    DataLoader workers ──blocks of uint8 images──▶ GPU encode ──latents──▶ writer thread ──▶ Zarr
    (decode + resize)                              (main thread)           (reorder, chunk,
                                                                            compress, commit)

Rows follow the source's natural order (sorted files; shards in order, samples in tar order),
minus the images that could not be decoded; those are skipped, counted and listed in the attrs.
Because skipped images make row positions data-dependent, rows are assigned by one writer as
blocks arrive, and the store grows chunk by chunk (a webdataset's length is unknown up front).

Resume: after each full chunk is written, the writer commits `progress` in the store's attrs
(rows written, the source position after the last row, the skipped keys before it). A killed run
leaves at most one chunk written but not committed; the next run with the same settings reopens
the store, restarts at the block holding the committed source position, drops the rows it
already has, and rewrites the uncommitted chunk. Every image is encoded in the same block (GPU
batch) either way, so the finished store is identical to one from an uninterrupted run (given
the same --batch-size; another one resumes just as correctly, but GPU kernels may round the
latents after the resume point differently in the last bits). A settings fingerprint (VAE,
image size, dtype, compute precision, source listing) refuses resuming into a store made with
other settings unless --overwrite.

Scale-out (several GPUs or machines) attaches at `ChunkWriter`: every chunk is one
`LatentStore.write` of whole chunks, so writers never share a chunk object. What one process
decides alone is the row offset of each part, since skips before a part shift it; to split the
work, give rank r the parts r::W (`source.units`), have each rank first count the decodable
samples of its parts (or write its own store), agree on part offsets with an all-gather, and let
each rank write the chunks that fall wholly in its rows (the boundary chunks by one of them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.paths import local_path
from revq_pipe.pipeline.sources import (
    Block, BlockDataset, Cursor, ImageSource, default_workers, open_source, to_model_input,
)
from revq_pipe.pipeline.stats import latent_stats
from revq_pipe.pipeline.store import FORMAT_VERSION, LATENT_DTYPES, LatentStore
from revq_pipe.pipeline.vae import FrozenVae, VaeSpec, resolve_vae

log = logging.getLogger("revq_pipe")

PREPROCESSING = "rgb, resize short side bilinear, center crop, x/255*2-1"
CHUNK_TARGET_BYTES = 4 << 20  # uncompressed bytes per chunk: a few MB suits Zarr and object stores
WRITER_QUEUE_BLOCKS = 8  # encoded blocks in flight to the writer; bounds host memory


@dataclass
class EncodeSummary:
    """What one `encode` call did; `report()` is the paragraph the CLI prints."""

    store: str
    source: str
    vae: str
    image_size: int
    latent_shape: tuple[int, int, int]
    dtype: str
    compute: str
    count: int
    encoded: int
    resumed_rows: int
    skipped: list[tuple[str, str]]
    stored_bytes: int
    seconds: float
    already_complete: bool = False

    @property
    def raw_bytes(self) -> int:
        return self.count * int(np.prod(self.latent_shape)) * np.dtype(self.dtype).itemsize

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else float("nan")

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else float("nan")

    def report(self) -> str:
        shape = "x".join(map(str, self.latent_shape))
        if self.already_complete:
            return (f"{self.store} is already complete: {self.count} latents ({shape}, {self.dtype}) "
                    f"from {self.source}; nothing to do (--overwrite re-encodes).")
        resumed = f" (resumed after {self.resumed_rows} stored rows)" if self.resumed_rows else ""
        skipped = f"{len(self.skipped)} skipped"
        if self.skipped:
            shown = "; ".join(f"{key}: {reason}" for key, reason in self.skipped[:5])
            more = f"; and {len(self.skipped) - 5} more (all in the store's attrs)" if len(self.skipped) > 5 else ""
            skipped += f" ({shown}{more})"
        return (f"Encoded {self.encoded} images from {self.source} with {self.vae} at {self.image_size} px "
                f"({self.compute}){resumed}: {self.count} latents of {shape} {self.dtype} in {self.store}, "
                f"{skipped}. Latents take {_human_bytes(self.stored_bytes)} for {_human_bytes(self.raw_bytes)} raw "
                f"(compression {self.compression_ratio:.2f}x); {self.seconds:.1f} s, "
                f"{self.images_per_second:.1f} images/s.")


@dataclass
class EncodeJob:
    """Everything decided before the VAE weights load: validated settings and where to start."""

    source: ImageSource
    out: str
    vae: VaeSpec
    image_size: int
    latent_shape: tuple[int, int, int]
    dtype: str
    device: torch.device
    batch_size: int
    workers: int
    chunk_size: int
    settings: dict[str, Any]
    existing: LatentStore | None  # a store to resume into
    replace_existing: bool  # --overwrite of something already at `out`
    rows: int = 0
    cursor: Cursor = field(default_factory=Cursor)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    progress: bool = True

    @property
    def full_precision(self) -> bool:
        return self.dtype == "float32"


def encode(
    source: str,
    out: str,
    *,
    vae: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "float16",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_size: int | None = None,
) -> EncodeSummary:
    """Encode SOURCE (ImageFolder dir or webdataset shards) into the latent store `out`.

    `batch_size` images form one GPU batch; `dtype` is the storage dtype (float32 also turns off
    bf16 autocast on CUDA); `workers` DataLoader processes decode and resize (default: CPU count,
    at most 16; 0 decodes in this process); `chunk_size` rows per Zarr chunk (default: about
    4 MB of latents). Re-running an interrupted call resumes it; bad input raises UserError.
    """
    spec = resolve_vae(vae)
    job = prepare_encode(source, out, spec, image_size=image_size, batch_size=batch_size, device=device,
                         dtype=dtype, workers=workers, overwrite=overwrite, progress=progress, chunk_size=chunk_size)
    if job.existing is not None and job.existing.complete:
        return _summary(job, job.existing, encoded=0, seconds=0.0, already_complete=True)
    return run_encode(job, spec.load(job.device))


def prepare_encode(
    source: str,
    out: str,
    spec: VaeSpec,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "float16",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_size: int | None = None,
) -> EncodeJob:
    """Check every setting and the store at `out` without loading weights or writing anything."""
    if dtype not in LATENT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(LATENT_DTYPES)}, not {dtype!r}")
    if batch_size < 1 or (workers is not None and workers < 0) or (chunk_size is not None and chunk_size < 1):
        raise UserError("--batch-size and chunk size must be at least 1, --workers at least 0")
    image_source = open_source(source)
    if spec.note:
        log.warning(spec.note)
    size = image_size or spec.default_image_size
    latent_shape = spec.latent_shape(size)
    torch_device = resolve_device(device)
    compute = "bf16-autocast" if torch_device.type == "cuda" and dtype != "float32" else "float32"
    settings = {
        "format_version": FORMAT_VERSION,
        "vae": spec.name,
        "vae_class": spec.class_name,
        "vae_config_sha256": spec.config_sha256(),
        "image_size": size,
        "latent_shape": list(latent_shape),
        "dtype": dtype,
        "compute": compute,
        "preprocessing": PREPROCESSING,
        "source": image_source.fingerprint(),
    }
    settings["settings_sha256"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    job = EncodeJob(
        source=image_source, out=str(out), vae=spec, image_size=size, latent_shape=latent_shape, dtype=dtype,
        device=torch_device, batch_size=batch_size, workers=default_workers(workers), settings=settings,
        chunk_size=chunk_size or _default_chunk_size(latent_shape, dtype), existing=None,
        replace_existing=False, progress=progress,
    )
    _refuse_out_inside_source(job)
    _check_existing(job, overwrite)
    return job


def run_encode(job: EncodeJob, vae: FrozenVae) -> EncodeSummary:
    """Encode the job's remaining samples with an already loaded VAE and finish the store."""
    units = job.source.units(job.cursor, job.batch_size)
    workers = min(job.workers, len(units))
    loader = DataLoader(
        BlockDataset(units, job.image_size, job.batch_size), batch_size=None, num_workers=workers,
        pin_memory=job.device.type == "cuda",
    )
    writer = ChunkWriter(job, parts=sorted({unit.part for unit in units}))
    bar = _progress_bar(job)
    started = time.perf_counter()
    encoded = 0
    writer.start()
    try:
        with vae.autocast(job.full_precision):
            for block in loader:
                if block.error:
                    raise UserError(block.error)
                latents, ready = None, None
                if len(block.images):
                    latents, ready = _encode_block(vae, block.images, job)
                    encoded += len(block.images)
                block.images = None  # the writer needs only the bookkeeping
                writer.submit(block, latents, ready)
                bar.update(block.size)
                if block.skipped:
                    bar.set_postfix(skipped=len(job.skipped) + writer.skipped_seen)
        store = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return _summary(job, store, encoded=encoded, seconds=time.perf_counter() - started)


def _encode_block(vae: FrozenVae, images: torch.Tensor, job: EncodeJob) -> tuple[torch.Tensor, Any]:
    """Launch one block's encode and its copy to the host; returns before the GPU finishes.

    On CUDA the copy lands in pinned memory asynchronously and an event marks its end, so the
    main thread goes straight on to the next block while the writer thread waits on the event.
    """
    x = to_model_input(images.to(vae.device, non_blocking=True))
    z = vae.encode(x)
    if tuple(z.shape[1:]) != job.latent_shape:
        raise RuntimeError(f"{vae.spec.name} produced latents of shape {tuple(z.shape[1:])}, "
                           f"expected {job.latent_shape}")
    z = z.to(getattr(torch, job.dtype))
    if vae.device.type != "cuda":
        return z, None
    host = z.to("cpu", non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class ChunkWriter:
    """The writer thread: puts encoded blocks back in source order, cuts full chunks, writes them
    (Zarr compresses here, off the GPU's path), and commits resume progress after each chunk."""

    def __init__(self, job: EncodeJob, parts: list[int]):
        self.job = job
        self.order = BlockOrder(parts, job.cursor, job.batch_size)
        self.store = job.existing
        self.rows = job.rows
        self.skipped = list(job.skipped)  # committed: all before the committed cursor
        self.pending_skips: list[tuple[tuple[int, int], str, str]] = []
        self.latents: list[np.ndarray] = []
        self.labels: list[int] = []
        self.keys: list[str] = []
        self.positions: list[tuple[int, int]] = []
        self.skipped_seen = 0
        self.queue: queue.Queue = queue.Queue(maxsize=WRITER_QUEUE_BLOCKS)
        self.error: BaseException | None = None
        self.aborted = threading.Event()
        self.thread = threading.Thread(target=self._run, name="revq-encode-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, block: Block, latents: torch.Tensor | None, ready) -> None:
        """Queue one encoded block; blocks while the queue is full; re-raises a writer failure."""
        self.skipped_seen += len(block.skipped)
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put((block, latents, ready), timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self) -> LatentStore:
        """Wait for the queue to drain, write the last partial chunk and finalize the store."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if not self.order.done:
            raise RuntimeError("the image stream ended before every part was read")
        return self._finalize()

    def abort(self) -> None:
        self.aborted.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self.thread.join(timeout=60)

    def _run(self) -> None:
        try:
            while not self.aborted.is_set():
                item = self.queue.get()
                if item is None:
                    return
                block, latents, ready = item
                if ready is not None:
                    ready.synchronize()
                array = latents.numpy() if latents is not None else None
                for ordered_block, ordered_latents in self.order.add(block, array):
                    self._take(ordered_block, ordered_latents)
                while len(self.keys) >= self.job.chunk_size:
                    self._write_chunk(self.job.chunk_size)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.error = err

    def _take(self, block: Block, latents: np.ndarray | None) -> None:
        """Append one in-order block's rows, dropping those a resumed store already holds."""
        cursor = (self.job.cursor.part, self.job.cursor.index)
        for row, index in enumerate(block.indices):
            if (block.part, index) >= cursor:
                self.latents.append(latents[row])
                self.labels.append(block.labels[row])
                self.keys.append(block.keys[row])
                self.positions.append((block.part, index))
        self.pending_skips += [((block.part, i), k, r) for i, k, r in block.skipped if (block.part, i) >= cursor]

    def _write_chunk(self, n: int) -> None:
        store = self._store()
        start, stop = self.rows, self.rows + n
        if len(store) < stop:
            store.resize(stop)
        store.write(start, np.stack(self.latents[:n]), np.asarray(self.labels[:n], np.int64),
                    np.asarray(self.keys[:n], dtype=str))
        after = (self.positions[n - 1][0], self.positions[n - 1][1] + 1)
        self.rows = stop
        del self.latents[:n], self.labels[:n], self.keys[:n], self.positions[:n]
        self._commit_skips(before=after)
        if stop % self.job.chunk_size == 0:  # a partial last chunk is committed by _finalize
            store.update_attrs(count=self.rows, progress={"rows": self.rows, "cursor": list(after)},
                               **_skipped_attrs(self.skipped))

    def _commit_skips(self, before: tuple[int, int] | None) -> None:
        keep = []
        for position, key, reason in self.pending_skips:
            if before is None or position < before:
                self.skipped.append((key, reason))
            else:
                keep.append((position, key, reason))
        self.pending_skips = keep

    def _finalize(self) -> LatentStore:
        if self.keys:
            self._write_chunk(len(self.keys))
        self._commit_skips(before=None)
        if self.rows == 0:
            reasons = "; ".join(f"{k}: {r}" for k, r in self.skipped[:3])
            raise UserError(f"no decodable images in {self.job.source.describe()}: "
                            f"{len(self.skipped)} samples skipped ({reasons})")
        store = self._store()
        store.resize(self.rows)
        mean, std = latent_stats(store.latents)
        store.write_stats(mean, std)
        attrs = store.attrs
        attrs.pop("progress", None)
        store.group.attrs["revq"] = {**attrs, "complete": True, "count": self.rows,
                                     "source_count": self.rows + len(self.skipped), **_skipped_attrs(self.skipped)}
        return store

    def _store(self) -> LatentStore:
        """The store, created on the first write: a run that writes nothing leaves `out` alone."""
        if self.store is None:
            job = self.job
            attrs = {**job.settings, "complete": False, "count": 0, "chunk_size": job.chunk_size,
                     "encoder": _encoder_attrs(job), "progress": {"rows": 0, "cursor": [0, 0]},
                     **_skipped_attrs([])}
            try:
                self.store = LatentStore.create(job.out, n=0, latent_shape=job.latent_shape, dtype=job.dtype,
                                                chunk_size=job.chunk_size, attrs=attrs,
                                                overwrite=job.replace_existing)
            except FileExistsError as err:  # zarr's mode "w-" found something at `out`
                raise UserError(f"{job.out} already holds data: pass --overwrite to replace it") from err
        return self.store


class BlockOrder:
    """Releases blocks in source order: parts in the given order, blocks by start index.

    Workers deliver blocks out of order (one worker per shard); only the small encoded latents
    wait here, never decoded images.
    """

    def __init__(self, parts: list[int], cursor: Cursor, block_size: int):
        self.parts = parts
        self.head = 0
        self.next_start = cursor.index // block_size * block_size
        self.waiting: dict[tuple[int, int], tuple[Block, np.ndarray | None]] = {}

    @property
    def done(self) -> bool:
        return self.head == len(self.parts)

    def add(self, block: Block, latents: np.ndarray | None) -> list[tuple[Block, np.ndarray | None]]:
        self.waiting[(block.part, block.start)] = (block, latents)
        ready = []
        while not self.done and (self.parts[self.head], self.next_start) in self.waiting:
            block, latents = self.waiting.pop((self.parts[self.head], self.next_start))
            ready.append((block, latents))
            if block.last:
                self.head, self.next_start = self.head + 1, 0
            else:
                self.next_start += block.size
        return ready


def _refuse_out_inside_source(job: EncodeJob) -> None:
    """A store inside an ImageFolder tree would become a class folder on the next scan."""
    root, path = getattr(job.source, "root", None), local_path(job.out)
    if root is None or path is None:
        return
    if path.resolve().is_relative_to(root):
        raise UserError(f"--out {job.out} is inside SOURCE {root}: put the store outside the image folder")


def _check_existing(job: EncodeJob, overwrite: bool) -> None:
    """Decide what to do with whatever is at `out`: nothing there, resume, refuse, or replace.

    --overwrite replaces a Zarr store, never an unrelated local folder.
    """
    out = job.out
    path = local_path(out)
    local = path is not None
    if local:
        if not path.exists():
            return
        if path.is_file():
            raise UserError(f"--out {out} is a file, not a Zarr store")
        if not (path / "zarr.json").is_file():
            if any(path.iterdir()):
                raise UserError(f"--out {out} exists and is not a Zarr store: refusing to write into it")
            return
    job.replace_existing = overwrite
    try:
        existing = LatentStore.open(out, mode="r+", allow_incomplete=True)
    except UserError:
        if local and not overwrite:
            raise UserError(f"{out} is a Zarr store but not a latent store: pass --overwrite to replace it") from None
        return  # remote: nothing there (creating refuses anything else unless --overwrite)
    if overwrite:
        return
    old = existing.attrs
    if old.get("settings_sha256") != job.settings["settings_sha256"]:
        changed = [k for k in job.settings if k != "settings_sha256" and old.get(k) != job.settings[k]]
        details = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(job.settings[k])} now"
                            for k in changed[:3]) or "no settings fingerprint there"
        raise UserError(f"{out} was made with other settings ({details}): pass --overwrite to replace it, "
                        f"or choose another --out")
    job.existing = existing
    job.chunk_size = existing.chunk_size
    if not existing.complete:
        progress = old.get("progress", {"rows": 0, "cursor": [0, 0]})
        job.rows = int(progress["rows"])
        job.cursor = Cursor(*map(int, progress["cursor"]))
        job.skipped = list(zip(old.get("skipped_keys", []), old.get("skipped_reasons", [])))
        log.warning(f"resuming {out}: {job.rows} latents already stored")


def _summary(job: EncodeJob, store: LatentStore, *, encoded: int, seconds: float,
             already_complete: bool = False) -> EncodeSummary:
    attrs = store.attrs
    skipped = list(zip(attrs.get("skipped_keys", []), attrs.get("skipped_reasons", [])))
    return EncodeSummary(
        store=job.out, source=job.source.describe(), vae=job.vae.name, image_size=job.image_size,
        latent_shape=job.latent_shape, dtype=job.dtype, compute=job.settings["compute"], count=len(store),
        encoded=encoded, resumed_rows=job.rows, skipped=skipped, stored_bytes=store.nbytes_stored(),
        seconds=seconds, already_complete=already_complete,
    )


def _skipped_attrs(skipped: list[tuple[str, str]]) -> dict[str, Any]:
    return {"skipped_count": len(skipped), "skipped_keys": [k for k, _ in skipped],
            "skipped_reasons": [r for _, r in skipped]}


def _encoder_attrs(job: EncodeJob) -> dict[str, Any]:
    """How the store was made, for the record (not part of the settings fingerprint)."""
    import diffusers

    return {"batch_size": job.batch_size, "device": job.device.type, "workers": job.workers,
            "torch": torch.__version__, "diffusers": diffusers.__version__}


def _default_chunk_size(latent_shape: tuple[int, int, int], dtype: str) -> int:
    """Rows per chunk: a power of two near CHUNK_TARGET_BYTES of uncompressed latents."""
    row_bytes = int(np.prod(latent_shape)) * np.dtype(dtype).itemsize
    return int(min(4096, max(16, 2 ** int(math.log2(max(1, CHUNK_TARGET_BYTES // row_bytes))))))


def _progress_bar(job: EncodeJob):
    from tqdm.auto import tqdm

    total = job.source.known_count
    done = job.cursor.index if total is not None else 0
    options = {} if job.progress else {"disable": True}  # unset, TQDM_DISABLE=1 still wins
    return tqdm(total=total, initial=done, unit="img", desc="encode", dynamic_ncols=True, **options)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    if isinstance(value, dict) and len(text) > 60:
        return "source " + hashlib.sha256(text.encode()).hexdigest()[:8]
    return text if len(text) <= 60 else text[:57] + "..."


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"
