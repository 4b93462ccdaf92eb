"""Token exports as shard files for training loaders: webdataset tars or parquet files.

    OUT/export.json              the export's attrs (run, store, T, K, classes, format, shard size, order)
    OUT/README.md                its dataset card (pipeline/storage/dataset_card.py)
    OUT/tokens-000000.tar ...    webdataset: {__key__, key.txt, tokens.npy, cls} per image
    OUT/tokens-000000.parquet    parquet: columns key, label, class, tokens (the ids as a list)

The shard formats (suffix, writer, key function) are export_formats.py's table. Shards hold
`shard_size` rows each (the last one fewer), so a multi-worker loader has shards to split between
its workers. Rows come in the latent store's order, or in a seeded random order
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
from revq_pipe.pipeline.errors import UserError, differences
from revq_pipe.pipeline.lease import contents
from revq_pipe.pipeline.preflight import shards_folder
from revq_pipe.pipeline.reporting.console import progress_bar
from revq_pipe.pipeline.seeds import stream_seed
from revq_pipe.pipeline.storage.dataset_card import CARD_NAME, write_card
from revq_pipe.pipeline.storage.export_formats import ShardFormat

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


def write_shards(out: str, attrs: dict, rows_from: RowsFrom, *, count: int, shards: ShardFormat, shard_size: int,
                 classes: list[str], card: str, overwrite: bool, progress: bool) -> list[str]:
    """Write `count` rows as `shards` files of `shard_size` rows into the folder `out`, after those
    already complete, with the dataset card `card` as its README.md.

    `attrs` describe the export (a folder holding another export's shards is refused unless
    `overwrite`); `classes` name the labels (parquet's `class` column).
    """
    if shard_size < 1:
        raise UserError(f"`shard_size` must be at least 1, not {shard_size}")
    folder = shards_folder(out)
    manifest = folder / MANIFEST
    own = {manifest, folder / CARD_NAME}  # an export's files besides its shards
    there = contents(folder)  # (a lease file is not content)
    begun = manifest in there and set(there) <= own  # begun, no shard written
    if there and not begun and not overwrite:
        _refuse_other_export(folder, read_json(manifest), attrs, there)
    elif there:
        _remove_export(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(manifest, attrs, indent=1)
    write_card(str(folder), card)

    names = [str(folder / (SHARD_STEM % i + shards.suffix)) for i in range(-(-count // shard_size))]
    done = 0
    while done < len(names) and os.path.exists(names[done]):
        done += 1
    try:
        with progress_bar(progress, total=count, initial=min(done * shard_size, count), unit="img",
                          desc=f"{shards.name} shards") as bar:
            for index, (ids, labels, keys) in enumerate(_rebatch(rows_from(done * shard_size), shard_size),
                                                        start=done):
                sample_keys = [str(key) for key in keys]
                write_atomically(Path(names[index]), lambda partial: shards.write(str(partial), ids, labels,
                                                                                  sample_keys, classes),
                                 suffix=PARTIAL_SUFFIX)
                bar.update(len(ids))
    except UserError:
        if done == 0:  # bad input met midway (a NaN row): the export this run began goes, so the next starts afresh
            _remove_export(folder)
        raise
    return names


def _remove_export(folder: Path) -> None:
    """Remove an export's shards (and a killed writer's partial ones), its manifest and its card from `folder`."""
    for stale in [*folder.glob("tokens-*"), folder / MANIFEST, folder / CARD_NAME]:
        stale.unlink(missing_ok=True)


def _refuse_other_export(folder: Path, manifest: dict | None, attrs: dict, there: list[Path]) -> None:
    """Refuse a used folder unless it holds this very export (`manifest` equals its `attrs`), naming
    what differs: the files of something else, or the export settings that are not these."""
    if manifest is None:
        raise UserError(f"{folder} holds other files (e.g. {there[0].name}) and no token export: pass "
                        f"`overwrite=True` to write the shards beside them, or choose another `out`")
    differ = differences(manifest, attrs, sorted(manifest.keys() | attrs.keys()))
    if differ:
        raise UserError(f"{folder} holds the tokens of another export ({differ}): pass `overwrite=True` to "
                        f"replace them, or choose another `out`")


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
