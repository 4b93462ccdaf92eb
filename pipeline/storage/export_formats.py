"""What `export-tokens` can write: one table of export formats, the shard formats they use, and
what the stage is asked to do (`ExportConfig`).

    zarr       a token store at OUT (Zarr, row for row as the latent store; token_store.py)
    wds        webdataset shards in the folder OUT: {__key__, key.txt, tokens.npy, cls} per image
    parquet    parquet files in the folder OUT: key, label, class, tokens per image
    zarr+wds   the token store at OUT, and webdataset shards made from it in OUT-wds

Every format carries each row's store key exactly (the token store's `keys`, parquet's `key`,
webdataset's `key.txt`): the one field the exports of a store join on. A shard format is its file
suffix, its writer (one shard file from blocks of ids, labels, keys) and its key function (a store
key -> the name of the sample's members in the shard, where the format has one). The CLI's
`--format` choices are this table's names.

`ExportConfig` holds every setting of export-tokens, each field a user sets with its `Setting`
(pipeline/model/config.py), from which the CLI makes the command's options; the stage function
takes the same names as keywords or one `ExportConfig` as `config=`. Nothing heavy is imported
here: the CLI makes and checks one before torch loads, and the writers import webdataset or
pyarrow when they run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from revq_pipe.pipeline.device import DEVICE_HELP, DEVICES, known_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.config import OVERWRITE_HELP, StageConfig, setting, switch

if TYPE_CHECKING:
    import numpy as np


_WDS_ESCAPED = re.compile(r"[%.\\\x00-\x1f\x7f]")  # what a __key__ cannot hold as it is


def wds_key(key: str) -> str:
    """A store key as a webdataset __key__, reversibly: `urllib.parse.unquote` gives the key back.

    webdataset names a sample's tar members `<__key__>.<member>` and reads the key back up to the
    first dot of the file name, so `%`, `.`, `\\` and control characters are percent-escaped, and
    so is every `/` that would leave an empty path part (a leading, trailing or doubled one). The
    member names are then relative paths of plain parts inside the shard (no root, no `..` part:
    `tarfile.extractall` cannot write outside its folder), and two keys never share a sample
    ("cats/img.v2.jpg" -> "cats/img%2Ev2%2Ejpg", "../x.jpg" -> "%2E%2E/x%2Ejpg")."""
    parts = str(key).split("/")
    if parts == [""]:
        raise UserError("a row has the empty key, which names no webdataset sample: give every row a key")
    escaped = [_WDS_ESCAPED.sub(lambda char: f"%{ord(char[0]):02X}", part) for part in parts]
    joined = escaped[0]
    for before, after in zip(escaped, escaped[1:]):
        joined += ("/" if before and after else "%2F") + after
    return joined


def write_tar(path: str, ids: np.ndarray, labels: np.ndarray, keys: list[str], classes: list[str]) -> None:
    """One webdataset shard: per row `__key__` (wds_key), `key.txt` (the store key exactly: the join
    field shared with the token store and parquet), `tokens.npy` and `cls`."""
    import webdataset as wds

    with wds.TarWriter(path, mtime=0.0) as sink:  # a fixed mtime makes re-runs byte-identical
        for row, label, key in zip(ids, labels, keys):
            sink.write({"__key__": wds_key(key), "key.txt": str(key), "tokens.npy": row, "cls": int(label)})


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
    """Shard files of one kind: `write(path, ids, labels, keys, classes)` makes one file from store
    keys; `key` maps a store key to the name its sample's members take there (None: the format
    stores the key as a value only), refusing a key it cannot name."""

    name: str
    suffix: str
    files: str  # how reports name them
    write: Callable[[str, "np.ndarray", "np.ndarray", list[str], list[str]], None]
    key: Callable[[str], str] | None

    def check_keys(self, keys: Iterable[str]) -> None:
        """Refuse, before anything is written, a key the format cannot name (UserError)."""
        if self.key is not None:
            for key in keys:
                self.key(key)


WDS = ShardFormat("wds", ".tar", "webdataset shards", write_tar, wds_key)
PARQUET = ShardFormat("parquet", ".parquet", "parquet files", write_parquet, None)


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


@dataclass(frozen=True)
class ExportConfig(StageConfig):
    """How to export a store's tokens: every setting of `export_tokens` (its CLI options, in their
    order), and `progress`, which is how a Python caller's run shows itself rather than what it
    writes (the CLI always shows its progress bars).

        ExportConfig(format="wds", shuffle=True, seed=3)
    """

    stage = "export_tokens"

    batch_size: int = setting("Latents per tokenize batch.", 1024, metavar="N", minimum=1)
    device: str = setting(DEVICE_HELP + ".", "auto", metavar="|".join(DEVICES), validate=known_device)
    format: str = setting("zarr: a token store (uint16/uint32 ids, row for row as STORE); wds: webdataset shards "
                          "{__key__, key.txt, tokens.npy, cls}; parquet: files of rows key, label, class, tokens; "
                          "zarr+wds: both, shards in TOKENS-wds.", "zarr", choices=tuple(EXPORT_FORMATS),
                          validate=export_format)
    shard_size: int = setting("Rows per webdataset shard or parquet file.", 10_000, metavar="N", minimum=1)
    shuffle: bool = switch("Write shards in a random order fixed by --seed, not the store's (class-sorted for "
                           "ImageFolders). The Zarr token store keeps the store's order.", "--shuffle")
    seed: int = setting("Seed of the --shuffle order.", 0, metavar="N", minimum=0)
    overwrite: bool = switch(OVERWRITE_HELP, "--overwrite")
    progress: bool = True
