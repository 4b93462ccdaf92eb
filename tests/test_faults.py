"""SIGKILL at several moments of encode, export-tokens, decode and fit (a real child process that
kills itself: tests/kill_at.py, forked preloaded by tests/preloaded.py), then the same command
again, compared with an uninterrupted run.

Moments: early (the output just created: F1, F2), mid-chunk (one array of a chunk written, the
next not, nothing committed), and during the final writes (statistics, the complete flag, the
last weights). Every re-run must finish without --overwrite and write what an uninterrupted run
writes, bit for bit.
"""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import TINY_IMAGE_SIZE
from revq_pipe.cli import app
from revq_pipe.pipeline.lease import LEASE_NAME
from revq_pipe.pipeline.storage.store import write_latent_store

pytestmark = pytest.mark.slow

ENCODE_CHUNK_ROWS = 4  # 12 photos: three chunks
COUNT, CHUNK = 40, 8  # the latent store of export and decode: five chunks


def run_killed(preloaded, target: str, nth: int, when: str, args: list[str], logs: Path, **options) -> None:
    """Run the CLI in a child that SIGKILLs itself at the nth call of `target`; check it did."""
    child = preloaded.run("kill_at:run_cli", args, target, nth, when, logs=logs, **options)
    assert child.exitcode == -signal.SIGKILL, f"not killed at call {nth} of {target}: {child.stderr[-3000:]}"


