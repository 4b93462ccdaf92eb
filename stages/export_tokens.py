"""`revq-pipe export-tokens`: every image's token ids, for training generators on them.

Reads a latent store chunk by chunk, tokenizes it with a fitted run (quantization only: the
rectifier is not needed to find ids), and writes a token store (Zarr, row for row as the latent
store), shards for training loaders (webdataset {__key__, key.txt, tokens.npy, cls}, or parquet
rows of key, label, class, tokens; in store order or a seeded shuffle;
pipeline/storage/token_shards.py), or a token store and webdataset shards. Every export holds each
row's latent-store key exactly (`keys`, parquet's `key`, webdataset's `key.txt`): the field they
join on. Every output resumes where a killed export stopped, and the resumed result is identical
to an uninterrupted one. With `cluster`, tasks on a dask cluster fill the token store
(pipeline/scaleout/token_tasks.py). Every setting of the stage is a field of `ExportConfig`
(pipeline/storage/export_formats.py), which `export_tokens` takes as `config=` or field by field.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from revq_pipe.pipeline.scaleout.chunk_tasks import new_job_id
from revq_pipe.pipeline.scaleout.cluster import cluster_client, describe
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.lease import output_lease
from revq_pipe.pipeline.paths import absolute_url
from revq_pipe.pipeline.preflight import check_export_tokens
from revq_pipe.pipeline.reporting.console import progress_bar
from revq_pipe.pipeline.storage.dataset_card import dataset_card, write_card
from revq_pipe.pipeline.storage.export_formats import ExportConfig, ExportFormat, export_format
from revq_pipe.pipeline.storage.run_dir import Run
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.storage.token_shards import Rows, shuffled_rows, write_shards
from revq_pipe.pipeline.storage.token_store import TokenStore, token_dtype
from revq_pipe.pipeline.scaleout.token_tasks import TokenizeTask, fill_on_cluster, written_on_cluster

log = logging.getLogger(__name__)


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
        written = export_format(self.format)
        if written.token_store:
            lines.append(f"token store: {self.out}")
        if self.shards:
            lines.append(f"{written.shards.files}: {len(self.shards)} in {Path(self.shards[0]).parent}")
        return "\n".join(lines)


def export_tokens(run: str, store: str, out: str, *, cluster: str | None = None, config: ExportConfig | None = None,
                  **options: Any) -> ExportSummary:
    """Tokenize every latent of `store` with the run at `run` and write the ids to `out`, set as
    `config` says with `options`, any of its fields by name, over it (pipeline/storage/export_formats.py:
    `batch_size`, `device`, `format`, `shard_size`, `shuffle`, `seed`, `overwrite`, `progress`).

    format "zarr" writes a token store at `out`; "wds" webdataset shards and "parquet" parquet files
    of `shard_size` rows into the folder `out`; "zarr+wds" the token store at `out` and the shards
    into `<out>-wds`. With `shuffle`, shards hold the rows in a random order fixed by `seed` (the
    token store keeps the latent store's order). An existing output made from the same run, store
    and settings is resumed; one made otherwise is refused unless `overwrite`. With `cluster` (local,
    local:N or a scheduler address), tasks on a dask cluster write the token store (formats zarr and
    zarr+wds), which equals a single-process export's. Every output folder gets a dataset card,
    README.md (pipeline/storage/dataset_card.py).
    """
    config = ExportConfig.given(config, **options)
    check_export_tokens(run, store, out, cluster=cluster, config=config)
    written = export_format(config.format)
    dev = resolve_device(config.device if cluster is None else "cpu")  # with a cluster, the workers compute
    run_info = Run.load(run, dev)
    latents = LatentStore.open(store)
    run_info.check_store(latents)
    latents.check_finite()
    model = run_info.model
    classes = list(latents.attrs.get("classes", []))
    attrs = {**run_info.token_attrs(), "store": absolute_url(store), "classes": classes}
    shard_attrs = {**attrs, "shard_size": config.shard_size,
                   "order": f"shuffled, seed {config.seed}" if config.shuffle else "store"}
    shard_folder = written.shard_folder(out)
    if written.shards is not None:  # before anything is written
        written.shards.check_keys(latents.keys[:])
    started = time.perf_counter()

    summary = ExportSummary(out=str(out), format=config.format, count=len(latents), tokens=run_info.tokens,
                            codes=run_info.codes, dtype=token_dtype(run_info.codes).name, resumed_from=0, seconds=0.0)
    card = functools.partial(dataset_card, attrs=attrs, count=len(latents), dtype=summary.dtype,
                             image_size=latents.attrs.get("image_size") or run_info.image_size)
    with contextlib.ExitStack() as leases:  # the cluster's tasks write under the driver's lease
        for output in {out, shard_folder} - {None}:
            leases.enter_context(output_lease(output, "export-tokens"))
        if written.token_store:
            tokens = _open_or_create(out, latents, run_info, attrs, config.overwrite, on_cluster=cluster is not None)
            write_card(out, card("zarr"))  # the store exists: its folder holds a Zarr group to put the card in
            summary.resumed_from = tokens.rows_done
            with _vacant_after_bad_input(tokens):
                if cluster is None:
                    _fill_token_store(tokens, latents, model, config.batch_size, config.progress)
                elif not tokens.complete:
                    _fill_on_cluster(cluster, run, run_info, tokens, latents, config)
            rows = lambda start: _rows_from_token_store(tokens, start)  # noqa: E731
        else:
            rows = lambda start: _rows_from_latents(latents, model, config.batch_size, start)  # noqa: E731
        if written.shards is not None:
            summary.shards = _shards(shard_folder, written, shard_attrs, rows, len(latents), classes, card, config)
    summary.seconds = time.perf_counter() - started
    return summary


def _open_or_create(out: str, latents: LatentStore, run: "Run", attrs: dict, overwrite: bool,
                    on_cluster: bool = False) -> TokenStore:
    """The token store to fill: an unfinished one from the same run and store, or a new one."""
    existing = TokenStore.reopen(out, {**attrs, "count": len(latents)}, overwrite)
    if existing is not None:
        if not on_cluster and written_on_cluster(existing):
            raise UserError(f"{out} is being written by an export-tokens with `cluster`: run that again (any cluster) "
                            f"to finish it, or pass `overwrite=True`")
        return existing
    # Chunks of as many rows as the latent store's: each export step reads one latent chunk.
    return TokenStore.create(out, n=len(latents), tokens=run.tokens, codes=run.codes,
                             chunk_size=latents.chunk_size, attrs=attrs, overwrite=True)


@contextlib.contextmanager
def _vacant_after_bad_input(tokens: TokenStore):
    """When bad input (a NaN row) stops the export midway, a token store it began is left with no
    row committed, which the next export replaces without `overwrite` (tasks of a cluster that are
    still running may write into it meanwhile: it is replaced whole); one that an earlier export
    had begun is kept for the same command to resume."""
    began_here = tokens.rows_done == 0 and not written_on_cluster(tokens)
    try:
        yield
    except UserError:
        if began_here:
            tokens.forget_rows()
        raise


def _fill_token_store(tokens: TokenStore, latents: LatentStore, model, batch_size: int, progress: bool) -> None:
    """Tokenize the rows after `rows_done`, one token-store chunk at a time, and finish the store."""
    with progress_bar(progress, total=len(tokens), initial=tokens.rows_done, unit="img",
                      desc="export-tokens") as bar:
        for start in range(tokens.rows_done, len(tokens), tokens.chunk_size):
            stop = min(start + tokens.chunk_size, len(tokens))
            ids = model.tokenize_batched(latents.checked_rows(start, stop), batch_size)
            tokens.append(ids, latents.labels[start:stop], latents.keys[start:stop])
            bar.update(stop - start)
    if not tokens.complete:
        tokens.finish()


def _fill_on_cluster(cluster: str, run: str, run_info: Run, tokens: TokenStore, latents: LatentStore,
                     config: ExportConfig) -> None:
    """Fill the token store with tasks on the dask cluster `cluster` (pipeline/scaleout/token_tasks.py)."""
    local_run = Path(run).expanduser()
    task = TokenizeTask(run=str(local_run.resolve()) if local_run.is_dir() else run, run_sha256=run_info.sha256,
                        store=absolute_url(latents.url), tokens=absolute_url(tokens.url), device=config.device,
                        batch_size=config.batch_size, job=new_job_id())
    with cluster_client(cluster) as client:
        log.info(f"export-tokens on {describe(client)}")
        cluster_size = len(client.scheduler_info(n_workers=-1)["workers"])
        fill_on_cluster(client, tokens, task, cluster_size, lambda done: progress_bar(
            config.progress, total=len(tokens), initial=done, unit="img", desc="export-tokens"))


def _shards(out: str, written: ExportFormat, attrs: dict, rows, count: int, classes: list[str],
            card: Callable[..., str], config: ExportConfig) -> list[str]:
    size, seed = config.shard_size, config.seed
    if config.shuffle:
        rows = shuffled_rows(rows, count, seed)
    files = (f"{-(-count // size)} {written.shards.files} of at most {size} rows, "
             + (f"shuffled (seed {seed})" if config.shuffle else "in the latent store's order"))
    return write_shards(out, {**attrs, "format": written.shards.name}, rows, count=count, shards=written.shards,
                        shard_size=size, classes=classes, card=card(written.shards.name, files=files),
                        overwrite=config.overwrite, progress=config.progress)


def _rows_from_token_store(tokens: TokenStore, start: int) -> Rows:
    for begin in range(start, len(tokens), tokens.chunk_size):
        end = min(begin + tokens.chunk_size, len(tokens))
        yield tokens.tokens[begin:end], tokens.labels[begin:end], tokens.keys[begin:end]


def _rows_from_latents(latents: LatentStore, model, batch_size: int, start: int) -> Rows:
    dtype = token_dtype(model.config.codes)
    step = max(latents.chunk_size, batch_size)
    for begin in range(start, len(latents), step):
        end = min(begin + step, len(latents))
        ids = model.tokenize_batched(latents.checked_rows(begin, end), batch_size)
        yield ids.astype(dtype), latents.labels[begin:end], latents.keys[begin:end]
