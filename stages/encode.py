"""Stage one: run every image through the frozen VAE once, into a Zarr latent store.

    DataLoader workers ──blocks of uint8 images──▶ GPU encode ──latents──▶ writer thread ──▶ Zarr
    (decode + resize)                              (main thread)           (reorder, chunk,
                                                                            compress, commit)

The source is read as blocks (pipeline/images/sources.py), each encoded as one GPU batch, the copies
to and from the GPU overlapped with its work (pipeline/images/encode_feed.py); the writer
(pipeline/storage/latent_writer.py) puts them back in source order and commits resume progress after
every chunk. Re-running an interrupted encode with the same settings resumes it and ends with the
store an uninterrupted run writes (pipeline/storage/resume.py decides resume, refuse or replace).
With `cluster`, tasks on a dask cluster encode ranges of the source into the same store
(pipeline/scaleout/staged_encode.py). Every setting of the stage is a field of `EncodeConfig`
(pipeline/images/encode_config.py), which `encode` takes as `config=` or field by field.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from revq_pipe.pipeline.scaleout.chunk_tasks import new_job_id
from revq_pipe.pipeline.scaleout.cluster import cluster_client, describe, shared_location, worker_hosts
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.storage.latent_writer import ChunkWriter
from revq_pipe.pipeline.lease import output_lease
from revq_pipe.pipeline.paths import absolute_url
from revq_pipe.pipeline.reporting.console import progress_bar
from revq_pipe.pipeline.reporting.encode_summary import EncodeSummary
from revq_pipe.pipeline.preflight import check_encode, out_outside
from revq_pipe.pipeline.storage.resume import Resume, fingerprinted, plan_resume
from revq_pipe.pipeline.images.encode_config import EncodeConfig
from revq_pipe.pipeline.images.encode_feed import EncoderSetup, encoded_blocks
from revq_pipe.pipeline.images.sources import ImageSource, default_workers, open_source
from revq_pipe.pipeline.scaleout.staged_encode import EncodeSettings, StagedEncode, is_staged, piece_span
from revq_pipe.pipeline.storage.store import (FORMAT_VERSION, LatentStore, default_chunk_rows,
                                      remove_partial_writes, skipped_attrs)
from revq_pipe.pipeline.images.vae import FrozenVae, VaeSpec, resolve_vae

log = logging.getLogger(__name__)

PREPROCESSING = "rgb, resize short side bilinear, center crop, x/255*2-1"
# With decode_on=device: other decoders and another resize, a level apart here and there (the
# settings differ, so neither path resumes the other's store).
DEVICE_PREPROCESSING = ("rgb, jpeg decoded by torchvision on the device, resize short side bilinear in torch, "
                        "center crop, x/255*2-1")


@dataclass
class EncodeJob:
    """Everything decided before the VAE weights load: the settings asked for (`config`), what they
    resolve to on this source, VAE and machine, and where to start."""

    source: ImageSource
    out: str
    vae: VaeSpec
    config: EncodeConfig
    image_size: int  # config's, or the VAE's own
    latent_shape: tuple[int, int, int]
    device: torch.device
    workers: int  # DataLoader processes: config's, or the machine's default
    chunk_size: int  # rows per chunk: the resumed store's, config's, or about 4 MB of latents
    settings: dict[str, Any]  # what a store made with them records and is resumed by (the fingerprint)
    resume: Resume  # what to do with whatever is at `out`, and where to start
    setup: EncoderSetup = field(default_factory=EncoderSetup)  # how blocks reach the encoder, how it runs
    cluster_attrs: dict[str, Any] = field(default_factory=dict)  # how a --cluster encode ran, for the record

    @property
    def compute(self) -> str:
        return self.settings["compute"]


def encode(source: str, out: str, *, vae: str | None = None, cluster: str | None = None,
           config: EncodeConfig | None = None, **options: Any) -> EncodeSummary:
    """Encode SOURCE (ImageFolder dir or webdataset shards) into the latent store `out` with the VAE
    `vae` (a hub id or a local diffusers folder; None: the default VAE), set as `config` says with
    `options`, any of its fields by name, over it (pipeline/images/encode_config.py: `image_size`,
    `batch_size`, `device`, `dtype`, `workers`, `overwrite`, `flip`, `follow_links`, `decode_on`,
    `compile_encoder`, `chunk_size`, `progress`); with `cluster` (local, local:N or a scheduler
    address), on a dask cluster. Re-running an interrupted call resumes it; bad input raises UserError.
    """
    config = EncodeConfig.given(config, **options)
    check_encode(source, out, vae=vae, cluster=cluster, config=config)
    spec = resolve_vae(vae)
    with output_lease(out, "encode"):  # the job's tasks on a cluster write under this one lease
        if cluster is not None:
            return encode_on_cluster(source, out, spec, cluster, config)
        job = prepare_encode(source, out, spec, config)
        if job.resume.store is not None and job.resume.store.complete:
            return _summary(job, job.resume.store, encoded=0, seconds=0.0, already_complete=True)
        if job.resume.store is not None and is_staged(job.resume.store):
            raise UserError(f"{out} is being written by an encode with `cluster`: run that again (any cluster) to "
                            f"finish it, or pass `overwrite=True`")
        return run_encode(job, spec.load(job.device))


def encode_on_cluster(source: str, out: str, spec: VaeSpec, cluster: str, config: EncodeConfig) -> EncodeSummary:
    """`encode` by tasks on a dask cluster, each encoding whole chunks of the source's order into the
    one store (pipeline/scaleout/staged_encode.py); the store equals a single-process encode's.
    `config.workers`: DataLoader processes per dask worker (default: its machine's CPUs shared among
    its workers)."""
    shared_location(out, "out")
    shared_location(source, "source")
    with cluster_client(cluster) as client:
        log.info(f"encode on {describe(client)}")
        # The workers' device decides the compute precision, which the settings fingerprint holds.
        worker_device = client.submit(resolve_device, config.device, pure=False).result()
        job = prepare_encode(source, absolute_url(out), spec, config, resolved_device=worker_device)
        if job.resume.store is not None and job.resume.store.complete:
            return _summary(job, job.resume.store, encoded=0, seconds=0.0, already_complete=True)
        if job.resume.store is not None and not is_staged(job.resume.store) and job.resume.store.rows_done:
            raise UserError(f"{out} was partly written by an encode without `cluster`: run that again to finish it, "
                            f"or pass `overwrite=True`")
        hosts = worker_hosts(client)
        job.cluster_attrs = {"cluster": cluster, "dask_workers": sum(hosts.values()), "workers": config.workers}
        settings = EncodeSettings(
            store=job.out, job=new_job_id(), vae_name=spec.name, vae_config_sha256=spec.config_sha256(),
            device=job.device.type, image_size=job.image_size, batch_size=config.batch_size,
            span=piece_span(job.chunk_size, config.batch_size), latent_shape=job.latent_shape, dtype=config.dtype,
            flip=config.flip, compute=job.compute, setup=job.setup, decode_workers=config.workers, hosts=hosts)
        staged, cluster_size = StagedEncode(job.source, _open_store(job), settings), sum(hosts.values())
        resumed_rows, started = staged.staged_rows, time.perf_counter()
        with _progress_bar(job, initial=staged.staged_positions) as bar:
            encoded = staged.encode(client, cluster_size, bar)
        store = staged.finish(client, cluster_size, lambda rows: _progress_bar(job, total=rows, desc="lay out"))
        summary = _summary(job, store, encoded=encoded, seconds=time.perf_counter() - started)
        summary.store, summary.resumed_rows, summary.cluster = out, resumed_rows, f"{cluster_size} dask workers"
        return summary


def prepare_encode(source: str, out: str, spec: VaeSpec, config: EncodeConfig = EncodeConfig(), *,
                   resolved_device: torch.device | None = None) -> EncodeJob:
    """Resolve `config` (pipeline/images/encode_config.py says what each setting does) on this source,
    VAE and machine, and check the store at `out`, without loading weights or writing anything.
    `resolved_device`: the device `config.device` names, where the caller resolved it already (on a
    cluster: its workers')."""
    if config.decode_on == "device":
        from revq_pipe.pipeline.images.device_decode import torchvision_decoder

        torchvision_decoder()  # refuses now, in one line, when torchvision is missing
    image_source = open_source(source, config.follow_links)
    if spec.note:
        log.warning(spec.note)
    size = config.image_size or spec.default_image_size
    latent_shape = spec.latent_shape(size)
    device = resolved_device or resolve_device(config.device)
    compute = "bf16-autocast" if device.type == "cuda" and config.dtype != "float32" else "float32"
    settings = fingerprinted({
        "format_version": FORMAT_VERSION,
        "vae": spec.name,
        "vae_class": spec.class_name,
        "vae_config_sha256": spec.config_sha256(),
        "image_size": size,
        "latent_shape": list(latent_shape),
        "dtype": config.dtype,
        "compute": compute,
        "preprocessing": DEVICE_PREPROCESSING if config.decode_on == "device" else PREPROCESSING,
        "source": image_source.fingerprint(),
        # Only when on: stores made before the option existed keep their fingerprint.
        **({"flip": True} if config.flip else {}),
    })
    out_outside(out, getattr(image_source, "root", None))
    resume = plan_resume(str(out), settings, config.overwrite)
    chunk_size = resume.store.chunk_size if resume.store is not None else config.chunk_size
    return EncodeJob(
        source=image_source, out=str(out), vae=spec, config=config, image_size=size, latent_shape=latent_shape,
        device=device, workers=default_workers(config.workers), settings=settings,
        chunk_size=chunk_size or default_chunk_rows(latent_shape, config.dtype), resume=resume,
        setup=EncoderSetup(decode_on=config.decode_on, compile=config.compile_encoder),
    )


def run_encode(job: EncodeJob, vae: FrozenVae) -> EncodeSummary:
    """Encode the job's remaining samples with an already loaded VAE and finish the store."""
    start, config = job.resume.progress, job.config
    units = job.source.units(start.cursor, config.batch_size)
    writer = ChunkWriter(lambda: _open_store(job), start, parts=sorted({unit.part for unit in units}),
                         block_size=config.batch_size, chunk_size=job.chunk_size, flip=config.flip)
    bar = _progress_bar(job)
    started = time.perf_counter()
    encoded = 0
    writer.start()
    try:
        with vae.autocast(job.compute):
            for block, latents in encoded_blocks(vae, units, image_size=job.image_size, batch_size=config.batch_size,
                                                 workers=job.workers, latent_shape=job.latent_shape, dtype=config.dtype,
                                                 flip=config.flip, setup=job.setup):
                encoded += len(block.images)
                block.images = None  # the writer needs only the bookkeeping
                writer.submit(block, latents)
                bar.update(block.size)
                if block.skipped:
                    bar.set_postfix(skipped=len(start.skipped) + writer.skipped_seen)
        store = writer.finish()
    except BaseException as err:
        writer.abort()
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = writer.store.rows_done if writer.store is not None else 0
            raise UserError(f"no space left on the device of {job.out}: the {kept} latents committed so far are "
                            f"kept; free some space and run the same command again to resume") from None
        raise
    finally:
        bar.close()
    if store is None:
        reasons = "; ".join(f"{k}: {r}" for k, r in writer.skipped[:3])
        raise UserError(f"no decodable images in {job.source.describe()}: "
                        f"{len(writer.skipped)} samples skipped ({reasons})")
    return _summary(job, store, encoded=encoded, seconds=time.perf_counter() - started)


def _open_store(job: EncodeJob) -> LatentStore:
    """The store to write into: the one being resumed, or a new one (made at the first write)."""
    if job.resume.store is not None:
        remove_partial_writes(job.out)  # what a killed writer left of the chunk it was writing
        return job.resume.store
    attrs = {**job.settings, "count": 0, "chunk_size": job.chunk_size, "encoder": _encoder_attrs(job),
             "classes": job.source.classes, **skipped_attrs([])}
    try:
        return LatentStore.create(job.out, n=0, latent_shape=job.latent_shape, dtype=job.config.dtype,
                                  chunk_size=job.chunk_size, attrs=attrs, overwrite=job.resume.replace,
                                  unfinished=True, flip=job.config.flip)
    except FileExistsError as err:  # zarr's mode "w-" found something at `out`
        raise UserError(f"{job.out} already holds data: pass `overwrite=True` to replace it") from err


def _summary(job: EncodeJob, store: LatentStore, *, encoded: int, seconds: float,
             already_complete: bool = False) -> EncodeSummary:
    return EncodeSummary(
        store=job.out, source=job.source.describe(), vae=job.vae.name, image_size=job.image_size,
        latent_shape=job.latent_shape, dtype=job.config.dtype, compute=job.settings["compute"], count=len(store),
        encoded=encoded, resumed_rows=job.resume.progress.rows, skipped=store.skipped,
        stored_bytes=store.nbytes_stored(), seconds=seconds, already_complete=already_complete, flip=store.has_flip,
    )


def _encoder_attrs(job: EncodeJob) -> dict[str, Any]:
    """How the store was made, for the record (not part of the settings fingerprint)."""
    import diffusers

    return {"batch_size": job.config.batch_size, "device": job.device.type, "workers": job.workers,
            "setup": job.setup.on(job.device).record(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, **job.cluster_attrs}


def _progress_bar(job: EncodeJob, *, initial: int | None = None, total: int | None = None, desc: str = "encode"):
    """Images of the source (or `total` of something else) done, from `initial` (default: the resume point)."""
    total, block = total or job.source.known_count, job.config.batch_size
    if initial is None:  # reading resumes at the block holding the cursor: its images are counted again
        initial = job.resume.progress.cursor.index // block * block if total is not None else 0
    return progress_bar(job.config.progress, total=total, initial=initial, unit="img", desc=desc, dynamic_ncols=True)
