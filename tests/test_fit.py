"""`fit` end to end on small stores of clustered latents: learning, reset, resume, reload, CLI errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from revq_pipe.cli import app
from revq_pipe.pipeline.train.checkpoint import load_checkpoint
from revq_pipe.pipeline.train.fit_outputs import epoch_line
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.storage.store import LatentStore, write_latent_store
from revq_pipe.pipeline.train.codebook_optim import SparseAdamW
from revq_pipe.pipeline.train.trainer import Trainer
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import TrainingStopped, fit




SHAPE = (8, 4, 4)  # T = 32 tokens of d = 4 with the tiny preset
FOUR_EPOCHS = FitConfig.from_preset("tiny", epochs=4, batch_size=32, codes=8, device="cpu")


def clustered_latents(n, *, clusters, noise, seed, repeat=1):
    """Latents around `clusters` fixed centres (shared by every seed); each distinct latent `repeat` times."""
    centres = np.random.default_rng(123).normal(size=(clusters, *SHAPE))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n // repeat)
    latents = centres[labels] + noise * rng.normal(size=(n // repeat, *SHAPE))
    return np.repeat(latents.astype(np.float32), repeat, 0), np.repeat(labels, repeat)


def make_store(url, n, **kwargs):
    latents, labels = clustered_latents(n, **kwargs)
    write_latent_store(str(url), latents, labels, attrs={"vae": "test-vae", "image_size": 32})
    return str(url)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """32 clusters and only K=8 codes per position: a token alone cannot tell its cluster, the
    combination of all tokens can - which is exactly what the rectifier learns to use."""
    root = tmp_path_factory.mktemp("fit")
    return {"root": root,
            "train": make_store(root / "train", 1024, clusters=32, noise=0.1, seed=0),
            "val": make_store(root / "val", 256, clusters=32, noise=0.1, seed=1),
            "small": make_store(root / "small", 256, clusters=32, noise=0.1, seed=2)}


@pytest.fixture(scope="module")
def vit_run(stores):
    out = stores["root"] / "vit"
    result = fit(stores["train"], str(out), FOUR_EPOCHS, val=stores["val"], progress=False)
    return out, result


def test_fit_lowers_both_losses_and_the_rectifier_beats_none_on_validation(stores, vit_run):
    out, result = vit_run
    first, last = result.history[0], result.history[-1]
    assert last["codebook_loss"] < first["codebook_loss"]
    assert last["rectifier_loss"] < 0.5 * first["rectifier_loss"]
    plain = fit(stores["train"], str(stores["root"] / "plain"), FOUR_EPOCHS.with_overrides(rectifier="none"),
                val=stores["val"], progress=False)
    assert last["val_mse"] < 0.6 * plain.history[-1]["val_mse"]
    assert "validation latent MSE" in result.report()


def test_the_run_dir_follows_the_design_and_loads_back_reproducing_the_validation_mse(stores, vit_run):
    out, result = vit_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    for key in ("codebook_loss", "rectifier_loss", "val_mse", "val_mse_raw", "val_mse_quantizer",
                "val_mse_quantizer_raw", "usage_mean_pct", "usage_min_pct",
                "perplexity", "epoch_seconds", "samples_per_s"):
        assert all(np.isfinite(m[key]) for m in lines), key
    # config.json describes the model alone; the training data and settings are in training.json
    config = json.loads((out / "config.json").read_text())
    assert config["tokens"] == 32 and config["codes"] == 8 and config["vae"] == "test-vae"
    assert "data" not in config and "train" not in config and str(stores["root"]) not in json.dumps(config)
    record = json.loads((out / "training.json").read_text())
    assert record["data"]["revq"]["vae"] == "test-vae" and record["data"]["count"] == 1024
    assert record["data"]["url"] == str(Path(stores["train"]).resolve())
    assert record["train"]["epochs"] == 4 and (out / "checkpoint.pt").is_file()

    model = ReVQ.from_pretrained(out)
    val = LatentStore.open(stores["val"])
    z = torch.from_numpy(val.latents[:])
    with torch.no_grad():
        raw = (model(z) - z).square().mean().item()
        normalised = (model.preprocessor.normalize(model(z)) - model.preprocessor.normalize(z)).square().mean().item()
    assert raw == pytest.approx(result.history[-1]["val_mse_raw"], rel=1e-5)
    assert normalised == pytest.approx(result.history[-1]["val_mse"], rel=1e-4)
    with torch.no_grad():  # the quantizer alone: codebook vectors, no rectifier
        quantized = model.dequantize(model.tokenize(z))
        alone = (quantized - model.preprocessor.normalize(z)).square().mean().item()
    assert alone == pytest.approx(result.history[-1]["val_mse_quantizer"], rel=1e-4)


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_the_reset_keeps_codes_in_use_when_k_exceeds_the_clusters(tmp_path, update):
    # 8 clusters, K=64: the initial sample draws repeated latents, so some codes start as copies that
    # lose every tie; only the Non-Activation Reset brings them back into use.
    store = make_store(tmp_path / "store", 512, clusters=8, noise=0.3, seed=0, repeat=8)
    usage = {}
    for reset in (True, False):
        config = FitConfig.from_preset("tiny", epochs=6, codes=64, rectifier="none", reset=reset, device="cpu",
                                       codebook_update=update)
        result = fit(store, str(tmp_path / f"run{reset}"), config, progress=False)
        usage[reset] = result.history[-1]["usage_mean_pct"]
        assert (result.history[-1]["codes_reset"] > 0) == reset
    assert usage[True] > 85 and usage[True] > usage[False] + 10


def small_run(stores, out, **overrides):
    """fit's arguments for 3 epochs of 4 steps on the small store."""
    config = FitConfig.from_preset("tiny", epochs=3, batch_size=64, codes=8, device="cpu", **overrides)
    return dict(store=stores["small"], out=str(out), config=config, val=stores["val"], progress=False)


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_resume_after_a_crash_ends_with_the_same_weights_as_an_uninterrupted_run(stores, tmp_path, monkeypatch, update):
    fit(**small_run(stores, tmp_path / "whole", codebook_update=update))

    real_step, calls = Trainer.step, {"n": 0}

    def crashing_step(self, z):
        calls["n"] += 1
        if calls["n"] == 4 + 2:  # in the middle of epoch 2
            raise RuntimeError("injected crash")
        return real_step(self, z)

    monkeypatch.setattr(Trainer, "step", crashing_step)
    with pytest.raises(RuntimeError, match="injected"):
        fit(**small_run(stores, tmp_path / "crashed", codebook_update=update))
    monkeypatch.setattr(Trainer, "step", real_step)
    assert load_checkpoint(tmp_path / "crashed", torch.device("cpu"))["epoch"] == 1
    resumed = fit(**small_run(stores, tmp_path / "crashed", codebook_update=update), resume=True)
    assert resumed.started_at_epoch == 1 and resumed.epochs_done == 3

    whole, crashed = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "crashed"))
    assert whole.keys() == crashed.keys()
    for key in whole:
        assert torch.equal(whole[key], crashed[key]), key
    timing = {"epoch_seconds", "samples_per_s"}
    lines = [[{k: v for k, v in json.loads(line).items() if k not in timing}
              for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("whole", "crashed")]
    assert lines[0] == lines[1]


def test_a_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(stores, tmp_path, monkeypatch):
    real_step, calls = Trainer.step, {"n": 0}

    def diverging_step(self, z):
        calls["n"] += 1
        losses = real_step(self, z)
        if calls["n"] == 4 + 2:  # after epoch 2, step 2: the rectifier's output turns NaN from the next step on
            with torch.no_grad():
                self.model.rectifier.conv_out.bias[0] = float("nan")
        return losses

    monkeypatch.setattr(Trainer, "step", diverging_step)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"epoch 2, step 3: non-finite loss.*epoch 1 is kept"):
        fit(**small_run(stores, out, rectifier="cnn"))
    assert load_checkpoint(out, torch.device("cpu"))["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    ReVQ.from_pretrained(out)


def test_non_finite_codebooks_stop_the_run_at_the_next_search(stores, tmp_path, monkeypatch):
    real_apply, calls = SparseAdamW.apply, {"n": 0}

    def poisoning_apply(self, ids, grads):
        calls["n"] += 1
        norm = real_apply(self, ids, grads)
        if calls["n"] == 4 + 1:
            self.codebooks.data[0, 0, 0] = float("inf")
        return norm

    monkeypatch.setattr(SparseAdamW, "apply", poisoning_apply)
    with pytest.raises(TrainingStopped, match=r"epoch 2, step 2: codebooks contains NaN or inf"):
        fit(**small_run(stores, tmp_path / "run", rectifier="none", codebook_update="sparse"))


def test_bench_fit_runs_both_steps_on_the_cpu_and_they_agree_on_the_first_step():
    result = CliRunner().invoke(app, ["bench", "fit", "--preset", "tiny", "--device", "cpu", "--steps", "1",
                                      "--batch-size", "2"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "this project" in out and "reference style" in out and "100 ep. h" in out
    assert "-> agree" in out


def cli(*args):
    result = CliRunner().invoke(app, ["fit", *map(str, args)])
    return result.exit_code, result.stderr


@pytest.mark.parametrize("extra,message", [
    (["--tokens", "33"], "does not divide"),
    (["--codes", "100000"], "need at least 100000 latents"),
    (["--preset", "huge"], "unknown preset"),
    (["--split", "diagonal"], "unknown split"),
    (["--batch-size", "4096"], "larger than the store"),
])
def test_cli_refuses_impossible_configs_with_one_line_and_exit_2(stores, tmp_path, extra, message):
    code, err = cli(stores["small"], "--out", tmp_path / "run", "--preset", "tiny", "--device", "cpu", *extra)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_store_without_statistics_and_a_mismatched_validation_store(stores, tmp_path):
    bare = LatentStore.create(str(tmp_path / "bare"), n=16, latent_shape=SHAPE, dtype="float32", chunk_size=16, attrs={})
    bare.write(0, np.zeros((16, *SHAPE), np.float32), np.zeros(16), [str(i) for i in range(16)])
    code, err = cli(tmp_path / "bare", "--out", tmp_path / "run", "--preset", "tiny")
    assert code == 2 and "no mean/std statistics" in err
    other = str(tmp_path / "other")
    write_latent_store(other, np.random.default_rng(0).normal(size=(16, 4, 4, 4)).astype(np.float32))
    code, err = cli(stores["small"], "--out", tmp_path / "run", "--preset", "tiny", "--val", other)
    assert code == 2 and "validation store" in err


def test_cli_trains_then_refuses_to_overwrite_or_to_resume_with_another_config(stores, tmp_path):
    out = tmp_path / "run"
    args = [stores["small"], "--out", out, "--preset", "tiny", "--epochs", "1", "--codes", "8", "--device", "cpu"]
    result = CliRunner().invoke(app, ["fit", *map(str, args)])
    assert result.exit_code == 0, result.stderr
    assert "fit: " in result.stdout and "ReVQ.from_pretrained" in result.stdout
    code, err = cli(*args)
    assert code == 2 and "--resume" in err
    code, err = cli(*args[:-4], "--codes", "16", "--device", "cpu", "--resume")
    assert code == 2 and "different model config" in err and "codes: 8 -> 16" in err
    code, _ = cli(*args, "--resume")  # the same command again: nothing left to do
    assert code == 0


@pytest.fixture(scope="module")
def photo_stores(tmp_path_factory):
    """Latents of real photo crops through the embedded VAE: training photos, and held-out ones."""
    from revq_pipe.pipeline.images.embedded_vae import EMBEDDED_IMAGE_SIZE
    from revq_pipe.pipeline.images.sample_images import HOLDOUT_PHOTOS, TRAIN_PHOTOS, photo_crops, write_image_folder
    from revq_pipe.stages.encode import encode

    root = tmp_path_factory.mktemp("photo-fit")
    stores = {}
    for name, photos, count, seed in (("train", TRAIN_PHOTOS, 384, 0), ("val", HOLDOUT_PHOTOS, 64, 1)):
        write_image_folder(root / name, photo_crops(photos, count, seed=seed, out_size=EMBEDDED_IMAGE_SIZE))
        encode(str(root / name), str(root / f"{name}.zarr"), vae="revq-pipe-embedded", device="cpu",
               dtype="float32", workers=0, progress=False)
        stores[name] = str(root / f"{name}.zarr")
    return stores


def test_on_photo_latents_the_default_rectifier_beats_none_and_the_paper_form(photo_stores, tmp_path):
    history = {}
    for name, options in (("default", {}), ("none", {"rectifier": "none"}), ("paper", {"rectifier_form": "paper"})):
        config = FitConfig.from_preset("tiny", epochs=4, batch_size=32, codes=32, device="cpu", **options)
        result = fit(photo_stores["train"], str(tmp_path / name), config, val=photo_stores["val"], progress=False)
        history[name] = [m["val_mse"] for m in result.history]
    assert history["default"][-1] < history["none"][-1]
    assert history["default"][-1] < 0.9 * history["paper"][-1]


def test_the_epoch_line_says_when_the_rectifier_is_worse_than_the_quantizer_alone():
    metrics = {"epoch": 3, "codebook_loss": 0.2, "rectifier_loss": 0.1, "usage_mean_pct": 90.0, "usage_min_pct": 80.0,
               "codes_reset": 0, "samples_per_s": 100.0, "val_mse": 0.3, "val_mse_quantizer": 0.25, "val_mse_raw": 3.0}
    line = epoch_line(metrics, 10)
    assert "val MSE 0.3000 (quantizer alone 0.2500)" in line and "worse than the quantizer alone on validation" in line
    assert "worse" not in epoch_line({**metrics, "val_mse": 0.2}, 10)
    no_val = {k: v for k, v in metrics.items() if not k.startswith("val")}
    assert "worse" not in epoch_line(no_val, 10)
    assert "on training batches" in epoch_line({**no_val, "rectifier_loss": 0.3}, 10)
