"""`revq-pipe eval`: how good a run's tokens are, on a latent store (and its source images).

Latent space: MSE between the store's latents and their quantize-then-rectify reconstruction, raw
and in the run's normalised space (the space training minimises), the same for the quantizer alone
(without the rectifier), codebook usage and perplexity.
Image space (through the VAE and source images the store records, or those given): PSNR and SSIM
against the preprocessed originals
of the VAE's own reconstruction (the ceiling any tokenizer on this VAE can reach) and of the
reconstruction through the tokens; LPIPS and rFID of the latter too when their pretrained networks
are on this machine (they are reported as skipped otherwise, with the reason).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from rich.table import Table

from revq_pipe.pipeline.atomic_files import read_json, write_json
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.reporting.metrics import image_psnr_ssim
from revq_pipe.pipeline.paths import absolute_url
from revq_pipe.pipeline.preflight import check_eval
from revq_pipe.pipeline.reporting.perceptual import PerceptualMetrics
from revq_pipe.pipeline.images.pixels import original_pixels, vae_pixels
from revq_pipe.pipeline.reporting.console import progress_bar, table_text
from revq_pipe.pipeline.train.loader import LatentLoader
from revq_pipe.pipeline.model.revq import latent_metrics
from revq_pipe.pipeline.storage.run_dir import Run
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.images.sources import open_source, recorded_source
from revq_pipe.pipeline.images.vae import VaeSpec, resolve_vae

EVAL_PREFIX = "eval-"


@dataclass
class EvalReport:
    """Evaluation numbers of one run on one latent store; `table()` renders them, RUN/eval-<store>.json
    holds them."""

    run: str
    store: str
    store_url: str  # the store's absolute location: which store a result file belongs to
    count: int
    tokens: int
    codes: int
    latent_mse: float
    latent_mse_normalised: float
    # The same two for the quantizer alone (codebook vectors, no rectifier): what the rectifier adds.
    quantizer_mse: float
    quantizer_mse_normalised: float
    usage_mean_pct: float
    usage_min_pct: float
    perplexity: float
    # PSNR/SSIM of the VAE-only and the through-the-tokens reconstructions (and LPIPS/rFID of the
    # latter where they could run), when images were given.
    image: dict[str, float] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    saved_to: str | None = None  # the result file in the run dir

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The numbers as a small table (plain text, no colour codes)."""
        table = Table(title=f"ReVQ eval: {self.count} images of {self.store}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("latent MSE (normalised)", f"{self.latent_mse_normalised:.4f}")
        table.add_row("latent MSE (raw)", f"{self.latent_mse:.4g}")
        table.add_row("quantizer alone, no rectifier (normalised)", f"{self.quantizer_mse_normalised:.4f}")
        table.add_row("quantizer alone, no rectifier (raw)", f"{self.quantizer_mse:.4g}")
        table.add_row("codebook usage (mean / min over positions)",
                      f"{self.usage_mean_pct:.1f}% / {self.usage_min_pct:.1f}% of {self.codes}")
        table.add_row("perplexity (mean over positions)", f"{self.perplexity:.1f} of {self.codes}")
        if self.image:
            table.add_row("PSNR VAE only / through tokens",
                          f"{self.image['psnr_vae']:.2f} / {self.image['psnr_tokens']:.2f} dB")
            table.add_row("SSIM VAE only / through tokens",
                          f"{self.image['ssim_vae']:.4f} / {self.image['ssim_tokens']:.4f}")
            for name in ("lpips", "rfid"):
                if name in self.image:
                    table.add_row(f"{name.upper()} through tokens", f"{self.image[name]:.4f}")
        for name, reason in self.skipped.items():
            table.add_row(name.upper(), reason)
        return table_text(table)


def evaluate(
    run: str,
    store: str,
    *,
    vae: str | None = None,
    images: str | None = None,
    latent_only: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = True,
) -> EvalReport:
    """Evaluate the run at `run` on the latent store `store`; writes RUN/eval-<store name>.json.

    Image metrics (PSNR/SSIM, LPIPS/rFID where possible) go through `vae` on the source images
    `images`; each defaults to what the store records (its VAE, the folder or shards it was encoded
    from). When a default is not at hand they are skipped with the reason; a given one must work.
    `latent_only` skips them.
    """
    check_eval(run, store, vae=vae, images=images, latent_only=latent_only, device=device, batch_size=batch_size)
    dev = resolve_device(device)
    run_info = Run.load(run, dev)
    latents = LatentStore.open(store)
    run_info.check_store(latents)
    if len(latents) == 0:
        raise UserError(f"{store} holds no latents to evaluate on")
    latents.check_finite()
    spec, images, why_not = (None, None, "skipped (--latent-only)") if latent_only else \
        _image_inputs(run_info, latents, vae, images)  # checked before any work
    started = time.perf_counter()

    loader = LatentLoader(latents, batch_size, dev, shuffle=False, drop_last=False)
    with progress_bar(progress, total=len(latents), unit="img", desc="eval") as bar:
        def batches():
            for z in loader.epoch():
                yield z
                bar.update(len(z))

        metrics = latent_metrics(run_info.model, batches())
    report = EvalReport(run=str(run), store=str(store), store_url=absolute_url(store), count=len(latents), tokens=run_info.tokens,
                        codes=run_info.codes, **metrics)
    if spec is not None:
        report.image, report.skipped = _image_metrics(run_info, latents, spec, images, batch_size, dev, progress)
    else:
        report.skipped = {name: why_not for name in ("psnr/ssim", "lpips", "rfid")}
    report.seconds = time.perf_counter() - started
    path = result_path(run_info.path, store)
    report.saved_to = str(path)
    write_json(path, report.to_dict(), indent=1)
    return report


def result_path(run_dir: Path, store: str) -> Path:
    """RUN/eval-<store name>.json: one result file per evaluated store, so evaluating another store
    keeps this one's. A different store of the same name gets its URL's digest added."""
    name = (PurePosixPath(str(store).rstrip("/")).name.removesuffix(".zarr") or "store").replace(" ", "_")
    url = absolute_url(store)
    path = run_dir / f"{EVAL_PREFIX}{name}.json"
    earlier = read_json(path)  # a file of another store, or one that is not eval's, is kept
    if path.exists() and not (isinstance(earlier, dict) and earlier.get("store_url") in (None, url)):
        path = run_dir / f"{EVAL_PREFIX}{name}-{hashlib.sha256(url.encode()).hexdigest()[:8]}.json"
    return path


def _image_inputs(run: Run, latents: LatentStore, vae: str | None, images: str | None
                  ) -> tuple[VaeSpec | None, str | None, str | None]:
    """(VAE, source images, None) for the image metrics, or (None, None, why they are skipped).
    Defaults come from the store's record; what the user named must work (else a UserError)."""
    vae_name = vae or latents.attrs.get("vae") or run.vae
    source = images or recorded_source(latents.attrs.get("source") or {})
    try:
        if vae_name is None:
            raise UserError("the store does not record its VAE: pass `vae`")
        if source is None:
            raise UserError("the store does not record its source images: pass `images`")
        spec = resolve_vae(vae_name)
        run.check_vae(spec)
        open_source(source)
    except UserError as err:
        if vae is not None or images is not None:
            raise
        return None, None, f"skipped ({err})"
    return spec, source, None


def _image_metrics(run: Run, latents: LatentStore, spec: VaeSpec, images: str, batch_size: int, device,
                   progress: bool) -> tuple[dict[str, float], dict[str, str]]:
    """Mean PSNR/SSIM against the originals of the VAE-only and the through-the-tokens reconstructions,
    LPIPS/rFID of the latter where possible; and the metrics that were skipped, with why."""
    image_size = latents.attrs.get("image_size") or spec.default_image_size
    frozen = spec.load(device)
    perceptual = PerceptualMetrics(device)
    scores: dict[str, list[np.ndarray]] = {name: [] for name in ("psnr_vae", "ssim_vae", "psnr_tokens", "ssim_tokens")}
    row = 0
    with progress_bar(progress, total=len(latents), unit="img", desc="eval images") as bar:
        for originals in original_pixels(images, latents.keys[:], image_size):
            z = np.asarray(latents.latents[row:row + len(originals)], dtype=np.float32)
            row += len(originals)
            rectified = run.model.forward_batched(z, batch_size)
            for name, latent in (("vae", z), ("tokens", rectified)):
                pixels = vae_pixels(frozen, latent, batch_size)
                psnr, ssim = image_psnr_ssim(originals / 255.0, pixels / 255.0)
                scores[f"psnr_{name}"].append(psnr)
                scores[f"ssim_{name}"].append(ssim)
            perceptual.update(originals, pixels)  # the through-the-tokens images
            bar.update(len(originals))
    means = {name: float(np.concatenate(values).mean()) for name, values in scores.items()}
    return {**means, **perceptual.result()}, perceptual.skipped
