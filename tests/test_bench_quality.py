"""`revq-pipe bench quality`: the ablation table, and a second run that goes on from the first."""

import json

import numpy as np
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.storage.store import write_latent_store

SHAPE = (8, 4, 4)


def clustered_store(url, n, seed):
    """Latents around 16 centres shared by every seed: K=4 codes cannot tell them apart alone."""
    centres = np.random.default_rng(7).normal(size=(16, *SHAPE))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 16, n)
    latents = (centres[labels] + 0.1 * rng.normal(size=(n, *SHAPE))).astype(np.float32)
    write_latent_store(str(url), latents, labels, attrs={"vae": "test-vae", "image_size": 32})
    return str(url)


def run_bench(train, val, out, epochs="2"):
    result = CliRunner().invoke(app, ["bench", "quality", train, val, "--out", str(out), "--variants", "vit,none",
                                      "--codes", "4", "--epochs", epochs, "--batch-size", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_table_has_every_variant_and_a_second_run_reads_finished_fits_back(tmp_path):
    train, val = clustered_store(tmp_path / "train.zarr", 256, 0), clustered_store(tmp_path / "val.zarr", 64, 1)
    out = tmp_path / "bench"
    first = run_bench(train, val, out)
    rows = json.loads((out / "quality.json").read_text())["rows"]
    assert [(r["codes"], r["variant"]) for r in rows] == [(4, "vit"), (4, "none")]
    assert all(len(r["val_mse"]) == 2 for r in rows)
    assert rows[1]["val_mse"] == rows[1]["val_mse_quantizer"]  # `none` is the quantizer alone
    assert "| 4 | vit |" in first and "| 4 | none |" in first and "| 4 | none | " + f"{rows[1]['val_mse'][-1]:.4f}" in first

    # As if killed during the second fit: the first stays, the second has not started.
    finished = (out / "K4-vit" / "checkpoint.pt").stat().st_mtime_ns
    for path in sorted((out / "K4-none").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (out / "quality.json").unlink()
    second = run_bench(train, val, out)
    assert (out / "K4-vit" / "checkpoint.pt").stat().st_mtime_ns == finished
    assert json.loads((out / "quality.json").read_text())["rows"] == rows
    assert second.splitlines()[1:] == first.splitlines()[1:]  # the same table (CPU fits are deterministic)

    # Other arguments: the folder starts over.
    run_bench(train, val, out, epochs="1")
    assert all(len(r["val_mse"]) == 1 for r in json.loads((out / "quality.json").read_text())["rows"])
