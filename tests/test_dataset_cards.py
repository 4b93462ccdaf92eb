"""Every token export carries a dataset card (README.md): inside the token store's folder, in the
folder of webdataset or parquet shards. It states the run's weights hash, preset, T, K and d, the
VAE and image size and the class names; its three lines of loading code run as written; `datasets`
loads a shard folder by its front matter alone. Zarr reads a store with a card in it (and lists it
without warnings from revq-pipe's own reads); a resumed export rewrites the card byte for byte, a
killed one leaves no temp file, and `overwrite` replaces the card with the rest."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from huggingface_hub import DatasetCard
from typer.testing import CliRunner
from zarr.errors import ZarrUserWarning

from revq_pipe.cli import app
from revq_pipe.pipeline.storage.store import write_latent_store
from revq_pipe.pipeline.storage.token_store import TokenStore
from revq_pipe.pipeline.train.config import FitConfig
from revq_pipe.stages.export_tokens import export_tokens
from revq_pipe.stages.fit import fit

COUNT, CLASSES, IMAGE_SIZE, VAE = 40, ["cat", "dog", "fox"], 32, "test-vae"
STAND_IN = "path/to/this/folder"  # the cards' loading code names the export's folder so


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    labels = np.arange(COUNT) % 3
    keys = [f"{CLASSES[label]}/img.{i:03d}.jpg" for i, label in enumerate(labels)]
    latents = np.random.default_rng(0).normal(size=(COUNT, 8, 4, 4)).astype(np.float32)
    store = write_latent_store(str(root / "latents.zarr"), latents, labels, keys, chunk_size=16,
                               attrs={"vae": VAE, "image_size": IMAGE_SIZE, "classes": CLASSES})
    fit(store.url, str(root / "run"), FitConfig.from_preset("tiny", codes=8, epochs=1, batch_size=16, device="cpu"),
        progress=False)
    return {"store": store.url, "run": root / "run", "keys": keys, "labels": labels}


def export(fitted, out: Path, format: str, **options) -> None:
    export_tokens(str(fitted["run"]), fitted["store"], str(out), format=format, device="cpu", progress=False,
                  **options)


def card_folders(out: Path, format: str) -> dict[str, Path]:
    """The folders of one export that each hold a card, by the kind of export they hold."""
    return {"zarr": {"zarr": out}, "wds": {"wds": out}, "parquet": {"parquet": out},
            "zarr+wds": {"zarr": out, "wds": Path(f"{out}-wds")}}[format]


def loading_code(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)\n```", card, re.S)
    assert len(blocks) == 1 and len(blocks[0].splitlines()) == 3, blocks
    return blocks[0]


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """`datasets` as the cards' code calls it, reading local folders only, caching under tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return datasets


@pytest.mark.parametrize("format", ["zarr", "wds", "parquet", "zarr+wds"])
def test_every_export_has_a_card_stating_the_run_the_vae_and_the_classes(fitted, tmp_path, format):
    export(fitted, tmp_path / "tokens", format, shard_size=16)
    config = json.loads((fitted["run"] / "config.json").read_text())
    weights = hashlib.sha256((fitted["run"] / "model.safetensors").read_bytes()).hexdigest()
    for kind, folder in card_folders(tmp_path / "tokens", format).items():
        card = DatasetCard.load(folder / "README.md")
        assert card.data.pretty_name and "revq" in card.data.tags and card.data.size_categories == ["n<1K"]
        rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", card.text, re.M))
        assert rows["tokenizer weights (sha256 of `model.safetensors`)"] == f"`{weights}`"
        assert rows["preset"] == f"`{config['preset']}`"
        assert (rows["tokens per image T"], rows["codes per position K"], rows["code dim d"]) == \
            (str(config["tokens"]), str(config["codes"]), str(config["dim"]))
        assert (rows["VAE"], rows["image size"], rows["images"]) == (f"`{VAE}`", f"{IMAGE_SIZE} px", str(COUNT))
        assert "0 `cat`, 1 `dog`, 2 `fox`" in card.text
        assert str(tmp_path) not in card.content  # nothing local: ready to publish
        if kind != "zarr":
            assert rows["files"].startswith(f"3 {'webdataset shards' if kind == 'wds' else 'parquet files'} of at most 16")
            suffix = {"wds": "tar", "parquet": "parquet"}[kind]
            assert card.data.configs == [{"config_name": "default",
                                          "data_files": [{"split": "train", "path": f"tokens-*.{suffix}"}]}]


def test_each_cards_three_lines_load_its_export(fitted, tmp_path, offline_datasets):
    export(fitted, tmp_path / "tokens.zarr", "zarr+wds", shard_size=16)
    export(fitted, tmp_path / "parquet", "parquet", shard_size=16)
    expected = TokenStore.open(str(tmp_path / "tokens.zarr")).tokens[:]
    loaded = {}
    for kind, folder in (("zarr", tmp_path / "tokens.zarr"), ("wds", tmp_path / "tokens.zarr-wds"),
                         ("parquet", tmp_path / "parquet")):
        code = loading_code((folder / "README.md").read_text()).replace(STAND_IN, str(folder))
        exec(code, loaded.setdefault(kind, {}))  # noqa: S102 - the card's own lines, as a reader runs them
    np.testing.assert_array_equal(loaded["zarr"]["ids"], expected)
    assert list(loaded["zarr"]["keys"]) == fitted["keys"] and list(loaded["zarr"]["labels"]) == list(fitted["labels"])
    wds_sample = loaded["wds"]
    assert (wds_sample["key"], wds_sample["label"]) == (fitted["keys"][0], fitted["labels"][0])
    np.testing.assert_array_equal(wds_sample["ids"], expected[0])
    np.testing.assert_array_equal(loaded["parquet"]["ids"].numpy(), expected)  # 256 asked, 40 there
    assert loaded["parquet"]["keys"] == fitted["keys"]


