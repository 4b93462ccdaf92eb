"""The latent store: a Zarr v3 group, laid out as

    latents (N, C, H, W) float16|float32, chunked along N, compressed
    latents_flip (N, C, H, W), optional (`encode --flip`): row i is the latent of image i flipped
            horizontally, chunked and compressed like `latents`
    labels  (N,) int64, -1 where unknown
    keys    (N,) str, the sample's key / relative path
    mean, std (C*H*W,) float32, per-dimension statistics of all stored latents (flipped ones too)
    attrs["revq"]: format version, vae id, image size, latent shape, dtype, counts, skipped keys,
                   and the resume state below

Writes are chunk-aligned along N, so several writers (encode on several GPUs or machines) can
fill disjoint chunk ranges of one store without locks.

`RowStore` is what the latent and the token store share: the per-row arrays, the attrs, one
resume protocol, and the chunk completion marks of --cluster jobs (pipeline/storage/staging.py).
A writer creates the store `unfinished` (attrs `complete: false`, `rows_done: 0`), fills rows in
order a whole chunk at a time, calls `commit` after each chunk (`rows_done`, plus its own
`progress` record of where to pick up, in one metadata write) and `finish` at the end
(`complete: true`; a latent store computes its statistics first). `open` refuses an unfinished
latent store unless asked, so no later stage reads a half-written store as if it were whole; a
writer run again resumes at `rows_done`. Stores without the flag (written whole by other tools)
are complete.

The group's first metadata write already holds the unfinished state, so a writer killed at any
moment leaves either nothing, or a store it resumes, or one with no row committed
(`vacant`: replaced by the next writer without --overwrite). Creating a store replaces only
what `vacant` allows or, with `overwrite`, a Zarr store: never a folder of other files.
"""

from __future__ import annotations

import math
import re
import shutil
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from revq_pipe.pipeline.errors import UserError, differences
from revq_pipe.pipeline.lease import LEASE_NAME, contents
from revq_pipe.pipeline.paths import exists, filesystem, local_path
from revq_pipe.pipeline.preflight import LATENT_DTYPES, is_zarr_store, no_store_at
from revq_pipe.pipeline.storage.staging import ChunkMarks, Staging
from revq_pipe.pipeline.storage.stats import latent_stats

if TYPE_CHECKING:
    import dask.array

# The dataset card an export writes into its token store's folder (storage/dataset_card.py).
CARD_NAME = "README.md"
# A writer's lease file and a token store's card sit in the store's folder, which Zarr lists with a
# warning on every look at the group's members (on the user's terminal, from every dask worker):
# expected, so quiet.
warnings.filterwarnings("ignore", message=f"Object at ({re.escape(LEASE_NAME)}|{re.escape(CARD_NAME)}) is not "
                        "recognized", category=UserWarning)

FORMAT_VERSION = 1
# Latents are near-Gaussian floats: their mantissas are noise, only the sign/exponent byte
# compresses. Blosc's byte shuffle puts those bytes together and zstd entropy-codes them. Measured
# on 1,024 photo-crop latents of a trained DC-AE-class VAE (README, "Latent codec"): zstd 5 + byte
# shuffle stores float16 at 1.17x (zarr's default zstd without shuffle 1.07x; bit shuffle 1.08x;
# zstd 9 no better and 10x slower), compressing ~80 MB/s and decompressing ~0.9 GB/s on one
# shared CPU core: ~20,000 DC-AE latents/s per writer thread, far above any GPU's encode rate.
LATENT_COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
SMALL_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
FLIP_ARRAY = "latents_flip"
STAGING = "staging"  # encode --cluster's staging group, while it runs
CHUNK_TARGET_BYTES = 4 << 20  # uncompressed bytes per chunk: a few MB suits Zarr and object stores