def run_again(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def assert_same_store(a, b) -> None:
    """Every array and the attrs of two Zarr stores are equal."""
    a, b = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert a.attrs.asdict() == b.attrs.asdict()


def assert_clean_folder(path: Path) -> None:
    """No lease and no temp file of the killed run is left."""
    leftovers = [p for p in path.rglob("*") if p.name == LEASE_NAME or p.name.endswith((".partial", ".tmp"))]
    assert leftovers == []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The output of a command line run once without a kill, made at the first scenario that
    asks for it and shared by the others: `uninterrupted(args)` with args(out) the command."""
    made: dict[tuple, Path] = {}

    def output(args) -> Path:
        command = tuple(args(Path("OUT")))
        if command not in made:
            made[command] = tmp_path_factory.mktemp("uninterrupted") / "out"
            run_again(args(made[command]))
        return made[command]

    return output


# --------------------------------------------------------------------------- encode

ENCODE_MOMENTS = {
    "early: the group just created (F1)": ("revq_pipe.pipeline.storage.store:_new_group", 1, "after"),
    "mid-chunk: chunk 2's latents written, not its labels": ("zarr:Array.__setitem__", 5, "before"),
    "final: statistics written, not the complete flag": ("revq_pipe.pipeline.storage.store:LatentStore.write_stats", 1,
                                                         "after"),
}


@pytest.fixture(scope="module")
def encode_args(photo_folder, tiny_dc_vae_dir):
    return lambda out: ["encode", str(photo_folder), "--out", str(out), "--vae", str(tiny_dc_vae_dir),
                        "--image-size", str(TINY_IMAGE_SIZE), "--batch-size", "3", "--workers", "0"]


@pytest.fixture(scope="module")
def clean_encode(encode_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "latents.zarr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("revq_pipe.stages.encode.default_chunk_rows", lambda *shape: ENCODE_CHUNK_ROWS)
        run_again(encode_args(out))
    return out


@pytest.mark.parametrize("moment", ENCODE_MOMENTS)
def test_encode_killed_then_run_again_equals_an_uninterrupted_run(moment, encode_args, clean_encode, tmp_path,
                                                                  monkeypatch, preloaded):
    out = tmp_path / "latents.zarr"
    run_killed(preloaded, *ENCODE_MOMENTS[moment], encode_args(out), tmp_path / "child",
               encode_chunk_rows=ENCODE_CHUNK_ROWS)
    if moment.startswith("early"):  # F1: zarr.json alone (and the dead writer's lease) used to block every run
        assert sorted(p.name for p in out.iterdir()) == [LEASE_NAME, "zarr.json"]
    monkeypatch.setattr("revq_pipe.stages.encode.default_chunk_rows", lambda *shape: ENCODE_CHUNK_ROWS)
    run_again(encode_args(out))
    assert_same_store(clean_encode, out)
    assert_clean_folder(out)


# --------------------------------------------------------------------------- export-tokens and decode


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_dc_vae_dir):
    """Latents shaped like the tiny DC VAE's (so decode can go on to images), a run, and its tokens."""
    root = tmp_path_factory.mktemp("fitted")
    latents = np.random.default_rng(0).normal(size=(COUNT, 4, 8, 8)).astype(np.float32)
    keys = [f"class{i % 3}/img{i:02d}.jpg" for i in range(COUNT)]
    store = write_latent_store(str(root / "latents.zarr"), latents, np.arange(COUNT) % 3, keys, chunk_size=CHUNK,
                               attrs={"vae": str(tiny_dc_vae_dir), "image_size": TINY_IMAGE_SIZE})
    run_again(["fit", store.url, "--out", str(root / "run"), "--preset", "tiny", "--codes", "8", "--epochs", "1",
               "--batch-size", "8", "--device", "cpu"])
    run_again(["export-tokens", str(root / "run"), store.url, "--out", str(root / "tokens.zarr"), "--device", "cpu"])
    return {"store": store.url, "run": str(root / "run"), "tokens": str(root / "tokens.zarr"),
            "vae": str(tiny_dc_vae_dir), "root": root}


EXPORT_MOMENTS = {
    "early: the token store's group just created (F2)": ("zarr", "revq_pipe.pipeline.storage.store:_new_group", 1, "after"),
    "mid-chunk: chunk 2's ids written, not its labels": ("zarr", "zarr:Array.__setitem__", 5, "before"),
    "final: every chunk committed, not the complete flag": ("zarr", "revq_pipe.pipeline.storage.store:RowStore.finish", 1,
                                                            "before"),
    "webdataset, mid-shard": ("wds", "webdataset:TarWriter.write", 23, "before"),
}


@pytest.mark.parametrize("moment", EXPORT_MOMENTS)
def test_export_killed_then_run_again_equals_an_uninterrupted_run(moment, fitted, tmp_path, preloaded, uninterrupted):
    format, *point = EXPORT_MOMENTS[moment]
    args = lambda out: ["export-tokens", fitted["run"], fitted["store"], "--out", str(out), "--format", format,
                        "--device", "cpu"]
    run_killed(preloaded, *point, args(tmp_path / "killed"), tmp_path / "child")
    run_again(args(tmp_path / "killed"))
    clean = uninterrupted(args)
    if format == "zarr":
        assert_same_store(clean, tmp_path / "killed")
    else:
        names = sorted(p.name for p in clean.iterdir())
        assert names == sorted(p.name for p in (tmp_path / "killed").iterdir())
        for name in names:
            assert (clean / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    assert_clean_folder(tmp_path / "killed")


DECODE_MOMENTS = {
    "early: the latent store's group just created": (False, "revq_pipe.pipeline.storage.store:_new_group", 1, "after"),
    "mid-chunk: chunk 2's latents written, not its labels": (False, "zarr:Array.__setitem__", 5, "before"),
    "final: statistics written, not the complete flag": (False, "revq_pipe.pipeline.storage.store:LatentStore.write_stats", 1,
                                                         "after"),
    "images: one saved under its temp name, not renamed": (True, "PIL.Image:Image.save", 11, "after"),
    "images: two chunks written, the second not committed": (True, "revq_pipe.pipeline.storage.decoded_images:DecodedImages.commit",
                                                             2, "before"),
    "images: every image written, not the complete flag": (True, "revq_pipe.pipeline.storage.decoded_images:DecodedImages.finish",
                                                           1, "before"),
}


@pytest.mark.parametrize("moment", DECODE_MOMENTS)
def test_decode_killed_then_run_again_equals_an_uninterrupted_run(moment, fitted, tmp_path, preloaded, uninterrupted):
    images, *point = DECODE_MOMENTS[moment]
    args = lambda out: (["decode", fitted["run"], fitted["tokens"], "--out", str(out), "--device", "cpu"]
                        + (["--vae", fitted["vae"]] if images else []))
    run_killed(preloaded, *point, args(tmp_path / "killed"), tmp_path / "child")
    run_again(args(tmp_path / "killed"))
    clean = uninterrupted(args)
    if images:
        files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(tmp_path / "killed") for p in (tmp_path / "killed").rglob("*")
                               if p.is_file())
        assert len([f for f in files if f.suffix == ".png"]) == COUNT
        for name in files:
            assert (clean / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    else:
        assert_same_store(clean, tmp_path / "killed")
    assert_clean_folder(tmp_path / "killed")


# --------------------------------------------------------------------------- fit

FIT_MOMENTS = {
    "early: epoch 1, before its third step": ("revq_pipe.pipeline.train.trainer:Trainer.step", 3, "before"),
    "between epoch 2's checkpoint and its metrics and weights": ("revq_pipe.stages.fit:save_checkpoint", 2, "after"),
    "final: the last epoch's weights written to a temp file, not renamed": ("revq_pipe.pipeline.model.hub_mixin:save_file", 3,
                                                                           "after"),
}


def untimed_metrics(run) -> list[dict]:
    lines = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("epoch_seconds", "samples_per_s")} for line in lines]


@pytest.mark.parametrize("moment", FIT_MOMENTS)
def test_fit_killed_then_resumed_equals_an_uninterrupted_run(moment, fitted, tmp_path, preloaded, uninterrupted):
    args = lambda out: ["fit", fitted["store"], "--out", str(out), "--preset", "tiny", "--codes", "8", "--epochs", "3",
                        "--batch-size", "8", "--device", "cpu"]
    run_killed(preloaded, *FIT_MOMENTS[moment], args(tmp_path / "killed"), tmp_path / "child")
    run_again([*args(tmp_path / "killed"), "--resume"])
    clean = uninterrupted(args)
    weights = load_file(str(clean / "model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert weights.keys() == resumed.keys()
    for name in weights:
        assert torch.equal(weights[name], resumed[name]), name
    assert untimed_metrics(clean) == untimed_metrics(tmp_path / "killed")
    assert_clean_folder(tmp_path / "killed")