@pytest.mark.parametrize("format", ["parquet", "wds"])
def test_datasets_loads_a_shard_folder_by_its_card(fitted, tmp_path, offline_datasets, format):
    folder = tmp_path / format
    export(fitted, folder, format, shard_size=16, shuffle=True)
    (folder / "notes.json").write_text("{}")  # a stray file the card's data_files leave out
    dataset = offline_datasets.load_dataset(str(folder), split="train")
    key, ids = ("key", "tokens") if format == "parquet" else ("key.txt", "tokens.npy")
    assert dataset.num_rows == COUNT and sorted(dataset[key]) == sorted(fitted["keys"])
    export(fitted, tmp_path / "reference.zarr", "zarr")
    reference = TokenStore.open(str(tmp_path / "reference.zarr"))
    by_key = dict(zip(reference.keys[:], reference.tokens[:]))
    for row in dataset:
        np.testing.assert_array_equal(row[ids], by_key[row[key]])


def test_zarr_reads_a_token_store_with_its_card_and_resumes_it_without_warnings(fitted, tmp_path):
    out = tmp_path / "tokens.zarr"
    export(fitted, out, "zarr")
    TokenStore.open(str(out), mode="r+").update_attrs(complete=False, rows_done=16)  # as a kill leaves it
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZarrUserWarning)  # "Object at README.md is not recognized ..."
        export(fitted, out, "zarr")
    tokens = TokenStore.open(str(out))
    assert tokens.complete and len(tokens) == COUNT and (out / "README.md").is_file()


def test_a_resumed_export_rewrites_its_card_identically(fitted, tmp_path):
    export(fitted, tmp_path / "clean", "wds", shard_size=16)
    export(fitted, tmp_path / "resumed", "wds", shard_size=16)
    card = tmp_path / "resumed" / "README.md"
    card.write_text("torn")
    (tmp_path / "resumed" / "tokens-000002.tar").unlink()  # the last shard was not written yet
    export(fitted, tmp_path / "resumed", "wds", shard_size=16)
    assert card.read_bytes() == (tmp_path / "clean" / "README.md").read_bytes()


@pytest.mark.parametrize("format", ["zarr", "wds"])
def test_overwrite_replaces_the_card_with_the_export(fitted, tmp_path, format):
    out = tmp_path / "tokens"
    export(fitted, out, format)
    other_run = tmp_path / "other-run"
    fit(fitted["store"], str(other_run), FitConfig.from_preset("tiny", codes=8, epochs=1, batch_size=16, seed=1,
                                                               device="cpu"), progress=False)
    export_tokens(str(other_run), fitted["store"], str(out), format=format, device="cpu", progress=False,
                  overwrite=True)
    weights = hashlib.sha256((other_run / "model.safetensors").read_bytes()).hexdigest()
    assert weights in (out / "README.md").read_text()


def test_a_token_store_at_a_url_gets_its_card_there(fitted, memory_root):
    import fsspec

    export(fitted, f"{memory_root}/tokens.zarr", "zarr")
    with fsspec.open(f"{memory_root}/tokens.zarr/README.md", "r") as card:
        assert card.read().startswith("---\n") and len(TokenStore.open(f"{memory_root}/tokens.zarr")) == COUNT


KILLS = {  # (format, function to kill at, nth call, before or after it)
    "zarr: the card just written into a new store": ("zarr", "revq_pipe.stages.export_tokens:write_card", 1, "after"),
    "wds: the card under its temp name, not renamed": ("wds", "os:replace", 2, "before"),  # 1: export.json
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", KILLS)
def test_a_killed_export_run_again_writes_the_same_card_and_no_temp_file(fitted, tmp_path, moment, preloaded):
    format, target, nth, when = KILLS[moment]
    args = lambda out: ["export-tokens", str(fitted["run"]), fitted["store"], "--out", str(out),  # noqa: E731
                        "--format", format, "--device", "cpu"]
    killed = preloaded.run("kill_at:run_cli", args(tmp_path / "killed"), target, nth, when, logs=tmp_path / "child")
    assert killed.exitcode == -signal.SIGKILL, killed.stderr[-3000:]
    if format == "wds":
        assert (tmp_path / "killed" / "README.md.partial").is_file()
    for out in ("killed", "clean"):
        result = CliRunner().invoke(app, args(tmp_path / out))
        assert result.exit_code == 0, result.output
    assert (tmp_path / "killed" / "README.md").read_bytes() == (tmp_path / "clean" / "README.md").read_bytes()
    assert sorted(p.name for p in (tmp_path / "killed").rglob("*") if p.name.endswith((".partial", ".tmp"))) == []
    if format == "wds":
        assert sorted(wds_keys(tmp_path / "killed")) == sorted(fitted["keys"])


def wds_keys(folder: Path) -> list[str]:
    return [s["key.txt"] for s in wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")),
                                                 shardshuffle=False).decode()]
