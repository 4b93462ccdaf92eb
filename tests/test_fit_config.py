"""One config path: every setting of the model and of training has a `fit` flag that reaches its
field, a FitConfig refuses bad names and values at once, and the `auto` preset and the "too small"
refusals name what fits the store."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import revq_pipe.stages.fit as fit_stage
from revq_pipe.cli import app
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.train.config import MODEL_SETTINGS, FitConfig, TrainConfig

SHAPE = (16, 8, 8)  # C*H*W = 1024: the tiny preset's d = 4 gives T = 256
CPU = torch.device("cpu")

# setting -> (its words on the command line, the value its field must then hold); each value differs
# from the field's default in a store of 4096 latents with flipped ones, on the CPU.
FLAGS = {
    "tokens": (["--tokens", "64"], 64),
    "codes": (["--codes", "32"], 32),
    "split": (["--split", "spatial"], "spatial"),
    "rectifier": (["--rectifier", "cnn"], "cnn"),
    "rectifier_form": (["--rectifier-form", "paper"], "paper"),
    "rectifier_width": (["--rectifier-width", "96"], 96),
    "rectifier_layers": (["--rectifier-layers", "3"], 3),
    "attention_head_dim": (["--attention-head-dim", "16"], 16),
    "epochs": (["--epochs", "7"], 7),
    "batch_size": (["--batch-size", "48"], 48),
    "lr": (["--lr", "0.02"], 0.02),
    "rectifier_lr_scale": (["--rectifier-lr-scale", "0.1"], 0.1),
    "rectifier_weight_decay": (["--rectifier-weight-decay", "0.001"], 0.001),
    "grad_clip": (["--grad-clip", "0.5"], 0.5),
    "final_lr_fraction": (["--final-lr-fraction", "0.2"], 0.2),
    "reset": (["--no-reset"], False),
    "reset_ratio": (["--reset-ratio", "0.3"], 0.3),
    "reset_noise": (["--reset-noise", "0.05"], 0.05),
    "seed": (["--seed", "5"], 5),
    "codebook_init": (["--codebook-init", "random"], "random"),
    "kmeans_iters": (["--kmeans-iters", "3"], 3),
    "kmeans_budget": (["--kmeans-budget", "2.5"], 2.5),
    "flip": (["--no-flip"], False),
    "codebook_update": (["--codebook-update", "sparse"], "sparse"),
    "lr_decay_epochs": (["--lr-decay-epochs", "9"], 9),
    "step_options": (["--step-options", "fused-quantize+fused-adamw", "--codebook-update", "sparse"],
                     ("fused-quantize", "fused-adamw")),
}
# Fields no flag sets, because the store or another field fixes them.
DERIVED = {"latent_shape", "dim", "preset", "vae", "image_size"}  # dim = C*H*W / tokens; preset: --preset


@pytest.fixture
def configs_given_to_fit(monkeypatch):
    """The FitConfig each `revq-pipe fit` hands the stage (which is not run: the flags are under test)."""
    seen = []

    def record(store, out, config, **options):
        seen.append(config)
        raise UserError("recorded")

    monkeypatch.setattr(fit_stage, "fit", record)
    return seen


@pytest.fixture
def store(tmp_path) -> str:
    """A folder where fit's STORE must exist (never read: the stage is replaced)."""
    (tmp_path / "store").mkdir()
    return str(tmp_path / "store")


def resolved(config: FitConfig):
    return config.resolve(4096, SHAPE, device=CPU, has_flip=True)


def test_every_field_of_the_model_and_of_training_is_a_setting():
    model_fields = {f.name for f in dataclasses.fields(ReVQConfig)} - DERIVED
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(FitConfig.settings()) == model_fields | train_fields == set(FLAGS)


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_each_flag_reaches_its_field(name, configs_given_to_fit, store, tmp_path):
    words, expected = FLAGS[name]
    default = resolved(FitConfig.from_preset("tiny"))
    result = CliRunner().invoke(app, ["fit", store, "--out", str(tmp_path / "run"), "--preset", "tiny", *words])
    assert result.exit_code == 2 and "recorded" in result.output, result.output
    got = resolved(configs_given_to_fit[-1])
    where = "model" if name in MODEL_SETTINGS else "train"
    assert getattr(getattr(default, where), name) != expected
    assert getattr(getattr(got, where), name) == expected


