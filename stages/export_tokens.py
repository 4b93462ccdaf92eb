"""`revq-pipe export-tokens`: every image's token ids, for training generators on them.

Reads a latent store chunk by chunk, tokenizes it with a fitted run (quantization only: the
rectifier is not needed to find ids), and writes a token store (Zarr), webdataset shards of
{__key__, tokens.npy, cls}, or both. Both outputs resume where a killed export stopped, and the
resumed result is identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.lease import contents, output_lease
from revq_pipe.pipeline.paths import absolute_url, inside_parts, local_path, refuse_collisions, same_location
from revq_pipe.pipeline.run_dir import Run
from revq_pipe.pipeline.store import LatentStore
from revq_pipe.pipeline.token_store import TokenStore, token_dtype

FORMATS = ("zarr", "wds", "zarr+wds")
# Samples per webdataset shard: ~1.5 KiB each for T=512 (ids + tar headers), so ~70 MiB shards.
SHARD_ROWS = 50_000
SHARD_PATTERN = "tokens-%06d.tar"
# Shards are written under this suffix and renamed when complete, so a `*.tar` glob never sees a
# half-written shard and a resumed export knows which shards are done.
PARTIAL_SUFFIX = ".partial"


@dataclass
class ExportSummary:
    """What export-tokens wrote."""

    out: str
    format: str
    count: int
    tokens: int
    codes: int
    dtype: str
    resumed_from: int
    seconds: float
    shards: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"{self.count} images -> {self.tokens} tokens each ({self.codes} codes per position, "
                 f"{self.dtype}) in {self.seconds:.1f} s"]
        if self.resumed_from >= self.count:
            lines.append("the token store was already complete: nothing to do")
        elif self.resumed_from:
            lines.append(f"resumed at image {self.resumed_from}")
        if "zarr" in self.format:
            lines.append(f"token store: {self.out}")
        if self.shards:
            lines.append(f"webdataset shards: {len(self.shards)} in {Path(self.shards[0]).parent}")
        return "\n".join(lines)


def export_tokens(
    run: str,
    store: str,
    out: str,
    *,
    batch_size: int = 1024,
    device: str = "auto",
    format: str = "zarr",
    overwrite: bool = False,
    progress: bool = True,
) -> ExportSummary:
    """Tokenize every latent of `store` with the run at `run` and write the ids to `out`.

    format "zarr" writes a token store at `out`; "wds" writes webdataset shards into the folder
    `out`; "zarr+wds" writes the token store at `out` and the shards into `<out>-wds`.
    An existing output made from the same run and store is resumed; one made otherwise is refused
    unless `overwrite`.
    """
    if format not in FORMATS:
        raise UserError(f"unknown --format {format!r}: use one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    if same_location(out, store):
        raise UserError("--out must not be the latent store itself")
    dev = resolve_device(device)
    run_info = Run.load(run, dev)
    latents = LatentStore.open(store)
    run_info.check_store(latents)
    latents.check_finite()
    model = run_info.model
    attrs = {**run_info.token_attrs(), "store": absolute_url(store)}
    shard_folder = f"{str(out).rstrip('/')}-wds" if format == "zarr+wds" else out
    if "wds" in format:  # before anything is written
        refuse_collisions([wds_key(key) for key in latents.keys[:]], latents.keys, "webdataset __key__")
    started = time.perf_counter()

    summary = ExportSummary(out=str(out), format=format, count=len(latents), tokens=run_info.tokens,
                            codes=run_info.codes, dtype=token_dtype(run_info.codes).name, resumed_from=0, seconds=0.0)
    with contextlib.ExitStack() as leases:
        for output in {out, shard_folder}:
            leases.enter_context(output_lease(output, "export-tokens"))
        if "zarr" in format:
            tokens = _open_or_create(out, latents, run_info, attrs, overwrite)
            summary.resumed_from = tokens.rows_done
            _fill_token_store(tokens, latents, model, batch_size, progress)
        if format == "zarr+wds":
            summary.shards = _write_shards(shard_folder, attrs, len(latents), overwrite,
                                           lambda start: _rows_from_token_store(tokens, start), progress)
        elif format == "wds":
            summary.shards = _write_shards(shard_folder, attrs, len(latents), overwrite,
                                           lambda start: _rows_from_latents(latents, model, batch_size, start),
                                           progress)
    summary.seconds = time.perf_counter() - started
    return summary


def _open_or_create(out: str, latents: LatentStore, run: "Run", attrs: dict, overwrite: bool) -> TokenStore:
    """The token store to fill: an unfinished one from the same run and store, or a new one."""
    existing = TokenStore.reopen(out, {**attrs, "count": len(latents)}, overwrite)
    if existing is not None:
        return existing
    # Chunks of as many rows as the latent store's: each export step reads one latent chunk.
    return TokenStore.create(out, n=len(latents), tokens=run.tokens, codes=run.codes,
                             chunk_size=latents.chunk_size, attrs=attrs, overwrite=True)


def _fill_token_store(tokens: TokenStore, latents: LatentStore, model, batch_size: int, progress: bool) -> None:
    """Tokenize the rows after `rows_done`, one token-store chunk at a time, and finish the store."""
    with tqdm(total=len(tokens), initial=tokens.rows_done, unit="img", desc="export-tokens",
              disable=not progress) as bar:
        for start in range(tokens.rows_done, len(tokens), tokens.chunk_size):
            stop = min(start + tokens.chunk_size, len(tokens))
            ids = model.tokenize_batched(latents.latents[start:stop], batch_size)
            tokens.append(ids, latents.labels[start:stop], latents.keys[start:stop])
            bar.update(stop - start)
    if not tokens.complete:
        tokens.finish()


Rows = Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]


def _rows_from_token_store(tokens: TokenStore, start: int) -> Rows:
    for begin in range(start, len(tokens), tokens.chunk_size):
        end = min(begin + tokens.chunk_size, len(tokens))
        yield tokens.tokens[begin:end], tokens.labels[begin:end], tokens.keys[begin:end]


def _rows_from_latents(latents: LatentStore, model, batch_size: int, start: int) -> Rows:
    dtype = token_dtype(model.config.codes)
    step = max(latents.chunk_size, batch_size)
    for begin in range(start, len(latents), step):
        end = min(begin + step, len(latents))
        ids = model.tokenize_batched(latents.latents[begin:end], batch_size)
        yield ids.astype(dtype), latents.labels[begin:end], latents.keys[begin:end]


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


def _write_shards(out: str, attrs: dict, count: int, overwrite: bool, rows_from, progress: bool) -> list[str]:
    """Write `count` samples as shards of SHARD_ROWS into the folder `out`, after the shards already complete."""
    folder = local_path(out)
    if folder is None:
        raise UserError("webdataset shards are written to a local folder, not a URL")
    manifest = folder / "export.json"
    there = contents(folder)
    if there and there != [manifest] and not overwrite:  # a manifest alone: begun, nothing written
        if _read_json(manifest) != attrs:
            raise UserError(f"{folder} holds other files or tokens of another run or store: "
                            "pass --overwrite to replace them")
    elif there:
        for stale in [*folder.glob("tokens-*.tar"), *folder.glob(f"tokens-*.tar{PARTIAL_SUFFIX}"), manifest]:
            stale.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(manifest, attrs)

    total_shards = -(-count // SHARD_ROWS)
    names = [str(folder / (SHARD_PATTERN % i)) for i in range(total_shards)]
    done = 0
    while done < total_shards and os.path.exists(names[done]):
        done += 1
    start = done * SHARD_ROWS
    if start < count:
        writer = wds.ShardWriter(str(folder / (SHARD_PATTERN + PARTIAL_SUFFIX)), maxcount=SHARD_ROWS,
                                 maxsize=float("inf"), start_shard=done, verbose=0,
                                 post=lambda name: os.replace(name, name[: -len(PARTIAL_SUFFIX)]),
                                 mtime=0.0)  # a fixed mtime makes re-runs byte-identical
        with tqdm(total=count, initial=start, unit="img", desc="webdataset shards", disable=not progress) as bar:
            for ids, labels, keys in rows_from(start):
                for row, label, key in zip(ids, labels, keys):
                    writer.write({"__key__": wds_key(key), "tokens.npy": row, "cls": int(label)})
                bar.update(len(ids))
        # Only a finished run closes the last shard: an exception above leaves it `.partial`.
        writer.close()
    return names


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
