"""Token exports as shard files for training loaders: webdataset tars or parquet files.

    OUT/export.json              the export's attrs (run, store, T, K, classes, format, shard size, order)
    OUT/tokens-000000.tar ...    webdataset: {__key__, tokens.npy, cls} per image
    OUT/tokens-000000.parquet    parquet: columns key, label, class, tokens (the ids as a list)

Shards hold `shard_size` rows each (the last one fewer), so a multi-worker loader has shards to
split between its workers. Rows come in the latent store's order, or in a seeded random order
(`shuffled_rows`): a store of class folders is sorted by class, and a shard of one class is a bad
stream to train on. Each shard is written under `.partial` and renamed when complete, so a `*.tar`
glob never sees a half-written shard and a resumed export starts after the complete ones, ending
with the same bytes an uninterrupted export writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from revq_pipe.pipeline.atomic_files import read_json, write_atomically, write_json
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.lease import contents
from revq_pipe.pipeline.paths import local_path
from revq_pipe.pipeline.reporting.console import progress_bar
from revq_pipe.pipeline.seeds import stream_seed

SHARD_SUFFIXES = {"wds": ".tar", "parquet": ".parquet"}
DEFAULT_SHARD_SIZE = 10_000
SHARD_STEM = "tokens-%06d"
PARTIAL_SUFFIX = ".partial"
MANIFEST = "export.json"

Rows = Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]  # blocks of (ids, labels, keys)
RowsFrom = Callable[[int], Rows]  # the rows from export position `start` on


def shuffled_rows(rows_from: RowsFrom, count: int, seed: int, block: int = 4096) -> RowsFrom:
    """`rows_from` in the random order of the `export_order` stream of `seed`: every row is read
    once into memory (ids are small: T x 2 bytes each), then handed out permuted."""
    ids, labels, keys = (np.concatenate(parts) for parts in zip(*rows_from(0))) if count else ([], [], [])
    order = np.random.default_rng(stream_seed(seed, "export_order")).permutation(count)

    def permuted(start: int) -> Rows:
        for begin in range(start, count, block):
            rows = order[begin:begin + block]
            yield ids[rows], labels[rows], keys[rows]

    return permuted


def write_shards(out: str, attrs: dict, rows_from: RowsFrom, *, count: int, format: str, shard_size: int,
                 classes: list[str], key: Callable[[str], str], overwrite: bool, progress: bool) -> list[str]:
    """Write `count` rows as shards of `shard_size` into the folder `out`, after those already complete.

    `attrs` describe the export (a folder holding another export's shards is refused unless
    `overwrite`); `classes` name the labels (parquet's `class` column); `key` maps a store key
    to a sample key (webdataset's).
    """
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, not {shard_size}")
    folder = local_path(out)
    if folder is None:
        raise UserError("token shards are written to a local folder, not a URL")
    suffix = SHARD_SUFFIXES[format]
    manifest = folder / MANIFEST
    there = contents(folder)  # (a lease file is not content)
    if there and there != [manifest] and not overwrite:  # a manifest alone: begun, nothing written
        if read_json(manifest) != attrs:
            raise UserError(f"{folder} holds other files or tokens of another run, store or export setting: "
                            "pass --overwrite to replace them")
    elif there:
        _remove_export(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(manifest, attrs, indent=1)

    names = [str(folder / (SHARD_STEM % i + suffix)) for i in range(-(-count // shard_size))]
    done = 0
    while done < len(names) and os.path.exists(names[done]):
        done += 1
    write = _write_tar if format == "wds" else _write_parquet
    try:
        with progress_bar(progress, total=count, initial=min(done * shard_size, count), unit="img",
                          desc=f"{format} shards") as bar:
            for index, (ids, labels, keys) in enumerate(_rebatch(rows_from(done * shard_size), shard_size),
                                                        start=done):
                sample_keys = [key(str(k)) for k in keys]
                write_atomically(Path(names[index]), lambda partial: write(str(partial), ids, labels, sample_keys,
                                                                           classes), suffix=PARTIAL_SUFFIX)
                bar.update(len(ids))
    except UserError:
        if done == 0:  # bad input met midway (a NaN row): the export this run began goes, so the next starts afresh
            _remove_export(folder)
        raise
    return names


def _remove_export(folder: Path) -> None:
    """Remove an export's shards (and a killed writer's partial ones) and its manifest from `folder`."""
    for stale in [*folder.glob("tokens-*"), folder / MANIFEST]:
        stale.unlink(missing_ok=True)


def _rebatch(rows: Rows, size: int) -> Rows:
    """Blocks of any size -> blocks of exactly `size` rows (the last one fewer)."""
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    held = 0
    for block in rows:
        pending.append(block)
        held += len(block[0])
        while held >= size:
            merged = [np.concatenate(column) for column in zip(*pending)]
            yield tuple(column[:size] for column in merged)
            pending = [tuple(column[size:] for column in merged)]
            held -= size
    if held:
        yield tuple(np.concatenate(column) for column in zip(*pending))


def _write_tar(path: str, ids: np.ndarray, labels: np.ndarray, keys: list[str], classes: list[str]) -> None:
    import webdataset as wds

    with wds.TarWriter(path, mtime=0.0) as sink:  # a fixed mtime makes re-runs byte-identical
        for row, label, key in zip(ids, labels, keys):
            sink.write({"__key__": key, "tokens.npy": row, "cls": int(label)})


def _write_parquet(path: str, ids: np.ndarray, labels: np.ndarray, keys: list[str], classes: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [classes[label] if 0 <= label < len(classes) else None for label in labels.tolist()]
    id_type = pa.from_numpy_dtype(ids.dtype)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), type=id_type), ids.shape[1])
    table = pa.table({"key": pa.array(keys, pa.string()), "label": pa.array(labels, pa.int64()),
                      "class": pa.array(names, pa.string()), "tokens": tokens.cast(pa.list_(id_type))})
    pq.write_table(table, path, compression="zstd")
