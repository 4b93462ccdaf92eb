"""What every command checks before it imports torch, zarr, dask or diffusers: a refused command
answers in well under a second instead of after the seconds those imports take.

Each command has one check here (`check_encode`, `check_fit`, ...) of what can be decided from its
arguments and the file system alone: option values and combinations, inputs that are missing,
outputs that conflict (a file where a folder goes, a folder of other files, the input itself).
The CLI calls it before it imports the stage; the stage calls it first too, for Python callers.
What needs a store's contents or a model (settings that differ, shapes) stays with the stage.
Every check is one function here or beside its machinery in a module as light as this one, and
raises the one message the stage raises for the same problem. The values of encode's and
export-tokens' settings are checked where their configs are made (`EncodeConfig`, `ExportConfig`,
as light as this module), which the CLI and the stage do before calling the command's check here.
Remote locations (fsspec URLs) are left to the stages: looking at them can take as long as the
imports this module avoids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from revq_pipe.pipeline.device import known_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.hub import looks_like_hub_id
from revq_pipe.pipeline.images.embedded_vae import EMBEDDED_VAE_NAMES
from revq_pipe.pipeline.lease import contents, refuse_non_folder, refuse_when_held
from revq_pipe.pipeline.paths import local_path, same_location
from revq_pipe.pipeline.reporting.bench_options import parse_shape, parse_variants, quality_variants
from revq_pipe.pipeline.scaleout.cluster import cluster_kind, shared_location
from revq_pipe.pipeline.storage.export_formats import ExportConfig, export_format
from revq_pipe.pipeline.storage.latent_files import latent_file_path
from revq_pipe.pipeline.train.checkpoint import CHECKPOINT_NAME, launched_world_size, writes_run_dir
from revq_pipe.pipeline.train.config import FitConfig, check_global_batch
from revq_pipe.pipeline.workdir import DEMO_MARKER, QUALITY_MARKER, check_claimable

if TYPE_CHECKING:  # (encode_config imports this module's checks)
    from revq_pipe.pipeline.images.encode_config import EncodeConfig

LATENT_DTYPES = ("float16", "float32")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
FITTED_RUN_FILES = ("config.json", "model.safetensors")  # what makes a folder a fitted run


# --- one check each -------------------------------------------------------------------------------

def at_least_one(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"`batch_size` must be at least 1, not {batch_size}")


def latent_dtype(dtype: str) -> None:
    if dtype not in LATENT_DTYPES:
        raise UserError(f"`dtype` must be one of {', '.join(LATENT_DTYPES)}, not {dtype!r}")


def existing_file(path: str | Path, what: str = "file") -> Path:
    """The local file `path` (`~` expanded); a missing one is a UserError naming it as `what`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def no_store_at(url: str | Path) -> UserError:
    return UserError(f"no Zarr store at {url}")


def existing_store(url: str | Path) -> None:
    """A local store location must exist (what it holds, the stage reads)."""
    path = local_path(url)
    if path is not None and not path.exists():
        raise no_store_at(url)


def local_run(run: str | Path) -> Path | None:
    """The local folder of RUN, or None when RUN names a Hugging Face model (owner/name, and no such
    path here); a missing folder is a UserError."""
    path = Path(run).expanduser()
    if not (path.exists() or not looks_like_hub_id(str(run))):
        return None
    if not path.is_dir():
        raise UserError(f"run directory not found: {run}")
    return path


def fitted_run(path: Path) -> None:
    """A run folder must hold the model's files."""
    for name in FITTED_RUN_FILES:
        if not (path / name).is_file():
            raise UserError(f"{path} is not a fitted run: it has no {name} (make one with `revq-pipe fit`)")


def existing_run(run: str | Path) -> None:
    path = local_run(run)
    if path is not None:
        fitted_run(path)


def local_source(spec: str | Path) -> Path | None:
    """The image folder SOURCE names, or None for webdataset shards (a .tar path, a brace pattern,
    an fsspec URL: the stage expands them); a missing source is a UserError."""
    spec = str(spec)
    path = local_path(spec)
    if path is None or (not path.is_dir() and (spec.endswith(SHARD_SUFFIXES) or ("{" in spec and ".tar" in spec))):
        return None
    if path.is_dir():
        return path
    if path.is_file():
        raise UserError(f"{spec} is a file, not an image folder or a webdataset .tar shard")
    raise UserError(f"source not found: {spec}")


