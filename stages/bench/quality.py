"""`revq-pipe bench quality`: the rectifier ablation, as a table anyone can re-make.

Every variant is a whole `fit` on the same training store with the same `FitConfig` (the preset
`tiny` unless it says otherwise): only the rectifier (kind and form) and K change, and for some
variants the codebook initialisation or the flips. Each is scored on a validation store of
pictures the training store does not hold (the demo's held-out photos): the latent MSE with the
rectifier and with the quantizer alone at every epoch end, and, given the validation images and
the VAE, PSNR/SSIM of the images decoded through the tokens.

    revq-pipe demo
    revq-pipe bench quality revq-demo/latents-train.zarr revq-demo/latents-eval.zarr \
        --images revq-demo/images/eval --vae revq-pipe-embedded

Like the demo, this command composes whole stages (fit, eval); every other stage stands alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from revq_pipe.pipeline.atomic_files import write_atomically, write_json
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.preflight import check_bench_quality
from revq_pipe.pipeline.reporting.bench_options import QUALITY_VARIANTS, quality_variants
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.train.config import SMALL_PRESET, FitConfig, ResolvedFit
from revq_pipe.pipeline.workdir import QUALITY_MARKER, claim_folder
from revq_pipe.stages.evaluate import evaluate
from revq_pipe.stages.fit import fit

log = logging.getLogger(__name__)


@dataclass
class VariantResult:
    """One fit: its last epoch's validation numbers and the per-epoch curves."""

    variant: str
    codes: int
    val_mse: list[float]  # per epoch, with the rectifier (normalised latent space)
    val_mse_quantizer: list[float]  # per epoch, the quantizer alone
    psnr_tokens: float | None = None
    ssim_tokens: float | None = None
    psnr_vae: float | None = None

    @property
    def worse_than_quantizer_epochs(self) -> int:
        return sum(r > q for r, q in zip(self.val_mse, self.val_mse_quantizer))


