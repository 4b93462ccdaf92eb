"""`encode --cluster`: tasks on a dask cluster encode ranges of the source into one latent store.

Why staging. Rows are the decodable images in source order, so where a range's latents land in
the store depends on how many images before it failed to decode, which nobody knows until those
images have been read. Counting first would decode every image twice (on a box of 8 GPUs, JPEG
decoding is as costly as encoding). Instead every image is decoded and encoded once, into a
*piece* of its own inside the store's `staging` group; when all pieces are in, each piece's first
row is the sum of the rows before it, and the latents are copied into the final chunks. The copy
moves latents only (a few KB per image, against the ~100 KB JPEG that was read), in parallel,
chunk by chunk, each chunk written by one task.

A piece is `span` consecutive positions of one part (the ImageFolder tree's one part, or one
webdataset shard): whole blocks, about one store chunk. Blocks are the very GPU batches a
single-process encode makes, so every latent is computed in the same batch as there, and the
finished store equals a single-process encode's array for array.

While a --cluster encode is unfinished, the store holds (`LatentStore.staging`,
pipeline/storage/staging.py)

    staging/<part>-<piece>   latents [latents_flip] labels keys of the piece's decodable images;
                             attrs "piece", written last, is its completion record (positions,
                             rows, whether the part ends there, the samples skipped)
    staging/chunks_done      which final chunks the copy has written (ChunkMarks)

and its progress record {"staged": true, "job": <id>, "laid_out": <bool>}: the job id names the
run whose tasks write the store together. A lost worker's task runs again and skips the pieces
and chunks already recorded; a killed job resumes from them. The driver alone writes the store's
attrs, computes the statistics (dask, on the same cluster) and removes the staging.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from revq_pipe.pipeline.scaleout.chunk_tasks import report_progress, run_tasks, task_runs, worker_cached
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.paths import filesystem
from revq_pipe.pipeline.images.encode_feed import EncoderSetup, HostLatents, encoded_blocks
from revq_pipe.pipeline.images.sources import (MAX_DEFAULT_WORKERS, Block, Cursor, ImageSource, ShardUnit,
                                        WebDatasetSource)
from revq_pipe.pipeline.storage.staging import Staging
from revq_pipe.pipeline.storage.store import FLIP_ARRAY, LatentStore, skipped_attrs

log = logging.getLogger(__name__)


def is_staged(store: LatentStore) -> bool:
    """Whether an unfinished store is being written by `encode --cluster`."""
    return bool(store.progress.get("staged"))


def piece_span(chunk_size: int, batch_size: int) -> int:
    """Source positions per piece: the whole blocks that make up about one chunk."""
    return math.ceil(chunk_size / batch_size) * batch_size


@dataclass
class EncodeSettings:
    """What every task of one --cluster encode shares."""

    store: str  # the latent store's absolute URL
    job: str
    vae_name: str  # resolved again on each worker, which must find the same architecture
    vae_config_sha256: str
    device: str  # "cuda" or "cpu", as the workers resolved --device
    image_size: int
    batch_size: int
    span: int
    latent_shape: tuple[int, int, int]
    dtype: str
    flip: bool
    compute: str  # "bf16-autocast" or "float32", as the store records it
    setup: EncoderSetup  # how blocks reach the encoder and how it runs (resolved on each worker)
    decode_workers: int | None  # DataLoader processes per dask worker; None: its machine's CPUs shared out
    hosts: dict[str, int] = field(default_factory=dict)  # dask workers per host


@dataclass
class PieceRecord:
    """A staged piece: `positions` source samples from `part`'s sample piece*span on, `rows` of them
    decodable; `last` when the part ends in it; `skipped` as (index, key, reason)."""

    part: int
    piece: int
    positions: int
    rows: int
    last: bool
    skipped: list

    @property
    def name(self) -> str:
        return piece_name(self.part, self.piece)


def piece_name(part: int, piece: int) -> str:
    return f"{part:06d}-{piece:09d}"  # sorts in source order


# --------------------------------------------------------------------------- the driver


class StagedEncode:
    """One --cluster encode of `source` into `store` (created or resumed by the caller)."""

    def __init__(self, source: ImageSource, store: LatentStore, settings: EncodeSettings):
        self.source, self.store, self.settings = source, store, settings
        self.laid_out = bool(store.progress.get("laid_out"))
        self.records: dict[tuple[int, int], PieceRecord] = {}
        if not self.laid_out:
            self.staging = store.staging()
            self.records = staged_records(self.staging)
        store.commit(store.rows_done, {"staged": True, "job": settings.job, "laid_out": self.laid_out})
        if self.records:
            log.warning(f"resuming the `cluster` encode of {store.url}: {self.staged_rows} latents of "
                        f"{self.staged_positions} images staged")

    @property
    def staged_positions(self) -> int:
        """Source samples in the pieces staged so far."""
        return sum(record.positions for record in self.records.values())

    @property
    def staged_rows(self) -> int:
        """Latents staged so far (all of them, once laid out)."""
        return len(self.store) if self.laid_out else sum(record.rows for record in self.records.values())

    def encode(self, client, cluster_size: int, bar) -> int:
        """Encode every piece not staged yet, on `cluster_size` dask workers; the images encoded."""
        if self.laid_out:
            return 0
        tasks = [EncodeTask(self.settings, units) for units in self._plan(cluster_size)]
        before = self.staged_rows
        run_tasks(client, encode_task, tasks, name="encode", job=self.settings.job, bar=bar)
        # The staging is the record of what every attempt of every task staged.
        self.records = staged_records(self.staging)
        return self.staged_rows - before

    def finish(self, client, cluster_size: int, bar_for: Callable[[int], Any]) -> LatentStore:
        """Copy the pieces into the final chunks, compute the statistics and mark the store complete.
        When no image could be decoded, the store is removed and a UserError says why."""
        store = self.store
        if not self.laid_out:
            ordered = in_source_order(self.records, parts=self._parts())
            total = sum(record.rows for record in ordered)
            skipped = [(key, reason) for record in ordered for _, key, reason in record.skipped]
            if total == 0:
                self._remove_store()
                reasons = "; ".join(f"{k}: {r}" for k, r in skipped[:3])
                raise UserError(f"no decodable images in {self.source.describe()}: {len(skipped)} samples "
                                f"skipped ({reasons})")
            store.resize(total)
            marks = self.staging.chunk_marks(math.ceil(total / store.chunk_size))
            tasks = layout_tasks(ordered, marks.undone(), store.chunk_size, cluster_size, self.settings)
            with bar_for(total) as bar:
                run_tasks(client, layout_task, tasks, name="lay-out", job=self.settings.job, bar=bar)
            store.commit(total, {"staged": True, "job": self.settings.job, "laid_out": True}, count=total,
                         **skipped_attrs(skipped))
        store.remove_staging()
        skipped = store.skipped
        store.finish(count=len(store), source_count=len(store) + len(skipped), **skipped_attrs(skipped))
        return store

    def _parts(self) -> list[int]:
        return list(range(len(self.source.urls))) if isinstance(self.source, WebDatasetSource) else [0]

    def _plan(self, cluster_size: int) -> list[list]:
        """The units (blocks, or shards from their first unstaged piece) of each task."""
        span, batch = self.settings.span, self.settings.batch_size
        if isinstance(self.source, WebDatasetSource):
            starts = {part: first_unstaged(self.records, part) for part in self._parts()}
            todo = [part for part, start in starts.items() if start is not None]
            return [[ShardUnit(part, self.source.urls[part], starts[part] * span) for part in run]
                    for run in task_runs(todo, cluster_size)]
        blocks = self.source.units(Cursor(), batch)
        per_piece = span // batch
        todo = [piece for piece in range(math.ceil(len(blocks) / per_piece)) if (0, piece) not in self.records]
        return [[unit for piece in run for unit in blocks[piece * per_piece:(piece + 1) * per_piece]]
                for run in task_runs(todo, cluster_size)]

    def _remove_store(self) -> None:
        fs, path = filesystem(self.store.url)
        fs.rm(path, recursive=True)


def staged_records(staging: Staging) -> dict[tuple[int, int], PieceRecord]:
    """The completion records of every finished piece (a piece without one was cut short)."""
    records = [PieceRecord(**record) for record in staging.records()]
    return {(record.part, record.piece): record for record in records}


def first_unstaged(records: dict[tuple[int, int], PieceRecord], part: int) -> int | None:
    """The first piece of `part` not staged yet; None when the part is staged to its end."""
    piece = 0
    while (part, piece) in records:
        if records[(part, piece)].last:
            return None
        piece += 1
    return piece


def in_source_order(records: dict[tuple[int, int], PieceRecord], parts: list[int]) -> list[PieceRecord]:
    """The records of every part's pieces, in source order; raises when a part is not all staged."""
    ordered = []
    for part in parts:
        if first_unstaged(records, part) is not None:
            raise RuntimeError(f"part {part} of the source is not fully staged after its tasks ended")
        piece = 0
        while True:
            ordered.append(records[(part, piece)])
            if ordered[-1].last:
                break
            piece += 1
    return ordered


