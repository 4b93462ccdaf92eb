"""`revq-pipe import-latents`: latents other tools extracted (.pth, .npy, .npz, .safetensors) -> a latent store.

For users who already hold pre-extracted latents (the ReVQ paper's code saves one `.pth` tensor):
the files' rows go into a latent store in the order given, chunk by chunk, and the store's
statistics are computed as `encode` computes them (dask over the stored chunks, float64), so `fit`,
`export-tokens`, `decode` and `eval` take it like an encoded store. Files are read one at a time
(`.npy` memory-mapped); labels default to -1 and keys to the file name and row number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.lease import output_lease
from revq_pipe.pipeline.storage.latent_files import LatentFile, read_latent_file
from revq_pipe.pipeline.preflight import already_exists, check_import_latents
from revq_pipe.pipeline.storage.store import (FORMAT_VERSION, LatentStore, default_chunk_rows, remove_store,
                                              skipped_attrs, vacant)
from revq_pipe.pipeline.images.vae import resolve_vae


@dataclass
class ImportSummary:
    """What import-latents wrote."""

    out: str
    files: int
    count: int
    latent_shape: tuple[int, int, int]
    dtype: str
    vae: str | None
    seconds: float

    def report(self) -> str:
        vae = f", VAE {self.vae}" if self.vae else " (no VAE recorded: decode to images and image metrics need --vae)"
        return (f"Imported {self.count} latents of {'x'.join(map(str, self.latent_shape))} from {self.files} "
                f"file{'s' if self.files != 1 else ''} into {self.out}, stored as {self.dtype}{vae}; "
                f"mean/std computed ({self.seconds:.1f} s).")


def import_latents(files: Sequence[str | Path], out: str, *, vae: str | None = None, image_size: int | None = None,
                   classes: Sequence[str] | None = None, dtype: str | None = None, overwrite: bool = False,
                   chunk_size: int | None = None) -> ImportSummary:
    """Write the (N, C, H, W) latents of `files` (in order) as one latent store at `out`.

    `vae` (a hub id, local diffusers folder or `revq-pipe-embedded`) and `image_size` record where
    the latents came from, so later stages can decode them to images; with both, the VAE must make
    latents of the files' shape at that size. `classes` names the labels. `dtype` is the storage
    dtype (default: float16 for float16 input, else float32). An existing store is replaced only with
    `overwrite`.
    """
    started = time.perf_counter()
    check_import_latents(files, out, vae=vae, dtype=dtype, overwrite=overwrite)
    first = read_latent_file(files[0])
    shape = tuple(int(v) for v in first.latents.shape[1:])
    dtype = dtype or ("float16" if first.latents.dtype == np.float16 else "float32")
    attrs = {"format_version": FORMAT_VERSION, "count": 0, "classes": list(classes or []),
             "source": {"kind": "imported", "files": [str(Path(f).expanduser().resolve()) for f in files]},
             **_vae_attrs(vae, image_size, shape), **skipped_attrs([])}
    chunk = chunk_size or default_chunk_rows(shape, dtype)
    with output_lease(out, "import-latents"):
        try:  # a store an import left unfinished (killed, or stopped by a bad file) holds nothing to keep
            store = LatentStore.create(out, n=0, latent_shape=shape, dtype=dtype, chunk_size=chunk, attrs=attrs,
                                       overwrite=overwrite or vacant(out), unfinished=True)
        except FileExistsError as err:
            raise already_exists(out) from err
        try:
            count = _write_files(store, files, first, shape, chunk)
        except UserError:  # a bad file met midway: what this run wrote goes, so the next import starts clean
            remove_store(out)
            raise
    return ImportSummary(out=str(out), files=len(files), count=count, latent_shape=shape, dtype=dtype,
                         vae=attrs.get("vae"), seconds=time.perf_counter() - started)


def _write_files(store: LatentStore, files: Sequence[str | Path], first: LatentFile, shape: tuple[int, int, int],
                 chunk: int) -> int:
    """Write every file's rows into `store` and finish it; the number of rows."""
    rows = _ChunkedRows(store, chunk)
    for index, path in enumerate(files):
        latent_file = first if index == 0 else read_latent_file(path)
        if tuple(latent_file.latents.shape[1:]) != shape:
            raise UserError(f"{path} holds latents of shape {tuple(latent_file.latents.shape[1:])}, "
                            f"{files[0]} of {shape}: one store holds one shape")
        rows.add(latent_file)
    rows.flush()
    if rows.count == 0:
        raise UserError("the latent files hold no rows")
    store.finish(count=rows.count, source_count=rows.count)
    return rows.count


def _vae_attrs(vae: str | None, image_size: int | None, shape: tuple[int, int, int]) -> dict:
    """The store attrs that name the VAE (as encode records them), checked against the latents' shape."""
    if vae is None:
        return {"image_size": image_size} if image_size else {}
    spec = resolve_vae(vae)
    size = image_size or spec.default_image_size
    if spec.latent_shape(size) != shape:
        raise UserError(f"`vae={vae}` makes latents of shape {spec.latent_shape(size)} at {size} px, but the "
                        f"files hold {shape}: pass the `image_size` they were encoded at, or the right `vae`")
    return {"vae": spec.name, "vae_class": spec.class_name, "vae_config_sha256": spec.config_sha256(),
            "image_size": size}


class _ChunkedRows:
    """Appends rows to a growing store in whole chunks (the store's write rule), checking each block."""

    def __init__(self, store: LatentStore, chunk: int):
        self.store, self.chunk, self.count = store, chunk, 0
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, latent_file: LatentFile) -> None:
        n = len(latent_file)
        labels = latent_file.labels if latent_file.labels is not None else np.full(n, -1, np.int64)
        keys = latent_file.keys if latent_file.keys is not None else np.array(
            [f"{latent_file.path.stem}/{i:08d}" for i in range(n)], dtype=str)
        for start in range(0, n, self.chunk):
            block = np.asarray(latent_file.latents[start:start + self.chunk])
            if not np.isfinite(block).all():
                row = start + int(np.argwhere(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))[0, 0])
                raise UserError(f"{latent_file.path}: row {row} holds NaN or inf")
            self.pending.append((block.astype(self.store.latents.dtype), labels[start:start + self.chunk].astype(np.int64),
                                 keys[start:start + self.chunk]))
            self._write(full_only=True)

    def flush(self) -> None:
        self._write(full_only=False)

    def _write(self, full_only: bool) -> None:
        held = sum(len(block[0]) for block in self.pending)
        while held >= self.chunk or (not full_only and held):
            latents, labels, keys = (np.concatenate(column) for column in zip(*self.pending))
            take = min(self.chunk, held)
            self.store.resize(self.count + take)
            self.store.write(self.count, latents[:take], labels[:take], keys[:take])
            self.count += take
            self.pending = [(latents[take:], labels[take:], keys[take:])] if take < held else []
            held -= take