def test_preset_and_device_reach_the_config(configs_given_to_fit, store, tmp_path):
    CliRunner().invoke(app, ["fit", store, "--out", str(tmp_path / "run"), "--preset", "tiny", "--device", "cpu"])
    assert configs_given_to_fit[-1] == FitConfig.from_preset("tiny", device="cpu")
    CliRunner().invoke(app, ["fit", store, "--out", str(tmp_path / "run")])
    assert configs_given_to_fit[-1] == FitConfig()  # the auto preset, the auto device, nothing overridden


def test_a_fit_config_refuses_unknown_names_and_values_at_once():
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        FitConfig.from_preset("huge")
    with pytest.raises(UserError, match="unknown fit setting 'codez'"):
        FitConfig.from_preset("tiny", codez=8)
    with pytest.raises(UserError, match="unknown split 'diagonal'"):
        FitConfig.from_preset("tiny", split="diagonal")
    with pytest.raises(UserError, match="`kmeans_iters` must be at least 1"):
        FitConfig.from_preset(kmeans_iters=0)
    assert FitConfig.from_dict(FitConfig.from_preset("tiny", codes=8, device="cpu").to_dict()) == \
        FitConfig.from_preset("tiny", codes=8, device="cpu")


def test_a_bad_preset_is_refused_before_torch_is_imported():
    code = ("import sys\nfrom revq_pipe.cli import app\n"
            "try:\n    app(['fit', 'STORE', '--out', 'RUN', '--preset', 'huge'])\nexcept SystemExit as exit:\n"
            "    print('EXIT', exit.code)\n"
            "print('HEAVY', [m for m in ('torch', 'zarr', 'diffusers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "EXIT 2" in done.stdout and "HEAVY []" in done.stdout
    assert "unknown preset 'huge'" in done.stderr


@pytest.mark.parametrize("count,preset,codes,batch", [
    (131_072, "512T_NC=16384", 16384, 256),  # 8 latents per code of the paper's preset
    (131_071, "tiny", 128, 64),
    (1024, "tiny", 128, 64),
    (1023, "tiny", 64, 64),  # 1023 // 8 = 127 -> 64 codes
    (203, "tiny", 16, 64),
    (40, "tiny", 4, 40),  # the batch cut to the store
])
def test_the_auto_preset_picks_the_papers_when_the_store_is_large_enough_else_tiny_cut_to_fit(count, preset, codes,
                                                                                              batch):
    result = FitConfig().resolve(count, SHAPE, device=CPU)
    assert (result.model.preset, result.model.codes, result.train.batch_size) == (preset, codes, batch)
    assert result.note.startswith(f"preset auto: {preset}")
    if preset == "tiny":
        assert "512T_NC=16384 needs 131,072" in result.note
        assert ("K=" in result.note) == (codes != 128) and ("batch=" in result.note) == (batch != 64)


def test_auto_keeps_what_the_user_sets_and_refuses_a_store_of_fewer_than_eight_latents():
    result = FitConfig.from_preset(codes=8, batch_size=4).resolve(203, SHAPE, device=CPU)
    assert (result.model.preset, result.model.codes, result.train.batch_size) == ("tiny", 8, 4)
    assert "K=" not in result.note and "batch=" not in result.note
    with pytest.raises(UserError, match="holds 7 latents: fit needs at least 8"):
        FitConfig().resolve(7, SHAPE, device=CPU)


def test_too_small_errors_name_what_fits_not_a_setting_the_user_never_made():
    with pytest.raises(UserError, match=r"\(preset 512T_NC=16384\) need at least 16384 latents.*"
                                        r"use `preset=tiny` `codes=16` or `codes=16`"):
        FitConfig.from_preset("512T_NC=16384").resolve(203, SHAPE, device=CPU, store="S")
    with pytest.raises(UserError) as refused:
        FitConfig.from_preset("tiny", codes=4).resolve(40, SHAPE, device=CPU, store="S")
    assert str(refused.value) == ("the batch of 64 latents (preset tiny) is larger than the store (S: 40 latents): "
                                  "use `batch_size=40` or less")
    with pytest.raises(UserError) as refused:
        FitConfig.from_preset("tiny", codes=4, batch_size=4096).resolve(256, SHAPE, device=CPU, store="S")
    assert str(refused.value) == ("`batch_size=4096` is larger than the store (S: 256 latents): "
                                  "use `batch_size=256` or less")