def existing_vae(vae: str | None) -> None:
    """`vae` (when given) is an existing folder, the embedded VAE's name, or has the form of a hub id."""
    if vae is None or vae in EMBEDDED_VAE_NAMES:
        return
    path = Path(vae).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"`vae={vae}` is a file, not a diffusers VAE directory")
    if not path.exists() and (vae.startswith((".", "/", "~")) or not looks_like_hub_id(vae)):
        raise UserError(f"VAE directory not found: {vae} (and it is not a Hugging Face model id owner/name)")


def distinct_output(out: str | Path, given: str | Path, what: str) -> None:
    if same_location(out, given):
        raise UserError(f"`out` must not be the {what} itself")


def is_zarr_store(path: Path) -> bool:
    """Whether the local folder `path` is a Zarr (v3) store: it has the root's zarr.json."""
    return (path / "zarr.json").is_file()


def store_output(out: str | Path) -> None:
    """A local store output must be a folder, empty or a Zarr store (what a writer may take over)."""
    path = local_path(out)
    if path is None:
        return
    if path.is_file():
        raise UserError(f"`out={out}` is a file, not a Zarr store")
    if contents(path) and not is_zarr_store(path):
        raise UserError(f"`out={out}` exists and is not a Zarr store: refusing to write into it")


def already_exists(out: str | Path) -> UserError:
    return UserError(f"{out} already exists: pass `overwrite=True` to replace it")


def new_store_output(out: str | Path, overwrite: bool) -> None:
    """A store written from scratch goes into a folder, and replaces one only with `overwrite`."""
    path = local_path(out)
    if path is None:
        return
    refuse_non_folder(path)
    refuse_when_held(path)
    if contents(path) and not overwrite and not _unfinished_store(path):
        raise already_exists(out)