# --------------------------------------------------------------------------- encode tasks


@dataclass
class EncodeTask:
    settings: EncodeSettings
    units: list  # FolderBlockUnit (one block) or ShardUnit (a shard from a piece's first sample on)


def encode_task(task: EncodeTask) -> None:
    """Decode and encode the task's units block by block, staging each piece once all its blocks
    are in; pieces an earlier attempt staged are skipped. Runs on a worker."""
    settings = task.settings
    vae = _worker_vae(settings)
    store = LatentStore.open(settings.store, mode="r+", allow_incomplete=True)
    staging = store.staging()
    units = unstaged_units(task.units, staging, settings.span)
    pieces = PieceAssembler(settings)
    with vae.autocast(settings.compute):
        for block, latents in encoded_blocks(vae, units, image_size=settings.image_size,
                                             batch_size=settings.batch_size, workers=_decode_processes(settings),
                                             latent_shape=settings.latent_shape, dtype=settings.dtype,
                                             flip=settings.flip, setup=settings.setup):
            block.images = None  # the piece needs only the bookkeeping
            for piece in pieces.add(block, latents):
                piece.write_to(staging)
            report_progress(settings.job, block.size)
    if pieces.waiting:
        raise RuntimeError(f"blocks of pieces {sorted(pieces.waiting)} never completed")


