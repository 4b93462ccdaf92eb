"""The `revq-pipe` command line: parse arguments, call a stage function, report.

Every command is thin on purpose: the work lives in `revq_pipe.stages`, importable without the
CLI. Heavy imports (torch, diffusers, zarr) happen inside the commands so `--help` stays fast.
A `UserError` from any stage becomes one line on stderr and exit status 2. Log records of every
module go to stderr through the one handler `pipeline.reporting` sets up, beside the progress bars.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from revq_pipe.pipeline.errors import UserError, os_error_line
from revq_pipe.pipeline.reporting import console_reporting

app = typer.Typer(
    name="revq-pipe",
    help="Quantize-then-Rectify: turn a frozen pre-trained VAE into a VQ image tokenizer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Measure the project's speed beside the reference way, in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.callback()
def _report_to_console(ctx: typer.Context) -> None:
    # Runs before any command; the context exits the reporting when the command has finished.
    ctx.with_resource(console_reporting())


def reports_user_errors(command):
    """Turn a UserError, or a file system failure the user can fix (os_error_line), into
    `error: <reason>` on stderr and exit status 2, with no traceback; Ctrl-C into exit status 130
    and a hint (the stage's own, when it raised KeyboardInterrupt with one)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:
            line = os_error_line(err)
            if line is None:
                raise
            typer.echo(f"error: {line}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as err:
            typer.echo(f"interrupted: {str(err) or 'run the same command again to resume'}", err=True)
            raise typer.Exit(130) from None

    return wrapper


DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda.")


@app.command()
@reports_user_errors
def encode(
    source: str = typer.Argument(..., help="ImageFolder directory, a webdataset .tar, a brace pattern or an fsspec URL."),
    out: str = typer.Option(..., "--out", help="Latent store to write (a Zarr v3 group; local path or fsspec URL)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Hugging Face model id or local diffusers VAE directory."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Square input size S (default: the VAE's native size, 256 for DC-AE)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    device: str = DeviceOpt,
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype of the latents: float16 or float32 (float32 also disables bf16 autocast)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="DataLoader worker processes (default: CPU count, at most 16)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store made with other settings instead of refusing."),
    follow_links: bool = typer.Option(False, "--follow-links", help="Follow links in an image folder that lead out of it."),
):
    """Run images through the frozen VAE once, into a chunked, compressed Zarr latent store."""
    from revq_pipe.stages.encode import encode as run_encode

    summary = run_encode(
        source, out, vae=vae, image_size=image_size, batch_size=batch_size, device=device,
        dtype=dtype, workers=workers, overwrite=overwrite, follow_links=follow_links,
    )
    typer.echo(summary.report())


@app.command()
@reports_user_errors
def stats(store: str = typer.Argument(..., help="Latent store whose mean/std to recompute.")):
    """Recompute the per-dimension mean/std of a latent store (dask, float64 accumulation)."""
    from revq_pipe.pipeline.store import LatentStore

    mean, std = LatentStore.open(store, mode="r+").compute_stats()
    typer.echo(f"{store}: mean/std over {mean.size} dimensions rewritten "
               f"(mean of means {mean.mean():.4g}, mean of stds {std.mean():.4g})")


@app.command()
@reports_user_errors
def fit(
    store: str = typer.Argument(..., help="Latent store made by `revq-pipe encode`."),
    out: str = typer.Option(..., "--out", help="Run directory to write."),
    preset: str = typer.Option("512T_NC=16384", "--preset", help="512T_NC=16384, 256T_NC=65536, 256T_NC=262144 or tiny."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    lr: Optional[float] = typer.Option(None, "--lr"),
    val: Optional[str] = typer.Option(None, "--val", help="Latent store for validation MSE each epoch."),
    device: str = DeviceOpt,
    seed: int = typer.Option(0, "--seed", min=0, help="Seeds every random stream (codebook init, data order, reset noise, rectifier init), each its own."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's checkpoint."),
    split: Optional[str] = typer.Option(None, "--split", help="Ablation: channel (default) or spatial."),
    rectifier: Optional[str] = typer.Option(None, "--rectifier", help="Ablation: vit (default), cnn, mlp or none."),
    rectifier_form: Optional[str] = typer.Option(None, "--rectifier-form", help="residual (default: g(q) = q + f(q), the identity at initialisation) or paper (g(q) = f(q), as the paper's code)."),
    rectifier_width: Optional[int] = typer.Option(None, "--rectifier-width", min=1, help="Rectifier width (default: the preset's)."),
    rectifier_layers: Optional[int] = typer.Option(None, "--rectifier-layers", min=0, help="Rectifier blocks (default: the preset's)."),
    codebook_init: str = typer.Option("random", "--codebook-init", help="random (K distinct samples, the paper's way) or kmeans (those refined by Lloyd iterations on a larger sample)."),
    no_reset: bool = typer.Option(False, "--no-reset", help="Ablation: no Non-Activation Reset."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1, help="Tokens per image T, off-preset."),
    codes: Optional[int] = typer.Option(None, "--codes", min=1, help="Codes per token position K, off-preset."),
    codebook_update: str = typer.Option("auto", "--codebook-update", help="auto (sparse on CUDA, dense on CPU), sparse (AdamW touching only the chosen codes) or dense (AdamW over all codes, the reference's way)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: remove what an earlier fit wrote in the run directory."),
):
    """Train the grouped quantizer and the rectifier from a latent store."""
    from revq_pipe.stages.fit import fit as run_fit

    result = run_fit(
        store, out, preset=preset, epochs=epochs, batch_size=batch_size, lr=lr, val=val,
        device=device, seed=seed, resume=resume, split=split, rectifier=rectifier, rectifier_form=rectifier_form,
        rectifier_width=rectifier_width, rectifier_layers=rectifier_layers, reset=not no_reset, tokens=tokens,
        codes=codes, codebook_update=codebook_update, codebook_init=codebook_init, overwrite=overwrite,
    )
    typer.echo(result.report())


@app.command("export-tokens")
@reports_user_errors
def export_tokens(
    run: str = typer.Argument(..., help="Run directory made by `revq-pipe fit`."),
    store: str = typer.Argument(..., help="Latent store to tokenize."),
    out: str = typer.Option(..., "--out", help="Token store to write (Zarr v3 group), or shard folder with --format wds."),
    batch_size: int = typer.Option(1024, "--batch-size", min=1),
    device: str = DeviceOpt,
    format: str = typer.Option("zarr", "--format", help="zarr, wds, or zarr+wds."),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Write every image's token ids for downstream model training."""
    from revq_pipe.stages.export_tokens import export_tokens as run_export

    summary = run_export(run, store, out, batch_size=batch_size, device=device, format=format, overwrite=overwrite)
    typer.echo(summary.report())


@app.command()
@reports_user_errors
def decode(
    run: str = typer.Argument(..., help="Run directory made by `revq-pipe fit`."),
    tokens: str = typer.Argument(..., help="Token store made by `revq-pipe export-tokens`."),
    out: str = typer.Option(..., "--out", help="Latent store to write, or (with --vae) a folder of PNG images."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Decode on through this VAE's decoder to images."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: str = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Map tokens back to latents (and, with --vae, to images)."""
    from revq_pipe.stages.decode import decode as run_decode

    summary = run_decode(run, tokens, out, vae=vae, batch_size=batch_size, device=device, overwrite=overwrite)
    typer.echo(summary.report())


@app.command("eval")
@reports_user_errors
def evaluate(
    run: str = typer.Argument(..., help="Run directory made by `revq-pipe fit`."),
    store: str = typer.Argument(..., help="Latent store to evaluate on."),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE for image-space metrics (needs --images)."),
    images: Optional[str] = typer.Option(None, "--images", help="The source images of STORE, for PSNR/SSIM."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: str = DeviceOpt,
):
    """Latent MSE, codebook usage and perplexity; PSNR/SSIM with --vae and --images."""
    from revq_pipe.stages.evaluate import evaluate as run_eval

    report = run_eval(run, store, vae=vae, images=images, batch_size=batch_size, device=device)
    typer.echo(report.table())


@app.command()
@reports_user_errors
def demo(
    out: Path = typer.Option(Path("revq-demo"), "--out", help="Folder for everything the demo writes."),
    quick: bool = typer.Option(False, "--quick", help="Fewer images and epochs (for CI)."),
):
    """encode -> fit -> export-tokens -> decode -> eval on bundled photos with the embedded VAE, on the CPU."""
    from revq_pipe.stages.demo import demo as run_demo

    result = run_demo(out, quick=quick)
    typer.echo(result.report())


@bench_app.command("search")
@reports_user_errors
def bench_search(
    shape: str = typer.Option("512T_NC=16384", "--shape", help="512T_NC=16384, 256T_NC=65536, 256T_NC=262144, or G,M,K,d."),
    device: str = DeviceOpt,
):
    """Nearest-code search: this kernel beside cdist-under-vmap, baddbmm+argmin and an SGEMM peak."""
    from revq_pipe.stages.bench_search import bench_search as run_bench

    typer.echo(run_bench(shape, device=device).report())


@bench_app.command("encode")
@reports_user_errors
def bench_encode(
    device: str = DeviceOpt,
    images: int = typer.Option(2048, "--images", min=1, help="JPEG images to put in the benchmark shards."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
):
    """Encode images/s end to end (JPEG shards -> store) beside the encoder alone, fp32 bs 64."""
    from revq_pipe.stages.bench_encode import bench_encode as run_bench

    typer.echo(run_bench(device=device, images=images, batch_size=batch_size).report())


@bench_app.command("fit")
@reports_user_errors
def bench_fit(
    preset: str = typer.Option("512T_NC=16384", "--preset"),
    device: str = DeviceOpt,
    steps: int = typer.Option(20, "--steps", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Default: the preset's."),
    codebook_update: str = typer.Option("auto", "--codebook-update", help="This project's codebook update: auto, sparse or dense."),
):
    """Training-step samples/s beside a reference-style step (cdist, fp32, dense AdamW)."""
    from revq_pipe.stages.bench_fit import bench_fit as run_bench

    typer.echo(run_bench(preset, device=device, steps=steps, batch_size=batch_size,
                         codebook_update=codebook_update).report())


@bench_app.command("quality")
@reports_user_errors
def bench_quality(
    train: str = typer.Argument(..., help="Latent store to fit on (e.g. revq-demo/latents-train.zarr)."),
    val: str = typer.Argument(..., help="Latent store of held-out images to score on (e.g. revq-demo/latents-eval.zarr)."),
    out: Path = typer.Option(Path("revq-bench-quality"), "--out", help="Folder for every variant's run, quality.json and quality.md."),
    images: Optional[str] = typer.Option(None, "--images", help="VAL's source images, for PSNR/SSIM through the tokens (needs --vae)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="The VAE both stores were encoded with (e.g. revq-pipe-embedded)."),
    preset: str = typer.Option("tiny", "--preset"),
    codes: Optional[str] = typer.Option(None, "--codes", help="Comma-separated K values (default: the preset's K and K/4)."),
    variants: Optional[str] = typer.Option(None, "--variants", help="Comma-separated: vit, vit-paper, cnn, cnn-paper, mlp, mlp-paper, none (default: all)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", min=0),
    device: str = DeviceOpt,
):
    """Rectifier ablation: validation MSE with and without the rectifier, and PSNR, per variant and K."""
    from revq_pipe.stages.bench_quality import bench_quality as run_bench

    result = run_bench(train, val, out=out, images=images, vae=vae, preset=preset, codes=_int_list(codes, "--codes"),
                       variants=variants.split(",") if variants else None, epochs=epochs, batch_size=batch_size,
                       seed=seed, device=device)
    typer.echo(result.report())


def _int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, not {text!r}") from None
    if min(values) < 1:
        raise UserError(f"{option} values must be positive, not {text!r}")
    return values


if __name__ == "__main__":
    sys.exit(app())
