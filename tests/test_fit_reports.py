"""What fit tells a user: a clear refusal (or warning) when K does not suit the store's size, and
the per-epoch curves as metrics.png and, with --tensorboard, TensorBoard events."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.storage.store import write_latent_store

pytestmark = pytest.mark.metrics_png  # fits here draw metrics.png as users get it

SHAPE = (16, 8, 8)  # as the embedded VAE's: d=4 gives T=256


def store(path, n, seed=0):
    latents = np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)
    return write_latent_store(str(path), latents, attrs={"vae": "test-vae"}).url


def cli(*args):
    return CliRunner().invoke(app, ["fit", *map(str, args)])


def test_the_default_on_a_small_store_is_tiny_cut_to_fit_said_in_one_line_and_recorded(tmp_path):
    small = store(tmp_path / "small.zarr", 323)
    result = cli(small, "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu", "--reset-ratio", "0.5")
    assert result.exit_code == 0, result.output
    # 323 latents: 323 // 8 = 40 -> 32 codes, the tiny preset's batch of 64
    assert ("preset auto: tiny, K=32 for 323 latents (512T_NC=16384 needs 131,072: 8 per code; --preset "
            "chooses)") in result.stderr.splitlines()
    assert "256T_NC=32, preset tiny: T=256, K=32, d=4" in result.stdout
    record = json.loads((tmp_path / "run" / "training.json").read_text())
    assert record["fit_config"] == {"preset": "auto", "device": "cpu", "epochs": 1, "reset_ratio": 0.5}
    assert record["train"]["codebook_init"] == "kmeans" and record["train"]["reset_ratio"] == 0.5
    assert json.loads((tmp_path / "run" / "config.json").read_text())["codes"] == 32


def test_a_paper_preset_on_a_small_store_names_the_tiny_preset_or_a_sensible_k(tmp_path):
    small = store(tmp_path / "small.zarr", 323)
    result = cli(small, "--out", tmp_path / "run", "--preset", "512T_NC=16384")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "K=16384 codes per position (preset 512T_NC=16384) need at least 16384 latents" in lines[0]
    # 323 latents: 323 // 8 = 40 -> 32 codes, and the tiny preset with as many
    assert "use --preset tiny --codes 32 or --codes 32 (at most N/8)" in lines[0]
    assert not (tmp_path / "run").exists()

    bigger = store(tmp_path / "bigger.zarr", 2000, seed=1)
    result = cli(bigger, "--out", tmp_path / "run", "--preset", "512T_NC=16384")
    assert result.exit_code == 2 and "use --preset tiny (K=128) or --codes 128 (at most N/8)" in result.output


def test_codes_that_would_memorise_the_store_are_warned_about(tmp_path):
    small = store(tmp_path / "small.zarr", 323)
    result = cli(small, "--out", tmp_path / "run", "--preset", "tiny", "--epochs", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert ("warning: K=128 codes per position (preset tiny) for 323 latents, fewer than 8 per code: "
            "the codebooks may memorise the training latents; consider --codes 32 (at most N/8)") in result.stderr
    assert "fit: " in result.stdout and "256T_NC=128, preset tiny: T=256, K=128, d=4" in result.stdout


def test_every_fit_writes_metrics_png_and_tensorboard_events_on_request(tmp_path):
    train, val = store(tmp_path / "train.zarr", 256), store(tmp_path / "val.zarr", 64, seed=1)
    result = cli(train, "--out", tmp_path / "run", "--val", val, "--preset", "tiny", "--codes", "16", "--epochs", "3",
                 "--batch-size", "32", "--device", "cpu", "--tensorboard")
    assert result.exit_code == 0, result.output
    assert "metrics.png" in result.stdout
    with Image.open(tmp_path / "run" / "metrics.png") as plot:
        assert plot.format == "PNG" and plot.width > 600 and plot.height > 400
        # four panels of curves: far from a blank page
        assert np.asarray(plot.convert("L")).std() > 10

    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="tensorboard is not installed: pip install -e '.[test]' brings it")
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in ("val_mse", "val_mse_quantizer", "codebook_loss", "rectifier_loss", "usage_mean_pct", "perplexity"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3], key
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in history], rel=1e-6), key


def test_a_resumed_run_goes_on_writing_the_tensorboard_events_it_began(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="tensorboard is not installed: pip install -e '.[test]' brings it")
    train = store(tmp_path / "train.zarr", 128)
    args = (train, "--out", tmp_path / "run", "--preset", "tiny", "--codes", "16", "--batch-size", "32", "--device", "cpu")
    assert cli(*args, "--epochs", "1", "--tensorboard").exit_code == 0
    result = cli(*args, "--resume", "--epochs", "2")  # no --tensorboard this time
    assert result.exit_code == 0, result.output
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("codebook_loss")] == [1, 2]


def test_a_fit_without_validation_says_so_once_and_how_to_get_it(tmp_path):
    train, val = store(tmp_path / "train.zarr", 128), store(tmp_path / "val.zarr", 32, seed=1)
    args = (train, "--preset", "tiny", "--codes", "16", "--epochs", "1", "--batch-size", "32", "--device", "cpu")
    result = cli(*args, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    line = ("no validation MSE will be reported: pass --val STORE, a latent store of images kept out of training, "
            "to measure it after every epoch")
    assert result.stderr.splitlines().count(line) == 1
    result = cli(*args, "--out", tmp_path / "validated", "--val", val)
    assert result.exit_code == 0 and "no validation MSE" not in result.output


def test_tensorboard_is_off_unless_asked(tmp_path):
    train = store(tmp_path / "train.zarr", 128)
    result = cli(train, "--out", tmp_path / "run", "--preset", "tiny", "--codes", "16", "--epochs", "1",
                 "--batch-size", "32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "metrics.png").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def drawings(monkeypatch, every_s: float) -> list[int]:
    """With metrics.png redrawn every `every_s` seconds: the epochs each drawing of it shows, as fit draws them."""
    from revq_pipe.pipeline.train import fit_outputs

    drawn, draw = [], fit_outputs.plot_metrics
    monkeypatch.setattr(fit_outputs, "PLOT_EVERY_S", every_s)
    monkeypatch.setattr(fit_outputs, "plot_metrics", lambda history, path, **kw: (drawn.append(len(history)),
                                                                                  draw(history, path, **kw)))
    return drawn


@pytest.mark.parametrize("every_s, drawn_after", [(0.0, [1, 2, 3]), (float("inf"), [3])])
def test_metrics_png_is_redrawn_after_epochs_that_end_the_interval_and_after_the_last(tmp_path, monkeypatch,
                                                                                        every_s, drawn_after):
    drawn = drawings(monkeypatch, every_s)
    train = store(tmp_path / "train.zarr", 128)
    result = cli(train, "--out", tmp_path / "run", "--preset", "tiny", "--codes", "16", "--epochs", "3",
                 "--batch-size", "32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert drawn == drawn_after


def test_a_stopped_fit_draws_the_epochs_it_checkpointed(tmp_path, monkeypatch):
    from revq_pipe.pipeline.train.trainer import Trainer

    drawn, end_epoch = drawings(monkeypatch, float("inf")), Trainer.end_epoch

    def stop_in_the_third_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return end_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "end_epoch", stop_in_the_third_epoch)
    train = store(tmp_path / "train.zarr", 128)
    result = cli(train, "--out", tmp_path / "run", "--preset", "tiny", "--codes", "16", "--epochs", "3",
                 "--batch-size", "32", "--device", "cpu")
    assert result.exit_code == 130, result.output
    assert drawn == [2] and (tmp_path / "run" / "metrics.png").is_file()