def unstaged_units(units: list, staging: Staging, span: int) -> list:
    """`units` less the pieces already staged (by an earlier attempt of the task): block units of
    staged pieces go, and a shard starts at its first unstaged piece (or goes when staged to its end)."""
    todo, folder_pieces = [], {}
    for unit in units:
        piece = unit.start // span
        if isinstance(unit, ShardUnit):
            while (record := piece_record(staging, unit.part, piece)) is not None and not record.last:
                piece += 1
            if record is None:
                todo.append(ShardUnit(unit.part, unit.url, piece * span))
        else:
            if (unit.part, piece) not in folder_pieces:  # a piece's blocks share one look-up
                folder_pieces[(unit.part, piece)] = piece_record(staging, unit.part, piece)
            if folder_pieces[(unit.part, piece)] is None:
                todo.append(unit)
    return todo


def piece_record(staging: Staging, part: int, piece: int) -> PieceRecord | None:
    """The completion record of one piece, or None while it is not staged."""
    record = staging.record(piece_name(part, piece))
    return PieceRecord(**record) if record is not None else None


class Piece:
    """The encoded blocks of one piece, in source order."""

    def __init__(self, part: int, index: int, blocks: list[tuple[Block, HostLatents | None]],
                 settings: EncodeSettings):
        self.part, self.index, self.blocks, self.settings = part, index, blocks, settings

    def write_to(self, staging: Staging) -> None:
        """Write the piece's arrays, then its completion record (so a half-written piece has none)."""
        blocks = [block for block, _ in self.blocks]
        rows = [latents.numpy() for _, latents in self.blocks if latents is not None]  # waits for their copies
        row_shape = (2, *self.settings.latent_shape) if self.settings.flip else tuple(self.settings.latent_shape)
        latents = np.concatenate(rows) if rows else np.zeros((0, *row_shape), self.settings.dtype)
        arrays = {"labels": np.asarray([label for b in blocks for label in b.labels], np.int64),
                  "keys": np.asarray([key for b in blocks for key in b.keys], dtype=str)}
        if self.settings.flip:
            arrays.update({"latents": latents[:, 0], FLIP_ARRAY: latents[:, 1]})
        else:
            arrays["latents"] = latents
        record = PieceRecord(part=self.part, piece=self.index, positions=sum(b.size for b in blocks),
                             rows=len(latents), last=blocks[-1].last,
                             skipped=[list(skip) for b in blocks for skip in b.skipped])
        staging.write_piece(record.name, arrays, asdict(record))


