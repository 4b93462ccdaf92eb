"""The `revq-pipe` command line: parse arguments, call a stage function, report.

Every command is thin on purpose: the work lives in `revq_pipe.stages`, importable without the
CLI. The options of fit, encode and export-tokens are made from the fields of their configs
(`FitConfig`, `EncodeConfig`, `ExportConfig`; `takes_fit_config`, `takes_config`), so a setting
is written once, where its config lives. Heavy imports (torch, diffusers, zarr, dask) happen
inside the commands, and each command imports only its own stage, after its checks
(pipeline/preflight.py): `--help`, `--version` and every refused command answer at once.
A `UserError` from any stage becomes one line on stderr and exit status 2, naming this command's
flags where the message names the Python parameters behind them. Log records of every
module go to stderr through the one handler `pipeline.reporting.console` sets up, beside the progress bars.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typer.core import TyperCommand

from revq_pipe.pipeline import preflight
from revq_pipe.pipeline.errors import UserError, as_command_line, os_error_line
from revq_pipe.pipeline.interrupts import DEFAULT_HINT, prompt_interrupts
from revq_pipe.pipeline.device import DEVICE_HELP, DEVICES
from revq_pipe.pipeline.images.encode_config import EncodeConfig
from revq_pipe.pipeline.model.config import OVERWRITE_HELP, Setting, StageConfig, preset_defaults, settings_of
from revq_pipe.pipeline.reporting.console import console_reporting
from revq_pipe.pipeline.storage.export_formats import ExportConfig
from revq_pipe.pipeline.train.config import STEP_OPTIONS, FitConfig

app = typer.Typer(
    name="revq-pipe",
    help="Quantize-then-Rectify: turn a frozen pre-trained VAE into a VQ image tokenizer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain help: rich's panels show every flag with a `<bool>` type, as if it took a value.
    rich_markup_mode=None,
)
bench_app = typer.Typer(help="Measure the project's speed beside the reference way, in one run.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(bench_app, name="bench", short_help="Measure the project's speed beside the reference way.")


def _print_version(value: bool) -> None:
    if value:
        from revq_pipe import __version__

        typer.echo(f"revq-pipe {__version__}")
        raise typer.Exit()


@app.callback()
def _report_to_console(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    # Runs before any command; the context exits the reporting when the command has finished.
    ctx.with_resource(console_reporting())


def reports_user_errors(command):
    """Turn a UserError, or a file system failure the user can fix (os_error_line), into
    `error: <reason>` on stderr and exit status 2, with no traceback; Ctrl-C into exit status 130
    and a hint (the stage's own, when it raised KeyboardInterrupt with one), within seconds
    (pipeline/interrupts.py)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        flags = _flags_for(command)
        shown = functools.partial(as_command_line, flags=flags)
        with prompt_interrupts(shown) as reported_interrupt:
            try:
                with _flags_in_log_lines(flags):
                    return command(*args, **kwargs)
            except UserError as err:
                typer.echo(f"error: {shown(str(err))}", err=True)
                raise typer.Exit(2) from None
            except OSError as err:
                line = os_error_line(err)
                if line is None:
                    raise
                typer.echo(f"error: {line}", err=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt as err:
                typer.echo(f"interrupted: {shown(str(err) or DEFAULT_HINT)}", err=True)
                reported_interrupt()
                raise typer.Exit(130) from None

    return wrapper


@contextlib.contextmanager
def _flags_in_log_lines(flags: dict[str, tuple[str, bool]]):
    """While a command runs, its log lines show flags where they name parameters, as its errors do
    (a warning's advice `codes=32` reads --codes 32)."""

    def rewrite(record: logging.LogRecord) -> bool:
        record.msg, record.args = as_command_line(record.getMessage(), flags), None
        return True

    handlers = logging.getLogger("revq_pipe").handlers
    for handler in handlers:
        handler.addFilter(rewrite)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(rewrite)


def _flags(command) -> dict[str, tuple[str, bool]]:
    """A command's parameters as its user types them, read from the command function's own typer
    parameters: Python name -> (the flag, or an argument's metavar; whether it is an on/off flag)."""
    flags = {}
    for name, parameter in inspect.signature(command).parameters.items():
        declared = parameter.default
        if isinstance(declared, typer.models.OptionInfo):
            flags[name] = (declared.param_decls[0], parameter.annotation in (bool, "bool"))
        elif isinstance(declared, typer.models.ArgumentInfo):
            flags[name] = (declared.metavar or name.upper(), False)
    return flags


def _flags_for(command) -> dict[str, tuple[str, bool]]:
    """The flags a message from `command` may name: its own parameters, and any other command's
    options (a message may advise another command, e.g. fit's `resume=True` from export-tokens)."""
    commands = [info.callback for typer_app in (app, *(group.typer_instance for group in app.registered_groups))
                for info in typer_app.registered_commands]
    flags = {name: flag for other in commands for name, flag in _flags(other).items() if flag[0].startswith("--")}
    return {**flags, **_flags(command)}


DeviceOpt = typer.Option("auto", "--device", metavar="|".join(DEVICES), help=DEVICE_HELP + ".")
OverwriteOpt = typer.Option(False, "--overwrite", help=OVERWRITE_HELP)
ClusterOpt = typer.Option(None, "--cluster", metavar="local[:N]|ADDRESS",
                          help="Run on a dask cluster: local (one worker per GPU; 2 without CUDA), local:N "
                               "workers on this machine, or the address of a running scheduler "
                               "(tcp://host:8786). The output is the same as without it.")
RunArg = typer.Argument(..., metavar="RUN", help="Run directory made by `revq-pipe fit` (or import-checkpoint), "
                        "or a Hugging Face model id user/repo.")


def _setting_option(setting: Setting, default: Any = None, *, default_in_help: bool) -> inspect.Parameter:
    """One CLI option for a config field, from its `Setting`: `--name VALUE`, or a flag (`--no-reset`,
    `--flip`), which passes True when given. `default`: the option's value when not given (None: the
    preset's or the field's default, for the config to fill in). `default_in_help`: the help says
    what the default is (fit's, whose defaults are the preset's), instead of click showing
    `[default: 64]` as on every other command's options."""
    if setting.flag:
        option = typer.Option(False, setting.flag, help=setting.help)
        return inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=bool)
    if default_in_help:
        shown = (f"the preset's; {preset_defaults(setting.name)}" if setting.from_preset
                 else setting.shown_default or setting.default)
        described = dict(show_default=False, help=f"{setting.help} (default: {shown}).")
    else:
        described = dict(help=setting.help)
    option = typer.Option(default, setting.option, metavar=setting.metavar or "|".join(setting.choices),
                          min=setting.minimum, **described)
    return inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=setting.type if default is not None else Optional[setting.type])


