"""Writing encoded blocks into a latent store: in source order, chunk by chunk, resumably.

Rows follow the source's natural order (sorted files; shards in order, samples in tar order),
minus the images that could not be decoded; those are skipped, counted and listed in the attrs.
Because skipped images make row positions data-dependent, rows are assigned by one writer as
blocks arrive, and the store grows chunk by chunk (a webdataset's length is unknown up front).

Resume: after each full chunk is written, the writer commits its `WriteProgress` through the
store's resume protocol (rows done, the source position after the last row, the skipped keys
before it). A killed run leaves at most one chunk written but not committed; the next run
restarts at the block holding the committed source position, drops the rows the store already
has, and rewrites the uncommitted chunk. Every image is encoded in the same block (GPU batch)
either way, so the finished store is identical to one from an uninterrupted run (given the same
block size; another one resumes just as correctly, but GPU kernels may round the latents after
the resume point differently in the last bits).

`encode --cluster` (pipeline/scaleout/staged_encode.py) writes the same store without this writer: its
tasks stage pieces made of the same blocks, and once every piece is in, a copy lays their rows
out in these positions.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from revq_pipe.pipeline.images.sources import Block, Cursor
from revq_pipe.pipeline.storage.store import LatentStore, skipped_attrs

WRITER_QUEUE_BLOCKS = 8  # encoded blocks in flight to the writer; bounds host memory


@dataclass
class WriteProgress:
    """How far a latent store's writer got: rows [0, rows) are final, `cursor` is the first source
    position after them, and `skipped` lists the samples skipped before it."""

    rows: int = 0
    cursor: Cursor = field(default_factory=Cursor)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, store: LatentStore) -> "WriteProgress":
        """What an unfinished store committed last (nothing yet: the start of the source)."""
        cursor = store.progress.get("cursor", [0, 0])
        return cls(store.rows_done, Cursor(*map(int, cursor)), store.skipped)

    def commit_to(self, store: LatentStore) -> None:
        """Commit this progress once its rows are written; `of` reads it back."""
        # `rows` stays in the record as well: encode's resume record before rows_done was shared.
        record = {"rows": self.rows, "cursor": [self.cursor.part, self.cursor.index]}
        store.commit(self.rows, record, count=self.rows, **skipped_attrs(self.skipped))


class ChunkWriter:
    """The writer thread: puts encoded blocks back in source order, cuts full chunks, writes them
    (Zarr compresses here, off the GPU's path), and commits resume progress after each chunk.

    `open_store` returns the store to write into; it is called at the first write, so a run that
    writes nothing leaves the output alone. Writing starts at `start`: the blocks submitted must
    begin with the one holding `start.cursor` (rows before the cursor are dropped). With `flip`, a
    block's latents are (B, 2, C, H, W): each image's latent and its flipped image's, written to
    the store's `latents` and `latents_flip`.
    """

    def __init__(self, open_store: Callable[[], LatentStore], start: WriteProgress, *, parts: list[int],
                 block_size: int, chunk_size: int, flip: bool = False):
        self.open_store = open_store
        self.flip = flip
        self.cursor = (start.cursor.part, start.cursor.index)
        self.order = BlockOrder(parts, start.cursor, block_size)
        self.chunk_size = chunk_size
        self.store: LatentStore | None = None
        self.rows = start.rows
        self.skipped = list(start.skipped)  # committed: all before the committed cursor
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

    def submit(self, block: Block, latents) -> None:
        """Queue one encoded block; waits while the queue is full; re-raises a writer failure.

        `latents` are on the host or on their way there (anything whose `numpy()` gives them, such
        as pipeline/images/encode_feed.py's HostLatents, which waits for its copy): the caller goes
        straight on to the next block while the writer thread waits for the copy.
        """
        self.skipped_seen += len(block.skipped)
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put((block, latents), timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self) -> LatentStore | None:
        """Wait for the queue to drain, write the last partial chunk and finish the store
        (statistics, complete). None when the store would hold no rows: nothing to finish."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if not self.order.done:
            raise RuntimeError("the image stream ended before every part was read")
        if self.keys:
            self._write_chunk(len(self.keys))
        self._commit_skips(before=None)
        if self.rows == 0:
            return None
        store = self._store()
        store.resize(self.rows)
        store.finish(count=self.rows, source_count=self.rows + len(self.skipped), **skipped_attrs(self.skipped))
        return store

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
                block, latents = item
                array = latents.numpy() if latents is not None else None
                for ordered_block, ordered_latents in self.order.add(block, array):
                    self._take(ordered_block, ordered_latents)
                while len(self.keys) >= self.chunk_size:
                    self._write_chunk(self.chunk_size)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.error = err

    def _take(self, block: Block, latents: np.ndarray | None) -> None:
        """Append one in-order block's rows, dropping those a resumed store already holds."""
        for row, index in enumerate(block.indices):
            if (block.part, index) >= self.cursor:
                self.latents.append(latents[row])
                self.labels.append(block.labels[row])
                self.keys.append(block.keys[row])
                self.positions.append((block.part, index))
        self.pending_skips += [((block.part, i), k, r) for i, k, r in block.skipped if (block.part, i) >= self.cursor]

    def _write_chunk(self, n: int) -> None:
        store = self._store()
        start, stop = self.rows, self.rows + n
        if len(store) < stop:
            store.resize(stop)
        rows = np.stack(self.latents[:n])
        latents, flipped = (rows[:, 0], rows[:, 1]) if self.flip else (rows, None)
        store.write(start, latents, np.asarray(self.labels[:n], np.int64), np.asarray(self.keys[:n], dtype=str),
                    latents_flip=flipped)
        after = Cursor(self.positions[n - 1][0], self.positions[n - 1][1] + 1)
        self.rows = stop
        del self.latents[:n], self.labels[:n], self.keys[:n], self.positions[:n]
        self._commit_skips(before=(after.part, after.index))
        if stop % self.chunk_size == 0:  # a partial last chunk is committed by `finish`
            WriteProgress(self.rows, after, self.skipped).commit_to(store)

    def _commit_skips(self, before: tuple[int, int] | None) -> None:
        keep = []
        for position, key, reason in self.pending_skips:
            if before is None or position < before:
                self.skipped.append((key, reason))
            else:
                keep.append((position, key, reason))
        self.pending_skips = keep

    def _store(self) -> LatentStore:
        if self.store is None:
            self.store = self.open_store()
            # The arrays are resized one at a time: a writer stopped in between (killed, or Ctrl-C
            # in `finish`) leaves them of different lengths, and Zarr drops writes past an array's
            # end without a word. Back to the committed rows, all of them; each chunk grows them again.
            self.store.resize(self.rows)
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