def default_chunk_rows(latent_shape: tuple[int, int, int], dtype: str) -> int:
    """Rows per latent chunk: a power of two near CHUNK_TARGET_BYTES of uncompressed latents."""
    row_bytes = math.prod(latent_shape) * np.dtype(dtype).itemsize
    return int(min(4096, max(16, 2 ** int(math.log2(max(1, CHUNK_TARGET_BYTES // row_bytes))))))


def open_zarr_group(url: str, mode: str = "r") -> zarr.Group:
    """Open a Zarr group at a local path or fsspec URL; a missing group is a user error."""
    try:
        return zarr.open_group(str(url), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise no_store_at(url) from err
    except (zarr.errors.ContainsArrayError, ValueError, KeyError) as err:
        raise UserError(f"{url} is not a Zarr v3 group: {err}") from err


# What each kind of row store is, by its data array: how a store given in the wrong place is named.
ROW_STORE_KINDS = {"latents": "a latent store (made by encode or import-latents)",
                   "tokens": "a token store (made by export-tokens)"}


class RowStore:
    """What the latent and token stores share: a Zarr group whose per-row arrays (the data array
    named by DATA, `labels`, `keys`) are chunked alike along N, attrs["revq"], and the resume
    protocol (`commit`, `finish`, `rows_done`, `complete`; see the module docstring)."""

    DATA = ""  # the per-row data array: "latents" or "tokens"
    KIND = ""  # how messages name the store: "latent" or "token"
    DATA_FORM = ("", 0, "")  # what the data array must be: numpy dtype kinds, dimensions, in words

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url

    @classmethod
    def _open_group(cls, url: str, mode: str) -> zarr.Group:
        group = open_zarr_group(url, mode)
        if cls.DATA not in group:
            other = next((what for data, what in ROW_STORE_KINDS.items() if data in group), None)
            if other is not None:  # the other kind of store, given where this one was expected
                raise UserError(f"{url} is {other}, not a {cls.KIND} store")
        for name in (cls.DATA, "labels", "keys"):
            if name not in group:
                raise UserError(f"{url} is not a {cls.KIND} store: it has no '{name}' array")
        kinds, ndim, words = cls.DATA_FORM
        data = group[cls.DATA]
        if not isinstance(data, zarr.Array) or data.dtype.kind not in kinds or data.ndim != ndim:
            raise UserError(f"{url} is not a {cls.KIND} store: its '{cls.DATA}' must be {words}, not "
                            f"{getattr(data, 'dtype', 'a group')} of shape {list(getattr(data, 'shape', []))}")
        return group

    @classmethod
    def reopen(cls, url: str, identity: dict[str, Any], overwrite: bool) -> "RowStore | None":
        """The store at `url` for a writer to go on with, made for the same `identity` (attrs it
        must match: what it is made from), or None when the writer should create one: nothing
        worth keeping is there (`vacant`), or `overwrite`. Anything else is refused."""
        if overwrite or vacant(url):
            return None
        try:
            existing = cls(cls._open_group(url, "r+"), str(url))
        except UserError as err:
            raise UserError(f"{err}: pass `overwrite=True` to replace it") from None
        differ = differences(existing.attrs, identity)
        if differ:
            raise UserError(f"{url} holds {cls.KIND}s made from other inputs ({differ}): pass `overwrite=True` to "
                            f"replace it, or choose another `out`")
        remove_partial_writes(url)
        return existing

    @classmethod
    def _create_group(cls, url: str, *, n: int, row_shape: tuple[int, ...], dtype: Any, chunk_size: int,
                      compressor: BloscCodec, attrs: dict[str, Any], overwrite: bool,
                      unfinished: bool) -> zarr.Group:
        """A group for `n` rows: the data array, labels (-1) and keys, all chunked alike along N;
        `unfinished` begins the resume protocol (no row done, not complete)."""
        if unfinished:
            attrs = {**attrs, "complete": False, "rows_done": 0}
        group = _new_group(url, {"revq": attrs}, overwrite)
        group.create_array(cls.DATA, shape=(n, *row_shape), chunks=(chunk_size, *row_shape), dtype=dtype,
                           compressors=compressor, fill_value=0)
        group.create_array("labels", shape=(n,), chunks=(chunk_size,), dtype="int64",
                           compressors=SMALL_COMPRESSOR, fill_value=-1)
        group.create_array("keys", shape=(n,), chunks=(chunk_size,), dtype=str)
        return group

    @property
    def labels(self) -> zarr.Array:
        return self.group["labels"]

    @property
    def keys(self) -> zarr.Array:
        return self.group["keys"]

    def key(self, row: int) -> str:
        """The key of one row, as plain text (for messages: zarr hands back a 0-d array)."""
        return str(self.keys[row])

    @property
    def attrs(self) -> dict[str, Any]:
        attrs = self.group.attrs.get("revq", {})
        return dict(attrs) if isinstance(attrs, dict) else {}  # another tool's attrs: none of ours

    def update_attrs(self, **values: Any) -> None:
        """Merge `values` into attrs["revq"] (one atomic metadata write on local and object stores)."""
        self.group.attrs["revq"] = {**self.attrs, **values}

    @property
    def complete(self) -> bool:
        """Every row is written. Without the flag: complete, unless the store counts `rows_done`
        short of its length (token stores written before the flag was shared)."""
        attrs = self.attrs
        if "complete" in attrs:
            return bool(attrs["complete"])
        return int(attrs.get("rows_done", len(self))) >= len(self)

    @property
    def rows_done(self) -> int:
        """Rows [0, rows_done) are final: a resumed writer starts at this row."""
        attrs = self.attrs
        if "rows_done" in attrs:
            return int(attrs["rows_done"])
        # Unfinished latent stores written before rows_done was shared kept it in `progress`.
        return int(self.progress.get("rows", len(self) if self.complete else 0))

    @property
    def progress(self) -> dict[str, Any]:
        """The writer's own resume record of its last `commit` ({} when none, or once complete)."""
        return dict(self.attrs.get("progress", {}))

    def commit(self, rows_done: int, progress: dict[str, Any] | None = None, **attrs: Any) -> None:
        """Record that rows [0, rows_done) are final, with the writer's `progress` record and any
        other attrs, in one metadata write: call it after a chunk's arrays are written."""
        values = {**attrs, "rows_done": rows_done}
        if progress is not None:
            values["progress"] = progress
        self.update_attrs(**values)

    def finish(self, **attrs: Any) -> None:
        """Mark the store complete (with any last attrs): every row is final, the resume record goes."""
        values = {**self.attrs, **attrs, "complete": True, "rows_done": len(self)}
        values.pop("progress", None)
        self.group.attrs["revq"] = values

    def forget_rows(self) -> None:
        """Mark the store as holding no final row (unfinished, no resume record): what `vacant` sees,
        so the next writer replaces it without `overwrite`."""
        values = {**self.attrs, "complete": False, "rows_done": 0}
        values.pop("progress", None)
        self.group.attrs["revq"] = values

    @property
    def chunk_size(self) -> int:
        return self.group[self.DATA].chunks[0]

    def __len__(self) -> int:
        return self.group[self.DATA].shape[0]

    def chunk_marks(self, name: str, *, create: bool = False) -> ChunkMarks | None:
        """The chunk completion marks `name`, one per chunk of the store: made (none written) when
        `create` and there are none yet; None when there are none and not `create`."""
        return ChunkMarks.open(self.group, name, -(-len(self) // self.chunk_size) if create else None)

    def remove_chunk_marks(self, name: str) -> None:
        del self.group[name]


def first_row_where(array: zarr.Array, bad_rows) -> int | None:
    """The first row of `array` for which `bad_rows(chunk)` (a boolean per row of a chunk) is True,
    read one chunk at a time; None when there is none."""
    step = array.chunks[0]
    for start in range(0, array.shape[0], step):
        bad = np.asarray(bad_rows(array[start:start + step]))
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def vacant(url: str) -> bool:
    """Whether `url` holds nothing a writer would lose by replacing it: nothing at all, an empty
    folder (a lease aside), or a store whose writer committed no row (killed while creating it)."""
    path = local_path(url)
    if path is not None and not contents(path):
        return not path.is_file()
    if path is None and not exists(url):
        return True
    try:
        group = zarr.open_group(str(url), mode="r")
    except Exception:  # noqa: BLE001 - not a readable Zarr group: something else, keep it
        return False
    attrs = group.attrs.get("revq")
    if isinstance(attrs, dict) and attrs.get("complete") is False:
        progress = attrs.get("progress", {})
        if "job" in progress:  # a --cluster job's: its pieces and chunks are done before any row is committed
            return False
        # (encode's stores from before `rows_done` was shared counted rows in `progress`)
        return int(attrs.get("rows_done", progress.get("rows", 0))) == 0
    with warnings.catch_warnings():  # a lease file in the folder is "not a Zarr node"
        warnings.simplefilter("ignore")
        return attrs is None and not any(True for _ in group.array_keys())  # a bare group, no array yet


def _new_group(url: str, attributes: dict[str, Any], overwrite: bool) -> zarr.Group:
    """A new Zarr group at `url` whose first metadata write holds `attributes`; what is there is
    replaced when `overwrite` (a Zarr store only), else refused with FileExistsError. A lease in
    the folder stays."""
    path = local_path(url)
    if path is None:
        return zarr.open_group(str(url), mode="w" if overwrite else "w-", attributes=attributes)
    leftovers = contents(path)
    if leftovers:
        if not overwrite:
            raise FileExistsError(f"{url} already holds data")
        if not is_zarr_store(path):
            raise UserError(f"{url} holds files but is not a Zarr store: refusing to replace it")
        _remove_entries(leftovers)
    return zarr.open_group(str(url), mode="a", attributes=attributes)


def remove_store(url: str) -> None:
    """Remove the store at `url`, which its writer gives up (a local one's lease stays, for its
    holder to release)."""
    path = local_path(url)
    if path is not None:
        _remove_entries(contents(path))
        return
    fs, root = filesystem(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _remove_entries(entries: list) -> None:
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_partial_writes(url: str) -> None:
    """Delete the temp files Zarr leaves when a writer is killed mid-write (local stores: it writes
    each chunk to `<name>.<uuid>.partial` and renames it), so a resumed store holds only its chunks."""
    path = local_path(url)
    if path is not None:
        for partial in path.rglob("*.partial"):
            partial.unlink(missing_ok=True)


class LatentStore(RowStore):
    """A latent store opened for reading or writing. The arrays are zarr arrays (lazy)."""

    DATA = "latents"
    KIND = "latent"
    DATA_FORM = ("f", 4, "floats (N, C, H, W)")

    @classmethod
    def open(cls, url: str, mode: str = "r", *, allow_incomplete: bool = False) -> "LatentStore":
        """Open an existing store; an unfinished one (`encode` still writing it) is a UserError unless allowed."""
        store = cls(cls._open_group(url, mode), str(url))
        if not allow_incomplete and not store.complete:
            raise UserError(f"{url} is incomplete: `revq-pipe encode` was interrupted while writing it; "
                            f"run the same encode command again to finish it")
        return store

    @classmethod
    def create(
        cls,
        url: str,
        *,
        n: int,
        latent_shape: tuple[int, int, int],
        dtype: str,
        chunk_size: int,
        attrs: dict[str, Any],
        overwrite: bool = False,
        unfinished: bool = False,
        flip: bool = False,
    ) -> "LatentStore":
        """Create the arrays for `n` rows (0 is fine: `resize` grows them as rows arrive), with a
        `latents_flip` array beside `latents` when `flip`.

        `unfinished` creates it for a writer of the resume protocol: `open` refuses it until `finish`.
        """
        if dtype not in LATENT_DTYPES:
            raise UserError(f"latent dtype must be one of {LATENT_DTYPES}, not {dtype!r}")
        attrs = {"format_version": FORMAT_VERSION, "latent_shape": list(latent_shape), "dtype": dtype, **attrs}
        group = cls._create_group(url, n=n, row_shape=tuple(latent_shape), dtype=dtype, chunk_size=chunk_size,
                                  compressor=LATENT_COMPRESSOR, attrs=attrs, overwrite=overwrite,
                                  unfinished=unfinished)
        if flip:
            group.create_array(FLIP_ARRAY, shape=(n, *latent_shape), chunks=(chunk_size, *latent_shape),
                               dtype=dtype, compressors=LATENT_COMPRESSOR, fill_value=0)
        return cls(group, str(url))

    @property
    def latents(self) -> zarr.Array:
        return self.group["latents"]

    @property
    def has_flip(self) -> bool:
        """Whether the store holds the latents of the horizontally flipped images too."""
        return FLIP_ARRAY in self.group

    @property
    def latents_flip(self) -> zarr.Array:
        """(N, C, H, W): row i is the latent of image i flipped horizontally (`has_flip` stores only)."""
        return self.group[FLIP_ARRAY]

    def _latent_arrays(self) -> list[zarr.Array]:
        return [self.latents, self.latents_flip] if self.has_flip else [self.latents]

    def dask_latents(self) -> list[dask.array.Array]:
        """The latents (and flipped latents, when stored) as lazy dask arrays of the store's chunks."""
        import dask.array as da

        return [da.from_zarr(array) for array in self._latent_arrays()]

    def staging(self) -> Staging:
        """encode --cluster's staging area in the store (made on first use; `remove_staging` ends it)."""
        if STAGING not in self.group:
            self.group.create_group(STAGING)
        return Staging(self.group[STAGING], SMALL_COMPRESSOR)

    def remove_staging(self) -> None:
        if STAGING in self.group:
            del self.group[STAGING]

    def resize(self, n: int) -> None:
        """Grow or shrink the per-row arrays to `n` rows (metadata only; chunks past `n` go)."""
        c, h, w = self.latent_shape
        for array in self._latent_arrays():
            array.resize((n, c, h, w))
        self.labels.resize((n,))
        self.keys.resize((n,))

    def nbytes_stored(self) -> int:
        """Bytes the latents (flipped ones too) take in the store, compressed (with their small metadata)."""
        return sum(int(array.nbytes_stored()) for array in self._latent_arrays())

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.latents.shape[1:])

    def _stat(self, name: str) -> np.ndarray | None:
        return self.group[name][:] if name in self.group else None

    @property
    def mean(self) -> np.ndarray | None:
        """Per-dimension mean (C*H*W,) float32, or None before statistics are computed."""
        return self._stat("mean")

    @property
    def std(self) -> np.ndarray | None:
        return self._stat("std")

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(key, reason) of the source samples that could not be encoded, in source order."""
        attrs = self.attrs
        return list(zip(attrs.get("skipped_keys", []), attrs.get("skipped_reasons", [])))

    def require_stats(self) -> tuple[np.ndarray, np.ndarray]:
        mean, std = self.mean, self.std
        if mean is None or std is None:
            raise UserError(f"{self.url} has no mean/std statistics: run `revq-pipe stats {self.url}`")
        return mean, std

    def check_finite(self) -> None:
        """Refuse a store with a NaN or inf latent (or flipped latent), naming the first such row and
        its key, when its statistics show one (one NaN or inf makes its dimension's mean or std
        non-finite). Rows changed after the statistics were computed escape this: readers check the
        rows themselves as they read them (`checked_rows`)."""
        mean, std = self.mean, self.std
        if mean is not None and std is not None and np.isfinite(mean).all() and np.isfinite(std).all():
            return
        for array in self._latent_arrays():
            for start in range(0, array.shape[0], array.chunks[0]):
                self.checked_rows(start, start + array.chunks[0], array.basename)

    def checked_rows(self, start: int, stop: int, array: str = "latents") -> np.ndarray:
        """Rows [start, stop) of `array` (latents or latents_flip), refused with the first NaN or inf
        row and its key named: what every reader of a store's rows goes through before using them."""
        rows = self.group[array][start:stop]
        self.refuse_non_finite(rows, range(start, start + len(rows)), array)
        return rows

    def refuse_non_finite(self, rows: np.ndarray, row_numbers, array: str = "latents") -> None:
        """Raise a UserError naming the first of `rows` (read from `array` at `row_numbers`) that
        holds NaN or inf, and its key."""
        bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
        if bad.any():
            row = int(row_numbers[int(np.argmax(bad))])
            what = "flipped latents" if array == FLIP_ARRAY else "latents"
            raise UserError(f"{self.url} row {row} (key {self.key(row)!r}) holds NaN or inf {what}: "
                            f"re-encode that image (e.g. with `dtype=float32`) or leave it out")

    def write(self, start: int, latents: np.ndarray, labels: np.ndarray, keys: np.ndarray,
              latents_flip: np.ndarray | None = None) -> None:
        """Write rows [start, start+len) - chunk-aligned so disjoint writers never share a chunk.
        A store with flipped latents needs them (`latents_flip`) for the same rows."""
        stop = start + len(latents)
        if start % self.chunk_size or (stop % self.chunk_size and stop != len(self)):
            raise ValueError(f"write [{start}, {stop}) is not aligned to chunks of {self.chunk_size}")
        if (latents_flip is not None) != self.has_flip:
            raise ValueError("a store with latents_flip is written with flipped latents, and only such a store")
        self.latents[start:stop] = latents
        if latents_flip is not None:
            self.latents_flip[start:stop] = latents_flip
        self.labels[start:stop] = labels
        self.keys[start:stop] = keys

    def write_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        for name, values in (("mean", mean), ("std", std)):
            arr = self.group.create_array(name, shape=values.shape, dtype="float32", overwrite=True)
            arr[:] = values.astype(np.float32)

    def compute_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Compute the per-dimension mean/std of every stored latent (flipped ones too: training
        draws from both), store them and return them."""
        mean, std = latent_stats(*self.dask_latents())
        self.write_stats(mean, std)
        return mean, std

    def finish(self, **attrs: Any) -> None:
        """Compute the statistics, then mark the store complete: a complete store always has them."""
        self.compute_stats()
        super().finish(**attrs)


def skipped_attrs(skipped: list[tuple[str, str]]) -> dict[str, Any]:
    """The attrs that record skipped samples, as `LatentStore.skipped` reads them back."""
    return {"skipped_count": len(skipped), "skipped_keys": [k for k, _ in skipped],
            "skipped_reasons": [r for _, r in skipped]}


def write_latent_store(
    url: str,
    latents: np.ndarray,
    labels: np.ndarray | None = None,
    keys: np.ndarray | list[str] | None = None,
    *,
    attrs: dict[str, Any] | None = None,
    chunk_size: int = 256,
    overwrite: bool = False,
) -> LatentStore:
    """Write an in-memory (N, C, H, W) array as a complete latent store, statistics included.

    For tests and small in-memory data; `encode` and `decode` write chunk by chunk through
    `LatentStore.write`.
    """
    n = len(latents)
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    keys = np.array([f"{i:08d}" for i in range(n)] if keys is None else list(keys), dtype=str)
    store = LatentStore.create(url, n=n, latent_shape=tuple(latents.shape[1:]), dtype=str(latents.dtype),
                               chunk_size=min(chunk_size, max(n, 1)), attrs={"count": n, **(attrs or {})},
                               overwrite=overwrite, unfinished=True)
    store.write(0, latents, labels, keys)
    store.finish()
    return store
