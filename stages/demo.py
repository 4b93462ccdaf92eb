"""`revq-pipe demo`: the whole pipeline in one command, offline, on the CPU.

encode -> fit -> export-tokens -> decode -> eval on crops of real photographs bundled with
scikit-image / scikit-learn, through the small VAE embedded in the package, with the `tiny` preset.
The tokenizer is fitted on crops of the photos the embedded VAE was trained on and evaluated on
crops of the two photos held out from both, so the image numbers are on unseen pictures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.table import Table

from revq_pipe.pipeline.images.embedded_vae import EMBEDDED_IMAGE_SIZE, EMBEDDED_VAE_DIR
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.paths import image_path
from revq_pipe.pipeline.images.pixels import original_pixels, vae_pixels
from revq_pipe.pipeline.reporting.console import table_text
from revq_pipe.pipeline.images.sample_images import HOLDOUT_PHOTOS, TRAIN_PHOTOS, photo_crops, write_image_folder
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.pipeline.images.vae import resolve_vae
from revq_pipe.pipeline.workdir import DEMO_MARKER, claim_folder
from revq_pipe.stages.decode import decode
from revq_pipe.stages.encode import encode
from revq_pipe.stages.evaluate import EvalReport, evaluate
from revq_pipe.stages.export_tokens import export_tokens
from revq_pipe.stages.fit import fit

log = logging.getLogger(__name__)

COMPARISON_COUNT = 8  # eval images shown in comparison.png
CROP_SIDE = 96  # crops are saved at this size; encode resizes them to the VAE's 64 px


@dataclass(frozen=True)
class DemoSize:
    train_images: int
    eval_images: int
    epochs: int
    codes: int  # per token position (the tiny preset's 128 needs at least 128 training latents)
    batch_size: int


# About 1.5 minutes on an idle 2-core CPU; more crops and epochs keep helping. The quick demo is a
# short fit, not a token one: enough steps that its pictures are recognisable (README, "The demo").
FULL = DemoSize(train_images=2048, eval_images=64, epochs=20, codes=128, batch_size=64)
QUICK = DemoSize(train_images=512, eval_images=16, epochs=3, codes=64, batch_size=32)
# The training store is encoded with --flip, and fit starts from k-means codes: on the demo's data both
# lower the held-out MSE at equal steps (README, "Quality"), most where training is short. K-means gets
# 11 epochs' searches, 10 iterations on every training crop (a budget of 1 would leave it 186 crops and
# no gain): here the rectifier dominates an epoch, and those searches take about one epoch of training.
KMEANS_BUDGET = 11.0


@dataclass
class DemoResult:
    """Where the demo put everything, and its evaluation."""

    out: Path
    paths: dict[str, Path]
    evaluation: EvalReport
    seconds: float

    def report(self) -> str:
        lines = [f"Demo finished in {self.seconds:.0f} s. Everything is in {self.out}:"]
        lines += [f"  {name:<15} {path}" for name, path in self.paths.items()]
        return "\n".join(lines) + "\n\n" + self.table()

    def table(self) -> str:
        e = self.evaluation
        table = Table(title=f"{e.count} held-out crops ({', '.join(HOLDOUT_PHOTOS)})")
        table.add_column("")
        table.add_column("VAE only", justify="right")
        table.add_column("through ReVQ tokens", justify="right")
        table.add_row("PSNR (dB)", f"{e.image['psnr_vae']:.2f}", f"{e.image['psnr_tokens']:.2f}")
        table.add_row("SSIM", f"{e.image['ssim_vae']:.4f}", f"{e.image['ssim_tokens']:.4f}")
        table.add_row("latent MSE (normalised)", "-", f"{e.latent_mse_normalised:.4f}")
        # On few images usage is bounded by the count: each position sees one code per image.
        table.add_row(f"codes used per position ({e.count} images)", "-", f"{e.usage_mean_pct:.1f}% of {e.codes}")
        table.add_row("tokens per image", "-", f"{e.tokens}, {e.codes} codes each")
        return table_text(table)


def demo(out: str | Path = "revq-demo", quick: bool = False, *, progress: bool = True) -> DemoResult:
    """Run every stage on bundled photos into `out`; `quick` is a small version for CI."""
    started = time.perf_counter()
    size = QUICK if quick else FULL
    out = Path(out)
    claim_folder(out, DEMO_MARKER, "revq-pipe demo")
    if not (EMBEDDED_VAE_DIR / "config.json").is_file():
        raise UserError(f"the embedded VAE is not installed at {EMBEDDED_VAE_DIR}: reinstall revq-pipe")
    vae = str(EMBEDDED_VAE_DIR)
    paths = {
        "train images": out / "images" / "train",
        "eval images": out / "images" / "eval",
        "train latents": out / "latents-train.zarr",
        "eval latents": out / "latents-eval.zarr",
        "run": out / "run",
        "tokens": out / "tokens-eval.zarr",
        "decoded latents": out / "decoded-eval.zarr",
        "decoded images": out / "decoded-eval-images",
        "comparison": out / "comparison.png",
        "training plot": out / "run" / "metrics.png",  # fit's curves, shown beside the comparison
    }
    level = logging.INFO if progress else logging.DEBUG
    log.log(level, f"revq-pipe demo{' --quick' if quick else ''}: the whole ReVQ pipeline on the CPU, offline, "
                   f"into {out}\n"
                   f"  1. write {size.train_images} training crops of {', '.join(TRAIN_PHOTOS)} and {size.eval_images} "
                   f"held-out crops of {', '.join(HOLDOUT_PHOTOS)}\n"
                   f"  2. encode both with the embedded VAE ({EMBEDDED_IMAGE_SIZE} px) into latent stores (the "
                   f"training crops flipped too)\n"
                   f"  3. fit a ReVQ tokenizer (tiny preset, {size.codes} codes per position from k-means, "
                   f"{size.epochs} epochs)\n"
                   f"  4. export the held-out crops' token ids\n"
                   f"  5. decode the tokens back to latents and to images\n"
                   f"  6. evaluate: latent MSE, codebook usage, PSNR/SSIM of VAE-only vs through-the-tokens images")

    def step(number: int, text: str) -> None:
        log.log(level, f"\n[{number}/6] {text}")

    step(1, "photographs")
    write_image_folder(paths["train images"], photo_crops(TRAIN_PHOTOS, size.train_images, seed=0, out_size=CROP_SIDE))
    write_image_folder(paths["eval images"], photo_crops(HOLDOUT_PHOTOS, size.eval_images, seed=1, out_size=CROP_SIDE))

    step(2, "encode")
    for split in ("train", "eval"):
        summary = encode(str(paths[f"{split} images"]), str(paths[f"{split} latents"]), vae=vae,
                         image_size=EMBEDDED_IMAGE_SIZE, batch_size=64, device="cpu", dtype="float32", workers=0,
                         progress=progress, flip=split == "train")
        log.log(level, summary.report())

    step(3, "fit")
    config = FitConfig.from_preset("tiny", device="cpu", epochs=size.epochs, batch_size=size.batch_size,
                                   codes=size.codes, kmeans_budget=KMEANS_BUDGET)
    result = fit(str(paths["train latents"]), str(paths["run"]), config, val=str(paths["eval latents"]),
                 progress=progress)
    log.log(level, result.report())

    step(4, "export-tokens")
    log.log(level, export_tokens(str(paths["run"]), str(paths["eval latents"]), str(paths["tokens"]), device="cpu",
                                 progress=progress).report())

    step(5, "decode")
    log.log(level, decode(str(paths["run"]), str(paths["tokens"]), str(paths["decoded latents"]), device="cpu",
                          progress=progress).report())
    log.log(level, decode(str(paths["run"]), str(paths["tokens"]), str(paths["decoded images"]), vae=vae,
                          device="cpu", progress=progress).report())

    step(6, "eval")
    evaluation = evaluate(str(paths["run"]), str(paths["eval latents"]), vae=vae, images=str(paths["eval images"]),
                          device="cpu", progress=progress)
    paths["eval report"] = Path(evaluation.saved_to)
    write_comparison(paths["comparison"], paths["eval latents"], paths["eval images"], paths["decoded images"], vae)
    return DemoResult(out=out, paths=paths, evaluation=evaluation, seconds=time.perf_counter() - started)


def write_comparison(path: Path, latents_url: Path, images: Path, decoded_images: Path, vae: str) -> None:
    """One PNG: a row of originals, their VAE-only reconstructions, and their reconstructions
    through the tokens (read back from decode's PNGs), for the first few held-out crops."""
    store = LatentStore.open(str(latents_url))
    # Evenly spaced through the store, so every held-out photo shows up (keys are sorted by photo).
    rows = np.unique(np.linspace(0, len(store) - 1, min(COMPARISON_COUNT, len(store))).round().astype(int))
    keys = [str(key) for key in store.keys[:][rows]]
    size = store.attrs["image_size"]
    originals = np.concatenate(list(original_pixels(str(images), keys, size)))
    vae_only = vae_pixels(resolve_vae(vae).load(torch.device("cpu")), store.latents[:][rows], len(rows))
    tokens = np.stack([np.asarray(Image.open(image_path(decoded_images, key)).convert("RGB")) for key in keys])

    scale, label_width = 2, 90
    tile = size * scale
    sheet = Image.new("RGB", (label_width + len(rows) * tile, 3 * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (name, pixels) in enumerate((("original", originals), ("VAE-only", vae_only), ("ReVQ-tokens", tokens))):
        draw.text((6, row * tile + tile // 2 - 6), name, fill="black")
        for column, image in enumerate(pixels):
            big = Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST)
            sheet.paste(big, (label_width + column * tile, row * tile))
    sheet.save(path)