@dataclass
class QualityResult:
    """All variants of one ablation, and how it was made."""

    train: str
    val: str
    preset: str
    epochs: int
    batch_size: int
    seed: int
    rows: list[VariantResult] = field(default_factory=list)
    seconds: float = 0.0

    def none_row(self, codes: int) -> VariantResult | None:
        return next((r for r in self.rows if r.codes == codes and r.variant == "none"), None)

    def beats_none(self, row: VariantResult) -> str:
        """Epoch ends at which this variant's validation MSE is below `none`'s, as "n/N"."""
        none = self.none_row(row.codes)
        if none is None or row is none:
            return "-"
        better = sum(r < n for r, n in zip(row.val_mse, none.val_mse))
        return f"{better}/{len(row.val_mse)}"

    def markdown(self) -> str:
        """The table as Markdown (README and BENCHMARKS.md take it as it is)."""
        lines = ["| K | rectifier | val MSE | quantizer alone | epochs better than none | "
                 "epochs worse than its quantizer | PSNR through tokens | SSIM |",
                 "|---|---|---|---|---|---|---|---|"]
        for row in self.rows:
            psnr = f"{row.psnr_tokens:.2f} dB" if row.psnr_tokens is not None else "-"
            ssim = f"{row.ssim_tokens:.3f}" if row.ssim_tokens is not None else "-"
            lines.append(f"| {row.codes} | {row.variant} | {row.val_mse[-1]:.4f} | {row.val_mse_quantizer[-1]:.4f} | "
                         f"{self.beats_none(row)} | {row.worse_than_quantizer_epochs}/{len(row.val_mse)} | "
                         f"{psnr} | {ssim} |")
        return "\n".join(lines)

    def report(self) -> str:
        head = (f"bench quality: preset {self.preset}, {self.epochs} epochs, batch {self.batch_size}, seed "
                f"{self.seed}; train {self.train}, validation {self.val} ({self.seconds:.0f} s)")
        lines = [head, self.markdown()]
        vae = next((r.psnr_vae for r in self.rows if r.psnr_vae is not None), None)
        if vae is not None:
            lines.append(f"VAE alone (no tokens): PSNR {vae:.2f} dB")
        for codes in dict.fromkeys(r.codes for r in self.rows):
            by_name = {r.variant: r for r in self.rows if r.codes == codes}
            for kind in ("vit", "cnn", "mlp"):
                if kind in by_name and f"{kind}-paper" in by_name:
                    ours, paper = by_name[kind].val_mse[-1], by_name[f"{kind}-paper"].val_mse[-1]
                    lines.append(f"K={codes} {kind}: residual form {100 * (ours - paper) / paper:+.1f}% "
                                 f"validation MSE vs the paper's form")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_quality(
    train: str,
    val: str,
    config: FitConfig | None = None,
    *,
    out: str | Path = "revq-bench-quality",
    images: str | None = None,
    vae: str | None = None,
    codes: list[int] | None = None,
    variants: list[str] | None = None,
) -> QualityResult:
    """Fit every variant for every K in `codes` (default: the K `config` resolves to on `train`, and a
    quarter of it) into `out`, each with `config` (default: the tiny preset) and the variant's
    settings, and collect validation MSE with and without the rectifier, and PSNR/SSIM with `images`."""
    config = config or FitConfig.from_preset(SMALL_PRESET)
    check_bench_quality(train, val, out=out, device=config.device, images=images, vae=vae, variants=variants)
    variants = quality_variants(variants, images=images, vae=vae)
    base = _resolve_on(train, config)
    codes = list(codes or [base.model.codes, max(base.model.codes // 4, 1)])
    out = Path(out)
    arguments = {"train": str(train), "val": str(val), "images": images, "vae": vae, "config": config.to_dict(),
                 "codes": codes, "variants": variants}
    if claim_folder(out, QUALITY_MARKER, "revq-pipe bench quality", arguments):
        log.info(f"going on with the benchmark in {out}: finished fits are read back, an interrupted one resumes")
    result = QualityResult(train=str(train), val=str(val), preset=base.model.preset, epochs=base.train.epochs,
                           batch_size=base.train.batch_size, seed=base.train.seed)
    started = time.perf_counter()
    runs = [(k, name) for k in codes for name in variants]
    for number, (k, name) in enumerate(runs, 1):
        run = out / f"K{k}-{name}"
        # resume=True: a fit this folder already finished only reads its checkpoint back.
        fitted = fit(train, str(run), config.with_overrides(codes=k, **QUALITY_VARIANTS[name]), val=val,
                     progress=False, resume=True)
        row = VariantResult(variant=name, codes=k, val_mse=[m["val_mse"] for m in fitted.history],
                            val_mse_quantizer=[m["val_mse_quantizer"] for m in fitted.history])
        if images is not None:
            image = evaluate(str(run), val, vae=vae, images=images, device=config.device, progress=False).image
            row.psnr_tokens, row.ssim_tokens, row.psnr_vae = image["psnr_tokens"], image["ssim_tokens"], image["psnr_vae"]
        result.rows.append(row)
        log.info(f"[{number}/{len(runs)}] K={k} {name}: val MSE {row.val_mse[-1]:.4f} "
                 f"(quantizer alone {row.val_mse_quantizer[-1]:.4f})"
                 + (f", PSNR through tokens {row.psnr_tokens:.2f} dB" if row.psnr_tokens is not None else ""))
    result.seconds = time.perf_counter() - started
    write_json(out / "quality.json", result.to_dict(), indent=1)
    write_atomically(out / "quality.md", lambda tmp: tmp.write_text(result.markdown() + "\n"))
    return result


def _resolve_on(train: str, config: FitConfig) -> ResolvedFit:
    """What `config` resolves to on the store `train`: the preset's K, epochs, batch and seed the table names."""
    store = LatentStore.open(train)
    return config.resolve(len(store), store.latent_shape, device=resolve_device(config.device),
                          has_flip=store.has_flip, store=train)
