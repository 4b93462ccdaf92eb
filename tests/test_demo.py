"""`revq-pipe demo --quick` runs every stage to the end with the embedded VAE, and its outputs load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.images.embedded_vae import EMBEDDED_IMAGE_SIZE
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.storage.token_store import TokenStore
from revq_pipe.pipeline.workdir import DEMO_MARKER as MARKER, claim_folder
from revq_pipe.stages.demo import COMPARISON_COUNT, QUICK


@pytest.mark.metrics_png  # the README's first command: every file as a user gets it
def test_demo_quick_runs_to_the_end_and_its_outputs_load(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick"])
    assert result.exit_code == 0, result.output
    text = result.output
    for stage in ("[1/6]", "[2/6] encode", "[3/6] fit", "[4/6] export-tokens", "[5/6] decode", "[6/6] eval"):
        assert stage in text
    assert text.index("1. write") < text.index("[1/6]")  # the plan comes first
    assert "through ReVQ tokens" in text and "PSNR" in text and str(out) in text

    train, held_out = LatentStore.open(str(out / "latents-train.zarr")), LatentStore.open(str(out / "latents-eval.zarr"))
    assert (len(train), len(held_out)) == (QUICK.train_images, QUICK.eval_images)
    model = ReVQ.from_pretrained(out / "run")
    assert model.config.preset == "tiny" and model.config.codes == QUICK.codes

    tokens = TokenStore.open(str(out / "tokens-eval.zarr"))
    assert tokens.complete and tokens.tokens.shape == (QUICK.eval_images, model.config.tokens)
    np.testing.assert_array_equal(tokens.keys[:], held_out.keys[:])
    decoded = LatentStore.open(str(out / "decoded-eval.zarr"))
    assert decoded.latents.shape == held_out.latents.shape and decoded.require_stats()
    assert len(list((out / "decoded-eval-images").rglob("*.png"))) == QUICK.eval_images

    evaluation = json.loads((out / "run" / "eval-latents-eval.json").read_text())
    assert evaluation["count"] == QUICK.eval_images
    assert all(np.isfinite(evaluation["image"][name]) for name in ("psnr_vae", "psnr_tokens", "ssim_vae", "ssim_tokens"))

    # the training curves are listed beside the comparison picture
    assert f"training plot   {out / 'run' / 'metrics.png'}" in text and f"comparison      {out / 'comparison.png'}" in text
    with Image.open(out / "run" / "metrics.png") as plot:
        assert plot.width > 500 and plot.height > 400
    with Image.open(out / "comparison.png") as sheet:
        tile = 2 * EMBEDDED_IMAGE_SIZE
        assert sheet.height == 3 * tile and sheet.width > COMPARISON_COUNT * tile


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--quick"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and "not made by `revq-pipe demo`" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_clears_its_own_previous_folder(tmp_path):
    out = tmp_path / "demo"
    claim_folder(out, MARKER, "revq-pipe demo")
    (out / "latents-train.zarr").mkdir()  # as a previous run would leave it
    claim_folder(out, MARKER, "revq-pipe demo")
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    with pytest.raises(UserError, match="is a file"):
        claim_folder(out / MARKER, MARKER, "revq-pipe demo")
