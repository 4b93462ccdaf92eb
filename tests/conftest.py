"""Shared fixtures: everything here runs on a CPU-only machine.

For any stage's tests:
- `tiny_dc_vae_dir`, `tiny_kl_vae_dir`: real diffusers AutoencoderDC / AutoencoderKL models with
  tiny configs and fixed random weights, saved with `save_pretrained` (pass the path as `--vae`).
  DC: 4x spatial compression, 4 latent channels -> (4, 8, 8) latents at `TINY_IMAGE_SIZE` = 32.
  KL: 2x compression, 4 channels, sample_size 32 -> (4, 16, 16) latents at 32 px.
- `photo_folder`: an ImageFolder tree of `PHOTO_COUNT` real photograph crops (`PHOTO_SIDE` px JPEGs) in
  `len(PHOTO_CLASSES)` class folders; `flat_photo_folder`: the same files in one flat folder.
- `photo_shards`: the same JPEG bytes as webdataset shards (keys `<class>/<file stem>`, `cls` =
  the class's sorted index), as a brace pattern; `PHOTO_SHARD_SIZE` samples per shard.
Session-scoped and read-only: copy before changing them.
- `preloaded`: child processes that start with revq-pipe imported (tests/preloaded.py).
- `memory_root`: a fresh `memory://` folder (fsspec's in-memory file system) for stores at a URL,
  removed after the test.

A fit in this process builds metrics.png's figure from its history but does not rasterize it to a
file, unless the test is marked `metrics_png` (the tests of what fit reports, the demo, the run's
file-safety test): rasterizing is matplotlib's own work, a third of a CPU-second a fit, about 30 of
a suite run. Fits in child processes (the CLI runs, torchrun's ranks) write it as users get it.

The dask worker processes of the local clusters started here and in preloaded children (the
`--cluster` tests) are forked by a forkserver that imported torch, diffusers and the stages once
(tests/forked_workers.py).

Torch computes with `TORCH_THREADS` intra-op threads here and in every child process the tests
start (the CLI, torchrun's ranks, dask workers), since OMP_NUM_THREADS is set before torch is
imported: on the CPU, float sums round by thread count, and the tests compare what children write
with in-process runs bit for bit. Tests that need another count say so (`torch_threads(n)`).
"""

import os

# Tests never reach a model hub: anything that would download must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# One thread also spares a 2-core CI box OpenMP contention, which made training tests several
# times slower. Set, not defaulted: a child at the caller's OMP_NUM_THREADS would round otherwise.
TORCH_THREADS = 1
os.environ["OMP_NUM_THREADS"] = str(TORCH_THREADS)
# Where a test runs more threads, those waiting for work sleep instead of spinning: on a busy 2-core
# box the two-thread fit test took 30 CPU-s with spinning threads, 9.6 without. Same results.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
# torch.compile (encode's compiled encoder) compiles in this process: a pool of compile workers
# would import torch in each (about 4 CPU-s, measured cold and warm on the 2-core box).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import contextlib  # noqa: E402
import gc  # noqa: E402
import shutil  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from preloaded import GC_THRESHOLDS, PreloadedServer  # noqa: E402

torch.set_num_threads(TORCH_THREADS)  # also when a plugin imported torch before this file
gc.set_threshold(*GC_THRESHOLDS)  # garbage collected less often than Python's default (tests/preloaded.py)

TINY_IMAGE_SIZE = 32
PHOTO_CLASSES = ("astronaut", "chelsea", "coffee")
PHOTO_COUNT = 12
PHOTO_SHARD_SIZE = 5
PHOTO_SIDE = 80  # crops are resized to this square side: small to decode, not a multiple of 32

TINY_DC_CONFIG = dict(
    in_channels=3, latent_channels=4, attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
    encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
    downsample_block_type="Conv", upsample_block_type="interpolate",
)
TINY_KL_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=4, sample_size=TINY_IMAGE_SIZE,
)


def _save_model(model_class, config: dict, path: Path) -> Path:
    import torch

    torch.manual_seed(0)
    model_class(**config).save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def dask_workers_from_a_preloaded_forkserver():
    from forked_workers import fork_workers

    with fork_workers():
        yield


@pytest.fixture(scope="session", autouse=True)
def metrics_png_figures_only():
    """Fits in this process build metrics.png's figure (every panel, from the run's history) and
    write no file; `metrics_png_where_marked` puts the real drawing back for the tests about it."""
    from revq_pipe.pipeline.reporting.metrics_plot import draw_metrics
    from revq_pipe.pipeline.train import fit_outputs

    def build_figure(history, path, title="", *, val_count=None, codes=None):
        draw_metrics(history, title, val_count=val_count, codes=codes)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit_outputs, "plot_metrics", build_figure)
        yield


@pytest.fixture(autouse=True)
def metrics_png_where_marked(request, monkeypatch):
    if request.node.get_closest_marker("metrics_png"):
        from revq_pipe.pipeline.reporting.metrics_plot import plot_metrics
        from revq_pipe.pipeline.train import fit_outputs

        monkeypatch.setattr(fit_outputs, "plot_metrics", plot_metrics)


@pytest.fixture(scope="session")
def tiny_dc_vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderDC

    return _save_model(AutoencoderDC, TINY_DC_CONFIG, tmp_path_factory.mktemp("vae") / "tiny-dc")


@pytest.fixture(scope="session")
def tiny_kl_vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    return _save_model(AutoencoderKL, TINY_KL_CONFIG, tmp_path_factory.mktemp("vae") / "tiny-kl")


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    from revq_pipe.pipeline.images.sample_images import photo_crops, write_image_folder

    root = tmp_path_factory.mktemp("photos") / "classes"
    write_image_folder(root, photo_crops(PHOTO_CLASSES, PHOTO_COUNT, seed=0, out_size=PHOTO_SIDE))
    return root


@pytest.fixture(scope="session")
def flat_photo_folder(tmp_path_factory, photo_folder) -> Path:
    root = tmp_path_factory.mktemp("photos") / "flat"
    root.mkdir()
    for path in sorted(photo_folder.rglob("*.jpg")):
        shutil.copy(path, root / path.name)
    return root


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory, photo_folder) -> str:
    import webdataset as wds

    out = tmp_path_factory.mktemp("shards")
    paths = sorted(photo_folder.rglob("*.jpg"))
    with wds.ShardWriter(str(out / "photos-%06d.tar"), maxcount=PHOTO_SHARD_SIZE, verbose=0) as sink:
        for path in paths:
            label = PHOTO_CLASSES.index(path.parent.name)
            sink.write({"__key__": f"{path.parent.name}/{path.stem}", "jpg": path.read_bytes(), "cls": str(label)})
    shards = sorted(out.glob("*.tar"))
    return str(out / f"photos-{{000000..{len(shards) - 1:06d}}}.tar")


@contextlib.contextmanager
def torch_threads(count: int):
    """Torch computes with `count` intra-op threads in this process inside the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def preloaded():
    """Children forked from one process that imported torch, diffusers and the stages once
    (tests/preloaded.py): `preloaded.run("module:function", *args, logs=DIR)`."""
    server = PreloadedServer()
    yield server
    server.close()


@pytest.fixture
def memory_root():
    import fsspec

    fs, root = fsspec.filesystem("memory"), f"/revq-test-{uuid.uuid4().hex}"
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)
