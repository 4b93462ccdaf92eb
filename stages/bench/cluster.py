"""`revq-pipe bench cluster`: encode and export-tokens on a local dask cluster of N workers beside
1 worker (and one process), in one run, on the same data.

Data: photo crops as an ImageFolder, encoded with the embedded VAE (64 px, so the CPU gets through
hundreds of images in seconds) into chunks of `chunk_size` rows, so that there are many pieces to
share out. Export uses a model of the default preset's shape (d = 4, `codes` codes per position)
with random codebooks, made from the store's statistics: the nearest-code search costs the same
whatever the codes are.

Both clusters, `local:1` and `local:N`, are started as `--cluster local:k` starts them (on the CPU
each worker gets its share of the cores for torch: local:1's one worker uses them all) and stay up
side by side; their workers import torch, diffusers and zarr before anything is timed. Then, in
each of `repeats` rounds, encode and export-tokens run in one process (no --cluster), on local:1
and on local:N, each call timed whole: loading the VAE and the model on each worker, the tasks, the
layout copy, the statistics, finishing the stores. Interleaving the rounds spreads the load of
other work on the machine over every configuration alike; the report gives each round's seconds
and the median's images/s. Every store is checked equal to the single-process one.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from revq_pipe.pipeline.scaleout.cluster import cluster_client
from revq_pipe.pipeline.images.sample_images import HOLDOUT_PHOTOS, TRAIN_PHOTOS, photo_crops, write_image_folder
from revq_pipe.pipeline.images.vae import EMBEDDED_VAE_NAME

IMAGE_SIZE = 64
CROP_SIDE = 96  # resized to 64 px by encode, as real photos are
TOKEN_DIM = 4  # the default preset's d


@dataclass
class Row:
    name: str
    images: int
    seconds: list[float] = field(default_factory=list)  # one per repeat

    @property
    def rate(self) -> float:
        """Images/s of the median repeat."""
        return self.images / statistics.median(self.seconds)


@dataclass
class BenchClusterResult:
    device: str
    images: int
    chunk_size: int
    codes: int
    workers: int
    repeats: int
    encode: dict[str, Row] = field(default_factory=dict)
    export: dict[str, Row] = field(default_factory=dict)
    identical: bool = True
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())

    def report(self) -> str:
        lines = [f"bench cluster: {self.images} photos, embedded VAE at {IMAGE_SIZE} px, chunks of {self.chunk_size} "
                 f"rows; export with {self.codes} codes x d={TOKEN_DIM}; {self.device}, {self.date}; median of "
                 f"{self.repeats} interleaved repeat(s)",
                 f"  {'measurement':<44} {'images':>7} {'s (each repeat)':>24} {'img/s':>9} {'vs 1 worker':>12}"]
        for rows in (self.encode, self.export):
            baseline = next(row.rate for name, row in rows.items() if name.endswith("local:1"))
            for row in rows.values():
                each = " ".join(f"{seconds:.2f}" for seconds in row.seconds)
                lines.append(f"  {row.name:<44} {row.images:>7} {each:>24} {row.rate:>9.4g} "
                             f"{row.rate / baseline:>11.2f}x")
        lines.append(f"  every store equals the single-process encode's and export's: "
                     f"{'yes' if self.identical else 'NO'}")
        return "\n".join(lines)


def bench_cluster(images: int = 512, workers: int = 2, chunk_size: int = 32, codes: int = 16384,
                  batch_size: int = 32, repeats: int = 3) -> BenchClusterResult:
    """Time encode and export-tokens in one process and on `local:1` and `local:{workers}`, the
    clusters up side by side and the runs interleaved, `repeats` times."""
    from revq_pipe.stages.encode import encode
    from revq_pipe.stages.export_tokens import export_tokens

    result = BenchClusterResult(device=_machine(), images=images, chunk_size=chunk_size, codes=codes, workers=workers,
                                repeats=repeats)
    options = dict(vae=EMBEDDED_VAE_NAME, image_size=IMAGE_SIZE, batch_size=batch_size, chunk_size=chunk_size,
                   workers=0, progress=False)
    with tempfile.TemporaryDirectory(prefix="revq-bench-cluster-") as tmp, contextlib.ExitStack() as clusters:
        root = Path(tmp)
        folder = root / "photos"
        write_image_folder(folder, photo_crops(TRAIN_PHOTOS + HOLDOUT_PHOTOS, images, seed=0, out_size=CROP_SIDE))
        _import_heavy_modules()
        addresses = {None: None}
        for size in sorted({1, workers}):
            client = clusters.enter_context(cluster_client(f"local:{size}"))
            client.run(_import_heavy_modules)
            addresses[size] = client.scheduler.address
        reference = root / "single.zarr"
        encode(str(folder), str(reference), **options)
        run = _random_run(reference, root / "run", codes)
        reference_tokens = root / "single-tokens.zarr"
        export_tokens(str(run), str(reference), str(reference_tokens), device="cpu", progress=False)
        for repeat in range(repeats):
            for size, address in addresses.items():
                where = "one process (no --cluster)" if size is None else f"--cluster local:{size}"
                latents, tokens = root / f"latents-{size}-{repeat}.zarr", root / f"tokens-{size}-{repeat}.zarr"
                started = time.perf_counter()
                encode(str(folder), str(latents), cluster=address, **options)
                _timed(result.encode, f"encode {where}", images, started)
                started = time.perf_counter()
                export_tokens(str(run), str(reference), str(tokens), device="cpu", progress=False, cluster=address)
                _timed(result.export, f"export-tokens {where}", images, started)
                result.identical &= _same_arrays(latents, reference) and _same_arrays(tokens, reference_tokens)
    return result


def _timed(rows: dict[str, Row], name: str, images: int, started: float) -> None:
    rows.setdefault(name, Row(name, images)).seconds.append(time.perf_counter() - started)


def _random_run(store: Path, out: Path, codes: int) -> Path:
    """A run dir of the store's latent shape with random codebooks and the store's statistics."""
    import torch

    from revq_pipe.pipeline.model.config import ReVQConfig
    from revq_pipe.pipeline.model.revq import ReVQ
    from revq_pipe.pipeline.storage.store import LatentStore

    latents = LatentStore.open(str(store))
    shape = latents.latent_shape
    torch.manual_seed(0)
    model = ReVQ(ReVQConfig(latent_shape=shape, tokens=int(np.prod(shape)) // TOKEN_DIM, codes=codes,
                            dim=TOKEN_DIM, rectifier="none", vae=EMBEDDED_VAE_NAME, image_size=IMAGE_SIZE))
    model.preprocessor.set_stats(*latents.require_stats())
    model.save_pretrained(out)
    return out


def _import_heavy_modules() -> None:
    """Import what the tasks need, so the timings do not include a worker's first imports."""
    from diffusers import AutoencoderDC  # noqa: F401

    import revq_pipe.pipeline.storage.run_dir  # noqa: F401
    import revq_pipe.pipeline.scaleout.staged_encode  # noqa: F401
    import revq_pipe.pipeline.scaleout.token_tasks  # noqa: F401


def _same_arrays(a: Path, b: Path) -> bool:
    x, y = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    return sorted(x.array_keys()) == sorted(y.array_keys()) and all(
        np.array_equal(x[name][:], y[name][:]) for name in x.array_keys())


def _machine() -> str:
    """What the workers compute on: this machine's GPUs (one worker each), else its CPU cores."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {platform.machine()}, {cpus} cores (torch {torch.__version__})"
