"""What `export-tokens` can write: one table of export formats, and the shard formats they use.

    zarr       a token store at OUT (Zarr, row for row as the latent store; token_store.py)
    wds        webdataset shards in the folder OUT: {__key__, tokens.npy, cls} per image
    parquet    parquet files in the folder OUT: key, label, class, tokens per image
    zarr+wds   the token store at OUT, and webdataset shards made from it in OUT-wds

A shard format is its file suffix, its writer (one shard file from blocks of ids, labels, keys)
and its key function (a store key -> the sample's key in the shard). The CLI's `--format` choices
are this table's names. Nothing heavy is imported here: the writers import webdataset or pyarrow
when they run.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.paths import inside_parts

if TYPE_CHECKING:
    import numpy as np


def wds_key(key: str) -> str:
    """A store key as a webdataset __key__, which names the sample's tar members: a relative path
    inside the shard (no leading /, no `..`: `tarfile.extractall` would write outside its folder),
    without the image's extension, since webdataset cuts a key at the first dot of the file name
    ("cat/001.jpg" -> "cat/001", "/abs/../x.y.jpg" -> "abs/x_y")."""
    stem, _ = posixpath.splitext(str(key))
    parts = inside_parts(stem)
    if not parts:
        raise UserError(f"the key {key!r} names no sample: it has no name left inside a shard")
    return "/".join(parts).replace(".", "_")


def write_tar(path: str, ids: np.ndarray, labels: np.ndarray, keys: list[str], classes: list[str]) -> None:
    import webdataset as wds

    with wds.TarWriter(path, mtime=0.0) as sink:  # a fixed mtime makes re-runs byte-identical
        for row, label, key in zip(ids, labels, keys):
            sink.write({"__key__": key, "tokens.npy": row, "cls": int(label)})


def write_parquet(path: str, ids: np.ndarray, labels: np.ndarray, keys: list[str], classes: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [classes[label] if 0 <= label < len(classes) else None for label in labels.tolist()]
    id_type = pa.from_numpy_dtype(ids.dtype)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), type=id_type), ids.shape[1])
    table = pa.table({"key": pa.array(keys, pa.string()), "label": pa.array(labels, pa.int64()),
                      "class": pa.array(names, pa.string()), "tokens": tokens.cast(pa.list_(id_type))})
    pq.write_table(table, path, compression="zstd")


@dataclass(frozen=True)
class ShardFormat:
    """Shard files of one kind: `write(path, ids, labels, keys, classes)` makes one file; `key` maps a
    store key to the sample's key there (None: the store key as it is), which messages call `key_name`."""

    name: str
    suffix: str
    files: str  # how reports name them
    write: Callable[[str, "np.ndarray", "np.ndarray", list[str], list[str]], None]
    key: Callable[[str], str] | None
    key_name: str

    def sample_key(self, key: str) -> str:
        return self.key(key) if self.key is not None else str(key)


WDS = ShardFormat("wds", ".tar", "webdataset shards", write_tar, wds_key, "webdataset __key__")
PARQUET = ShardFormat("parquet", ".parquet", "parquet files", write_parquet, None, "parquet key")


@dataclass(frozen=True)
class ExportFormat:
    """One `--format`: a token store at OUT, shard files, or both (then the shards go to OUT-<shards>)."""

    token_store: bool
    shards: ShardFormat | None

    def shard_folder(self, out: str) -> str | None:
        """Where the shards go: OUT itself, OUT-wds beside a token store at OUT, or None (no shards)."""
        if self.shards is None:
            return None
        return f"{str(out).rstrip('/')}-{self.shards.name}" if self.token_store else str(out)


EXPORT_FORMATS: dict[str, ExportFormat] = {
    "zarr": ExportFormat(token_store=True, shards=None),
    "wds": ExportFormat(token_store=False, shards=WDS),
    "parquet": ExportFormat(token_store=False, shards=PARQUET),
    "zarr+wds": ExportFormat(token_store=True, shards=WDS),
}


def export_format(name: str) -> ExportFormat:
    """The export format called `name`; an unknown one is a UserError naming those there are."""
    if name not in EXPORT_FORMATS:
        raise UserError(f"unknown `format={name}`: use one of {', '.join(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[name]