def _takes_settings(settings: list[Setting], make: Callable[..., Any], defaults: dict[str, Any], *,
                    default_in_help: bool):
    """Give a command one option per setting (`_setting_option`, with `defaults` by name) where its
    `config` parameter stands, and hand it `config=make(**the values given)`: a flag given is its
    `flag_sets`; an option not given (None) is left to `make`'s default."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        if "config" not in signature.parameters:
            raise TypeError(f"{command.__name__} has no `config` parameter to put the options in")
        options = [_setting_option(s, defaults.get(s.name), default_in_help=default_in_help) for s in settings]

        @functools.wraps(command)
        def with_config(*args, **kwargs):
            values = {s.name: kwargs.pop(s.name) for s in settings}
            for s in settings:
                if s.flag:  # the option passes True when given
                    values[s.name] = s.flag_sets if values[s.name] else None
            given = {name: value for name, value in values.items() if value is not None}
            return command(*args, config=make(**given), **kwargs)

        parameters = [each for p in signature.parameters.values() for each in (options if p.name == "config" else [p])]
        with_config.__signature__ = signature.replace(parameters=parameters)
        with_config.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_config

    return decorate


def takes_config(config_class: type[StageConfig]):
    """Give a command one option per setting of a stage's config (`EncodeConfig`, `ExportConfig`), each
    with the field's default, where its `config` parameter stands; the command receives the config."""
    settings = list(settings_of(config_class).values())
    return _takes_settings(settings, config_class, {s.name: s.default for s in settings}, default_in_help=False)


def takes_fit_config(*, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (), **defaults: Any):
    """Give a command one option per fit setting: FitConfig's own (preset, device), then every model
    and training setting (`FitConfig.settings()`); or the `only` ones, less `exclude`. `defaults`
    replaces the preset's or the device's default. The command receives them as `config: FitConfig`."""
    own = {name: defaults.get(name, s.default) for name, s in settings_of(FitConfig).items()}
    settings = [s for s in [*settings_of(FitConfig).values(), *FitConfig.settings().values()]
                if (only is None or s.name in only) and s.name not in exclude]
    return _takes_settings(settings, functools.partial(FitConfig.from_preset, **own), own, default_in_help=True)