class PieceAssembler:
    """Gathers a task's encoded blocks into pieces, releasing a piece once all its blocks are in
    (DataLoader workers deliver blocks out of order)."""

    def __init__(self, settings: EncodeSettings):
        self.settings = settings
        self.waiting: dict[tuple[int, int], dict[int, tuple[Block, HostLatents | None]]] = {}

    def add(self, block: Block, latents: HostLatents | None) -> list[Piece]:
        span = self.settings.span
        key = (block.part, block.start // span)
        self.waiting.setdefault(key, {})[block.start] = (block, latents)
        got, position, ordered = self.waiting[key], key[1] * span, []
        while position in got:
            block, latents = got[position]
            ordered.append((block, latents))
            position += block.size
            if block.last or position == (key[1] + 1) * span:
                del self.waiting[key]
                return [Piece(*key, ordered, self.settings)]
            if block.size == 0:
                break
        return []


def _worker_vae(settings: EncodeSettings):
    """The worker's VAE, loaded once per worker process (and resolved there, as it names it)."""
    from revq_pipe.pipeline.device import resolve_device
    from revq_pipe.pipeline.images.vae import resolve_vae

    device = resolve_device(settings.device)

    def load():
        spec = resolve_vae(settings.vae_name)
        if spec.config_sha256() != settings.vae_config_sha256:
            raise UserError(f"the VAE {settings.vae_name} on this worker is another architecture than the driver's")
        return spec.load(device)

    return worker_cached("vae", (settings.vae_name, settings.vae_config_sha256, str(device)), load)


def _decode_processes(settings: EncodeSettings) -> int:
    """DataLoader processes for this worker: as asked, else its machine's CPUs shared among the
    dask workers there; none in a daemonic worker, which may not start processes."""
    from distributed import get_worker
    from distributed.comm import get_address_host

    if multiprocessing.current_process().daemon:
        if settings.decode_workers != 0:
            log.warning("this dask worker is daemonic, so images are decoded in its own process: start "
                        "workers with DASK_DISTRIBUTED__WORKER__DAEMON=False for DataLoader processes")
        return 0
    if settings.decode_workers is not None:
        return settings.decode_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    sharing = settings.hosts.get(get_address_host(get_worker().address), 1)
    return min(MAX_DEFAULT_WORKERS, max(1, cpus // sharing))


# --------------------------------------------------------------------------- layout tasks


@dataclass
class LayoutTask:
    store: str
    job: str
    chunks: list[int]
    pieces: list[tuple[str, int, int]]  # (name, first row, rows) of the pieces these chunks draw on


def layout_tasks(ordered: list[PieceRecord], chunks: list[int], chunk_size: int, cluster_size: int,
                 settings: EncodeSettings) -> list[LayoutTask]:
    """Tasks over runs of the final chunks not written yet, each told where its rows are staged."""
    firsts = np.cumsum([0] + [record.rows for record in ordered])
    tasks = []
    for run in task_runs(chunks, cluster_size):
        start, stop = run[0] * chunk_size, (run[-1] + 1) * chunk_size
        pieces = [(record.name, int(first), record.rows) for record, first in zip(ordered, firsts)
                  if record.rows and first < stop and first + record.rows > start]
        tasks.append(LayoutTask(settings.store, settings.job, run, pieces))
    return tasks


def layout_task(task: LayoutTask) -> None:
    """Write the task's final chunks from the staged pieces, marking each when written. Runs on a worker."""
    store = LatentStore.open(task.store, mode="r+", allow_incomplete=True)
    staging = store.staging()
    marks = staging.chunk_marks()
    names = ["latents", "labels", "keys"] + ([FLIP_ARRAY] if store.has_flip else [])
    for chunk in task.chunks:
        start = chunk * store.chunk_size
        stop = min(start + store.chunk_size, len(store))
        columns: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for piece, first, rows in task.pieces:
            low, high = max(start, first), min(stop, first + rows)
            if low < high:
                for name in names:
                    columns[name].append(staging.rows(piece, name, low - first, high - first))
        data = {name: np.concatenate(parts) for name, parts in columns.items()}
        store.write(start, data["latents"], data["labels"], data["keys"], latents_flip=data.get(FLIP_ARRAY))
        marks.mark(chunk)
        report_progress(task.job, stop - start)
