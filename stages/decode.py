"""`revq-pipe decode`: token ids back to VAE latents (a latent store), or on to PNG images.

Each id picks its code, the rectifier maps the quantized latent back toward the VAE's latent, and
the run's statistics un-normalise it: exactly the model's own quantize-then-rectify, so
decode(export-tokens(store)) equals model(latents) bit for bit for the same run, device and dtype
when the model sees the same batches (one token-store chunk, or `batch_size` rows of it: CPU and
GPU kernels may round the rectifier's sums differently for another batch size).

Both outputs follow the row stores' resume protocol: a killed decode run again picks up after the
last committed chunk and ends with what an uninterrupted run writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from revq_pipe.pipeline.storage.decoded_images import DecodedImages
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.lease import output_lease
from revq_pipe.pipeline.paths import absolute_url
from revq_pipe.pipeline.preflight import check_decode, images_folder
from revq_pipe.pipeline.images.pixels import vae_pixels
from revq_pipe.pipeline.reporting.console import progress_bar
from revq_pipe.pipeline.storage.run_dir import Run
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.storage.token_store import TokenStore
from revq_pipe.pipeline.images.vae import resolve_vae


@dataclass
class DecodeSummary:
    """What decode wrote."""

    out: str
    count: int
    kind: str  # "latents" or "images"
    seconds: float

    def report(self) -> str:
        what = "latent store" if self.kind == "latents" else "PNG images in"
        return f"{self.count} images decoded from tokens in {self.seconds:.1f} s -> {what} {self.out}"


def decode(
    run: str,
    tokens: str,
    out: str,
    *,
    images: bool = False,
    vae: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> DecodeSummary:
    """Decode the token store `tokens` with the run at `run` into a latent store at `out`, or, with
    `images` (or a `vae`), into PNG images under the folder `out` (one per key, the key's extension
    replaced) through `vae`, by default the VAE the run records."""
    check_decode(run, tokens, out, images=images, vae=vae, device=device, batch_size=batch_size)
    dev = resolve_device(device)
    run_info = Run.load(run, dev)
    store = TokenStore.open(tokens)
    check_tokens_match_run(store, run_info)
    images = images or vae is not None
    if images and vae is None:
        vae = run_info.vae
        if vae is None:
            raise UserError(f"{run} does not record the VAE its latents came from: pass `vae`")
    store.check_ids(run_info.codes)
    started = time.perf_counter()
    with output_lease(out, "decode"):
        if images:
            _decode_to_images(run_info, store, out, vae, batch_size, dev, overwrite, progress)
        else:
            _decode_to_latent_store(run_info, store, out, batch_size, overwrite, progress)
    return DecodeSummary(out=str(out), count=len(store), kind="images" if images else "latents",
                         seconds=time.perf_counter() - started)


def check_tokens_match_run(store: TokenStore, run: Run) -> None:
    """Refuse tokens that another run made (their ids index other codebooks) or that are unfinished."""
    made_by = store.attrs.get("run")
    if made_by != run.sha256:
        raise UserError(f"{store.url} was exported by another run ({str(made_by)[:12]}), not by {run.path} "
                        f"({run.sha256[:12]}): its ids mean nothing to this run's codebooks")
    if not store.complete:
        raise UserError(f"{store.url} is unfinished ({store.rows_done} of {len(store)} images): "
                        "run `revq-pipe export-tokens` again to finish it")
    if store.tokens.shape[1] != run.tokens:
        raise UserError(f"{store.url} holds {store.tokens.shape[1]} tokens per image, the run {run.tokens}")


def _chunks(store: TokenStore, first: int, desc: str, progress: bool):
    """(start, stop) over the token store's chunks from row `first` on, with a progress bar."""
    with progress_bar(progress, total=len(store), initial=first, unit="img", desc=desc) as bar:
        for start in range(first, len(store), store.chunk_size):
            stop = min(start + store.chunk_size, len(store))
            yield start, stop
            bar.update(stop - start)


def _decode_to_latent_store(run: Run, store: TokenStore, out: str, batch_size: int, overwrite: bool,
                            progress: bool) -> None:
    """Decode into a latent store with the row stores' resume protocol (pipeline/storage/store.py)."""
    identity = {"decoded_from": absolute_url(store.url), "run": run.sha256, "count": len(store)}
    latents = LatentStore.reopen(out, identity, overwrite)
    if latents is None:
        latents = LatentStore.create(out, n=len(store), latent_shape=run.latent_shape, dtype="float32",
                                     chunk_size=store.chunk_size, attrs={**run.data_attrs, **identity,
                                                                          "dtype": "float32"},
                                     overwrite=True, unfinished=True)
    if latents.complete:
        return
    for start, stop in _chunks(store, latents.rows_done, "decode", progress):
        decoded = run.model.detokenize_batched(store.tokens[start:stop], batch_size)
        latents.write(start, decoded, store.labels[start:stop], store.keys[start:stop])
        latents.commit(stop)
    latents.finish()


def _decode_to_images(run: Run, store: TokenStore, out: str, vae: str, batch_size: int, device, overwrite: bool,
                      progress: bool) -> None:
    """Decode on through the VAE into one PNG per key, resumable the same way (pipeline/storage/decoded_images.py)."""
    spec = resolve_vae(vae)
    run.check_vae(spec)
    folder = images_folder(out)
    identity = {"decoded_from": absolute_url(store.url), "run": run.sha256, "vae_config_sha256": spec.config_sha256()}
    images = DecodedImages.open_or_create(folder, store.keys[:], identity, overwrite)
    if images.complete:
        return
    frozen = spec.load(device)
    for start, stop in _chunks(store, images.rows_done, "decode to images", progress):
        latents = run.model.detokenize_batched(store.tokens[start:stop], batch_size)
        images.write(start, vae_pixels(frozen, latents, batch_size))
        images.commit(stop)
    images.finish()