@app.command()
@reports_user_errors
@takes_config(EncodeConfig)
def encode(
    source: str = typer.Argument(..., metavar="SOURCE", help="ImageFolder directory (class sub-folders -> labels), "
                                 "a webdataset .tar, a brace pattern or an fsspec URL."),
    out: str = typer.Option(..., "--out", metavar="STORE", help="Latent store to write (a Zarr v3 group; local path or fsspec URL)."),
    vae: Optional[str] = typer.Option(None, "--vae", metavar="ID_OR_DIR", help="Hugging Face model id, local diffusers VAE "
                                      "directory, or revq-pipe-embedded. Default: DC-AE f32c32 when cached or reachable, "
                                      "else the embedded VAE."),
    *,
    config: EncodeConfig,
    cluster: Optional[str] = ClusterOpt,
):
    """Run images through the frozen VAE once, into a chunked, compressed Zarr latent store."""
    preflight.check_encode(source, out, vae=vae, cluster=cluster, config=config)
    from revq_pipe.stages.encode import encode as run_encode

    typer.echo(run_encode(source, out, vae=vae, cluster=cluster, config=config).report())


@app.command("import-latents")
@reports_user_errors
def import_latents(
    files: list[str] = typer.Argument(..., metavar="FILE...", help="Latent files, in order: .pth/.pt (a tensor, or a dict "
                                      "with latents, labels, keys; loaded with weights_only=True), .npy, .npz, .safetensors."),
    out: str = typer.Option(..., "--out", metavar="STORE", help="Latent store to write."),
    vae: Optional[str] = typer.Option(None, "--vae", metavar="ID_OR_DIR", help="The VAE the latents came from, recorded so "
                                      "decode and eval can make images (checked against the latents' shape)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", metavar="S", help="The image size the latents were encoded at (default: the VAE's native size)."),
    classes: Optional[Path] = typer.Option(None, "--classes", metavar="FILE", help="Text file naming the labels, one class name per line (label 0 first)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="float16|float32", help="Storage dtype (default: float16 for float16 files, else float32)."),
    overwrite: bool = OverwriteOpt,
):
    """Turn pre-extracted latents (N, C, H, W) into a latent store, statistics computed as encode does."""
    preflight.check_import_latents(files, out, vae=vae, dtype=dtype, overwrite=overwrite)
    names = None
    if classes is not None:
        if not classes.is_file():
            raise UserError(f"--classes file not found: {classes}")
        names = [line.strip() for line in classes.read_text().splitlines() if line.strip()]
    from revq_pipe.stages.import_latents import import_latents as run_import

    typer.echo(run_import(files, out, vae=vae, image_size=image_size, classes=names, dtype=dtype,
                          overwrite=overwrite).report())


@app.command()
@reports_user_errors
def stats(store: str = typer.Argument(..., metavar="STORE", help="Latent store whose mean/std to recompute.")):
    """Recompute the per-dimension mean/std of a latent store (dask, float64 accumulation)."""
    preflight.existing_store(store)
    from revq_pipe.pipeline.lease import output_lease
    from revq_pipe.pipeline.storage.store import LatentStore

    latents = LatentStore.open(store, mode="r+")  # (an existing store: the lease creates no folder)
    with output_lease(store, "stats"):
        mean, std = latents.compute_stats()
    typer.echo(f"{store}: mean/std over {mean.size} dimensions rewritten "
               f"(mean of means {mean.mean():.4g}, mean of stds {std.mean():.4g})")


@app.command()
@reports_user_errors
@takes_fit_config()
def fit(
    store: str = typer.Argument(..., metavar="STORE", help="Latent store made by `revq-pipe encode` or import-latents."),
    out: str = typer.Option(..., "--out", metavar="RUN", help="Run directory to write."),
    val: Optional[str] = typer.Option(None, "--val", metavar="STORE", help="Latent store for validation MSE (with and without the rectifier) each epoch."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's checkpoint."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write each epoch's metrics as TensorBoard events into RUN/tensorboard (metrics.jsonl and metrics.png are always written)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: remove what an earlier fit wrote in the run directory."),
    *,
    config: FitConfig,
):
    """Train the grouped quantizer and the rectifier from a latent store.

    On several GPUs or machines, start it with torchrun, e.g. `torchrun --nproc-per-node 8 $(which revq-pipe) fit ...`: it trains data-parallel, --batch-size stays the global batch and rank 0 writes the run.
    """
    preflight.check_fit(store, out, config, val=val, resume=resume, overwrite=overwrite)
    from revq_pipe.stages.fit import fit as run_fit

    result = run_fit(store, out, config, val=val, resume=resume, overwrite=overwrite, tensorboard=tensorboard)
    if result.rank == 0:  # under torchrun, one report
        typer.echo(as_command_line(result.report(), _flags_for(fit)))


@app.command("export-tokens")
@reports_user_errors
@takes_config(ExportConfig)
def export_tokens(
    run: str = RunArg,
    store: str = typer.Argument(..., metavar="STORE", help="Latent store to tokenize."),
    out: str = typer.Option(..., "--out", metavar="TOKENS", help="Token store to write (Zarr v3 group), or the shard folder with --format wds / parquet."),
    *,
    config: ExportConfig,
    cluster: Optional[str] = ClusterOpt,
):
    """Write every image's token ids for downstream model training."""
    preflight.check_export_tokens(run, store, out, cluster=cluster, config=config)
    from revq_pipe.stages.export_tokens import export_tokens as run_export

    typer.echo(run_export(run, store, out, cluster=cluster, config=config).report())


@app.command()
@reports_user_errors
def decode(
    run: str = RunArg,
    tokens: str = typer.Argument(..., metavar="TOKENS", help="Token store made by `revq-pipe export-tokens`."),
    out: str = typer.Option(..., "--out", metavar="PATH", help="Latent store to write, or (with --images) a folder of PNG images."),
    images: bool = typer.Option(False, "--images", help="Decode on through the VAE decoder to one PNG per key."),
    vae: Optional[str] = typer.Option(None, "--vae", metavar="ID_OR_DIR", help="The VAE for --images (default: the one the run records; giving it implies --images)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, metavar="N", help="Images per decode batch."),
    device: str = DeviceOpt,
    overwrite: bool = OverwriteOpt,
):
    """Map tokens back to latents (and, with --images, to images)."""
    preflight.check_decode(run, tokens, out, images=images, vae=vae, device=device, batch_size=batch_size)
    from revq_pipe.stages.decode import decode as run_decode

    summary = run_decode(run, tokens, out, images=images, vae=vae, batch_size=batch_size, device=device,
                         overwrite=overwrite)
    typer.echo(summary.report())


@app.command("eval")
@reports_user_errors
def evaluate(
    run: str = RunArg,
    store: str = typer.Argument(..., metavar="STORE", help="Latent store to evaluate on."),
    vae: Optional[str] = typer.Option(None, "--vae", metavar="ID_OR_DIR", help="VAE for image metrics (default: the one the store records)."),
    images: Optional[str] = typer.Option(None, "--images", metavar="SOURCE", help="The source images of STORE, for PSNR/SSIM (default: the folder or shards the store records, when still there)."),
    latent_only: bool = typer.Option(False, "--latent-only", help="Skip the image metrics."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, metavar="N", help="Latents per batch."),
    device: str = DeviceOpt,
):
    """Latent MSE, codebook usage and perplexity; PSNR/SSIM through the VAE. Writes RUN/eval-<store>.json."""
    preflight.check_eval(run, store, vae=vae, images=images, latent_only=latent_only, device=device,
                         batch_size=batch_size)
    from revq_pipe.stages.evaluate import evaluate as run_eval

    report = run_eval(run, store, vae=vae, images=images, latent_only=latent_only, batch_size=batch_size,
                      device=device)
    typer.echo(report.table())
    typer.echo(f"saved to {report.saved_to}")


@app.command("import-checkpoint")
@reports_user_errors
def import_checkpoint(
    checkpoint: str = typer.Argument(..., metavar="CKPT", help="The paper's ckpt.pth (a dict with quantizer and decoder state)."),
    config: str = typer.Option(..., "--config", metavar="YAML", help="The paper's yaml config of that checkpoint (e.g. 512T_NC=16384.yaml)."),
    preprocessor: str = typer.Option(..., "--preprocessor", metavar="PTH", help="The paper's preprocessor.pth (latent mean and std)."),
    out: str = typer.Option(..., "--out", metavar="RUN", help="Run directory to write."),
    vae: str = typer.Option("mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", "--vae", metavar="ID_OR_DIR", help="The VAE the checkpoint's latents come from."),
    image_size: int = typer.Option(256, "--image-size", min=1, metavar="S", help="The image size of those latents."),
    overwrite: bool = OverwriteOpt,
):
    """Convert the ReVQ paper's released checkpoint into a run dir for export-tokens, decode and eval."""
    preflight.check_import_checkpoint(checkpoint, config, preprocessor, out, overwrite=overwrite)
    from revq_pipe.stages.import_checkpoint import import_checkpoint as run_import

    typer.echo(run_import(checkpoint, config, preprocessor, out, vae=vae, image_size=image_size,
                          overwrite=overwrite).report())


@app.command()
@reports_user_errors
def demo(
    out: Path = typer.Option(Path("revq-demo"), "--out", metavar="DIR", help="Folder for everything the demo writes."),
    quick: bool = typer.Option(False, "--quick", help="Fewer images and epochs (for CI)."),
):
    """encode -> fit -> export-tokens -> decode -> eval on bundled photos with the embedded VAE, on the CPU."""
    preflight.check_demo(out)
    from revq_pipe.stages.demo import demo as run_demo

    result = run_demo(out, quick=quick)
    typer.echo(result.report())


@bench_app.command("search")
@reports_user_errors
def bench_search(
    shape: str = typer.Option("512T_NC=16384", "--shape", metavar="PRESET|G,M,K,d", help="512T_NC=16384, 256T_NC=65536, 256T_NC=262144, or G,M,K,d."),
    device: str = DeviceOpt,
    candidates: bool = typer.Option(False, "--candidates", help="Also time the exact kernel's candidate launch configurations (tiles, K splits) one by one (CUDA)."),
):
    """Nearest-code search: this kernel beside cdist-under-vmap, baddbmm+argmin and an SGEMM peak."""
    preflight.check_bench_search(shape, device)
    from revq_pipe.stages.bench.search import bench_search as run_bench

    typer.echo(run_bench(shape, device=device, candidates=candidates).report())


@bench_app.command("encode")
@reports_user_errors
def bench_encode(
    device: str = DeviceOpt,
    images: int = typer.Option(2048, "--images", min=1, metavar="N", help="JPEG images to put in the benchmark shards."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, metavar="N", help="Images per VAE batch."),
    compile_encoder: bool = typer.Option(False, "--compile", help="Add a row for the encoder under torch.compile (CUDA; compiling takes a minute or more)."),
):
    """Encode images/s end to end (JPEG shards -> store) beside the encoder alone, fp32 bs 64."""
    preflight.known_device(device)
    from revq_pipe.stages.bench.encode import bench_encode as run_bench

    typer.echo(run_bench(device=device, images=images, batch_size=batch_size, compile_encoder=compile_encoder).report())


@bench_app.command("cluster")
@reports_user_errors
def bench_cluster(
    images: int = typer.Option(512, "--images", min=1, metavar="N", help="Photo crops to encode and export."),
    workers: int = typer.Option(2, "--workers", min=1, metavar="N", help="Workers of the cluster timed beside local:1."),
    chunk_size: int = typer.Option(32, "--chunk-size", min=1, metavar="N", help="Rows per store chunk: the unit tasks share out."),
    codes: int = typer.Option(16384, "--codes", min=1, metavar="K", help="Codes per token position of the export model (d = 4)."),
    repeats: int = typer.Option(3, "--repeats", min=1, metavar="N", help="Interleaved rounds; each row reports the median."),
):
    """encode and export-tokens on --cluster local:N beside local:1 and one process, on the same photos."""
    from revq_pipe.stages.bench.cluster import bench_cluster as run_bench

    typer.echo(run_bench(images=images, workers=workers, chunk_size=chunk_size, codes=codes,
                         repeats=repeats).report())


@bench_app.command("fit")
@reports_user_errors
@takes_fit_config(only=("preset", "device", "batch_size", "codebook_update"), preset="512T_NC=16384")
def bench_fit(
    steps: int = typer.Option(20, "--steps", min=1, metavar="N", help="Training steps timed."),
    variants: str = typer.Option("default", "--variants", metavar="V,V,...", help=f"More rows: the project's step with step options joined by + ({', '.join(STEP_OPTIONS)}), e.g. fused-quantize+fused-adamw,max-autotune."),
    profile: Optional[Path] = typer.Option(None, "--profile", metavar="DIR", help="Also profile each step kind with torch.profiler; write the summaries (top kernels, launches and syncs per step, peak memory) and the default step's trace to DIR."),
    profile_steps: int = typer.Option(20, "--profile-steps", min=1, metavar="N", help="Steps profiled per step kind."),
    *,
    config: FitConfig,
):
    """Training-step samples/s beside a reference-style step (cdist, fp32, dense AdamW)."""
    preflight.check_bench_fit(config.device, variants)
    from revq_pipe.stages.bench.fit import bench_fit as run_bench

    typer.echo(run_bench(config, steps=steps, variants=variants, profile_dir=profile, profile_steps=profile_steps).report())


@bench_app.command("quality")
@reports_user_errors
@takes_fit_config(exclude=("codes", "rectifier", "rectifier_form"), preset="tiny")
def bench_quality(
    train: str = typer.Argument(..., metavar="TRAIN", help="Latent store to fit on (e.g. revq-demo/latents-train.zarr)."),
    val: str = typer.Argument(..., metavar="VAL", help="Latent store of held-out images to score on (e.g. revq-demo/latents-eval.zarr)."),
    out: Path = typer.Option(Path("revq-bench-quality"), "--out", metavar="DIR", help="Folder for every variant's run, quality.json and quality.md; the same command again goes on from the fits it finished."),
    images: Optional[str] = typer.Option(None, "--images", metavar="SOURCE", help="VAL's source images, for PSNR/SSIM through the tokens."),
    vae: Optional[str] = typer.Option(None, "--vae", metavar="ID_OR_DIR", help="The VAE both stores were encoded with (default: the one VAL records)."),
    codes: Optional[str] = typer.Option(None, "--codes", metavar="K,K,...", help="Comma-separated K values (default: the preset's K and K/4)."),
    variants: Optional[str] = typer.Option(None, "--variants", metavar="NAME,...", help="Comma-separated: vit, vit-paper, cnn, cnn-paper, mlp, mlp-paper, none (the default set), and vit-kmeans, none-kmeans, vit-random, none-random (the codebook init), vit-noflip, none-noflip."),
    *,
    config: FitConfig,
):
    """Rectifier ablation: validation MSE with and without the rectifier, and PSNR, per variant and K.

    Every variant is a fit with the fit options given here (the preset tiny unless --preset says
    otherwise); the variant sets the rectifier, its form, and for some the codebook init or flips.
    """
    code_list, variant_list = _int_list(codes, "--codes"), variants.split(",") if variants else None
    preflight.check_bench_quality(train, val, out=out, device=config.device, images=images, vae=vae,
                                  variants=variant_list)
    from revq_pipe.stages.bench.quality import bench_quality as run_bench

    result = run_bench(train, val, config, out=out, images=images, vae=vae, codes=code_list, variants=variant_list)
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


class PlainHelpCommand(TyperCommand):
    """A command's help with its arguments by name alone: `encode [OPTIONS] SOURCE` and `SOURCE  help`,
    where Typer writes `{SOURCE}` and `SOURCE <str>`."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_argument_name(param) if param.required else f"[{_argument_name(param)}]")
        return pieces

    def format_options(self, ctx, formatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {"argument": [], "option": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and param.param_type_name in rows:
                name = _argument_name(param) if param.param_type_name == "argument" else record[0]
                rows[param.param_type_name].append((name, record[1]))
        for title, kind in (("Arguments", "argument"), ("Options", "option")):
            if rows[kind]:
                with formatter.section(title):
                    formatter.write_dl(rows[kind])


def _argument_name(param) -> str:
    name = param.metavar or param.name.upper()
    return name + "..." if param.nargs != 1 and not name.endswith("...") else name


# Every command gets plain argument names, and a short help that is its docstring's whole first
# paragraph (click cuts a derived one off with "..." to fit the terminal; a given one wraps instead).
for _command in (*app.registered_commands, *bench_app.registered_commands):
    _command.cls = PlainHelpCommand
    _command.short_help = _command.short_help or " ".join(_command.callback.__doc__.split("\n\n")[0].split())


if __name__ == "__main__":
    sys.exit(app())
