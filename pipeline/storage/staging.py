"""What a store holds for `--cluster` jobs while they write it: chunk completion marks and staged pieces.

    ChunkMarks   which chunks of a store are written: a bool array with one object per chunk, so
                 tasks marking different chunks never write the same object (no locks)
    Staging      `encode --cluster`'s staging group: one group per piece of rows whose place in
                 the store is not known yet, each with a completion record written last, and
                 the marks of the final chunks the copy has written

The stores (pipeline/storage/store.py) hand these out; the tasks (pipeline/scaleout/) use them
without touching Zarr.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

RECORD = "piece"  # the attr of a staged piece's completion record
CHUNKS_DONE = "chunks_done"


class ChunkMarks:
    """Which chunks of a store are written, one bool object per chunk."""

    def __init__(self, array: zarr.Array):
        self.array = array

    @classmethod
    def open(cls, group: zarr.Group, name: str, chunks: int | None) -> "ChunkMarks | None":
        """The marks `name` in `group`; made for `chunks` chunks (all unwritten) when there are none
        yet, or None when there are none and `chunks` is None."""
        marks = group.get(name)  # looked up by name: listing the group warns about any foreign file in it
        if isinstance(marks, zarr.Array):  # (a lease, a dataset card)
            return cls(marks)
        if chunks is None:
            return None
        return cls(group.create_array(name, shape=(chunks,), chunks=(1,), dtype=bool, fill_value=False,
                                      overwrite=True))

    def mark(self, chunk: int) -> None:
        self.array[chunk] = True

    def undone(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.array[:])]


class Staging:
    """A latent store's staging group: named pieces of per-row arrays, each complete once its record is written."""

    def __init__(self, group: zarr.Group, compressor: BloscCodec):
        self.group = group
        self.compressor = compressor

    def records(self) -> list[dict[str, Any]]:
        """The completion records of every finished piece (a piece without one was cut short)."""
        return [record for _, piece in self.group.groups() if (record := piece.attrs.get(RECORD)) is not None]

    def record(self, name: str) -> dict[str, Any] | None:
        """The completion record of the piece `name`, or None while it is not staged."""
        return self.group[name].attrs.get(RECORD) if name in self.group else None

    def write_piece(self, name: str, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> None:
        """Write the piece's arrays (each one chunk), then its completion record, so a half-written
        piece has none; an earlier attempt's piece of that name is replaced."""
        group = self.group.create_group(name, overwrite=True)
        for array_name, data in arrays.items():
            is_text = data.dtype.kind in "UO"
            array = group.create_array(array_name, shape=data.shape, chunks=(max(1, len(data)), *data.shape[1:]),
                                       dtype=str if is_text else data.dtype,
                                       **({} if is_text else {"compressors": self.compressor}))
            if len(data):
                array[...] = data
        group.attrs[RECORD] = record

    def rows(self, name: str, array: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the piece's array `array`."""
        return self.group[name][array][start:stop]

    def chunk_marks(self, chunks: int | None = None) -> ChunkMarks | None:
        """The marks of the final chunks written from the pieces (see `ChunkMarks.open`)."""
        return ChunkMarks.open(self.group, CHUNKS_DONE, chunks)
