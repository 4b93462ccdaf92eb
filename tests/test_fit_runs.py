"""A run dir's life: bit-for-bit CPU determinism at any thread count, extending a finished run
(--resume --epochs), starting over in place (--overwrite), and the Ctrl-C hint."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import torch_threads
from revq_pipe.cli import app
from revq_pipe.pipeline.storage.store import write_latent_store
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit

runner = CliRunner()
TINY = FitConfig.from_preset("tiny", codes=16, batch_size=32, device="cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    latents = np.random.default_rng(0).normal(size=(256, 16, 4, 4)).astype(np.float32)
    return write_latent_store(str(tmp_path_factory.mktemp("fit-runs") / "latents.zarr"), latents).url


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run) / "model.safetensors"))


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def untimed(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in ("epoch_seconds", "samples_per_s")} for line in lines]


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


@pytest.mark.slow
def test_two_cpu_fits_at_two_threads_write_bit_identical_weights(tmp_path, two_threads):
    """The README's promise at the two threads of a small box. Without deterministic algorithms the
    dense update's indexing backward adds duplicate codes in thread order: on these 512 latents of
    256 tokens, one epoch of two such runs drifted apart by ~1e-6."""
    latents = np.random.default_rng(0).normal(size=(512, 16, 8, 8)).astype(np.float32)
    store = write_latent_store(str(tmp_path / "latents.zarr"), latents).url
    for name in ("a", "b"):
        config = FitConfig.from_preset("tiny", epochs=1, batch_size=64, codebook_update="dense", device="cpu")
        fit(store, str(tmp_path / name), config, progress=False)
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert not torch.are_deterministic_algorithms_enabled()  # fit gave the setting back


def test_a_finished_run_extends_with_the_learning_rate_held_at_its_final_value(store, tmp_path):
    run = str(tmp_path / "run")
    fit(store, run, TINY.with_overrides(epochs=2), progress=False)
    first_two = metrics(run)
    args = ["fit", store, "--out", run, "--preset", "tiny", "--codes", "16", "--batch-size", "32", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--resume", "--epochs", "4"])
    assert result.exit_code == 0, result.output
    extended = metrics(run)
    assert extended[:2] == first_two
    lr = 0.01  # TrainConfig's default: decays to 5% over the first 2 epochs, then stays there
    assert [m["lr"] for m in extended] == pytest.approx([lr, lr * 0.05 ** 0.5, lr * 0.05, lr * 0.05], rel=1e-12)
    assert [m["lr_decay_epochs"] for m in extended] == [2, 2, 2, 2]
    assert [m["epoch"] for m in extended] == [1, 2, 3, 4]
    # plain --resume keeps the run's length (4 now): nothing to do; shortening it is refused
    assert runner.invoke(app, [*args, "--resume"]).exit_code == 0 and len(metrics(run)) == 4
    result = runner.invoke(app, [*args, "--resume", "--epochs", "3"])
    assert result.exit_code == 2 and "already trained 4 epochs" in result.output


def test_resuming_a_finished_run_says_it_is_finished_and_how_to_extend_it(store, tmp_path):
    """A finished run resumed is the same command run again (a job script after a restart): it exits
    0, as encode and export-tokens do on a complete output, trains nothing, and says so."""
    run = tmp_path / "run"
    fit(store, str(run), TINY.with_overrides(epochs=1), progress=False)
    before = (run / "checkpoint.pt").read_bytes(), metrics(run)
    result = runner.invoke(app, ["fit", store, "--out", str(run), "--preset", "tiny", "--codes", "16",
                                 "--batch-size", "32", "--device", "cpu", "--resume"])
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"fit: {run} (") and first.endswith(
        " - finished already: 1/1 epochs, nothing to train (to train it further, pass --resume with --epochs N above 1)")
    assert "resuming after" not in result.stderr and "no validation MSE" not in result.stderr
    assert ((run / "checkpoint.pt").read_bytes(), metrics(run)) == before


def test_a_run_started_before_k_means_became_the_default_resumes_with_the_same_command(store, tmp_path):
    """Its checkpoint says codebook_init "random" (the default then) and has no kmeans_budget; resumed
    without --codebook-init, it goes on as it began and ends as an uninterrupted run does."""
    run, whole = tmp_path / "run", tmp_path / "whole"
    fit(store, str(run), TINY.with_overrides(epochs=1, codebook_init="random"), progress=False)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    del checkpoint["train_config"]["kmeans_budget"]
    torch.save(checkpoint, run / "checkpoint.pt")
    args = ["fit", store, "--out", str(run), "--preset", "tiny", "--codes", "16", "--batch-size", "32", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--resume", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "training.json").read_text())["train"]["codebook_init"] == "random"
    # the extension keeps the decay of the run's first epoch, as --lr-decay-epochs 1 sets it from the start
    fit(store, str(whole), TINY.with_overrides(epochs=2, codebook_init="random", lr_decay_epochs=1), progress=False)
    assert_same_weights(run, whole)
    result = runner.invoke(app, [*args, "--resume", "--epochs", "3", "--codebook-init", "kmeans"])
    assert result.exit_code == 2 and "codebook_init: 'random' -> 'kmeans'" in result.output


def test_overwrite_starts_the_run_over_in_place_and_keeps_other_files(store, tmp_path):
    run = tmp_path / "run"
    fit(store, str(run), TINY.with_overrides(epochs=1, seed=1), progress=False)
    (run / "notes.txt").write_text("mine")
    args = ["fit", store, "--out", str(run), "--preset", "tiny", "--codes", "16", "--batch-size", "32",
            "--device", "cpu", "--epochs", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = runner.invoke(app, [*args, "--resume", "--overwrite"])
    assert result.exit_code == 2 and "pass one of them" in result.output
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    fit(store, str(tmp_path / "fresh"), TINY.with_overrides(epochs=2), progress=False)
    assert_same_weights(run, tmp_path / "fresh")
    assert untimed(metrics(run)) == untimed(metrics(tmp_path / "fresh"))
    assert (run / "notes.txt").read_text() == "mine"


STEPS_PER_EPOCH = 256 // 32


@pytest.mark.slow
def test_ctrl_c_says_how_to_continue_and_that_command_finishes_the_run(store, tmp_path, preloaded):
    run = tmp_path / "run"
    args = ["fit", store, "--out", str(run), "--preset", "tiny", "--codes", "16", "--batch-size", "32",
            "--device", "cpu", "--epochs", "12"]
    # Ctrl-C (a real SIGINT) at the third step of epoch 3, in a child process of its own.
    child = preloaded.run("kill_at:run_cli", args, "revq_pipe.pipeline.train.trainer:Trainer.step",
                          2 * STEPS_PER_EPOCH + 3, "before", logs=tmp_path / "child", signal_name="SIGINT")
    assert child.exitcode == 130, child.stderr
    hint = child.stderr.strip().splitlines()[-1]
    assert hint == (f"interrupted: the last completed epoch's checkpoint is kept in {run}: run the same command "
                    f"with --resume to continue")
    assert [m["epoch"] for m in metrics(run)] == [1, 2]
    finished = runner.invoke(app, [*args, "--resume"])
    assert finished.exit_code == 0, finished.output
    assert [m["epoch"] for m in metrics(run)] == list(range(1, 13))
