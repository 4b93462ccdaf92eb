"""The token store: a Zarr v3 group of every image's token ids, laid out as

    tokens  (N, T) uint16 when K <= 65536, else uint32; chunked along N, compressed
    labels  (N,) int64, keys (N,) str: copied row for row from the latent store
    attrs["revq"]: format version, the run (sha256 of its model.safetensors), preset, T, K, d,
                   latent shape, vae, the source store, and the resume state (`rows_done`,
                   `complete`) of the row stores' shared protocol (pipeline/storage/store.py)

Rows are appended in order, one whole chunk at a time, and `rows_done` moves forward only after a
chunk's three arrays are on disk, so a writer that dies can pick up at `rows_done` and end with
the same store a single uninterrupted run would have written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.storage.store import SMALL_COMPRESSOR, RowStore, first_row_where

TOKEN_FORMAT_VERSION = 1
# 4096 rows of T=512 uint16 ids is 4 MiB before compression: large enough for fast reads along N,
# small enough that a resumed export redoes little work.
DEFAULT_CHUNK_ROWS = 4096


def token_dtype(codes: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0..codes-1: uint16 up to 65536 codes, else uint32."""
    if codes < 1:
        raise UserError(f"a codebook needs at least one code, not {codes}")
    if codes <= 2**16:
        return np.dtype(np.uint16)
    if codes <= 2**32:
        return np.dtype(np.uint32)
    raise UserError(f"{codes} codes per position do not fit in uint32 token ids")


class TokenStore(RowStore):
    """A token store opened for reading or writing. The arrays are zarr arrays (lazy)."""

    DATA = "tokens"
    KIND = "token"
    DATA_FORM = ("ui", 2, "integer ids (N, T)")

    @classmethod
    def open(cls, url: str, mode: str = "r") -> "TokenStore":
        """Open an existing token store; anything else at `url` is a user error."""
        return cls(cls._open_group(url, mode), str(url))

    @classmethod
    def create(
        cls,
        url: str,
        *,
        n: int,
        tokens: int,
        codes: int,
        chunk_size: int = DEFAULT_CHUNK_ROWS,
        attrs: dict[str, Any],
        overwrite: bool = False,
    ) -> "TokenStore":
        """Create an empty store for `n` images of `tokens` ids each, drawn from `codes` codes; it is
        unfinished (refused by decode) until the writer appends every chunk and calls `finish`."""
        dtype = token_dtype(codes)
        chunk_size = max(1, min(chunk_size, n))
        attrs = {"format_version": TOKEN_FORMAT_VERSION, "tokens": tokens, "codes": codes, "count": n, **attrs}
        group = cls._create_group(url, n=n, row_shape=(tokens,), dtype=dtype, chunk_size=chunk_size,
                                  compressor=SMALL_COMPRESSOR, attrs=attrs, overwrite=overwrite, unfinished=True)
        return cls(group, str(url))

    @property
    def tokens(self) -> zarr.Array:
        return self.group["tokens"]

    def check_ids(self, codes: int) -> None:
        """Refuse ids outside [0, codes) - a store damaged or written by another tool - naming the
        first such row and its key, before anything is decoded from it."""
        row = first_row_where(self.tokens, lambda chunk: (chunk.max(axis=1, initial=0) >= codes)
                              | (chunk.min(axis=1, initial=0) < 0))
        if row is not None:
            ids = self.tokens[row]
            shown = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise UserError(f"{self.url} row {row} (key {self.key(row)!r}) holds token id {shown}, but the run "
                            f"has {codes} codes per position")

    def append(self, tokens: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> None:
        """Write the next whole chunk (or the last, shorter one) at `rows_done`, then commit it."""
        start = self.rows_done
        if len(tokens) != self.chunk_size and start + len(tokens) != len(self):
            raise ValueError(f"append of {len(tokens)} rows at {start} is not one chunk of {self.chunk_size}")
        self.write(start, tokens, labels, keys)
        self.commit(start + len(tokens))

    def write(self, start: int, tokens: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> None:
        """Write rows [start, start+len) of whole chunks, so writers of disjoint chunk ranges
        (export-tokens --cluster) never share a chunk object; commits nothing."""
        stop = start + len(tokens)
        if start % self.chunk_size or stop > len(self) or (stop % self.chunk_size and stop != len(self)):
            raise ValueError(f"write [{start}, {stop}) is not aligned to chunks of {self.chunk_size}")
        self.tokens[start:stop] = tokens.astype(self.tokens.dtype, copy=False)
        self.labels[start:stop] = labels
        self.keys[start:stop] = keys