def _unfinished_store(path: Path) -> bool:
    """Whether `path` is a Zarr store its writer did not finish: the stage decides, under the lease,
    whether it holds rows to keep (a killed import's or a stopped one's is replaced without overwrite)."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("revq")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and attrs.get("complete") is False


def out_outside(out: str | Path, root: Path | None) -> None:
    """A store inside an ImageFolder tree (`root`) would become a class folder on the next scan."""
    path = local_path(out)
    if root is not None and path is not None and path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"`out={out}` is inside `source={root}`: put the store outside the image folder")


def run_output(out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """The run dir of a fit: a folder, which an earlier run's files leave only to `resume` or
    `overwrite` (not both)."""
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"`out={run_dir}` is a file, not a run directory")
    if resume and overwrite:
        raise UserError("`resume=True` continues the run in `out`, `overwrite=True` starts it over: pass one of them")
    if writes_run_dir():  # (torchrun's other ranks take no lease)
        refuse_when_held(run_dir)
    if not (resume or overwrite) and ((run_dir / CHECKPOINT_NAME).exists() or (run_dir / "config.json").exists()):
        raise UserError(f"{run_dir} already holds a run: pass `resume=True` to continue it, `overwrite=True` to "
                        f"start it over, or choose another `out`")


def images_folder(out: str | Path) -> Path:
    """The local folder decoded images go to."""
    folder = local_path(out)
    if folder is None:
        raise UserError("decoded images are written to a local folder, not a URL")
    return folder


def shards_folder(out: str | Path) -> Path:
    """The local folder token shards go to."""
    folder = local_path(out)
    if folder is None:
        raise UserError("token shards are written to a local folder, not a URL")
    refuse_non_folder(folder)
    return folder


def on_cluster(cluster: str, **locations: str | Path) -> None:
    """`cluster` names a cluster, and every location (parameter -> URL) is one its workers can open."""
    cluster_kind(cluster)
    for parameter, url in locations.items():
        shared_location(url, parameter)


# --- one check per command ------------------------------------------------------------------------

def check_encode(source: str, out: str, *, vae: str | None, cluster: str | None, config: EncodeConfig) -> None:
    """encode's checks of its inputs and output; `config`'s values were checked when it was made, but
    for the image size, which needs the VAE."""
    if cluster is not None:
        on_cluster(cluster, out=out, source=source)
    root = local_source(source)
    existing_vae(vae)
    out_outside(out, root)
    store_output(out)


def check_import_latents(files: Sequence[str | Path], out: str, *, vae: str | None, dtype: str | None,
                         overwrite: bool) -> None:
    if not files:
        raise UserError("no latent files given")
    for path in files:
        latent_file_path(path)
    if dtype is not None:
        latent_dtype(dtype)
    existing_vae(vae)
    new_store_output(out, overwrite)


def check_fit(store: str, out: str, config: FitConfig, *, val: str | None = None, resume: bool = False,
              overwrite: bool = False) -> None:
    """fit's checks; of `config`, the device and a batch size the user gave (a preset's may shrink
    to fit the store, which only the stage sees)."""
    known_device(config.device)
    if "batch_size" in config.overrides:  # under torchrun every rank refuses before it imports torch
        check_global_batch(config.overrides["batch_size"], launched_world_size())
    existing_store(store)
    if val is not None:
        existing_store(val)
    run_output(out, resume=resume, overwrite=overwrite)


def check_export_tokens(run: str, store: str, out: str, *, cluster: str | None, config: ExportConfig) -> None:
    """export-tokens' checks of its inputs and output (`config`'s values were checked when it was made)."""
    written = export_format(config.format)
    distinct_output(out, store, "latent store")
    if cluster is not None:
        if not written.token_store:
            raise UserError("`cluster` writes a token store: use `format=zarr`, or `format=zarr+wds` for shards made "
                            "from it")
        on_cluster(cluster, out=out, store=store)
    existing_run(run)
    existing_store(store)
    if written.token_store:
        store_output(out)
    if written.shards is not None:
        shards_folder(written.shard_folder(out))


def check_decode(run: str, tokens: str, out: str, *, images: bool, vae: str | None, device: object,
                 batch_size: int) -> None:
    at_least_one(batch_size)
    distinct_output(out, tokens, "token store")
    known_device(device)
    to_images = images or vae is not None
    if to_images:
        images_folder(out)
        existing_vae(vae)
    existing_run(run)
    existing_store(tokens)
    if not to_images:
        store_output(out)


def check_eval(run: str, store: str, *, vae: str | None, images: str | None, latent_only: bool, device: object,
               batch_size: int) -> None:
    if latent_only and (vae is not None or images is not None):
        raise UserError("`latent_only=True` skips the image metrics: it cannot go with `vae` or `images`")
    at_least_one(batch_size)
    known_device(device)
    existing_run(run)
    existing_store(store)
    existing_vae(vae)
    if images is not None:
        local_source(images)


def check_import_checkpoint(checkpoint: str, config: str, preprocessor: str, out: str, *, overwrite: bool) -> None:
    existing_file(checkpoint)
    existing_file(config, "config")
    existing_file(preprocessor)
    refuse_non_folder(Path(out))
    refuse_when_held(Path(out))
    empty_output(out, overwrite)


def empty_output(out: str | Path, overwrite: bool) -> None:
    """A folder written whole (import-checkpoint's run dir): empty, a lease aside, or `overwrite`."""
    if Path(out).is_dir() and contents(Path(out)) and not overwrite:
        raise UserError(f"{out} already exists and is not empty: pass `overwrite=True` to write into it")


def check_demo(out: str | Path) -> None:
    check_claimable(Path(out), DEMO_MARKER, "revq-pipe demo")


def check_bench_search(shape: str, device: object) -> None:
    parse_shape(shape)
    known_device(device)


def check_bench_fit(device: object, variants: str) -> None:
    known_device(device)
    parse_variants(variants)


def check_bench_quality(train: str, val: str, *, out: str | Path, device: object, images: str | None, vae: str | None,
                        variants: Sequence[str] | None) -> None:
    quality_variants(variants, images=images, vae=vae)
    known_device(device)
    existing_store(train)
    existing_store(val)
    existing_vae(vae)
    if images is not None:
        local_source(images)
    check_claimable(Path(out), QUALITY_MARKER, "revq-pipe bench quality")
