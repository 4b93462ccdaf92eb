"""Outputs in folders other people can write to: a link planted where revq-pipe writes its lease or
a file leads no write onto the link's target, and every file gets the permissions of the user's
umask (safetensors makes its own 0600 temp file; it used to stay that way)."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TINY_IMAGE_SIZE
from revq_pipe.cli import app
from revq_pipe.pipeline.atomic_files import read_json, write_atomically, write_json
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.lease import LEASE_NAME, Lease
from revq_pipe.pipeline.storage.store import write_latent_store

runner = CliRunner()
PRECIOUS = "the user's own file\n"
FIT = ["--preset", "tiny", "--codes", "16", "--epochs", "1", "--batch-size", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    latents = np.random.default_rng(0).normal(size=(128, 16, 4, 4)).astype(np.float32)
    keys = [f"class{i % 2}/img{i:03d}.jpg" for i in range(128)]
    return write_latent_store(str(tmp_path_factory.mktemp("safety") / "latents.zarr"), latents, np.arange(128) % 2,
                              keys, chunk_size=32).url


@pytest.fixture
def precious(tmp_path) -> Path:
    """A file outside every output that a planted link points at."""
    path = tmp_path / "outside" / "bashrc"
    path.parent.mkdir()
    path.write_text(PRECIOUS)
    return path


def plant_link(at: Path, target: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target)


@pytest.mark.parametrize("kind", ["link to a file", "dangling link", "folder", "fifo"])
def test_a_lease_path_that_is_not_a_regular_file_is_refused(tmp_path, precious, kind):
    out = tmp_path / "out"
    out.mkdir()
    lease = out / LEASE_NAME
    if kind == "link to a file":
        lease.symlink_to(precious)
    elif kind == "dangling link":
        lease.symlink_to(tmp_path / "outside" / "new-file")
    elif kind == "folder":
        lease.mkdir()
    else:
        os.mkfifo(lease)
    with pytest.raises(UserError, match=f"{LEASE_NAME} is not a regular file"):
        Lease.acquire(out, "fit")
    assert precious.read_text() == PRECIOUS
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["bashrc"]


def test_fit_into_a_folder_with_a_planted_lease_link_exits_2_and_leaves_the_target_alone(store, tmp_path, precious):
    run = tmp_path / "run"
    plant_link(run / LEASE_NAME, precious)
    result = runner.invoke(app, ["fit", store, "--out", str(run), *FIT])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is not a regular file" in lines[0], result.output
    assert precious.read_text() == PRECIOUS
    assert [p.name for p in run.iterdir()] == [LEASE_NAME]


@pytest.mark.metrics_png  # its temp name is one of the planted links
def test_links_planted_at_every_temp_and_result_name_of_a_run_are_replaced_not_followed(store, tmp_path, precious):
    run = tmp_path / "run"
    names = ["model.safetensors", "config.json", "README.md", "checkpoint.pt", "metrics.jsonl", "training.json"]
    for name in names:
        plant_link(run / f"{name}.tmp", precious)
    plant_link(run / "metrics.png.tmp.png", precious)
    plant_link(run / "metrics.jsonl", precious)  # a result name itself: not a run yet, so fit goes on
    result = runner.invoke(app, ["fit", store, "--out", str(run), *FIT])
    assert result.exit_code == 0, result.output
    plant_link(run / "eval-latents.json", precious)  # not eval's file: kept, and the result goes beside it
    result = runner.invoke(app, ["eval", str(run), store, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = Path(result.output.strip().splitlines()[-1].removeprefix("saved to "))
    assert saved.parent == run and saved.name.startswith("eval-latents-") and read_json(saved)["count"] == 128
    assert precious.read_text() == PRECIOUS
    assert [p.name for p in run.rglob("*") if p.is_symlink()] == ["eval-latents.json"]
    for name in [*names, "metrics.png", saved.name]:
        assert (run / name).is_file() and not (run / name).is_symlink(), name


def test_shards_resumed_past_a_planted_partial_link_leave_its_target_alone(store, tmp_path, precious):
    out = tmp_path / "shards"
    args = ["export-tokens", str(tmp_path / "run"), store, "--out", str(out), "--format", "wds", "--shard-size", "50",
            "--device", "cpu"]
    assert runner.invoke(app, ["fit", store, "--out", str(tmp_path / "run"), *FIT]).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0
    (out / "tokens-000002.tar").unlink()  # as a kill before the last shard leaves it
    plant_link(out / "tokens-000002.tar.partial", precious)
    plant_link(out / "export.json.tmp", precious)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert precious.read_text() == PRECIOUS
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export.json", *(f"tokens-00000{i}.tar" for i in range(3))]


def test_write_atomically_replaces_what_a_killed_writer_left_and_keeps_no_temp_file(tmp_path):
    (tmp_path / "a.json.tmp").write_text("torn")
    write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "a.json", lambda tmp: (tmp.write_text("half"), _fail()))
    assert read_json(tmp_path / "a.json") == {"x": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def _fail():
    raise RuntimeError("the writer failed")


def test_read_json_does_not_wait_on_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "manifest.json")
    assert read_json(tmp_path / "manifest.json") is None


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_every_file_of_every_output_gets_the_umasks_permissions(store, tmp_path, umask_027):
    run, tokens = tmp_path / "run", tmp_path / "tokens.zarr"
    for args in (["fit", store, "--out", str(run), *FIT],
                 ["export-tokens", str(run), store, "--out", str(tokens), "--format", "zarr+wds", "--device", "cpu"],
                 ["export-tokens", str(run), store, "--out", str(tmp_path / "parquet"), "--format", "parquet"],
                 ["decode", str(run), str(tokens), "--out", str(tmp_path / "decoded.zarr"), "--device", "cpu"],
                 ["eval", str(run), store, "--device", "cpu"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    made = [p for p in tmp_path.rglob("*") if p != tmp_path]
    files = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in made if p.is_file()}
    folders = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in made if p.is_dir()}
    assert "run/model.safetensors" in files and "tokens.zarr-wds/tokens-000000.tar" in files
    assert {name: mode for name, mode in files.items() if mode != 0o666 & ~umask_027} == {}
    assert {name: mode for name, mode in folders.items() if mode != 0o777 & ~umask_027} == {}


def test_decoded_images_never_go_through_a_planted_folder_link(tmp_path, precious, tiny_dc_vae_dir):
    keys = [f"class{i % 2}/img{i:02d}.jpg" for i in range(16)]
    latents = np.random.default_rng(1).normal(size=(16, 4, 8, 8)).astype(np.float32)
    store = write_latent_store(str(tmp_path / "latents.zarr"), latents, keys=keys, chunk_size=8,
                               attrs={"vae": str(tiny_dc_vae_dir), "image_size": TINY_IMAGE_SIZE}).url
    run, tokens, images = tmp_path / "run", tmp_path / "tokens.zarr", tmp_path / "images"
    assert runner.invoke(app, ["fit", store, "--out", str(run), "--preset", "tiny", "--codes", "8", "--epochs", "1",
                               "--batch-size", "8", "--device", "cpu"]).exit_code == 0
    assert runner.invoke(app, ["export-tokens", str(run), store, "--out", str(tokens)]).exit_code == 0
    plant_link(images / "class1", precious.parent)
    result = runner.invoke(app, ["decode", str(run), str(tokens), "--out", str(images), "--vae", str(tiny_dc_vae_dir),
                                 "--device", "cpu", "--overwrite"])
    assert result.exit_code == 2 and "class1 leads out of" in result.output, result.output
    assert sorted(p.name for p in precious.parent.iterdir()) == ["bashrc"]
    assert sorted(p.name for p in images.iterdir()) == ["class1"]
