"""Hugging Face Hub: a run dir is a model folder (config.json with the architecture only, weights,
a model card), `ReVQ.from_pretrained("user/repo")` and `revq-pipe ... user/repo` read a hub snapshot
from the cache offline, and `push_to_hub` uploads the model without the run's local paths."""

from __future__ import annotations

import json
import re
import shutil
import socket

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from typer.testing import CliRunner

from revq_pipe import ReVQ
from revq_pipe.cli import app
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.storage.store import write_latent_store
from revq_pipe.pipeline.storage.token_store import TokenStore
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.fit import fit

VAE_ID = "someone/tiny-vae"
REPO = "someone/revq-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_FILES = ("config.json", "model.safetensors", "README.md")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(96, 8, 4, 4)).astype(np.float32)
    train = write_latent_store(str(root / "train.zarr"), latents[:64], attrs={"vae": VAE_ID, "image_size": 32})
    val = write_latent_store(str(root / "val.zarr"), latents[64:], attrs={"vae": VAE_ID, "image_size": 32})
    config = FitConfig.from_preset("tiny", codes=8, epochs=2, batch_size=16, device="cpu")
    fit(train.url, str(root / "run"), config, val=val.url, progress=False)
    return {"root": root, "run": root / "run", "train": train.url, "val": val.url}


def hub_snapshot(cache, run_dir):
    """The run's published files laid out as the Hugging Face cache holds a downloaded repo."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in HUB_FILES:
        shutil.copy(run_dir / name, snapshot / name)
    return cache


def test_config_json_is_the_architecture_and_the_card_tells_the_training(run):
    config = json.loads((run["run"] / "config.json").read_text())
    assert {k for k in config if not k.startswith("_")} == {f for f in ReVQConfig.__dataclass_fields__}
    assert set(config) - set(ReVQConfig.__dataclass_fields__) == {"_weights_sha256"}
    assert config["vae"] == VAE_ID and config["image_size"] == 32 and config["codes"] == 8
    assert str(run["root"]) not in (run["run"] / "config.json").read_text()
    record = json.loads((run["run"] / "training.json").read_text())
    assert record["data"]["url"].startswith(str(run["root"])) and record["val"]["count"] == 32

    card = ModelCard.load(run["run"] / "README.md")
    assert card.data.library_name == "revq-pipe" and "image-tokenizer" in card.data.tags
    last = json.loads((run["run"] / "metrics.jsonl").read_text().splitlines()[-1])
    for fact in ("`tiny`", "| tokens per image T | 32 |", "| codes per position K | 8 |", "| code dim d | 4 |",
                 f"| VAE | {VAE_ID} |", "| training latents | 64 |", "| epochs trained | 2 |",
                 f"| validation latent MSE (normalised) | {last['val_mse']:.4g} |",
                 f"| validation latent MSE, quantizer alone (normalised) | {last['val_mse_quantizer']:.4g} |"):
        assert fact in card.text, fact
    assert str(run["root"]) not in card.content


def test_from_pretrained_reads_a_hub_snapshot_offline(run, tmp_path):
    cache = hub_snapshot(tmp_path / "cache", run["run"])
    local = ReVQ.from_pretrained(run["run"])
    hub = ReVQ.from_pretrained(REPO, cache_dir=cache)  # HF_HUB_OFFLINE=1 (conftest): the cache only
    assert hub.config == local.config and not hub.training
    for name, tensor in local.state_dict().items():
        assert torch.equal(hub.state_dict()[name], tensor), name
    with pytest.raises(UserError, match="neither a run directory nor a ReVQ model"):
        ReVQ.from_pretrained("someone/not-cached", cache_dir=cache)


def test_cli_takes_a_hub_id_as_run(run, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_snapshot(tmp_path / "cache", run["run"])))
    for source, out in ((str(run["run"]), tmp_path / "local.zarr"), (REPO, tmp_path / "hub.zarr")):
        result = CliRunner().invoke(app, ["export-tokens", source, run["val"], "--out", str(out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
    local, hub = TokenStore.open(str(tmp_path / "local.zarr")), TokenStore.open(str(tmp_path / "hub.zarr"))
    np.testing.assert_array_equal(hub.tokens[:], local.tokens[:])
    assert hub.attrs["run"] == local.attrs["run"]  # the same weights, by their sha256
    result = CliRunner().invoke(app, ["decode", REPO, str(tmp_path / "hub.zarr"), "--out", str(tmp_path / "d.zarr")])
    assert result.exit_code == 0, result.output


@pytest.fixture
def hub_at(monkeypatch):
    """Point the hub client at a local address, with the hub switched on (conftest switches it off)."""
    def point(port):
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return point


@pytest.fixture
def reachable_hub(hub_at):
    """A hub that answers the reachability probe: a listening socket (the requests themselves are replaced)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        hub_at(server.getsockname()[1])
        yield


@pytest.fixture
def unreachable_hub(hub_at):
    """A hub that refuses connections: a port nothing listens on any more."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    hub_at(port)


def test_push_to_hub_uploads_the_model_card_config_and_weights_only(run, monkeypatch, reachable_hub):
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):  # the network call, and only it, is replaced
        uploaded.update({path.name: path.read_bytes() for path in folder_path.iterdir()})
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = ReVQ.from_pretrained(run["run"])
    model.push_to_hub(REPO)
    assert sorted(uploaded) == sorted(HUB_FILES)  # no training.json, metrics or checkpoint
    assert uploaded["config.json"] == (run["run"] / "config.json").read_bytes()
    card = uploaded["README.md"].decode()
    assert f'ReVQ.from_pretrained("{REPO}")' in card and "| training latents | 64 |" in card
    assert all(str(run["root"]).encode() not in content for content in uploaded.values())


def test_push_to_hub_without_the_hub_says_so_in_one_line(run, monkeypatch, unreachable_hub):
    model = ReVQ.from_pretrained(run["run"])
    monkeypatch.setattr(HfApi, "create_repo", lambda *args, **kwargs: pytest.fail("the push went on"))
    with pytest.raises(UserError, match=r"cannot push someone/revq-tiny: the Hugging Face hub cannot be reached "
                                        r"\(127\.0\.0\.1: .*\); check the network") as refused:
        model.push_to_hub(REPO)
    assert "\n" not in str(refused.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="the Hugging Face hub is switched off"):
        model.push_to_hub(REPO)


@pytest.mark.parametrize("hub", ["switched off", "unreachable"])
def test_a_run_neither_here_nor_cached_names_no_setting_the_user_never_set(hub, tmp_path, monkeypatch, request):
    if hub == "unreachable":
        request.getfixturevalue("unreachable_hub")
    monkeypatch.chdir(tmp_path)  # no runs/nope here: a hub id to the loader
    (tmp_path / "s.zarr").mkdir()  # a STORE that exists: the run is what is missing
    why = "is switched off" if hub == "switched off" else r"cannot be reached \(127\.0\.0\.1"
    with pytest.raises(UserError) as python_error:
        ReVQ.from_pretrained("runs/nope", cache_dir=tmp_path)
    cli = CliRunner().invoke(app, ["export-tokens", "runs/nope", "s.zarr", "--out", "t.zarr"])
    assert cli.exit_code == 2
    for message in (str(python_error.value), cli.output):
        assert "runs/nope is neither a run directory nor a" in message and "local_files_only" not in message, message
        assert re.search(f"not in the Hugging Face cache, and the hub {why}", message), message
