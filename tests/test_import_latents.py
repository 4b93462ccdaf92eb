"""revq-pipe import-latents: latents saved by other tools (.pth, .npy, .npz, .safetensors) become a
latent store that fit and the later stages take, with statistics as encode computes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.storage.store import LatentStore

SHAPE = (4, 4, 4)
runner = CliRunner()


class NotATensor:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse to build it."""


def latents(n, seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *SHAPE)) * rng.uniform(0.5, 3, size=SHAPE) + rng.normal(size=SHAPE)).astype(np.float32)


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def files(tmp_path):
    """The same kind of latents in each format, with labels and keys where the format holds them."""
    parts = {"paper.pth": latents(70, 0), "plain.npy": latents(30, 1), "named.npz": latents(20, 2),
             "tensors.safetensors": latents(10, 3)}
    torch.save(torch.from_numpy(parts["paper.pth"]), tmp_path / "paper.pth")  # as the paper's code saves them
    np.save(tmp_path / "plain.npy", parts["plain.npy"])
    np.savez(tmp_path / "named.npz", latents=parts["named.npz"], labels=np.arange(20) % 2,
             keys=np.array([f"img/{i:02d}.png" for i in range(20)]))
    save_file({"latents": parts["tensors.safetensors"], "labels": np.full(10, 1, np.int64)},
              tmp_path / "tensors.safetensors")
    return [tmp_path / name for name in parts], parts


def test_import_latents_of_every_format_through_the_cli(files, tmp_path):
    paths, parts = files
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    out = tmp_path / "imported.zarr"
    result = cli("import-latents", *paths, "--out", out, "--classes", tmp_path / "classes.txt")
    assert result.exit_code == 0, result.output
    assert "Imported 130 latents of 4x4x4 from 4 files" in result.stdout

    store = LatentStore.open(str(out))
    expected = np.concatenate(list(parts.values()))
    np.testing.assert_array_equal(store.latents[:], expected)
    assert store.latents.dtype == np.float32
    np.testing.assert_array_equal(store.labels[:], [-1] * 100 + list(np.arange(20) % 2) + [1] * 10)
    keys = [str(k) for k in store.keys[:]]
    assert keys[0] == "paper/00000000" and keys[70] == "plain/00000000" and keys[100] == "img/00.png"
    flat = expected.reshape(len(expected), -1).astype(np.float64)  # the statistics, computed here by hand
    np.testing.assert_allclose(store.mean, flat.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(store.std, flat.std(0), rtol=1e-5, atol=1e-6)
    assert store.attrs["classes"] == ["cat", "dog"] and store.attrs["source"]["kind"] == "imported"

    # a store fit takes like an encoded one
    result = cli("fit", out, "--out", tmp_path / "run", "--preset", "tiny", "--codes", "16", "--epochs", "1",
                 "--batch-size", "32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "training.json").read_text())["data"]["count"] == 130


def test_import_latents_records_the_vae_and_checks_its_shape(files, tmp_path, tiny_dc_vae_dir):
    paths, _ = files
    # the tiny DC VAE (4x compression, no sample_size: 256 px by default) makes (4, 4, 4) latents at 16 px
    result = cli("import-latents", paths[1], "--out", tmp_path / "a.zarr", "--vae", tiny_dc_vae_dir)
    assert result.exit_code == 2 and "makes latents of shape (4, 64, 64) at 256 px" in result.output
    result = cli("import-latents", paths[1], "--out", tmp_path / "b.zarr", "--vae", tiny_dc_vae_dir, "--image-size", 16)
    assert result.exit_code == 0, result.output
    attrs = LatentStore.open(str(tmp_path / "b.zarr")).attrs
    assert attrs["vae"] == str(Path(tiny_dc_vae_dir).resolve()) and attrs["image_size"] == 16


def test_import_latents_refuses_pickles_and_bad_arrays_with_one_line(tmp_path):
    torch.save({"latents": torch.zeros(2, *SHAPE), "extra": NotATensor()}, tmp_path / "pickle.pth")
    np.save(tmp_path / "flat.npy", np.zeros((5, 16), np.float32))
    bad = latents(3, 0)
    bad[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "other.npy", np.zeros((2, 4, 2, 2), np.float32))
    for args, reason in (([tmp_path / "pickle.pth"], "weights_only=True"),
                         ([tmp_path / "flat.npy"], "float (N, C, H, W)"),
                         ([tmp_path / "nan.npy"], "row 1 holds NaN"),
                         ([tmp_path / "nan.npy", tmp_path / "other.npy"], "row 1 holds NaN"),
                         ([tmp_path / "missing.npy"], "not found"),
                         ([tmp_path / "notes.txt"], "not found")):
        result = cli("import-latents", *args, "--out", tmp_path / "x.zarr", "--overwrite")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], \
            result.output
